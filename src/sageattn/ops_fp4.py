"""Torch-side execution of the sm120 FP4 path (SageAttention3): its launch sequence, its
``sageattn::fp4_attention`` custom op, and the pieces the GPU tests run one at a time.

Per call, on ``torch.cuda.current_stream(device)``: optional ``sm120_channel_stats`` on K (the
mean K smoothing removes) and on Q (the sequence mean, with ``per_block_mean=False``), one fused
quantize launch (Q, K, V to NVFP4, docs/ARCHITECTURE.md "The sm120 FP4 path, exactly"), one
attention launch. On compute capability 12.0 this is the native tree (sm_120a SASS); on 9.0 the
same kernels built with exact software FP4 (tests only: the dispatch table runs them there only
when the path is forced).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _abi, _loader, dispatch
from .emulate import K_MEAN_SAMPLE_TOKENS
from .emulate_fp4 import QuantizedFp4
from .ops import (_DTYPE_CODE, _K_BLOCK, _LOG2E, _Q_BLOCK, _channel_stats, _current_stream,
                  _device_guard, _empty, _fake_dense_outputs, _hnd, _launch, _no_lse, _ptr, _strides, _traced,
                  _vectorized)

__all__ = ["sm120_kernel_names", "sm120_forward", "sm120_quantize", "sm120_attend",
           "sm120_convert", "fp4_attention"]

TREE = "sm120"


def sm120_kernel_names(head_dim: int) -> tuple:
    """(channel stats, quantize, attention) kernel names of the sm120 tree for a call."""
    d_pad = 64 if head_dim <= 64 else 128
    return ("sm120_channel_stats", f"sm120_quantize_qkv_fp4_hd{d_pad}",
            f"sm120_qkfp4_pvfp4_hd{d_pad}")


def _ordinal(dev: torch.device) -> int:
    return dev.index if dev.index is not None else 0


def sm120_quantize(q, k, v, *, tensor_layout: str = "HND", sm_scale: float,
                   per_block_mean: bool = True, smooth_k: bool = True,
                   want_lse_correction: bool = False) -> QuantizedFp4:
    """The channel-stats and quantize launches; returns the kernels' NVFP4 buffers in the
    emulator's layout (``emulate_fp4.QuantizedFp4``), so each can be compared with it."""
    qh, kh, vh = (_hnd(x, tensor_layout) for x in (q, k, v))
    B, Hq, Sq, D = qh.shape
    Hkv, Sk = kh.shape[1], kh.shape[2]
    qs, ks, vs = _strides(qh), _strides(kh), _strides(vh)
    d_pad = 64 if D <= 64 else 128
    q_blocks, k_blocks = -(-Sq // _Q_BLOCK), -(-Sk // _K_BLOCK)
    dev = q.device
    ordinal = _ordinal(dev)
    dtype_code = _DTYPE_CODE[q.dtype]
    f32, u8 = torch.float32, torch.uint8
    with _device_guard(dev):
        stats, quant, _ = (_loader.kernel(TREE, n, ordinal) for n in sm120_kernel_names(D))
        stream = _current_stream(dev)
        k_mean = _empty((B, Hkv, d_pad), f32, dev) if smooth_k else None
        q_seq_mean = None if per_block_mean else _empty((B, Hq, d_pad), f32, dev)
        qt = QuantizedFp4(
            q_fp4=_empty((B, Hq, q_blocks * _Q_BLOCK, d_pad // 2), u8, dev),
            q_sf=_empty((B, Hq, q_blocks * _Q_BLOCK, d_pad // 16), u8, dev),
            q_mean=_empty((B, Hq, q_blocks, d_pad), f32, dev),
            k_fp4=_empty((B, Hkv, k_blocks * _K_BLOCK, d_pad // 2), u8, dev),
            k_sf=_empty((B, Hkv, k_blocks * _K_BLOCK, d_pad // 16), u8, dev),
            v_fp4=_empty((B, Hkv, k_blocks, d_pad, _K_BLOCK // 2), u8, dev),
            v_sf=_empty((B, Hkv, k_blocks, d_pad, _K_BLOCK // 16), u8, dev),
            k_mean=k_mean,
            lse_correction=_empty((B, Hq, Sq), f32, dev) if (smooth_k and want_lse_correction)
            else None)
        if smooth_k:
            _channel_stats(stats, ordinal, stream, kh, (B, Hkv, Sk), ks, D, d_pad, dtype_code,
                           mean=_ptr(k_mean), sample_tokens=K_MEAN_SAMPLE_TOKENS)
        if q_seq_mean is not None:
            _channel_stats(stats, ordinal, stream, qh, (B, Hq, Sq), qs, D, d_pad, dtype_code,
                           mean=_ptr(q_seq_mean))
        p = _abi.QuantFp4Params(
            q=qh.data_ptr(), q_stride_b=qs[0], q_stride_h=qs[1], q_stride_s=qs[2],
            k=kh.data_ptr(), k_stride_b=ks[0], k_stride_h=ks[1], k_stride_s=ks[2],
            v=vh.data_ptr(), v_stride_b=vs[0], v_stride_h=vs[1], v_stride_s=vs[2],
            k_mean=_ptr(k_mean), q_seq_mean=_ptr(q_seq_mean), q_mean=qt.q_mean.data_ptr(),
            q_fp4=qt.q_fp4.data_ptr(), q_sf=qt.q_sf.data_ptr(), k_fp4=qt.k_fp4.data_ptr(),
            k_sf=qt.k_sf.data_ptr(), v_fp4=qt.v_fp4.data_ptr(), v_sf=qt.v_sf.data_ptr(),
            lse_correction=_ptr(qt.lse_correction),
            batch=B, heads_q=Hq, heads_kv=Hkv, seq_q=Sq, seq_k=Sk, head_dim=D,
            head_dim_padded=d_pad, q_blocks=q_blocks, k_blocks=k_blocks, in_dtype=dtype_code,
            vec_q=_vectorized(qh, qs, D), vec_k=_vectorized(kh, ks, D),
            vec_v=_vectorized(vh, vs, D), sm_scale=sm_scale)
        _launch(quant, ordinal, (B * Hq * q_blocks + 2 * B * Hkv * k_blocks, 1, 1), p, stream)
    return qt


def sm120_attend(qt: QuantizedFp4, *, seq_q: int, seq_k: int, head_dim: int, sm_scale: float,
                 is_causal: bool = False, causal_offset: Optional[int] = None,
                 out_dtype=torch.bfloat16, tensor_layout: str = "HND", return_lse: bool = False):
    """The attention launch over NVFP4 buffers (the quantizer's, or the emulator's moved to the
    GPU): returns (out in ``tensor_layout``, contiguous, and the LSE (B, Hq, Sq) or None).
    ``causal_offset`` defaults to ``seq_k - seq_q`` (bottom-right)."""
    B, Hq, rows = qt.q_fp4.shape[0], qt.q_fp4.shape[1], qt.q_fp4.shape[2]
    Hkv, k_blocks = qt.k_fp4.shape[1], qt.v_fp4.shape[2]
    q_blocks = rows // _Q_BLOCK
    dev = qt.q_fp4.device
    ordinal = _ordinal(dev)
    with _device_guard(dev):
        attn = _loader.kernel(TREE, sm120_kernel_names(head_dim)[2], ordinal)
        stream = _current_stream(dev)
        shape = (B, Hq, seq_q, head_dim) if tensor_layout == "HND" else (B, seq_q, Hq, head_dim)
        out = _empty(shape, out_dtype, dev)
        os_ = _hnd(out, tensor_layout).stride()
        lse = _empty((B, Hq, seq_q), torch.float32, dev) if return_lse else None
        p = _abi.AttnFp4Params(
            q_fp4=qt.q_fp4.data_ptr(), q_sf=qt.q_sf.data_ptr(), q_mean=qt.q_mean.data_ptr(),
            k_fp4=qt.k_fp4.data_ptr(), k_sf=qt.k_sf.data_ptr(), v_fp4=qt.v_fp4.data_ptr(),
            v_sf=qt.v_sf.data_ptr(), out=out.data_ptr(), out_stride_b=os_[0],
            out_stride_h=os_[1], out_stride_s=os_[2], lse=_ptr(lse),
            lse_correction=_ptr(qt.lse_correction if return_lse else None),
            causal_offset=(seq_k - seq_q if causal_offset is None else causal_offset)
            if is_causal else 0,
            lse_stride_b=0, lse_stride_h=0,
            batch=B, heads_q=Hq, heads_kv=Hkv, seq_q=seq_q, seq_k=seq_k, head_dim_out=head_dim,
            q_blocks=q_blocks, k_blocks=k_blocks, causal=int(is_causal),
            out_dtype=_DTYPE_CODE[out_dtype], sm_scale_log2e=sm_scale * _LOG2E)
        _launch(attn, ordinal, (q_blocks * (_Q_BLOCK // attn.q_rows), Hq, B), p, stream)
    return out, lse


def sm120_forward(q, k, v, *, tensor_layout: str, is_causal: bool, sm_scale: float,
                  return_lse: bool, qk_quant_gran: Optional[str] = None,
                  pv_accum_dtype: Optional[str] = None, smooth_k: bool = True,
                  smooth_v: bool = False, tree: str = TREE, per_block_mean: bool = True,
                  block_mask=None, varlen=None, kernel_only: bool = False):
    """Run the sm120 kernels on validated tensors; returns (out, lse or None), ``out`` in the
    input dtype and layout, contiguous in that layout."""
    for name, value, offered in (("qk_quant_gran", qk_quant_gran, None),
                                 ("pv_accum_dtype", pv_accum_dtype, None)):
        if value != offered:
            raise ValueError(f"{name}={value!r} is not an option of the sm120_fp4 path (NVFP4: "
                             "one E4M3 scale per 16 elements, fp32+fp32 accumulation)")
    if smooth_v:
        raise ValueError("smooth_v=True is not offered on the sm120_fp4 path")
    if block_mask is not None or varlen is not None:
        raise ValueError("sparse_sageattn and sageattn_varlen are not offered on the sm120_fp4 "
                         "path; use path='sm89' (or the default) for them")
    if kernel_only:
        raise ValueError("kernel_only timing is not offered on the sm120_fp4 path")
    qh = _hnd(q, tensor_layout)
    Sq, D = qh.shape[2], qh.shape[3]
    Sk = _hnd(k, tensor_layout).shape[2]
    qt = sm120_quantize(q, k, v, tensor_layout=tensor_layout, sm_scale=sm_scale,
                        per_block_mean=per_block_mean, smooth_k=smooth_k,
                        want_lse_correction=return_lse)
    return sm120_attend(qt, seq_q=Sq, seq_k=Sk, head_dim=D, sm_scale=sm_scale,
                        is_causal=is_causal, out_dtype=q.dtype, tensor_layout=tensor_layout,
                        return_lse=return_lse)


def sm120_convert(x: torch.Tensor):
    """``sm120_convert_fp4_e4m3`` on a 1-D fp32 CUDA tensor: (E2M1 codes, E4M3 codes), one
    uint8 per element each, through the quantizer's own device conversions (unit tests)."""
    n = x.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.float32, device=x.device)
    padded[:n] = x.reshape(-1)
    e2m1 = torch.empty(padded.numel() // 2, dtype=torch.uint8, device=x.device)
    e4m3 = torch.empty(padded.numel(), dtype=torch.uint8, device=x.device)
    ordinal = _ordinal(x.device)
    with _device_guard(x.device):
        kern = _loader.kernel(TREE, "sm120_convert_fp4_e4m3", ordinal)
        p = _abi.Fp4ConvertParams(src=padded.data_ptr(), e2m1=e2m1.data_ptr(),
                                  e4m3=e4m3.data_ptr(), n=padded.numel())
        _launch(kern, ordinal, (-(-padded.numel() // (8 * kern.threads)), 1, 1), p,
                _current_stream(x.device))
    codes = torch.stack((e2m1 & 15, e2m1 >> 4), dim=-1).flatten()
    return codes[:n], e4m3[:n]


dispatch.RUNNERS["sm120_fp4"] = sm120_forward


def _impl(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, per_block_mean, smooth_k):
    choice = dispatch.resolve(q.device.index or 0, "sm120_fp4", "sageattn3_blackwell")
    return sm120_forward(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal,
                         sm_scale=sm_scale, return_lse=return_lse, smooth_k=smooth_k,
                         per_block_mean=per_block_mean, tree=choice.tree)


@torch.library.custom_op("sageattn::fp4_attention", mutates_args=())
def _fp4_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str,
            is_causal: bool, sm_scale: float, return_lse: bool, per_block_mean: bool,
            smooth_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _impl(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, per_block_mean,
                     smooth_k)
    return out, (lse if lse is not None else _no_lse(q))


@_fp4_op.register_fake
def _(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, per_block_mean, smooth_k):
    return _fake_dense_outputs(q, tensor_layout, return_lse)


def fp4_attention(q, k, v, *, tensor_layout: str, is_causal: bool, sm_scale: float,
                  return_lse: bool, per_block_mean: bool, smooth_k: bool):
    """Validated ``sageattn3_blackwell`` call -> (out, lse or None); through the custom op
    ``sageattn::fp4_attention`` when traced (torch.compile), directly in eager mode."""
    from . import ops

    if ops.ALWAYS_USE_OP or _traced(q, k, v):
        out, lse = _fp4_op(q, k, v, tensor_layout, is_causal, sm_scale, return_lse,
                           per_block_mean, smooth_k)
        return out, (lse if return_lse else None)
    return _impl(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, per_block_mean,
                 smooth_k)

