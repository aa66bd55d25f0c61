"""Release flavours: the toolchain pins, the staged tree each flavour builds from, prebuilt-kernel
verification, build_info() and the detection of two sageattn distributions shadowing each other."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from repo_files import REPO, load_file


flavours = load_file("_sageattn_flavours", "tools/flavours.py")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


@pytest.mark.parametrize("name", sorted(flavours.FLAVOURS))
def test_toolchain_pins_are_exact_and_of_the_flavours_cuda(name):
    flavour = flavours.FLAVOURS[name]
    assert flavour.distribution == f"sageattn-{name}"
    assert flavour.toolchain in ("nvcc", "nvrtc")
    for req in flavour.requires:
        dist, _, version = req.partition("==")
        assert version and "*" not in version, f"{req}: pin an exact release"
        assert version.startswith(flavour.cuda + "."), f"{req} is not CUDA {flavour.cuda}"


@pytest.mark.parametrize("name", sorted(flavours.FLAVOURS))
@pytest.mark.parametrize("prebuilt", [True, False])
def test_flavour_pyproject(name, prebuilt):
    flavour = flavours.FLAVOURS[name]
    text = flavours.flavour_pyproject((REPO / "pyproject.toml").read_text(), flavour, prebuilt)
    data = tomllib.loads(text)
    assert data["project"]["name"] == flavour.distribution
    defines = data["tool"]["scikit-build"]["cmake"]["define"]
    assert defines["SAGEATTN_FLAVOUR"]["default"] == name
    assert defines["SAGEATTN_PREBUILT_KERNEL_DIR"]["default"] == (
        flavours.PREBUILT_DIR_NAME if prebuilt else "")
    pinned = [o.get("build", {}).get("requires") for o in data["tool"]["scikit-build"]["overrides"]]
    # Kernels inside: nothing to compile, no toolchain to fetch. None (an sdist): the flavour's pins.
    assert (list(flavour.requires) in pinned) is (not prebuilt)


def test_stage_refuses_another_flavours_kernels(tmp_path):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "manifest.json").write_text(json.dumps({"flavour": "cu130", "trees": {}}))
    with pytest.raises(SystemExit, match="flavour 'cu130', not 'cu128'"):
        flavours.stage(flavours.FLAVOURS["cu128"], tmp_path / "staged", kernels)


def test_stage_copies_the_tree_and_the_kernels(tmp_path):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "manifest.json").write_text(json.dumps({"flavour": "cu128", "trees": {}}))
    staged = flavours.stage(flavours.FLAVOURS["cu128"], tmp_path / "staged", kernels)
    for rel in ("CMakeLists.txt", "tools/build_kernels.py", "src/sageattn/__init__.py",
                "kernels/common/params.h", f"{flavours.PREBUILT_DIR_NAME}/manifest.json"):
        assert (staged / rel).is_file(), rel
    assert not (staged / ".git").exists() and (staged / flavours.REVISION_FILE).read_text().strip()
    assert 'name = "sageattn-cu128"' in (staged / "pyproject.toml").read_text()


# --- Prebuilt kernels (CMake's SAGEATTN_PREBUILT_KERNEL_DIR) ------------------------------------


def _installed_kernels() -> Path:
    from sageattn import _loader

    if not (_loader.KERNELS_DIR / "manifest.json").is_file():
        pytest.skip("the installed sageattn carries no kernels")
    return _loader.KERNELS_DIR


def _verify(kernel_dir: Path, flavour) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "build_kernels.py"), "--verify",
                           str(kernel_dir), f"--flavour={flavour or ''}"], capture_output=True, text=True)


def test_verify_accepts_the_installed_kernels():
    kernels = _installed_kernels()
    manifest = json.loads((kernels / "manifest.json").read_text())
    if manifest.get("arch_filter") is None and set(manifest["trees"]) != {
            t.name for t in load_file("_sageattn_kernel_table", "tools/kernel_table.py").TREES}:
        pytest.skip("the installed kernels come from another kernel table")
    proc = _verify(kernels, manifest.get("flavour"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("change, message", [
    ({"abi_version": -1}, "kernel ABI -1"),
    ({"flavour": "cu999"}, "flavour 'cu999'"),
])
def test_verify_refuses_foreign_kernels(tmp_path, change, message):
    kernels = _installed_kernels()
    manifest = json.loads((kernels / "manifest.json").read_text())
    for tree in manifest["trees"].values():
        shutil.copy(kernels / tree["fatbin"], tmp_path / tree["fatbin"])
    expected_flavour = manifest.get("flavour")
    manifest.update(change)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    proc = _verify(tmp_path, expected_flavour)
    assert proc.returncode != 0 and message in proc.stderr, proc.stdout + proc.stderr


# --- build_info() and shadowing distributions ---------------------------------------------------


def test_build_info_reports_the_build():
    import sageattn

    info = sageattn.build_info()
    for key in ("distribution", "flavour", "toolkit", "git_revision", "abi_version", "trees",
                "distributions", "conflict", "error", "fatbin_options"):
        assert key in info, key
    if info["error"] is None:
        assert info["toolkit"] and info["git_revision"] and info["trees"]
        for tree in info["trees"].values():
            assert tree["sass"] and tree["kernels"] > 0
    name = (info["distribution"] or "").split(" ")[0].lower()
    if name.startswith("sageattn-cu"):  # a release flavour's wheel: its name says its kernels
        assert name == f"sageattn-{info['flavour']}"


def _fake_distribution(site: Path, name: str, version: str = "0.1.0", package: str = "sageattn") -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{package}/__init__.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


def test_two_flavours_in_one_place_are_a_conflict(tmp_path):
    from sageattn import _build_info

    _fake_distribution(tmp_path, "sageattn-cu128")
    _fake_distribution(tmp_path, "sageattn-cu130")
    _fake_distribution(tmp_path, "sageattn-extras", package="sageattn_extras")  # not sageattn/: ignored
    found = _build_info.providers([str(tmp_path)])
    assert sorted(d["name"] for d in found) == ["sageattn-cu128", "sageattn-cu130"]
    message = _build_info.conflict_message(found, str(tmp_path.resolve()), "cu130")
    assert "sageattn-cu128 0.1.0" in message and "sageattn-cu130 0.1.0" in message
    assert "replaced" in message and "pip install sageattn-cu130" in message
    assert _build_info.conflict_message(found[:1], str(tmp_path.resolve()), "cu130") is None


def test_python_m_sageattn_fails_on_a_hidden_second_flavour(tmp_path):
    import sageattn

    info = sageattn.build_info()
    if info["conflict"] or info["distribution"] is None:
        pytest.skip("needs sageattn installed as the only sageattn distribution")
    other = tmp_path / "other-site"
    _fake_distribution(other, "sageattn-cu999")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    code = textwrap.dedent("""
        import sys, runpy
        sys.path.append(sys.argv[1])   # after site-packages: the installed sageattn stays active
        runpy.run_module("sageattn", run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(other)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ERROR:" in proc.stdout and "sageattn-cu999 0.1.0" in proc.stdout, proc.stdout
