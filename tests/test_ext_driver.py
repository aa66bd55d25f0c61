"""sageattn._ext against a real driver: load every tree that runs here, check its ABI symbol and
kernels, launch one, and the errors name the call, its arguments and the CUDA error."""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def ext():
    from sageattn import _ext

    ok, message = _ext.driver_status()
    if not ok:
        pytest.skip(message)
    return _ext


@pytest.fixture(scope="module")
def manifest(ext):
    kernels = Path(ext.__file__).resolve().parent / "kernels"
    data = json.loads((kernels / "manifest.json").read_text())
    for entry in data["trees"].values():
        entry["image"] = (kernels / entry["fatbin"]).read_bytes()
    return data


def _runs_here(entry, capability) -> bool:
    # SASS for exactly this device, or PTX the driver can JIT for it (an "a" PTX only for its own).
    here = capability[0] * 10 + capability[1]
    if f"sm_{here}" in entry["sass"]:
        return True
    ptx = [re.fullmatch(r"compute_(\d+)(a?)\w*", p).groups() for p in entry["ptx"]]
    return any(int(v) == here or (not a and int(v) < here) for v, a in ptx)


@pytest.fixture(scope="module")
def loaded(ext, manifest):
    out = {}
    for tree, entry in manifest["trees"].items():
        if _runs_here(entry, ext.device_capability(0)):
            out[tree] = (entry, ext.load_module(0, entry["image"]))
    assert out, "no tree runs on device 0"
    return out


def test_device_queries(ext):
    assert ext.device_count() >= 1
    major, minor = ext.device_capability(0)
    assert (major, minor) == torch.cuda.get_device_capability(0)
    assert ext.device_name(0) == torch.cuda.get_device_name(0)


def test_modules_carry_the_abi_version_and_every_kernel(ext, loaded):
    from sageattn import _abi

    for tree, (entry, module) in loaded.items():
        assert ext.read_global_u32(module, "sageattn_abi_version") == _abi.ABI_VERSION, tree
        for name, info in entry["kernels"].items():
            function = ext.get_function(module, name)
            attrs = ext.function_attributes(function)
            assert attrs["max_threads"] >= info["threads"], name
            if attrs["param_bytes"]:  # known on drivers >= 12.4
                assert attrs["param_bytes"] == ctypes.sizeof(getattr(_abi, info["params"])), name
            ext.set_max_dynamic_smem(function, info["smem"])
            assert ext.function_attributes(function)["max_dynamic_smem"] == info["smem"], name


def test_errors_name_the_call_and_the_cuda_error(ext, manifest, loaded):
    tree, (entry, module) = next(iter(loaded.items()))
    with pytest.raises(ext.CudaError, match=r"cuModuleGetFunction\(.*\"no_such_kernel\"\) failed: "
                                            r"CUDA_ERROR_NOT_FOUND \(500\)"):
        ext.get_function(module, "no_such_kernel")
    with pytest.raises(ext.CudaError, match=r"cuModuleLoadData\(device 0, image of 64 bytes\) failed: "
                                            r"CUDA_ERROR_"):
        ext.load_module(0, bytes(range(64)))
    with pytest.raises(ext.CudaError, match=r"cuDeviceGet\(4096\) failed: CUDA_ERROR_INVALID_DEVICE"):
        ext.load_module(4096, entry["image"])
    with pytest.raises(ValueError, match="is not a module handle"):
        ext.get_function(module + 8, "x")
    name = next(iter(entry["kernels"]))
    function = ext.get_function(module, name)
    with pytest.raises(ext.CudaError, match=rf"cuFuncSetAttribute\({name}, MAX_DYNAMIC_SHARED_SIZE_BYTES"):
        ext.set_max_dynamic_smem(function, 1 << 30)
    with pytest.raises(ValueError, match="was loaded on device 0, not device 1"):
        ext.launch(1, function, (1, 1, 1), (1, 1, 1), 0, 0, b"")
    if ext.function_attributes(function)["param_bytes"]:
        with pytest.raises(ValueError, match=r"takes \d+ bytes of parameters, got 3"):
            ext.launch(0, function, (1, 1, 1), (1, 1, 1), 0, 0, b"abc")
    params = bytes(ext.function_attributes(function)["param_bytes"] or 8)
    with pytest.raises(ext.CudaError, match=rf"cuLaunchKernel\({name}, grid \(0, 1, 1\), block \(1, 1, 1\), "
                                            r"smem 0, stream 0x0, device 0\) failed: CUDA_ERROR_INVALID_VALUE"):
        ext.launch(0, function, (0, 1, 1), (1, 1, 1), 0, 0, params)
    # Programmatic dependent launch goes through cuLaunchKernelEx from driver 12.4 on (a plain
    # launch before); either way a failure names the entry point and the kernel.
    major, minor = (int(x) for x in re.search(r"CUDA driver (\d+)\.(\d+)", ext.driver_status()[1]).groups())
    entry_point = r"cuLaunchKernelEx" if (major, minor) >= (12, 4) else r"cuLaunchKernel"
    with pytest.raises(ext.CudaError, match=rf"{entry_point}\({name}, grid \(0, 1, 1\), block \(1, 1, 1\), "
                                            r"smem 0, stream 0x0, device 0\)"):
        ext.launch(0, function, (0, 1, 1), (1, 1, 1), 0, 0, params, True)


def test_launch_on_a_side_stream(ext, loaded):
    # The per-channel statistics kernel: a real launch whose result torch can check.
    from sageattn import _abi

    tree, (entry, module) = next((t, v) for t, v in loaded.items()
                                 if any(k["kind"] == "channel_stats" for k in v[0]["kernels"].values()))
    name, info = next((n, k) for n, k in entry["kernels"].items() if k["kind"] == "channel_stats")
    function = ext.get_function(module, name)
    B, H, S, D = 2, 3, 77, 128
    src = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    mean = torch.full((B, H, D), float("nan"), device="cuda")
    p = _abi.ChannelStatsParams(src=src.data_ptr(), src_stride_b=src.stride(0), src_stride_h=src.stride(1),
                                src_stride_s=src.stride(2), mean=mean.data_ptr(), batch=B, heads=H, seq=S,
                                head_dim=D, head_dim_padded=D, in_dtype=_abi.DTYPE_BF16, vectorized=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ext.launch(0, function, (D // 64, H, B), (info["threads"], 1, 1), info["smem"],
                   stream.cuda_stream, bytes(p))
    stream.synchronize()
    torch.testing.assert_close(mean, src.float().mean(dim=2), rtol=1e-5, atol=1e-6)
