"""The standalone CUDA microbenchmarks in bench/ (run by hand on a GPU, NOTES.md) include the
kernels' own wrappers: they must keep compiling as those headers change. Compile only (no GPU)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from repo_files import REPO

SOURCES = sorted(p.name for p in (REPO / "bench").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("name", SOURCES)
def test_bench_source_compiles(name, tmp_path):
    cmd = ["nvcc", "-std=c++17", "-O3", f"-I{REPO / 'kernels'}", "-gencode", "arch=compute_90a,code=sm_90a",
           "-c", str(REPO / "bench" / name), "-o", str(tmp_path / "bench.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "bench.o").stat().st_size > 0


def test_bench_sources_found():
    assert {"mma_sync_rates.cu", "wgmma_shapes.cu"} <= set(SOURCES)
