"""Whole-call speed of every sageattn path that runs on this GPU, forced one by one, against
torch SDPA's cuDNN and flash backends, in one run on one GPU.

Methods (``--methods``, default all): sm80 (INT8 QK, FP16 PV, "fp32" accumulation), sm89 with
"fp32+fp32" and with "fp32+fp16" (INT8 QK, FP8 PV; SageAttention2 / 2++), torch SDPA cuDNN
and flash. B=4, H=32, D=128, bf16, S = 1k..16k, non-causal and causal; fresh random inputs
(never zeros: zero data runs faster on some tensor cores). Each number is the median of
``triton.testing.do_bench`` (CUDA events when triton is missing) over the user-facing call,
validation, quantization and allocation included. TOPS = 4*B*H*S^2*D / time, halved when
causal; (ratio) = TOPS relative to cuDNN in the same run. About a minute on an H100.

On compute capability 9.0 the sm89 tree's E4M3 MMA is emulated by the compiler with fp16
MMAs (DESIGN.md section 5): its numbers there show the path works, not how fast it is on
Ada or Blackwell consumer GPUs.

    python bench/bench_paths.py --out bench.md [--seqlens 1024 4096] [--methods sm80 cudnn]
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


# key -> (label, path it needs or None, call)
METHODS = {
    "sm80": ("sageattn sm80 (INT8 QK, FP16 PV, fp32)", "sm80",
             lambda q, k, v, causal: sageattn.sageattn(q, k, v, is_causal=causal, path="sm80")),
    "sm89_fp32+fp32": ("sageattn sm89 (INT8 QK, FP8 PV, fp32+fp32)", "sm89",
                       lambda q, k, v, causal: sageattn.sageattn_qk_int8_pv_fp8_cuda(
                           q, k, v, is_causal=causal, pv_accum_dtype="fp32+fp32")),
    "sm89_fp32+fp16": ("sageattn sm89 (INT8 QK, FP8 PV, fp32+fp16)", "sm89",
                       lambda q, k, v, causal: sageattn.sageattn(q, k, v, is_causal=causal,
                                                                 path="sm89")),
    "cudnn": ("torch SDPA, cuDNN", None, _sdpa(SDPBackend.CUDNN_ATTENTION)),
    "flash": ("torch SDPA, flash", None, _sdpa(SDPBackend.FLASH_ATTENTION)),
}
_BASELINE = "cudnn"


def available(methods, head_dim) -> tuple[list, list]:
    """(methods that run here, notes on those that do not and on the kernels used)."""
    keep, notes = [], []
    for key in methods:
        path = METHODS[key][1]
        if path is None:
            keep.append(key)
            continue
        report = sageattn.explain(path=path, head_dim=head_dim,
                                  pv_accum_dtype="fp32+fp32" if key == "sm89_fp32+fp32" else None)
        if report["path"] is None:
            notes.append(f"{key}: not run ({report['reason']})")
            continue
        keep.append(key)
        notes.append(f"{key}: kernel {report['kernel']}, {report['runs_as']}")
    return keep, notes


def run(methods, batch, heads, head_dim, seqlens, dtype):
    """{(method, causal): {S: TOPS or None}} and the timer used."""
    results, timer = {}, None
    for causal in (False, True):
        for S in seqlens:
            g = torch.Generator(device="cuda").manual_seed(S)
            q, k, v = (torch.randn(batch, heads, S, head_dim, generator=g, device="cuda",
                                   dtype=dtype) for _ in range(3))
            flops = 4 * batch * heads * S * S * head_dim / (2 if causal else 1)
            for key in methods:
                label, _, fn = METHODS[key]
                try:
                    fn(q, k, v, causal)                 # first call: kernel load, checks
                    ms, timer = _median_ms(lambda: fn(q, k, v, causal))
                    tops = flops / (ms * 1e-3) / 1e12
                except RuntimeError as exc:             # backend unavailable for this shape
                    print(f"  {label} S={S} causal={causal}: n/a ({str(exc).splitlines()[0]})",
                          file=sys.stderr)
                    tops = None
                results.setdefault((key, causal), {})[S] = tops
                print(f"  {label:<44} S={S:<6} causal={causal!s:<5} "
                      f"{'n/a' if tops is None else f'{tops:7.1f} TOPS'}", flush=True)
    return results, timer


def host_overhead_us(methods, calls=2000) -> dict:
    """Host time per call at a tiny shape (B=1, H=1, S=64, D=64), where launch overhead is all
    there is: the wall time of ``calls`` back-to-back calls, synchronized once at the end."""
    q, k, v = (torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = {}
    for key in methods:
        if key == "flash":
            continue
        label, _, fn = METHODS[key]
        for _ in range(50):
            fn(q, k, v, False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn(q, k, v, False)
        torch.cuda.synchronize()
        out[key] = (time.perf_counter() - start) / calls * 1e6
    return out


def table(results, methods, seqlens, title) -> str:
    def label(S):
        return f"{S // 1024}k" if S % 1024 == 0 else str(S)

    lines = [f"### {title}", "", "| TOPS | " + " | ".join(label(S) for S in seqlens) + " |",
             "|---|" + "---|" * len(seqlens)]
    for causal in (False, True):
        base = results.get((_BASELINE, causal), {})
        for key in methods:
            row = results.get((key, causal), {})
            cells = []
            for S in seqlens:
                tops = row.get(S)
                if tops is None:
                    cells.append("n/a")
                elif key != _BASELINE and base.get(S):
                    cells.append(f"{tops:.0f} ({tops / base[S]:.2f}x)")
                else:
                    cells.append(f"{tops:.0f}")
            name = METHODS[key][0] + (", causal" if causal else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("(ratio) = TOPS relative to torch SDPA cuDNN in the same run.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the markdown table to this file")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark", file=sys.stderr)
        return 1
    start = time.perf_counter()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    print(sageattn.explain(head_dim=args.head_dim), flush=True)
    methods, notes = available(args.methods, args.head_dim)
    for note in notes:
        print("  " + note, flush=True)
    results, timer = run(methods, args.batch, args.heads, args.head_dim, args.seqlens, dtype)
    cap = torch.cuda.get_device_capability()
    title = (f"{torch.cuda.get_device_name()} ({cap[0]}.{cap[1]}): B={args.batch} "
             f"H={args.heads} D={args.head_dim} {args.dtype}, whole call, median of {timer}; "
             f"torch {torch.__version__}")
    text = table(results, methods, args.seqlens, title)
    text += "\n\n" + "\n".join(f"- {note}" for note in notes)
    if cap == (9, 0) and any(m.startswith("sm89") for m in methods):
        text += ("\n- sm89 on 9.0: the E4M3 MMA is emulated with fp16 MMAs there; these numbers "
                 "show the path works, not its speed on Ada / Blackwell consumer GPUs.")
    overhead = host_overhead_us(methods)
    text += ("\n\nHost time per call at B=1 H=1 S=64 D=64 (launch overhead): " +
             ", ".join(f"{METHODS[key][0]} {us:.1f} us" for key, us in overhead.items()))
    text += f"\n\nBenchmark wall time {time.perf_counter() - start:.0f} s."
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
