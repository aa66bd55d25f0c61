"""Torch-side execution: the ``sageattn::attention`` custom op and the sm80 launch sequence.

``attention`` is what the public API calls with validated arguments. In eager mode it runs
the implementation directly; while ``torch.compile`` traces (or for tensor subclasses such
as fake tensors) it goes through the registered custom op, whose fake implementation gives
the output shapes. Going through the op costs host time on the eager path, which is why
eager calls skip it (measured: a whole tiny call B=1 H=1 S=64 D=64 took 88 us direct vs 129 us
through the op on the H100 machine, torch 2.11; a no-op custom op costs 14 us vs 3 us for a
plain function on torch 2.13 CPU). ``ALWAYS_USE_OP = True`` routes every call through it.

Device queries (``dispatch.resolve``) happen inside the implementation, never in traced
code. The sm80 sequence per call (docs/ARCHITECTURE.md, "kernel table"): optional
``sm80_channel_stats`` (K mean), one fused quantize launch, one attention launch, all on
``torch.cuda.current_stream(device)``, with temporaries from torch's caching allocator.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch

from . import _abi, _loader, dispatch

__all__ = ["attention", "sm80_forward", "sm80_kernel_names", "ALWAYS_USE_OP", "POISON"]

ALWAYS_USE_OP = False
# Debug aid: fill every buffer the kernels should write (temporaries, out, lse) with NaN
# (int8: -128, which the quantizer never produces) before launching.
POISON = os.environ.get("SAGEATTN_DEBUG_POISON", "") not in ("", "0")

_DTYPE_CODE = {torch.float16: _abi.DTYPE_FP16, torch.bfloat16: _abi.DTYPE_BF16}
_GRAN_CODE = {"per_thread": _abi.GRAN_PER_THREAD, "per_warp": _abi.GRAN_PER_WARP}
_ACC_TAG = {"fp32": "acc32", "fp16+fp32": "acc16x32"}
_Q_BLOCK, _K_BLOCK = 128, 64
_LOG2E = math.log2(math.e)


def sm80_kernel_names(head_dim: int, pv_accum_dtype: str) -> tuple:
    """(channel stats, quantize, attention) kernel names of the sm80 tree for a call."""
    d_pad = 64 if head_dim <= 64 else 128
    return ("sm80_channel_stats", f"sm80_quantize_qk_int8_v_fp16_hd{d_pad}",
            f"sm80_qkint8_pvfp16_{_ACC_TAG[pv_accum_dtype]}_hd{d_pad}")


# ---- the sm80 path ---------------------------------------------------------------------

def _hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "NHD" else x


def _strides(x: torch.Tensor) -> tuple:
    """(b, h, s) element strides of an HND view; a size-1 dim's stride is never used, so it
    is passed as 0 (this keeps such views on the vectorized path)."""
    return tuple(0 if x.shape[i] == 1 else x.stride(i) for i in range(3))


def _vectorized(x: torch.Tensor, strides: tuple, head_dim: int) -> int:
    """1 when 16-byte loads are aligned: pointer, every (b, h, s) stride and the head dim."""
    return int(x.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in strides) and head_dim % 8 == 0)


def _empty(shape, dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = {torch.int8: -128, torch.uint8: 255}.get(dtype, math.nan)
    return torch.full(shape, fill, dtype=dtype, device=device)


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _launch(k: _loader.Kernel, device: int, grid: tuple, params, stream: int) -> None:
    _loader.ext().launch(device, k.function, grid, (k.threads, 1, 1), k.smem, stream,
                         bytes(params))


def sm80_forward(q, k, v, *, tensor_layout: str, is_causal: bool, sm_scale: float,
                 return_lse: bool, qk_quant_gran: str, pv_accum_dtype: str, smooth_k: bool,
                 tree: str = "sm80"):
    """Run the sm80 kernels on validated tensors; returns (out, lse or None).

    ``out`` has the input dtype and layout and is contiguous in that layout.
    """
    qh, kh, vh = (_hnd(x, tensor_layout) for x in (q, k, v))
    B, Hq, Sq, D = qh.shape
    Hkv, Sk = kh.shape[1], kh.shape[2]
    d_pad = 64 if D <= 64 else 128
    q_blocks, k_blocks = -(-Sq // _Q_BLOCK), -(-Sk // _K_BLOCK)
    dev = q.device
    ordinal = dev.index if dev.index is not None else 0
    dtype_code = _DTYPE_CODE[q.dtype]
    smooth_lse = smooth_k and return_lse
    names = sm80_kernel_names(D, pv_accum_dtype)
    with _device_guard(dev):
        stats_kernel, quant_kernel, attn_kernel = (
            _loader.kernel(tree, n, ordinal) for n in names)
        stream = _current_stream(dev)
        out = _empty((B, Hq, Sq, D) if tensor_layout == "HND" else (B, Sq, Hq, D), q.dtype, dev)
        out_h = _hnd(out, tensor_layout)
        lse = _empty((B, Hq, Sq), torch.float32, dev) if return_lse else None
        # Separate allocations: carving one buffer into views measured no faster on the host
        # (each view op costs about what a caching-allocator hit does).
        q_i8 = _empty((B, Hq, q_blocks * _Q_BLOCK, d_pad), torch.int8, dev)
        q_scale = _empty((B, Hq, q_blocks, 64), torch.float32, dev)
        k_i8 = _empty((B, Hkv, k_blocks * _K_BLOCK, d_pad), torch.int8, dev)
        k_scale = _empty((B, Hkv, k_blocks, 4), torch.float32, dev)
        v16 = _empty((B, Hkv, k_blocks * _K_BLOCK, d_pad), torch.float16, dev)
        k_mean = _empty((B, Hkv, d_pad), torch.float32, dev) if smooth_k else None
        lse_corr = _empty((B, Hq, Sq), torch.float32, dev) if smooth_lse else None
        qs, ks, vs = _strides(qh), _strides(kh), _strides(vh)

        if smooth_k:
            p = _abi.ChannelStatsParams(
                src=kh.data_ptr(), src_stride_b=ks[0], src_stride_h=ks[1], src_stride_s=ks[2],
                mean=k_mean.data_ptr(), minimum=0, maximum=0, batch=B, heads=Hkv, seq=Sk,
                head_dim=D, head_dim_padded=d_pad, in_dtype=dtype_code,
                vectorized=_vectorized(kh, ks, D))
            _launch(stats_kernel, ordinal, (d_pad // 64, Hkv, B), p, stream)

        p = _abi.QuantParams(
            q=qh.data_ptr(), q_stride_b=qs[0], q_stride_h=qs[1], q_stride_s=qs[2],
            k=kh.data_ptr(), k_stride_b=ks[0], k_stride_h=ks[1], k_stride_s=ks[2],
            v=vh.data_ptr(), v_stride_b=vs[0], v_stride_h=vs[1], v_stride_s=vs[2],
            k_mean=k_mean.data_ptr() if smooth_k else 0,
            q_int8=q_i8.data_ptr(), q_scale=q_scale.data_ptr(),
            k_int8=k_i8.data_ptr(), k_scale=k_scale.data_ptr(), v_fp16=v16.data_ptr(),
            lse_correction=lse_corr.data_ptr() if smooth_lse else 0,
            batch=B, heads_q=Hq, heads_kv=Hkv, seq_q=Sq, seq_k=Sk, head_dim=D,
            head_dim_padded=d_pad, q_blocks=q_blocks, k_blocks=k_blocks, in_dtype=dtype_code,
            granularity=_GRAN_CODE[qk_quant_gran], vec_q=_vectorized(qh, qs, D),
            vec_k=_vectorized(kh, ks, D), vec_v=_vectorized(vh, vs, D),
            sm_scale=sm_scale, sm_scale_log2e=sm_scale * _LOG2E)
        _launch(quant_kernel, ordinal, (B * Hq * q_blocks + 2 * B * Hkv * k_blocks, 1, 1), p,
                stream)

        os_ = out_h.stride()
        p = _abi.AttnParams(
            q_int8=q_i8.data_ptr(), q_scale=q_scale.data_ptr(),
            k_int8=k_i8.data_ptr(), k_scale=k_scale.data_ptr(), v=v16.data_ptr(),
            out=out_h.data_ptr(), out_stride_b=os_[0], out_stride_h=os_[1],
            out_stride_s=os_[2], lse=lse.data_ptr() if return_lse else 0,
            lse_correction=lse_corr.data_ptr() if smooth_lse else 0,
            causal_offset=(Sk - Sq) if is_causal else 0,
            batch=B, heads_q=Hq, heads_kv=Hkv, seq_q=Sq, seq_k=Sk, head_dim_out=D,
            q_blocks=q_blocks, k_blocks=k_blocks, causal=int(is_causal), out_dtype=dtype_code)
        # One CTA per q_rows query rows (from the manifest; 128 = a whole quantization block).
        q_rows = attn_kernel.q_rows or _Q_BLOCK
        _launch(attn_kernel, ordinal, (q_blocks * (_Q_BLOCK // q_rows), Hq, B), p, stream)
    return out, lse


dispatch.RUNNERS["sm80"] = sm80_forward


# ---- the op ----------------------------------------------------------------------------

def _impl(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, path, entry,
          qk_quant_gran, pv_accum_dtype, smooth_k):
    index = q.device.index or 0   # CUDA tensors always carry their index
    choice = dispatch.resolve(index, path or None, entry or None)
    cfg = choice.defaults
    out, lse = dispatch.RUNNERS[choice.path](
        q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
        return_lse=return_lse, qk_quant_gran=qk_quant_gran or cfg["qk_quant_gran"],
        pv_accum_dtype=pv_accum_dtype or cfg["pv_accum_dtype"],
        smooth_k=cfg["smooth_k"] if smooth_k is None else smooth_k, tree=choice.tree)
    return out, lse


@torch.library.custom_op("sageattn::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str,
                  is_causal: bool, sm_scale: float, return_lse: bool, path: str, entry: str,
                  qk_quant_gran: str, pv_accum_dtype: str, smooth_k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _impl(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, path, entry,
                     qk_quant_gran, pv_accum_dtype, None if smooth_k < 0 else bool(smooth_k))
    return out, (lse if lse is not None else q.new_empty((0,), dtype=torch.float32))


@_attention_op.register_fake
def _(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, path, entry, qk_quant_gran,
      pv_accum_dtype, smooth_k):
    B, Hq, Sq, D = _hnd(q, tensor_layout).shape
    shape = (B, Hq, Sq, D) if tensor_layout == "HND" else (B, Sq, Hq, D)
    out = q.new_empty(shape)
    lse = q.new_empty((B, Hq, Sq) if return_lse else (0,), dtype=torch.float32)
    return out, lse


def _traced(*tensors) -> bool:
    return torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors)


def attention(q, k, v, *, tensor_layout: str, is_causal: bool, sm_scale: float,
              return_lse: bool, path: Optional[str] = None, entry: Optional[str] = None,
              qk_quant_gran: Optional[str] = None, pv_accum_dtype: Optional[str] = None,
              smooth_k: Optional[bool] = None):
    """Validated call -> (out, lse or None). None config values take the path's defaults."""
    if ALWAYS_USE_OP or _traced(q, k, v):
        out, lse = _attention_op(q, k, v, tensor_layout, is_causal, sm_scale, return_lse,
                                 path or "", entry or "", qk_quant_gran or "",
                                 pv_accum_dtype or "", -1 if smooth_k is None else int(smooth_k))
        return out, (lse if return_lse else None)
    return _impl(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, path, entry,
                 qk_quant_gran, pv_accum_dtype, smooth_k)
