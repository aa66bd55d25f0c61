#!/usr/bin/env python3
"""The CUDA flavours sageattn ships, as data, and the staging of one flavour's source tree.

A flavour is one PyPI distribution (`sageattn-cu128`, `sageattn-cu130`) whose kernels come from one
pinned CUDA toolkit taken from PyPI, so no machine needs a system CUDA install to build it. Every
flavour installs the same import package, `sageattn`.

    python tools/flavours.py list
    python tools/flavours.py requires cu128          # the toolchain pins, one per line (pip -r)
    python tools/flavours.py stage cu128 --out DIR [--kernels KDIR]

`stage` copies the source tree (what git tracks, plus untracked files git does not ignore) to DIR
and rewrites DIR/pyproject.toml for the flavour: the distribution name, the flavour, and with
`--kernels` the prebuilt kernel directory, copied to DIR/prebuilt-kernels. `pip wheel DIR` (or
cibuildwheel on DIR) then builds that flavour's wheel with no environment variable to remember:
the CI workflow and tools/build_wheels.py both build from a staged tree. PEP 621 forbids a dynamic
project name, hence the rewrite of a copy rather than a build option.

Standard library only (it runs before any virtual environment exists).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREBUILT_DIR_NAME = "prebuilt-kernels"
REVISION_FILE = ".git_revision"  # a staged tree is no git checkout: build_kernels.py reads this
# Scratch folders of a working tree that a release has no use for, and what staging itself adds
# (re-staging a staged tree writes them anew).
_NOT_STAGED = (".hypothesis/", ".dev/", f"{PREBUILT_DIR_NAME}/", REVISION_FILE)


@dataclasses.dataclass(frozen=True)
class Flavour:
    name: str                 # "cu128": the suffix of the distribution name
    cuda: str                 # the toolkit's major.minor, checked against the toolchain's own report
    toolchain: str            # build_kernels.py toolchain: "nvrtc" (NVRTC + nvFatbin) or "nvcc"
    requires: tuple           # the pinned PyPI packages that hold the toolchain
    fatbin_options: tuple     # extra fatbin packing options (compression)
    driver_floor: str         # the oldest NVIDIA driver branch that loads these fatbins

    @property
    def distribution(self) -> str:
        return f"sageattn-{self.name}"


FLAVOURS = {
    f.name: f for f in (
        # NVRTC + nvFatbin 12.8: PyPI's CUDA 12 nvcc wheel holds no nvcc driver, only ptxas.
        # Cubins stay uncompressed (only the PTX is, as fatbinary always did): compressed cubins
        # need a CUDA 12.4-era driver (r550), and 12.x minor-version compatibility promises r525.
        # The wheel is a zip archive, so the download is compressed all the same.
        Flavour("cu128", cuda="12.8", toolchain="nvrtc",
                requires=("nvidia-cuda-nvrtc-cu12==12.8.93", "nvidia-nvfatbin-cu12==12.8.90"),
                fatbin_options=(), driver_floor="r525 (r570 for sm_120)"),
        # CUDA 13's nvidia-cuda-nvcc wheel is a whole nvcc (with fatbinary; it pulls nvvm, crt and
        # the runtime headers, pinned here to the same release). CUDA 13 needs r580 anyway, so the
        # cubins are compressed too ("size": measured 5.8 MB -> 0.85 MB for the sm80 fatbin).
        Flavour("cu130", cuda="13.0", toolchain="nvcc",
                requires=("nvidia-cuda-nvcc==13.0.88", "nvidia-cuda-crt==13.0.88",
                          "nvidia-nvvm==13.0.88", "nvidia-cuda-runtime==13.0.96"),
                fatbin_options=("--compress-all", "--compress-mode=size"), driver_floor="r580"),
    )
}


def get(name: str) -> Flavour:
    try:
        return FLAVOURS[name]
    except KeyError:
        raise SystemExit(f"error: unknown flavour {name!r} (known: {', '.join(FLAVOURS)})") from None


# ---------------------------------------------------------------------------------------------
# Staging


def source_files(repo: Path = REPO) -> list[str]:
    """The files of the source tree: tracked plus untracked-but-not-ignored (git), else a walk
    that skips build outputs."""
    try:
        top = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, check=True).stdout.strip()
        if Path(top).resolve() != repo.resolve():  # a staged copy inside another checkout
            raise subprocess.CalledProcessError(0, "git")
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        return sorted({p for p in out.decode().split("\0") if p and (repo / p).is_file()
                       and not p.startswith(_NOT_STAGED)})
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "build", "dist", "wheelhouse", "__pycache__", ".pytest_cache", ".venv",
                *(d.rstrip("/") for d in _NOT_STAGED)}
        files = []
        for root, dirs, names in os.walk(repo):
            dirs[:] = [d for d in dirs if d not in skip]
            files += [os.path.relpath(os.path.join(root, n), repo) for n in names]
        return sorted(f for f in files if not f.startswith(_NOT_STAGED))


def _replace_once(text: str, pattern: str, replacement: str, what: str) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.M)
    if count != 1:
        raise SystemExit(f"error: pyproject.toml: expected one {what} line, found {count}")
    return new


def flavour_pyproject(text: str, flavour: Flavour, prebuilt: bool) -> str:
    """`text` (the repository's pyproject.toml, or a staged one) rewritten for `flavour`."""
    text = _replace_once(text, r'^name = "sageattn(-cu\d+)?"$', f'name = "{flavour.distribution}"',
                         "[project] name")
    text = _replace_once(text, r'^(SAGEATTN_FLAVOUR = \{ env = "SAGEATTN_FLAVOUR", default = )"[^"]*"',
                         rf'\g<1>"{flavour.name}"', "SAGEATTN_FLAVOUR define")
    text = _replace_once(
        text, r'^(SAGEATTN_PREBUILT_KERNEL_DIR = \{ env = "SAGEATTN_PREBUILT_KERNEL_DIR", default = )"[^"]*"',
        rf'\g<1>"{PREBUILT_DIR_NAME if prebuilt else ""}"', "SAGEATTN_PREBUILT_KERNEL_DIR define")
    if not prebuilt:
        # No kernels inside (the sdist): whatever builds a wheel compiles them, with this
        # flavour's toolchain from PyPI. An override needs a condition: this one always holds.
        pins = ", ".join(f'"{r}"' for r in flavour.requires)
        text = text.rstrip("\n") + (
            "\n\n[[tool.scikit-build.overrides]]\n"
            f"# Added by tools/flavours.py stage: the {flavour.name} toolchain, for builds that compile the kernels.\n"
            'if.platform-system = "^linux"\n'
            f"build.requires = [{pins}]\n")
    return text


def stage(flavour: Flavour, out: Path, kernels: Path | None, repo: Path = REPO) -> Path:
    """Copy the source tree to `out` and make it build `flavour` (see the module docstring)."""
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    for rel in source_files(repo):
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, dest)
    if kernels is not None:
        manifest = json.loads((kernels / "manifest.json").read_text())
        if manifest.get("flavour") != flavour.name:
            raise SystemExit(f"error: {kernels} holds kernels of flavour "
                             f"{manifest.get('flavour')!r}, not {flavour.name!r}")
        shutil.copytree(kernels, out / PREBUILT_DIR_NAME)
    pyproject = out / "pyproject.toml"
    pyproject.write_text(flavour_pyproject(pyproject.read_text(), flavour, kernels is not None))
    (out / REVISION_FILE).write_text(_build_kernels(repo).git_revision() + "\n")
    return out


def _build_kernels(repo: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sageattn_build_kernels", repo / "tools" / "build_kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the flavours, as JSON")
    p = sub.add_parser("requires", help="the flavour's toolchain pins, one per line")
    p.add_argument("flavour")
    p = sub.add_parser("stage", help="copy the source tree, set up to build FLAVOUR")
    p.add_argument("flavour")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kernels", type=Path, help="prebuilt kernels (build_kernels.py --flavour)")
    args = ap.parse_args(argv)

    if args.command == "list":
        print(json.dumps({n: {**dataclasses.asdict(f), "distribution": f.distribution}
                          for n, f in FLAVOURS.items()}, indent=1))
    elif args.command == "requires":
        print("\n".join(get(args.flavour).requires))
    else:
        out = stage(get(args.flavour), args.out, args.kernels)
        print(f"staged {get(args.flavour).distribution} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
