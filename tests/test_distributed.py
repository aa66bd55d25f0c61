"""Sequence parallelism (``sageattn.distributed``) on CPU: gloo process groups of 4, 2 and 3
processes, the exact float64 reference or the sm80 emulator standing in for the kernel.

Each rank holds a shard (contiguous, or zig-zag for the ring) of a sequence drawn with a
fixed seed; the shards each
scheme returns, put back together, are checked against one call on the whole sequence:

* reference (float64) as ``attn_fn``: both schemes are exact rearrangements of the same
  sums (Ulysses moves whole heads; the ring's LSE merge is exact algebra), so the bound is
  float64 rounding (1e-10 on outputs of size ~1).
* sm80 emulator as ``attn_fn``: Ulysses gives every rank whole heads, so it must equal the
  emulator on the whole sequence bit for bit; the ring quantizes each K/V shard on its own
  and rounds each partial output to bf16, so it is held to the emulator's own error against
  the reference plus one bf16 rounding (see ``RING_EMU_*``).

One spawned job of 4 processes runs every group (see ``GROUPS``); each case is then its own
test. Validation errors are checked inside the groups too, and the LSE merge, the sharding
helpers and the missing-group error in this process.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sageattn import emulate, reference
from sageattn.distributed import (merge_attention, ring_attention, shard_sequence,
                                  ulysses_attention, unshard_sequence)

# One gloo job of 4 processes runs every group: the world (W = 4), two groups of 2 at once
# (ranks 0-1, and ranks 2-3, whose group ranks differ from their global ranks), and a ring of
# 3 (ranks 0-2; ODD_CASES, heads divisible by 3). Spawning costs ~1 s per process on the
# 2-core CI machine, so one job rather than one per world size.
PROCESSES = 4
GROUPS = {"W4": (0, 1, 2, 3), "W2": (0, 1), "W2-ranks23": (2, 3), "W3": (0, 1, 2)}
PHASES = (("W4",), ("W2", "W2-ranks23"), ("W3",))   # groups run at the same time
EXACT_TOL = 1e-10          # float64 reference stand-in: max |out - ref| and |lse - ref|
# Ring with the sm80 emulator, against the float64 reference: rel-L1 may exceed the emulator's
# own whole-sequence rel-L1 by this factor plus this margin. Per-shard K means and one bf16
# rounding of each partial output before the merge move it by at most 2% either way on these
# inputs (measured, W=2 and 4: 0.00960 vs 0.00958, 0.00935 vs 0.00950); a wrong mask or
# merge weight costs far more.
RING_EMU_FACTOR, RING_EMU_MARGIN = 1.1, 1e-3
RING_EMU_LSE = 0.06        # max |lse - ref|, the emulator tests' own LSE bound
GLOO_TIMEOUT_S = 30       # a collective left waiting by a broken scheme fails after this
DEADLINE_S = 240          # the whole job (measured: ~6 s)
SCHEMES = {"ulysses": ulysses_attention, "ring": ring_attention}
_REF64 = functools.partial(reference.attention, dtype=torch.float64)


@dataclass(frozen=True)
class Case:
    scheme: str
    causal: bool
    layout: str = "HND"
    B: int = 2
    Hq: int = 4
    Hkv: Optional[int] = None
    q_lens: tuple = (6,)           # per rank (cycled over the ranks); equal when one entry
    kv_lens: Optional[tuple] = None
    pass_lens: bool = False        # pass seq_lens / kv_seq_lens (needed when uneven)
    attn: str = "ref64"            # "ref64" | "emu"
    D: int = 16
    return_lse: bool = True
    ordering: str = "contiguous"   # ring only
    tag: str = ""

    @property
    def id(self) -> str:
        parts = [self.scheme, "causal" if self.causal else "full", self.layout,
                 f"Hq{self.Hq}kv{self.Hkv or self.Hq}", self.attn]
        if self.ordering != "contiguous":
            parts.append(self.ordering)
        return "-".join(parts + ([self.tag] if self.tag else []))

    def lens(self, world):
        q = [self.q_lens[r % len(self.q_lens)] for r in range(world)]
        kv = q if self.kv_lens is None else [self.kv_lens[r % len(self.kv_lens)]
                                             for r in range(world)]
        return q, kv


def _cases():
    out = []
    for scheme in SCHEMES:
        for causal in (False, True):
            for layout in ("HND", "NHD"):
                out.append(Case(scheme, causal, layout))
            # GQA (Hkv = 2: W = 4 repeats kv heads in Ulysses) and MQA
            out.append(Case(scheme, causal, Hq=8, Hkv=2))
            out.append(Case(scheme, causal, "NHD", Hq=4, Hkv=1, B=1))
            # shards of different lengths, seq_lens passed
            out.append(Case(scheme, causal, q_lens=(5, 9, 3, 7), pass_lens=True, tag="uneven"))
            out.append(Case(scheme, causal, attn="emu", B=1, Hq=4, Hkv=2, D=64,
                            q_lens=(80,)))
        # cross-attention (Sq != Sk), non-causal
        out.append(Case(scheme, False, q_lens=(6,), kv_lens=(10,), tag="cross"))
        out.append(Case(scheme, False, q_lens=(4, 7), kv_lens=(9, 2), pass_lens=True,
                        tag="cross-uneven"))
        out.append(Case(scheme, True, return_lse=False, tag="no-lse"))
    # ring over zig-zag shards (rank r holds chunks r and 2W-1-r)
    for causal in (False, True):
        out.append(Case("ring", causal, ordering="zigzag"))
        out.append(Case("ring", causal, "NHD", Hq=8, Hkv=2, q_lens=(10,), ordering="zigzag"))
    out.append(Case("ring", True, attn="emu", B=1, Hq=4, Hkv=2, D=64, q_lens=(80,),
                    ordering="zigzag"))
    # Ulysses, causal cross-attention with Sq > Sk: the first rows see no key (zeros, -inf)
    out.append(Case("ulysses", True, q_lens=(12,), kv_lens=(5,), tag="cross-empty-rows"))
    out.append(Case("ulysses", True, "NHD", q_lens=(4, 9), kv_lens=(6, 3), pass_lens=True,
                    tag="cross-uneven"))
    return out


CASES = _cases()
# W = 3: heads divisible by 3 for Ulysses (GQA Hkv = 2 -> repeated to lcm(2, 3) = 6 heads)
ODD_CASES = [Case("ulysses", c, Hq=6, Hkv=2, q_lens=(5, 8, 6), pass_lens=True, tag="uneven")
             for c in (False, True)] + \
            [Case("ring", c, Hq=6, Hkv=2, q_lens=(5, 8, 6), pass_lens=True, tag="uneven")
             for c in (False, True)] + \
            [Case("ring", True, Hq=6, Hkv=3, q_lens=(8,), ordering="zigzag")]


def _cases_for(world):
    return ODD_CASES if world % 2 else CASES


def _inputs(case: Case, world: int):
    """Whole-sequence q, k, v (HND, case dtype) with a fixed seed, and the shard lengths."""
    q_lens, kv_lens = case.lens(world)
    g = torch.Generator().manual_seed(1234 + world)
    Hkv = case.Hkv or case.Hq
    q = torch.randn(case.B, case.Hq, sum(q_lens), case.D, generator=g, dtype=torch.float64)
    k = torch.randn(case.B, Hkv, sum(kv_lens), case.D, generator=g, dtype=torch.float64)
    v = torch.randn(case.B, Hkv, sum(kv_lens), case.D, generator=g, dtype=torch.float64)
    if case.attn == "emu":   # bf16, K with a per-channel bias (the outlier input)
        k = k + 4 * torch.randn(case.B, Hkv, 1, case.D, generator=g, dtype=torch.float64)
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    return q, k, v, q_lens, kv_lens


def _shard(x, lens, rank, layout):
    start = sum(lens[:rank])
    part = x[:, :, start:start + lens[rank]]
    return part.transpose(1, 2).contiguous() if layout == "NHD" else part.contiguous()


def _run_case(case: Case, group):
    """Run one case on every rank of ``group``; its rank 0 returns the measurements (the
    others None)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, q_lens, kv_lens = _inputs(case, world)
    if case.ordering == "zigzag":
        mine = [shard_sequence(x.transpose(1, 2) if case.layout == "NHD" else x,
                               rank, world, case.layout, "zigzag").contiguous()
                for x in (q, k, v)]
    else:
        mine = [_shard(x, lens, rank, case.layout)
                for x, lens in ((q, q_lens), (k, kv_lens), (v, kv_lens))]
    saved = [x.clone() for x in mine]
    attn = _REF64 if case.attn == "ref64" else emulate.sm80_attention
    kw = dict(seq_lens=q_lens, kv_seq_lens=kv_lens) if case.pass_lens else {}
    if case.ordering != "contiguous":
        kw["ordering"] = case.ordering
    res = SCHEMES[case.scheme](*mine, group=group, tensor_layout=case.layout,
                               is_causal=case.causal, return_lse=case.return_lse, attn_fn=attn,
                               **kw)
    out, lse = res if case.return_lse else (res, None)
    assert isinstance(out, torch.Tensor), type(res)
    facts = {
        "unmodified": all(torch.equal(a, b) for a, b in zip(saved, mine)),
        "shape_ok": tuple(out.shape) == tuple(mine[0].shape),
        "contiguous": out.is_contiguous(),
        "dtype": str(out.dtype),
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, (out, lse, facts), group=group)
    if rank != 0:
        return None
    # the whole result, back in HND
    out = reference.to_hnd(unshard_sequence([o for o, _, _ in gathered], case.layout,
                                            case.ordering), case.layout)
    lse = unshard_sequence([l[..., None] for _, l, _ in gathered], "HND",
                           case.ordering)[..., 0] if case.return_lse else None
    checks = {k: all(f[k] for _, _, f in gathered) for k in ("unmodified", "shape_ok",
                                                               "contiguous")}
    checks["dtypes"] = sorted({f["dtype"] for _, _, f in gathered})
    ref, ref_lse = reference.attention(q, k, v, is_causal=case.causal, return_lse=True,
                                       dtype=torch.float64)
    result = dict(checks, finite=bool(torch.isfinite(out).all()))
    result["out_err"] = (out.double() - ref).abs().max().item()
    result["rel_l1"] = reference.compare(out, ref)["rel_l1"]
    if lse is not None:
        result["lse_inf_match"] = bool(torch.equal(torch.isinf(lse), torch.isinf(ref_lse)))
        seen = torch.isfinite(ref_lse)
        result["lse_err"] = (lse.double()[seen] - ref_lse[seen]).abs().max().item()
        result["empty_rows"] = int((~seen).sum())
        result["empty_rows_zero"] = bool((out.transpose(1, 2)[~seen.transpose(1, 2)] == 0).all())
    if case.attn == "emu":
        emu = emulate.sm80_attention(q, k, v, is_causal=case.causal)
        result["emu_rel_l1"] = reference.compare(emu, ref)["rel_l1"]
        result["vs_emu_max"] = (out.double() - emu.double()).abs().max().item()
    return result


# Validation errors raised on every rank before any communication (world size >= 2).
def _validation_cases(world, group=None):
    uly = functools.partial(ulysses_attention, group=group, attn_fn=_REF64)
    ring = functools.partial(ring_attention, group=group, attn_fn=_REF64)
    x = torch.zeros(1, 2 * world, 4, 8, dtype=torch.float64)     # HND, 4 tokens per rank
    odd = torch.zeros(1, 2 * world + 1, 4, 8, dtype=torch.float64)
    short = x[:, :, :3]
    kv_odd = x[:, :2 * world - 1]                                 # never divides 2 * world
    return {
        "ulysses-heads-not-divisible": (lambda: uly(odd, odd, odd), ValueError, "cannot share"),
        "seq_lens-wrong-count": (
            lambda: ring(x, x, x, seq_lens=[4] * (world + 1)), ValueError, "entries"),
        "seq_lens-not-this-rank": (
            lambda: uly(x, x, x, seq_lens=[5] * world), ValueError, "seq_lens[0] = 5"),
        "seq_lens-not-ints": (
            lambda: ring(x, x, x, seq_lens="4444"), TypeError, "sequence of ints"),
        "seq_lens-empty-shard": (
            lambda: ring(x, x, x, seq_lens=[4] + [0] * (world - 1)), ValueError,
            "at least one token"),
        "ring-causal-cross": (
            lambda: ring(x, short, short, is_causal=True), ValueError, "sharded alike"),
        "seq_lens-cross-needs-kv": (
            lambda: ring(x, short, short, seq_lens=[4] * world), ValueError, "kv_seq_lens"),
        "default-attn-on-cpu": (
            lambda: ring(x, x, x, attn_fn=None), ValueError, "CUDA devices only"),
        "bad-layout": (lambda: uly(x, x, x, tensor_layout="BHSD"), ValueError, "tensor_layout"),
        "causal-not-bool": (lambda: ring(x, x, x, is_causal=1), TypeError, "is_causal"),
        "gqa-not-dividing": (lambda: uly(x, kv_odd, kv_odd), ValueError, "not a multiple"),
        "kv-mismatch": (lambda: ring(x, x, short), ValueError, "k and v must match"),
        "attn_fn-bad-result": (
            lambda: ring(x, x, x, attn_fn=lambda *a, **kw: a[0]), TypeError, "(out, lse)"),
        "zigzag-odd-shard": (
            lambda: ring(short, short, short, is_causal=True, ordering="zigzag"), ValueError,
            "one even length"),
        "ordering-unknown": (
            lambda: ring(x, x, x, ordering="striped"), ValueError, "ordering"),
        "attn_fn-not-callable": (lambda: ring(x, x, x, attn_fn="sdpa"), TypeError, "callable"),
    }


def _cases_of(label):
    return _cases_for(len(GROUPS[label]))


def _worker(rank, tmp):
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        # all ranks are local: keep gloo off whatever address the host name resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.FileStore(os.path.join(tmp, "store"), PROCESSES)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=PROCESSES,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    # every process creates every group, in the same order
    groups = {label: (dist.group.WORLD if len(ranks) == PROCESSES else dist.new_group(ranks))
              for label, ranks in GROUPS.items()}
    results = {}

    def save():
        with open(os.path.join(tmp, f"results-rank{rank}.json"), "w") as f:
            json.dump(results, f)

    try:
        for phase in PHASES:
            for label in phase:
                if rank not in GROUPS[label]:
                    continue
                group, mine = groups[label], {}
                if dist.get_rank(group) == 0:
                    results[label] = mine
                for case in _cases_of(label):
                    try:
                        mine[case.id] = _run_case(case, group)
                    except Exception:
                        # The ranks may now disagree on which collective comes next: stop (the
                        # others see the connection drop) rather than run into mismatched calls.
                        mine[case.id] = {"error": traceback.format_exc()}
                        save()
                        raise
                world = len(GROUPS[label])
                for name, (call, exc, text) in _validation_cases(world, group).items():
                    try:
                        call()
                        mine["validate:" + name] = {"error": "no exception raised"}
                    except exc as e:   # raised on every rank alike, before any communication
                        mine["validate:" + name] = {"ok": text in str(e), "message": str(e)}
                    except Exception:
                        mine["validate:" + name] = {"error": traceback.format_exc()}
            dist.barrier()
        save()
    finally:
        dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def _results(tmp: str) -> dict:
    """Run every group's cases in one gloo job; results by group label, then case id (a case
    missing means the workers stopped before it: see the "_abort" entry)."""
    ctx = mp.start_processes(_worker, args=(tmp,), nprocs=PROCESSES, join=False,
                             start_method="spawn")
    abort = None
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                abort = f"workers still running after {DEADLINE_S} s"
                break
    except Exception as e:   # a worker raised: its traceback is in the message
        abort = str(e)
    finally:
        for proc in ctx.processes:   # only on the deadline path are any still alive
            if proc.is_alive():
                proc.terminate()
                proc.join()
    results = {}
    for rank in range(PROCESSES):
        path = os.path.join(tmp, f"results-rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.update(json.load(f))
    results["_abort"] = abort
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dist"))

    def get(label, key):
        res = _results(tmp)
        if key not in res.get(label, {}):
            pytest.fail(f"no result for {key!r} in group {label}: the workers stopped early: "
                        f"{res['_abort'] or 'no reason recorded'}")
        return res[label][key]

    return get


@pytest.mark.parametrize("label,case", [
    pytest.param(label, c, id=f"{c.id}-{label}") for label in GROUPS for c in _cases_of(label)])
def test_scheme_matches_whole_sequence(results, label, case):
    r = results(label, case.id)
    assert "error" not in r, r.get("error")
    assert r["unmodified"], "inputs modified"
    assert r["shape_ok"] and r["contiguous"], r
    assert r["finite"], "non-finite output"
    if case.attn == "ref64":
        assert r["dtypes"] == ["torch.float64"]
        assert r["out_err"] <= EXACT_TOL, r
        if case.return_lse:
            assert r["lse_inf_match"] and r["lse_err"] <= EXACT_TOL, r
            assert r["empty_rows_zero"], r
        if case.tag == "cross-empty-rows":
            assert r["empty_rows"] > 0, "case meant to have rows with no visible key"
        return
    assert r["dtypes"] == ["torch.bfloat16"]
    assert r["lse_inf_match"] and r["lse_err"] <= RING_EMU_LSE, r
    if case.scheme == "ulysses":
        # whole heads, whole sequence: the emulator's own computation, bit for bit
        assert r["vs_emu_max"] == 0.0, r
    else:
        assert r["rel_l1"] <= RING_EMU_FACTOR * r["emu_rel_l1"] + RING_EMU_MARGIN, r


_VALIDATION_NAMES = sorted(_validation_cases(2))


@pytest.mark.parametrize("label", list(GROUPS))
@pytest.mark.parametrize("name", _VALIDATION_NAMES)
def test_validation_in_group(results, label, name):
    r = results(label, "validate:" + name)
    assert "error" not in r, r.get("error")
    assert r["ok"], r["message"]


# ---- single process -----------------------------------------------------------------------

def test_needs_initialized_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    x = torch.zeros(1, 2, 4, 8)
    for fn in (ulysses_attention, ring_attention):
        with pytest.raises(RuntimeError, match="init_process_group"):
            fn(x, x, x, attn_fn=_REF64)


def _split_keys(q, k, v, cut, causal, layout="HND"):
    """Reference results over keys [:cut] and [cut:], with the causal mask of the whole."""
    Sq, Sk = reference.to_hnd(q, layout).shape[2], reference.to_hnd(k, layout).shape[2]
    off = Sk - Sq
    sl = (slice(None), slice(None), slice(0, cut))
    sr = (slice(None), slice(None), slice(cut, None))
    if layout == "NHD":
        sl, sr = (sl[0], sl[2]), (sr[0], sr[2])
    a = reference.attention(q, k[sl], v[sl], tensor_layout=layout, is_causal=causal,
                            causal_offset=off, return_lse=True, dtype=torch.float64)
    b = reference.attention(q, k[sr], v[sr], tensor_layout=layout, is_causal=causal,
                            causal_offset=off - cut, return_lse=True, dtype=torch.float64)
    return a, b


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("Sq,Sk,cut", [(16, 16, 5), (16, 16, 15), (24, 10, 4), (7, 30, 29)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_merge_equals_whole(layout, Sq, Sk, cut, causal):
    g = torch.Generator().manual_seed(Sq * 100 + Sk)
    q = torch.randn(2, 3, Sq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, Sk, 8, generator=g, dtype=torch.float64) * 3
    v = torch.randn(2, 3, Sk, 8, generator=g, dtype=torch.float64)
    if layout == "NHD":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    (oa, la), (ob, lb) = _split_keys(q, k, v, cut, causal, layout)
    out, lse = merge_attention(oa, la, ob, lb, tensor_layout=layout)
    ref, ref_lse = reference.attention(q, k, v, tensor_layout=layout, is_causal=causal,
                                       return_lse=True, dtype=torch.float64)
    assert torch.isfinite(out).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert (out - ref).abs().max().item() <= 1e-12
    seen = torch.isfinite(ref_lse)
    assert (lse[seen] - ref_lse[seen]).abs().max().item() <= 1e-12
    # order does not matter
    out2, lse2 = merge_attention(ob, lb, oa, la, tensor_layout=layout)
    assert (out2 - out).abs().max().item() <= 1e-12


def test_merge_rows_without_keys():
    """-inf LSEs on one or both sides: no NaN; a row with no key anywhere is 0 with -inf."""
    o1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]]])
    o2 = torch.tensor([[[[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]]]])
    l1 = torch.tensor([[[0.0, 1.0, -math.inf]]])
    l2 = torch.tensor([[[0.0, -math.inf, -math.inf]]])
    out, lse = merge_attention(o1, l1, o2, l2)
    assert torch.equal(out, torch.tensor([[[[3.0, 4.0], [3.0, 4.0], [0.0, 0.0]]]]))
    assert lse[0, 0, 0].item() == pytest.approx(math.log(2.0))
    assert lse[0, 0, 1].item() == 1.0 and lse[0, 0, 2].item() == -math.inf
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


def test_merge_large_lse_gap():
    """LSEs far apart (exp would overflow unshifted): the larger side wins exactly."""
    o1, o2 = torch.ones(1, 1, 1, 4), torch.full((1, 1, 1, 4), 7.0)
    l1, l2 = torch.tensor([[[1000.0]]]), torch.tensor([[[-1000.0]]])
    out, lse = merge_attention(o1, l1, o2, l2)
    assert torch.equal(out, o1) and lse.item() == 1000.0


def test_merge_input_checks():
    o, l = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="tensor_layout"):
        merge_attention(o, l, o, l, tensor_layout="SBHD")
    with pytest.raises(ValueError, match="shapes differ"):
        merge_attention(o, l, o[:, :1], l[:, :1])
    with pytest.raises(ValueError, match=r"\(B, H, S\)"):
        merge_attention(o, l, o, l, tensor_layout="NHD")


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("ordering,S,W", [("contiguous", 11, 4), ("contiguous", 8, 2),
                                          ("zigzag", 16, 4), ("zigzag", 12, 3)])
def test_shard_roundtrip(layout, ordering, S, W):
    x = torch.arange(2 * 3 * S * 2, dtype=torch.float32).reshape(2, 3, S, 2)
    if layout == "NHD":
        x = x.transpose(1, 2).contiguous()
    shards = [shard_sequence(x, r, W, layout, ordering) for r in range(W)]
    assert torch.equal(unshard_sequence(shards, layout, ordering), x)
    dim = 2 if layout == "HND" else 1
    if ordering == "zigzag":   # rank r holds chunks r and 2W-1-r
        c = S // (2 * W)
        tokens = reference.to_hnd(shards[1], layout)[0, 0, :, 0] // 2 % S
        assert tokens.tolist() == list(range(c, 2 * c)) + list(range((2 * W - 2) * c,
                                                                     (2 * W - 1) * c))
    else:
        assert [s.shape[dim] for s in shards] == [S // W + (r < S % W) for r in range(W)]


def test_shard_checks():
    x = torch.zeros(1, 2, 10, 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        shard_sequence(x, 0, 4, ordering="zigzag")
    with pytest.raises(ValueError, match="outside"):
        shard_sequence(x, 4, 4)
    with pytest.raises(ValueError, match="ordering"):
        unshard_sequence([x], ordering="striped")
