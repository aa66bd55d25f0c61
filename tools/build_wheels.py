#!/usr/bin/env python3
"""Build, repair, check and test one flavour's wheels on this machine: no Docker, no system CUDA.

    python tools/build_wheels.py --flavour cu128                       # cp310, cp311, cp312-abi3
    python tools/build_wheels.py --flavour cu130 --python python --install test --lock build/wheelhouse

The steps and settings are those of .github/workflows/wheels.yml, where cibuildwheel runs them in
the manylinux_2_28 image:

1. a tools environment (build/wheels/tools) with the flavour's pinned toolchain
   (tools/flavours.py) and tools/wheel-tools.txt;
2. the kernels, compiled once: `build_kernels.py --flavour F` (the workflow's kernels job);
3. the staged source tree with those kernels inside (`tools/flavours.py stage`);
4. per Python: `pip wheel` of the staged tree (cibuildwheel's `build-frontend = "pip"`);
5. the `repair-wheel-command` of [tool.cibuildwheel], read from pyproject.toml: auditwheel repair
   to manylinux_2_28 plus tools/check_wheel.py;
6. tests: every compiled module loads in its interpreters (the cp312-abi3 one in 3.12 and 3.13);
   each `--test-torch` requirement gets a fresh environment with the wheel of --test-python,
   that torch and the test extra, where [tool.cibuildwheel]'s `test-command` runs;
7. with `--lock DIR`: a wheel directory for offline installs, the running interpreter's wheel and
   its dependencies (torch as --lock-with asks) plus DIR/requirements.lock, pinned by hash
   (tools/lock_wheelhouse.py); with `--install EXTRAS`: that wheel installed here.

One difference, because this host is Debian 12 (glibc 2.36, GCC 12) rather than the
manylinux_2_28 image (glibc 2.28, gcc-toolset): the host module is compiled by Zig's clang from
PyPI's `ziglang` (pinned below), targeting glibc 2.28 (`-target <arch>-linux-gnu.2.28`: Zig links
against stubs of that glibc version) with LLVM's libc++ linked statically. Linking with the host's
GCC instead binds dlopen@GLIBC_2.34 and GLIBCXX_3.4.29, and its static libstdc++ brings
arc4random@GLIBC_2.36 and _dl_find_object@GLIBC_2.35: auditwheel then refuses manylinux_2_28.
auditwheel checks the result against the manylinux_2_28 policy like any other wheel. Wheels go to
--out (dist/); timings, sizes and check results to build/wheels/<flavour>/report.json.

Runs on Python 3.11+ (tomllib); finds `python3.X` interpreters on PATH or under ~/.pyenv.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
ZIG = "ziglang==0.17.0"
GLIBC_TARGET = "2.28"  # manylinux_2_28


def log(msg: str) -> None:
    print(f"[build_wheels] {msg}", flush=True)


def run(cmd, *, env=None, cwd=None, capture=False) -> str:
    shown = cmd if isinstance(cmd, str) else " ".join(str(c) for c in cmd)
    log(f"$ {shown}")
    proc = subprocess.run(cmd, env=env, cwd=cwd, shell=isinstance(cmd, str), text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None)
    if proc.returncode != 0:
        if capture:
            print(proc.stdout)
        raise SystemExit(f"[build_wheels] failed ({proc.returncode}): {shown}")
    return proc.stdout if capture else ""


def find_python(version: str) -> Path:
    """An interpreter for "3.11", or a path or command name ("python": this environment's)."""
    if not re.fullmatch(r"3\.\d+", version):
        found = shutil.which(version)
        if not found:
            raise SystemExit(f"[build_wheels] no interpreter {version!r}")
        return Path(found)
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python")),
                         reverse=True)
    for c in candidates:
        if c and os.access(c, os.X_OK):
            out = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True)
            if out.stdout.strip() == version:
                return Path(c)
    raise SystemExit(f"[build_wheels] no Python {version} found (PATH, ~/.pyenv/versions)")


def py_version(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def clean_env(**extra) -> dict:
    """This process' environment less the build switches that must come from the staged tree."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SAGEATTN_", "SKBUILD_", "CMAKE_")) or k == "SAGEATTN_TEST_THREADS"}
    env.update(extra)
    return env


def make_venv(path: Path, python: Path) -> Path:
    if not (path / "bin" / "python").exists():
        run([str(python), "-m", "venv", str(path)])
    return path / "bin" / "python"


def tools_env(work: Path, flavour) -> Path:
    """build/wheels/tools: the flavour's toolchain pins and the repair tools."""
    python = make_venv(work / "tools", Path(sys.executable))
    run([str(python), "-m", "pip", "install", "-q", "-r", str(TOOLS / "wheel-tools.txt"),
         ZIG, *flavour.requires])
    return python


def zig_compilers(work: Path, tools_python: Path) -> dict:
    """CC and CXX for CMake: wrappers around `zig cc` / `zig c++` for glibc GLIBC_TARGET."""
    bin_dir = work / "zig"
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = f"{os.uname().machine}-linux-gnu.{GLIBC_TARGET}"
    env = {}
    for var, tool in (("CC", "cc"), ("CXX", "c++")):
        wrapper = bin_dir / f"zig-{tool}"
        # nanobind's headers call fprintf(stderr, ...) without <cstdio>, which libstdc++ happens
        # to bring in and libc++ (with Python's limited API, cp312-abi3) does not.
        extra = " -include cstdio" if tool == "c++" else ""
        wrapper.write_text(f'#!/bin/sh\nexec "{tools_python}" -m ziglang {tool} -target {target}{extra} "$@"\n')
        wrapper.chmod(0o755)
        env[var] = str(wrapper)
    return env


def substitute(command: str, **values) -> str:
    for key, value in values.items():
        command = command.replace("{" + key + "}", str(value))
    return command


def load_flavours():
    sys.path.insert(0, str(TOOLS))
    try:
        import flavours
    finally:
        sys.path.pop(0)
    return flavours


def smoke_load(wheel: Path, pythons: list[Path]) -> list[str]:
    """Load the wheel's compiled module in each interpreter without torch or the package
    (nanobind module init, symbol resolution, the no-driver path)."""
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "zipfile", "-e", str(wheel), tmp], capture=True)
        module = next(Path(tmp, "sageattn").glob("_ext*.so"))
        code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location("
                f"'sageattn._ext', {str(module)!r}); m = importlib.util.module_from_spec(spec); "
                "spec.loader.exec_module(m); ok, why = m.driver_status(); "
                "print(sys.version.split()[0], 'driver:', ok, why[:60])")
        for python in pythons:
            out = run([str(python), "-c", code], capture=True,
                      env=clean_env(SAGEATTN_LIBCUDA_PATH="/nonexistent/libcuda.so.1"))
            done.append(out.strip())
            log(f"  {wheel.name} loads in Python {out.strip()}")
    return done


def test_wheel(wheel: Path, python: Path, torch_req: str, project: Path, cib: dict, work: Path) -> dict:
    """A fresh environment: torch_req, then the wheel with its test extra, then test-command."""
    tag = re.sub(r"[^\w.]+", "_", torch_req)
    env_dir = work / f"test-{py_version(python)}-{tag}"
    if env_dir.exists():
        shutil.rmtree(env_dir)
    vpy = make_venv(env_dir, python)
    env = clean_env(VIRTUAL_ENV=str(env_dir), PATH=f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}")
    start = time.perf_counter()
    # cibuildwheel's before-test installs torch from PyTorch's CPU index, which this machine
    # cannot reach; the requirement given here takes its place.
    run([str(vpy), "-m", "pip", "install", "-q", torch_req], env=env)
    extras = ",".join(cib.get("test-extras", []))
    run([str(vpy), "-m", "pip", "install", "-q", f"{wheel}[{extras}]" if extras else str(wheel)], env=env)
    installed = time.perf_counter() - start
    torch_version = run([str(vpy), "-c", "import torch; print(torch.__version__)"], env=env,
                        capture=True).strip()
    command = substitute(cib["test-command"], project=project, package=project)
    log(f"$ {command}")
    with tempfile.TemporaryDirectory() as cwd:  # as cibuildwheel: not the source tree
        proc = subprocess.run(command, shell=True, env=env, cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(proc.stdout[-6000:])
    summary = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    shutil.rmtree(env_dir)  # CUDA builds of torch take several GB
    return {"wheel": wheel.name, "python": py_version(python), "torch": torch_version,
            "install_s": round(installed, 1), "tests_s": round(time.perf_counter() - start - installed, 1),
            "ok": proc.returncode == 0, "pytest": summary[-1].strip() if summary else None}


def main(argv: list[str] | None = None) -> int:
    flavours = load_flavours()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavour", required=True, choices=sorted(flavours.FLAVOURS))
    ap.add_argument("--python", default="3.10,3.11,3.12",
                    help="comma-separated versions or interpreter paths (3.12+: the cp312-abi3 wheel)")
    ap.add_argument("--out", type=Path, default=REPO / "dist")
    ap.add_argument("--work", type=Path, default=REPO / "build" / "wheels")
    ap.add_argument("--kernels", type=Path, help="prebuilt kernels of this flavour (skip step 2)")
    ap.add_argument("--test-torch", action="append", default=[],
                    help='a torch requirement to test the wheel with in a fresh environment, '
                         'repeatable (here "torch==2.13.0" is a CPU build on disk for Python 3.11)')
    ap.add_argument("--test-python", default="3.11", help="the interpreter of those tests")
    ap.add_argument("--abi3-load", default="3.12,3.13",
                    help="interpreters that load the cp312-abi3 module (missing ones are skipped)")
    ap.add_argument("--lock", type=Path, metavar="DIR", help="also write an offline wheel directory")
    ap.add_argument("--lock-with", default="torch", metavar="REQ",
                    help="the torch requirement that directory resolves (default: torch)")
    ap.add_argument("--install", metavar="EXTRAS", nargs="?", const="",
                    help="install the wheel for the running interpreter here, with these extras")
    args = ap.parse_args(argv)
    flavour = flavours.get(args.flavour)
    torch_reqs = args.test_torch

    work = (args.work / flavour.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = {"flavour": flavour.name, "distribution": flavour.distribution, "host": os.uname().machine,
              "timings_s": {}, "wheels": [], "tests": [], "loads": {}}
    t0 = time.perf_counter()

    tools_python = tools_env(args.work.resolve(), flavour)
    report["timings_s"]["tools_env"] = round(time.perf_counter() - t0, 1)

    if args.kernels:
        kernels = args.kernels.resolve()
    else:
        kernels = work / "kernels"
        start = time.perf_counter()
        run([str(tools_python), str(TOOLS / "build_kernels.py"), "--flavour", flavour.name,
             "--out", str(kernels), "--work-dir", str(work / "kernel-build")], env=clean_env())
        report["timings_s"]["kernels"] = round(time.perf_counter() - start, 1)
    report["kernels"] = json.loads((kernels / "manifest.json").read_text())
    report["kernels"].pop("trees")
    report["fatbin_bytes"] = {p.name: p.stat().st_size for p in sorted(kernels.glob("*.fatbin"))}

    staged = flavours.stage(flavour, work / "src", kernels)
    cib = tomllib.loads((staged / "pyproject.toml").read_text())["tool"]["cibuildwheel"]
    if cib.get("build-frontend", "pip") != "pip":
        raise SystemExit("[build_wheels] [tool.cibuildwheel] build-frontend must be pip to match")

    raw, repaired = work / "raw", work / "wheelhouse"
    for d in (raw, repaired):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    built: dict[str, Path] = {}
    tools_bin = tools_python.parent
    compilers = zig_compilers(args.work.resolve(), tools_python)
    for version in args.python.split(","):
        python = find_python(version.strip())
        v = py_version(python)
        if not any(pat.startswith(f"cp{v.replace('.', '')}-") for pat in cib["build"]):
            raise SystemExit(f"[build_wheels] Python {v} is not in [tool.cibuildwheel] build")
        start = time.perf_counter()
        before = set(raw.glob("*.whl"))
        run([str(python), "-m", "pip", "wheel", "--no-deps", "-w", str(raw), str(staged)],
            env=clean_env(**compilers))
        (wheel,) = set(raw.glob("*.whl")) - before
        built_s = time.perf_counter() - start
        start = time.perf_counter()
        # The repair command as cibuildwheel runs it, with the tools environment's python first.
        out = run(substitute(cib["repair-wheel-command"], project=staged, dest_dir=repaired, wheel=wheel,
                             package=staged),
                  env=clean_env(PATH=f"{tools_bin}{os.pathsep}{os.environ['PATH']}"), capture=True)
        checked = json.loads(out.strip().splitlines()[-1])
        checked.update(python_build=v, build_s=round(built_s, 1),
                       repair_s=round(time.perf_counter() - start, 1))
        report["wheels"].append(checked)
        built[v] = repaired / checked["wheel"]
        log(f"{checked['wheel']}: {checked['bytes'] / 1e6:.2f} MB, auditwheel: "
            f"{checked['auditwheel_show']}, built in {built_s:.0f} s")

    for v, wheel in built.items():
        pythons = [find_python(v)]
        if "abi3" in wheel.name:
            for extra in args.abi3_load.split(","):
                try:
                    pythons.append(find_python(extra.strip()))
                except SystemExit as e:
                    log(f"  skipped: {e}")
        report["loads"][wheel.name] = smoke_load(wheel, list(dict.fromkeys(pythons)))

    args.out.mkdir(parents=True, exist_ok=True)
    for wheel in built.values():
        shutil.copy2(wheel, args.out / wheel.name)

    test_python = find_python(args.test_python) if torch_reqs else None
    test_wheel_path = None
    if test_python is not None:
        tv = py_version(test_python)
        test_wheel_path = built.get(tv) or next((w for w in built.values() if "abi3" in w.name
                                                 and tuple(map(int, tv.split("."))) >= (3, 12)), None)
        if test_wheel_path is None:
            raise SystemExit(f"[build_wheels] no wheel built for the test interpreter {tv}")
    for req in torch_reqs:
        report["tests"].append(test_wheel(test_wheel_path, test_python, req, staged, cib, work))

    own = built.get(f"{sys.version_info[0]}.{sys.version_info[1]}") or next(
        (w for w in built.values() if "abi3" in w.name and sys.version_info >= (3, 12)), None)
    if (args.lock or args.install is not None) and own is None:
        raise SystemExit(f"[build_wheels] --lock/--install: no wheel built for {sys.executable}")
    if args.lock:
        start = time.perf_counter()
        shutil.rmtree(args.lock, ignore_errors=True)
        run([sys.executable, str(TOOLS / "lock_wheelhouse.py"), "--dest", str(args.lock.resolve()),
             str(own), args.lock_with])
        report["timings_s"]["lock"] = round(time.perf_counter() - start, 1)
    if args.install is not None:
        run([sys.executable, "-m", "pip", "install", f"{own}[{args.install}]" if args.install else str(own)])

    failed = [t for t in report["tests"] if not t["ok"]]
    report["timings_s"]["total"] = round(time.perf_counter() - t0, 1)
    (work / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"report: {work / 'report.json'}")
    for w in report["wheels"]:
        log(f"  {w['wheel']}: {w['bytes'] / 1e6:.2f} MB ({w['installed_bytes'] / 1e6:.1f} MB "
            f"installed), auditwheel {w['auditwheel_show']}, needs {' '.join(w['needed'])}")
    for t in report["tests"]:
        log(f"  tested {t['wheel']} with torch {t['torch']} (Python {t['python']}): "
            f"{'ok' if t['ok'] else 'FAILED'}, {t['pytest']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
