"""The quantization launches alone (channel stats + the fused quantize kernel of the sm80, sm89
and sm90 trees), bit for bit against exact host models: no tolerance anywhere except the LSE
correction (a dot product whose summation order the emulator does not follow).

* Channel stats: ``stats_model`` replays the kernel's fixed summation order in fp32 (row lane
  r adds rows r, r+32, r+64, ... in turn; the 32 lane partials are then added in lane order;
  one division by the length), so the mean must match to the bit; min/max are order-free.
  The K mean is of emulate.K_MEAN_SAMPLE_TOKENS sampled keys where the sequence is longer
  (lengths 1000 and 4097 below), the same rows in the same order; so are V's statistics in
  the calls whose scales take a margin (emulate.v_amax_margin: all but "fp32+fp16" and
  smooth_v).
* V's scales then: margin x the sample's amax, or the exact amax in a head where a code
  saturates with that (the requantize launch), as emulate.v_channel_amax says;
  test_v_requantize forces both kinds of head in one call.
* Quantize: given the kernel's own channel statistics, the emulator's quantize_q / quantize_k
  / convert_v / quantize_v_fp8 use the kernel's fp32 operations in the kernel's order
  (emulate.py says so), so INT8 codes, E4M3 codes, fp16 V and every scale must match to the
  bit, padding included. Buffers are poisoned first (ops.POISON), so a byte the kernel fails to
  write shows up as -128 / NaN.

The emulator runs on the CPU (IEEE fp32 ops). Run: ``pytest -m gpu tests/gpu/test_quantize_identity.py``.
"""

import math

import pytest
import torch

from sageattn import emulate, ops

pytestmark = pytest.mark.gpu

LENGTHS = (1, 63, 65, 1000, 4097)
_LOG2E = math.log2(math.e)


TREES = ("sm80", "sm89", "sm90")
_MIN_CAPABILITY = {"sm80": (8, 0), "sm89": (8, 9), "sm90": (9, 0)}


def _needs(tree):
    """Skips a tree this device has no code for (asked at run time, not at collection)."""
    cap = torch.cuda.get_device_capability()
    if cap < _MIN_CAPABILITY[tree] or (tree == "sm90" and cap != (9, 0)):
        pytest.skip(f"the {tree} tree does not run on compute capability {cap}")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(ops, "POISON", True)


def _bits_equal(name, got, want):
    """Exact comparison (float bits, so -0 != +0 and NaN is caught)."""
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.dtype in (torch.float32,):
        got, want = got.view(torch.int32), want.to(torch.float32).view(torch.int32)
    elif got.dtype == torch.float16:
        got, want = got.view(torch.int16), want.view(torch.int16)
    bad = (got != want)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        pytest.fail(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ, first at "
                    f"{idx}: kernel {got[tuple(idx)].item()} vs model {want[tuple(idx)].item()}")


def stats_model(x: torch.Tensor, d_pad: int, sample: int = 0):
    """The channel-stats kernel's (mean, min, max) of (B, H, S, D) ``x``, in its exact fp32
    order: per row lane r (0..31) a running sum over rows r, r+32, ...; then the lane sums
    added in lane order; then / S. Adding the zero padding rows changes no sum (the running
    sum starts at +0 and cannot become -0). ``sample`` (the K mean's sample_tokens): the rows
    are the sampled tokens in sample order when S is longer."""
    B, H, S, D = x.shape
    if 0 < sample < S:
        x, S = x[:, :, emulate.sampled_tokens(S, sample)], sample
    xf = x.float().cpu()
    rows = -(-S // 32) * 32
    padded = torch.zeros((B, H, rows, d_pad), dtype=torch.float32)
    padded[:, :, :S, :D] = xf
    steps = padded.view(B, H, rows // 32, 32, d_pad)
    lane = torch.zeros((B, H, 32, d_pad), dtype=torch.float32)
    for t in range(rows // 32):
        lane = lane + steps[:, :, t]
    total = torch.zeros((B, H, d_pad), dtype=torch.float32)
    for r in range(32):
        total = total + lane[:, :, r]
    mean = total / torch.tensor(float(S), dtype=torch.float32)
    lo, hi = torch.zeros((B, H, d_pad)), torch.zeros((B, H, d_pad))
    lo[:, :, :D] = xf.amin(dim=2)
    hi[:, :, :D] = xf.amax(dim=2)
    return mean, lo, hi


def _sequences(x, cu):
    """(1, H, len, D) HND views of each packed varlen sequence, or the dense batch items."""
    if cu is None:
        return [x[b:b + 1] for b in range(x.shape[0])]
    c = cu.tolist()
    return [x[c[b]:c[b + 1]].transpose(0, 1).unsqueeze(0) for b in range(len(c) - 1)]


def _pad_rows(t, dim, size):
    """Zero-pad ``t`` along ``dim`` to ``size`` (varlen: a sequence's blocks up to the max)."""
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=dim)


def check_identity(tree, q, k, v, *, layout="HND", gran="per_thread", smooth_k=True,
                   smooth_v=False, acc=None, varlen=None):
    """Quantize on the GPU, model on the CPU, compare every buffer bit for bit."""
    _needs(tree)
    saved = [x.clone() for x in (q, k, v)]
    sm_scale = q.shape[-1] ** -0.5
    buf = ops.quantized_operands(q, k, v, path=tree, tensor_layout=layout, sm_scale=sm_scale,
                                 qk_quant_gran=gran, pv_accum_dtype=acc, smooth_k=smooth_k,
                                 smooth_v=smooth_v, return_lse=True, varlen=varlen)
    torch.cuda.synchronize()
    for x, x0 in zip((q, k, v), saved):
        assert torch.equal(x, x0), "an input was modified"
    if varlen is None:
        qh, kh, vh = (x.transpose(1, 2) if layout == "NHD" else x for x in (q, k, v))
        seq_q, seq_k, seq_v = (_sequences(x, None) for x in (qh, kh, vh))
        max_q, max_k = qh.shape[2], kh.shape[2]
    else:
        cu_q, cu_k, max_q, max_k = varlen
        seq_q, seq_k, seq_v = _sequences(q, cu_q), _sequences(k, cu_k), _sequences(v, cu_k)
    D = q.shape[-1]
    d_pad = emulate.padded_head_dim(D)
    qb, kb = -(-max_q // 128), -(-max_k // 64)
    s2 = torch.tensor(sm_scale * _LOG2E, dtype=torch.float32)
    fp8 = tree != "sm80"
    scale_max = emulate.v_scale_max(acc or "fp32+fp32") if fp8 else None
    margin = emulate.v_amax_margin(acc or "fp32+fp32", smooth_v) if fp8 else 0.0
    for b, (qs, ks, vs) in enumerate(zip(seq_q, seq_k, seq_v)):
        qs, ks, vs = qs.cpu(), ks.cpu(), vs.cpu()
        where = f"{tree} batch {b}"
        k_mean = v_mean = None
        if smooth_k:
            want_mean, _, _ = stats_model(ks, d_pad, emulate.K_MEAN_SAMPLE_TOKENS)
            _bits_equal(f"{where} k_mean", buf["k_mean"][b:b + 1], want_mean)
            k_mean = buf["k_mean"][b:b + 1].cpu()
        q_i8, q_scale = emulate.quantize_q(qs, s2, gran, d_pad)
        _bits_equal(f"{where} q_int8", buf["q_int8"][b:b + 1], _pad_rows(q_i8, 2, qb * 128))
        _bits_equal(f"{where} q_scale", buf["q_scale"][b:b + 1], _pad_rows(q_scale, 2, qb))
        k_i8, k_scale = emulate.quantize_k(ks, k_mean, gran, d_pad)
        _bits_equal(f"{where} k_int8", buf["k_int8"][b:b + 1], _pad_rows(k_i8, 2, kb * 64))
        _bits_equal(f"{where} k_scale", buf["k_scale"][b:b + 1], _pad_rows(k_scale, 2, kb))
        if not fp8:
            _bits_equal(f"{where} v_fp16", buf["v_fp16"][b:b + 1],
                        _pad_rows(emulate.convert_v(vs, d_pad), 2, kb * 64))
        else:
            want_mean, want_lo, want_hi = stats_model(
                vs, d_pad, emulate.V_AMAX_SAMPLE_TOKENS if margin else 0)
            _bits_equal(f"{where} v_min", buf["v_min"][b:b + 1], want_lo)
            _bits_equal(f"{where} v_max", buf["v_max"][b:b + 1], want_hi)
            if smooth_v:
                _bits_equal(f"{where} v_mean", buf["v_mean"][b:b + 1], want_mean)
                v_mean = buf["v_mean"][b:b + 1].cpu()
            tile, v_scale = emulate.quantize_v_fp8(
                vs, v_mean, buf["v_min"][b:b + 1].cpu(), buf["v_max"][b:b + 1].cpu(),
                scale_max, d_pad, margin)
            _bits_equal(f"{where} v_fp8", buf["v_fp8"][b:b + 1], _pad_rows(tile, 2, kb))
            _bits_equal(f"{where} v_scale", buf["v_scale"][b:b + 1], v_scale)
        if smooth_k:  # summed in another order than the kernel's: a tolerance, not bits
            want = emulate.lse_correction(qs, k_mean, sm_scale)
            got = buf["lse_correction"][b:b + 1, :, :qs.shape[2]].cpu()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * (1 + want.abs().max().item()))


def make(B=2, Hq=2, Hkv=None, Sq=256, Sk=None, D=128, dtype=torch.bfloat16, layout="HND",
         seed=0, v_offset=0.0):
    """q, k, v ~ N(0, 1), K with a per-channel outlier bias, V with an optional one."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    Hkv, Sk = Hkv or Hq, Sk or Sq
    q = torch.randn(B, Hq, Sq, D, generator=g, device="cuda")
    k = torch.randn(B, Hkv, Sk, D, generator=g, device="cuda") + \
        4 * torch.randn(B, Hkv, 1, D, generator=g, device="cuda")
    v = torch.randn(B, Hkv, Sk, D, generator=g, device="cuda") + \
        v_offset * torch.randn(B, Hkv, 1, D, generator=g, device="cuda")
    out = [x.to(dtype) for x in (q, k, v)]
    if layout == "NHD":
        out = [x.transpose(1, 2).contiguous() for x in out]
    return tuple(out)


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("S", LENGTHS)
def test_lengths(tree, S):
    check_identity(tree, *make(Sq=S, Sk=S))
    check_identity(tree, *make(Sq=S, Sk=LENGTHS[(LENGTHS.index(S) + 2) % len(LENGTHS)], seed=1))


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("D", (64, 72, 128, 100))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_head_dims_and_dtypes(tree, D, dtype):
    check_identity(tree, *make(Sq=200, Sk=333, D=D, dtype=dtype))


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("gran", ("per_thread", "per_warp"))
@pytest.mark.parametrize("smooth_k", (True, False))
@pytest.mark.parametrize("layout", ("HND", "NHD"))
def test_granularity_smoothing_layout(tree, gran, smooth_k, layout):
    check_identity(tree, *make(Sq=300, Sk=257, layout=layout), layout=layout, gran=gran,
                   smooth_k=smooth_k)


@pytest.mark.parametrize("tree", ("sm89", "sm90"))
@pytest.mark.parametrize("acc", ("fp32+fp32", "fp32"))
def test_smooth_v(tree, acc):
    check_identity(tree, *make(Sq=129, Sk=1000, v_offset=3.0), smooth_v=True, acc=acc)
    if tree == "sm89":  # the fp16-accumulated mode's V scale (2.25)
        check_identity(tree, *make(Sq=129, Sk=1000, v_offset=3.0), smooth_v=True,
                       acc="fp32+fp16")


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("Hq,Hkv", ((8, 2), (4, 1)))
def test_gqa(tree, Hq, Hkv):
    check_identity(tree, *make(Hq=Hq, Hkv=Hkv, Sq=190, Sk=4097))


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("gran", ("per_thread", "per_warp"))
def test_tiny_groups(tree, gran):
    """Groups whose amax is below 127 / FLT_MAX (normal bf16 numbers): 127 / amax is +inf, so
    every value becomes +-inf before the clamp, which must give +-127 (the conversion's own
    saturation would give -128 for -inf). No zeros: 0 * inf is NaN, whose int8 cast the
    emulator leaves to the platform."""
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = make(Sq=300, Sk=200)

    def tiny_like(t):
        sign = torch.where(torch.rand(t.shape, generator=g, device="cuda") < 0.5, -1.0, 1.0)
        return (sign * 1e-37).to(t.dtype)

    q[:, :, :128] = tiny_like(q[:, :, :128])    # Q block 0
    k[:, :, 64:128] = tiny_like(k[:, :, 64:128])  # K block 1 (no smoothing: the codes see it)
    codes, _ = emulate.quantize_q(q[:, :, :128].cpu(), torch.tensor(1.0), gran, 128)
    assert codes.abs().min() == 127, "the inputs must reach the +-inf regime"
    check_identity(tree, q, k, v, gran=gran, smooth_k=False)


@pytest.mark.parametrize("tree", TREES)
def test_non_contiguous(tree):
    """Fused-QKV slices (NHD), a misaligned view (no 16-byte loads) and a padded-D view."""
    g = torch.Generator(device="cuda").manual_seed(3)
    qkv = torch.randn(2, 300, 3, 4, 128, generator=g, device="cuda").to(torch.float16)
    check_identity(tree, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], layout="NHD")
    big = torch.randn(3, 2, 2, 257, 130, generator=g, device="cuda").to(torch.bfloat16)
    check_identity(tree, big[0, :, :, :, 1:129], big[1, :, :, :, 1:129], big[2, :, :, :, 1:129])
    check_identity(tree, big[0, :, :, :, :72], big[1, :, :, :, 2:74], big[2, :, :, :, 8:80])


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("D", (64, 128))
def test_varlen(tree, D):
    g = torch.Generator(device="cuda").manual_seed(4)
    lens_q, lens_k = [1, 200, 63, 129], [65, 1000, 1, 300]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32,
                        device="cuda")
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32,
                        device="cuda")
    q = torch.randn(sum(lens_q), 4, D, generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn(sum(lens_k), 2, D, generator=g, device="cuda").to(torch.bfloat16)
    v = torch.randn(sum(lens_k), 2, D, generator=g, device="cuda").to(torch.bfloat16)
    check_identity(tree, q, k, v, varlen=(cu_q, cu_k, max(lens_q), max(lens_k)))


@pytest.mark.parametrize("tree", ("sm89", "sm90"))
@pytest.mark.parametrize("D", (64, 128))
def test_v_requantize(tree, D):
    """One call with both kinds of V head: head 1 of batch 0 has one token off the statistics'
    sample at 100x the others (beyond its channel's 16x bound: the quantize launch flags its
    block and the requantize launch redoes the head from exact statistics), the others keep
    their sampled bounds. Every buffer bit-exact, and only that block flagged."""
    S = 4097
    q, k, v = make(B=2, Hq=4, Sq=130, Sk=S, D=D, v_offset=1.0)
    sample = set(emulate.sampled_tokens(S, emulate.V_AMAX_SAMPLE_TOKENS).tolist())
    token = next(t for t in range(2000, S) if t not in sample)
    v[0, 1, token, 5] = 100.0 * v[0, 1].float().abs().max().to(v.dtype)
    check_identity(tree, q, k, v)
    buf = ops.quantized_operands(q, k, v, path=tree)
    flags = buf["v_overflow"].cpu()
    assert flags[0, 1, token // 64] == 1 and int(flags.sum()) == 1, "only the outlier's block flagged"
    _, lo, hi = stats_model(v[0:1, 1:2].cpu(), emulate.padded_head_dim(v.shape[-1]))
    exact = torch.maximum(hi, -lo)[0, 0] / emulate.E4M3_MAX
    _bits_equal("flagged head's v_scale", buf["v_scale"][0, 1].cpu(), exact)


@pytest.mark.parametrize("tree", ("sm89", "sm90"))
def test_v_requantize_varlen(tree):
    """Packed sequences of 300, 5000 and 70 keys: each sequence samples its own 256 tokens;
    an off-sample outlier in kv head 1 of the 5000-key sequence flags that head of that
    sequence only, which the requantize launch redoes from its own tokens' exact statistics."""
    g = torch.Generator(device="cuda").manual_seed(6)
    lens_q, lens_k = [40, 130, 7], [300, 5000, 70]
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32,
                               device="cuda") for n in (lens_q, lens_k))
    q = torch.randn(sum(lens_q), 4, 128, generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn(sum(lens_k), 2, 128, generator=g, device="cuda").to(torch.bfloat16)
    v = torch.randn(sum(lens_k), 2, 128, generator=g, device="cuda").to(torch.bfloat16)
    sample = set(emulate.sampled_tokens(5000, emulate.V_AMAX_SAMPLE_TOKENS).tolist())
    token = next(t for t in range(3000, 5000) if t not in sample)
    v[300 + token, 1, 9] = 100.0 * v[300:5300, 1].float().abs().max().to(v.dtype)
    varlen = (cu_q, cu_k, max(lens_q), max(lens_k))
    check_identity(tree, q, k, v, varlen=varlen)
    flags = ops.quantized_operands(q, k, v, path=tree, varlen=varlen)["v_overflow"].cpu()
    assert flags[1, 1, token // 64] == 1 and int(flags.sum()) == 1, "only the outlier's block flagged"
