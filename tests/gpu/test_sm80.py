"""The sm80 kernels on a GPU, against the emulator (same algorithm, step by step) and the exact
fp32 reference. Run with ``pytest -m gpu -s tests/gpu``; the error table prints at the end.

Bounds:
* kernel vs emulator (``VS_EMU``): they quantize identically and differ only where the
  emulator documents it cannot be bit-faithful (ex2.approx, summation order), so the bound is
  ~10x below the quantization error itself: a kernel bug of any visible size fails it.
* kernel vs reference: no worse than the emulator's own error plus a small margin.
* acceptance: the outlier input (B=1, H=8, S=4096, D=128, bf16): rel-L1 <= 0.012 and
  cos >= 0.9999 against the fp32 reference, causal and not.
"""

import math

import pytest
import torch

import sageattn
from sageattn import emulate, ops, reference
from sageattn import sageattn_qk_int8_pv_fp16_cuda as sm80
from path_checks import LENGTHS, LSE_VS_REF, check_call, make, maybe_compiled

pytestmark = pytest.mark.gpu

# rel-L1 of kernel vs emulator; measured on the H100 (2026-11-23): at most 7.1e-5.
VS_EMU = {"fp32": 5e-4, "fp16+fp32": 5e-4}
ACCEPT_REL_L1, ACCEPT_COS = 0.012, 0.9999

# SAGEATTN_TEST_TORCH_COMPILE=1 runs every checked call through torch.compile(fullgraph=True).
_CALL = maybe_compiled(sm80)


def check(record, group, q, k, v, acc="fp32", **kw):
    """The sm80 entry point against its emulator and the reference (path_checks.check_call)."""
    return check_call(record, group, _CALL, emulate.sm80_attention, VS_EMU[acc], q, k, v, acc=acc,
                      ref_margin=5e-4, cos_margin=2e-5, **kw)


# ---- acceptance --------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_acceptance_outlier_4096(record, causal):
    q, k, v = make(B=1, H=8, Sq=4096, D=128, dtype=torch.bfloat16, outlier=True, seed=1234)
    out = sageattn.sageattn(q, k, v, is_causal=causal, path="sm80")
    ref = reference.attention(q, k, v, is_causal=causal)
    m = reference.compare(out, ref)
    sdpa = reference.compare(
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal), ref)
    record(f"ACCEPT outlier B1 H8 S4096 D128 bf16 {'causal' if causal else 'full'}",
           rel_l1=m["rel_l1"], cos=m["cos"])
    record(f"(torch SDPA bf16, same input, {'causal' if causal else 'full'})",
           rel_l1=sdpa["rel_l1"], cos=sdpa["cos"])
    print(f"\nACCEPT causal={causal}: rel-L1 {m['rel_l1']:.5f} (<= {ACCEPT_REL_L1}) "
          f"cos {m['cos']:.6f} (>= {ACCEPT_COS}); SDPA rel-L1 {sdpa['rel_l1']:.5f}")
    assert m["finite"]
    assert m["rel_l1"] <= ACCEPT_REL_L1 and m["cos"] >= ACCEPT_COS, m


# ---- shapes and configurations -------------------------------------------------------------

@pytest.mark.parametrize("Sk", LENGTHS)
@pytest.mark.parametrize("Sq", LENGTHS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lengths(record, Sq, Sk, causal):
    q, k, v = make(H=2, Sq=Sq, Sk=Sk, D=128, seed=Sq * 7919 + Sk)
    check(record, f"lengths {{1..4097}}^2 {'causal' if causal else 'full'}", q, k, v,
          causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("gran", ["per_thread", "per_warp"])
@pytest.mark.parametrize("acc", ["fp32", "fp16+fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("outlier", [False, True], ids=["random", "outlier"])
def test_configs(record, dtype, gran, acc, causal, layout, outlier):
    q, k, v = make(B=2, H=4, Hkv=2, Sq=300, Sk=500, D=128, dtype=dtype, outlier=outlier,
                   layout=layout)
    check(record, f"{gran} {acc} {'outlier' if outlier else 'random'}", q, k, v, layout=layout,
          causal=causal, gran=gran, acc=acc)


@pytest.mark.parametrize("D", [32, 64, 72, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_head_dims(record, D, dtype):
    q, k, v = make(H=4, Sq=333, Sk=777, D=D, dtype=dtype)
    check(record, f"head dim {D}", q, k, v, causal=True)


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (8, 1), (6, 3)])
def test_gqa_mqa(record, Hq, Hkv):
    q, k, v = make(B=2, H=Hq, Hkv=Hkv, Sq=257, Sk=1000, D=64)
    check(record, "GQA/MQA", q, k, v, causal=True)


def test_expanded_kv(record):
    q, k, v = make(H=8, Hkv=1, Sq=200, Sk=300, D=128)
    out = check(record, "strided views", q, k.expand(1, 8, 300, 128), v.expand(1, 8, 300, 128))[0]
    torch.testing.assert_close(out, sm80(q, k, v), rtol=0, atol=0)


def test_fused_qkv_slices(record):
    # The output of a fused projection, (B, S, 3, H, D): q, k, v are NHD views, head stride D,
    # sequence stride 3*H*D, sharing one storage.
    g = torch.Generator(device="cuda").manual_seed(5)
    qkv = torch.randn(2, 700, 3, 8, 128, generator=g, device="cuda").to(torch.bfloat16)
    q, k, v = qkv.unbind(2)
    check(record, "strided views", q, k, v, layout="NHD", causal=True)


def test_transposed_views(record):
    q, k, v = make(B=2, H=4, Sq=300, Sk=400, D=64, layout="NHD")
    check(record, "strided views", *(x.transpose(1, 2) for x in (q, k, v)))   # HND views


def test_unaligned_and_odd_strides(record):
    # Storage offsets that break 16-byte alignment (the kernels' non-vectorized loads) and
    # size-1 dims with arbitrary strides.
    g = torch.Generator(device="cuda").manual_seed(9)
    big = torch.randn(2, 4, 300, 72 + 3, generator=g, device="cuda").to(torch.float16)
    q, k, v = big[..., 1:73], big[..., 2:74], big[..., 3:75]
    assert q.data_ptr() % 16 != 0
    check(record, "strided views", q, k, v, causal=True)
    flat = torch.randn(100_000, generator=g, device="cuda").to(torch.float16)
    q1 = torch.as_strided(flat, (1, 1, 90, 64), (3, 7, 64, 1), storage_offset=5)
    k1 = torch.as_strided(flat, (1, 1, 130, 64), (11, 13, 72, 1), storage_offset=9)
    check(record, "strided views", q1, k1, k1)


@pytest.mark.parametrize("smooth_k", [True, False])
def test_lse_and_merge(record, smooth_k):
    # Without smoothing, K outliers would swamp the INT8 scale (and the LSE error): plain inputs.
    q, k, v = make(H=4, Sq=512, Sk=2048, D=128, outlier=smooth_k)
    out, lse = check(record, "LSE (smooth_k on/off)", q, k, v, smooth_k=smooth_k)
    # Two halves of the keys merged by their LSE give the full result (ring attention).
    o1, l1 = sm80(q, k[:, :, :1024], v[:, :, :1024], smooth_k=smooth_k, return_lse=True)
    o2, l2 = sm80(q, k[:, :, 1024:], v[:, :, 1024:], smooth_k=smooth_k, return_lse=True)
    full = torch.logaddexp(l1, l2)
    merged = (o1.float() * torch.exp(l1 - full)[..., None] +
              o2.float() * torch.exp(l2 - full)[..., None])
    ref = reference.attention(q, k, v)
    m = reference.compare(merged, ref)
    record("LSE merge of two halves", rel_l1=m["rel_l1"], cos=m["cos"])
    assert m["rel_l1"] <= 0.0135 and m["cos"] >= 0.99992
    assert (full - lse).abs().max() < LSE_VS_REF


def test_sm_scale(record):
    q, k, v = make(H=2, Sq=200, D=64)
    check(record, "sm_scale=0.3", q, k, v, sm_scale=0.3)


def test_fully_masked_rows(record):
    # Sq > Sk causal: the first Sq - Sk rows see no key: zeros and LSE -inf.
    q, k, v = make(H=2, Sq=300, Sk=100, D=64)
    out, lse = check(record, "fully masked rows", q, k, v, causal=True)
    assert torch.all(out[:, :, :200] == 0) and torch.all(lse[:, :, :200] == -math.inf)


def test_large_magnitudes_stay_finite(record):
    # Issue 2a: |v| near the fp16 range must not overflow in "fp32" mode, and large |q.k|
    # (a near one-hot softmax) must stay finite.
    q, k, v = make(H=2, Sq=256, D=128, dtype=torch.float16, outlier=False)
    check(record, "|v| = 60000 (fp16)", q, k, (v.float().sign() * 60000).half())
    big_q, big_k = q * 16, k * 16
    out = sm80(big_q, big_k, v)
    m = reference.compare(out, reference.attention(big_q, big_k, v))
    record("|q.k| x256 (one-hot softmax)", rel_l1=m["rel_l1"], cos=m["cos"])
    assert m["finite"] and m["cos"] >= 0.99, m


# ---- robustness ------------------------------------------------------------------------------

def test_poisoned_buffers(record, monkeypatch):
    # Every buffer the kernels write (temporaries, out, LSE) starts as NaN (int8: -128): a
    # single element left unwritten shows up as NaN or as a mismatch with the emulator.
    monkeypatch.setattr(ops, "POISON", True)
    for Sq, Sk, D, causal in ((1, 1, 64, False), (65, 63, 72, True), (129, 4097, 128, True),
                              (1000, 127, 32, False)):
        q, k, v = make(H=2, Hkv=1, Sq=Sq, Sk=Sk, D=D, seed=Sq + Sk)
        for acc in ("fp32", "fp16+fp32"):
            check(record, "poisoned buffers", q, k, v, causal=causal, acc=acc)


def test_determinism():
    q, k, v = make(H=4, Sq=1000, Sk=1500, D=128)
    a = sm80(q, k, v, is_causal=True, return_lse=True)
    b = sm80(q, k, v, is_causal=True, return_lse=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_non_default_stream():
    q, k, v = make(H=4, Sq=1000, D=128)
    expected = sm80(q, k, v)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        inputs = [torch.empty_like(x) for x in (q, k, v)]
        torch.cuda._sleep(100_000_000)      # keeps the side stream busy ~50 ms
        for dst, src in zip(inputs, (q, k, v)):
            dst.copy_(src)
        # Launched anywhere but the current (side) stream, the kernels would read the inputs
        # before the copies land.
        out = sm80(*inputs)
    side.synchronize()
    assert torch.equal(out, expected)


def test_cuda_graph_capture_and_replay():
    q, k, v = make(H=4, Sq=500, D=128, seed=1)
    static = [x.clone() for x in (q, k, v)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sm80(*static, is_causal=True)        # warm-up: loads the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sm80(*static, is_causal=True)
    fresh = make(H=4, Sq=500, D=128, seed=2)
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, sm80(*fresh, is_causal=True))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_fullgraph(mode):
    q, k, v = make(H=4, Sq=256, Sk=384, D=64)

    def f(q, k, v):
        return sageattn.sageattn(q, k, v, is_causal=True, return_lse=True)

    compiled = torch.compile(f, fullgraph=True, mode=mode)
    for seed in (0, 1, 2):
        q, k, v = make(H=4, Sq=256, Sk=384, D=64, seed=seed)
        got, want = compiled(q, k, v), f(q, k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_opcheck():
    q, k, v = make(H=2, Sq=130, Sk=70, D=64)
    for args in ((q, k, v, "HND", True, 0.125, True, "", "", "", "", -1),
                 (q, k, v, "HND", False, 0.125, False, "sm80", "", "per_warp", "fp16+fp32", 0)):
        torch.library.opcheck(torch.ops.sageattn.attention.default, args)


def test_output_on_input_device_and_current_device_untouched():
    q, k, v = make(H=2, Sq=100, D=64)
    before = torch.cuda.current_device()
    out = sm80(q, k, v)
    assert out.device == q.device and torch.cuda.current_device() == before


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_without_set_device(record):
    torch.cuda.set_device(0)
    q, k, v = (x.to("cuda:1") for x in make(H=2, Sq=300, D=64))
    out = check(record, "cuda:1 while cuda:0 is current", q, k, v, causal=True)[0]
    assert out.device == torch.device("cuda:1") and torch.cuda.current_device() == 0


# ---- long sequences: 32-bit offsets ---------------------------------------------------------

def _rows_vs_reference(out, q, k, v, rows, layout="HND"):
    qh, oh = (reference.to_hnd(x, layout) for x in (q, out))
    sub = reference.attention(qh[:, :, rows], reference.to_hnd(k, layout),
                              reference.to_hnd(v, layout))
    return reference.compare(oh[:, :, rows], sub)


def test_long_sequence_131k(record):
    S = 131072 + 65
    q, k, v = make(H=1, Sq=S, D=64, seed=3)
    out = sm80(q, k, v)
    for rows in (slice(0, 128), slice(S - 128, S)):
        m = _rows_vs_reference(out, q, k, v, rows)
        record("S=131137 (rows checked vs reference)", rel_l1=m["rel_l1"], cos=m["cos"])
        assert m["finite"] and m["rel_l1"] <= 0.02 and m["cos"] >= 0.9998, m


def test_more_than_2_31_elements(record):
    # q and out hold 2 * 8 * (2^20 + 1) * 128 > 2^31 elements: element offsets overflow int32.
    B, H, Sq, Sk, D = 2, 8, 2**20 + 1, 100, 128
    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(B, H, Sq, D, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, H, Sk, D, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, H, Sk, D, generator=g, device="cuda", dtype=torch.bfloat16)
    out = sm80(q, k, v)
    for rows in (slice(0, 128), slice(Sq - 128, Sq)):
        m = _rows_vs_reference(out[1:, -1:], q[1:, -1:], k[1:, -1:], v[1:, -1:], rows)
        record("B*H*S*D > 2^31 (last head, rows vs reference)", rel_l1=m["rel_l1"], cos=m["cos"])
        assert m["finite"] and m["rel_l1"] <= 0.02 and m["cos"] >= 0.9998, m
    del q, k, v, out
    torch.cuda.empty_cache()


# ---- probe -----------------------------------------------------------------------------------

def test_explain_on_this_gpu():
    r = sageattn.explain(path="sm80")      # the default is sm89 on 8.9 and 12.x
    assert r["device"] is not None and r["path"] is not None, r
    assert r["runs_as"].startswith(("SASS", "PTX")) and r["kernel"].startswith("sm80_")
    print("\n" + str(r))
