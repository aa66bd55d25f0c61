"""sageattn._ext without a CUDA driver: it imports, reports why, and every driver call raises
CudaError. A missing driver is simulated (SAGEATTN_LIBCUDA_PATH pointing nowhere) in a fresh
process, so these tests also run on a machine that has one."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest


def _ext_file() -> str:
    import sageattn._ext

    return sageattn._ext.__file__


def _run_isolated(body: str, libcuda: str | None = "/nonexistent/libcuda.so.1") -> dict:
    """Run `body` in a fresh interpreter that loads only the extension (no torch, no package
    __init__); `body` fills the dict `out`, which comes back as JSON."""
    code = textwrap.dedent(f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location("sageattn._ext", {_ext_file()!r})
        ext = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ext)
        out = {{}}
    """) + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    env = dict(os.environ)
    env.pop("SAGEATTN_LIBCUDA_PATH", None)
    if libcuda is not None:
        env["SAGEATTN_LIBCUDA_PATH"] = libcuda
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _driver_loadable() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def test_import_does_not_open_the_driver():
    out = _run_isolated("""
        maps = open("/proc/self/maps").read()
        out["mapped"] = "libcuda" in maps
    """, libcuda=None)
    assert out["mapped"] is False


def test_driver_status_names_the_missing_library():
    out = _run_isolated("""
        out["status"] = ext.driver_status()
        out["again"] = ext.driver_status()  # cached: same answer, still no exception
    """)
    ok, message = out["status"]
    assert ok is False
    assert "libcuda.so.1" in message and "cannot load the CUDA driver" in message
    assert out["again"] == out["status"]


@pytest.mark.skipif(_driver_loadable(), reason="this machine has a CUDA driver")
def test_driver_status_on_this_machine_without_a_driver():
    from sageattn import _ext

    ok, message = _ext.driver_status()
    assert ok is False and "libcuda.so.1" in message


def test_calls_raise_cuda_error_naming_the_call():
    out = _run_isolated("""
        calls = {
            "device_count": lambda: ext.device_count(),
            "device_capability": lambda: ext.device_capability(0),
            "device_name": lambda: ext.device_name(0),
            "load_module": lambda: ext.load_module(0, b"\\x50\\xed\\x55\\xba" + bytes(60)),
            "get_function": lambda: ext.get_function(1, "sm80_channel_stats"),
            "function_attributes": lambda: ext.function_attributes(1),
            "set_max_dynamic_smem": lambda: ext.set_max_dynamic_smem(1, 65536),
            "read_global_u32": lambda: ext.read_global_u32(1, "sageattn_abi_version"),
            "launch": lambda: ext.launch(0, 1, (1, 1, 1), (256, 1, 1), 0, 0, bytes(8)),
        }
        for name, call in calls.items():
            try:
                call()
                out[name] = None
            except Exception as e:
                out[name] = [type(e).__name__, isinstance(e, RuntimeError),
                             isinstance(e, ext.CudaError), str(e)]
    """)
    for name, result in out.items():
        assert result is not None, f"{name} returned without a driver"
        type_name, is_runtime_error, is_cuda_error, message = result
        assert (type_name, is_runtime_error, is_cuda_error) == ("CudaError", True, True), name
        assert message.startswith(f"{name}: ") and "libcuda.so.1" in message, message


def test_arguments_are_checked_before_the_driver():
    from sageattn import _ext

    with pytest.raises(ValueError, match="load_module: the image is empty"):
        _ext.load_module(0, b"")
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        _ext.set_max_dynamic_smem(1, -1)
    with pytest.raises(TypeError):
        _ext.load_module(0, "not bytes")
    with pytest.raises(TypeError):
        _ext.launch(0, 1, (1, 1), (256, 1, 1), 0, 0, b"")  # grid needs three dimensions


def test_every_function_has_a_docstring():
    from sageattn import _ext

    names = ["driver_status", "device_count", "device_capability", "device_name", "load_module",
             "get_function", "function_attributes", "set_max_dynamic_smem", "read_global_u32",
             "launch"]
    for name in names:
        doc = getattr(_ext, name).__doc__ or ""
        # nanobind puts the signature first; the purpose line is the last non-empty line.
        lines = [line for line in doc.splitlines() if line.strip()]
        assert len(lines) >= 2 and lines[-1].endswith("."), (name, doc)
    assert issubclass(_ext.CudaError, RuntimeError)
