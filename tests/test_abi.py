"""The committed kernel ABI header is what src/sageattn/_abi.py renders, and its layout checks hold."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from repo_files import REPO, load_file

HEADER = REPO / "kernels" / "common" / "params.h"


def _source_abi():
    # The checkout's _abi.py, loaded by path: the header is generated from this file.
    return load_file("_sageattn_abi_source", "src/sageattn/_abi.py")


def test_params_header_is_current():
    assert HEADER.read_text() == _source_abi().render_header(), (
        "kernels/common/params.h is stale: python src/sageattn/_abi.py --write kernels/common/params.h")


def test_installed_abi_matches_checkout():
    from sageattn import _abi

    assert _abi.ABI_VERSION == _source_abi().ABI_VERSION
    assert _abi.render_header() == _source_abi().render_header()


@pytest.mark.skipif(shutil.which("g++") is None, reason="no host C++ compiler")
def test_header_layout_asserts_hold_for_the_host_compiler(tmp_path):
    # The header's static_asserts restate ctypes' sizes and offsets: a host C++ compiler must agree
    # (the kernels' compiler checks the same asserts when the fatbins are built).
    source = tmp_path / "abi.cpp"
    source.write_text(f'#include "{HEADER}"\nint main() {{ return 0; }}\n')
    proc = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", str(source)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
