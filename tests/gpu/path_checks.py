"""Inputs and the per-call check shared by the per-path GPU tests (test_sm80.py, test_sm89.py,
test_sm90.py; test_sm120.py takes the inputs): one kernel call against its emulator (same
algorithm, step by step) and the exact fp32 reference, recorded in the error table and asserted."""

import os

import torch

from sageattn import reference

LENGTHS = (1, 63, 65, 127, 129, 1000, 4097)
LSE_VS_EMU = 2e-3                              # max |LSE_kernel - LSE_emulator|
LSE_VS_REF = 0.06                              # max |LSE_kernel - LSE_reference|


def make(B=1, H=2, Sq=256, Sk=None, D=128, dtype=torch.bfloat16, Hkv=None, outlier=True,
         seed=0, layout="HND", v_offset=0.0):
    """q, k, v ~ N(0, 1) on the GPU; ``outlier``: K plus a per-channel bias 4*N(0, 1);
    ``v_offset``: V plus a per-channel bias v_offset*N(0, 1) (what smooth_v removes)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    Sk, Hkv = Sk or Sq, Hkv or H
    q = torch.randn(B, H, Sq, D, generator=g, device="cuda")
    k = torch.randn(B, Hkv, Sk, D, generator=g, device="cuda")
    v = torch.randn(B, Hkv, Sk, D, generator=g, device="cuda")
    if outlier:
        k = k + 4 * torch.randn(B, Hkv, 1, D, generator=g, device="cuda")
    if v_offset:
        v = v + v_offset * torch.randn(B, Hkv, 1, D, generator=g, device="cuda")
    out = [x.to(dtype) for x in (q, k, v)]
    if layout == "NHD":
        out = [x.transpose(1, 2).contiguous() for x in out]
    return tuple(out)


def maybe_compiled(fn):
    """``fn``, or with SAGEATTN_TEST_TORCH_COMPILE=1 ``torch.compile(fn, fullgraph=True)`` (every
    checked call then runs compiled; the recompile limits are lifted for the test matrix)."""
    if os.environ.get("SAGEATTN_TEST_TORCH_COMPILE", "") in ("", "0"):
        return fn
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 100_000)
    return torch.compile(fn, fullgraph=True, dynamic=True)


def check_call(record, group, call, emulator, vs_emu, q, k, v, layout="HND", causal=False,
               gran="per_thread", acc="fp32+fp32", smooth_k=True, smooth_v=None, sm_scale=None,
               ref_margin=None, cos_margin=5e-5, lse_vs_emu=LSE_VS_EMU):
    """``call`` (the kernel's entry point) and ``emulator`` on one input against the fp32
    reference: inputs untouched, output contract, kernel within ``vs_emu`` (rel-L1) of the
    emulator and no worse than the emulator's own error plus ``ref_margin`` (default ``vs_emu``;
    cosine: ``cos_margin``), LSE within ``lse_vs_emu`` of the emulator's and LSE_VS_REF of the
    reference. ``smooth_v`` None: not passed (sm80 has none)."""
    kw = dict(tensor_layout=layout, is_causal=causal, sm_scale=sm_scale)
    cfg = dict(qk_quant_gran=gran, pv_accum_dtype=acc, smooth_k=smooth_k)
    if smooth_v is not None:
        cfg["smooth_v"] = smooth_v
    saved = [x.clone() for x in (q, k, v)]
    out, lse = call(q, k, v, return_lse=True, **cfg, **kw)
    assert all(torch.equal(a, b) for a, b in zip(saved, (q, k, v))), "inputs modified"
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert out.device == q.device and lse.dtype == torch.float32
    assert lse.shape == (out.shape[0], q.shape[1 if layout == "HND" else 2],
                         q.shape[2 if layout == "HND" else 1])
    emu, emu_lse = emulator(q, k, v, return_lse=True, **cfg, **kw)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    m, e, ve = reference.compare(out, ref), reference.compare(emu, ref), reference.compare(out, emu)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "LSE -inf rows differ"
    seen = torch.isfinite(ref_lse)
    lse_ref = (lse[seen] - ref_lse[seen]).abs().max().item() if seen.any() else 0.0
    lse_emu = (lse[seen] - emu_lse[seen]).abs().max().item() if seen.any() else 0.0
    record(group, rel_l1=m["rel_l1"], cos=m["cos"], emu_rel_l1=e["rel_l1"],
           vs_emu=ve["rel_l1"], lse_err=lse_ref)
    assert m["finite"] and torch.isfinite(lse[seen]).all(), "non-finite output"
    assert ve["rel_l1"] <= vs_emu, ("kernel vs emulator", ve)
    margin = vs_emu if ref_margin is None else ref_margin
    assert m["rel_l1"] <= e["rel_l1"] * 1.05 + margin, ("kernel vs reference", m, e)
    assert m["cos"] >= e["cos"] - cos_margin, ("kernel vs reference", m, e)
    assert lse_emu <= lse_vs_emu and lse_ref <= LSE_VS_REF, (lse_emu, lse_ref)
    return out, lse
