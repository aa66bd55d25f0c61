"""Whole-call speed of the sm80 path (forced) against torch SDPA's cuDNN and flash backends, in
one run on one GPU.

B=4, H=32, D=128, bf16, S = 1k..16k, non-causal and causal; fresh random inputs (never zeros:
zero data runs faster on some tensor cores). Each number is the median of
``triton.testing.do_bench`` (CUDA events when triton is missing) over the user-facing call,
quantization and allocation included. TOPS = 4*B*H*S^2*D / time, halved when causal.

    python bench/bench_sm80.py --out bench.md [--seqlens 1024 4096] [--heads 32] [--batch 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import sageattn


def _median_ms(fn) -> tuple[float, str]:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _events_ms(fn), "CUDA events"
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median")), "triton do_bench"


def _events_ms(fn, warmup=10, iters=50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def _sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


METHODS = {
    "sageattn sm80 (INT8 QK, FP16 PV, fp32 acc)":
        lambda q, k, v, causal: sageattn.sageattn(q, k, v, is_causal=causal, path="sm80"),
    "torch SDPA, cuDNN": _sdpa(SDPBackend.CUDNN_ATTENTION),
    "torch SDPA, flash": _sdpa(SDPBackend.FLASH_ATTENTION),
}
_BASELINE = "torch SDPA, cuDNN"


def run(batch, heads, head_dim, seqlens, dtype):
    """{(method, causal): {S: TOPS or None}} and the timer used."""
    results, timer = {}, None
    for causal in (False, True):
        for S in seqlens:
            g = torch.Generator(device="cuda").manual_seed(S)
            q, k, v = (torch.randn(batch, heads, S, head_dim, generator=g, device="cuda",
                                   dtype=dtype) for _ in range(3))
            flops = 4 * batch * heads * S * S * head_dim / (2 if causal else 1)
            for name, fn in METHODS.items():
                try:
                    fn(q, k, v, causal)                 # first call: kernel load, checks
                    ms, timer = _median_ms(lambda: fn(q, k, v, causal))
                    tops = flops / (ms * 1e-3) / 1e12
                except RuntimeError as exc:             # backend unavailable for this shape
                    print(f"  {name} S={S} causal={causal}: n/a ({str(exc).splitlines()[0]})",
                          file=sys.stderr)
                    tops = None
                results.setdefault((name, causal), {})[S] = tops
                print(f"  {name:<44} S={S:<6} causal={causal!s:<5} "
                      f"{'n/a' if tops is None else f'{tops:7.1f} TOPS'}", flush=True)
    return results, timer


def host_overhead_us(calls=2000) -> dict:
    """Host time per call at a tiny shape (B=1, H=1, S=64, D=64), where launch overhead is all
    there is: the wall time of ``calls`` back-to-back calls, synchronized once at the end."""
    q, k, v = (torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = {}
    for name, fn in (("sageattn", lambda: sageattn.sageattn(q, k, v, path="sm80")),
                     ("torch SDPA", lambda: torch.nn.functional.scaled_dot_product_attention(
                         q, k, v))):
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - start) / calls * 1e6
    return out


def table(results, seqlens, title) -> str:
    def label(S):
        return f"{S // 1024}k" if S % 1024 == 0 else str(S)

    lines = [f"### {title}", "", "| TOPS | " + " | ".join(label(S) for S in seqlens) + " |",
             "|---|" + "---|" * len(seqlens)]
    for causal in (False, True):
        base = results.get((_BASELINE, causal), {})
        for name in METHODS:
            row = results.get((name, causal), {})
            cells = []
            for S in seqlens:
                tops = row.get(S)
                if tops is None:
                    cells.append("n/a")
                elif name != _BASELINE and base.get(S):
                    cells.append(f"{tops:.0f} ({tops / base[S]:.2f}x)")
                else:
                    cells.append(f"{tops:.0f}")
            lines.append(f"| {name}{', causal' if causal else ''} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("(ratio) = TOPS relative to torch SDPA cuDNN in the same run.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the markdown table to this file")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark", file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    report = sageattn.explain(path="sm80", head_dim=args.head_dim)
    print(report, flush=True)
    results, timer = run(args.batch, args.heads, args.head_dim, args.seqlens, dtype)
    title = (f"{torch.cuda.get_device_name()}: B={args.batch} H={args.heads} "
             f"D={args.head_dim} {args.dtype}, whole call, median of {timer}; "
             f"kernel {report['kernel']}; torch {torch.__version__}")
    text = table(results, args.seqlens, title)
    overhead = host_overhead_us()
    text += ("\n\nHost time per call at B=1 H=1 S=64 D=64 (launch overhead): " +
             ", ".join(f"{name} {us:.1f} us" for name, us in overhead.items()))
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
