"""The sm80, sm89 and sm90 paths, step by step, in torch (CPU or GPU).

Follows "The sm80 path, exactly" and "The sm89 path (INT8 QK + FP8 PV), exactly" in
docs/ARCHITECTURE.md: the same padded buffers, the same quantization groups and scale layouts
as the kernels' temporaries (so each step can be checked on its own), INT32 dot products done
exactly, base-2 online softmax over 64-key blocks, then either P rounded to fp16 times fp16 V
(sm80: ``sm80_attention``) or P scaled by 448 and rounded to FP8 E4M3 times per-channel E4M3 V
(sm89: ``sm89_attention``), in every PV accumulation mode of the kernels. The sm90 path
(``sm90_attention``) is the sm89 path's quantization and arithmetic with 128-key main-loop steps
(Hopper's wgmma tiles): one online-softmax max and rescale per 128 keys, in "fp32+fp32" each
128-key step's PV product from zero, then added into the fp32 output, and the row sums ``l`` of
the E4M3 P (the kernels take them on the tensor core beside the PV product, with an all-ones
operand) where the sm80 and sm89 paths sum the fp32 P.

Where it cannot be bit-faithful to the kernels:

* ``exp2``: the kernels use ``ex2.approx.ftz.f32`` (about 2 ulp); this uses torch's exp2. On
  the FP8 path a P value within 2 ulp of an E4M3 rounding midpoint can therefore round to the
  neighbouring E4M3 value (one E4M3 step is 1/16 to 1/8 relative), which is the main source of
  kernel-vs-emulator differences there.
* Summation order: the K and V channel means, the row sums ``l``, the LSE correction and the
  PV products are summed in a different order (here the means and the PV products are summed
  in float64 and rounded once, which is at least as accurate as the kernels). A V mean one ulp
  away from the kernel's can move a V element to the neighbouring E4M3 value.
* fp16 accumulation ("fp16+fp32" on sm80, "fp32+fp16" on sm89): each MMA k-step (16 keys for
  fp16 ``mma.m16n8k16``, 32 keys for e4m3 ``mma.m16n8k32``) is modelled as the exact product
  of its keys added to the fp16 accumulator and rounded once to fp16; how the tensor core
  rounds inside one ``mma`` is not documented, and on sm_90 the compiler splits the e4m3
  ``m16n8k32`` into two fp16 ``m16n8k16`` MMAs (rounding every 16 keys).
* fp32 accumulation of a block ("fp32" and "fp32+fp32" on sm89, "fp32" on sm80): the block's
  products are summed exactly and rounded once (E4M3 and fp16 products are exact in float64);
  the tensor core rounds partial sums. The emulator's "fp32" and "fp32+fp32" are therefore the
  same computation; they differ in the kernels only in where that rounding happens.
  On sm_90 the FP8 ``wgmma`` accumulates with less than fp32 precision (Hopper's FP8 MMA
  drops low-order bits of its sums), in the PV products and in the row sums of the E4M3 P
  (the kernel's ``l`` comes out slightly low: LSE -3.5e-5 on average against this emulator,
  measured on an H100); that is not modelled: tests/gpu/test_sm90.py bounds it.
* Division ``o / l`` on the sm80 path: the kernels multiply by ``1/l`` (the sm89 emulator does
  the same, in the kernels' order: ``o * (1/l) * v_scale + v_mean``).

Everything else (scales, INT8 and E4M3 values, scores ``s``, masks) is computed with the same
fp32 operations in the same order, so the quantized operands match the kernels' bit for bit
given the same channel statistics. Padded key rows (``>= Sk``) are zero after smoothing, so
they never raise a K scale, and they are +0 in the FP8 V tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .reference import to_hnd

__all__ = [
    "Quantized", "padded_head_dim", "q_group_of_row", "k_slot_of_key", "k_channel_mean",
    "K_MEAN_SAMPLE_TOKENS", "sampled_tokens",
    "quantize_q", "quantize_k", "convert_v", "lse_correction", "quantize", "attention",
    "sm80_attention",
    # the sm89 path
    "QuantizedFp8", "E4M3_MAX", "LOG2_P_SCALE_FP8", "PV_ACCUM_FP8", "e4m3_rn_satfinite",
    "e4m3_bits", "e4m3_values", "fp8_pv_key_slot", "v_scale_max", "channel_stats",
    "V_AMAX_SAMPLE_TOKENS", "V_AMAX_MARGIN", "v_amax_margin", "v_channel_amax", "quantize_v_fp8",
    "v_fp8_key_major", "quantize_fp8", "attention_fp8", "sm89_attention",
    # the sm90 path
    "SM90_KEY_STEP", "PV_ACCUM_SM90", "sm90_attention",
]

Q_BLOCK = 128     # query rows per CTA (8 warps x 16 rows)
K_BLOCK = 64      # keys per quantization block (K scales, V^T tiles) and mma.sync loop step
# Keys per main-loop step of the sm90 kernels: a wgmma QK^T tile of 128 keys (two quantization
# blocks); the online-softmax max, the rescale and the "fp32+fp32" PV sum happen once per step.
SM90_KEY_STEP = 128
PV_K_STEP = 16    # keys per fp16 mma.m16n8k16 step of the PV product
# Keys per e4m3 mma.m16n8k32 step of the FP8 PV product: where "fp32+fp16" rounds its fp16
# accumulator. On sm_90 the compiler emulates that MMA with two fp16 m16n8k16 MMAs, which round
# every 16 keys: set 16 to model an H100 (tests/gpu/test_sm89.py does).
PV_K_STEP_FP8 = 32
E4M3_MAX = 448.0  # largest finite E4M3 (e4m3fn) value
# P is scaled into the E4M3 range by shifting the row max by log2(448) (the kernels'
# kLog2PScale, an fp32 constant).
LOG2_P_SCALE_FP8 = math.log2(E4M3_MAX)
# pv_accum_dtype of the sm89 path -> scale_max of V: one 64-key block of the fp16-accumulated
# mode sums to at most 64 * 448 * 2.25 = 64512 < 65504 (SageAttention2++).
PV_ACCUM_FP8 = {"fp32": 448.0, "fp32+fp32": 448.0, "fp32+fp16": 2.25}
# The sm90 path's modes: no fp16 accumulation (wgmma's FP8 MMA accumulates in fp32 only).
PV_ACCUM_SM90 = ("fp32+fp32", "fp32")
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


# K smoothing takes the channel mean of this many keys spread over the sequence (all keys of a
# shorter one): any per-channel vector subtracted from every key leaves the softmax unchanged
# (the LSE correction uses the same vector), so the sample costs only smoothing quality (none
# measurable on the outlier input) and saves a whole read of K (NOTES.md "K mean from a sample").
K_MEAN_SAMPLE_TOKENS = 256


def sampled_tokens(length: int, n: int) -> torch.Tensor:
    """Token indices of an ``n``-sample of a ``length``-token sequence (``n < length``): the
    floor of one point in each of n equal strata, at a golden-ratio-hashed offset inside it (no
    aliasing with periodic patterns such as rotary embeddings; below 2n tokens a token may be
    taken twice). The kernels' ``sampled_token``, exactly."""
    i = torch.arange(n, dtype=torch.int64)
    offset = ((i * 2654435769) % (1 << 32)) >> 22
    return (i * 1024 + offset) * length // (n * 1024)


def _sampled_rows(x: torch.Tensor, sample: int) -> torch.Tensor:
    """The ``sample`` sampled tokens of (B, H, S, D) ``x`` when S is longer, else ``x``."""
    S = x.shape[2]
    return x[:, :, sampled_tokens(S, sample).to(x.device)] if 0 < sample < S else x


def k_channel_mean(k: torch.Tensor, head_dim_padded: int,
                   sample: int = K_MEAN_SAMPLE_TOKENS) -> torch.Tensor:
    """Step 1: per-channel mean of K over tokens (over ``sample`` of them, sampled_tokens, when
    the sequence is longer; 0: all), fp32 (B, Hkv, D_pad), padded columns 0."""
    k = _sampled_rows(k, sample)
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


def _softmax_step(m, l, s, log2_p_scale: float = 0.0):
    """One base-2 online-softmax step over a key block: returns (m_new, l_new, alpha, p).

    A row with no visible key so far keeps ``m = -inf``; 0 stands in for it in ``exp2`` so
    that ``p`` and ``alpha`` are 0 rather than NaN. ``log2_p_scale`` scales P (and ``l``) by
    ``2^log2_p_scale`` through the shift ``m_use - log2_p_scale`` (fp32), as the kernels do.
    """
    m_new = torch.maximum(m, s.amax(dim=-1))
    m_use = torch.where(m_new == -math.inf, _f32(0.0, s.device), m_new)
    alpha = torch.exp2(m - m_use)
    shift = m_use - _f32(log2_p_scale, s.device) if log2_p_scale else m_use
    p = torch.exp2(s - shift[..., None])
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


def _rows_padded(x: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Rows ``start .. start+count`` of dim 2 of ``x``, zero rows past its end."""
    part = x[:, :, start:start + count]
    if part.shape[2] == count:
        return part
    pad = torch.zeros(part.shape[:2] + (count - part.shape[2],) + part.shape[3:],
                      dtype=part.dtype, device=part.device)
    return torch.cat([part, pad], dim=2)


def _score_blocks(qt, seq_q: int, seq_k: int, causal: bool, causal_offset: int,
                  key_step: int = K_BLOCK):
    """The visible main-loop steps of ``key_step`` keys in order: yields ``(start, kv_head,
    s)`` with ``s`` the step's base-2 scores (B, Hq, Sq, key_step), fp32, masked keys
    ``-inf``; ``kv_head`` maps query heads to kv heads. Shared by all paths (steps 1-3 and the
    scores of step 5 are the same; a key's score does not depend on the step size)."""
    Hq, Hkv = qt.q_int8.shape[1], qt.k_int8.shape[1]
    dev = qt.q_int8.device
    kv_head = torch.arange(Hq, device=dev) // (Hq // Hkv)
    q = qt.q_int8[:, :, :seq_q].double()
    qs = _row_scales(qt.q_scale, seq_q)
    rows = torch.arange(seq_q, device=dev)
    last_key = qt.k_int8.shape[2] - 1          # past it a step reads zero rows (masked keys)
    n_steps = -(-seq_k // key_step)
    if causal:
        # Steps wholly above the last row's diagonal contribute nothing.
        n_steps = min(n_steps, max(0, -(-(seq_q + causal_offset) // key_step)))
    for step in range(n_steps):
        start = step * key_step
        keys = torch.arange(start, start + key_step, device=dev)
        kblk = _rows_padded(qt.k_int8, start, key_step).index_select(1, kv_head)
        ks = _key_scales(qt.k_scale, keys.clamp(max=last_key)).index_select(1, kv_head)
        dot = torch.matmul(q, kblk.double().transpose(-1, -2)).float()   # exact: |dot| < 2^24
        s = dot * (qs[..., None] * ks[:, :, None, :])
        hidden = (keys >= seq_k)[None, :]
        if causal:
            hidden = hidden | (keys[None, :] > rows[:, None] + causal_offset)
        yield start, kv_head, s.masked_fill(hidden, -math.inf)


def _running_state(qt, seq_q: int):
    """Fresh (m, l, o): row max -inf, row sum 0, output accumulator 0 (fp32)."""
    B, Hq, _, d_pad = qt.q_int8.shape
    dev = qt.q_int8.device
    m = torch.full((B, Hq, seq_q), -math.inf, dtype=torch.float32, device=dev)
    l = torch.zeros((B, Hq, seq_q), dtype=torch.float32, device=dev)
    o = torch.zeros((B, Hq, seq_q, d_pad), dtype=torch.float32, device=dev)
    return m, l, o


def _lse(qt, m, l, seen, log2_p_scale: float = 0.0):
    """Natural-log LSE of the unscaled probabilities plus the K-smoothing correction."""
    dev = m.device
    lse = m + torch.log2(torch.where(seen, l, 1))
    if log2_p_scale:
        lse = lse - _f32(log2_p_scale, dev)
    lse = lse * _f32(math.log(2.0), dev)
    if qt.lse_correction is not None:
        lse = lse + qt.lse_correction
    return torch.where(seen, lse, _f32(-math.inf, dev))


def attention(qt: Quantized, *, seq_q: int, seq_k: int, head_dim: int, causal=False,
              causal_offset: int = 0, pv_accum="fp32", out_dtype=torch.float16,
              return_lse=False):
    """Step 5 over quantized operands: returns out (B, Hq, Sq, head_dim) in ``out_dtype``
    and, with ``return_lse``, the natural-log LSE (B, Hq, Sq) fp32 (else None)."""
    m, l, o = _running_state(qt, seq_q)
    for start, kv_head, s in _score_blocks(qt, seq_q, seq_k, causal, causal_offset):
        vblk = qt.v_fp16[:, :, start:start + K_BLOCK].index_select(1, kv_head)
        m, l, alpha, p = _softmax_step(m, l, s)
        o = o * alpha[..., None] + _block_pv(p.half(), vblk, pv_accum)
    seen = l > 0
    out = torch.where(seen[..., None], o / torch.where(seen, l, 1)[..., None], 0)
    out = out[..., :head_dim].to(out_dtype)
    return out, (_lse(qt, m, l, seen) if return_lse else None)


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


# ---- the sm89 path: INT8 QK^T + FP8 E4M3 PV ---------------------------------------------

@dataclass
class QuantizedFp8:
    """The sm89 kernels' temporaries, in their layouts (``QuantParams`` in ``_abi.py``)."""

    q_int8: torch.Tensor                    # int8 (B, Hq, q_blocks*128, D_pad)
    q_scale: torch.Tensor                   # fp32 (B, Hq, q_blocks, 64)
    k_int8: torch.Tensor                    # int8 (B, Hkv, k_blocks*64, D_pad)
    k_scale: torch.Tensor                   # fp32 (B, Hkv, k_blocks, 4)
    v_fp8: torch.Tensor                     # uint8 E4M3 codes (B, Hkv, k_blocks, D_pad, 64)
    v_scale: torch.Tensor                   # fp32 (B, Hkv, D_pad)
    v_mean: Optional[torch.Tensor]          # fp32 (B, Hkv, D_pad) or None (no V smoothing)
    k_mean: Optional[torch.Tensor]          # fp32 (B, Hkv, D_pad) or None
    lse_correction: Optional[torch.Tensor]  # fp32 (B, Hq, Sq) or None


def e4m3_rn_satfinite(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest E4M3 value, ties to even, saturated to +-448, returned as fp32: what
    ``cvt.rn.satfinite.e4m3x2.f32`` computes (NaN stays NaN).

    E4M3 has 3 mantissa bits: a value with leading bit ``2^E`` (E >= -6) lies on a grid of
    ``2^(E-3)``; below the smallest normal ``2^-6`` the subnormals share the grid ``2^-9``.
    Division by the grid step is exact, so ``torch.round`` (half to even) rounds exactly.
    Written out rather than taken from ``x.to(torch.float8_e4m3fn)``, whose out-of-range
    behaviour has changed between torch versions (a CPU test checks the two agree in range).
    """
    x = torch.clamp(x.float(), -E4M3_MAX, E4M3_MAX)
    _, exp = torch.frexp(x)                       # x = f * 2^exp, 0.5 <= |f| < 1
    step = torch.exp2((exp - 4).clamp(min=-9).float())
    return torch.round(x / step) * step


def e4m3_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> E4M3 codes (uint8: sign, 4 exponent bits with bias 7, 3 mantissa bits),
    rounded as ``e4m3_rn_satfinite``; the cast of an exact E4M3 value is exact."""
    return e4m3_rn_satfinite(x).to(torch.float8_e4m3fn).view(torch.uint8)


def e4m3_values(codes: torch.Tensor) -> torch.Tensor:
    """E4M3 codes (uint8) -> fp32 values (exact)."""
    return codes.view(torch.float8_e4m3fn).float()


def fp8_pv_key_slot(p):
    """Slot of key ``p`` (0..63 of a block) in the FP8 V^T tile (``fp8_pv_key_slot`` in
    kernels/common/quantize.cuh): an e4m3 ``mma.m16n8k32`` A fragment gives lane c the k
    indices 4c..4c+3 and 16+4c..16+4c+3 of a 32-key step, while the score accumulator gives
    it keys 8j+2c, 8j+2c+1 of each 8-key tile j; storing V's keys in this order lets the score
    registers serve as the A fragment as they stand. The sum over keys does not depend on it."""
    step, half, j, c, e = p // 32, (p % 32) // 16, (p % 16) // 8, (p % 8) // 2, p % 2
    return 32 * step + 16 * half + 4 * c + 2 * j + e


_KEY_SLOTS = [fp8_pv_key_slot(p) for p in range(K_BLOCK)]


def v_scale_max(pv_accum: str) -> float:
    """The E4M3 value |V - mean| maps to: 448, or 2.25 for "fp32+fp16" (no fp16 overflow)."""
    try:
        return PV_ACCUM_FP8[pv_accum]
    except KeyError:
        raise ValueError(f"unknown FP8 pv accumulation {pv_accum!r}") from None


def channel_stats(x: torch.Tensor, head_dim_padded: int, *, mean=True, minmax=False, sample=0):
    """``sm89_channel_stats``: per-channel (mean, min, max) over tokens (over ``sample`` of
    them when the sequence is longer, as the kernel's ``sample_tokens``; 0: all), fp32
    (B, H, D_pad) each (None where not asked for), padded columns 0."""
    x = _sampled_rows(x, sample)
    B, H, S, D = x.shape
    lo = hi = None
    if minmax:
        lo = torch.zeros((B, H, head_dim_padded), dtype=torch.float32, device=x.device)
        hi = torch.zeros_like(lo)
        lo[:, :, :D] = x.float().amin(dim=2)
        hi[:, :, :D] = x.float().amax(dim=2)
    return (k_channel_mean(x, head_dim_padded, sample=0) if mean else None), lo, hi


# V's per-channel E4M3 scale in the modes where V spans E4M3's whole range (scale_max 448): the
# channel's amax of |V - mean| over V_AMAX_SAMPLE_TOKENS sampled tokens (sampled_tokens; the
# mean of the same sample with smooth_v), times V_AMAX_MARGIN. E4M3 spaces its values alike over
# its whole normal range [2^-6, 448], so a scale up to 16x wider than needed moves only values
# below ~1e-4 of the channel's amax into subnormals (the outlier input's rel-L1 moves within
# the +-1% that any change of the scales' mantissas gives), and the statistics no longer read all
# of V. A head where some code still saturates (+-448: a value at >= 432/448 of its bound) is
# quantized again from exact statistics (the kernels' requantize launch): nothing is clipped.
# Exact statistics stay where a margin would cost accuracy: "fp32+fp16" (its V spans only
# [0, 2.25], 7 octaves above E4M3's subnormals) and smooth_v (V is centred on its mean: a
# sample's mean leaves a bias that, in "fp32" mode, the FP8 wgmma's reduced-precision sums over
# all keys turned into 6.7e-3 rel-L1 against the emulator instead of 1.0e-3, H100, NOTES.md).
V_AMAX_SAMPLE_TOKENS = 256
V_AMAX_MARGIN = 16.0
_FLT_MAX = 3.4028234663852886e38


def v_amax_margin(pv_accum: str, smooth_v: bool) -> float:
    """The margin V's scales take (QuantParams.v_amax_margin): 0 = exact statistics."""
    return V_AMAX_MARGIN if v_scale_max(pv_accum) == E4M3_MAX and not smooth_v else 0.0


def _channel_amax(lo, hi, mu):
    return torch.maximum(hi - mu, mu - lo).clamp(min=0)   # channel_amax in quantize.cuh


def _v_scaled(v: torch.Tensor, mu: torch.Tensor, amax: torch.Tensor, scale_max: float,
              head_dim_padded: int) -> torch.Tensor:
    """(V - mu) * (scale_max / amax) in fp32, (B, H, whole 64-key blocks, D_pad), padding +0."""
    B, H, S, D = v.shape
    smax = _f32(scale_max, v.device)
    inv = torch.where(amax > 0, smax / amax, _f32(0.0, v.device))
    x = torch.zeros((B, H, -(-S // K_BLOCK) * K_BLOCK, head_dim_padded), dtype=torch.float32,
                    device=v.device)
    x[:, :, :S, :D] = (v.float() - mu[:, :, None, :D]) * inv[:, :, None, :D]
    return x


def v_channel_amax(v: torch.Tensor, mean: Optional[torch.Tensor], vmin: torch.Tensor,
                   vmax: torch.Tensor, scale_max: float, head_dim_padded: int,
                   margin: float = 0.0):
    """The amax each channel's E4M3 scale is set from, (B, H, D_pad) fp32, and the heads that
    took exact statistics, (B, H) bool. ``margin`` 0: (vmin, vmax) are exact and give it. Else
    they are of the V_AMAX_SAMPLE_TOKENS sample and the amax is ``margin`` times theirs (theirs
    alone where that overflows fp32), except in a head where a code quantized with that bound
    saturates (magnitude 0x7e, i.e. 448, or 0x7f, NaN): there every channel takes the exact
    amax (kernels/common/quantize.cuh: the V jobs flag such blocks, requantize_v_heads redoes
    their heads)."""
    mu = mean if mean is not None else torch.zeros_like(vmin)
    amax = _channel_amax(vmin, vmax, mu)
    if margin <= 0:
        return amax, torch.zeros(amax.shape[:2], dtype=torch.bool, device=amax.device)
    bound = amax * _f32(margin, amax.device)
    bound = torch.where(bound <= _FLT_MAX, bound, amax)
    codes = e4m3_bits(_v_scaled(v, mu, bound, scale_max, head_dim_padded))
    saturated = ((codes & 0x7F) >= 0x7E).flatten(2).any(dim=-1)
    if not saturated.any():  # the usual case: no head needs the exact statistics
        return bound, saturated
    _, lo, hi = channel_stats(v, head_dim_padded, mean=False, minmax=True)
    return torch.where(saturated[..., None], _channel_amax(lo, hi, mu), bound), saturated


def quantize_v_fp8(v: torch.Tensor, mean: Optional[torch.Tensor], vmin: torch.Tensor,
                   vmax: torch.Tensor, scale_max: float, head_dim_padded: int,
                   margin: float = 0.0):
    """Step 5 of the sm89 path: V (minus ``mean`` when smoothing) to E4M3 per channel, the
    scale set by ``v_channel_amax`` (``margin`` > 0: vmin / vmax are of the sample).

    Returns ``(v_fp8, v_scale)``: E4M3 codes in the kernels' transposed, key-permuted tile
    layout (B, H, k_blocks, D_pad, 64), key ``p`` of a block at slot ``fp8_pv_key_slot(p)``,
    padded keys and channels +0; and ``v_scale = amax / scale_max`` (B, H, D_pad) fp32.
    """
    B, H, S, D = v.shape
    blocks = -(-S // K_BLOCK)
    mu = mean if mean is not None else torch.zeros_like(vmin)
    amax, _ = v_channel_amax(v, mean, vmin, vmax, scale_max, head_dim_padded, margin)
    x = _v_scaled(v, mu, amax, scale_max, head_dim_padded)
    keys_major = e4m3_bits(x).view(B, H, blocks, K_BLOCK, head_dim_padded).transpose(-1, -2)
    tile = torch.empty_like(keys_major)
    tile[..., _KEY_SLOTS] = keys_major
    return tile.contiguous(), amax / _f32(scale_max, v.device)


def v_fp8_key_major(v_fp8: torch.Tensor, kb: int) -> torch.Tensor:
    """Key block ``kb`` of an FP8 V^T tile as fp32 values in key order, (B, H, 64, D_pad)."""
    return e4m3_values(v_fp8[:, :, kb][..., _KEY_SLOTS]).transpose(-1, -2)


def _v_fp8_step(v_fp8: torch.Tensor, start: int, key_step: int) -> torch.Tensor:
    """Keys ``start .. start+key_step`` of an FP8 V^T tile as fp32 values in key order,
    (B, H, key_step, D_pad): the step's 64-key tiles in turn, zero rows past the last tile."""
    first, blocks = start // K_BLOCK, v_fp8.shape[2]
    tiles = [v_fp8_key_major(v_fp8, kb)
             for kb in range(first, min(blocks, first + key_step // K_BLOCK))]
    return _rows_padded(torch.cat(tiles, dim=2) if len(tiles) > 1 else tiles[0], 0, key_step)


def quantize_fp8(q, k, v, *, sm_scale: float, granularity="per_thread", smooth_k=True,
                 smooth_v=False, pv_accum="fp32+fp16", want_lse_correction=False
                 ) -> QuantizedFp8:
    """Steps 1-5 of the sm89 path on (B, H, S, D) views: mirrors the channel-stats (K mean;
    V min/max and mean) and the fused quantize kernels."""
    D = q.shape[-1]
    d_pad = padded_head_dim(D)
    s2 = _f32(sm_scale * _LOG2E, q.device)
    k_mean = k_channel_mean(k, d_pad) if smooth_k else None
    q_i8, q_scale = quantize_q(q, s2, granularity, d_pad)
    k_i8, k_scale = quantize_k(k, k_mean, granularity, d_pad)
    margin = v_amax_margin(pv_accum, smooth_v)
    v_mean, v_min, v_max = channel_stats(v, d_pad, mean=smooth_v, minmax=True,
                                         sample=V_AMAX_SAMPLE_TOKENS if margin else 0)
    v8, v_scale = quantize_v_fp8(v, v_mean, v_min, v_max, v_scale_max(pv_accum), d_pad, margin)
    corr = lse_correction(q, k_mean, sm_scale) if (smooth_k and want_lse_correction) else None
    return QuantizedFp8(q_i8, q_scale, k_i8, k_scale, v8, v_scale, v_mean, k_mean, corr)


def _block_pv_fp8(p8: torch.Tensor, v8: torch.Tensor, pv_accum: str) -> torch.Tensor:
    """One key block's P8 @ V8 (E4M3 values as fp32) as fp32, accumulated as the mode does.

    E4M3 products have at most 8 significant bits, so float64 sums of a block are exact.
    """
    if pv_accum in ("fp32", "fp32+fp32"):
        return torch.matmul(p8.double(), v8.double()).float()
    if pv_accum == "fp32+fp16":
        acc = torch.zeros(p8.shape[:-1] + v8.shape[-1:], dtype=torch.float16, device=p8.device)
        for c in range(0, p8.shape[-1], PV_K_STEP_FP8):
            step = torch.matmul(p8[..., c:c + PV_K_STEP_FP8].double(),
                                v8[..., c:c + PV_K_STEP_FP8, :].double())
            acc = (acc.double() + step).half()     # inf past 65504, as the fp16 MMA
        return acc.float()
    raise ValueError(f"unknown FP8 pv accumulation {pv_accum!r}")


def attention_fp8(qt: QuantizedFp8, *, seq_q: int, seq_k: int, head_dim: int, causal=False,
                  causal_offset: int = 0, pv_accum="fp32+fp16", out_dtype=torch.float16,
                  return_lse=False, key_step: int = K_BLOCK, row_sums: str = "fp32"):
    """Step 6 of the FP8-PV paths over quantized operands, ``key_step`` keys per main-loop step
    (64: sm89, 128: sm90): ``p = exp2(s - m + log2 448)`` (fp32), ``p8 = E4M3(p)``, row sums
    from fp32 ``p`` (``row_sums="fp32"``, sm89) or from ``p8`` (``"e4m3"``, sm90: each step's
    sum exact, rounded once), ``o = o*alpha + p8 @ v8`` in the mode's accumulation; out =
    ``o * (1/l) * v_scale + v_mean`` (zeros for rows with no visible key) in ``out_dtype``,
    (B, Hq, Sq, head_dim); LSE natural-log fp32 (B, Hq, Sq) or None."""
    if key_step <= 0 or key_step % K_BLOCK:
        raise ValueError(f"key_step must be a positive multiple of the {K_BLOCK}-key V tiles; "
                         f"got {key_step}")
    if row_sums not in ("fp32", "e4m3"):
        raise ValueError(f"row_sums must be 'fp32' or 'e4m3'; got {row_sums!r}")
    m, l, o = _running_state(qt, seq_q)
    for start, kv_head, s in _score_blocks(qt, seq_q, seq_k, causal, causal_offset, key_step):
        l_before = l
        m, l, alpha, p = _softmax_step(m, l, s, LOG2_P_SCALE_FP8)
        p8 = e4m3_rn_satfinite(p)
        if row_sums == "e4m3":
            l = l_before * alpha + p8.double().sum(dim=-1).float()
        v8 = _v_fp8_step(qt.v_fp8, start, key_step).index_select(1, kv_head)
        o = o * alpha[..., None] + _block_pv_fp8(p8, v8, pv_accum)
    Hq, Hkv = qt.q_int8.shape[1], qt.k_int8.shape[1]
    kv_head = torch.arange(Hq, device=o.device) // (Hq // Hkv)
    seen = l > 0
    inv = torch.where(seen, 1 / torch.where(seen, l, 1), _f32(0.0, o.device))
    out = o * inv[..., None] * qt.v_scale.index_select(1, kv_head)[:, :, None, :]
    if qt.v_mean is not None:   # not for rows with no visible key: those stay 0
        mean = qt.v_mean.index_select(1, kv_head)[:, :, None, :]
        out = torch.where(seen[..., None], out + mean, out)
    out = out[..., :head_dim].to(out_dtype)
    lse = _lse(qt, m, l, seen, LOG2_P_SCALE_FP8) if return_lse else None
    return out, lse


def _fp8_path(q, k, v, *, tensor_layout, is_causal, sm_scale, qk_quant_gran, pv_accum_dtype,
              smooth_k, smooth_v, return_lse, causal_offset, key_step, row_sums):
    """The whole FP8-PV path (sm89: 64-key steps, sm90: 128) on any device."""
    qh, kh, vh = (to_hnd(x, tensor_layout) for x in (q, k, v))
    D = qh.shape[-1]
    Sq, Sk = qh.shape[2], kh.shape[2]
    scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    qt = quantize_fp8(qh, kh, vh, sm_scale=scale, granularity=qk_quant_gran, smooth_k=smooth_k,
                      smooth_v=smooth_v, pv_accum=pv_accum_dtype, want_lse_correction=return_lse)
    out, lse = attention_fp8(qt, seq_q=Sq, seq_k=Sk, head_dim=D, causal=is_causal,
                             causal_offset=(Sk - Sq) if causal_offset is None else causal_offset,
                             pv_accum=pv_accum_dtype, out_dtype=q.dtype, return_lse=return_lse,
                             key_step=key_step, row_sums=row_sums)
    if tensor_layout == "NHD":
        out = out.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out


def sm89_attention(q, k, v, *, tensor_layout="HND", is_causal=False, sm_scale=None,
                   qk_quant_gran="per_thread", pv_accum_dtype="fp32+fp16", smooth_k=True,
                   smooth_v=False, return_lse=False, causal_offset=None):
    """The whole sm89 path on any device: same arguments and result as
    ``sageattn_qk_int8_pv_fp8_cuda`` (output in the input dtype and layout, contiguous; LSE
    fp32 (B, Hq, Sq)). ``causal_offset`` defaults to ``Sk - Sq`` (bottom-right)."""
    return _fp8_path(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
                     qk_quant_gran=qk_quant_gran, pv_accum_dtype=pv_accum_dtype,
                     smooth_k=smooth_k, smooth_v=smooth_v, return_lse=return_lse,
                     causal_offset=causal_offset, key_step=K_BLOCK, row_sums="fp32")


# ---- the sm90 path: the sm89 path with 128-key wgmma steps ----------------------------------

def sm90_attention(q, k, v, *, tensor_layout="HND", is_causal=False, sm_scale=None,
                   qk_quant_gran="per_thread", pv_accum_dtype="fp32+fp32", smooth_k=True,
                   smooth_v=False, return_lse=False, causal_offset=None):
    """The whole sm90 path on any device: same arguments and result as
    ``sageattn_qk_int8_pv_fp8_cuda_sm90``. Quantization is the sm89 path's (V scaled to 448);
    the main loop steps over ``SM90_KEY_STEP`` (128) keys and the row sums are of the E4M3 P.
    ``pv_accum_dtype``: "fp32+fp32" (each step's PV product from zero, added into the fp32
    output) or "fp32"; both emulate alike (a step's sum is exact here; see the module notes)."""
    if pv_accum_dtype not in PV_ACCUM_SM90:
        raise ValueError(f"pv_accum_dtype must be one of {', '.join(map(repr, PV_ACCUM_SM90))} "
                         f"on the sm90 path; got {pv_accum_dtype!r}")
    return _fp8_path(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
                     qk_quant_gran=qk_quant_gran, pv_accum_dtype=pv_accum_dtype,
                     smooth_k=smooth_k, smooth_v=smooth_v, return_lse=return_lse,
                     causal_offset=causal_offset, key_step=SM90_KEY_STEP, row_sums="e4m3")
