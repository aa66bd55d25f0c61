"""The sm80 path, step by step, in torch (CPU or GPU).

Follows "The sm80 path, exactly" in docs/ARCHITECTURE.md: the same padded buffers, the same
quantization groups and scale layouts as the kernels' temporaries (so each step can be
checked on its own), INT32 dot products done exactly, base-2 online softmax over 64-key
blocks, P rounded to fp16, and both PV accumulation modes.

Where it cannot be bit-faithful to the kernels:

* ``exp2``: the kernels use ``ex2.approx.ftz.f32`` (about 2 ulp); this uses torch's exp2.
* Summation order: the K channel mean, the row sums ``l``, the LSE correction and the PV
  products are summed in a different order (here the K mean and the PV products are summed
  in float64 and rounded once, which is at least as accurate as the kernels).
* ``fp16+fp32`` accumulation: each 16-key MMA step is modelled as an exact product of the
  16 keys added to the fp16 accumulator and rounded once to fp16; how the tensor core
  rounds inside one ``mma`` is not documented.
* Division ``o / l``: the kernels may multiply by ``1/l``.

Everything else (scales, INT8 values, scores ``s``, masks) is computed with the same fp32
operations in the same order, so the quantized operands match the kernels' bit for bit.
Padded key rows (``>= Sk``) are zero after smoothing, so they never raise a K scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .reference import to_hnd

__all__ = [
    "Quantized", "padded_head_dim", "q_group_of_row", "k_slot_of_key", "k_channel_mean",
    "quantize_q", "quantize_k", "convert_v", "lse_correction", "quantize", "attention",
    "sm80_attention",
]

Q_BLOCK = 128     # query rows per CTA (8 warps x 16 rows)
K_BLOCK = 64      # keys per main-loop step
PV_K_STEP = 16    # keys per fp16 mma.m16n8k16 step of the PV product
_LOG2E = math.log2(math.e)


def _f32(x: float, device) -> torch.Tensor:
    """A 0-dim fp32 tensor, so scalar arithmetic happens in fp32 like the kernels'."""
    return torch.tensor(x, dtype=torch.float32, device=device)


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels compute with: 64 or 128 (zero columns beyond ``head_dim``)."""
    if not 1 <= head_dim <= 128:
        raise ValueError(f"head dim {head_dim} is outside 1..128")
    return 64 if head_dim <= 64 else 128


def q_group_of_row(r):
    """Per-thread Q scale slot of row ``r`` of a 128-row block: ``warp*8 + lane/4``.

    With ``mma.m16n8k32`` lane ``l`` of warp ``w`` owns rows ``16w + l/4`` and ``16w + l/4 + 8``.
    """
    return (r // 16) * 8 + r % 8


def k_slot_of_key(c):
    """Per-thread K scale slot of key ``c``: ``lane % 4``, which owns columns 2(l%4), 2(l%4)+1
    of every 8-wide tile of the 64-key block."""
    return (c % 8) // 2


@dataclass
class Quantized:
    """The kernels' temporaries, in their layouts (see ``QuantParams`` in ``_abi.py``)."""

    q_int8: torch.Tensor                    # int8 (B, Hq, q_blocks*128, D_pad)
    q_scale: torch.Tensor                   # fp32 (B, Hq, q_blocks, 64)
    k_int8: torch.Tensor                    # int8 (B, Hkv, k_blocks*64, D_pad)
    k_scale: torch.Tensor                   # fp32 (B, Hkv, k_blocks, 4)
    v_fp16: torch.Tensor                    # fp16 (B, Hkv, k_blocks*64, D_pad)
    k_mean: Optional[torch.Tensor]          # fp32 (B, Hkv, D_pad) or None
    lse_correction: Optional[torch.Tensor]  # fp32 (B, Hq, Sq) or None


def _pad(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """fp32 copy of (B, H, S, D) zero-padded to (B, H, rows, cols)."""
    B, H, S, D = x.shape
    out = torch.zeros((B, H, rows, cols), dtype=torch.float32, device=x.device)
    out[:, :, :S, :D] = x.float()
    return out


def _quantize_groups(x: torch.Tensor, amax: torch.Tensor):
    """INT8 values and (amax/127) for fp32 ``x`` given a broadcastable per-group ``amax``."""
    inv = torch.where(amax > 0, _f32(127.0, x.device) / amax, _f32(0.0, x.device))
    x_i8 = torch.clamp(torch.round(x * inv), -127, 127).to(torch.int8)
    return x_i8, amax / _f32(127.0, x.device)


def k_channel_mean(k: torch.Tensor, head_dim_padded: int) -> torch.Tensor:
    """Step 1: per-channel mean of K over tokens, fp32 (B, Hkv, D_pad), padded columns 0."""
    B, H, S, D = k.shape
    mean = torch.zeros((B, H, head_dim_padded), dtype=torch.float32, device=k.device)
    mean[:, :, :D] = k.to(torch.float64).sum(dim=2).float() / _f32(float(S), k.device)
    return mean


def quantize_q(q: torch.Tensor, s2: torch.Tensor, granularity: str, head_dim_padded: int):
    """Step 2: Q to INT8 per group; returns (q_int8, q_scale) in the kernels' layouts.

    ``s2 = sm_scale * log2(e)`` (fp32) is folded into the scale.
    """
    B, H, S, _ = q.shape
    blocks = -(-S // Q_BLOCK)
    x = _pad(q, blocks * Q_BLOCK, head_dim_padded)
    # row r = 16*warp + 8*half + j; per-thread group = 8*warp + j (rows j and j+8).
    g = x.view(B, H, blocks, 8, 2, 8, head_dim_padded)
    if granularity == "per_thread":
        amax = g.abs().amax(dim=(4, 6), keepdim=True)           # (B,H,blocks,8,1,8,1)
    elif granularity == "per_warp":
        amax = g.abs().amax(dim=(4, 5, 6), keepdim=True).expand(B, H, blocks, 8, 1, 8, 1)
    else:
        raise ValueError(f"unknown granularity {granularity!r}")
    q_i8, unit = _quantize_groups(g, amax)
    q_scale = (unit * s2).reshape(B, H, blocks, 64)
    return q_i8.view(B, H, blocks * Q_BLOCK, head_dim_padded), q_scale


def quantize_k(k: torch.Tensor, mean: Optional[torch.Tensor], granularity: str,
               head_dim_padded: int):
    """Step 3: K (minus its channel mean) to INT8 per group; returns (k_int8, k_scale)."""
    B, H, S, D = k.shape
    blocks = -(-S // K_BLOCK)
    smoothed = k.float()
    if mean is not None:
        smoothed = smoothed - mean[:, :, None, :D]
    x = _pad(smoothed, blocks * K_BLOCK, head_dim_padded)
    # key c = 8*tile + 2*slot + e within the block; per-thread group = slot.
    g = x.view(B, H, blocks, 8, 4, 2, head_dim_padded)
    if granularity == "per_thread":
        amax = g.abs().amax(dim=(3, 5, 6), keepdim=True)        # (B,H,blocks,1,4,1,1)
    elif granularity == "per_warp":
        amax = g.abs().amax(dim=(3, 4, 5, 6), keepdim=True).expand(B, H, blocks, 1, 4, 1, 1)
    else:
        raise ValueError(f"unknown granularity {granularity!r}")
    k_i8, unit = _quantize_groups(g, amax)
    return k_i8.view(B, H, blocks * K_BLOCK, head_dim_padded), unit.reshape(B, H, blocks, 4)


def convert_v(v: torch.Tensor, head_dim_padded: int) -> torch.Tensor:
    """Step 4: V to fp16 (round to nearest; bf16 beyond fp16's range becomes inf), padded."""
    B, H, S, D = v.shape
    blocks = -(-S // K_BLOCK)
    out = torch.zeros((B, H, blocks * K_BLOCK, head_dim_padded), dtype=torch.float16,
                      device=v.device)
    out[:, :, :S, :D] = v.to(torch.float16)
    return out


def lse_correction(q: torch.Tensor, mean: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """``q . k_mean * sm_scale`` per query row (fp32, (B, Hq, Sq)): what smoothing K removed
    from every score of the row, added back to the LSE."""
    B, Hq, S, D = q.shape
    Hkv = mean.shape[1]
    m = mean[:, torch.arange(Hq, device=q.device) // (Hq // Hkv), :D]
    dot = (q.float() * m[:, :, None, :]).sum(dim=-1)
    return dot * _f32(sm_scale, q.device)


def quantize(q, k, v, *, sm_scale: float, granularity="per_thread", smooth_k=True,
             want_lse_correction=False) -> Quantized:
    """Steps 1-4 on (B, H, S, D) views; mirrors the k-mean and quantize kernels."""
    D = q.shape[-1]
    d_pad = padded_head_dim(D)
    s2 = _f32(sm_scale * _LOG2E, q.device)   # product in float64, rounded once to fp32
    mean = k_channel_mean(k, d_pad) if smooth_k else None
    q_i8, q_scale = quantize_q(q, s2, granularity, d_pad)
    k_i8, k_scale = quantize_k(k, mean, granularity, d_pad)
    v16 = convert_v(v, d_pad)
    corr = lse_correction(q, mean, sm_scale) if (smooth_k and want_lse_correction) else None
    return Quantized(q_i8, q_scale, k_i8, k_scale, v16, mean, corr)


def _row_scales(q_scale: torch.Tensor, seq_q: int) -> torch.Tensor:
    r = torch.arange(seq_q, device=q_scale.device)
    return q_scale[:, :, r // Q_BLOCK, q_group_of_row(r % Q_BLOCK)]        # (B, Hq, Sq)


def _key_scales(k_scale: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return k_scale[:, :, keys // K_BLOCK, k_slot_of_key(keys)]             # (B, H, n)


def _softmax_step(m, l, s):
    """One base-2 online-softmax step over a key block: returns (m_new, l_new, alpha, p).

    A row with no visible key so far keeps ``m = -inf``; 0 stands in for it in ``exp2`` so
    that ``p`` and ``alpha`` are 0 rather than NaN.
    """
    m_new = torch.maximum(m, s.amax(dim=-1))
    m_use = torch.where(m_new == -math.inf, _f32(0.0, s.device), m_new)
    alpha = torch.exp2(m - m_use)
    p = torch.exp2(s - m_use[..., None])
    return m_new, l * alpha + p.sum(dim=-1), alpha, p


def _block_pv(p16: torch.Tensor, v16: torch.Tensor, pv_accum: str) -> torch.Tensor:
    """One key block's P @ V as fp32, accumulated as the selected MMA mode does."""
    if pv_accum == "fp32":
        return torch.matmul(p16.double(), v16.double()).float()
    if pv_accum == "fp16+fp32":
        acc = torch.zeros(p16.shape[:-1] + v16.shape[-1:], dtype=torch.float16,
                          device=p16.device)
        for c in range(0, p16.shape[-1], PV_K_STEP):
            step = torch.matmul(p16[..., c:c + PV_K_STEP].double(),
                                v16[..., c:c + PV_K_STEP, :].double())
            acc = (acc.double() + step).half()
        return acc.float()
    raise ValueError(f"unknown pv accumulation {pv_accum!r}")


def attention(qt: Quantized, *, seq_q: int, seq_k: int, head_dim: int, causal=False,
              causal_offset: int = 0, pv_accum="fp32", out_dtype=torch.float16,
              return_lse=False):
    """Step 5 over quantized operands: returns out (B, Hq, Sq, head_dim) in ``out_dtype``
    and, with ``return_lse``, the natural-log LSE (B, Hq, Sq) fp32 (else None)."""
    B, Hq = qt.q_int8.shape[:2]
    Hkv = qt.k_int8.shape[1]
    dev = qt.q_int8.device
    kv_head = torch.arange(Hq, device=dev) // (Hq // Hkv)
    q = qt.q_int8[:, :, :seq_q].double()
    qs = _row_scales(qt.q_scale, seq_q)
    rows = torch.arange(seq_q, device=dev)
    d_pad = qt.q_int8.shape[-1]
    m = torch.full((B, Hq, seq_q), -math.inf, dtype=torch.float32, device=dev)
    l = torch.zeros((B, Hq, seq_q), dtype=torch.float32, device=dev)
    o = torch.zeros((B, Hq, seq_q, d_pad), dtype=torch.float32, device=dev)
    n_blocks = -(-seq_k // K_BLOCK)
    if causal:
        # Key blocks wholly above the last row's diagonal contribute nothing.
        n_blocks = min(n_blocks, max(0, -(-(seq_q + causal_offset) // K_BLOCK)))
    for kb in range(n_blocks):
        keys = torch.arange(kb * K_BLOCK, (kb + 1) * K_BLOCK, device=dev)
        kblk = qt.k_int8[:, :, kb * K_BLOCK:(kb + 1) * K_BLOCK].index_select(1, kv_head)
        vblk = qt.v_fp16[:, :, kb * K_BLOCK:(kb + 1) * K_BLOCK].index_select(1, kv_head)
        ks = _key_scales(qt.k_scale, keys).index_select(1, kv_head)
        dot = torch.matmul(q, kblk.double().transpose(-1, -2)).float()   # exact: |dot| < 2^24
        s = dot * (qs[..., None] * ks[:, :, None, :])
        hidden = (keys >= seq_k)[None, :]
        if causal:
            hidden = hidden | (keys[None, :] > rows[:, None] + causal_offset)
        m, l, alpha, p = _softmax_step(m, l, s.masked_fill(hidden, -math.inf))
        o = o * alpha[..., None] + _block_pv(p.half(), vblk, pv_accum)
    seen = l > 0
    out = torch.where(seen[..., None], o / torch.where(seen, l, 1)[..., None], 0)
    out = out[..., :head_dim].to(out_dtype)
    if not return_lse:
        return out, None
    lse = (m + torch.log2(torch.where(seen, l, 1))) * _f32(math.log(2.0), dev)
    if qt.lse_correction is not None:
        lse = lse + qt.lse_correction
    return out, torch.where(seen, lse, _f32(-math.inf, dev))


def sm80_attention(q, k, v, *, tensor_layout="HND", is_causal=False, sm_scale=None,
                   qk_quant_gran="per_thread", pv_accum_dtype="fp32", smooth_k=True,
                   return_lse=False, causal_offset=None):
    """The whole sm80 path on any device: same arguments and result as
    ``sageattn_qk_int8_pv_fp16_cuda`` (output in the input dtype and layout, contiguous;
    LSE fp32 (B, Hq, Sq)). ``causal_offset`` defaults to ``Sk - Sq`` (bottom-right)."""
    qh, kh, vh = (to_hnd(x, tensor_layout) for x in (q, k, v))
    D = qh.shape[-1]
    Sq, Sk = qh.shape[2], kh.shape[2]
    scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    qt = quantize(qh, kh, vh, sm_scale=scale, granularity=qk_quant_gran, smooth_k=smooth_k,
                  want_lse_correction=return_lse)
    out, lse = attention(qt, seq_q=Sq, seq_k=Sk, head_dim=D, causal=is_causal,
                         causal_offset=(Sk - Sq) if causal_offset is None else causal_offset,
                         pv_accum=pv_accum_dtype, out_dtype=q.dtype, return_lse=return_lse)
    if tensor_layout == "NHD":
        out = out.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out
