"""Block-sparse (sparse_sageattn) and packed varlen (sageattn_varlen) on the GPU, both mma.sync
trees forced, eager and under torch.compile(fullgraph=True): against the exact reference with the mask applied, and varlen against
per-sequence dense calls of the same path (same kernels, same per-sequence quantization, so
the results must agree to the last bit)."""

import math

import pytest
import torch

import sageattn
from sageattn import ops

pytestmark = pytest.mark.gpu

# Every INT8 tree; sm90 (Hopper only) where the device is 9.0.
PATHS = ("sm80", "sm89") + (("sm90",) if torch.cuda.is_available() and
                            torch.cuda.get_device_capability() == (9, 0) else ())


def _rel_l1(o, r):
    o, r = o.float(), r.float()
    return ((o - r).abs().sum() / r.abs().sum()).item()


def _masked_reference(q, k, v, keep, causal):
    """Exact attention with (128 x 64) blocks removed where keep == 0; empty rows give 0."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * D ** -0.5
    full = keep.expand(B, H, -1, -1).repeat_interleave(128, 2).repeat_interleave(64, 3)
    s = s.masked_fill(full[:, :, :Sq, :Sk] == 0, -math.inf)
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None]
        s = s.masked_fill(j > i + (Sk - Sq), -math.inf)
    return (torch.softmax(s, -1).nan_to_num(0.0) @ v.double()).to(q.dtype)


BOUND = {"sm80": 0.02, "sm89": 0.05, "sm90": 0.05}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(1000, 1000), (129, 4097), (300, 65)])
def test_sparse_matches_masked_reference(path, causal, Sq, Sk):
    torch.manual_seed(Sq + Sk + causal)
    B, H, D = 2, 4, 128
    q = torch.randn(B, H, Sq, D, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(B, H, Sk, D, device="cuda", dtype=torch.bfloat16), torch.randn(B, H, Sk, D, device="cuda", dtype=torch.bfloat16)
    keep = (torch.rand(1, H, -(-Sq // 128), -(-Sk // 64), device="cuda") < 0.5)
    keep[:, 0, 0, :] = False  # a query block that skips every key block
    out = sageattn.sparse_sageattn(q, k, v, mask_id=keep, is_causal=causal, path=path)
    ref = _masked_reference(q, k, v, keep.to(torch.int8), causal)
    assert torch.isfinite(out).all()
    assert (out[:, 0, :min(128, Sq)] == 0).all(), "rows with every block skipped must be zero"
    assert _rel_l1(out, ref) < BOUND[path]


@pytest.mark.parametrize("path", PATHS)
def test_sparse_all_ones_equals_dense(path):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, 1000, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    dense = sageattn.sageattn(q, k, v, path=path)
    ones = torch.ones(1, 1, 8, 16, device="cuda", dtype=torch.bool)
    assert torch.equal(sageattn.sparse_sageattn(q, k, v, mask_id=ones, path=path), dense)
    assert torch.equal(sageattn.sparse_sageattn(q, k, v, mask_id=None, path=path), dense)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_rows_longer_than_one_mask_window(path, causal):
    """The kernel stages a mask row 2048 key blocks (131072 keys) at a time
    (kernels/common/kept_blocks.cuh): rows past that refill the window; a window with no kept
    block at all is skipped; a fully broadcast (stride 0) mask of ones equals the dense call."""
    torch.manual_seed(3 + causal)
    B, H, Sq, D = 1, 2, 200, 64
    Sk = 2300 * 64 - 17
    q = torch.randn(B, H, Sq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, Sk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kb = -(-Sk // 64)
    keep = torch.rand(1, H, 2, kb, device="cuda") < 0.05
    keep[:, 1, 1, :2100] = False  # head 1, query block 1: nothing kept in the first window
    keep[:, 1, 1, 2290:] = True   # ... up to the partial last block
    out = sageattn.sparse_sageattn(q, k, v, mask_id=keep, is_causal=causal, path=path)
    ref = _masked_reference(q, k, v, keep.to(torch.int8), causal)
    assert torch.isfinite(out).all()
    assert _rel_l1(out, ref) < BOUND[path]
    assert _rel_l1(out[:, 1, 128:], ref[:, 1, 128:]) < BOUND[path]
    ones = torch.ones(1, 1, 1, 1, device="cuda", dtype=torch.uint8)
    dense = sageattn.sageattn(q, k, v, is_causal=causal, path=path)
    assert torch.equal(sageattn.sparse_sageattn(q, k, v, mask_id=ones, is_causal=causal, path=path), dense)


def test_sparse_on_hopper_prefers_sm80_when_the_table_picks():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("Hopper routing")
    q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    keep = torch.rand(1, 2, 3, 5, device="cuda") > 0.4
    assert torch.equal(sageattn.sparse_sageattn(q, k, v, mask_id=keep),
                       sageattn.sparse_sageattn(q, k, v, mask_id=keep, path="sm80"))
    assert not torch.equal(sageattn.sparse_sageattn(q, k, v, mask_id=keep),
                           sageattn.sparse_sageattn(q, k, v, mask_id=keep, path="sm90"))


def test_sparse_mask_errors():
    q = torch.randn(1, 2, 200, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="mask_id has shape"):
        sageattn.sparse_sageattn(q, q, q, mask_id=torch.ones(1, 2, 3, 4, device="cuda", dtype=torch.bool))
    with pytest.raises(TypeError, match="mask_id must be a bool or integer"):
        sageattn.sparse_sageattn(q, q, q, mask_id=torch.ones(1, 2, 2, 4, device="cuda"))
    with pytest.raises(ValueError, match="mask_id is on"):
        sageattn.sparse_sageattn(q, q, q, mask_id=torch.ones(1, 2, 2, 4, dtype=torch.bool))


def _timed(fn, reps=10, batches=5):
    """Median over `batches` of the mean time of `reps` back-to-back calls (ms)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[len(times) // 2]


def test_sparse_skipping_saves_time():
    """Issue acceptance: S=16k, D=128, 50% and 90% of the blocks skipped take <= 0.6x and
    <= 0.2x of the dense call (whole calls; quantization still reads every block)."""
    torch.manual_seed(2)
    B, H, S, D = 1, 16, 16384, 128
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense = _timed(lambda: sageattn.sageattn(q, k, v, path="sm80"))
    ratios = {}
    for skipped, limit in ((0.5, 0.6), (0.9, 0.2)):
        keep = torch.rand(1, H, S // 128, S // 64, device="cuda") >= skipped
        sparse = _timed(lambda: sageattn.sparse_sageattn(q, k, v, mask_id=keep, path="sm80"))
        ratios[skipped] = (sparse, sparse / dense, limit)
    print("\nsparse S=16k H=16 D=128 sm80: dense %.3f ms; " % dense + "; ".join(
        f"{int(s * 100)}% skipped {t:.3f} ms = {r:.2f}x (limit {lim}x)" for s, (t, r, lim) in ratios.items()))
    for s, (t, r, lim) in ratios.items():
        assert r <= lim, (s, r)


def _packed(lengths, H, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(total, H, D, device="cuda", dtype=dtype, generator=g)
    cu = torch.tensor([0] + list(lengths), device="cuda").cumsum(0).to(torch.int32)
    return x, cu


@pytest.mark.parametrize("path", PATHS + (("sm90_q192",) if "sm90" in PATHS else ()))
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_per_sequence_calls(monkeypatch, path, causal):
    # "sm90_q192": every causal hd128 call on the 192-row kernel, which by default takes causal
    # calls only from ops.SM90_CAUSAL_Q192_MIN_ROWS query rows (the longest sequence's, for
    # varlen); the varlen call and the per-sequence calls must take the same kernel.
    if path == "sm90_q192":
        monkeypatch.setattr(ops, "SM90_CAUSAL_Q192_MIN_ROWS", 1)
        path = "sm90"
    else:
        monkeypatch.setattr(ops, "SM90_CAUSAL_Q192_MIN_ROWS", 1 << 30)
    rng = torch.Generator().manual_seed(7 + causal)
    lengths_q = torch.randint(1, 4097, (8,), generator=rng).tolist()
    lengths_k = lengths_q if not causal else torch.randint(1, 4097, (8,), generator=rng).tolist()
    lengths_q[3] = 1  # decode-like
    Hq, Hkv, D = 8, 2, 128
    q, cu_q = _packed(lengths_q, Hq, D, torch.bfloat16, 1)
    k, cu_k = _packed(lengths_k, Hkv, D, torch.bfloat16, 2)
    v, _ = _packed(lengths_k, Hkv, D, torch.bfloat16, 3)
    out, lse = sageattn.sageattn_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                        is_causal=causal, return_lse=True, path=path)
    assert out.shape == q.shape and lse.shape == (Hq, q.shape[0])
    worst = 0.0
    for i in range(8):
        qi = q[cu_q[i]:cu_q[i + 1]].unsqueeze(0)
        ki, vi = k[cu_k[i]:cu_k[i + 1]].unsqueeze(0), v[cu_k[i]:cu_k[i + 1]].unsqueeze(0)
        oi, li = sageattn.sageattn(qi, ki, vi, tensor_layout="NHD", is_causal=causal,
                                   return_lse=True, path=path)
        got = out[cu_q[i]:cu_q[i + 1]]
        worst = max(worst, (got.float() - oi[0].float()).abs().max().item())
        assert torch.equal(got, oi[0]), f"sequence {i}: varlen differs from the dense call"
        torch.testing.assert_close(lse[:, cu_q[i]:cu_q[i + 1]], li[0], rtol=0, atol=0)
    ref = torch.cat([_ref_seq(q, k, v, cu_q, cu_k, i, causal) for i in range(8)])
    print(f"\nvarlen {path} causal={causal}: rel-L1 vs exact {_rel_l1(out, ref):.5f}, "
          f"max |varlen - dense| {worst}")


def _ref_seq(q, k, v, cu_q, cu_k, i, causal):
    qi = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1).unsqueeze(0).double()
    ki = k[cu_k[i]:cu_k[i + 1]].transpose(0, 1).unsqueeze(0).double()
    vi = v[cu_k[i]:cu_k[i + 1]].transpose(0, 1).unsqueeze(0).double()
    rep = qi.shape[1] // ki.shape[1]
    ki, vi = ki.repeat_interleave(rep, 1), vi.repeat_interleave(rep, 1)
    s = qi @ ki.transpose(-1, -2) * qi.shape[-1] ** -0.5
    if causal:
        Sq, Sk = s.shape[-2:]
        s = s.masked_fill(torch.arange(Sk, device=s.device)[None] > torch.arange(Sq, device=s.device)[:, None] + (Sk - Sq), -math.inf)
    o = torch.softmax(s, -1).nan_to_num(0.0) @ vi
    return o[0].transpose(0, 1).to(q.dtype)


def test_varlen_empty_sequences_and_errors():
    q, cu_q = _packed([5, 0, 70], 2, 64, torch.float16, 4)
    k, cu_k = _packed([5, 9, 0], 2, 64, torch.float16, 5)
    v, _ = _packed([5, 9, 0], 2, 64, torch.float16, 6)
    out, lse = sageattn.sageattn_varlen(q, k, v, cu_q, cu_k, 70, 9, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[5:] == 0).all() and torch.isinf(lse[:, 5:]).all()  # the third sequence has no keys
    with pytest.raises(ValueError, match="max_seqlen_q=60"):
        sageattn.sageattn_varlen(q, k, v, cu_q, cu_k, 60, 9)
    with pytest.raises(ValueError, match="must be a 1-D int32"):
        sageattn.sageattn_varlen(q, k, v, cu_q.long(), cu_k, 70, 9)
    bad = cu_q.clone()
    bad[-1] = 74
    with pytest.raises(ValueError, match="end at 75"):
        sageattn.sageattn_varlen(q, k, v, bad, cu_k, 70, 9)


def test_varlen_speed_against_padded_sdpa_and_dense():
    """Printed: 8 sequences of random lengths 1..4096, against SDPA on padded tensors and one
    dense call per sequence."""
    rng = torch.Generator().manual_seed(11)
    lengths = torch.randint(1, 4097, (8,), generator=rng).tolist()
    H, D = 32, 128
    q, cu = _packed(lengths, H, D, torch.bfloat16, 8)
    k, _ = _packed(lengths, H, D, torch.bfloat16, 9)
    v, _ = _packed(lengths, H, D, torch.bfloat16, 10)
    L = max(lengths)
    pad = lambda x: torch.stack([torch.nn.functional.pad(x[cu[i]:cu[i + 1]], (0, 0, 0, 0, 0, L - lengths[i])) for i in range(8)]).transpose(1, 2)
    qp, kp, vp = pad(q), pad(k), pad(v)
    mask = torch.zeros(8, 1, 1, L, dtype=torch.bool, device="cuda")
    for i, n in enumerate(lengths):
        mask[i, ..., :n] = True

    t_var = _timed(lambda: sageattn.sageattn_varlen(q, k, v, cu, cu, L, L))
    t_sdpa = _timed(lambda: torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask))
    t_loop = _timed(lambda: [sageattn.sageattn(q[cu[i]:cu[i + 1]].unsqueeze(0), k[cu[i]:cu[i + 1]].unsqueeze(0),
                                              v[cu[i]:cu[i + 1]].unsqueeze(0), tensor_layout="NHD") for i in range(8)])
    print(f"\nvarlen lengths {lengths}: sageattn_varlen {t_var:.3f} ms, SDPA padded+mask {t_sdpa:.3f} ms, "
          f"per-sequence sageattn {t_loop:.3f} ms")


@pytest.mark.parametrize("path,mode", [("sm80", None), ("sm89", None), ("sm80", "reduce-overhead")])
def test_sparse_and_varlen_compiled_equal_eager(path, mode):
    """Both entry points trace as their own ops: fullgraph compile (and CUDA graphs with
    reduce-overhead) == eager, bit for bit, over several calls."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 4, 300, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    keep = torch.rand(1, 4, 3, 5, device="cuda") < 0.6

    def sparse(q, k, v, keep):
        return sageattn.sparse_sageattn(q, k, v, mask_id=keep, is_causal=True, path=path)

    compiled = torch.compile(sparse, fullgraph=True, mode=mode)
    for _ in range(3):
        assert torch.equal(compiled(q, k, v, keep).clone(), sparse(q, k, v, keep))
    qp, cu_q = _packed([100, 1, 199], 4, 128, torch.bfloat16, 12)
    kp, cu_k = _packed([60, 140, 60], 4, 128, torch.bfloat16, 13)
    vp, _ = _packed([60, 140, 60], 4, 128, torch.bfloat16, 14)

    def varlen(q, k, v, cu_q, cu_k):
        return sageattn.sageattn_varlen(q, k, v, cu_q, cu_k, 199, 140, is_causal=True,
                                        return_lse=True, path=path)

    compiled = torch.compile(varlen, fullgraph=True, mode=mode)
    want = varlen(qp, kp, vp, cu_q, cu_k)
    for _ in range(3):
        got = [t.clone() for t in compiled(qp, kp, vp, cu_q, cu_k)]
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
