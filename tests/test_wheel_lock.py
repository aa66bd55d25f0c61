"""The README's production install, exactly: a hash-pinned lock installed from a wheel directory,
offline, into a fresh environment (SAGEATTN_WHEELHOUSE names a directory that
`tools/build_wheels.py --lock DIR` or `tools/lock_wheelhouse.py` wrote; skipped without one)."""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

WHEELHOUSE = os.environ.get("SAGEATTN_WHEELHOUSE")  # relative: to the directory pytest started in
pytestmark = pytest.mark.skipif(not WHEELHOUSE, reason="SAGEATTN_WHEELHOUSE is not set")


def _offline_env(env_dir: Path) -> dict:
    """No pip configuration (this machine's index, find-links and constraints), no index, and
    every proxy pointing at a closed local port: any download attempt fails."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "SAGEATTN_"))}
    dead = "http://127.0.0.1:9"
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead,
               VIRTUAL_ENV=str(env_dir), PATH=f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return env


def _install(wheelhouse: Path, env_dir: Path) -> subprocess.CompletedProcess:
    venv.create(env_dir, with_pip=True)
    cmd = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--no-index", "--find-links",
           str(wheelhouse), "--require-hashes", "-r", str(wheelhouse / "requirements.lock")]
    return subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(env_dir))


def test_hash_pinned_offline_install(tmp_path):
    wheelhouse = Path(WHEELHOUSE).resolve()
    env_dir = tmp_path / "env"
    proc = _install(wheelhouse, env_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lock = (wheelhouse / "requirements.lock").read_text()
    flavour_line = next(line for line in lock.splitlines() if line.startswith("sageattn-cu"))
    dist = flavour_line.split("==")[0]
    run = subprocess.run([str(env_dir / "bin" / "python"), "-m", "sageattn"], capture_output=True,
                         text=True, env=_offline_env(env_dir), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"build: {dist} " in run.stdout and f"flavour {dist.split('-')[1]}" in run.stdout, run.stdout


def test_a_changed_file_is_refused(tmp_path):
    wheelhouse = Path(WHEELHOUSE).resolve()
    copy = tmp_path / "wheelhouse"
    copy.mkdir()
    for f in wheelhouse.iterdir():
        if f.name.startswith("sageattn_cu"):
            data = bytearray(f.read_bytes())
            data[-1] ^= 0xFF  # the zip's last byte: still a file of that name, another hash
            (copy / f.name).write_bytes(bytes(data))
        else:
            (copy / f.name).symlink_to(f)
    proc = _install(copy, tmp_path / "env")
    assert proc.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert not list((tmp_path / "env").glob("lib/python*/site-packages/sageattn"))
