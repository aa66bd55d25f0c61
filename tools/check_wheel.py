#!/usr/bin/env python3
"""Repair and check sageattn wheels: what every released wheel must satisfy.

    python tools/check_wheel.py repair --plat manylinux_2_28 --dest DIR WHEEL   # cibuildwheel's repair step
    python tools/check_wheel.py check WHEEL [WHEEL ...]

`repair` runs `auditwheel repair` to the requested policy (the machine part comes from the wheel's
own tag), then `check` on the result. `check`:

- `auditwheel show`: the wheel is consistent with its manylinux tag, and that tag is
  manylinux_2_28 or older;
- the listing: one compiled module, `sageattn/_ext*.so`, and nothing grafted (no `*.libs/`), no
  torch, c10 or CUDA library under any name; `kernels/manifest.json` and every fatbin it lists,
  of the flavour the distribution name says;
- `readelf -d`: the module needs only the C/C++ runtime (libc, libdl, libm, libpthread, libgcc_s,
  libstdc++, the dynamic loader): never libtorch, libc10, libcudart, libcuda (dlopen-ed at run time) or libpython;
- an abi3 wheel: an `.abi3.so` module that `abi3audit --strict` passes;
- size under --max-mb (PyPI's default per-file limit).

Prints one JSON line per wheel (`{"wheel": ..., "bytes": ..., "tag": ..., ...}`) and exits
non-zero on the first wheel that fails.  Needs auditwheel (and abi3audit for abi3 wheels) on PATH
or importable, and readelf (binutils).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ALLOWED_NEEDED = {"libc.so.6", "libdl.so.2", "libm.so.6", "libpthread.so.0", "librt.so.1",
                  "libgcc_s.so.1", "libstdc++.so.6", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}
FORBIDDEN = re.compile(r"torch|c10|cudart|libcuda|nvrtc|nvfatbin|cublas|cudnn|nvidia|libpython", re.I)
NEWEST_POLICY = (2, 28)


class CheckError(Exception):
    pass


def _tool(name: str) -> list[str]:
    """The command for `name`: this interpreter's module (the pinned tools/wheel-tools.txt), else
    the executable on PATH (the one a manylinux image carries)."""
    if importlib.util.find_spec(name) is not None:
        return [sys.executable, "-m", name]
    exe = shutil.which(name)
    if exe is None:
        raise CheckError(f"{name} not found: pip install -r tools/wheel-tools.txt")
    return [exe]


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise CheckError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}")
    return proc.stdout


def wheel_tags(wheel: Path) -> tuple[str, str, str, list[str]]:
    """(distribution, python tag, abi tag, platform tags) from the file name."""
    parts = wheel.name[:-len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise CheckError(f"{wheel.name}: not a wheel file name")
    return parts[0], parts[-3], parts[-2], parts[-1].split(".")


def _policy(tag: str) -> tuple[int, int] | None:
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    m = re.match(r"(manylinux1|manylinux2010|manylinux2014)_", tag)
    if m:
        return legacy[m.group(1)]
    m = re.match(r"manylinux_(\d+)_(\d+)_", tag)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check(wheel: Path, max_mb: float) -> dict:
    dist, py_tag, abi_tag, plats = wheel_tags(wheel)
    report = {"wheel": wheel.name, "bytes": wheel.stat().st_size, "python": py_tag, "abi": abi_tag,
              "platforms": plats}
    policies = [_policy(p) for p in plats]
    if not plats or any(p is None or p > NEWEST_POLICY for p in policies):
        raise CheckError(f"{wheel.name}: platform tag {'.'.join(plats)} is not manylinux_2_28 or older")

    show = _run([*_tool("auditwheel"), "show", str(wheel)])
    m = re.search(r'consistent with\s+the following platform tag:\s+"([^"]+)"', show)
    if not m:
        raise CheckError(f"auditwheel show {wheel.name}: no platform tag found in:\n{show}")
    report["auditwheel_show"] = m.group(1)
    lowest = _policy(m.group(1))
    if lowest is None or lowest > NEWEST_POLICY:
        raise CheckError(f"{wheel.name}: auditwheel show says {m.group(1)}:\n{show}")
    if any(p < lowest for p in policies):
        raise CheckError(f"{wheel.name}: tagged {'.'.join(plats)}, but auditwheel finds it needs {m.group(1)}")

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        report["installed_bytes"] = sum(i.file_size for i in zf.infolist())
        shared = [n for n in names if re.search(r"\.so(\.|$)", n)]
        modules = [n for n in shared if re.fullmatch(r"sageattn/_ext\.[^/]*so", n)]
        if len(modules) != 1 or shared != modules:
            raise CheckError(f"{wheel.name}: expected one compiled module sageattn/_ext*.so, found {shared}")
        grafted = [n for n in names if re.match(r"[^/]+\.libs/", n)]
        bad = [n for n in names if FORBIDDEN.search(Path(n).name)]
        if grafted or bad:
            raise CheckError(f"{wheel.name}: carries libraries it must not: {grafted + bad}")
        manifest = json.loads(zf.read("sageattn/kernels/manifest.json"))
        for tree, entry in manifest.get("trees", {}).items():
            if f"sageattn/kernels/{entry['fatbin']}" not in names:
                raise CheckError(f"{wheel.name}: manifest lists {entry['fatbin']}, which is missing")
        report["fatbin_bytes"] = {e["fatbin"]: zf.getinfo(f"sageattn/kernels/{e['fatbin']}").file_size
                                  for e in manifest.get("trees", {}).values()}
        flavour = manifest.get("flavour")
        report.update(flavour=flavour, toolkit=manifest.get("toolkit"),
                      git_revision=manifest.get("git_revision"),
                      trees={t: e["sass"] + e["ptx"] for t, e in manifest.get("trees", {}).items()})
        m = re.fullmatch(r"sageattn_(cu\d+)", dist)
        if m and flavour != m.group(1):
            raise CheckError(f"{wheel.name}: the distribution says flavour {m.group(1)}, its "
                             f"kernels say {flavour!r}")
        with tempfile.TemporaryDirectory() as tmp:
            module = Path(zf.extract(modules[0], tmp))
            dynamic = _run(["readelf", "-d", str(module)])
            needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
            report["needed"] = needed
            extra = [n for n in needed if n not in ALLOWED_NEEDED or FORBIDDEN.search(n)]
            if extra:
                raise CheckError(f"{wheel.name}: {modules[0]} links {extra}; allowed: {sorted(ALLOWED_NEEDED)}")
            versions = sorted(set(re.findall(r"\b((?:GLIBC|GLIBCXX|CXXABI)_[\d.]+)\b",
                                             _run(["readelf", "-V", str(module)]))))
            report["symbol_versions"] = versions

    if abi_tag == "abi3":
        if not modules[0].endswith(".abi3.so"):
            raise CheckError(f"{wheel.name}: tagged abi3 but its module is {modules[0]}")
        audit = _run([*_tool("abi3audit"), "--strict", "--report", str(wheel)])
        report["abi3audit"] = " ".join(audit.split())[-300:]
    elif modules[0].endswith(".abi3.so"):
        raise CheckError(f"{wheel.name}: an abi3 module in a {abi_tag} wheel")

    if report["bytes"] > max_mb * 1e6:
        raise CheckError(f"{wheel.name}: {report['bytes'] / 1e6:.1f} MB, over the {max_mb} MB limit")
    return report


def repair(wheel: Path, plat: str, dest: Path, max_mb: float) -> dict:
    _, _, _, plats = wheel_tags(wheel)
    machine = re.sub(r"^linux_", "", plats[0])
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    _run([*_tool("auditwheel"), "repair", "--plat", f"{plat}_{machine}", "-w", str(dest), str(wheel)])
    made = sorted(set(dest.glob("*.whl")) - before)
    if len(made) != 1:
        raise CheckError(f"auditwheel repair {wheel.name} produced {[p.name for p in made]}")
    return check(made[0], max_mb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("repair")
    r.add_argument("--plat", default="manylinux_2_28", help="policy without the machine part")
    r.add_argument("--dest", type=Path, required=True)
    r.add_argument("wheel", type=Path)
    c = sub.add_parser("check")
    c.add_argument("wheels", type=Path, nargs="+")
    for p in (r, c):
        p.add_argument("--max-mb", type=float, default=100.0, help="size limit (PyPI's default: 100)")
    args = ap.parse_args(argv)
    try:
        if args.command == "repair":
            print(json.dumps(repair(args.wheel, args.plat, args.dest, args.max_mb)))
        else:
            for wheel in args.wheels:
                print(json.dumps(check(wheel, args.max_mb)))
    except CheckError as e:
        print(f"check_wheel: FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
