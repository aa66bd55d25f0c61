"""Sequence parallelism with torch.distributed: sageattn as the attention inside the two
standard schemes, DeepSpeed-Ulysses and ring attention.

Every rank of a process group holds one shard of the sequence (contiguous, in rank order:
rank 0 holds the first tokens; the ring also takes zig-zag shards) and gets back its shard of
the attention output over the *whole* sequence:

* ``ulysses_attention`` (DeepSpeed-Ulysses, Jacobs et al. 2023): one all-to-all turns
  "all heads, my tokens" into "my heads, all tokens", one local attention call runs on the
  whole sequence for ``Hq / W`` heads, one all-to-all turns the output back. The local call
  sees exactly what a single-device call sees for those heads (same quantization groups, same
  K mean), so the result is the single-device result.
* ``ring_attention`` (Liu et al. 2023, "Ring Attention with Blockwise Transformers"): K/V
  shards travel around the ring with point-to-point sends while each rank attends its queries
  to the shard it holds; the partial results are merged through their log-sum-exp. Each
  partial call quantizes its own K/V shard (K mean per shard), and each partial output is
  rounded to the output dtype before the fp32 merge, so the result differs from the
  single-device one by the path's own quantization error plus about one output-dtype rounding.
  Causal attention over zig-zag shards (rank r holds chunks r and 2W-1-r of 2W, the load
  balancing of Llama 3's context parallelism and of ring-flash-attention's zig-zag ring)
  gives every rank the same work.

Nothing here is a communication layer: the exchanges are ``all_to_all_single`` and
``batch_isend_irecv`` of ``P2POp`` lists, which NCCL and gloo both implement (gloo on torch 2.13
was checked to run ``all_to_all_single`` with uneven splits and P2P batches that only some
ranks join), so the CPU tests run the same code the GPUs run. Each call stays on the device of
its tensors and that device's current stream; nothing here synchronizes the host with a GPU.
Only the public ``sageattn`` API is called (``is_causal`` True or False per block), so every
path and kernel serves both schemes unchanged.

Causal masks use sageattn's bottom-right alignment over the whole sequence: key ``j`` is
visible to query ``i`` iff ``j <= i + Sk - Sq`` (global positions and lengths).
"""

from __future__ import annotations

import contextlib
import math
import operator
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["ulysses_attention", "ring_attention", "merge_attention", "shard_sequence",
           "unshard_sequence"]

_LAYOUTS = ("HND", "NHD")


# ---- arguments -------------------------------------------------------------------------

def _group_rank_size(fn: str, group):
    """(group, this process's rank in it, its size); clear errors when there is none."""
    if not dist.is_available():
        raise RuntimeError(f"{fn} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(f"{fn} needs an initialized process group: call "
                           "torch.distributed.init_process_group('nccl', ...) on every rank "
                           "first ('gloo' for CPU tensors)")
    g = dist.group.WORLD if group is None else group
    rank = dist.get_rank(g)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member "
                         "of the group passed to " + fn)
    return g, rank, dist.get_world_size(g)


def _check_inputs(fn, q, k, v, tensor_layout, is_causal, return_lse, attn_fn):
    """Shape/type checks on this rank's shards; returns (B, Hq, Hkv, Sq, Sk, D) of the shards."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{fn}: {name} must have 4 dimensions (B, H, S, D) or (B, S, H, D), "
                             f"got shape {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{fn}: {name} is on {x.device} but q is on {q.device}")
        if x.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} has dtype {x.dtype} but q has {q.dtype}; q, k and v "
                            "must share one dtype")
    if not isinstance(tensor_layout, str) or tensor_layout not in _LAYOUTS:
        raise ValueError(f"{fn}: tensor_layout must be 'HND' (B, H, S, D) or 'NHD' "
                         f"(B, S, H, D), got {tensor_layout!r}")
    for name, flag in (("is_causal", is_causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {flag!r}")
    if attn_fn is None:
        if q.device.type != "cuda":
            raise ValueError(
                f"{fn}: q is on {q.device}; the default attention (sageattn.sageattn) runs on "
                "CUDA devices only. For CPU tensors pass attn_fn, e.g. "
                "functools.partial(sageattn.reference.attention, dtype=torch.float64) or "
                "sageattn.emulate.sm80_attention")
    elif not callable(attn_fn):
        raise TypeError(f"{fn}: attn_fn must be callable or None, got {attn_fn!r}")
    s_dim, h_dim = (2, 1) if tensor_layout == "HND" else (1, 2)
    B, Hq, Sq, D = q.shape[0], q.shape[h_dim], q.shape[s_dim], q.shape[3]
    Hkv, Sk = k.shape[h_dim], k.shape[s_dim]
    for name, x in (("k", k), ("v", v)):
        if x.shape[0] != B:
            raise ValueError(f"{fn}: {name} has batch {x.shape[0]} but q has {B}")
        if x.shape[3] != D:
            raise ValueError(f"{fn}: {name} has head dim {x.shape[3]} but q has {D}")
    if v.shape[h_dim] != Hkv or v.shape[s_dim] != Sk:
        raise ValueError(f"{fn}: v has shape {tuple(v.shape)} but k has {tuple(k.shape)} "
                         f"(layout {tensor_layout}); k and v must match")
    if min(B, Hq, Hkv, Sq, Sk, D) < 1:
        raise ValueError(f"{fn}: every dimension must be >= 1, got q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)} (layout {tensor_layout}); a rank with an empty shard "
                         "is not supported")
    if Hq % Hkv:
        raise ValueError(f"{fn}: q has {Hq} heads, which is not a multiple of k's {Hkv} "
                         "(GQA/MQA need Hkv to divide Hq)")
    return B, Hq, Hkv, Sq, Sk, D


def _lengths(fn, name, lens, world, rank, local, local_name):
    """Every rank's shard length: ``lens`` validated, or ``local`` on every rank (None)."""
    if lens is None:
        return [local] * world
    try:
        if isinstance(lens, (torch.Tensor, str)) or any(isinstance(n, bool) for n in lens):
            raise TypeError
        lens = [operator.index(n) for n in lens]
    except TypeError:
        raise TypeError(f"{fn}: {name} must be a sequence of ints (one shard length per rank, "
                        f"the same list on every rank), got {lens!r}") from None
    if len(lens) != world:
        raise ValueError(f"{fn}: {name} has {len(lens)} entries but the group has {world} ranks")
    if min(lens) < 1:
        raise ValueError(f"{fn}: {name} has a shard of length {min(lens)}; every rank needs "
                         "at least one token")
    if lens[rank] != local:
        raise ValueError(f"{fn}: {name}[{rank}] = {lens[rank]} but this rank's {local_name} "
                         f"holds {local} tokens")
    return lens


def _shard_lengths(fn, seq_lens, kv_seq_lens, world, rank, Sq, Sk):
    q_lens = _lengths(fn, "seq_lens", seq_lens, world, rank, Sq, "q")
    if kv_seq_lens is None and seq_lens is not None and Sk != Sq:
        raise ValueError(f"{fn}: seq_lens is given and this rank's k holds {Sk} tokens but q "
                         f"holds {Sq}; pass kv_seq_lens for the k/v shards too")
    if kv_seq_lens is None and seq_lens is not None:
        kv_seq_lens = seq_lens
    kv_lens = _lengths(fn, "kv_seq_lens", kv_seq_lens, world, rank, Sk, "k")
    return q_lens, kv_lens


def _hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "NHD" else x


def _device_guard(device: torch.device):
    # Keeps every allocation and NCCL call of this rank on its tensors' device even when
    # the caller's current device is another one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _attn_fn(attn_fn) -> Callable:
    if attn_fn is not None:
        return attn_fn
    from .api import sageattn   # resolved per call: a patched sageattn.api.sageattn is used
    return sageattn


def _split_result(fn, res, want_lse: bool, out_shape: tuple, lse_shape: tuple):
    """``attn_fn``'s result as (out, lse or None), with its shapes checked."""
    if want_lse:
        if not (isinstance(res, tuple) and len(res) == 2):
            raise TypeError(f"{fn}: attn_fn(..., return_lse=True) must return (out, lse), got "
                            f"{type(res).__name__}")
        out, lse = res
    else:
        out, lse = res, None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != out_shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"{fn}: attn_fn returned an output of shape {got}, expected {out_shape}")
    if want_lse and (not isinstance(lse, torch.Tensor) or tuple(lse.shape) != lse_shape):
        got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise TypeError(f"{fn}: attn_fn returned an LSE of shape {got}, expected {lse_shape} "
                        "(B, Hq, Sq)")
    return out, lse


# ---- the LSE merge ---------------------------------------------------------------------

def _merge_(acc_out, acc_lse, out, lse, layout: str) -> None:
    """Fold one partial (out, lse) into the accumulators, in place.

    ``acc_out``/``out`` are softmax-normalized outputs over disjoint key sets, ``*_lse``
    their natural-log LSEs. A row whose LSE is ``-inf`` saw no key: it weighs 0, and a row
    with no key on either side stays 0 with LSE ``-inf`` (never NaN: the shift ``m`` is
    replaced by 0 where both are ``-inf``, as the kernels' online softmax does).
    """
    m = torch.maximum(acc_lse, lse)
    seen = m > -math.inf
    m = torch.where(seen, m, 0.0)
    a = torch.exp(acc_lse - m)          # in [0, 1]; 0 for a -inf side
    b = torch.exp(lse - m)
    total = a + b                       # >= 1 where seen, 0 elsewhere
    inv = torch.where(seen, 1.0 / torch.where(seen, total, 1.0), 0.0)
    a, b = a * inv, b * inv
    if layout == "NHD":
        a, b = a.transpose(1, 2), b.transpose(1, 2)
    acc_out.mul_(a[..., None]).add_(out * b[..., None])
    acc_lse.copy_(m + torch.log(total))     # log(0) = -inf for unseen rows


def merge_attention(out_a, lse_a, out_b, lse_b, tensor_layout: str = "HND"):
    """Merge two attention results over disjoint key sets into the result over their union.

    ``out_*``: softmax-normalized outputs (B, H, S, D) or (B, S, H, D) per ``tensor_layout``;
    ``lse_*``: their natural-log LSEs (B, H, S), as ``sageattn(..., return_lse=True)``
    returns them. Returns (out, lse) in at least float32. Rows whose LSE is ``-inf`` (no
    visible key) weigh nothing; a row with no key on either side is 0 with LSE ``-inf``.
    """
    if tensor_layout not in _LAYOUTS:
        raise ValueError(f"tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(f"shapes differ: out {tuple(out_a.shape)} vs {tuple(out_b.shape)}, lse "
                         f"{tuple(lse_a.shape)} vs {tuple(lse_b.shape)}")
    o = _hnd(out_a, tensor_layout)
    if tuple(lse_a.shape) != tuple(o.shape[:3]):
        raise ValueError(f"lse has shape {tuple(lse_a.shape)}, expected (B, H, S) = "
                         f"{tuple(o.shape[:3])} for out {tuple(out_a.shape)} ({tensor_layout})")
    dtype = torch.promote_types(torch.promote_types(out_a.dtype, out_b.dtype), torch.float32)
    acc = out_a.to(dtype, copy=True)
    acc_lse = lse_a.to(torch.promote_types(lse_a.dtype, torch.float32), copy=True)
    _merge_(acc, acc_lse, out_b, lse_b, tensor_layout)
    return acc, acc_lse


# ---- Ulysses ---------------------------------------------------------------------------

def _exchange_to_heads(parts, lens, group, world):
    """All-to-all of HND views (B, H_i, S_r, D) holding this rank's tokens, every head: returns
    views (B, H_i / W, S_total, D) holding every token for this rank's heads (rank j gets head
    chunk j of every part).

    The parts share one message. The receive buffer is sequence-major (S_total, B, heads, D),
    so the result is a strided view the attention reads in place, with no copy after the
    exchange.
    """
    x0 = parts[0]
    B, S, D = x0.shape[0], x0.shape[2], x0.shape[3]
    heads = [x.shape[1] // world for x in parts]
    hl = sum(heads)
    send = torch.empty((world, S, B, hl, D), dtype=x0.dtype, device=x0.device)
    start = 0
    for x, h in zip(parts, heads):
        # (B, W*h, S, D) -> (W, S, B, h, D): chunk j = head slice j
        send[:, :, :, start:start + h].copy_(x.unflatten(1, (world, h)).permute(1, 3, 0, 2, 4))
        start += h
    recv = torch.empty((sum(lens), B, hl, D), dtype=x0.dtype, device=x0.device)
    unit = B * hl * D
    uneven = len(set(lens)) > 1
    dist.all_to_all_single(recv.view(-1), send.view(-1),
                           output_split_sizes=[n * unit for n in lens] if uneven else None,
                           input_split_sizes=None, group=group)
    views, start = [], 0
    for h in heads:
        views.append(recv[:, :, start:start + h].permute(1, 2, 0, 3))
        start += h
    return views


def _exchange_to_tokens(x, lens, rank, group, world, layout):
    """The inverse exchange: (B, h, S_total, D) (HND view, any strides) for this rank's heads,
    every token -> (B, W*h, S_r, D) for every head, this rank's tokens, contiguous in
    ``layout``. Also takes an LSE (B, h, S_total) and returns (B, W*h, S_r)."""
    is_lse = x.dim() == 3
    tail = () if is_lse else (x.shape[3],)
    B, h = x.shape[0], x.shape[1]
    send = x.permute(2, 0, 1, *range(3, x.dim())).contiguous()   # (S_total, B, h[, D])
    n = lens[rank]
    recv = torch.empty((world, n, B, h) + tail, dtype=x.dtype, device=x.device)
    unit = B * h * math.prod(tail)
    uneven = len(set(lens)) > 1
    dist.all_to_all_single(recv.view(-1), send.view(-1), output_split_sizes=None,
                           input_split_sizes=[m * unit for m in lens] if uneven else None,
                           group=group)
    if is_lse:
        return recv.permute(2, 0, 3, 1).reshape(B, world * h, n)
    if layout == "HND":
        return recv.permute(2, 0, 3, 1, 4).reshape(B, world * h, n, tail[0]).contiguous()
    return recv.permute(2, 1, 0, 3, 4).reshape(B, n, world * h, tail[0]).contiguous()


def ulysses_attention(q, k, v, group=None, tensor_layout: str = "HND", is_causal: bool = False,
                      sm_scale: Optional[float] = None, return_lse: bool = False,
                      attn_fn: Optional[Callable] = None, *,
                      seq_lens: Optional[Sequence[int]] = None,
                      kv_seq_lens: Optional[Sequence[int]] = None):
    """DeepSpeed-Ulysses attention: this rank's shard of ``attention(Q, K, V)`` over the whole
    sequence, where ``q``, ``k``, ``v`` are this rank's contiguous sequence shards (rank order).

    Args:
        q, k, v: this rank's shards, (B, H, S_r, D) for "HND" or (B, S_r, H, D) for "NHD";
            every rank passes the same B, heads, D, dtype, layout, flags and ``sm_scale``.
        group: the process group (default: the world). Its size ``W`` must divide ``Hq``.
            GQA/MQA: when ``W`` does not divide ``Hkv``, K/V heads are repeated to
            ``lcm(Hkv, W)`` heads before the exchange (exact: query head ``h`` still reads
            kv head ``h // (Hq // Hkv)``), which sends ``lcm(Hkv, W) / Hkv`` times the K/V
            bytes.
        is_causal: causal over the whole sequence, bottom-right aligned (key ``j`` visible
            to query ``i`` iff ``j <= i + Sk - Sq``, global positions), as ``sageattn``.
        sm_scale: defaults to ``D ** -0.5``.
        return_lse: also return this rank's natural-log LSE (B, Hq, S_r), in ``attn_fn``'s
            LSE dtype (float32 for sageattn).
        attn_fn: the local attention, called once as ``attn_fn(q, k, v, tensor_layout="NHD",
            is_causal=..., sm_scale=..., return_lse=...)`` on the whole sequence for ``Hq/W``
            heads (strided views). Default ``sageattn.sageattn`` (CUDA tensors).
        seq_lens: when shards differ in length, every rank's q shard length in rank order
            (the same list on every rank). Default: all shards as long as this rank's.
        kv_seq_lens: the same for k/v shards; defaults to ``seq_lens``.

    Returns:
        This rank's output shard in ``attn_fn``'s output dtype (q's for sageattn), in q's
        layout, contiguous (and the LSE). Communication: one all-to-all for q, k and v
        (two when q and k/v shards differ in length), one for the output, one more for the LSE.
    """
    fn = "ulysses_attention"
    g, rank, world = _group_rank_size(fn, group)
    B, Hq, Hkv, Sq, Sk, D = _check_inputs(fn, q, k, v, tensor_layout, is_causal, return_lse,
                                          attn_fn)
    q_lens, kv_lens = _shard_lengths(fn, seq_lens, kv_seq_lens, world, rank, Sq, Sk)
    attn = _attn_fn(attn_fn)
    if world == 1:
        return attn(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal,
                    sm_scale=sm_scale, return_lse=return_lse)
    if Hq % world:
        raise ValueError(f"{fn}: q has {Hq} heads, which the group's {world} ranks cannot share "
                         "(Ulysses gives each rank Hq / W heads); use ring_attention, or a "
                         "group whose size divides the head count")
    qh, kh, vh = (_hnd(x, tensor_layout) for x in (q, k, v))
    with _device_guard(q.device):
        kv_heads = math.lcm(Hkv, world)     # divides Hq, since Hkv and W both do
        if kv_heads != Hkv:
            kh, vh = (x.repeat_interleave(kv_heads // Hkv, dim=1) for x in (kh, vh))
        if q_lens == kv_lens:
            qx, kx, vx = _exchange_to_heads([qh, kh, vh], q_lens, g, world)
        else:
            (qx,) = _exchange_to_heads([qh], q_lens, g, world)
            kx, vx = _exchange_to_heads([kh, vh], kv_lens, g, world)
        S_total = sum(q_lens)
        # NHD views of the sequence-major buffers: the local output comes back (B, S, h, D),
        # which for B == 1 is already the sequence-major order the return exchange sends.
        res = attn(qx.transpose(1, 2), kx.transpose(1, 2), vx.transpose(1, 2),
                   tensor_layout="NHD", is_causal=is_causal, sm_scale=sm_scale,
                   return_lse=return_lse)
        out, lse = _split_result(fn, res, return_lse, (B, S_total, Hq // world, D),
                                 (B, Hq // world, S_total))
        out = _exchange_to_tokens(out.transpose(1, 2), q_lens, rank, g, world, tensor_layout)
        if not return_lse:
            return out
        return out, _exchange_to_tokens(lse, q_lens, rank, g, world, tensor_layout)


# ---- ring ------------------------------------------------------------------------------

_ORDERINGS = ("contiguous", "zigzag")


def _ring_plan(src: int, rank: int, causal: bool, zigzag: bool):
    """What this rank computes with rank ``src``'s K/V shard: None (wholly masked), or
    (query part, key part, causal flag), a part being "all" or a half: "first"/"second".

    Contiguous shards: an earlier rank's shard is wholly visible, the own shard is the
    diagonal, a later rank's shard is wholly masked. Zig-zag shards (rank r holds chunks r
    and 2W-1-r of 2W): from an earlier rank only its first chunk is visible, to both query
    chunks; from a later rank both its chunks are visible, to the second query chunk only;
    the own shard is causal as a whole (its two chunks are in order).
    """
    if not causal:
        return "all", "all", False
    if src == rank:
        return "all", "all", True
    if not zigzag:
        return ("all", "all", False) if src < rank else None
    return ("all", "first", False) if src < rank else ("second", "all", False)


def _part(x: torch.Tensor, part: str, layout: str) -> torch.Tensor:
    if part == "all":
        return x
    dim = 2 if layout == "HND" else 1
    half = x.shape[dim] // 2
    return x.narrow(dim, 0 if part == "first" else half, half)


def _lse_part(lse: torch.Tensor, part: str) -> torch.Tensor:
    if part == "all":
        return lse
    half = lse.shape[2] // 2
    return lse.narrow(2, 0 if part == "first" else half, half)


def ring_attention(q, k, v, group=None, tensor_layout: str = "HND", is_causal: bool = False,
                   sm_scale: Optional[float] = None, return_lse: bool = False,
                   attn_fn: Optional[Callable] = None, *,
                   seq_lens: Optional[Sequence[int]] = None,
                   kv_seq_lens: Optional[Sequence[int]] = None,
                   ordering: str = "contiguous"):
    """Ring attention: this rank's shard of ``attention(Q, K, V)`` over the whole sequence,
    where ``q``, ``k``, ``v`` are this rank's sequence shards.

    K/V shards travel around the ring (rank r sends to r+1, receives from r-1) while each
    rank attends its queries to the shard it holds; the next shard's transfer overlaps the
    current call. Partial results merge through their LSE in float32 (float64 when
    ``attn_fn`` returns float64).

    Causal (``is_causal=True``) needs self-attention sharding: every rank's q and k/v shards
    have the same length. With ``ordering="contiguous"`` (rank r holds the r-th contiguous
    shard; lengths may differ between ranks, see ``seq_lens``) an earlier rank's shard is
    wholly visible (a plain call), the own shard is the diagonal (a causal call; square, so
    bottom-right and top-left alignment agree) and a later rank's shard is wholly masked
    (skipped, and not even sent). Rank r then makes r+1 calls: the last rank does W calls'
    work while rank 0 does one, so the ring runs at its last rank's pace, about
    2W/(W+1) times one device's speed rather than W times. ``ordering="zigzag"`` fixes this
    imbalance: the sequence is cut into 2W equal chunks and rank r holds chunks r and
    2W-1-r, in that order (``shard_sequence`` cuts them); every step is then half a block
    of work on every rank. For causal cross-attention use ``ulysses_attention``.

    Args:
        q, k, v: this rank's shards, (B, H, S_r, D) for "HND" or (B, S_r, H, D) for "NHD",
            GQA/MQA allowed (``Hkv`` divides ``Hq``; only the ``Hkv`` heads travel). Every
            rank passes the same B, heads, D, dtype, layout, flags and ``sm_scale``.
        group: the process group (default: the world); any size.
        is_causal, sm_scale: as ``sageattn``, over the whole sequence (global bottom-right
            alignment).
        return_lse: also return this rank's natural-log LSE (B, Hq, S_r), at least float32.
        attn_fn: the local attention, called as ``attn_fn(q, k_blk, v_blk,
            tensor_layout=..., is_causal=..., sm_scale=..., return_lse=True)`` and returning
            ``(out, lse)``. Default ``sageattn.sageattn`` (CUDA tensors).
        seq_lens: when shards differ in length, every rank's q shard length in rank order
            (the same list on every rank). Default: all as long as this rank's.
        kv_seq_lens: the same for k/v shards (the receive buffers' sizes); defaults to
            ``seq_lens``.
        ordering: how the sequence is sharded: "contiguous" (default) or "zigzag" (equal,
            even-length shards). Only causal attention depends on it.

    Returns:
        This rank's output shard in ``attn_fn``'s output dtype (q's for sageattn), in q's
        layout, contiguous (and the LSE).
    """
    fn = "ring_attention"
    g, rank, world = _group_rank_size(fn, group)
    B, Hq, Hkv, Sq, Sk, D = _check_inputs(fn, q, k, v, tensor_layout, is_causal, return_lse,
                                          attn_fn)
    q_lens, kv_lens = _shard_lengths(fn, seq_lens, kv_seq_lens, world, rank, Sq, Sk)
    if not isinstance(ordering, str) or ordering not in _ORDERINGS:
        raise ValueError(f"{fn}: ordering must be 'contiguous' or 'zigzag', got {ordering!r}")
    if is_causal and q_lens != kv_lens:
        raise ValueError(f"{fn}: is_causal=True needs q and k/v sharded alike (self-attention: "
                         f"every rank's q and k shards of equal length), got q shards {q_lens} "
                         f"and k/v shards {kv_lens}; use ulysses_attention for causal "
                         "cross-attention")
    zigzag = is_causal and ordering == "zigzag"
    if zigzag and (len(set(q_lens)) > 1 or Sq % 2):
        raise ValueError(f"{fn}: ordering='zigzag' needs shards of one even length (two equal "
                         f"chunks per rank), got shard lengths {q_lens}")
    attn = _attn_fn(attn_fn)
    if world == 1:
        return attn(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal,
                    sm_scale=sm_scale, return_lse=return_lse)
    nxt_peer = dist.get_global_rank(g, (rank + 1) % world)
    prev_peer = dist.get_global_rank(g, (rank - 1) % world)
    kv_shape = lambda n: (2, B, Hkv, n, D) if tensor_layout == "HND" else (2, B, n, Hkv, D)
    # Contiguous causal: rank r+1 needs a block only while it comes from a rank <= r (before
    # it wraps around the ring), so a block stops at the last rank.
    prune = is_causal and not zigzag

    def sends(step):    # whether this rank passes the block it holds at ``step`` on
        return step < world - 1 and (not prune or (step <= rank and rank < world - 1))

    def receives(step):  # whether this rank receives the block it uses at ``step + 1``
        return step < world - 1 and (not prune or step + 1 <= rank)

    with _device_guard(q.device):
        cur = torch.stack((k, v))   # one contiguous message per step
        acc = acc_lse = out_dtype = None
        for step in range(world):
            src = (rank - step) % world
            ops, nxt = [], None
            if sends(step):
                ops.append(dist.P2POp(dist.isend, cur, nxt_peer, g))
            if receives(step):
                nxt = torch.empty(kv_shape(kv_lens[(src - 1) % world]), dtype=cur.dtype,
                                  device=cur.device)
                ops.append(dist.P2POp(dist.irecv, nxt, prev_peer, g))
            pending = dist.batch_isend_irecv(ops) if ops else []
            try:
                plan = _ring_plan(src, rank, is_causal, zigzag)
                if plan is not None:
                    q_part, kv_part, causal = plan
                    qq = _part(q, q_part, tensor_layout)
                    res = attn(qq, _part(cur[0], kv_part, tensor_layout),
                               _part(cur[1], kv_part, tensor_layout),
                               tensor_layout=tensor_layout, is_causal=causal,
                               sm_scale=sm_scale, return_lse=True)
                    out, lse = _split_result(fn, res, True, tuple(qq.shape),
                                             (B, Hq, qq.shape[2 if tensor_layout == "HND" else 1]))
                    if acc is None:     # step 0: the own shard, every query row
                        out_dtype = out.dtype
                        acc = out.to(torch.promote_types(out.dtype, torch.float32), copy=True)
                        acc_lse = lse.to(torch.promote_types(lse.dtype, torch.float32),
                                         copy=True)
                    else:
                        _merge_(_part(acc, q_part, tensor_layout), _lse_part(acc_lse, q_part),
                                out, lse, tensor_layout)
            except BaseException:
                # The peers posted the matching transfers of this step: let them finish, so
                # an error in attn_fn leaves no transfer in flight on the group.
                for work in pending:
                    work.wait()
                raise
            for work in pending:
                work.wait()
            cur = nxt
        out = acc.to(out_dtype).contiguous()
        return (out, acc_lse) if return_lse else out


# ---- sharding helpers ------------------------------------------------------------------

def _zigzag_chunks(seq: int, world: int, fn: str) -> int:
    if seq % (2 * world):
        raise ValueError(f"{fn}: ordering='zigzag' cuts the sequence into 2 * {world} equal "
                         f"chunks, which {seq} tokens do not make; pad the sequence to a "
                         f"multiple of {2 * world}")
    return seq // (2 * world)


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, tensor_layout: str = "HND",
                   ordering: str = "contiguous") -> torch.Tensor:
    """Rank ``rank``'s shard of a whole-sequence tensor (B, H, S, D) / (B, S, H, D).

    "contiguous": the r-th of ``world_size`` consecutive pieces, as ``torch.tensor_split``
    cuts them (the first ``S % W`` pieces one token longer: pass their lengths as
    ``seq_lens`` when ``W`` does not divide ``S``); a view. "zigzag": chunks r and 2W-1-r
    of 2W equal chunks, concatenated (a copy; ``S`` must be a multiple of 2W).
    """
    fn = "shard_sequence"
    if tensor_layout not in _LAYOUTS:
        raise ValueError(f"{fn}: tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")
    if ordering not in _ORDERINGS:
        raise ValueError(f"{fn}: ordering must be 'contiguous' or 'zigzag', got {ordering!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"{fn}: rank {rank} is outside 0..{world_size - 1}")
    dim = 2 if tensor_layout == "HND" else 1
    if ordering == "contiguous":
        return torch.tensor_split(x, world_size, dim=dim)[rank]
    c = _zigzag_chunks(x.shape[dim], world_size, fn)
    return torch.cat((x.narrow(dim, rank * c, c),
                      x.narrow(dim, (2 * world_size - 1 - rank) * c, c)), dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], tensor_layout: str = "HND",
                     ordering: str = "contiguous") -> torch.Tensor:
    """The whole-sequence tensor from every rank's shard in rank order (the inverse of
    ``shard_sequence``; e.g. of outputs gathered with ``torch.distributed.all_gather``)."""
    fn = "unshard_sequence"
    if tensor_layout not in _LAYOUTS:
        raise ValueError(f"{fn}: tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")
    if ordering not in _ORDERINGS:
        raise ValueError(f"{fn}: ordering must be 'contiguous' or 'zigzag', got {ordering!r}")
    dim = 2 if tensor_layout == "HND" else 1
    if ordering == "contiguous":
        return torch.cat(list(shards), dim=dim)
    world = len(shards)
    halves = [x.tensor_split(2, dim=dim) for x in shards]
    if any(x.shape[dim] % 2 or x.shape[dim] != shards[0].shape[dim] for x in shards):
        raise ValueError(f"{fn}: zig-zag shards must share one even length, got "
                         f"{[x.shape[dim] for x in shards]}")
    return torch.cat([halves[r][0] for r in range(world)] +
                     [halves[r][1] for r in reversed(range(world))], dim=dim)
