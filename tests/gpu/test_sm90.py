"""The sm90 kernels (Hopper: wgmma INT8 QK^T + FP8 E4M3 PV, TMA, warp-specialized) on an H100,
against the emulator (``emulate.sm90_attention``: same quantization, 128-key steps) and the
exact fp32 reference. Runs only on compute capability 9.0 with the sm90 tree built and run by
this version of the package (``sageattn.explain(path="sm90")`` says why not otherwise). Run with
``pytest -m gpu -s tests/gpu/test_sm90.py``; the error table prints at the end.

Bounds:
* kernel vs emulator (``VS_EMU``, rel-L1): they quantize identically; besides ex2.approx and
  summation order (as on sm89), Hopper's FP8 wgmma accumulates with less than fp32 precision,
  which the emulator does not model. A rough model of it, tried on the CPU and kept out of the
  emulator (after each 32-key k-chunk the sum keeps 13 bits below the leading bit of the larger
  of the accumulator and the chunk's largest product, truncated), predicted ~1.3e-4 for
  "fp32+fp32" (each 128-key step from zero) and, for "fp32" (the whole sequence in the wgmma
  accumulator), 8e-4 at S=1024 growing to 3e-3 at S=4096. Bounds: 1e-3 and 1e-2,
  both well below the FP8 quantization error itself (rel-L1 ~0.037); the table records the
  measured values.
* kernel vs reference: no worse than the emulator's own error plus that bound.
* LSE vs emulator (``LSE_VS_EMU_SM90``): since sm90 v16 the row sums come from the tensor core
  (the E4M3 P times an all-ones tile), whose FP8 accumulation drops low-order bits like the P V
  product's, so the kernel's l is slightly low: measured on an H100, kernel minus emulator LSE
  -3.5e-5 to -3.7e-5 on average on random and outlier inputs (max 5.6e-4), -6.4e-4 with a
  peaked softmax (sm_scale 0.3, D 64: max 2.3e-3); the emulator's exact sums had agreed to
  1e-6. Bound 5e-3 (the other paths, with fp32 sums: path_checks.LSE_VS_EMU = 2e-3).
* acceptance (issue 3, "Hopper flagship"): the outlier input (B=1, H=8, S=4096, D=128, bf16,
  K plus a per-channel bias 4*N(0,1)) through ``sageattn.sageattn`` (the default path on 9.0),
  causal and not: rel-L1 <= 0.035 and cos >= 0.9993 against fp32. The emulator of the specified
  algorithm predicts 0.0379 / 0.99928 non-causal and 0.0364 / 0.99939 causal on CPU-drawn
  inputs (tests/test_emulator_sm90.py), i.e. SageAttention 2.2.0's 0.0378 / 0.99928: unless the
  algorithm changes (E4M3 rounding of P alone costs 0.026, of V alone 0.027), this test fails
  on rel-L1, and its message says so. The kernel-vs-emulator check on the same input is a
  separate test, so a kernel bug and the algorithm's accuracy are told apart.
"""

import math
from typing import NamedTuple, Optional

import pytest
import torch

import sageattn
from sageattn import emulate, ops, reference
from path_checks import LENGTHS, LSE_VS_REF, check_call, make, maybe_compiled

pytestmark = pytest.mark.gpu

MODES = ("fp32+fp32", "fp32")
VS_EMU = {"fp32+fp32": 1e-3, "fp32": 1e-2}     # rel-L1 kernel vs emulator
LSE_VS_EMU_SM90 = 5e-3                         # max |LSE kernel - LSE emulator| (docstring)
ISSUE_REL_L1, ISSUE_COS = 0.035, 0.9993        # issue 3's accuracy bound on the outlier input

# The entry point arrives with the sm90 kernel; until then every test here skips.
sm90 = getattr(sageattn, "sageattn_qk_int8_pv_fp8_cuda_sm90", None)
_CALL = maybe_compiled(sm90) if sm90 is not None else None


@pytest.fixture(autouse=True)
def sm90_device():
    """Skips unless this is compute capability 9.0 and the package runs its sm90 tree."""
    capability = torch.cuda.get_device_capability()
    if capability != (9, 0):
        pytest.skip(f"the sm90 tree is sm_90a only; this device is {capability}")
    if sm90 is None:
        pytest.skip("sageattn has no sageattn_qk_int8_pv_fp8_cuda_sm90 yet")
    report = sageattn.explain(path="sm90")
    if report["path"] != "sm90":
        pytest.skip(f"the sm90 path does not run here: {report['reason']}")


def check(record, group, q, k, v, acc="fp32+fp32", **kw):
    """The sm90 entry point against its emulator and the reference (path_checks.check_call)."""
    return check_call(record, group, _CALL, emulate.sm90_attention, VS_EMU[acc], q, k, v,
                      acc=acc, lse_vs_emu=LSE_VS_EMU_SM90, **kw)


# ---- acceptance --------------------------------------------------------------------------

def _outlier_4096():
    return make(B=1, H=8, Sq=4096, D=128, dtype=torch.bfloat16, outlier=True, seed=1234)


@pytest.mark.xfail(strict=True, reason=(
    "issue 3's accuracy bound (rel-L1 <= 0.035, cos >= 0.9993) is below what this algorithm "
    "gives: the emulator (exact to the kernel's quantization) measures 0.0377 / 0.99929 on this "
    "input, as does SageAttention 2.2.0's Hopper path (0.0378 / 0.99928); E4M3 rounding of P "
    "and of V cost ~0.026 each (CPU, emulator). The kernel matches the emulator to 1.4e-4-1.8e-4 "
    "(asserted within VS_EMU by test_acceptance_input_matches_emulator)."))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_acceptance_outlier_4096(record, causal):
    q, k, v = _outlier_4096()
    out = sageattn.sageattn(q, k, v, is_causal=causal)      # the default path on 9.0
    ref = reference.attention(q, k, v, is_causal=causal)
    emu = emulate.sm90_attention(q, k, v, is_causal=causal)
    m, e, ve = reference.compare(out, ref), reference.compare(emu, ref), reference.compare(out, emu)
    tag = "causal" if causal else "full"
    record(f"ACCEPT sm90 outlier B1 H8 S4096 D128 bf16 {tag}", rel_l1=m["rel_l1"], cos=m["cos"],
           emu_rel_l1=e["rel_l1"], vs_emu=ve["rel_l1"])
    sdpa = reference.compare(
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal), ref)
    record(f"(torch SDPA bf16, same input, {tag})", rel_l1=sdpa["rel_l1"], cos=sdpa["cos"])
    met = m["rel_l1"] <= ISSUE_REL_L1 and m["cos"] >= ISSUE_COS
    print(f"\nACCEPT sm90 causal={causal}: rel-L1 {m['rel_l1']:.5f} (<= {ISSUE_REL_L1}) cos "
          f"{m['cos']:.6f} (>= {ISSUE_COS}): {'met' if met else 'NOT met'}; emulator rel-L1 "
          f"{e['rel_l1']:.5f} cos {e['cos']:.6f}; kernel vs emulator {ve['rel_l1']:.2e}; "
          f"SageAttention 2.2.0 Hopper: 0.0378 / 0.99928")
    assert m["finite"]
    assert met, (f"issue bound not met (rel-L1 {m['rel_l1']:.5f}, cos {m['cos']:.6f}); the "
                 f"emulator of this algorithm gives {e['rel_l1']:.5f} / {e['cos']:.6f}: "
                 + ("the algorithm, not the kernel, misses it"
                    if e["rel_l1"] > ISSUE_REL_L1 or e["cos"] < ISSUE_COS else
                    "the emulator meets it, so the kernel adds error"))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_acceptance_input_matches_emulator(record, causal):
    q, k, v = _outlier_4096()
    check(record, f"sm90 outlier S4096 D128 {'causal' if causal else 'full'}", q, k, v,
          causal=causal)


def test_default_path_on_9_0_is_sm90():
    report = sageattn.explain()
    assert report["path"] == "sm90", report
    q, k, v = make(B=2, H=4, Sq=300, Sk=500, D=128)
    out, lse = sageattn.sageattn(q, k, v, is_causal=True, return_lse=True)
    want, want_lse = sm90(q, k, v, is_causal=True, return_lse=True)     # the path's defaults
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert torch.equal(out, sageattn.sageattn(q, k, v, is_causal=True, path="sm90"))
    print("\n" + str(sageattn.explain(path="sm90", head_dim=128)))


# ---- shapes and configurations -------------------------------------------------------------

@pytest.mark.parametrize("Sk", LENGTHS)
@pytest.mark.parametrize("Sq", LENGTHS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lengths(record, Sq, Sk, causal):
    q, k, v = make(H=2, Sq=Sq, Sk=Sk, D=128, seed=Sq * 7919 + Sk)
    check(record, f"sm90 lengths {{1..4097}}^2 {'causal' if causal else 'full'}", q, k, v,
          causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("gran", ["per_thread", "per_warp"])
@pytest.mark.parametrize("acc", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("outlier", [False, True], ids=["random", "outlier"])
def test_configs(record, dtype, gran, acc, causal, layout, outlier):
    q, k, v = make(B=2, H=4, Hkv=2, Sq=300, Sk=500, D=128, dtype=dtype, outlier=outlier,
                   layout=layout)
    check(record, f"sm90 {gran} {acc} {'outlier' if outlier else 'random'}", q, k, v,
          layout=layout, causal=causal, gran=gran, acc=acc)


@pytest.mark.parametrize("acc", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_smooth_v(record, acc, causal):
    q, k, v = make(B=2, H=4, Hkv=2, Sq=300, Sk=700, D=128, v_offset=8.0)
    on = check(record, f"sm90 smooth_v {acc}", q, k, v, causal=causal, acc=acc,
               smooth_v=True)[0]
    off = check(record, f"sm90 V offset, no smooth_v {acc}", q, k, v, causal=causal,
                acc=acc)[0]
    ref = reference.attention(q, k, v, is_causal=causal)
    assert reference.compare(on, ref)["rel_l1"] < reference.compare(off, ref)["rel_l1"]


@pytest.mark.parametrize("D", [32, 64, 72, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_head_dims(record, D, dtype):
    q, k, v = make(H=4, Sq=333, Sk=777, D=D, dtype=dtype)
    for acc in MODES:
        check(record, f"sm90 head dim {D}", q, k, v, causal=True, acc=acc)
    check(record, f"sm90 head dim {D}", q, k, v, causal=False)


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (8, 1), (6, 3)])
def test_gqa_mqa(record, Hq, Hkv):
    q, k, v = make(B=2, H=Hq, Hkv=Hkv, Sq=257, Sk=1000, D=128)
    check(record, "sm90 GQA/MQA", q, k, v, causal=True, smooth_v=True)
    check(record, "sm90 GQA/MQA", q, k, v, gran="per_warp")


def test_expanded_kv(record):
    q, k, v = make(H=8, Hkv=1, Sq=200, Sk=300, D=128)
    out = check(record, "sm90 strided views", q, k.expand(1, 8, 300, 128),
                v.expand(1, 8, 300, 128))[0]
    torch.testing.assert_close(out, sm90(q, k, v), rtol=0, atol=0)


def test_fused_qkv_slices(record):
    g = torch.Generator(device="cuda").manual_seed(5)
    qkv = torch.randn(2, 700, 3, 8, 128, generator=g, device="cuda").to(torch.bfloat16)
    q, k, v = qkv.unbind(2)
    check(record, "sm90 strided views", q, k, v, layout="NHD", causal=True)


def test_transposed_views(record):
    q, k, v = make(B=2, H=4, Sq=300, Sk=400, D=64, layout="NHD")
    check(record, "sm90 strided views", *(x.transpose(1, 2) for x in (q, k, v)))


def test_unaligned_and_odd_strides(record):
    # Pointers and strides that no TMA descriptor of the raw inputs could take.
    g = torch.Generator(device="cuda").manual_seed(9)
    big = torch.randn(2, 4, 300, 72 + 3, generator=g, device="cuda").to(torch.float16)
    q, k, v = big[..., 1:73], big[..., 2:74], big[..., 3:75]
    assert q.data_ptr() % 16 != 0
    check(record, "sm90 strided views", q, k, v, causal=True, smooth_v=True)
    flat = torch.randn(100_000, generator=g, device="cuda").to(torch.float16)
    q1 = torch.as_strided(flat, (1, 1, 90, 64), (3, 7, 64, 1), storage_offset=5)
    k1 = torch.as_strided(flat, (1, 1, 130, 64), (11, 13, 72, 1), storage_offset=9)
    check(record, "sm90 strided views", q1, k1, k1, acc="fp32")


@pytest.mark.parametrize("smooth_k", [True, False])
def test_lse_and_merge(record, smooth_k):
    q, k, v = make(H=4, Sq=512, Sk=2048, D=128, outlier=smooth_k)
    out, lse = check(record, "sm90 LSE (smooth_k on/off)", q, k, v, smooth_k=smooth_k)
    o1, l1 = sm90(q, k[:, :, :1024], v[:, :, :1024], smooth_k=smooth_k, return_lse=True)
    o2, l2 = sm90(q, k[:, :, 1024:], v[:, :, 1024:], smooth_k=smooth_k, return_lse=True)
    full = torch.logaddexp(l1, l2)
    merged = (o1.float() * torch.exp(l1 - full)[..., None] +
              o2.float() * torch.exp(l2 - full)[..., None])
    m = reference.compare(merged, reference.attention(q, k, v))
    record("sm90 LSE merge of two halves", rel_l1=m["rel_l1"], cos=m["cos"])
    assert m["rel_l1"] <= 0.042 and m["cos"] >= 0.9991
    assert (full - lse).abs().max() < LSE_VS_REF


def test_sm_scale(record):
    q, k, v = make(H=2, Sq=200, D=64)
    check(record, "sm90 sm_scale=0.3", q, k, v, sm_scale=0.3)


def test_fully_masked_rows(record):
    # Sq > Sk causal: the first Sq - Sk rows see no key: zeros (not V's mean) and LSE -inf.
    q, k, v = make(H=2, Sq=300, Sk=100, D=64, v_offset=3.0)
    out, lse = check(record, "sm90 fully masked rows", q, k, v, causal=True, smooth_v=True)
    assert torch.all(out[:, :, :200] == 0) and torch.all(lse[:, :, :200] == -math.inf)


@pytest.mark.parametrize("acc", MODES)
def test_large_magnitudes_stay_finite(record, acc):
    # fp16 V of magnitude 1e3, and near fp16's range: V is scaled per channel, so nothing may
    # overflow. q = 0 makes every P 448, the largest sums.
    q, k, v = make(H=2, Sq=256, D=128, dtype=torch.float16, outlier=False)
    v1k = (1000 + 400 * v.float()).half()
    check(record, f"sm90 |v| ~ 1e3 (fp16) {acc}", q, k, v1k, acc=acc)
    out = sm90(torch.zeros_like(q), k, v1k, pv_accum_dtype=acc)
    m = reference.compare(out, reference.attention(torch.zeros_like(q), k, v1k))
    record(f"sm90 |v| ~ 1e3, uniform P {acc}", rel_l1=m["rel_l1"], cos=m["cos"])
    assert m["finite"] and m["rel_l1"] < 0.01, m
    check(record, f"sm90 |v| = 60000 (fp16) {acc}", q, k, (v.float().sign() * 60000).half(),
          acc=acc)


# ---- robustness ------------------------------------------------------------------------------

def test_poisoned_buffers(record, monkeypatch):
    # Every buffer allocated through ops._empty (temporaries, out, LSE) starts as NaN (int8:
    # -128; uint8 E4M3 tiles: 0xff, an E4M3 NaN): one element left unwritten shows up.
    monkeypatch.setattr(ops, "POISON", True)
    for Sq, Sk, D, causal in ((1, 1, 64, False), (65, 63, 72, True), (129, 4097, 128, True),
                              (1000, 127, 32, False), (300, 200, 128, True)):
        q, k, v = make(H=2, Hkv=1, Sq=Sq, Sk=Sk, D=D, seed=Sq + Sk)
        for acc in MODES:
            check(record, "sm90 poisoned buffers", q, k, v, causal=causal, acc=acc,
                  smooth_v=(acc == "fp32"))


def test_kernel_only_launcher_matches_the_call():
    # bench/bench_paths.py times ops.attention_kernel_only: it must run the same kernel.
    q, k, v = make(B=2, H=4, Sq=1000, D=128)
    for causal in (False, True):
        launch = ops.attention_kernel_only(q, k, v, path="sm90", is_causal=causal)
        first = launch().clone()
        assert torch.equal(launch(), first)
        assert torch.equal(first, sm90(q, k, v, is_causal=causal))


def test_determinism():
    q, k, v = make(H=4, Sq=1000, Sk=1500, D=128)
    for acc in MODES:
        a = sm90(q, k, v, is_causal=True, return_lse=True, pv_accum_dtype=acc, smooth_v=True)
        b = sm90(q, k, v, is_causal=True, return_lse=True, pv_accum_dtype=acc, smooth_v=True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_non_default_stream():
    q, k, v = make(H=4, Sq=1000, D=128)
    expected = sm90(q, k, v)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        inputs = [torch.empty_like(x) for x in (q, k, v)]
        torch.cuda._sleep(100_000_000)      # keeps the side stream busy ~50 ms
        for dst, src in zip(inputs, (q, k, v)):
            dst.copy_(src)
        out = sm90(*inputs)
    side.synchronize()
    assert torch.equal(out, expected)


def test_cuda_graph_capture_and_replay():
    q, k, v = make(H=4, Sq=500, D=128, seed=1)
    static = [x.clone() for x in (q, k, v)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sm90(*static, is_causal=True)       # loads the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sm90(*static, is_causal=True)
    fresh = make(H=4, Sq=500, D=128, seed=2)
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, sm90(*fresh, is_causal=True))


def test_torch_compile_fullgraph():
    def f(q, k, v):
        a = sageattn.sageattn(q, k, v, is_causal=True, return_lse=True)
        b = sm90(q, k, v, pv_accum_dtype="fp32", smooth_v=True)
        return a[0], a[1], b

    compiled = torch.compile(f, fullgraph=True)
    for seed in (0, 1):
        q, k, v = make(H=4, Sq=256, Sk=384, D=64, seed=seed)
        got, want = compiled(q, k, v), f(q, k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_long_sequence_65k(record):
    S = 65536 + 65
    q, k, v = make(H=1, Sq=S, D=128, seed=3)
    out = sm90(q, k, v)
    for rows in (slice(0, 128), slice(S - 128, S)):
        m = reference.compare(out[:, :, rows], reference.attention(q[:, :, rows], k, v))
        record("sm90 S=65601 (rows checked vs reference)", rel_l1=m["rel_l1"], cos=m["cos"])
        assert m["finite"] and m["rel_l1"] <= 0.055 and m["cos"] >= 0.998, m


_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}  # _abi.DTYPE_*


class Launch(NamedTuple):
    name: str                # the kernel's
    grid: tuple
    q_source: Optional[int]  # Sm90AttnParams.q_source_dtype (attention launches), else None
    programmatic: bool


@pytest.fixture
def launches(monkeypatch):
    """Every ops._launch of the test, in order (each still runs)."""
    log = []
    real = ops._launch

    def spy(kernel, device, grid, params, stream, programmatic=False):
        log.append(Launch(kernel.name, grid, getattr(params, "q_source_dtype", None), programmatic))
        real(kernel, device, grid, params, stream, programmatic)

    monkeypatch.setattr(ops, "_launch", spy)
    return log


def _q_sources(launches):
    return [x.q_source for x in launches if x.q_source is not None]


def _q_in_kernel_vs_quantizer(monkeypatch, launches, q, k, v, **kw):
    """The same call with Q quantized inside the kernel and by the quantizer: equal bit for bit
    (same lanes, scale groups and rounding), and each launch sequence as intended."""
    def quantize_ctas():  # the quantize launch's jobs (Q's, K's and V's)
        return sum(x.grid[0] for x in launches if "quantize_qk" in x.name)

    monkeypatch.setattr(ops, "SM90_QUANTIZE_Q_IN_KERNEL", True)  # every kernel that can
    out_kernel = sm90(q, k, v, **kw)
    quant_grid, q_source = quantize_ctas(), launches[-1].q_source
    launches.clear()
    monkeypatch.setattr(ops, "SM90_QUANTIZE_Q_IN_KERNEL", False)
    out_quantizer = sm90(q, k, v, **kw)
    assert launches[-1].q_source == -1 and quantize_ctas() > quant_grid, "Q jobs must run here"
    return out_kernel, out_quantizer, q_source


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("gran", ["per_thread", "per_warp"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_q_quantized_in_kernel_equals_quantizer(monkeypatch, launches, D, gran, causal, layout,
                                               dtype):
    # Sq = 300: partial 128- and 192-row CTAs; GQA; Sk != Sq.
    q, k, v = make(B=2, H=4, Hkv=2, Sq=300, Sk=520, D=D, dtype=dtype, layout=layout, seed=D)
    q = q * 3.0  # rows of varied magnitude across the scale groups
    out_kernel, out_quantizer, q_source = _q_in_kernel_vs_quantizer(
        monkeypatch, launches, q, k, v, tensor_layout=layout, is_causal=causal, qk_quant_gran=gran)
    assert q_source == _DTYPE_CODES[dtype], "the kernel was meant to quantize Q here"
    assert torch.equal(out_kernel, out_quantizer)
    # Equal outputs could still both be wrong: hold them to the fp32 reference too (the FP8
    # path's error here is ~0.04; zeros or an unwritten output give 1 or NaN).
    want = reference.attention(q, k, v, tensor_layout=layout, is_causal=causal)
    assert float((out_kernel.float() - want).abs().sum() / want.abs().sum()) < 0.1



@pytest.mark.parametrize("case", ["sliced", "one_row", "one_head_batch"])
def test_q_quantized_in_kernel_strides(monkeypatch, launches, case):
    # Q as a 16-byte-aligned slice of a wider tensor (strides the copy engine takes as given),
    # a single query row, and size-1 batch/head dims (their strides are synthesized).
    if case == "sliced":
        q, k, v = make(B=2, H=3, Sq=200, Sk=260, D=128)
        q = torch.cat([q, q], dim=-1)[..., 64:192]
    elif case == "one_row":
        q, k, v = make(B=2, H=2, Sq=1, Sk=700, D=64)
    else:
        q, k, v = make(B=1, H=1, Sq=390, Sk=390, D=128)
    out_kernel, out_quantizer, q_source = _q_in_kernel_vs_quantizer(monkeypatch, launches, q, k, v)
    assert q_source >= 0
    assert torch.equal(out_kernel, out_quantizer)
    want = reference.attention(q, k, v)
    assert (out_kernel.float() - want).abs().sum() / want.abs().sum() < 0.05


def test_q_from_the_quantizer_where_the_kernel_cannot(monkeypatch, launches):
    # Head dim 72 (padded), an LSE with K smoothing (the quantizer's Q jobs compute the LSE
    # correction) and unaligned Q all keep the quantizer's Q.
    monkeypatch.setattr(ops, "SM90_QUANTIZE_Q_IN_KERNEL", True)
    q, k, v = make(B=1, H=2, Sq=200, D=72)
    sm90(q, k, v)
    q, k, v = make(B=1, H=2, Sq=200, D=128)
    sm90(q, k, v, return_lse=True)
    sm90(torch.cat([q, q], dim=-1)[..., 4:132], k, v)
    assert _q_sources(launches) == [-1, -1, -1]


def test_programmatic_launches(monkeypatch, launches):
    # A call's first launch is plain, the later ones programmatic (each may start while the one
    # before drains and waits for it in the kernel). Outputs must equal those of plain launches
    # bit for bit, over back-to-back calls of several shapes whose temporaries reuse memory
    # (a read of the quantizer's buffers before it finished would show here).
    cases = [make(B=2, H=4, Sq=S, Sk=S, D=D, seed=S + D) + (causal,)
             for S, D, causal in ((1000, 128, False), (4096, 128, False), (333, 64, True),
                                  (2048, 128, True), (700, 64, False))]

    def calls():
        return [sm90(q, k, v, is_causal=causal) for q, k, v, causal in cases for _ in range(3)]

    monkeypatch.setattr(ops, "SM90_PROGRAMMATIC_LAUNCH", False)
    plain = calls()
    assert not any(x.programmatic for x in launches)
    launches.clear()
    monkeypatch.setattr(ops, "SM90_PROGRAMMATIC_LAUNCH", True)
    overlapped = calls()
    # channel stats of K (plain), of V, quantize, requantize, attention
    assert [x.programmatic for x in launches] == [False, True, True, True, True] * len(cases) * 3
    for a, b in zip(plain, overlapped):
        assert torch.equal(a, b)
    q, k, v, _ = cases[1]
    want = reference.attention(q, k, v)
    assert float((overlapped[3].float() - want).abs().sum() / want.abs().sum()) < 0.05


def test_long_causal_calls_take_the_192_row_kernel(record, monkeypatch, launches):
    # Causal hd128 "fp32+fp32" calls take the 192-row kernel from ops.SM90_CAUSAL_Q192_MIN_ROWS
    # query rows on (counted alike in both layouts); with the threshold at 1, short causal shapes
    # run on it too, against the emulator: Sq = Sk, Sq < Sk (bottom-right diagonal), Sq > Sk
    # (rows that see no key), GQA, NHD, fp16, a partial last 192-row CTA.
    long = ops.SM90_CAUSAL_Q192_MIN_ROWS
    for Sq, layout, tag in ((long, "HND", "_q192_hd128"), (long - 1, "HND", "_acc32x32_hd128"),
                            (long, "NHD", "_q192_hd128")):
        q, k, v = make(H=1, Sq=Sq, D=128, layout=layout)
        launches.clear()
        sm90(q, k, v, is_causal=True, tensor_layout=layout)
        assert launches[-1].name.endswith(tag), (Sq, layout, launches)
    monkeypatch.setattr(ops, "SM90_CAUSAL_Q192_MIN_ROWS", 1)
    for Sq, Sk, H, Hkv, layout, dtype in ((1000, 1000, 2, 2, "HND", torch.bfloat16),
                                          (333, 777, 4, 2, "NHD", torch.float16),
                                          (300, 100, 2, 2, "HND", torch.bfloat16),
                                          (129, 4097, 2, 1, "HND", torch.bfloat16)):
        q, k, v = make(H=H, Hkv=Hkv, Sq=Sq, Sk=Sk, D=128, dtype=dtype, layout=layout)
        launches.clear()
        check(record, "sm90 causal on the 192-row kernel", q, k, v, causal=True, layout=layout)
        assert launches[-1].name.endswith("_q192_hd128"), launches


def test_q_in_kernel_policy(monkeypatch, launches):
    # "auto" (the default): the kernel quantizes Q of every dense call it can, causal or not,
    # hd64 or hd128; False: never.
    monkeypatch.setattr(ops, "SM90_QUANTIZE_Q_IN_KERNEL", "auto")
    for D, causal in ((128, False), (128, True), (64, False), (64, True)):
        q, k, v = make(B=1, H=2, Sq=256, D=D)
        sm90(q, k, v, is_causal=causal)
    assert _q_sources(launches) == [1, 1, 1, 1]
    launches.clear()
    monkeypatch.setattr(ops, "SM90_QUANTIZE_Q_IN_KERNEL", False)
    q, k, v = make(B=1, H=2, Sq=256, D=128)
    sm90(q, k, v)
    assert _q_sources(launches) == [-1]
