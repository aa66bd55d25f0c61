"""Sequence parallelism with sageattn's LSE: attention over K/V split in two parts, merged.

Ring attention and other sequence-parallel schemes give each rank a slice of the keys and
values. Each rank computes its partial attention with ``return_lse=True``; the LSE (natural
log, fp32, (B, H, Sq)) is ``log sum_j exp(s_ij)`` over that rank's keys, exact for the
unsmoothed scores (sageattn adds back the K-smoothing term, so parts smoothed with different
K means merge correctly). The full result is the LSE-weighted combination:

    lse = logaddexp(lse_a, lse_b)
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

Run ``python examples/lse_merge.py`` on a CUDA GPU: it splits K/V in two, merges, and prints
the errors of the merged result and of one full call against an fp32 reference.
"""

import argparse

import torch

import sageattn
from sageattn import reference


def merge(out_a, lse_a, out_b, lse_b):
    """Merge two partial attentions over disjoint key sets (HND outputs, fp32 LSEs).

    Returns the merged output (``out_a``'s dtype) and LSE. A row that sees no key in
    either part (LSE ``-inf`` in both) stays zero with LSE ``-inf``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    seen = torch.isfinite(lse)
    shift = torch.where(seen, lse, 0.0)
    weight_a = torch.where(seen, torch.exp(lse_a - shift), 0.0)[..., None]
    weight_b = torch.where(seen, torch.exp(lse_b - shift), 0.0)[..., None]
    out = weight_a * out_a.float() + weight_b * out_b.float()
    return out.to(out_a.dtype), lse


def split_kv_attention(q, k, v, attend=sageattn.sageattn, split=None):
    """Attention of ``q`` over (B, H, S, D) ``k``/``v`` computed as two parts split at
    ``split`` (default: half) along the keys, then merged; returns (out, lse)."""
    Sk = k.shape[2]
    split = Sk // 2 if split is None else split
    out_a, lse_a = attend(q, k[:, :, :split], v[:, :, :split], return_lse=True)
    out_b, lse_b = attend(q, k[:, :, split:], v[:, :, split:], return_lse=True)
    return merge(out_a, lse_a, out_b, lse_b)


def make_inputs(B=1, H=8, Hkv=None, Sq=4096, Sk=None, D=128, dtype=torch.bfloat16,
                device="cuda", seed=0):
    """q, k, v ~ N(0, 1), K plus a per-channel bias 4*N(0, 1) (as in real activations): each
    half of K then has its own channel means, which only a smoothing-corrected LSE survives."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    Hkv, Sk = Hkv or H, Sk or Sq
    q = torch.randn(B, H, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Sk, D, generator=g) + 4 * torch.randn(B, Hkv, 1, D, generator=g)
    v = torch.randn(B, Hkv, Sk, D, generator=g)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def main(attend=sageattn.sageattn, device="cuda", verbose=True, **shape) -> dict:
    """Split, merge, compare; returns the errors (rel-L1 of outputs, max |LSE| differences)."""
    q, k, v = make_inputs(device=device, **shape)
    merged, merged_lse = split_kv_attention(q, k, v, attend)
    full, full_lse = attend(q, k, v, return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True)
    errors = {
        "merged_vs_ref": reference.compare(merged, ref)["rel_l1"],
        "full_vs_ref": reference.compare(full, ref)["rel_l1"],
        "merged_vs_full": reference.compare(merged, full)["rel_l1"],
        "lse_merged_vs_ref": (merged_lse - ref_lse).abs().max().item(),
        "lse_merged_vs_full": (merged_lse - full_lse).abs().max().item(),
    }
    if verbose:
        print(f"q {tuple(q.shape)}, k/v {tuple(k.shape)} {q.dtype}, K/V split in two halves")
        for name, value in errors.items():
            print(f"  {name:>20}: {value:.6f}")
    return errors


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    main(Sq=args.seq, H=args.heads, D=args.head_dim)
