"""The sm120 FP4 path (SageAttention3, NVFP4 microscaling), step by step, in torch (CPU or GPU).

Follows "The sm120 FP4 path, exactly" in docs/ARCHITECTURE.md. NVFP4: values E2M1 (the grid
0, 0.5, 1, 1.5, 2, 3, 4, 6 with a sign), one E4M3 scale per 16 elements, ``scale = E4M3(amax/6)``
and ``code = E2M1(x / scale)``, both rounded to nearest-even and saturated (what
``cvt.rn.satfinite.e4m3x2.f32`` and ``cvt.rn.satfinite.e2m1x2.f32`` compute).

* Q: per-128-token block mean removed (``per_block_mean``; else one mean over the sequence),
  then FP4 per 16 channels. The scores get ``dS = q_mean . K^`` back (fp32), so Q smoothing
  does not change them; K^ is the dequantized FP4 K.
* K: channel mean over tokens removed (``smooth_k``), then FP4 per 16 channels.
* V: FP4 per 16 tokens of one channel, in the V^T tile whose 64 key slots per block follow
  ``fp4_pv_key_slot`` (the score registers are then the A fragment of the PV MMA as they stand,
  and a scale group is 16 slots, i.e. the 16 keys one pair of lanes holds).
* Scores ``s = (Q^ K^T + dS) * sm_scale * log2(e)`` (fp32), base-2 online softmax over 64-key
  blocks; ``p = exp2(s - m + log2(448*6))`` (the per-row factor), row sums from fp32 ``p``;
  P to FP4 per 16 slots (second level: an E4M3 scale per 16 keys); ``o = o*alpha + P^ V^``
  with the block's product summed on its own in fp32 (two-level accumulation).

Both MMAs are the PTX ISA's ``mma ... kind::mxf4nvf4.block_scale.scale_vec::4X.m16n8k64``:
``D = C + sum_c SF_A[r][c] SF_B[c][n] sum_{k in chunk c} A[r][k] B[k][n]`` over 4 chunks of
16. Products of E2M1 values and of E4M3 scales are exact, so the emulator sums them in float64
and rounds once to fp32; the kernels (tensor core or the sm_90 software MMA) round partial sums
in fp32, which is where the two can differ (fp32 rounding), plus ``ex2.approx`` in the kernels'
softmax (a P value within ~2 ulp of an E2M1 midpoint can take the neighbouring code). Given the
same channel means (``k_mean``, ``q_mean`` arguments) every FP4 and E4M3 code is identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .emulate import (K_BLOCK, Q_BLOCK, _f32, _lse, _softmax_step, e4m3_bits, e4m3_rn_satfinite,
                      e4m3_values, k_channel_mean, lse_correction, padded_head_dim)
from .reference import to_hnd

__all__ = [
    "QuantizedFp4", "E2M1_MAX", "SF_GROUP", "LOG2_P_SCALE_FP4", "E2M1_VALUES", "e2m1_bits",
    "e2m1_values", "nvfp4_quantize", "nvfp4_dequantize", "fp4_pv_key_slot", "q_block_mean",
    "quantize_fp4", "dequantized", "attention_fp4", "sm120_attention",
]

E2M1_MAX = 6.0
SF_GROUP = 16     # elements per E4M3 scale
# P's first level: the row max maps to 448 * 6 (E4M3 max times E2M1 max), so its per-16 E4M3
# scale (amax / 6) reaches 448 and the FP4 grid is used in full.
LOG2_P_SCALE_FP4 = math.log2(448.0 * 6.0)
# E2M1 code (bits 0..2; bit 3 is the sign) -> value.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> E2M1 codes (uint8 0..15: sign bit 3, exponent bits 1..2 with bias 1, mantissa
    bit 0), round to nearest, ties to even mantissa, saturated to +-6; the sign of zero kept.

    On the grid ``2^(E-1)`` for |x| in [2^E, 2^(E+1)) (E >= 1) and 0.5 below 2 (subnormal 0.5),
    so ``round(|x| / step) * step`` rounds exactly (division by a power of two is exact).
    """
    x = x.float()
    a = torch.clamp(x.abs(), max=E2M1_MAX)
    _, exp = torch.frexp(a)                         # a = f * 2^exp, 0.5 <= f < 1
    step = torch.exp2((exp - 2).clamp(min=-1).float())
    r = torch.round(a / step) * step                # half to even on the step grid
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    code = torch.searchsorted(table, r.contiguous()).to(torch.uint8)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, low nibble) -> fp32 values (exact)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def nvfp4_quantize(x: torch.Tensor):
    """fp32 (..., n) with n % 16 == 0 -> (codes uint8 (..., n), scale codes uint8 E4M3
    (..., n/16)). ``scale = E4M3(amax / 6)`` (fp32 division, then rounded), ``code =
    E2M1(x / scale)``; a group whose scale is 0 (amax below E4M3's range) is all +-0."""
    *lead, n = x.shape
    g = x.float().reshape(*lead, n // SF_GROUP, SF_GROUP)
    amax = g.abs().amax(dim=-1, keepdim=True)
    scale = e4m3_rn_satfinite(amax / _f32(E2M1_MAX, x.device))
    safe = torch.where(scale > 0, scale, _f32(1.0, x.device))
    codes = e2m1_bits(torch.where(scale > 0, g / safe, g * 0))
    return codes.reshape(*lead, n), e4m3_bits(scale.squeeze(-1))


def nvfp4_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of ``nvfp4_quantize``: float64 values (exact) of shape codes.shape."""
    *lead, n = codes.shape
    vals = e2m1_values(codes).double().reshape(*lead, n // SF_GROUP, SF_GROUP)
    return (vals * e4m3_values(scales).double()[..., None]).reshape(*lead, n)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, element 2i in the low nibble (the MMA operand order)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def fp4_pv_key_slot(p):
    """Slot of key ``p`` (0..63 of a block) in the FP4 V^T tile (``fp4_pv_key_slot`` in
    kernels/sm120/quantize_fp4.cuh). The score accumulator gives lane t of a quad keys 8j+2t,
    8j+2t+1 (j = 0..7); the m16n8k64 FP4 A fragment gives it k = 8t..8t+7 (a0/a1) and
    32+8t..32+8t+7 (a2/a3). Key 8j+2t+e sits at slot 32*(j//4) + 8t + 2*(j%4) + e, so the
    16-slot scale chunk c holds the keys of lanes 2(c%2), 2(c%2)+1 in tiles 4(c//2)..+3."""
    j, t, e = p // 8, (p % 8) // 2, p % 2
    return 32 * (j // 4) + 8 * t + 2 * (j % 4) + e


_KEY_SLOTS = [fp4_pv_key_slot(p) for p in range(K_BLOCK)]


@dataclass
class QuantizedFp4:
    """The sm120 kernels' temporaries, in their layouts (``QuantFp4Params`` in ``_abi.py``)."""

    q_fp4: torch.Tensor                     # uint8 packed (B, Hq, q_blocks*128, D_pad/2)
    q_sf: torch.Tensor                      # uint8 E4M3 (B, Hq, q_blocks*128, D_pad/16)
    q_mean: torch.Tensor                    # fp32 (B, Hq, q_blocks, D_pad)
    k_fp4: torch.Tensor                     # uint8 packed (B, Hkv, k_blocks*64, D_pad/2)
    k_sf: torch.Tensor                      # uint8 E4M3 (B, Hkv, k_blocks*64, D_pad/16)
    v_fp4: torch.Tensor                     # uint8 packed V^T (B, Hkv, k_blocks, D_pad, 32), slots
    v_sf: torch.Tensor                      # uint8 E4M3 (B, Hkv, k_blocks, D_pad, 4)
    k_mean: Optional[torch.Tensor]          # fp32 (B, Hkv, D_pad) or None
    lse_correction: Optional[torch.Tensor]  # fp32 (B, Hq, Sq) or None


def q_block_mean(q: torch.Tensor, head_dim_padded: int, per_block_mean: bool = True):
    """Q's channel mean per 128-token block (over the block's real rows), or over the whole
    sequence repeated per block: fp32 (B, Hq, q_blocks, D_pad), padded channels 0."""
    B, H, S, D = q.shape
    blocks = -(-S // Q_BLOCK)
    out = torch.zeros((B, H, blocks, head_dim_padded), dtype=torch.float32, device=q.device)
    if not per_block_mean:
        out[..., :D] = k_channel_mean(q, head_dim_padded, sample=0)[:, :, None, :D]  # exact
        return out
    x = torch.zeros((B, H, blocks * Q_BLOCK, D), dtype=torch.float64, device=q.device)
    x[:, :, :S] = q.double()
    rows = torch.clamp(S - torch.arange(blocks, device=q.device) * Q_BLOCK, max=Q_BLOCK)
    sums = x.view(B, H, blocks, Q_BLOCK, D).sum(dim=3).float()
    out[..., :D] = sums / rows.float()[:, None]
    return out


def _padded(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    B, H, S, D = x.shape
    out = torch.zeros((B, H, rows, cols), dtype=torch.float32, device=x.device)
    out[:, :, :S, :D] = x
    return out


def quantize_fp4(q, k, v, *, sm_scale: float, per_block_mean=True, smooth_k=True,
                 want_lse_correction=False, k_mean=None, q_mean=None) -> QuantizedFp4:
    """Quantization steps of the sm120 path on (B, H, S, D) views. ``k_mean`` / ``q_mean``
    (the channel-stats and quantize kernels' own means) replace the emulator's, so the codes
    can be compared with the kernels' bit for bit."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    d_pad = padded_head_dim(D)
    q_blocks, k_blocks = -(-Sq // Q_BLOCK), -(-Sk // K_BLOCK)
    if smooth_k and k_mean is None:
        k_mean = k_channel_mean(k, d_pad)
    if not smooth_k:
        k_mean = None
    if q_mean is None:
        q_mean = q_block_mean(q, d_pad, per_block_mean)
    row_mean = q_mean[:, :, torch.arange(Sq, device=q.device) // Q_BLOCK, :D]
    q_codes, q_sf = nvfp4_quantize(_padded(q.float() - row_mean, q_blocks * Q_BLOCK, d_pad))
    ks = k.float() if k_mean is None else k.float() - k_mean[:, :, None, :D]
    k_codes, k_sf = nvfp4_quantize(_padded(ks, k_blocks * K_BLOCK, d_pad))
    vt = _padded(v.float(), k_blocks * K_BLOCK, d_pad).view(B, Hkv, k_blocks, K_BLOCK, d_pad)
    tile = torch.empty_like(vt.transpose(-1, -2))
    tile[..., _KEY_SLOTS] = vt.transpose(-1, -2)
    v_codes, v_sf = nvfp4_quantize(tile)
    corr = lse_correction(q, k_mean, sm_scale) if (k_mean is not None and want_lse_correction) \
        else None
    return QuantizedFp4(_pack(q_codes), q_sf, q_mean, _pack(k_codes), k_sf, _pack(v_codes), v_sf,
                        k_mean, corr)


def dequantized(qt: QuantizedFp4):
    """(Q^, K^, V^) as float64: (B, Hq, rows, D_pad), (B, Hkv, keys, D_pad) and V^T in slot
    order (B, Hkv, k_blocks, D_pad, 64)."""
    return (nvfp4_dequantize(_unpack(qt.q_fp4), qt.q_sf),
            nvfp4_dequantize(_unpack(qt.k_fp4), qt.k_sf),
            nvfp4_dequantize(_unpack(qt.v_fp4), qt.v_sf))


def _p_fp4(p: torch.Tensor) -> torch.Tensor:
    """P's second level: fp32 (..., 64 keys) -> float64 dequantized FP4 values in slot order."""
    slots = torch.empty_like(p)
    slots[..., _KEY_SLOTS] = p
    return nvfp4_dequantize(*nvfp4_quantize(slots))


def attention_fp4(qt: QuantizedFp4, *, seq_q: int, seq_k: int, head_dim: int, sm_scale: float,
                  causal=False, causal_offset: int = 0, out_dtype=torch.float16,
                  return_lse=False):
    """The attention kernel's steps over quantized operands: returns out (B, Hq, Sq, head_dim)
    in ``out_dtype`` and the natural-log LSE (B, Hq, Sq) fp32 (or None)."""
    qh, kh, vt = dequantized(qt)
    B, Hq, _, d_pad = qh.shape
    Hkv = kh.shape[1]
    dev = qh.device
    kv_head = torch.arange(Hq, device=dev) // (Hq // Hkv)
    q = qh[:, :, :seq_q]
    row_mean = qt.q_mean[:, :, torch.arange(seq_q, device=dev) // Q_BLOCK].double()
    s2 = _f32(sm_scale * math.log2(math.e), dev)
    rows = torch.arange(seq_q, device=dev)
    m = torch.full((B, Hq, seq_q), -math.inf, dtype=torch.float32, device=dev)
    l = torch.zeros((B, Hq, seq_q), dtype=torch.float32, device=dev)
    o = torch.zeros((B, Hq, seq_q, d_pad), dtype=torch.float32, device=dev)
    n_blocks = -(-seq_k // K_BLOCK)
    if causal:
        n_blocks = min(n_blocks, max(0, -(-(seq_q + causal_offset) // K_BLOCK)))
    for kb in range(n_blocks):
        keys = torch.arange(kb * K_BLOCK, (kb + 1) * K_BLOCK, device=dev)
        kblk = kh[:, :, kb * K_BLOCK:(kb + 1) * K_BLOCK].index_select(1, kv_head)
        dot = torch.matmul(q, kblk.transpose(-1, -2)).float()
        delta = torch.matmul(row_mean, kblk.transpose(-1, -2)).float()   # dS = q_mean . K^
        s = (dot + delta) * s2
        hidden = (keys >= seq_k)[None, :]
        if causal:
            hidden = hidden | (keys[None, :] > rows[:, None] + causal_offset)
        s = s.masked_fill(hidden, -math.inf)
        m, l, alpha, p = _softmax_step(m, l, s, LOG2_P_SCALE_FP4)
        vblk = vt[:, :, kb].index_select(1, kv_head).transpose(-1, -2)   # (B, Hq, 64 slots, D)
        o = o * alpha[..., None] + torch.matmul(_p_fp4(p), vblk).float()
    seen = l > 0
    inv = torch.where(seen, 1 / torch.where(seen, l, 1), _f32(0.0, dev))
    out = (o * inv[..., None])[..., :head_dim].to(out_dtype)
    lse = _lse(qt, m, l, seen, LOG2_P_SCALE_FP4) if return_lse else None
    return out, lse


def sm120_attention(q, k, v, *, tensor_layout="HND", is_causal=False, sm_scale=None,
                    per_block_mean=True, smooth_k=True, return_lse=False, causal_offset=None):
    """The whole sm120 FP4 path on any device: same arguments and result as
    ``sageattn3_blackwell`` (output in the input dtype and layout, contiguous; LSE fp32
    (B, Hq, Sq)). ``causal_offset`` defaults to ``Sk - Sq`` (bottom-right)."""
    qh, kh, vh = (to_hnd(x, tensor_layout) for x in (q, k, v))
    D = qh.shape[-1]
    Sq, Sk = qh.shape[2], kh.shape[2]
    scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    qt = quantize_fp4(qh, kh, vh, sm_scale=scale, per_block_mean=per_block_mean,
                      smooth_k=smooth_k, want_lse_correction=return_lse)
    out, lse = attention_fp4(qt, seq_q=Sq, seq_k=Sk, head_dim=D, sm_scale=scale,
                             causal=is_causal,
                             causal_offset=(Sk - Sq) if causal_offset is None else causal_offset,
                             out_dtype=q.dtype, return_lse=return_lse)
    if tensor_layout == "NHD":
        out = out.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out
