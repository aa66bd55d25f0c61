"""A drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

``scaled_dot_product_attention`` takes torch's signature and semantics. Where the quantized
path applies (4-D fp16/bf16 CUDA tensors, head dim <= 128, no mask, no dropout, no gradient
needed) it runs ``sageattn``; every other call goes to torch's own function unchanged, and
the first call of each fallback kind is logged once (logger ``sageattn.sdpa``).
``patch_sdpa()`` installs it as ``torch.nn.functional.scaled_dot_product_attention`` for a
block of code and restores what was there after; ``sdpa_stats()`` counts which path each
eager call took and why.

Causal alignment: torch's ``is_causal`` hides key ``j`` from query ``i`` when ``j > i``
(top-left), sageattn's when ``j > i + Sk - Sq`` (bottom-right). They agree when
``Sq == Sk``; otherwise the call is rewritten so they agree again (``_causal_top_left``).

Under ``torch.compile`` the routing is decided while tracing (shapes, dtypes and flags are
constants there, the device check runs once per trace) and the chosen path is what the graph
runs; such calls are not counted and log nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import threading
from collections import Counter

import torch
from torch._subclasses.fake_tensor import is_fake

from . import dispatch, ops
from ._loader import PackageError

__all__ = ["scaled_dot_product_attention", "patch_sdpa", "sdpa_stats", "reset_sdpa_stats",
           "FALLBACK_REASONS"]

logger = logging.getLogger("sageattn.sdpa")

# torch's own function (the builtin torch.nn.functional exports): the fallback, also while
# patch_sdpa() has replaced the name.
_torch_sdpa = torch._C._nn.scaled_dot_product_attention

_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 128
_MAX_SEQ = 2**31 - 1 - 128          # api._MAX_SEQ: the kernels keep lengths in int32 fields
# The device type the quantized path runs on (CPU tests route CPU tensors through a mocked
# quantized path by changing it).
_QUANTIZED_DEVICE_TYPE = "cuda"

# Why a call went to torch's function: reason -> what it means (README "Using it in models").
FALLBACK_REASONS = {
    "attn_mask": "an attn_mask was given",
    "dropout": "dropout_p > 0",
    "requires_grad": "an input requires grad while grad mode is on (sageattn has no backward)",
    "tensor type": "an input is not a plain torch.Tensor (a subclass: DTensor, a nested "
                   "jagged tensor, ...)",
    "layout": "an input is not a dense strided tensor (sparse)",
    "device": "an input is not on a CUDA device, or the inputs are on different devices",
    "dtype": "the inputs are not all float16 or all bfloat16",
    "not 4-D": "an input is not 4-D (B, H, L, E)",
    "head dim": "the head dim is above 128, or differs between query, key and value",
    "shape": "batch or key/value lengths differ, a size is 0, or the head counts differ "
             "without enable_gqa=True (torch broadcasts or raises)",
    "strides": "an input's last dimension is not contiguous",
    "scale": "scale is not a finite real number",
    "unsupported gpu": "sageattn has no path for this GPU in this package",
}

_lock = threading.Lock()
_paths: Counter = Counter()       # quantized calls per sageattn path ("sm80", ...)
_reasons: Counter = Counter()     # fallback calls per reason
_logged: set = set()
_device_errors: dict = {}         # CUDA index -> why no path runs there


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo (and with it
    triton) at ``import sageattn``: it only sets this attribute (torch 2.9-2.14; a CPU test
    checks that it still does)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _device_path(index: int) -> str:
    """The sageattn path for CUDA device ``index``, or "" when none runs there.

    Dispatch caches its answer per device; under torch.compile this runs once, while
    tracing, and the graph keeps the answer (no device query in the graph).
    """
    try:
        return dispatch.resolve(index).path
    except (dispatch.UnsupportedDeviceError, dispatch.PathUnavailableError,
            PackageError) as exc:
        _device_errors[index] = str(exc)
        return ""


def _plain(x) -> bool:
    # Fake tensors stand in for plain ones while tracing (torch.export, opcheck).
    return type(x) is torch.Tensor or is_fake(x)


def _route(q, k, v, attn_mask, dropout_p, scale, enable_gqa) -> str:
    """"" when the call suits the quantized path (the device aside), else the reason (a key
    of FALLBACK_REASONS). Every check is a constant under torch.compile; the order only picks
    the reason named."""
    if attn_mask is not None:
        return "attn_mask"
    if dropout_p != 0.0:
        return "dropout"
    if not (_plain(q) and _plain(k) and _plain(v)):
        return "tensor type"
    if q.layout != torch.strided or k.layout != torch.strided or v.layout != torch.strided:
        return "layout"
    dev = q.device
    if dev.type != _QUANTIZED_DEVICE_TYPE or k.device != dev or v.device != dev:
        return "device"
    dt = q.dtype
    if dt not in _DTYPES or k.dtype != dt or v.dtype != dt:
        return "dtype"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "requires_grad"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "not 4-D"
    B, Hq, Sq, E = q.shape
    Bk, Hk, Sk, Ek = k.shape
    Bv, Hv, Sv, Ev = v.shape
    if not 1 <= E <= _MAX_HEAD_DIM or Ek != E or Ev != E:
        return "head dim"
    if (Bk != B or Bv != B or Hv != Hk or Sv != Sk or B < 1 or Hk < 1 or Hq < 1
            or not 1 <= Sq <= _MAX_SEQ or not 1 <= Sk <= _MAX_SEQ):
        return "shape"
    if Hq != Hk and not (enable_gqa and Hq % Hk == 0):
        return "shape"
    if E != 1 and (q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1):
        return "strides"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        return "scale"
    return ""


def _quantized(q, k, v, is_causal: bool, sm_scale: float) -> torch.Tensor:
    """One sageattn call on arguments ``_route`` accepted (a superset of ``api``'s checks, so
    validation is not repeated). Tests replace this to route without a GPU."""
    return ops.attention(q, k, v, tensor_layout="HND", is_causal=is_causal, sm_scale=sm_scale,
                         return_lse=False)[0]


def _causal_top_left(q, k, v, sm_scale: float) -> torch.Tensor:
    """torch's top-left causal attention (key j visible to query i iff j <= i) through
    sageattn's bottom-right one, which is the same mask when Sq == Sk.

    Sq < Sk: no query sees a key at or past Sq, so the keys are cut to the first Sq.
    Sq > Sk: queries 0..Sk-1 are a square causal problem; queries Sk.. see every key.
    """
    Sq, Sk = q.shape[2], k.shape[2]
    if Sq <= Sk:
        return _quantized(q, k.narrow(2, 0, Sq), v.narrow(2, 0, Sq), True, sm_scale)
    head = _quantized(q.narrow(2, 0, Sk), k, v, True, sm_scale)
    tail = _quantized(q.narrow(2, Sk, Sq - Sk), k, v, False, sm_scale)
    return torch.cat((head, tail), dim=2)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, *, scale=None, enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention``, quantized where that applies.

    Same signature and semantics as torch's function (``is_causal`` top-left aligned as in
    torch; ``enable_gqa``: query head h reads key/value head ``h // (Hq // Hkv)``). Runs
    sageattn for 4-D (B, H, L, E) float16/bfloat16 CUDA tensors with E <= 128 (one E for q, k
    and v), no ``attn_mask``, ``dropout_p == 0`` and no input that needs a gradient;
    otherwise calls torch's function with the same arguments (``FALLBACK_REASONS`` lists
    why, ``sdpa_stats()`` counts it). The result of a quantized call is contiguous, in the
    input dtype, within the path's accuracy of torch's (rel-L1 about 0.01 on the sm80 path).
    """
    reason = _route(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    if not reason:
        path = _device_path(query.device.index or 0)
        reason = "" if path else "unsupported gpu"
    if reason:
        if not torch.compiler.is_compiling():
            _count_fallback(reason, query, key, value, dropout_p, scale)
        if enable_gqa:      # torch < 2.5 has no enable_gqa argument; pass it only when set
            return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal,
                               scale=scale, enable_gqa=enable_gqa)
        return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    if not torch.compiler.is_compiling():
        with _lock:
            _paths[path] += 1
    E = query.shape[-1]
    sm_scale = 1.0 / math.sqrt(E) if scale is None else float(scale)   # torch's default
    if is_causal and query.shape[2] != key.shape[2]:
        return _causal_top_left(query, key, value, sm_scale)
    return _quantized(query, key, value, bool(is_causal), sm_scale)


# ---- counting and logging (eager calls only) ----------------------------------------------

def _count_fallback(reason, q, k, v, dropout_p, scale) -> None:
    with _lock:
        _reasons[reason] += 1
        first = reason not in _logged
        _logged.add(reason)
    if first:
        logger.warning(
            "sageattn SDPA drop-in: calling torch's scaled_dot_product_attention because "
            "%s (%s); logged once, every such call is counted in sageattn.sdpa_stats()",
            FALLBACK_REASONS[reason], _detail(reason, q, k, v, dropout_p, scale))


def _describe(x) -> str:
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    shape = tuple(x.shape) if x.layout == torch.strided else x.layout
    return f"{type(x).__name__} {shape} {x.dtype} {x.device}"


def _detail(reason, q, k, v, dropout_p, scale) -> str:
    if reason == "dropout":
        return f"dropout_p={dropout_p!r}"
    if reason == "scale":
        return f"scale={scale!r}"
    if reason == "unsupported gpu":
        return _device_errors.get(q.device.index or 0, "no path")
    return "first call: " + "; ".join(f"{n} {_describe(x)}" for n, x in
                                      (("query", q), ("key", k), ("value", v)))


def sdpa_stats() -> dict:
    """Which path the drop-in's eager calls took since the last ``reset_sdpa_stats()``.

    ``{"calls": n, "quantized": n, "fallback": n, "paths": {"sm80": n, ...},
    "reasons": {"attn_mask": n, ...}}`` (reasons: ``FALLBACK_REASONS``). Calls traced by
    torch.compile and CUDA graph replays run no Python and are not counted.
    """
    with _lock:
        paths, reasons = dict(_paths), dict(_reasons)
    quantized, fallback = sum(paths.values()), sum(reasons.values())
    return {"calls": quantized + fallback, "quantized": quantized, "fallback": fallback,
            "paths": paths, "reasons": reasons}


def reset_sdpa_stats() -> None:
    """Zero the counts; the next fallback of each kind is logged again."""
    with _lock:
        _paths.clear()
        _reasons.clear()
        _logged.clear()


# ---- installing it ------------------------------------------------------------------------

_patch_lock = threading.Lock()
_patch_depth = 0
_patch_saved = None


@contextlib.contextmanager
def patch_sdpa():
    """Make ``torch.nn.functional.scaled_dot_product_attention`` the drop-in inside a block
    (or a decorated function), model-wide, and restore what was there on the way out, also
    when an exception escapes. Nested and repeated use is safe: the outermost exit restores.

    Code that looks the function up at call time (``F.scaled_dot_product_attention(...)``,
    as transformers, diffusers and ``torch.nn.functional`` itself do) is patched; a name
    bound earlier (``from torch.nn.functional import scaled_dot_product_attention``) is not.
    torch.compile traces whichever function the name holds when it traces, so compile (or
    recompile) inside the block. Yields the drop-in.
    """
    global _patch_depth, _patch_saved
    functional = torch.nn.functional
    with _patch_lock:
        if _patch_depth == 0:
            _patch_saved = functional.scaled_dot_product_attention
            functional.scaled_dot_product_attention = scaled_dot_product_attention
        _patch_depth += 1
    try:
        yield scaled_dot_product_attention
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                functional.scaled_dot_product_attention = _patch_saved
                _patch_saved = None
