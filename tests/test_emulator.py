"""The sm80 emulator against the exact reference, analytic cases, and per-step host checks.

Bounds are set from measured errors (per_thread fp32 mode: rel-L1 0.008-0.012 on these
inputs) with a small margin, and every bound is shown to reject deliberately broken
variants of the emulator, so a passing run means something.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sageattn import emulate, reference

# (max rel-L1, min cos) vs the fp32 reference on fixed-seed inputs, per granularity.
TIGHT = {"per_thread": (0.0135, 0.99992), "per_warp": (0.015, 0.99988)}
# For freshly drawn inputs of any shape (hypothesis).
LOOSE = (0.02, 0.9998)
LSE_ATOL = 0.06


def make(B=1, H=2, Sq=256, Sk=None, D=128, dtype=torch.bfloat16, Hkv=None, outlier=False,
         row_spread=False, seed=0):
    """q, k, v ~ N(0, 1); ``outlier``: K plus a per-channel bias 4*N(0, 1); ``row_spread``:
    rows of q and keys of k scaled by log-normal factors (so scale groups differ)."""
    g = torch.Generator().manual_seed(seed)
    Sk, Hkv = Sk or Sq, Hkv or H
    q = torch.randn(B, H, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Sk, D, generator=g)
    v = torch.randn(B, Hkv, Sk, D, generator=g)
    if outlier:
        k = k + 4 * torch.randn(B, Hkv, 1, D, generator=g)
    if row_spread:
        q = q * torch.exp(torch.randn(B, H, Sq, 1, generator=g))
        k = k * torch.exp(0.5 * torch.randn(B, Hkv, Sk, 1, generator=g))
    return tuple(x.to(dtype) for x in (q, k, v))


def errors(q, k, v, causal=False, emulator=None, **kw):
    """Errors of an emulator (default: the sm80 path's) against the reference, plus LSE error."""
    emulator = emulator or emulate.sm80_attention
    out, lse = emulator(q, k, v, is_causal=causal, return_lse=True, **kw)
    ref, ref_lse = reference.attention(q, k, v, is_causal=causal, return_lse=True)
    m = reference.compare(out, ref)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    seen = torch.isfinite(ref_lse)
    m["lse_err"] = (lse[seen] - ref_lse[seen]).abs().max().item() if seen.any() else 0.0
    return m


def accurate(m, gran="per_thread", bounds=None):
    max_l1, min_cos = bounds or TIGHT[gran]
    return m["finite"] and m["rel_l1"] <= max_l1 and m["cos"] >= min_cos and \
        m["lse_err"] <= LSE_ATOL


# ---- accuracy against the reference ------------------------------------------------------

@pytest.mark.parametrize("gran", ["per_thread", "per_warp"])
@pytest.mark.parametrize("acc", ["fp32", "fp16+fp32"])
@pytest.mark.parametrize("outlier", [False, True], ids=["random", "outlier"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_accuracy(gran, acc, outlier, causal, dtype):
    m = errors(*make(Sq=256, D=128, dtype=dtype, outlier=outlier), causal=causal,
               qk_quant_gran=gran, pv_accum_dtype=acc)
    assert accurate(m, gran), m


@pytest.mark.parametrize("D", [32, 64, 72, 96, 128])
def test_head_dims(D):
    assert accurate(errors(*make(Sq=200, D=D, outlier=True))), D


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 63), (63, 63), (65, 65), (127, 129), (129, 127),
                                   (1, 300), (300, 1), (65, 1000), (129, 63)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_odd_lengths(Sq, Sk, causal):
    m = errors(*make(Sq=Sq, Sk=Sk, D=64, outlier=True), causal=causal)
    assert accurate(m), m


def test_gqa_matches_repeated_kv_exactly():
    q, k, v = make(H=8, Hkv=2, Sq=100, Sk=150, D=64, outlier=True)
    out, lse = emulate.sm80_attention(q, k, v, is_causal=True, return_lse=True)
    rep = [x.repeat_interleave(4, dim=1) for x in (k, v)]
    out_rep, lse_rep = emulate.sm80_attention(q, *rep, is_causal=True, return_lse=True)
    assert torch.equal(out, out_rep) and torch.equal(lse, lse_rep)
    assert accurate(errors(q, k, v, causal=True))


def test_mqa():
    assert accurate(errors(*make(H=4, Hkv=1, Sq=130, D=64)))


def test_nhd_layout_matches_hnd():
    q, k, v = make(Sq=70, Sk=90, D=64)
    out = emulate.sm80_attention(q, k, v, is_causal=True)
    nhd = emulate.sm80_attention(*(x.transpose(1, 2) for x in (q, k, v)), tensor_layout="NHD",
                                 is_causal=True)
    assert nhd.is_contiguous() and torch.equal(nhd.transpose(1, 2), out)


def test_smoothing_helps_on_outliers():
    q, k, v = make(Sq=256, D=128, outlier=True)
    on = errors(q, k, v, smooth_k=True)
    off = errors(q, k, v, smooth_k=False)
    assert on["rel_l1"] < off["rel_l1"] and on["lse_err"] < off["lse_err"]


def test_per_thread_finer_than_per_warp_on_spread_rows():
    q, k, v = make(Sq=256, D=128, row_spread=True)
    assert errors(q, k, v)["rel_l1"] < errors(q, k, v, qk_quant_gran="per_warp")["rel_l1"]


def test_lse_with_smoothing_correction():
    q, k, v = make(Sq=128, D=128, outlier=True)
    _, lse = emulate.sm80_attention(q, k, v, return_lse=True, smooth_k=True)
    _, ref = reference.attention(q, k, v, return_lse=True)
    assert (lse - ref).abs().max() < 0.02
    # The correction is large on this input, so leaving it out could not pass.
    qt = emulate.quantize(q, k, v, sm_scale=128 ** -0.5, want_lse_correction=True)
    assert qt.lse_correction.abs().max() > 0.5


def test_sm_scale_argument():
    q, k, v = make(Sq=64, D=64)
    out = emulate.sm80_attention(q, k, v, sm_scale=0.05)
    ref = reference.attention(q, k, v, sm_scale=0.05)
    m = reference.compare(out, ref)
    assert m["rel_l1"] < 0.0135 and m["cos"] > 0.99992


def test_inputs_unchanged():
    q, k, v = make(Sq=65, D=72, outlier=True)
    saved = [x.clone() for x in (q, k, v)]
    emulate.sm80_attention(q, k, v, return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(saved, (q, k, v)))


# ---- analytic cases ----------------------------------------------------------------------

def test_uniform_scores_mean_of_v():
    # q = 0: every score is 0, so O = mean of (fp16-rounded) V and LSE = ln(Sk).
    _, k, v = make(Sq=100, Sk=333, D=128, outlier=True)
    q = torch.zeros(1, 2, 100, 128, dtype=torch.bfloat16)
    for acc in ("fp32", "fp16+fp32"):
        out, lse = emulate.sm80_attention(q, k, v, return_lse=True, pv_accum_dtype=acc)
        mean = v.half().double().mean(dim=2, keepdim=True).expand(1, 2, 100, 128)
        torch.testing.assert_close(out.double(), mean.to(torch.bfloat16).double(), rtol=0,
                                   atol=2e-3)
        torch.testing.assert_close(lse, torch.full_like(lse, math.log(333)), rtol=0, atol=1e-5)


@given(Sq=st.integers(1, 150), Sk=st.integers(1, 150), D=st.sampled_from([8, 64, 100]),
       acc=st.sampled_from(["fp32", "fp16+fp32"]))
@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_causal_bottom_right_uniform(Sq, Sk, D, acc):
    # q = 0 and causal: row i averages V over keys 0..i+Sk-Sq (bottom-right alignment); rows
    # that see no key (Sq > Sk) give zeros and LSE -inf.
    g = torch.Generator().manual_seed(Sq * 1000 + Sk)
    q = torch.zeros(1, 1, Sq, D, dtype=torch.float16)
    k = torch.randn(1, 1, Sk, D, generator=g).half()
    v = torch.randn(1, 1, Sk, D, generator=g).half()
    out, lse = emulate.sm80_attention(q, k, v, is_causal=True, return_lse=True,
                                      pv_accum_dtype=acc)
    csum = v.double().cumsum(dim=2)
    for i in range(Sq):
        n = i + Sk - Sq + 1
        if n <= 0:
            assert torch.all(out[0, 0, i] == 0) and lse[0, 0, i] == -math.inf
        else:
            expect = (csum[0, 0, n - 1] / n).half().double()
            torch.testing.assert_close(out[0, 0, i].double(), expect, rtol=0, atol=2e-3)
            assert abs(lse[0, 0, i].item() - math.log(n)) < 1e-5


def test_causal_identity_v():
    # Uniform scores and V = I (Sk = D): row i of a causal square call is 1/(i+1) on
    # columns 0..i and 0 elsewhere.
    S = 64
    q = torch.zeros(1, 1, S, S, dtype=torch.float16)
    k = torch.randn(1, 1, S, S).half()
    v = torch.eye(S, dtype=torch.float16)[None, None]
    out = emulate.sm80_attention(q, k, v, is_causal=True).double()[0, 0]
    i = torch.arange(S, dtype=torch.float64)
    expect = torch.where(i[None, :] <= i[:, None], 1 / (i[:, None] + 1), 0.0)
    torch.testing.assert_close(out, expect.half().double(), rtol=0, atol=1e-3)


def test_fp16_block_accumulation_overflow_is_emulated():
    # One 64-key block of V = 1500 under uniform scores sums to 96000 > 65504 in the fp16
    # accumulator: the "fp16+fp32" mode overflows, "fp32" does not (why "fp16" alone is not
    # offered and why fp16+fp32 documents a bound on |v|).
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    k = torch.randn(1, 1, 64, 64).half()
    v = torch.full((1, 1, 64, 64), 1500.0, dtype=torch.float16)
    assert torch.allclose(emulate.sm80_attention(q, k, v).float(), torch.tensor(1500.0))
    assert not torch.isfinite(emulate.sm80_attention(q, k, v, pv_accum_dtype="fp16+fp32")).all()


def test_fully_masked_rows_zero_not_nan():
    q, k, v = make(Sq=200, Sk=70, D=64)
    out, lse = emulate.sm80_attention(q, k, v, is_causal=True, return_lse=True)
    assert torch.all(out[:, :, :130] == 0) and torch.all(lse[:, :, :130] == -math.inf)
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 130:]).all()


# ---- quantization steps, checked against direct loops over the definition ----------------

def _loop_q_scales(q, s2, gran):
    """q_scale by the definition: group rows {r, r+8} of each warp's 16 (or all 16)."""
    B, H, S, D = q.shape
    blocks = -(-S // 128)
    out = torch.zeros(B, H, blocks, 64)
    x = q.float().abs()
    for blk in range(blocks):
        for slot in range(64):
            warp, j = divmod(slot, 8)
            rows = range(16 * warp, 16 * warp + 16) if gran == "per_warp" else (
                16 * warp + j, 16 * warp + j + 8)
            rows = [blk * 128 + r for r in rows if blk * 128 + r < S]
            amax = x[:, :, rows].amax(dim=(-1, -2)) if rows else torch.zeros(B, H)
            out[:, :, blk, slot] = (amax / torch.tensor(127.0)) * s2
    return out


def _loop_k_scales(k_smoothed, gran):
    B, H, S, D = k_smoothed.shape
    blocks = -(-S // 64)
    out = torch.zeros(B, H, blocks, 4)
    x = k_smoothed.abs()
    for blk in range(blocks):
        for slot in range(4):
            keys = [blk * 64 + c for c in range(64)
                    if (gran == "per_warp" or (c % 8) // 2 == slot) and blk * 64 + c < S]
            amax = x[:, :, keys].amax(dim=(-1, -2)) if keys else torch.zeros(B, H)
            out[:, :, blk, slot] = amax / torch.tensor(127.0)
    return out


@pytest.mark.parametrize("gran", ["per_thread", "per_warp"])
def test_scales_match_definition(gran):
    q, k, _ = make(Sq=150, Sk=130, D=72, outlier=True, row_spread=True)
    s2 = torch.tensor(72 ** -0.5 * math.log2(math.e), dtype=torch.float32)
    q_i8, q_scale = emulate.quantize_q(q, s2, gran, 128)
    assert torch.equal(q_scale, _loop_q_scales(q, s2, gran))
    mean = emulate.k_channel_mean(k, 128)
    k_i8, k_scale = emulate.quantize_k(k, mean, gran, 128)
    assert torch.equal(k_scale, _loop_k_scales(k.float() - mean[:, :, None, :72], gran))
    # Padding: rows beyond S and columns beyond D are zero.
    assert torch.all(q_i8[:, :, 150:] == 0) and torch.all(q_i8[..., 72:] == 0)
    assert torch.all(k_i8[:, :, 130:] == 0) and torch.all(k_i8[..., 72:] == 0)
    assert torch.all(mean[..., 72:] == 0)


@given(S=st.integers(1, 300), D=st.integers(1, 128), gran=st.sampled_from(["per_thread",
                                                                           "per_warp"]),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_quantization_error_within_half_step(S, D, gran, scale, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(1, 2, S, D, generator=g) * scale).half()
    d_pad = emulate.padded_head_dim(D)
    one = torch.tensor(1.0)
    q_i8, q_scale = emulate.quantize_q(q, one, gran, d_pad)
    r = torch.arange(S)
    unit = q_scale[:, :, r // 128, emulate.q_group_of_row(r % 128)][..., None]
    x = q.float()
    deq = q_i8[:, :, :S, :D].float() * unit
    assert q_i8.abs().max() <= 127
    assert torch.all((deq - x).abs() <= unit * 0.5 * (1 + 1e-5) + 1e-30)
    # The largest element of every non-zero group maps to +-127.
    nonzero = q_scale > 0
    per_slot = q_i8.view(1, 2, -1, 8, 2, 8, d_pad).abs().amax(dim=(4, 6)).reshape(1, 2, -1, 64)
    if gran == "per_thread":
        assert torch.all(per_slot[nonzero] == 127)


def test_v_conversion_and_padding():
    v = torch.tensor([[1.0, -2.5], [70000.0, 1e-8]], dtype=torch.bfloat16)[None, None]
    v16 = emulate.convert_v(v, 64)
    assert v16.dtype == torch.float16 and v16.shape == (1, 1, 64, 64)
    assert v16[0, 0, 0, 0] == 1.0 and v16[0, 0, 0, 1] == -2.5
    assert torch.isinf(v16[0, 0, 1, 0])          # bf16 beyond fp16's range
    assert torch.all(v16[0, 0, 2:] == 0) and torch.all(v16[..., 2:] == 0)


def test_group_maps():
    assert [emulate.q_group_of_row(r) for r in (0, 7, 8, 15, 16, 24, 127)] == \
        [0, 7, 0, 7, 8, 8, 63]
    assert [emulate.k_slot_of_key(c) for c in (0, 1, 2, 7, 8, 63)] == [0, 0, 1, 3, 0, 3]


# ---- the bounds reject broken emulators --------------------------------------------------

def _broken_alpha(m, l, s):
    m_new, l_new, alpha, p = _GOOD_STEP(m, l, s)
    return m_new, l_new, torch.ones_like(alpha), p      # forgets to rescale O


def _broken_pv(p16, v16, pv_accum):
    return _GOOD_PV(p16[..., :48], v16[..., :48, :], pv_accum)   # drops 16 keys per block


_GOOD_STEP = emulate._softmax_step
_GOOD_PV = emulate._block_pv


@pytest.mark.parametrize("attr,broken", [
    ("q_group_of_row", lambda r: r // 2),                # scale slots of the wrong rows
    ("k_slot_of_key", lambda c: c % 4),                  # scale slots of the wrong keys
    ("_softmax_step", _broken_alpha),
    ("_block_pv", _broken_pv),
])
def test_broken_variants_fail(monkeypatch, attr, broken):
    q, k, v = make(Sq=256, D=128, outlier=True)
    assert accurate(errors(q, k, v))
    monkeypatch.setattr(emulate, attr, broken)
    m = errors(q, k, v)
    assert not accurate(m), (attr, m)
    assert not accurate(m, bounds=LOOSE), (attr, m)


def test_missing_lse_correction_fails(monkeypatch):
    q, k, v = make(Sq=128, D=128, outlier=True)
    monkeypatch.setattr(emulate, "lse_correction", lambda q, mean, s: torch.zeros(q.shape[:3]))
    assert errors(q, k, v)["lse_err"] > LSE_ATOL


def test_top_left_causal_fails():
    q, k, v = make(Sq=100, Sk=300, D=64)
    out = emulate.sm80_attention(q, k, v, is_causal=True, causal_offset=0)
    ref = reference.attention(q, k, v, is_causal=True)     # bottom-right
    assert reference.compare(out, ref)["rel_l1"] > 0.5


# ---- the reference itself ----------------------------------------------------------------

def test_reference_matches_sdpa_fp64():
    q, k, v = (x.double() for x in make(Sq=70, Sk=90, D=40))
    ref, lse = reference.attention(q, k, v, dtype=torch.float64, return_lse=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(ref, sdpa, rtol=1e-10, atol=1e-12)
    s = torch.matmul(q, k.transpose(-1, -2)) * 40 ** -0.5
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-10, atol=1e-12)
    # Causal with Sq == Sk equals torch's (top-left) is_causal.
    r2 = reference.attention(q, k[:, :, :70], v[:, :, :70], dtype=torch.float64, is_causal=True)
    s2 = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :70], v[:, :, :70],
                                                          is_causal=True)
    torch.testing.assert_close(r2, s2, rtol=1e-10, atol=1e-12)


def test_reference_chunking_and_gqa():
    q, k, v = make(H=4, Hkv=2, Sq=50, Sk=60, D=16)
    a = reference.attention(q, k, v, is_causal=True, chunk=7)
    b = reference.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                            is_causal=True)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_lse_merge_of_two_halves():
    # Ring/sequence-parallel use: two half-KV results merged by their LSE equal the full call.
    q, k, v = make(Sq=64, Sk=256, D=64, outlier=True)
    o1, l1 = emulate.sm80_attention(q, k[:, :, :128], v[:, :, :128], return_lse=True)
    o2, l2 = emulate.sm80_attention(q, k[:, :, 128:], v[:, :, 128:], return_lse=True)
    lse = torch.logaddexp(l1, l2)
    merged = (o1.float() * torch.exp(l1 - lse)[..., None] +
              o2.float() * torch.exp(l2 - lse)[..., None])
    ref, ref_lse = reference.attention(q, k, v, return_lse=True)
    m = reference.compare(merged, ref)
    assert m["rel_l1"] < 0.0135 and m["cos"] > 0.99992
    assert (lse - ref_lse).abs().max() < LSE_ATOL


# ---- the K mean from a sample of keys ------------------------------------------------------

@given(length=st.integers(2, 100_000), n=st.integers(1, 4096))
@settings(max_examples=200, deadline=None)
def test_sampled_tokens_one_per_stratum(length, n):
    if n >= length:
        return
    t = emulate.sampled_tokens(length, n)
    i = torch.arange(n)
    # token i is the floor of a point of stratum i, [i * length / n, (i + 1) * length / n)
    assert torch.all((t + 1) * n > i * length) and torch.all(t * n < (i + 1) * length)
    assert torch.all(t[1:] >= t[:-1]) and int(t[0]) >= 0 and int(t[-1]) < length
    if length >= 2 * n:  # strata of two tokens or more: no token twice
        assert torch.all(t[1:] > t[:-1])


def test_k_mean_of_a_short_sequence_is_exact():
    _, k, _ = make(Sq=64, Sk=emulate.K_MEAN_SAMPLE_TOKENS, D=64, outlier=True)
    assert torch.equal(emulate.k_channel_mean(k, 64), emulate.k_channel_mean(k, 64, sample=0))
    assert not torch.equal(emulate.k_channel_mean(torch.cat([k, -k[:, :, :1]], dim=2), 64),
                           emulate.k_channel_mean(torch.cat([k, -k[:, :, :1]], dim=2), 64, sample=0))


def test_k_mean_sample_does_not_alias_with_a_period():
    # Channels rotating with a period of exactly one stratum (length / n = 8 keys), as rotary
    # embeddings do: a sample at a fixed offset per stratum would see one phase and be off by
    # the amplitude; the hashed offsets keep the sampled mean near the exact one (~0).
    S, n, D = 2048, emulate.K_MEAN_SAMPLE_TOKENS, 64
    t = torch.arange(S, dtype=torch.float64)[:, None]
    phase = torch.linspace(0, math.pi, D, dtype=torch.float64)[None, :]
    k = (10 * torch.cos(2 * math.pi * t / (S // n) + phase)).float()[None, None]
    exact = emulate.k_channel_mean(k, D, sample=0)
    sampled = emulate.k_channel_mean(k, D, sample=n)
    assert exact.abs().max() < 1e-3
    assert sampled.abs().max() < 2.0, sampled.abs().max()          # amplitude 10
    strided = k[:, :, ::S // n].double().mean(dim=2)                 # for contrast: aliased
    assert strided.abs().max() > 5.0


@pytest.mark.parametrize("causal", [False, True])
def test_k_mean_sample_costs_no_accuracy(monkeypatch, causal):
    # The outlier input (K + 4 N(0,1) per channel): smoothing with the mean of 256 sampled keys
    # instead of all 4096 changes the sm90 path's error by under 1% of itself.
    q, k, v = make(H=2, Sq=4096, D=128, outlier=True)
    ref = reference.attention(q, k, v, is_causal=causal)
    errs = {}
    for sample in (0, emulate.K_MEAN_SAMPLE_TOKENS):
        full = emulate.k_channel_mean
        monkeypatch.setattr(emulate, "k_channel_mean",
                            lambda k_, d, sample_=sample, full_=full: full_(k_, d, sample=sample_))
        errs[sample] = reference.compare(emulate.sm90_attention(q, k, v, is_causal=causal),
                                         ref)["rel_l1"]
        monkeypatch.undo()
    assert errs[emulate.K_MEAN_SAMPLE_TOKENS] <= 1.01 * errs[0], errs
