"""Quantization launches alone: per kernel (channel stats on K, channel stats on V, the fused
quantize kernel) device time from torch.profiler, bytes moved and GB/s, plus the whole
quantization (``ops.quantized_operands``) timed as bench_paths times everything. B=4 H=32
D=128 bf16 HND, S = 1k, 4k, 16k by default, each tree this GPU runs (sm90 on an H100).

    python bench/bench_quantize.py                   # sm90 (or the newest tree here)
    python bench/bench_quantize.py --trees sm80 sm89 sm90 --seqs 1024 4096 16384

Bytes per launch (what the kernel must move at least): channel stats reads one (B, H, S, D)
16-bit tensor; the quantize launch reads Q, K, V and writes INT8 Q and K and V (E4M3 V^T tiles
on sm89/sm90, fp16 on sm80) padded to whole blocks, plus scales (counted, small).
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench_paths import median_ms
from sageattn import ops

_MIN_CAPABILITY = {"sm80": (8, 0), "sm89": (8, 9), "sm90": (9, 0)}


def _device_us(prof) -> dict:
    """kernel name -> mean device time per launch (us), from a profiler run."""
    out = {}
    for evt in prof.key_averages():
        total = getattr(evt, "self_device_time_total", None)
        if total is None:
            total = getattr(evt, "self_cuda_time_total", 0.0)
        if total and evt.count:
            out[evt.key] = total / evt.count
    return out


def _bytes(tree: str, B: int, H: int, S: int, D: int) -> dict:
    d_pad = 64 if D <= 64 else 128
    qb, kb = -(-S // 128), -(-S // 64)
    src = B * H * S * D * 2
    q_out = B * H * qb * 128 * d_pad + B * H * qb * 64 * 4
    k_out = B * H * kb * 64 * d_pad + B * H * kb * 4 * 4
    v_out = B * H * kb * 64 * d_pad * (2 if tree == "sm80" else 1)
    return {"channel_stats": src, "quantize": 3 * src + q_out + k_out + v_out}


def run(tree: str, S: int, B: int, H: int, D: int, iters: int) -> list:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g, device="cuda").to(torch.bfloat16)
               for _ in range(3))

    def quantize():
        return ops.quantized_operands(q, k, v, path=tree, smooth_k=True)

    quantize()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            quantize()
        torch.cuda.synchronize()
    per_kernel = _device_us(prof)
    moved = _bytes(tree, B, H, S, D)
    rows = []
    for name, us in sorted(per_kernel.items()):
        kind = "channel_stats" if "channel_stats" in name else ("quantize" if "quantize" in name
                                                               else None)
        if kind is None:
            continue
        # The K and V stats launches share a name: ``us`` is their mean per launch.
        rows.append((tree, S, name, us, moved[kind] / (us * 1e-6) / 1e9))
    whole_ms, timer = median_ms(quantize, warmup_ms=25, rep_ms=200)
    total = moved["quantize"] + moved["channel_stats"] * (2 if tree != "sm80" else 1)
    rows.append((tree, S, f"whole quantization ({timer})", whole_ms * 1e3,
                 total / (whole_ms * 1e-3) / 1e9))
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", nargs="+", default=None, choices=sorted(_MIN_CAPABILITY))
    ap.add_argument("--seqs", nargs="+", type=int, default=[1024, 4096, 16384])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    cap = torch.cuda.get_device_capability()
    runnable = [t for t, c in _MIN_CAPABILITY.items() if cap >= c and (t != "sm90" or cap == (9, 0))]
    trees = args.trees or runnable[-1:]
    for t in trees:
        if t not in runnable:
            raise SystemExit(f"error: the {t} tree does not run on compute capability {cap}")
    print(f"# {torch.cuda.get_device_name()}: B={args.batch} H={args.heads} D={args.head_dim} "
          f"bf16 HND, smooth_k on (K mean stats), device time per launch")
    print("| tree | S | kernel | us / launch | GB/s |")
    print("|---|---|---|---|---|")
    for t in trees:
        for S in args.seqs:
            for tree, s, name, us, gbs in run(t, S, args.batch, args.heads, args.head_dim,
                                             args.iters):
                print(f"| {tree} | {s} | {name} | {us:.1f} | {gbs:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
