"""GPU test support: a compact table of measured errors, printed at the end of the run (and
written to ``$SAGEATTN_GPU_SUMMARY`` when set), so every GPU log records the numbers, not only
pass/fail. Rows aggregate a group of cases: worst error, lowest cosine, case count."""

import math
import os

import pytest

_ROWS_KEY = pytest.StashKey[dict]()
# column -> how a group aggregates it
_COLUMNS = {"rel_l1": max, "cos": min, "emu_rel_l1": max, "vs_emu": max, "lse_err": max}


def pytest_configure(config):
    config.stash[_ROWS_KEY] = {}


@pytest.fixture
def record(request):
    """``record(group, rel_l1=..., cos=..., ...)`` folds one case into the summary table."""
    rows = request.config.stash[_ROWS_KEY]

    def add(group, **metrics):
        row = rows.setdefault(group, {"n": 0})
        row["n"] += 1
        for name, fold in _COLUMNS.items():
            value = metrics.get(name)
            if value is None:
                continue
            row[name] = value if name not in row else fold(row[name], value)

    return add


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(_ROWS_KEY, {})
    if not rows:
        return
    lines = ["| case | n | " + " | ".join(_COLUMNS) + " |", "|---|---|" + "---|" * len(_COLUMNS)]
    for group, m in rows.items():
        lines.append(f"| {group} | {m['n']} | " +
                     " | ".join(_fmt(m.get(c)) for c in _COLUMNS) + " |")
    text = "\n".join(lines)
    terminalreporter.write_sep("=", "sageattn GPU errors: rel_l1/cos of the kernel vs the fp32 "
                                    "reference (worst per row), emu_rel_l1 the emulator's, "
                                    "vs_emu kernel vs emulator, lse_err max |LSE - reference|")
    terminalreporter.write_line(text)
    path = os.environ.get("SAGEATTN_GPU_SUMMARY")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
