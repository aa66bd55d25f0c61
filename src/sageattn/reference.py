"""Exact attention in fp32 or fp64, pure torch (CPU or GPU): the yardstick for every path.

Same conventions as the quantized paths: GQA by head groups (query head ``h`` reads kv
head ``h // (Hq // Hkv)``), causal masking with an explicit offset (key ``j`` is visible to
query ``i`` iff ``j <= i + causal_offset``; the default offset ``Sk - Sq`` is the
bottom-right alignment ``sageattn`` uses), natural-log LSE, and rows that see no key
return zeros and LSE ``-inf``.
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["attention", "compare", "to_hnd"]


def to_hnd(x: torch.Tensor, tensor_layout: str) -> torch.Tensor:
    """A (B, H, S, D) view of a tensor in layout "HND" or "NHD" (no copy)."""
    if tensor_layout == "HND":
        return x
    if tensor_layout == "NHD":
        return x.transpose(1, 2)
    raise ValueError(f"tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")


@contextlib.contextmanager
def _exact_fp32_matmul():
    # TF32 would round the reference's own inputs to 10 mantissa bits; keep full fp32.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def attention(q, k, v, *, tensor_layout="HND", is_causal=False, sm_scale=None,
              causal_offset=None, return_lse=False, dtype=torch.float32, chunk=1024):
    """Exact softmax attention computed in ``dtype`` (float32 or float64).

    Returns the output in ``dtype`` and in the input layout, and with ``return_lse`` also
    the natural-log LSE ``(B, Hq, Sq)`` in ``dtype``. ``causal_offset`` defaults to
    ``Sk - Sq`` (bottom-right) when ``is_causal``. Query rows are processed ``chunk`` at a
    time so long sequences need O(chunk * Sk) memory per head.
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    qh, kh, vh = (to_hnd(x, tensor_layout) for x in (q, k, v))
    B, Hq, Sq, D = qh.shape
    Hkv, Sk = kh.shape[1], kh.shape[2]
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    if causal_offset is None:
        causal_offset = Sk - Sq
    kv_head = torch.arange(Hq, device=qh.device) // (Hq // Hkv)
    kf = kh.to(dtype).index_select(1, kv_head)
    vf = vh.to(dtype).index_select(1, kv_head)
    out = torch.empty((B, Hq, Sq, vh.shape[-1]), dtype=dtype, device=qh.device)
    lse = torch.empty((B, Hq, Sq), dtype=dtype, device=qh.device)
    keys = torch.arange(Sk, device=qh.device)
    with _exact_fp32_matmul():
        for start in range(0, Sq, chunk):
            stop = min(Sq, start + chunk)
            s = torch.matmul(qh[:, :, start:stop].to(dtype), kf.transpose(-1, -2)) * scale
            if is_causal:
                rows = torch.arange(start, stop, device=qh.device)
                hidden = keys[None, :] > rows[:, None] + causal_offset
                s = s.masked_fill(hidden, -math.inf)
            row_lse = torch.logsumexp(s, dim=-1)
            finite = torch.isfinite(row_lse)
            shift = row_lse.where(finite, 0)[..., None]
            p = torch.where(finite[..., None], torch.exp(s - shift), 0)
            out[:, :, start:stop] = torch.matmul(p, vf)
            lse[:, :, start:stop] = row_lse
    if tensor_layout == "NHD":
        out = out.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Error metrics of ``out`` against ``ref`` (computed in float64).

    rel_l1 = sum|out - ref| / sum|ref|; cos = cosine similarity of the flattened tensors;
    max_abs = max |out - ref|; finite = whether ``out`` holds no NaN/Inf. Cosine alone is
    blind to a uniform scale error, so tests check rel_l1 too.
    """
    o = out.detach().to(torch.float64).flatten()
    r = ref.detach().to(device=o.device, dtype=torch.float64).flatten()
    diff = (o - r).abs()
    denom = r.abs().sum()
    rel_l1 = (diff.sum() / denom).item() if denom > 0 else diff.sum().item()
    on, rn = o.norm(), r.norm()
    if on > 0 and rn > 0:
        cos = (torch.dot(o, r) / (on * rn)).item()
    else:
        cos = 1.0 if on == rn else 0.0
    return {
        "rel_l1": rel_l1,
        "cos": cos,
        "max_abs": diff.max().item() if diff.numel() else 0.0,
        "finite": bool(torch.isfinite(o).all().item()),
    }
