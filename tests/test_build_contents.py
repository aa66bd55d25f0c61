"""The installed package: fatbins hold the architectures and kernels its manifest promises, and the
host module links no torch and no CUDA library (cuobjdump from the nvidia-cuda-cuobjdump wheel)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from repo_files import load_file


@functools.cache
def _package_dir() -> Path:
    import sageattn._ext

    return Path(sageattn._ext.__file__).resolve().parent


@functools.cache
def _manifest() -> dict:
    return json.loads((_package_dir() / "kernels" / "manifest.json").read_text())


@functools.cache
def _kernel_table():
    return load_file("_sageattn_kernel_table", "tools/kernel_table.py")


@functools.cache
def _cuobjdump() -> str:
    """cuobjdump from the `nvidia-cuda-cuobjdump` wheel (nvidia/cu13/bin/), else a toolkit's."""
    candidates = [os.environ.get("SAGEATTN_CUOBJDUMP")]
    nvidia = importlib.util.find_spec("nvidia")
    for root in (nvidia.submodule_search_locations if nvidia else None) or ():
        candidates += sorted(str(p) for p in Path(root).glob("*/bin/cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    pytest.fail("cuobjdump not found: install the test extra (pip install '.[test]')")


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    return proc.stdout


def _tree_ids():
    try:
        return sorted(_manifest()["trees"])
    except (ImportError, OSError):  # reported by test_manifest_present
        return []


def _fatbin(tree: str) -> str:
    return str(_package_dir() / "kernels" / _manifest()["trees"][tree]["fatbin"])


def _arch_of(listed_name: str) -> str:
    # cuobjdump names images "<fatbin>.<n>.sm_90a.cubin" / "<fatbin>.<n>.sm_80.ptx".
    m = re.search(r"\.(sm_\d+[a-z]?)\.(cubin|ptx)$", listed_name.strip())
    assert m, f"unexpected cuobjdump line: {listed_name!r}"
    return m.group(1)


def test_manifest_present():
    from sageattn import _abi

    manifest = _manifest()
    assert manifest["abi_version"] == _abi.ABI_VERSION
    assert manifest["toolkit"] and manifest["git_revision"]
    assert manifest["trees"], "the build produced no tree"


def test_manifest_matches_kernel_table():
    manifest = _manifest()
    narrowed = manifest.get("arch_filter") is not None
    table = {t.name: t for t in _kernel_table().TREES}
    if not narrowed:
        assert set(manifest["trees"]) == set(table)
    for name, tree in manifest["trees"].items():
        want = table[name]
        if narrowed:
            assert set(tree["sass"]) <= set(want.sass) and set(tree["ptx"]) <= set(want.ptx)
        else:
            assert (tree["sass"], tree["ptx"]) == (list(want.sass), list(want.ptx))
        assert tree["fatbin"] == f"{name}.fatbin"
        assert list(tree["kernels"]) == [k.name for k in want.kernels]
        for k in want.kernels:
            got = tree["kernels"][k.name]
            assert (got["kind"], got["head_dim"], got["pv_accum"], got["threads"], got["smem"]) == (
                k.kind, k.head_dim, k.pv_accum, k.threads, k.smem), k.name


@pytest.mark.parametrize("tree", _tree_ids())
def test_fatbin_architectures(tree):
    listed_elf = _run(_cuobjdump(), "--list-elf", _fatbin(tree)).splitlines()
    listed_ptx = _run(_cuobjdump(), "--list-ptx", _fatbin(tree)).splitlines()
    sass = sorted(_arch_of(line) for line in listed_elf if line.strip())
    # PTX images are listed under their sm_ name; the manifest says compute_.
    ptx = sorted(_arch_of(line).replace("sm_", "compute_") for line in listed_ptx if line.strip())
    entry = _manifest()["trees"][tree]
    assert sass == sorted(entry["sass"])
    assert ptx == sorted(entry["ptx"])


@pytest.mark.parametrize("tree", _tree_ids())
def test_every_sass_image_has_every_kernel(tree):
    entry = _manifest()["trees"][tree]
    dump = _run(_cuobjdump(), "--dump-elf-symbols", _fatbin(tree))
    # One section per image, "Fatbin elf code:" or "Fatbin ptx code:", then "arch = sm_XX".
    sections = re.split(r"^Fatbin (elf|ptx) code:\s*$", dump, flags=re.M)[1:]
    images = [body for kind, body in zip(sections[::2], sections[1::2]) if kind == "elf"]
    archs = [re.search(r"^arch = (\S+)", img, re.M).group(1) for img in images]
    assert sorted(archs) == sorted(entry["sass"])
    for arch, img in zip(archs, images):
        # cuobjdump 13.0 prints "STT_FUNC STB_GLOBAL STO_ENTRY name", later ones "FUNC GLOBAL DEFAULT ENTRY name".
        entries = set(re.findall(r"^(?:STT_)?FUNC\s+(?:STB_)?GLOBAL\s.*\b(?:STO_)?ENTRY\s+(\S+)\s*$", img, re.M))
        assert entries == set(entry["kernels"]), arch
        assert re.search(r"^(?:STT_)?OBJECT\s.*\ssageattn_abi_version\s*$", img, re.M), arch


@pytest.mark.parametrize("tree", _tree_ids())
def test_ptx_has_every_kernel_and_the_abi_version(tree):
    from sageattn import _abi

    entry = _manifest()["trees"][tree]
    if not entry["ptx"]:
        pytest.skip(f"{tree} ships no PTX")
    ptx = _run(_cuobjdump(), "--dump-ptx", _fatbin(tree))
    assert set(re.findall(r"\.entry\s+(\w+)\s*\(", ptx)) == set(entry["kernels"])
    versions = re.findall(r"\.u32 sageattn_abi_version = (\d+);", ptx)
    assert versions and all(int(v) == _abi.ABI_VERSION for v in versions)


def _sass_by_function(tree: str, arch: str) -> dict:
    """{kernel name: its SASS text} of one architecture's image of a tree. cuobjdump -sass runs
    nvdisasm, which the nvidia-cuda-nvdisasm wheel puts beside cuobjdump (not on PATH)."""
    tool = _cuobjdump()
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(tool).parent), os.environ.get("PATH", "")])}
    proc = subprocess.run([tool, "-sass", "-arch", arch, _fatbin(tree)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, f"cuobjdump -sass -arch {arch} failed:\n{proc.stderr}"
    dump = proc.stdout
    parts = re.split(r"^\s*Function : (\S+)\s*$", dump, flags=re.M)[1:]
    return dict(zip(parts[::2], parts[1::2]))


# The block-scaled FP4 MMA as ptxas emits it (nvcc 13.0 and, per DESIGN.md, NVRTC 12.8).
_FP4_MMA = re.compile(r"\bOMMA\.SF\.16864\.F32\.E2M1\.E2M1\.UE4M3\.4X\b")
_E2M1_CVT = re.compile(r"\bF2FP\.SATFINITE\.E2M1\.F32\b")


@pytest.mark.parametrize("arch", ["sm_120a", "sm_121a"])
def test_sm120a_sass_has_the_block_scaled_fp4_mma(arch):
    """Verification 1 of the sm120 tree (no Blackwell GPU here): in the sm_120a image (and the
    sm_121a one, where the toolchain builds it) every attention kernel issues the block-scaled FP4
    MMA (head dim / 64 QK steps x 8 key tiles + head dim / 8 PV tiles per key block) and the
    quantizers the E2M1 conversion; the sm_90 image (the software-FP4 verification build) issues
    neither."""
    entry = _manifest()["trees"].get("sm120")
    if entry is None or arch not in entry["sass"]:
        pytest.skip(f"this build has no {arch} image (SAGEATTN_CUDA_ARCHS narrowed it, or the "
                    "toolchain predates it)")
    sass = _sass_by_function("sm120", arch)
    for name, k in entry["kernels"].items():
        if k["kind"] == "attention":
            hd = k["head_dim"]
            assert len(_FP4_MMA.findall(sass[name])) == (hd // 64) * 8 + hd // 8, name
            assert _E2M1_CVT.search(sass[name]), name          # P's second level
        if k["kind"] in ("quantize", "convert"):
            assert _E2M1_CVT.search(sass[name]), name
    if "sm_90" in entry["sass"]:
        soft = _sass_by_function("sm120", "sm_90")
        assert soft.keys() >= set(entry["kernels"])
        assert not any(_FP4_MMA.search(text) or _E2M1_CVT.search(text) for text in soft.values())


# --- The host module -------------------------------------------------------------------------

# No torch (no C++ ABI coupling), no CUDA runtime or driver (libcuda is dlopen-ed), no libpython.
_FORBIDDEN_LIBS = re.compile(r"torch|c10|cudart|libcuda\.|nvrtc|cublas|libpython", re.I)


def _ext_path() -> str:
    import sageattn._ext

    return sageattn._ext.__file__


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not installed")
def test_ext_links_no_torch_and_no_cuda_library():
    dynamic = _run("readelf", "-d", _ext_path())
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
    assert needed, dynamic
    assert not [lib for lib in needed if _FORBIDDEN_LIBS.search(lib)], needed


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not installed")
def test_ext_imports_no_driver_symbol():
    # Driver entry points come from dlsym at run time, never from the dynamic linker.
    undefined = _run("nm", "-D", "--undefined-only", _ext_path()).split()
    assert not [s for s in undefined if re.match(r"cu[A-Z]", s)]
    assert "dlopen" in " ".join(undefined)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="the stable ABI build is for Python 3.12+")
def test_ext_is_a_stable_abi_module():
    assert _ext_path().endswith(".abi3.so")
