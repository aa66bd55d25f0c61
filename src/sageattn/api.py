"""The public entry points. Arguments are validated here, once, for every path.

Every check is a shape/dtype/stride test that ``torch.compile`` can trace; device queries
and kernel loading happen later, inside the op (see ``ops.py``).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import ops
from .dispatch import PATHS

__all__ = ["sageattn", "sageattn_qk_int8_pv_fp16_cuda", "sageattn_qk_int8_pv_fp8_cuda",
           "sageattn_qk_int8_pv_fp8_cuda_sm90",
           "sparse_sageattn", "sageattn_varlen", "sageattn3_blackwell"]

_DTYPES = (torch.float16, torch.bfloat16)
_LAYOUTS = ("HND", "NHD")
_GRANULARITIES = ("per_thread", "per_warp")
_PV_ACCUM_SM80 = ("fp32", "fp16+fp32")
_PV_ACCUM_SM89 = ("fp32+fp16", "fp32+fp32", "fp32")
_PV_ACCUM_SM90 = ("fp32+fp32", "fp32")
_MAX_HEAD_DIM = 128
# The kernels keep sequence lengths and block counts in int32 fields.
_MAX_SEQ = 2**31 - 1 - 128


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _validate(q, k, v, tensor_layout, is_causal, sm_scale, return_lse) -> float:
    """Check the arguments shared by every entry point; return the resolved sm_scale."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.device.type != "cuda":
            raise ValueError(
                f"{name} is on {x.device}, but sageattn runs on CUDA devices only; for "
                f"{x.device.type} tensors use torch.nn.functional.scaled_dot_product_attention, "
                "or sageattn.emulate.sm80_attention / sm89_attention to emulate the quantized "
                "paths")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; q, k and v "
                             "must be on the same device")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; sageattn takes torch.float16 or "
                            f"torch.bfloat16 (cast with {name}.to(torch.bfloat16))")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; q, k and v must "
                            "share one dtype")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, H, S, D) or (B, S, H, D), got "
                             f"shape {tuple(x.shape)}")
    if not isinstance(tensor_layout, str) or tensor_layout not in _LAYOUTS:
        raise ValueError(f"tensor_layout must be 'HND' (B, H, S, D) or 'NHD' (B, S, H, D), "
                         f"got {tensor_layout!r}")
    _check_flag("is_causal", is_causal)
    _check_flag("return_lse", return_lse)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1 and x.shape[-1] != 1:
            raise ValueError(f"{name} must have a contiguous last (head) dimension, got strides "
                             f"{tuple(x.stride())}; pass {name}.contiguous()")
    order = "(B, H, S, D)" if tensor_layout == "HND" else "(B, S, H, D)"
    s_dim, h_dim = (2, 1) if tensor_layout == "HND" else (1, 2)
    B, Hq, Sq, D = q.shape[0], q.shape[h_dim], q.shape[s_dim], q.shape[3]
    for name, x in (("k", k), ("v", v)):
        if x.shape[3] != D:
            raise ValueError(f"{name} has head dim {x.shape[3]} but q has {D}; q, k and v must "
                             "share the head dim")
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} (last dim of q) is not supported yet: sageattn takes "
                         f"1..{_MAX_HEAD_DIM}; use "
                         "torch.nn.functional.scaled_dot_product_attention")
    for name, x in (("k", k), ("v", v)):
        if x.shape[0] != B:
            raise ValueError(f"{name} has batch {x.shape[0]} but q has {B}")
    Hkv, Sk = k.shape[h_dim], k.shape[s_dim]
    if v.shape[h_dim] != Hkv:
        raise ValueError(f"v has {v.shape[h_dim]} heads but k has {Hkv} (layout "
                         f"{tensor_layout} {order})")
    if v.shape[s_dim] != Sk:
        raise ValueError(f"v has sequence length {v.shape[s_dim]} but k has {Sk} (layout "
                         f"{tensor_layout} {order})")
    if B < 1 or Hq < 1 or Hkv < 1:
        raise ValueError(f"batch and head counts must be >= 1, got q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)} (layout {tensor_layout} {order})")
    if Hq % Hkv != 0:
        raise ValueError(f"q has {Hq} heads, which is not a multiple of k's {Hkv} heads "
                         f"(GQA/MQA need Hkv to divide Hq; layout {tensor_layout} {order})")
    for name, s in (("q", Sq), ("k", Sk)):
        if not 1 <= s <= _MAX_SEQ:
            raise ValueError(f"{name} has sequence length {s}; sageattn takes 1..{_MAX_SEQ} "
                             f"(layout {tensor_layout} {order})")
    if sm_scale is None:
        scale = D ** -0.5
    else:
        if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
            raise TypeError(f"sm_scale must be a float or None, got {sm_scale!r}")
        scale = float(sm_scale)
        if not math.isfinite(scale):
            raise ValueError(f"sm_scale must be finite, got {sm_scale!r}")
    if torch.is_grad_enabled():
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but sageattn is inference-only (it has no "
                    "backward and will not return a result cut off from autograd); call it "
                    "under torch.no_grad() or torch.inference_mode(), or pass detached "
                    "tensors")
    return scale


def _check_path(path) -> None:
    if path is not None and (not isinstance(path, str) or (path != "auto" and path not in PATHS)):
        raise ValueError(f"path must be None, 'auto' or one of {', '.join(map(repr, PATHS))}; "
                         f"got {path!r}")


def sageattn(q, k, v, tensor_layout: str = "HND", is_causal: bool = False,
             sm_scale: Optional[float] = None, return_lse: bool = False,
             path: Optional[str] = None):
    """Quantized attention ``softmax(q k^T * sm_scale) v`` with the best path for the device.

    Args:
        q: (B, Hq, Sq, D) for ``tensor_layout="HND"`` or (B, Sq, Hq, D) for "NHD".
        k, v: (B, Hkv, Sk, D) / (B, Sk, Hkv, D); ``Hkv`` divides ``Hq`` (GQA/MQA: query
            head h reads kv head ``h // (Hq // Hkv)``). fp16 or bf16, one dtype for all three,
            on one CUDA device; any strides with a contiguous last dim. D in 1..128.
        is_causal: mask key j for query i when ``j > i + (Sk - Sq)``: bottom-right
            alignment (FlashAttention's, the KV-cache convention), equal to torch's
            top-left ``is_causal`` when ``Sq == Sk``. Query rows that see no key (only when
            ``Sq > Sk``) return zeros and LSE ``-inf``.
        sm_scale: defaults to ``D ** -0.5``.
        return_lse: also return the natural-log LSE of the scaled scores, fp32
            (B, Hq, Sq), exact for the unsmoothed scores (ready for ring/sequence-parallel
            merges).
        path: force a path ("sm80", "sm89", ...; default: ``$SAGEATTN_PATH`` or the
            dispatch table: sm89 with "fp32+fp16" accumulation on compute capability 8.9 and
            12.x, sm80 on 8.0-8.7). ``sageattn.explain()`` says which path runs and why.

    Returns:
        The output in q's dtype and layout, contiguous in that layout (and the LSE).
        Inputs are never modified. Inference only: inputs that require grad raise.
    """
    scale = _validate(q, k, v, tensor_layout, is_causal, sm_scale, return_lse)
    _check_path(path)
    out, lse = ops.attention(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal,
                             sm_scale=scale, return_lse=return_lse, path=path)
    return (out, lse) if return_lse else out


def sageattn_qk_int8_pv_fp16_cuda(q, k, v, tensor_layout: str = "HND", is_causal: bool = False,
                                  qk_quant_gran: str = "per_thread",
                                  sm_scale: Optional[float] = None,
                                  pv_accum_dtype: str = "fp32", smooth_k: bool = True,
                                  return_lse: bool = False, *, smooth_v: bool = False):
    """The sm80 path by name: INT8 Q/K (``qk_quant_gran``), FP16 P and V.

    Takes the arguments of ``sageattn`` (same shapes, layouts, causal alignment, LSE) plus:
        qk_quant_gran: "per_thread" (each thread's fragment rows/columns share a scale) or
            "per_warp" (a warp's 16 rows / a 64-key block share one).
        pv_accum_dtype: "fp32" (fp32 accumulation) or "fp16+fp32" (fp16 inside a 64-key
            block, fp32 across blocks; faster on some GPUs, but one block's partial sum
            overflows fp16 when ``64 * max|v|`` exceeds 65504, so keep |v| below ~1000).
            Plain "fp16" is not offered.
        smooth_k: subtract K's per-channel mean (over 256 keys spread over a longer
            sequence) before quantizing (softmax is unchanged; the LSE is corrected back).
        smooth_v: accepted for compatibility; only False (it belongs to the "fp16" mode).
    """
    scale = _validate(q, k, v, tensor_layout, is_causal, sm_scale, return_lse)
    _check_choice("qk_quant_gran", qk_quant_gran, _GRANULARITIES)
    if pv_accum_dtype == "fp16":
        raise ValueError("pv_accum_dtype='fp16' is not offered: accumulating P.V in fp16 "
                         "across the whole key sequence overflows (black/NaN frames); use "
                         "'fp32' (default) or 'fp16+fp32'")
    _check_choice("pv_accum_dtype", pv_accum_dtype, _PV_ACCUM_SM80)
    _check_flag("smooth_k", smooth_k)
    _check_flag("smooth_v", smooth_v)
    if smooth_v:
        raise ValueError("smooth_v=True is not offered: it serves only pv_accum_dtype='fp16', "
                         "which overflows; the offered modes need no V smoothing")
    out, lse = ops.attention(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal,
                             sm_scale=scale, return_lse=return_lse, path="sm80",
                             entry="sageattn_qk_int8_pv_fp16_cuda", qk_quant_gran=qk_quant_gran,
                             pv_accum_dtype=pv_accum_dtype, smooth_k=smooth_k)
    return (out, lse) if return_lse else out


def sageattn_qk_int8_pv_fp8_cuda(q, k, v, tensor_layout: str = "HND", is_causal: bool = False,
                                 qk_quant_gran: str = "per_thread",
                                 sm_scale: Optional[float] = None,
                                 pv_accum_dtype: str = "fp32+fp16", smooth_k: bool = True,
                                 smooth_v: bool = False, return_lse: bool = False):
    """The sm89 path by name: INT8 Q/K (``qk_quant_gran``), FP8 E4M3 P and V (SageAttention2
    and 2++). Native on compute capability 8.9 and 12.x; correct but not fast on 9.0 (the
    compiler emulates the E4M3 MMA there).

    Takes the arguments of ``sageattn`` (same shapes, layouts, causal alignment, LSE) plus:
        qk_quant_gran: "per_thread" (each thread's fragment rows/columns share a scale) or
            "per_warp" (a warp's 16 rows / a 64-key block share one).
        pv_accum_dtype: how each 64-key block's FP8 P.V product accumulates before it is
            added to the fp32 output:
            "fp32+fp16" (default, SageAttention2++): in fp16, about 2x the MMA rate on Ada and
            Blackwell consumer GPUs; V is scaled to |V| <= 2.25 so a block cannot overflow.
            "fp32+fp32": in a separate fp32 accumulator (two-level accumulation).
            "fp32": straight into the fp32 output accumulator.
        smooth_k: subtract K's per-channel mean (over 256 keys spread over a longer
            sequence) before quantizing (softmax is unchanged; the LSE is corrected back).
        smooth_v: subtract V's per-channel mean before quantizing to FP8 (added back to the
            output: rows of P sum to 1). Helps when channels of V are offset from zero.
    """
    scale = _validate(q, k, v, tensor_layout, is_causal, sm_scale, return_lse)
    _check_choice("qk_quant_gran", qk_quant_gran, _GRANULARITIES)
    if pv_accum_dtype == "fp16+fp32":
        raise ValueError(f"pv_accum_dtype={pv_accum_dtype!r} is a mode of the FP16-PV path "
                         "(sageattn_qk_int8_pv_fp16_cuda); the FP8-PV path takes "
                         f"{', '.join(map(repr, _PV_ACCUM_SM89))}")
    if pv_accum_dtype == "fp16":
        raise ValueError("pv_accum_dtype='fp16' is not offered: accumulating P.V in fp16 "
                         "across the whole key sequence overflows; use 'fp32+fp16' (default: "
                         "fp16 inside a 64-key block, fp32 across blocks), 'fp32+fp32' or "
                         "'fp32'")
    _check_choice("pv_accum_dtype", pv_accum_dtype, _PV_ACCUM_SM89)
    _check_flag("smooth_k", smooth_k)
    _check_flag("smooth_v", smooth_v)
    out, lse = ops.attention(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal,
                             sm_scale=scale, return_lse=return_lse, path="sm89",
                             entry="sageattn_qk_int8_pv_fp8_cuda", qk_quant_gran=qk_quant_gran,
                             pv_accum_dtype=pv_accum_dtype, smooth_k=smooth_k,
                             smooth_v=smooth_v)
    return (out, lse) if return_lse else out


def sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout: str = "HND",
                                      is_causal: bool = False, qk_quant_gran: str = "per_thread",
                                      sm_scale: Optional[float] = None,
                                      pv_accum_dtype: str = "fp32+fp32", smooth_k: bool = True,
                                      smooth_v: bool = False, return_lse: bool = False):
    """The sm90 path by name (Hopper, compute capability 9.0 only): INT8 Q/K and FP8 E4M3 P
    and V through wgmma, tensor-memory copies and warp-specialized CTAs; the default path of
    ``sageattn`` on 9.0.

    Takes the arguments of ``sageattn_qk_int8_pv_fp8_cuda`` except ``pv_accum_dtype``:
        "fp32+fp32" (default): each 128-key step's P.V product accumulates from zero in the
            MMA's accumulator, then is added to the fp32 output (Hopper's FP8 MMA accumulates
            with reduced precision; this bounds its error to one step).
        "fp32": the MMA accumulates into the output directly (fewer registers, less accurate).
    """
    scale = _validate(q, k, v, tensor_layout, is_causal, sm_scale, return_lse)
    _check_choice("qk_quant_gran", qk_quant_gran, _GRANULARITIES)
    _check_choice("pv_accum_dtype", pv_accum_dtype, _PV_ACCUM_SM90)
    _check_flag("smooth_k", smooth_k)
    _check_flag("smooth_v", smooth_v)
    out, lse = ops.attention(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal,
                             sm_scale=scale, return_lse=return_lse, path="sm90",
                             entry="sageattn_qk_int8_pv_fp8_cuda_sm90",
                             qk_quant_gran=qk_quant_gran, pv_accum_dtype=pv_accum_dtype,
                             smooth_k=smooth_k, smooth_v=smooth_v)
    return (out, lse) if return_lse else out


def sparse_sageattn(q, k, v, mask_id=None, is_causal: bool = False, tensor_layout: str = "HND",
                    sm_scale: Optional[float] = None, return_lse: bool = False,
                    path: Optional[str] = None):
    """Block-sparse ``sageattn``: ``mask_id`` selects which (128 query x 64 key) blocks run.

    Args (as ``sageattn``), plus:
        mask_id: bool or integer tensor of shape (B, Hq, ceil(Sq/128), ceil(Sk/64)), or any
            shape that broadcasts to it (e.g. (1, Hq, ...) for one mask per head); nonzero =
            compute the block, 0 = skip it (no loads, no matrix products). ``None``: dense.
            Causal masking, when asked, applies on top of it.

    Query rows whose every visible block is skipped return zeros (and LSE ``-inf``).
    Traceable by torch.compile (op ``sageattn::sparse_attention``).
    """
    scale = _validate(q, k, v, tensor_layout, is_causal, sm_scale, return_lse)
    _check_path(path)
    block_mask = None
    if mask_id is not None:
        _check_tensor("mask_id", mask_id)
        if mask_id.device != q.device:
            raise ValueError(f"mask_id is on {mask_id.device} but q is on {q.device}")
        if mask_id.dtype.is_floating_point or mask_id.dtype.is_complex:
            raise TypeError(f"mask_id must be a bool or integer tensor, got {mask_id.dtype}")
        s_dim, h_dim = (2, 1) if tensor_layout == "HND" else (1, 2)
        B, Hq, Sq, Sk = q.shape[0], q.shape[h_dim], q.shape[s_dim], k.shape[s_dim]
        want = (B, Hq, -(-Sq // 128), -(-Sk // 64))
        try:
            expanded = torch.broadcast_shapes(tuple(mask_id.shape), want)
        except RuntimeError:
            expanded = None
        if mask_id.dim() > 4 or expanded != want:
            raise ValueError(f"mask_id has shape {tuple(mask_id.shape)}, which does not broadcast "
                             f"to (B, Hq, ceil(Sq/128), ceil(Sk/64)) = {want}")
        # The kernel reads one byte per block (nonzero = keep) through the strides: bool and
        # 8-bit masks are read in place (a reinterpreting view: no copy, no kernel), wider
        # integers take one compare; then a stride-0 broadcast view, no B*H copies.
        if mask_id.dtype not in (torch.bool, torch.int8, torch.uint8):
            mask_id = mask_id != 0
        # Read 1-byte masks in place; Inductor cannot lower a bool->int8 view, so traced calls
        # convert (one small copy).
        block_mask = (mask_id.to(torch.int8) if torch.compiler.is_compiling()
                      else mask_id.view(torch.int8)).expand(want)
    out, lse = ops.attention(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal,
                             sm_scale=scale, return_lse=return_lse, path=path,
                             block_mask=block_mask)
    return (out, lse) if return_lse else out


def sageattn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    is_causal: bool = False, sm_scale: Optional[float] = None,
                    smooth_k: bool = True, return_lse: bool = False, path: Optional[str] = None):
    """Attention over packed variable-length sequences.

    Args:
        q: (total_q, Hq, D); k, v: (total_k, Hkv, D): the sequences of a batch concatenated
            along dim 0 (fp16/bf16, contiguous last dim, Hkv divides Hq, D in 1..128).
        cu_seqlens_q, cu_seqlens_k: int32 tensors of B+1 offsets on q's device (starting at 0,
            non-decreasing, ending at total); sequence i is rows cu[i]:cu[i+1]. Empty
            sequences are allowed.
        max_seqlen_q, max_seqlen_k: Python ints >= every sequence's length (checked).
        is_causal: bottom-right per sequence (key j visible to query i iff
            j <= i + len_k - len_q).
        return_lse: also return the natural-log LSE, fp32, (Hq, total_q).

    Returns the packed output (total_q, Hq, D) in q's dtype. The offsets are checked against
    the packed lengths and max_seqlen on the host when the call runs (one small device-to-host
    copy; inside a CUDA graph capture they cannot be read back and are trusted). Traceable by
    torch.compile (op ``sageattn::varlen_attention``).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
        if x.dim() != 3:
            raise ValueError(f"{name} must be packed (total, H, D), got shape {tuple(x.shape)}")
    for name, x in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or not 1 <= x <= _MAX_SEQ:
            raise ValueError(f"{name} must be an int in 1..{_MAX_SEQ}, got {x!r}")
    _check_flag("smooth_k", smooth_k)
    _check_path(path)
    # Validate shapes/dtypes/devices through the dense checks on (1, H, total, D) views.
    scale = _validate(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), "NHD", is_causal, sm_scale,
                      return_lse)
    cus = []
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_tensor(name, cu)
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of B+1 offsets, got "
                             f"{cu.dtype} shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
        cus.append(cu if cu.is_contiguous() else cu.contiguous())
    if cus[0].numel() != cus[1].numel():
        raise ValueError(f"cu_seqlens_q has {cus[0].numel() - 1} sequences but cu_seqlens_k has "
                         f"{cus[1].numel() - 1}")
    out, lse = ops.attention(q, k, v, tensor_layout="HND", is_causal=is_causal, sm_scale=scale,
                             return_lse=return_lse, path=path, smooth_k=smooth_k,
                             varlen=(cus[0], cus[1], int(max_seqlen_q), int(max_seqlen_k)))
    return (out, lse) if return_lse else out


def sageattn3_blackwell(q, k, v, is_causal: bool = False, per_block_mean: bool = True,
                        tensor_layout: str = "HND", sm_scale: Optional[float] = None,
                        return_lse: bool = False, *, smooth_k: bool = True):
    """SageAttention3: NVFP4 microscaling attention (E2M1 values, one E4M3 scale per 16
    elements; both products through the block-scaled FP4 ``mma.sync``). Native on compute
    capability 12.0 (sm_120a); on 9.0 the same kernels run with exact software FP4 (a
    verification build, slow); elsewhere it raises ``PathUnavailableError``. FP4 is lossy: it
    is never the default of ``sageattn`` (``path="sm120_fp4"`` or ``SAGEATTN_PATH`` opts in).

    Takes the arguments of ``sageattn`` (same shapes, layouts, GQA, causal alignment, LSE) plus:
        per_block_mean: Q smoothing by the mean of each 128-token block (True) or of the whole
            sequence (False); the scores get ``mean_q . K^T`` back, so it changes only how
            well Q quantizes.
        smooth_k: subtract K's per-channel mean (over 256 keys spread over a longer
            sequence) before quantizing (softmax is unchanged; the LSE is corrected back).
    Inputs never modified; inference only. Traceable by torch.compile
    (op ``sageattn::fp4_attention``).
    """
    from .ops_fp4 import fp4_attention

    scale = _validate(q, k, v, tensor_layout, is_causal, sm_scale, return_lse)
    _check_flag("per_block_mean", per_block_mean)
    _check_flag("smooth_k", smooth_k)
    out, lse = fp4_attention(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal,
                             sm_scale=scale, return_lse=return_lse, per_block_mean=per_block_mean,
                             smooth_k=smooth_k)
    return (out, lse) if return_lse else out
