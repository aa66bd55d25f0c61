"""The sm90 emulator (the sm89 path's INT8 QK^T + FP8 E4M3 PV with 128-key main-loop steps)
against the exact reference, against an explicit step loop, and against the sm89 emulator.

The sm90 and sm89 emulators share every step but the key-step size, so the bounds are the sm89
file's (measured: rel-L1 0.034-0.038, cos >= 0.99928 on these inputs). The acceptance input of
the Hopper issue (B=1, H=8, S=4096, D=128, K plus a per-channel bias 4*N(0,1), bf16) measured on
the CPU (torch 2.13), seed 1234: non-causal rel-L1 0.03785, cos 0.999280; causal 0.03630,
0.999397 (row sums of the E4M3 P, as the kernels since sm90 v16; with fp32 sums 0.03786 /
0.999279 and 0.03641 / 0.999388; per_warp then 0.03827 / 0.03682). SageAttention 2.2.0's Hopper path measured 0.0378 /
0.99928 on the H100. The issue asks rel-L1 <= 0.035 and cos >= 0.9993: the algorithm as
specified (E4M3 P and E4M3 V) does not reach it. In isolation on the same input, rounding P to
E4M3 costs rel-L1 0.026 and rounding V costs 0.027; both give 0.037 before INT8 QK^T.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sageattn import emulate, reference
from test_emulator import LSE_ATOL, make
from test_emulator_fp8 import LOOSE, accurate, loose_bound

MODES = list(emulate.PV_ACCUM_SM90)
ISSUE_BOUND = (0.035, 0.9993)      # the Hopper issue's accuracy target (rel-L1, cos)


def errors(q, k, v, causal=False, **kw):
    out, lse = emulate.sm90_attention(q, k, v, is_causal=causal, return_lse=True, **kw)
    ref, ref_lse = reference.attention(q, k, v, is_causal=causal, return_lse=True)
    m = reference.compare(out, ref)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    seen = torch.isfinite(ref_lse)
    m["lse_err"] = (lse[seen] - ref_lse[seen]).abs().max().item() if seen.any() else 0.0
    return m


def step_loop(q, k, v, key_step, *, causal=False, pv_accum="fp32+fp32", smooth_v=False,
              gran="per_thread", row_sums="fp32"):
    """The FP8-PV main loop written out once more from the unchanged primitives: every score
    first (keys padded to whole steps: score -inf, V +0), then online softmax over
    ``key_step`` keys at a time, row sums of the fp32 P (sm89) or of the E4M3 P (sm90).
    Returns (out, lse)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    qt = emulate.quantize_fp8(q, k, v, sm_scale=D ** -0.5, granularity=gran, smooth_v=smooth_v,
                              pv_accum=pv_accum, want_lse_correction=True)
    kv_head = torch.arange(Hq) // (Hq // Hkv)
    blocks = qt.k_int8.shape[2] // 64
    n = -(-Sk // key_step) * key_step
    keys = torch.arange(n)
    k_i8 = torch.zeros(B, Hkv, n, qt.k_int8.shape[3], dtype=torch.int8)
    k_i8[:, :, :blocks * 64] = qt.k_int8
    dot = torch.matmul(qt.q_int8[:, :, :Sq].double(),
                       k_i8.index_select(1, kv_head).double().transpose(-1, -2)).float()
    ks = emulate._key_scales(qt.k_scale, keys.clamp(max=blocks * 64 - 1))
    s = dot * (emulate._row_scales(qt.q_scale, Sq)[..., None] *
               ks.index_select(1, kv_head)[:, :, None, :])
    hidden = (keys >= Sk)[None, :]
    if causal:
        hidden = hidden | (keys[None, :] > torch.arange(Sq)[:, None] + (Sk - Sq))
    s = s.masked_fill(hidden, -math.inf)
    v8 = torch.zeros(B, Hkv, n, qt.v_fp8.shape[3])
    v8[:, :, :blocks * 64] = torch.cat([emulate.v_fp8_key_major(qt.v_fp8, kb)
                                        for kb in range(blocks)], 2)
    v8 = v8.index_select(1, kv_head)
    m, l, o = emulate._running_state(qt, Sq)
    for start in range(0, n, key_step):
        cols = slice(start, start + key_step)
        l_before = l
        m, l, alpha, p = emulate._softmax_step(m, l, s[..., cols].contiguous(),
                                               emulate.LOG2_P_SCALE_FP8)
        p8 = emulate.e4m3_rn_satfinite(p)
        if row_sums == "e4m3":
            l = l_before * alpha + p8.double().sum(dim=-1).float()
        o = o * alpha[..., None] + emulate._block_pv_fp8(p8, v8[:, :, cols], pv_accum)
    seen = l > 0
    inv = torch.where(seen, 1 / torch.where(seen, l, 1), torch.tensor(0.0))
    out = o * inv[..., None] * qt.v_scale.index_select(1, kv_head)[:, :, None, :]
    if qt.v_mean is not None:
        out = torch.where(seen[..., None], out + qt.v_mean.index_select(1, kv_head)[:, :, None],
                          out)
    lse = emulate._lse(qt, m, l, seen, emulate.LOG2_P_SCALE_FP8)
    return out[..., :D].to(q.dtype), lse


# ---- the generalisation: sm89 unchanged, sm90 = 128-key steps -----------------------------

@pytest.mark.parametrize("Sq,Sk", [(1, 1), (65, 63), (127, 129), (200, 333), (300, 100)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("acc", ["fp32+fp32", "fp32+fp16"])
def test_sm89_is_the_64_key_step_loop(Sq, Sk, causal, acc):
    # The sm89 emulator must stay what it was: bit-identical to the loop of 64-key steps.
    q, k, v = make(H=4, Hkv=2, Sq=Sq, Sk=Sk, D=72, outlier=True, seed=Sq + Sk)
    out, lse = emulate.sm89_attention(q, k, v, is_causal=causal, pv_accum_dtype=acc,
                                      smooth_v=True, return_lse=True)
    want, want_lse = step_loop(q, k, v, 64, causal=causal, pv_accum=acc, smooth_v=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (65, 63), (127, 129), (200, 333), (300, 100),
                                   (64, 192)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("gran", ["per_thread", "per_warp"])
def test_sm90_is_the_128_key_step_loop(Sq, Sk, causal, gran):
    q, k, v = make(H=4, Hkv=2, Sq=Sq, Sk=Sk, D=128, outlier=True, seed=Sq + Sk)
    out, lse = emulate.sm90_attention(q, k, v, is_causal=causal, qk_quant_gran=gran,
                                      smooth_v=True, return_lse=True)
    want, want_lse = step_loop(q, k, v, 128, causal=causal, smooth_v=True, gran=gran,
                               row_sums="e4m3")
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    fp32_sums = step_loop(q, k, v, 128, causal=causal, smooth_v=True, gran=gran)
    if Sk > 1:  # one key: P is 448 either way
        assert not torch.equal(lse, fp32_sums[1])


@pytest.mark.parametrize("Sk", [1, 37, 64])
def test_one_step_of_keys_equals_the_64_key_loop(Sk):
    # Up to 64 keys both step sizes take one step over the same keys (the sm90 step's other 64
    # keys are masked, P = 0, V = +0), so the results agree bit for bit; the sm89 path differs
    # from them only in summing the fp32 P.
    q, k, v = make(H=2, Sq=100, Sk=Sk, D=64, outlier=True)
    for causal in (False, True):
        a = emulate.sm90_attention(q, k, v, is_causal=causal, return_lse=True, smooth_v=True)
        b = step_loop(q, k, v, 64, causal=causal, smooth_v=True, row_sums="e4m3")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        c = emulate.sm89_attention(q, k, v, is_causal=causal, return_lse=True, smooth_v=True,
                                   pv_accum_dtype="fp32+fp32")
        assert reference.compare(a[0], c[0])["rel_l1"] < 0.01


def test_row_sums_of_e4m3_p_cost_no_accuracy():
    # The sm90 kernels sum the E4M3 P (on the tensor core) where SageAttention sums the fp32
    # P. Measured on the acceptance input (H=2 of it, CPU): rel-L1 0.03778 -> 0.03776, causal
    # 0.03719 -> 0.03709. Here, a smaller outlier input: the same within 2%.
    q, k, v = make(H=4, Sq=512, Sk=1024, D=128, outlier=True, seed=11)
    ref = reference.attention(q, k, v)
    qt = emulate.quantize_fp8(q, k, v, sm_scale=128 ** -0.5, pv_accum="fp32+fp32")
    kw = dict(seq_q=512, seq_k=1024, head_dim=128, pv_accum="fp32+fp32", out_dtype=q.dtype,
              key_step=128)
    e4m3, fp32 = (reference.compare(emulate.attention_fp8(qt, row_sums=r, **kw)[0], ref)["rel_l1"]
                  for r in ("e4m3", "fp32"))
    assert e4m3 != fp32 and abs(e4m3 / fp32 - 1) < 0.02, (e4m3, fp32)
    with pytest.raises(ValueError, match="row_sums"):
        emulate.attention_fp8(qt, row_sums="fp16", **kw)


def test_step_size_changes_the_roundings_not_the_result():
    # With more than 64 keys the max (and so each P's E4M3 rounding) is taken per 128 keys:
    # different bits, same accuracy.
    q, k, v = make(Sq=256, Sk=700, D=128, outlier=True)
    a = emulate.sm90_attention(q, k, v)
    b = emulate.sm89_attention(q, k, v, pv_accum_dtype="fp32+fp32")
    assert not torch.equal(a, b)
    assert reference.compare(a, b)["rel_l1"] < 0.02


def test_pv_modes_emulate_alike():
    q, k, v = make(Sq=200, Sk=300, D=128, outlier=True)
    a, b = (emulate.sm90_attention(q, k, v, pv_accum_dtype=acc) for acc in MODES)
    assert torch.equal(a, b)


@pytest.mark.parametrize("acc", ["fp32+fp16", "fp16+fp32", "fp16", "bf16", None])
def test_modes_the_path_does_not_offer(acc):
    q, k, v = make(Sq=8, D=64)
    with pytest.raises(ValueError, match="^pv_accum_dtype must be one of 'fp32\\+fp32', 'fp32' "
                                         "on the sm90 path"):
        emulate.sm90_attention(q, k, v, pv_accum_dtype=acc)


@pytest.mark.parametrize("key_step", [0, 32, 96])
def test_key_step_must_be_whole_v_tiles(key_step):
    q, k, v = make(Sq=8, D=64)
    qt = emulate.quantize_fp8(q, k, v, sm_scale=0.125, pv_accum="fp32+fp32")
    with pytest.raises(ValueError, match="key_step must be a positive multiple of the 64-key"):
        emulate.attention_fp8(qt, seq_q=8, seq_k=8, head_dim=64, key_step=key_step)


# ---- accuracy against the reference ------------------------------------------------------

@pytest.mark.parametrize("gran", ["per_thread", "per_warp"])
@pytest.mark.parametrize("acc", MODES)
@pytest.mark.parametrize("outlier", [False, True], ids=["random", "outlier"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_accuracy(gran, acc, outlier, causal, dtype):
    m = errors(*make(Sq=256, Sk=384, D=128, dtype=dtype, outlier=outlier), causal=causal,
               qk_quant_gran=gran, pv_accum_dtype=acc)
    assert accurate(m), m


@pytest.mark.parametrize("D", [32, 64, 72, 96, 128])
def test_head_dims(D):
    assert accurate(errors(*make(Sq=200, Sk=300, D=D, outlier=True))), D


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 63), (65, 65), (127, 129), (129, 127), (300, 1),
                                   (65, 1000), (100, 255), (100, 257)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_odd_lengths(Sq, Sk, causal):
    m = errors(*make(Sq=Sq, Sk=Sk, D=64, outlier=True), causal=causal)
    assert accurate(m), m


def test_smooth_v_accuracy_and_gain():
    q, k, v = make(Sq=256, D=128, outlier=True)
    g = torch.Generator().manual_seed(3)
    v = (v.float() + 8 * torch.randn(1, 2, 1, 128, generator=g)).to(v.dtype)
    on, off = errors(q, k, v, smooth_v=True), errors(q, k, v)
    assert accurate(on) and on["rel_l1"] < 0.6 * off["rel_l1"], (on, off)


def test_gqa_matches_repeated_kv_exactly():
    q, k, v = make(H=8, Hkv=2, Sq=100, Sk=300, D=64, outlier=True)
    out, lse = emulate.sm90_attention(q, k, v, is_causal=True, return_lse=True, smooth_v=True)
    rep = [x.repeat_interleave(4, dim=1) for x in (k, v)]
    out_rep, lse_rep = emulate.sm90_attention(q, *rep, is_causal=True, return_lse=True,
                                              smooth_v=True)
    assert torch.equal(out, out_rep) and torch.equal(lse, lse_rep)


def test_nhd_layout_matches_hnd():
    q, k, v = make(Sq=70, Sk=190, D=64)
    out = emulate.sm90_attention(q, k, v, is_causal=True)
    nhd = emulate.sm90_attention(*(x.transpose(1, 2) for x in (q, k, v)), tensor_layout="NHD",
                                 is_causal=True)
    assert nhd.is_contiguous() and torch.equal(nhd.transpose(1, 2), out)


def test_lse_matches_the_sm89_path():
    # Same scores and the same final max; the row sums differ by E4M3's rounding of P: at most
    # 2^-4 relative per term (ln(1 + 1/16) = 0.061), on average about 0.036 / sqrt(keys seen)
    # (these causal rows see 173-300 keys: 2.0e-3 measured).
    q, k, v = make(Sq=128, Sk=300, D=128, outlier=True)
    _, lse = emulate.sm90_attention(q, k, v, return_lse=True, is_causal=True)
    _, lse89 = emulate.sm89_attention(q, k, v, return_lse=True, is_causal=True)
    _, ref = reference.attention(q, k, v, return_lse=True, is_causal=True)
    diff = (lse - lse89).abs()
    assert diff.max() < 0.061 and diff.mean() < 4e-3 and (lse - ref).abs().max() < LSE_ATOL


def test_fully_masked_rows_zero_not_the_v_mean():
    q, k, v = make(Sq=300, Sk=70, D=64)
    out, lse = emulate.sm90_attention(q, k, v + 3, is_causal=True, return_lse=True,
                                      smooth_v=True)
    assert torch.all(out[:, :, :230] == 0) and torch.all(lse[:, :, :230] == -math.inf)
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 230:]).all()


def test_large_v_in_fp16_stays_finite():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 64, 64, generator=g).half()
    k = torch.randn(1, 2, 256, 64, generator=g).half()
    v = (1000 + 400 * torch.randn(1, 2, 256, 64, generator=g)).half()
    for smooth_v in (False, True):
        out = emulate.sm90_attention(q, k, v, smooth_v=smooth_v)
        assert torch.isfinite(out).all()
        assert reference.compare(out, reference.attention(q, k, v))["rel_l1"] < 0.01


def test_inputs_unchanged():
    q, k, v = make(Sq=65, Sk=200, D=72, outlier=True)
    saved = [x.clone() for x in (q, k, v)]
    emulate.sm90_attention(q, k, v, return_lse=True, smooth_v=True)
    assert all(torch.equal(a, b) for a, b in zip(saved, (q, k, v)))


@given(Sq=st.integers(1, 150), Sk=st.integers(1, 300), D=st.sampled_from([8, 64, 100]),
       acc=st.sampled_from(MODES), smooth_v=st.booleans(), causal=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_random_shapes(Sq, Sk, D, acc, smooth_v, causal, seed):
    q, k, v = make(Sq=Sq, Sk=Sk, D=D, outlier=True, seed=seed)
    m = errors(q, k, v, causal=causal, pv_accum_dtype=acc, smooth_v=smooth_v)
    assert accurate(m, loose_bound(Sq, D)), m


# ---- the bounds see a broken 128-key step ------------------------------------------------

def _second_tile_lost(v_fp8, start, key_step):
    vals = _GOOD_STEP_V(v_fp8, start, key_step)
    vals[:, :, 64:] = 0
    return vals


_GOOD_STEP_V = emulate._v_fp8_step


def test_broken_step_fails(monkeypatch):
    q, k, v = make(Sq=256, D=128, outlier=True)
    assert accurate(errors(q, k, v))
    monkeypatch.setattr(emulate, "_v_fp8_step", _second_tile_lost)
    m = errors(q, k, v)
    assert not accurate(m) and not accurate(m, LOOSE), m


# ---- the Hopper issue's accuracy input: the prediction -----------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_outlier_4096_prediction(causal):
    # The emulator predicts the kernel's accuracy on the acceptance input (see the module
    # docstring): about SageAttention 2.2.0's, which is above the issue's rel-L1 bound.
    q, k, v = make(B=1, H=8, Sq=4096, D=128, dtype=torch.bfloat16, outlier=True, seed=1234)
    m = reference.compare(emulate.sm90_attention(q, k, v, is_causal=causal),
                          reference.attention(q, k, v, is_causal=causal))
    print(f"\nsm90 emulator, outlier B1 H8 S4096 D128 bf16 causal={causal}: rel-L1 "
          f"{m['rel_l1']:.5f} cos {m['cos']:.6f} (issue: <= {ISSUE_BOUND[0]}, "
          f">= {ISSUE_BOUND[1]})")
    assert m["finite"] and 0.030 <= m["rel_l1"] <= 0.040 and m["cos"] >= 0.99920, m
