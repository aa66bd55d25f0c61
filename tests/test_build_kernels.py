"""tools/build_kernels.py: architecture names and narrowing, the generated translation unit, and
the NVRTC + nvFatbin toolchain on a small source (where the libraries are installed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from repo_files import REPO, load_file


bk = load_file("_sageattn_build_kernels", "tools/build_kernels.py")
table = load_file("_sageattn_kernel_table", "tools/kernel_table.py")


@pytest.mark.parametrize("name, virtual, code", [
    ("sm_80", False, "80"), ("sm_120", False, "120"), ("sm_90a", False, "90a"),
    ("sm_120a", False, "120a"), ("sm_120f", False, "120f"), ("compute_80", True, "80"),
    ("compute_90a", True, "90a"),
])
def test_arch_names(name, virtual, code):
    arch = bk.Arch.parse(name)
    assert (arch.virtual, arch.code, arch.compute) == (virtual, code, f"compute_{code}")


@pytest.mark.parametrize("bad", ["80", "sm80", "sm_", "compute_x80", "sm_90ab"])
def test_bad_arch_names(bad):
    with pytest.raises(ValueError):
        bk.Arch.parse(bad)


def test_filter_narrows_sass_and_ptx():
    tree = table.Tree("t", "t/kernel.cuh", sass=("sm_80", "sm_90", "sm_90a", "sm_120"), ptx=("compute_80",))
    names = lambda archs: [a.name for a in archs]  # noqa: E731
    assert bk.parse_filter("") is None and bk.parse_filter(" ; ") is None
    sass, ptx = bk.select_archs(tree, None)
    assert (names(sass), names(ptx)) == (["sm_80", "sm_90", "sm_90a", "sm_120"], ["compute_80"])
    sass, ptx = bk.select_archs(tree, bk.parse_filter("80;90"))  # a bare code: SASS and PTX
    assert (names(sass), names(ptx)) == (["sm_80", "sm_90"], ["compute_80"])
    sass, ptx = bk.select_archs(tree, bk.parse_filter("sm_80,90a"))  # a full name: only itself
    assert (names(sass), names(ptx)) == (["sm_80", "sm_90a"], [])
    sass, ptx = bk.select_archs(tree, bk.parse_filter("compute_80"))
    assert (names(sass), names(ptx)) == ([], ["compute_80"])


def test_unknown_filter_token_stops_the_build(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "build_kernels.py"), "--out",
                           str(tmp_path / "out"), "--archs", "80;75"], capture_output=True, text=True)
    assert proc.returncode != 0 and "['75']" in proc.stderr, proc.stderr


def test_translation_unit_wraps_every_kernel():
    for tree in table.TREES:
        tu = bk.render_tu(tree)
        assert f'#include "{tree.header}"' in tu and '#include "common/params.h"' in tu
        assert 'extern "C" __device__ unsigned sageattn_abi_version = sageattn::kAbiVersion;' in tu
        for k in tree.kernels:
            assert (f'extern "C" __global__ void __launch_bounds__({k.threads}, {k.min_blocks})\n'
                    f"{k.name}(const __grid_constant__ sageattn::{k.params} p) {{ {k.call}; }}") in tu
            if k.smem_expr:
                assert f"static_assert(({k.smem_expr}) == {k.smem}," in tu


_SMALL_TU = """
struct P { unsigned long long out; int n; };
extern "C" __device__ unsigned sageattn_abi_version = 7;
extern "C" __global__ void __launch_bounds__(64) fill(const __grid_constant__ P p) {
  if (threadIdx.x < p.n) reinterpret_cast<int*>(p.out)[threadIdx.x] = sageattn_abi_version;
}
"""


def _nvrtc_or_skip():
    nv = load_file("_sageattn_nvrtc", "tools/nvrtc_toolchain.py")
    try:
        return nv.Nvrtc(bk.NVRTC_FLAGS)
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"NVRTC or nvFatbin not installed: {e}")


def test_nvrtc_toolchain_builds_a_fatbin(tmp_path):
    from test_build_contents import _cuobjdump

    toolchain = _nvrtc_or_skip()
    assert toolchain.version().startswith("nvrtc ")
    source = tmp_path / "small.cu"
    source.write_text(_SMALL_TU)
    images = []
    for name in ("sm_80", "sm_90a", "compute_80"):
        arch = bk.Arch.parse(name)
        out = tmp_path / f"small.{name}.{'ptx' if arch.virtual else 'cubin'}"
        toolchain.compile(source, [], arch, out)
        images.append((arch, out))
    fatbin = tmp_path / "small.fatbin"
    toolchain.pack(images, fatbin)
    elf = subprocess.run([_cuobjdump(), "--list-elf", str(fatbin)], capture_output=True, text=True,
                         check=True).stdout
    ptx = subprocess.run([_cuobjdump(), "--list-ptx", str(fatbin)], capture_output=True, text=True,
                         check=True).stdout
    assert "sm_80.cubin" in elf and "sm_90a.cubin" in elf and elf.count("ELF file") == 2, elf
    assert "sm_80.ptx" in ptx and ptx.count("PTX file") == 1, ptx
    symbols = subprocess.run([_cuobjdump(), "--dump-elf-symbols", str(fatbin)], capture_output=True,
                             text=True, check=True).stdout
    assert symbols.count("ENTRY") == 2 and " fill" in symbols


def test_nvrtc_compile_errors_carry_the_log(tmp_path):
    toolchain = _nvrtc_or_skip()
    source = tmp_path / "broken.cu"
    source.write_text("extern \"C\" __global__ void k() { undeclared_thing(); }\n")
    with pytest.raises(RuntimeError, match="undeclared_thing"):
        toolchain.compile(source, [], bk.Arch.parse("sm_80"), tmp_path / "broken.cubin")
