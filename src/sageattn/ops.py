"""Torch-side execution: the ``sageattn::attention`` custom op and the launch sequences of the
INT8-QK trees (sm80, sm89, sm90; the FP4 tree's is in ops_fp4.py).

``attention`` is what the public API calls with validated arguments. In eager mode it runs
the implementation directly; while ``torch.compile`` traces (or for tensor subclasses such
as fake tensors) it goes through the registered custom op, whose fake implementation gives
the output shapes. Going through the op costs host time on the eager path, which is why
eager calls skip it (measured: a whole tiny call B=1 H=1 S=64 D=64 took 88 us direct vs 129 us
through the op on the H100 machine, torch 2.11; a no-op custom op costs 14 us vs 3 us for a
plain function on torch 2.13 CPU). ``ALWAYS_USE_OP = True`` routes every call through it.

Device queries (``dispatch.resolve``) happen inside the implementation, never in traced
code. Per call (docs/ARCHITECTURE.md, "kernel table"), all on
``torch.cuda.current_stream(device)``, with the temporaries carved from one allocation of torch's
caching allocator:

* sm80: optional ``sm80_channel_stats`` (K mean), one fused quantize launch (Q, K to INT8,
  V to fp16), one attention launch.
* sm89: optional ``sm89_channel_stats`` on K (mean), ``sm89_channel_stats`` on V (min/max,
  and mean with ``smooth_v``; of a 256-token sample unless "fp32+fp16" or smooth_v), one fused
  quantize launch (Q, K to INT8, V to a transposed E4M3 tile), with a sample the requantize
  launch (heads where a V value reached its sampled bound are quantized again exactly), one
  attention launch.
* sm90: the sm89 sequence (its quantizer, compiled for sm_90a), then the attention kernel with
  three tensor maps over the quantized operands (cached by address and geometry); for dense
  calls the Q map covers the caller's Q, which the kernel quantizes itself, and the quantize
  launch skips Q (``SM90_QUANTIZE_Q_IN_KERNEL``). Every launch after the call's first
  is a programmatic dependent launch (``SM90_PROGRAMMATIC_LAUNCH``): it may start while the
  previous one drains, and waits for it in the kernel before reading its output.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch

from . import _abi, _loader, dispatch
# The algorithm's constants (the emulator states them).
from .emulate import K_MEAN_SAMPLE_TOKENS, V_AMAX_SAMPLE_TOKENS, v_amax_margin, v_scale_max

__all__ = ["attention", "sm80_forward", "sm89_forward", "sm90_forward", "kernel_names",
           "sm80_kernel_names", "sm89_kernel_names", "sm90_kernel_names",
           "attention_kernel_only", "quantized_operands", "ALWAYS_USE_OP", "POISON",
           "SM90_QUANTIZE_Q_IN_KERNEL", "SM90_PROGRAMMATIC_LAUNCH", "SM90_CAUSAL_Q192_MIN_ROWS"]

ALWAYS_USE_OP = False
# Debug aid: fill every buffer the kernels should write (temporaries, out, lse) with NaN
# (int8: -128, which the quantizer never produces) before launching.
POISON = os.environ.get("SAGEATTN_DEBUG_POISON", "") not in ("", "0")
# Whether the sm90 kernel quantizes Q itself (it can for a dense call with head dim 64 or 128,
# 16-byte aligned Q and no LSE correction to compute): the quantize launch then skips Q's round
# trip through memory, and each CTA quantizes its rows before its first product. "auto" (the
# default) and True: wherever it can (hd128 non-causal +1-3% whole call at 1k-16k, NOTES.md sm90
# v13; since v17 also causal and hd64: +3-4.5% at 1k, +0-1.5% at 2k-4k, within noise at 8k-16k,
# NOTES.md "Q quantized in the kernel for every dense call"). False: never.
SM90_QUANTIZE_Q_IN_KERNEL = "auto"
# Whether the sm90 path launches its second and later kernels as programmatic dependent launches
# (kernels/common/grid_dependency.cuh): each may start while the previous one drains (its
# prologue, and the attention kernel's quantization of the caller's Q, overlap the previous
# launch's tail) and waits for it before reading its output. The call's first launch is always
# plain, so nothing of the call overlaps work queued before it. False: every launch plain.
SM90_PROGRAMMATIC_LAUNCH = True
# Causal "fp32+fp32" calls at head dim 128 with at least this many query rows take the 192-row
# kernel (three in-order consumers), as non-causal ones always do. H100, whole calls, same run
# (NOTES.md sm90 v16): +2.5-3% at 4k, +5-7% at 8k, 0-9% at 16k; -6% at 1k and +-3% at 2k, where
# the two overlapping consumers keep the causal calls. Since v17 (the DPX max sped up the
# two-consumer kernel only) the 192-row one is 1.6% slower at 4k and even at 8k (NOTES.md "The
# causal threshold after v17"), so the threshold moved from 4096 to 8192. The two kernels
# classify the steps next to the diagonal differently (masked or not per CTA), so their outputs
# may differ in the last bit: a varlen call whose longest sequence reaches the threshold and a
# dense call of a shorter sequence are then not bit-identical.
SM90_CAUSAL_Q192_MIN_ROWS = 8192

_DTYPE_CODE = {torch.float16: _abi.DTYPE_FP16, torch.bfloat16: _abi.DTYPE_BF16}
_GRAN_CODE = {"per_thread": _abi.GRAN_PER_THREAD, "per_warp": _abi.GRAN_PER_WARP}
_ACC_TAG = {"fp32": "acc32", "fp16+fp32": "acc16x32"}
_ACC_TAG_FP8 = {"fp32": "acc32", "fp32+fp32": "acc32x32", "fp32+fp16": "acc16x32"}
_ACC_TAG_SM90 = {"fp32+fp32": "acc32x32", "fp32": "acc32"}
# CTAs of the V requantize launch at most (each takes every so-many-th head): one wave on an
# H100 (two CTAs per SM by registers), so a call without a flagged head pays one read of
# each head's flags (8 CTAs per head took 4 waves at B=4 H=32 1k, NOTES.md).
_V_REQUANTIZE_CTAS = 256


def _fp8_pv(pv_accum_dtype: str, smooth_v: bool) -> tuple:
    """``_int8_forward``'s fp8_pv for a mode: (the E4M3 value |V - mean| maps to: 448, or 2.25
    where the block product accumulates in fp16, DESIGN.md section 3; smooth_v; V's margin)."""
    smooth_v = bool(smooth_v)
    return v_scale_max(pv_accum_dtype), smooth_v, v_amax_margin(pv_accum_dtype, smooth_v)


def requantize_kernel_name(tree: str, head_dim_padded: int) -> str:
    """The sm89 / sm90 kernel that requantizes V's flagged heads after a quantize launch whose
    V scales took a margin (kernels/common/quantize.cuh, requantize_v_heads)."""
    return f"{tree}_requantize_v_fp8_hd{head_dim_padded}"


_Q_BLOCK, _K_BLOCK = 128, 64
_LOG2E = math.log2(math.e)


def _checked(pv_accum_dtype: str, tags: dict, path: str) -> str:
    try:
        return tags[pv_accum_dtype]
    except KeyError:
        raise ValueError(f"pv_accum_dtype must be one of {', '.join(map(repr, tags))} on the "
                         f"{path} path; got {pv_accum_dtype!r}") from None


def sm80_kernel_names(head_dim: int, pv_accum_dtype: str) -> tuple:
    """(channel stats, quantize, attention) kernel names of the sm80 tree for a call."""
    d_pad = 64 if head_dim <= 64 else 128
    tag = _checked(pv_accum_dtype, _ACC_TAG, "sm80")
    return ("sm80_channel_stats", f"sm80_quantize_qk_int8_v_fp16_hd{d_pad}",
            f"sm80_qkint8_pvfp16_{tag}_hd{d_pad}")


def sm89_kernel_names(head_dim: int, pv_accum_dtype: str) -> tuple:
    """(channel stats, quantize, attention) kernel names of the sm89 tree for a call."""
    d_pad = 64 if head_dim <= 64 else 128
    tag = _checked(pv_accum_dtype, _ACC_TAG_FP8, "sm89")
    return ("sm89_channel_stats", f"sm89_quantize_qk_int8_v_fp8_hd{d_pad}",
            f"sm89_qkint8_pvfp8_{tag}_hd{d_pad}")


def kernel_names(path: str, head_dim: int, pv_accum_dtype: str,
                 is_causal: bool = False, seq_q: int = 0) -> Optional[tuple]:
    """The kernels a dense call on ``path`` launches (None for a path without a runner here);
    ``seq_q``: the call's query length (sm90's causal kernel depends on it)."""
    if path == "sm120_fp4":
        from .ops_fp4 import sm120_kernel_names

        return sm120_kernel_names(head_dim)
    if path == "sm90":  # its kernel depends on causality and, causal, the query length too
        return sm90_kernel_names(head_dim, pv_accum_dtype, is_causal=is_causal, seq_q=seq_q)
    names = {"sm80": sm80_kernel_names, "sm89": sm89_kernel_names}.get(path)
    return names(head_dim, pv_accum_dtype) if names else None


# ---- the INT8-QK trees: sm80 (FP16 PV), sm89 and sm90 (FP8 PV) ----------------------------

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


_ITEMSIZE = {torch.int8: 1, torch.uint8: 1, torch.float16: 2, torch.float32: 4}


class _Scratch:
    """A call's temporaries carved by address from one allocation. The kernels take addresses,
    so the hot path makes no tensor views (a view costs about what an allocation does; ten
    separate allocations were ~15% of a small call's host time). ``view`` gives tensors for
    the test and benchmark aids."""

    NAMES = ("q_int8", "q_scale", "k_int8", "k_scale", "k_mean", "lse_correction", "v_fp16",
             "v_fp8", "v_scale", "v_mean", "v_min", "v_max", "v_overflow")
    _ALIGN = 256  # every buffer starts on its own 256-byte boundary (TMA needs 16)

    def __init__(self, device: torch.device, specs: dict):
        self._layout, total = {}, 0
        for name, spec in specs.items():
            if spec is not None:
                shape, dtype = spec
                nbytes = math.prod(shape) * _ITEMSIZE[dtype]
                self._layout[name] = (total, nbytes, shape, dtype)
                total += -(-nbytes // self._ALIGN) * self._ALIGN
        self.buffer = _empty((max(total, 1),), torch.uint8, device)
        base = self.buffer.data_ptr()
        self._address = {name: base + entry[0] for name, entry in self._layout.items()}
        if POISON:
            for name in self._layout:
                self.view(name).copy_(_empty(self._layout[name][2], self._layout[name][3], "cpu"))

    def __getitem__(self, name: str) -> int:
        """The buffer's address, 0 when the call has no such buffer."""
        return self._address.get(name, 0)

    def view(self, name: str) -> Optional[torch.Tensor]:
        if name not in self._layout:
            return None
        offset, nbytes, shape, dtype = self._layout[name]
        return self.buffer[offset:offset + nbytes].view(dtype).view(shape)


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _launch(k: _loader.Kernel, device: int, grid: tuple, params, stream: int,
            programmatic: bool = False) -> None:
    _loader.ext().launch(device, k.function, grid, (k.threads, 1, 1), k.smem, stream,
                         bytes(params), programmatic)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _channel_stats(kernel, ordinal, stream, x, geometry, strides, head_dim, d_pad, dtype_code, *,
                   cu_seqlens=None, mean=0, minimum=0, maximum=0, programmatic=False,
                   sample_tokens=0) -> None:
    """One channel-stats launch; ``geometry`` = (B, H, S) (S: the longest sequence when
    ``cu_seqlens`` packs varlen sequences). Outputs are addresses; 0 ones are not computed.
    ``sample_tokens`` > 0: over that many tokens of each longer sequence (the K mean:
    emulate.K_MEAN_SAMPLE_TOKENS; V's statistics when its scales take a margin:
    emulate.V_AMAX_SAMPLE_TOKENS, with the requantize launch after the quantize launch)."""
    B, H, S = geometry
    if not 0 <= sample_tokens <= 1 << 16:
        raise ValueError(f"sample_tokens {sample_tokens}: 0..65536")
    p = _abi.ChannelStatsParams(
        src=x.data_ptr(), src_stride_b=strides[0], src_stride_h=strides[1],
        src_stride_s=strides[2], mean=mean, minimum=minimum, maximum=maximum,
        batch=B, heads=H, seq=S, head_dim=head_dim, head_dim_padded=d_pad, in_dtype=dtype_code,
        vectorized=_vectorized(x, strides, head_dim), sample_tokens=sample_tokens,
        cu_seqlens=_ptr(cu_seqlens))
    _launch(kernel, ordinal, (d_pad // 64, H, B), p, stream, programmatic)


def _int8_forward(q, k, v, *, tensor_layout, is_causal, sm_scale, return_lse,
                  qk_quant_gran, smooth_k, tree, names, fp8_pv, block_mask=None, varlen=None,
                  kernel_only=False, tensor_maps=False, quantize_only=False):
    """The launch sequence of the INT8-QK trees (sm80: fp16 V; sm89 and sm90: ``fp8_pv`` =
    (v_scale_max, smooth_v, v_amax_margin), E4M3 V^T tiles with per-channel scales; a margin
    > 0 takes V's statistics from a sample and adds the requantize launch). ``tensor_maps``: the
    attention kernel takes ``Sm90AttnParams`` (tensor maps over the quantized operands).

    ``block_mask``: int8 (B, Hq, q_blocks, k_blocks) view (stride 0 broadcasts) or None.
    ``varlen``: (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) for packed
    (total, H, D) inputs; the output is packed the same way and the LSE is (Hq, total_q).
    ``kernel_only``: quantize now and return a function that launches only the attention
    kernel (bench/: the kernel's time without the quantization passes).
    ``quantize_only``: launch only the channel-stats and quantize kernels and return their
    buffers by name (``quantized_operands``)."""
    if varlen is None:
        qh, kh, vh = (_hnd(x, tensor_layout) for x in (q, k, v))
        B, Hq, Sq, D = qh.shape
        Hkv, Sk = kh.shape[1], kh.shape[2]
        qs, ks, vs = _strides(qh), _strides(kh), _strides(vh)
        cu_q = cu_k = None
    else:
        cu_q, cu_k, Sq, Sk = varlen
        qh, kh, vh = q, k, v
        B, (Hq, D), Hkv = cu_q.numel() - 1, q.shape[1:], k.shape[1]
        # (b, h, s) strides of a packed (total, H, D) tensor: no batch stride, tokens along dim 0.
        qs, ks, vs = ((0, x.stride(1), x.stride(0)) for x in (q, k, v))
    d_pad = 64 if D <= 64 else 128
    q_blocks, k_blocks = -(-Sq // _Q_BLOCK), -(-Sk // _K_BLOCK)
    dev = q.device
    ordinal = dev.index if dev.index is not None else 0
    dtype_code = _DTYPE_CODE[q.dtype]
    smooth_lse = smooth_k and return_lse
    f32 = torch.float32
    with _device_guard(dev):
        stats_kernel, quant_kernel, attn_kernel = (
            _loader.kernel(tree, n, ordinal) for n in names)
        stream = _current_stream(dev)
        if varlen is None:
            out = _empty((B, Hq, Sq, D) if tensor_layout == "HND" else (B, Sq, Hq, D), q.dtype, dev)
            out_h = _hnd(out, tensor_layout)
            os_ = out_h.stride()
            lse = _empty((B, Hq, Sq), f32, dev) if return_lse else None
            lse_strides = (Hq * Sq, Sq)
        else:
            out = _empty(q.shape, q.dtype, dev)
            os_ = (0, out.stride(1), out.stride(0))
            lse = _empty((Hq, q.shape[0]), f32, dev) if return_lse else None
            lse_strides = (0, q.shape[0])
        fp8_v = fp8_pv is not None
        v_stat = ((B, Hkv, d_pad), f32) if fp8_v else None
        margin = fp8_pv[2] if fp8_v else 0.0
        vec_q = _vectorized(qh, qs, D)
        # Q quantized inside the sm90 kernel: no Q jobs in the quantize launch, no Q buffers.
        policy = SM90_QUANTIZE_Q_IN_KERNEL
        if policy not in (True, False, "auto"):
            raise ValueError(f"ops.SM90_QUANTIZE_Q_IN_KERNEL must be True, False or 'auto', "
                             f"not {policy!r}")
        q_in_kernel = (tensor_maps and policy is not False and varlen is None
                       and block_mask is None and D == d_pad and vec_q and not smooth_lse
                       and not kernel_only and not quantize_only)
        q_spec = None if q_in_kernel else ((B, Hq, q_blocks * _Q_BLOCK, d_pad), torch.int8)
        scratch = _Scratch(dev, {
            "q_int8": q_spec,
            "q_scale": None if q_in_kernel else ((B, Hq, q_blocks, 64), f32),
            "k_int8": ((B, Hkv, k_blocks * _K_BLOCK, d_pad), torch.int8),
            "k_scale": ((B, Hkv, k_blocks, 4), f32),
            "k_mean": ((B, Hkv, d_pad), f32) if smooth_k else None,
            "lse_correction": ((B, Hq, Sq), f32) if smooth_lse else None,
            "v_fp16": None if fp8_v else ((B, Hkv, k_blocks * _K_BLOCK, d_pad), torch.float16),
            # V^T per 64-key block, keys in fp8_pv_key_slot order (docs/ARCHITECTURE.md).
            "v_fp8": ((B, Hkv, k_blocks, d_pad, _K_BLOCK), torch.uint8) if fp8_v else None,
            "v_scale": v_stat, "v_min": v_stat, "v_max": v_stat,
            "v_mean": v_stat if fp8_v and fp8_pv[1] else None,
            "v_overflow": ((B, Hkv, k_blocks), torch.uint8) if margin else None})
        k_mean, v_mean, v_min, v_max = (scratch[n] for n in ("k_mean", "v_mean", "v_min", "v_max"))

        # sm90 (the kernels that wait for their predecessor): every launch but the first may
        # start while the one before it drains.
        overlap = tensor_maps and SM90_PROGRAMMATIC_LAUNCH
        if smooth_k:
            _channel_stats(stats_kernel, ordinal, stream, kh, (B, Hkv, Sk), ks, D, d_pad,
                           dtype_code, cu_seqlens=cu_k, mean=k_mean,
                           sample_tokens=K_MEAN_SAMPLE_TOKENS)
        if fp8_v:
            _channel_stats(stats_kernel, ordinal, stream, vh, (B, Hkv, Sk), vs, D, d_pad,
                           dtype_code, cu_seqlens=cu_k, mean=v_mean, minimum=v_min, maximum=v_max,
                           programmatic=overlap and smooth_k,
                           sample_tokens=V_AMAX_SAMPLE_TOKENS if margin else 0)

        p = _abi.QuantParams(
            q=qh.data_ptr(), q_stride_b=qs[0], q_stride_h=qs[1], q_stride_s=qs[2],
            k=kh.data_ptr(), k_stride_b=ks[0], k_stride_h=ks[1], k_stride_s=ks[2],
            v=vh.data_ptr(), v_stride_b=vs[0], v_stride_h=vs[1], v_stride_s=vs[2],
            k_mean=k_mean, q_int8=scratch["q_int8"], q_scale=scratch["q_scale"],
            k_int8=scratch["k_int8"], k_scale=scratch["k_scale"], v_fp16=scratch["v_fp16"],
            lse_correction=scratch["lse_correction"],
            batch=B, heads_q=Hq, heads_kv=Hkv, seq_q=Sq, seq_k=Sk, head_dim=D,
            head_dim_padded=d_pad, q_blocks=0 if q_in_kernel else q_blocks, k_blocks=k_blocks,
            in_dtype=dtype_code, granularity=_GRAN_CODE[qk_quant_gran], vec_q=vec_q,
            vec_k=_vectorized(kh, ks, D), vec_v=_vectorized(vh, vs, D),
            sm_scale=sm_scale, sm_scale_log2e=sm_scale * _LOG2E,
            v_fp8=scratch["v_fp8"], v_scale=scratch["v_scale"], v_mean=v_mean, v_min=v_min,
            v_max=v_max, v_scale_max=fp8_pv[0] if fp8_v else 0.0, v_amax_margin=margin,
            cu_seqlens_q=_ptr(cu_q), cu_seqlens_k=_ptr(cu_k), v_overflow=scratch["v_overflow"])
        q_jobs = 0 if q_in_kernel else B * Hq * q_blocks
        _launch(quant_kernel, ordinal, (q_jobs + 2 * B * Hkv * k_blocks, 1, 1), p, stream,
                overlap and (smooth_k or fp8_v))
        if margin:
            # One wave of CTAs reads every head's block flags; a flagged head's CTA quantizes
            # its V again from exact statistics.
            requantize = _loader.kernel(tree, requantize_kernel_name(tree, d_pad), ordinal)
            _launch(requantize, ordinal, (min(B * Hkv, _V_REQUANTIZE_CTAS), 1, 1), p, stream,
                    overlap)
        if quantize_only:
            return {name: scratch.view(name) for name in _Scratch.NAMES}

        mask_strides = block_mask.stride() if block_mask is not None else (0, 0, 0, 0)
        p = _abi.AttnParams(
            q_int8=scratch["q_int8"], q_scale=scratch["q_scale"],
            k_int8=scratch["k_int8"], k_scale=scratch["k_scale"],
            v=scratch["v_fp16"] or scratch["v_fp8"],
            out=out.data_ptr(), out_stride_b=os_[0], out_stride_h=os_[1],
            out_stride_s=os_[2], lse=_ptr(lse), lse_correction=scratch["lse_correction"],
            causal_offset=(Sk - Sq) if is_causal else 0,
            batch=B, heads_q=Hq, heads_kv=Hkv, seq_q=Sq, seq_k=Sk, head_dim_out=D,
            q_blocks=q_blocks, k_blocks=k_blocks, causal=int(is_causal), out_dtype=dtype_code,
            v_scale=scratch["v_scale"], v_mean=v_mean,
            lse_stride_b=lse_strides[0], lse_stride_h=lse_strides[1],
            cu_seqlens_q=_ptr(cu_q), cu_seqlens_k=_ptr(cu_k), block_mask=_ptr(block_mask),
            mask_stride_b=mask_strides[0], mask_stride_h=mask_strides[1],
            mask_stride_q=mask_strides[2], mask_stride_k=mask_strides[3])
        # One CTA per q_rows query rows (from the manifest; 128 = a whole quantization block,
        # 192 = a block and a half: the three-consumer sm90 kernels).
        q_rows = attn_kernel.q_rows or _Q_BLOCK
        if tensor_maps:
            q_source = (qh, qs, dtype_code, _GRAN_CODE[qk_quant_gran], sm_scale * _LOG2E) \
                if q_in_kernel else None
            p = _sm90_params(p, scratch, (B, Hq, Hkv, q_blocks, k_blocks, d_pad), q_rows,
                             q_source)
        grid = (-(-q_blocks * _Q_BLOCK // q_rows), Hq, B)
        if kernel_only:
            return lambda: _launch_current(attn_kernel, ordinal, grid, p, dev, out, scratch)
        _launch(attn_kernel, ordinal, grid, p, stream, overlap)
    return out, lse


_TMAP_UINT8 = 0                  # CU_TENSOR_MAP_DATA_TYPE_UINT8
_TMAP_SWIZZLE = {64: 2, 128: 3}  # CU_TENSOR_MAP_SWIZZLE_64B / _128B: one span per int8 row


_TMAP_CACHE: dict = {}  # (address, dims, box, swizzle, strides, dtype) -> encoded map (bytes)
_TMAP_UINT16 = 1  # CU_TENSOR_MAP_DATA_TYPE_UINT16: 16-bit elements copied as they are


def _tensor_map(address: int, dims: tuple, box: tuple, swizzle: int, strides: tuple = None,
                dtype: int = _TMAP_UINT8) -> _abi.TensorMap:
    """A tensor map over the data at ``address`` viewed with ``dims`` (innermost first), byte
    ``strides`` of dims 1.. (default: contiguous 1-byte elements). A map holds only the address
    and geometry, so equal keys give equal maps: the caching allocator hands a repeated call the
    same scratch address, and the encode (a driver call) is skipped."""
    key = (address, dims, box, swizzle, strides, dtype)
    raw = _TMAP_CACHE.get(key)
    if raw is None:
        if strides is None:
            strides, stride = [], 1
            for d in dims[:-1]:
                stride *= d
                strides.append(stride)
        raw = _loader.ext().encode_tensor_map(dtype, address, list(dims), list(strides),
                                              list(box), swizzle)
        if len(_TMAP_CACHE) >= 256:
            _TMAP_CACHE.clear()
        _TMAP_CACHE[key] = raw
    return _abi.TensorMap.from_buffer_copy(raw)


def _q_source_map(qh: torch.Tensor, strides: tuple, q_rows: int) -> _abi.TensorMap:
    """The caller's 16-bit Q, (D, Sq, Hq, B) innermost first, in boxes of one head's ``q_rows``
    rows (rows past Sq read as zeros). A size-1 dim's stride (0 in ``strides``) is given its
    contiguous value: the copy engine wants every stride a multiple of 16 bytes."""
    B, Hq, Sq, D = qh.shape
    byte_strides, extent = [], 2 * D
    for n, s in zip((Sq, Hq, B), (strides[2], strides[1], strides[0])):
        byte_strides.append(2 * s if n > 1 else extent)
        extent = byte_strides[-1] * n
    return _tensor_map(qh.data_ptr(), (D, Sq, Hq, B), (D, q_rows, 1, 1), 0,
                       tuple(byte_strides), _TMAP_UINT16)


def _sm90_params(p: _abi.AttnParams, scratch: "_Scratch", geometry: tuple, q_rows: int,
                 q_source: Optional[tuple]) -> _abi.Sm90AttnParams:
    """AttnParams plus the tensor maps of the sm90 kernel's copies: the CTA's ``q_rows`` Q rows,
    a 128-key K step (rows past the buffer read as zeros), and one V^T block of 64 keys (a step
    copies two, each before its 8 rows of ones: kernels/sm90/traits.cuh). ``geometry``: (B, Hq,
    Hkv, q_blocks, k_blocks, d_pad) of the scratch buffers.
    ``q_source``: (Q as HND view, its (b, h, s) strides, dtype code, granularity code,
    sm_scale * log2(e)) when the kernel quantizes Q itself, else None (the quantizer's Q)."""
    B, Hq, Hkv, q_blocks, k_blocks, d_pad = geometry
    swizzle = _TMAP_SWIZZLE[d_pad]
    if q_source is None:
        tmap_q = _tensor_map(scratch["q_int8"], (d_pad, q_blocks * _Q_BLOCK, B * Hq),
                             (d_pad, q_rows, 1), swizzle)
        q_fields = dict(q_source_dtype=-1)
    else:
        qh, strides, dtype_code, granularity, scale_log2e = q_source
        tmap_q = _q_source_map(qh, strides, q_rows)
        q_fields = dict(q_source_dtype=dtype_code, q_granularity=granularity,
                        q_scale_log2e=scale_log2e)
    return _abi.Sm90AttnParams(
        tmap_q=tmap_q,
        tmap_k=_tensor_map(scratch["k_int8"], (d_pad, k_blocks * _K_BLOCK, B * Hkv),
                           (d_pad, 128, 1), swizzle),
        tmap_v=_tensor_map(scratch["v_fp8"], (_K_BLOCK, d_pad, k_blocks, B * Hkv),
                           (_K_BLOCK, d_pad, 1, 1), _TMAP_SWIZZLE[64]),
        attn=p, **q_fields)


def _launch_current(kernel, ordinal, grid, params, dev, out, buffers):
    """A kernel_only launch: on the current stream; ``buffers`` keeps the operands alive."""
    with _device_guard(dev):
        _launch(kernel, ordinal, grid, params, _current_stream(dev))
    return out


def sm80_forward(q, k, v, *, tensor_layout: str, is_causal: bool, sm_scale: float,
                 return_lse: bool, qk_quant_gran: str, pv_accum_dtype: str, smooth_k: bool,
                 smooth_v: bool = False, tree: str = "sm80", block_mask=None, varlen=None,
                 kernel_only: bool = False, quantize_only: bool = False):
    """Run the sm80 kernels on validated tensors; returns (out, lse or None).

    ``out`` has the input dtype and layout and is contiguous in that layout.
    """
    if smooth_v:
        raise ValueError("smooth_v=True is not offered on the sm80 path (FP16 PV needs no V "
                         "smoothing); use the sm89 path (sageattn_qk_int8_pv_fp8_cuda)")
    return _int8_forward(
        q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
        return_lse=return_lse, qk_quant_gran=qk_quant_gran, smooth_k=smooth_k, tree=tree,
        names=sm80_kernel_names(q.shape[-1], pv_accum_dtype), fp8_pv=None,
        block_mask=block_mask, varlen=varlen, kernel_only=kernel_only,
        quantize_only=quantize_only)


def sm89_forward(q, k, v, *, tensor_layout: str, is_causal: bool, sm_scale: float,
                 return_lse: bool, qk_quant_gran: str, pv_accum_dtype: str, smooth_k: bool,
                 smooth_v: bool = False, tree: str = "sm89", block_mask=None, varlen=None,
                 kernel_only: bool = False, quantize_only: bool = False):
    """Run the sm89 kernels (INT8 QK^T, FP8 E4M3 PV) on validated tensors; returns
    (out, lse or None), ``out`` in the input dtype and layout, contiguous in that layout."""
    names = sm89_kernel_names(q.shape[-1], pv_accum_dtype)
    return _int8_forward(
        q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
        return_lse=return_lse, qk_quant_gran=qk_quant_gran, smooth_k=smooth_k, tree=tree,
        names=names, fp8_pv=_fp8_pv(pv_accum_dtype, smooth_v), block_mask=block_mask,
        varlen=varlen, kernel_only=kernel_only, quantize_only=quantize_only)


def sm90_kernel_names(head_dim: int, pv_accum_dtype: str, block_sparse: bool = False,
                      is_causal: bool = False, seq_q: int = 0) -> tuple:
    """(channel stats, quantize, attention) kernel names of the sm90 tree for a call; block-sparse
    calls take the "fp32+fp32" kernel that walks the mask. Dense "fp32+fp32" calls at head dim
    128 take the 192-row kernel (three in-order consumers: 6-8% faster non-causal, NOTES.md sm90
    v12) unless causal with fewer than SM90_CAUSAL_Q192_MIN_ROWS query rows (``seq_q``: the
    longest sequence's)."""
    d_pad = 64 if head_dim <= 64 else 128
    tag = _checked(pv_accum_dtype, _ACC_TAG_SM90, "sm90")
    if block_sparse:
        if tag != "acc32x32":
            raise ValueError("block-sparse attention on the sm90 path takes pv_accum_dtype "
                             "'fp32+fp32'")
        tag = "acc32x32_sparse"
    elif tag == "acc32x32" and d_pad == 128 and (not is_causal or seq_q >= SM90_CAUSAL_Q192_MIN_ROWS):
        tag = "acc32x32_q192"
    return ("sm90_channel_stats", f"sm90_quantize_qk_int8_v_fp8_hd{d_pad}",
            f"sm90_qkint8_pvfp8_{tag}_hd{d_pad}")


def sm90_forward(q, k, v, *, tensor_layout: str, is_causal: bool, sm_scale: float,
                 return_lse: bool, qk_quant_gran: str, pv_accum_dtype: str, smooth_k: bool,
                 smooth_v: bool = False, tree: str = "sm90", block_mask=None, varlen=None,
                 kernel_only: bool = False, quantize_only: bool = False):
    """Run the sm90 kernels (INT8 QK^T and FP8 E4M3 PV with wgmma; the sm89 quantizer) on
    validated tensors; returns (out, lse or None) as sm89_forward does."""
    seq_q = varlen[2] if varlen is not None else q.shape[2 if tensor_layout == "HND" else 1]
    return _int8_forward(
        q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
        return_lse=return_lse, qk_quant_gran=qk_quant_gran, smooth_k=smooth_k, tree=tree,
        names=sm90_kernel_names(q.shape[-1], pv_accum_dtype, block_mask is not None, is_causal,
                                seq_q),
        fp8_pv=_fp8_pv(pv_accum_dtype, smooth_v), block_mask=block_mask,
        varlen=varlen, kernel_only=kernel_only, quantize_only=quantize_only, tensor_maps=True)


dispatch.RUNNERS["sm80"] = sm80_forward
dispatch.RUNNERS["sm89"] = sm89_forward
dispatch.RUNNERS["sm90"] = sm90_forward


# ---- the op ----------------------------------------------------------------------------

# Block-sparse calls whose path the table picked: the tree that skips blocks best there. The
# sm90 kernel steps over 128 keys, so a kept 64-key block takes its partner along; on the H100
# at S=16k, 90% of 64-key blocks skipped: sm80 1.09 ms, sm90 1.53 ms (BENCHMARKS.md).
SPARSE_PREFERRED = {"sm90": "sm80"}


def _impl(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, path, entry,
          qk_quant_gran, pv_accum_dtype, smooth_k, smooth_v=None, **geometry):
    index = q.device.index or 0   # CUDA tensors always carry their index
    choice = dispatch.resolve(index, path or None, entry or None)
    if (geometry.get("block_mask") is not None and choice.requested == "auto"
            and choice.path in SPARSE_PREFERRED):
        choice = dispatch.resolve(index, SPARSE_PREFERRED[choice.path], None)
    cfg = choice.defaults
    out, lse = dispatch.RUNNERS[choice.path](
        q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
        return_lse=return_lse, qk_quant_gran=qk_quant_gran or cfg.get("qk_quant_gran"),
        pv_accum_dtype=pv_accum_dtype or cfg.get("pv_accum_dtype"),
        smooth_k=cfg.get("smooth_k", True) if smooth_k is None else smooth_k,
        smooth_v=cfg.get("smooth_v", False) if smooth_v is None else smooth_v, tree=choice.tree,
        **geometry)
    return out, lse


def attention_kernel_only(q, k, v, *, path: str, tensor_layout: str = "HND",
                          is_causal: bool = False, sm_scale: Optional[float] = None,
                          qk_quant_gran: Optional[str] = None,
                          pv_accum_dtype: Optional[str] = None):
    """Benchmark aid: quantize (q, k, v) once for ``path`` and return a function that launches
    only that path's attention kernel on the current stream and returns its output buffer
    (the same buffer every time). Inputs are taken as valid (call ``sageattn`` once first)."""
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    choice = dispatch.resolve(q.device.index or 0, path, None)
    cfg = choice.defaults
    return dispatch.RUNNERS[choice.path](
        q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
        return_lse=False, qk_quant_gran=qk_quant_gran or cfg.get("qk_quant_gran"),
        pv_accum_dtype=pv_accum_dtype or cfg.get("pv_accum_dtype"),
        smooth_k=cfg.get("smooth_k", True),
        smooth_v=cfg.get("smooth_v", False), tree=choice.tree, kernel_only=True)


# The INT8-QK paths whose quantization launches quantized_operands runs, and their default PV
# accumulation there.
_QUANT_PATHS = {"sm80": "fp32", "sm89": "fp32+fp32", "sm90": "fp32+fp32"}


def quantized_operands(q, k, v, *, path: str, tensor_layout: str = "HND",
                       sm_scale: Optional[float] = None, qk_quant_gran: str = "per_thread",
                       pv_accum_dtype: Optional[str] = None, smooth_k: bool = True,
                       smooth_v: bool = False, return_lse: bool = False, varlen=None) -> dict:
    """Test and benchmark aid: run only the quantization launches of ``path`` ("sm80",
    "sm89" or "sm90": channel stats, then the fused quantize kernel) on the current stream and
    return the buffers the attention kernel would read, by name (None where the path has
    none). Inputs are taken as valid; ``varlen`` as in ``_int8_forward``."""
    if path not in _QUANT_PATHS:
        raise ValueError(f"path must be one of {', '.join(map(repr, _QUANT_PATHS))}; "
                         f"got {path!r}")
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    return dispatch.RUNNERS[path](
        q, k, v, tensor_layout=tensor_layout, is_causal=False, sm_scale=sm_scale,
        return_lse=return_lse, qk_quant_gran=qk_quant_gran,
        pv_accum_dtype=pv_accum_dtype or _QUANT_PATHS[path], smooth_k=smooth_k,
        smooth_v=smooth_v, varlen=varlen, quantize_only=True)


def _flag(value: int) -> Optional[bool]:
    return None if value < 0 else bool(value)


# One op for every path: the path and its configuration are arguments ("" / -1: the path's
# default), so torch.compile traces one graph node whatever the device picks at run time.
# smooth_v (the sm89 path) came after the first schema, hence its default.
@torch.library.custom_op("sageattn::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str,
                  is_causal: bool, sm_scale: float, return_lse: bool, path: str, entry: str,
                  qk_quant_gran: str, pv_accum_dtype: str, smooth_k: int, smooth_v: int = -1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _impl(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, path, entry,
                     qk_quant_gran, pv_accum_dtype, _flag(smooth_k), _flag(smooth_v))
    return out, (lse if lse is not None else q.new_empty((0,), dtype=torch.float32))


@_attention_op.register_fake
def _(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, path, entry, qk_quant_gran,
      pv_accum_dtype, smooth_k, smooth_v=-1):
    B, Hq, Sq, D = _hnd(q, tensor_layout).shape
    shape = (B, Hq, Sq, D) if tensor_layout == "HND" else (B, Sq, Hq, D)
    out = q.new_empty(shape)
    lse = q.new_empty((B, Hq, Sq) if return_lse else (0,), dtype=torch.float32)
    return out, lse


def check_cu_seqlens(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int,
                     max_q: int, max_k: int) -> None:
    """Offsets start at 0, never decrease, end at the packed length, and no sequence is longer
    than its max_seqlen (the buffers are sized by it). Reads both back to the host in one copy (a
    sync); during CUDA graph capture that is impossible, so there the caller's offsets are trusted
    (documented)."""
    if cu_q.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    both = torch.cat([cu_q, cu_k]).cpu()
    n = cu_q.numel()
    for name, host, total, longest, limit in (
            ("cu_seqlens_q", both[:n], total_q, max_q, "max_seqlen_q"),
            ("cu_seqlens_k", both[n:], total_k, max_k, "max_seqlen_k")):
        lengths = host[1:] - host[:-1]
        if host[0] != 0 or host[-1] != total or bool((lengths < 0).any()):
            raise ValueError(f"{name} must start at 0, not decrease, and end at {total} (the "
                             f"packed length); got {host.tolist()[:8]}...")
        if int(lengths.max()) > longest:
            raise ValueError(f"{name} has a sequence of length {int(lengths.max())} > "
                             f"{limit}={longest}")


def _varlen_impl(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, sm_scale, smooth_k, return_lse,
                 path):
    check_cu_seqlens(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
    return _impl(q, k, v, "HND", is_causal, sm_scale, return_lse, path, None, None, None,
                 smooth_k, None, varlen=(cu_q, cu_k, max_q, max_k))


def _no_lse(q):
    return q.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("sageattn::sparse_attention", mutates_args=())
def _sparse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
               tensor_layout: str, is_causal: bool, sm_scale: float, return_lse: bool,
               path: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _impl(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, path or None, None,
                     None, None, None, None, block_mask=block_mask)
    return out, (lse if lse is not None else _no_lse(q))


def _fake_dense_outputs(q, tensor_layout, return_lse):
    """(out, lse) of a dense call, as empty tensors of the right shapes (fake implementations)."""
    B, Hq, Sq, D = _hnd(q, tensor_layout).shape
    out = q.new_empty((B, Hq, Sq, D) if tensor_layout == "HND" else (B, Sq, Hq, D))
    return out, q.new_empty((B, Hq, Sq) if return_lse else (0,), dtype=torch.float32)


@_sparse_op.register_fake
def _(q, k, v, block_mask, tensor_layout, is_causal, sm_scale, return_lse, path):
    return _fake_dense_outputs(q, tensor_layout, return_lse)


@torch.library.custom_op("sageattn::varlen_attention", mutates_args=())
def _varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, is_causal: bool,
               sm_scale: float, smooth_k: int, return_lse: bool, path: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _varlen_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            is_causal, sm_scale, _flag(smooth_k), return_lse, path or None)
    return out, (lse if lse is not None else _no_lse(q))


@_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, sm_scale,
      smooth_k, return_lse, path):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]) if return_lse else (0,),
                                             dtype=torch.float32)


def _traced(*tensors) -> bool:
    return torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors)


def attention(q, k, v, *, tensor_layout: str, is_causal: bool, sm_scale: float,
              return_lse: bool, path: Optional[str] = None, entry: Optional[str] = None,
              qk_quant_gran: Optional[str] = None, pv_accum_dtype: Optional[str] = None,
              smooth_k: Optional[bool] = None, smooth_v: Optional[bool] = None,
              block_mask: Optional[torch.Tensor] = None, varlen: Optional[tuple] = None):
    """Validated call -> (out, lse or None). None config values take the path's defaults.

    ``block_mask`` (sparse_sageattn) and ``varlen`` (sageattn_varlen) go through their own ops,
    ``sageattn::sparse_attention`` and ``sageattn::varlen_attention``, when traced."""
    if block_mask is not None:
        if ALWAYS_USE_OP or _traced(q, k, v, block_mask):
            out, lse = _sparse_op(q, k, v, block_mask, tensor_layout, is_causal, sm_scale,
                                  return_lse, path or "")
            return out, (lse if return_lse else None)
        return _impl(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, path, None,
                     None, None, None, None, block_mask=block_mask)
    if varlen is not None:
        cu_q, cu_k, max_q, max_k = varlen
        if ALWAYS_USE_OP or _traced(q, k, v, cu_q, cu_k):
            out, lse = _varlen_op(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, sm_scale,
                                  -1 if smooth_k is None else int(smooth_k), return_lse, path or "")
            return out, (lse if return_lse else None)
        return _varlen_impl(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, sm_scale, smooth_k,
                            return_lse, path)
    if ALWAYS_USE_OP or _traced(q, k, v):
        out, lse = _attention_op(q, k, v, tensor_layout, is_causal, sm_scale, return_lse,
                                 path or "", entry or "", qk_quant_gran or "",
                                 pv_accum_dtype or "", -1 if smooth_k is None else int(smooth_k),
                                 -1 if smooth_v is None else int(smooth_v))
        return out, (lse if return_lse else None)
    return _impl(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, path, entry,
                 qk_quant_gran, pv_accum_dtype, smooth_k, smooth_v)


from . import ops_fp4  # noqa: E402,F401  (registers the sm120_fp4 runner and its op)
