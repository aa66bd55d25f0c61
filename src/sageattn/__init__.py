"""sageattn: quantized attention (the SageAttention algorithms) from ahead-of-time compiled
kernels.

``import sageattn`` touches no GPU and imports neither triton nor the compiled host layer;
kernels load on first use, per device. ``python -m sageattn`` prints what this installation
carries and checks it.
"""

from .api import (sageattn, sageattn3_blackwell, sageattn_qk_int8_pv_fp16_cuda,
                  sageattn_qk_int8_pv_fp8_cuda, sageattn_qk_int8_pv_fp8_cuda_sm90,
                  sageattn_varlen, sparse_sageattn)
from .dispatch import PathUnavailableError, UnsupportedDeviceError, explain
from ._build_info import build_info
from ._loader import PackageError

__all__ = [
    "sageattn", "sageattn_qk_int8_pv_fp16_cuda", "sageattn_qk_int8_pv_fp8_cuda",
    "sageattn_qk_int8_pv_fp8_cuda_sm90", "explain",
    "sparse_sageattn", "sageattn_varlen", "sageattn3_blackwell",
    "build_info", "preload",
    "UnsupportedDeviceError", "PathUnavailableError", "PackageError", "__version__",
]


def preload(device=None, path=None) -> None:
    """Load the kernels a call on ``device`` would use now, rather than on the first call
    (loading reads memory back from the GPU, which a CUDA graph capture does not allow)."""
    from . import _loader, dispatch

    index = dispatch._device_index(device)
    if index is None:
        raise UnsupportedDeviceError("no CUDA device is available to preload kernels on")
    _loader.preload(dispatch.resolve(index, path).tree, index)


def __getattr__(name):
    # The version comes from the installed distribution (sageattn-cu128, sageattn-cu130, ...);
    # looked up lazily because scanning distributions costs import time.
    if name == "__version__":
        from importlib import metadata

        for dist in metadata.packages_distributions().get("sageattn", ()):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return "0+unknown"
    raise AttributeError(f"module 'sageattn' has no attribute {name!r}")


# The SDPA drop-in (sdpa.py): torch's signature, quantized where it applies.
from .sdpa import (  # noqa: E402
    patch_sdpa, reset_sdpa_stats, scaled_dot_product_attention, sdpa_stats)

__all__ += ["scaled_dot_product_attention", "patch_sdpa", "sdpa_stats", "reset_sdpa_stats"]
from .distributed import ring_attention, ulysses_attention  # noqa: E402  (sequence parallelism)
