"""Speed of every sageattn path that runs on this GPU (whole calls, and the attention kernel
alone), against torch SDPA's cuDNN and flash backends, in one run on one GPU.

Methods (``--methods``, default all that run here):
  auto            sageattn.sageattn, the path the dispatch table picks (sm90 on an H100)
  sm90            sageattn.sageattn(path="sm90"): wgmma INT8 QK + FP8 PV, "fp32+fp32"
  sm90_kernel     the sm90 attention kernel alone on pre-quantized inputs
                  (ops.attention_kernel_only)
  sm80            sageattn.sageattn(path="sm80"): INT8 QK, FP16 PV, "fp32"
  sm80_kernel     the sm80 attention kernel alone
  sm89_fp32+fp32  sageattn_qk_int8_pv_fp8_cuda(pv_accum_dtype="fp32+fp32") (SageAttention2)
  sm89_fp32+fp16  sageattn(path="sm89"): "fp32+fp16" (SageAttention2++)
  cudnn, flash    torch SDPA with that backend only (bf16/fp16 in, same dtype out)

B=4, H=32, head dims 64 and 128, S = 1k..16k, non-causal and causal (all flags). Inputs are
fresh random normals (never zeros: zero data runs faster on some tensor cores), made once per
(S, head dim) and freed after. Each number is the median of ``triton.testing.do_bench``
(warmup 100 ms, rep 40 ms by default; CUDA events when triton is missing) of the call: for whole
calls validation, quantization and allocation included. TOPS = 4*B*H*S^2*D / time, halved when
causal; (ratio) = TOPS relative to cuDNN in the same run. A method that fails prints n/a with
the reason and the run goes on. The default matrix takes about a minute on an H100 (estimate:
180 timings of ~0.1-0.3 s each plus first calls); ``--quick`` (hd128, S 4k and 16k, sm90 +
sm90_kernel + cuDNN + flash) about 15 s.

The output ends with the issue-3 acceptance checks (whole call, hd128, bf16; kernel alone at
16k against the card's FP8 GEMM rate, 1274 TFLOP/s measured on the H100) and a headline block.

On compute capability 9.0 the sm89 tree's E4M3 MMA is emulated by the compiler with fp16
MMAs (DESIGN.md section 5): its numbers there show the path works, not its speed on Ada or
Blackwell consumer GPUs.

    python bench/bench_paths.py --out bench.md --plot bench.png
    python bench/bench_paths.py --quick
    python bench/bench_paths.py --methods sm90 cudnn --head-dims 128 --seqlens 8192 16384 --causal full
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import sageattn
from sageattn import ops
from sageattn.__main__ import _time_ms  # the CUDA-event timer of `python -m sageattn`

# ---- timing (the one code path every method goes through) ---------------------------------


MIN_TIMED_CALLS = 20


def median_ms(fn, warmup_ms: float, rep_ms: float) -> tuple[float, str]:
    """Median time of ``fn()`` in ms and the timer's name.

    do_bench times ``rep_ms / estimate`` calls: with the default 40 ms a 16k call (~20 ms)
    was timed once or twice, and rows of the same kernels differed by up to 9% between runs.
    The budgets stretch so that at least MIN_TIMED_CALLS calls are timed after 3 warm-up ones."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_ms(fn, iters=max(30, MIN_TIMED_CALLS)), "CUDA events"
    estimate = _time_ms(fn, warmup=1, iters=3)
    warmup_ms, rep_ms = max(warmup_ms, 3 * estimate), max(rep_ms, MIN_TIMED_CALLS * estimate)
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")), \
        "triton do_bench"


def tops(batch, heads, S, D, causal, ms) -> float:
    return 4 * batch * heads * S * S * D / (2 if causal else 1) / (ms * 1e-3) / 1e12


# ---- methods ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    label: str
    path: Optional[str]          # the sageattn path it needs (None: torch's own)
    pv_accum: Optional[str]      # the configuration explain() is asked about
    prepare: Callable            # (q, k, v, causal) -> zero-argument callable to time
    whole_call: bool = True      # False: kernel alone on pre-quantized inputs


def _call(**kw):
    def prepare(q, k, v, causal):
        return lambda: sageattn.sageattn(q, k, v, is_causal=causal, **kw)
    return prepare


def _call_fp8_sm89(acc):
    def prepare(q, k, v, causal):
        return lambda: sageattn.sageattn_qk_int8_pv_fp8_cuda(q, k, v, is_causal=causal,
                                                             pv_accum_dtype=acc)
    return prepare


def _kernel_only(path):
    def prepare(q, k, v, causal):
        # Quantizes once here; the returned launcher runs only the attention kernel.
        return ops.attention_kernel_only(q, k, v, path=path, is_causal=causal)
    return prepare


def _sdpa(backend):
    def prepare(q, k, v, causal):
        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                        is_causal=causal)
        return run
    return prepare


METHODS = {
    "auto": Method("sageattn (auto path)", "auto", None, _call()),
    "sm90": Method("sageattn sm90 (wgmma INT8 QK, FP8 PV, fp32+fp32)", "sm90", None,
                   _call(path="sm90")),
    "sm90_kernel": Method("sm90 kernel alone (pre-quantized)", "sm90", None,
                          _kernel_only("sm90"), whole_call=False),
    "sm80": Method("sageattn sm80 (INT8 QK, FP16 PV, fp32)", "sm80", None, _call(path="sm80")),
    "sm80_kernel": Method("sm80 kernel alone (pre-quantized)", "sm80", None,
                          _kernel_only("sm80"), whole_call=False),
    "sm89_fp32+fp32": Method("sageattn sm89 (INT8 QK, FP8 PV, fp32+fp32)", "sm89", "fp32+fp32",
                             _call_fp8_sm89("fp32+fp32")),
    "sm89_fp32+fp16": Method("sageattn sm89 (INT8 QK, FP8 PV, fp32+fp16)", "sm89", None,
                             _call(path="sm89")),
    "cudnn": Method("torch SDPA, cuDNN", None, None, _sdpa(SDPBackend.CUDNN_ATTENTION)),
    "flash": Method("torch SDPA, flash", None, None, _sdpa(SDPBackend.FLASH_ATTENTION)),
}
BASELINE = "cudnn"
# Timing order inside one configuration: torch's backends first, so that a crashing kernel of
# ours (which poisons the CUDA context) still leaves the baselines measured.
_RUN_ORDER = ("cudnn", "flash")
QUICK = dict(head_dims=[128], seqlens=[4096, 16384],
             methods=["sm90", "sm90_kernel", "cudnn", "flash"])
FULL = dict(head_dims=[64, 128], seqlens=[1024, 2048, 4096, 8192, 16384], methods=list(METHODS))

# Issue 3's numbers (H100, DESIGN.md section 7): SageAttention 2.2.0's Hopper path, whole call,
# hd128 bf16, TOPS at S = 1k, 2k, 4k, 8k, 16k; and the card's measured FP8 GEMM rate.
SAGE220_HOPPER = {False: dict(zip((1024, 2048, 4096, 8192, 16384), (187, 337, 514, 657, 691))),
                  True: dict(zip((1024, 2048, 4096, 8192, 16384), (103, 203, 344, 510, 635)))}
FP8_GEMM_TFLOPS = 1274.0


def available(methods, head_dims) -> tuple[dict, list]:
    """({method: head dims it runs with here}, notes: the path and kernel each runs, or why
    it does not). Methods that run with no head dim are left out."""
    keep, notes = {}, []
    for key in methods:
        m = METHODS[key]
        if m.path is None:
            keep[key] = set(head_dims)
            continue
        dims, why = set(), []
        for D in head_dims:
            report = sageattn.explain(path=None if m.path == "auto" else m.path, head_dim=D,
                                      pv_accum_dtype=m.pv_accum)
            if report["path"] is None:
                why.append(f"hd{D}: not run ({report['reason']})")
                continue
            dims.add(D)
            why.append(f"hd{D}: path {report['path']}, kernel {report['kernel'] or '?'}, "
                       f"{report['runs_as']}")
        if dims:
            keep[key] = dims
        notes.append(f"{key}: " + "; ".join(why))
    return keep, notes


def label(key: str) -> str:
    """A method's row label; the auto row names the path it took."""
    if key == "auto":
        return f"sageattn (auto path: {sageattn.explain()['path']})"
    return METHODS[key].label


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def run(methods, batch, heads, head_dims, seqlens, causals, dtype, warmup_ms, rep_ms):
    """{(D, causal, method): {S: TOPS or None}}, {same key: {S: reason}}, the timer's name."""
    results, failures, timer = {}, {}, "n/a"
    order = [m for m in _RUN_ORDER if m in methods] + [m for m in methods if m not in _RUN_ORDER]
    for D in head_dims:
        for S in seqlens:
            g = torch.Generator(device="cuda").manual_seed(S * 1000 + D)
            q, k, v = (torch.randn(batch, heads, S, D, generator=g, device="cuda", dtype=dtype)
                       for _ in range(3))
            for causal in causals:
                for key in order:
                    if D not in methods[key]:
                        continue
                    m = METHODS[key]
                    value = None
                    try:
                        fn = m.prepare(q, k, v, causal)
                        fn()                              # first call: kernel load, checks
                        ms, timer = median_ms(fn, warmup_ms, rep_ms)
                        value = tops(batch, heads, S, D, causal, ms)
                    except Exception as exc:              # noqa: BLE001 - reported, run goes on
                        failures.setdefault((D, causal, key), {})[S] = _first_line(exc)
                    finally:
                        fn = None
                    results.setdefault((D, causal, key), {})[S] = value
                    shown = (f"{value:7.1f} TOPS" if value is not None else
                             f"n/a ({failures[(D, causal, key)][S]})")
                    print(f"  hd{D:<4} S={S:<6} {'causal' if causal else 'full  '} "
                          f"{label(key):<50} {shown}", flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    return results, failures, timer


def host_overhead_us(methods, calls=2000) -> dict:
    """Host time per whole call at a tiny shape (B=1, H=1, S=64, D=64), where launch overhead
    is all there is: the wall time of ``calls`` back-to-back calls, synchronized once."""
    q, k, v = (torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = {}
    for key in methods:
        m = METHODS[key]
        if key == "flash" or not m.whole_call:
            continue
        try:
            fn = m.prepare(q, k, v, False)
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            out[key] = (time.perf_counter() - start) / calls * 1e6
        except Exception:                                 # noqa: BLE001 - shown as missing
            continue
    return out


# ---- report -------------------------------------------------------------------------------

def _slabel(S: int) -> str:
    return f"{S // 1024}k" if S % 1024 == 0 else str(S)


def table(results, methods: dict, D, causals, seqlens) -> str:
    lines = [f"| hd{D} TOPS | " + " | ".join(_slabel(S) for S in seqlens) + " |",
             "|---|" + "---|" * len(seqlens)]
    for causal in causals:
        base = results.get((D, causal, BASELINE), {})
        for key, dims in methods.items():
            if D not in dims:
                continue
            row = results.get((D, causal, key), {})
            cells = []
            for S in seqlens:
                value = row.get(S)
                if value is None:
                    cells.append("n/a")
                elif key != BASELINE and base.get(S):
                    cells.append(f"{value:.0f} ({value / base[S]:.2f}x)")
                else:
                    cells.append(f"{value:.0f}")
            name = label(key) + (", causal" if causal else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ours_key(results) -> Optional[str]:
    """The row that stands for 'our sageattn, whole call': auto when it ran sm90, else sm90."""
    if sageattn.explain(head_dim=128)["path"] == "sm90" and \
            any(v is not None for v in results.get((128, False, "auto"), {}).values()):
        return "auto"
    if any(v is not None for v in results.get((128, False, "sm90"), {}).values()):
        return "sm90"
    return None


def acceptance(results, seqlens) -> list:
    """Issue 3's speed criteria as lines '[met] ...' / '[NOT met] ...' / '[n/a] ...'."""
    lines = []

    def check(ok, text):
        lines.append(f"- [{'n/a' if ok is None else 'met' if ok else 'NOT met'}] {text}")

    key = _ours_key(results)
    if key is None:
        check(None, "whole call of sageattn on the sm90 path: not measured")
    else:
        for causal in (False, True):
            ours = results.get((128, causal, key), {})
            cudnn = results.get((128, causal, BASELINE), {})
            tag = "causal" if causal else "non-causal"
            for S in seqlens:
                t, c, sa = ours.get(S), cudnn.get(S), SAGE220_HOPPER[causal].get(S)
                if t is None:
                    check(None, f"hd128 {tag} {_slabel(S)}: not measured")
                    continue
                parts, ok, missing = [], True, False
                floor = {16384: 900, 8192: 855}.get(S) if not causal else None
                if floor is not None:
                    parts.append(f">= {floor}")
                    ok &= t >= floor
                if sa is not None:
                    parts.append(f">= 1.3 x SageAttention 2.2.0 ({sa}) = {1.3 * sa:.0f}")
                    ok &= t >= 1.3 * sa
                if S >= (2048 if not causal else 4096):
                    if c is None:
                        parts.append("> cuDNN (not measured)")
                        missing = True
                    else:
                        parts.append(f"> cuDNN ({c:.0f})")
                        ok &= t > c
                if parts:
                    check(None if missing and ok else ok, f"hd128 {tag} {_slabel(S)} ({key}): {t:.0f} TOPS; " +
                          ", ".join(parts))
        for causal in (False, True):
            for S in (S for S in seqlens if S >= 4096):
                t = results.get((64, causal, key), {}).get(S)
                c = results.get((64, causal, BASELINE), {}).get(S)
                if t is None or c is None:
                    continue
                check(t > c, f"hd64 {'causal' if causal else 'non-causal'} {_slabel(S)} ({key}): "
                             f"{t:.0f} TOPS > cuDNN ({c:.0f})")
    t = results.get((128, False, "sm90_kernel"), {}).get(16384)
    if t is not None:
        check(t >= 1000, f"sm90 kernel alone hd128 non-causal 16k: {t:.0f} TOPS = "
                         f"{t / FP8_GEMM_TFLOPS:.0%} of the FP8 GEMM rate ({FP8_GEMM_TFLOPS:.0f}); "
                         "aim >= 1000")
    return lines


def headline(results, seqlens) -> list:
    """A few numbers for the end of tools/gpu_check.sh: ours vs cuDNN at hd128, longest S."""
    lines = []
    S = max(seqlens)
    for key in ("auto", "sm90", "sm90_kernel", "sm80", BASELINE, "flash"):
        cells = []
        for D in (128, 64):
            for causal in (False, True):
                t = results.get((D, causal, key), {}).get(S)
                c = results.get((D, causal, BASELINE), {}).get(S)
                if t is not None:
                    ratio = f" ({t / c:.2f}x cuDNN)" if c and key != BASELINE else ""
                    cells.append(f"hd{D} {'causal' if causal else 'full'} {t:.0f}{ratio}")
        if cells:
            lines.append(f"- {label(key)} at {_slabel(S)}, TOPS: " + ", ".join(cells))
    t = results.get((128, False, "sm90_kernel"), {}).get(S)
    if t is not None:
        lines.append(f"- sm90 kernel alone, hd128 full {_slabel(S)}: {t / FP8_GEMM_TFLOPS:.0%} of "
                     f"the FP8 GEMM rate ({FP8_GEMM_TFLOPS:.0f} TFLOP/s)")
    return lines


def plot(results, methods, head_dims, causals, seqlens, path, title) -> str:
    """A PNG of TOPS against S, one panel per (head dim, causal); returns a note."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"
    fig, axes = plt.subplots(len(head_dims), len(causals), squeeze=False,
                             figsize=(6 * len(causals), 4 * len(head_dims)))
    for i, D in enumerate(head_dims):
        for j, causal in enumerate(causals):
            ax = axes[i][j]
            for key in methods:
                row = results.get((D, causal, key), {})
                xs = [S for S in seqlens if row.get(S) is not None]
                if xs:
                    ax.plot(xs, [row[S] for S in xs], marker="o", label=label(key),
                            linestyle="--" if not METHODS[key].whole_call else "-")
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens, [_slabel(S) for S in seqlens])
            ax.set_title(f"hd{D}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TOPS")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the markdown report to this file")
    ap.add_argument("--plot", help="write a PNG plot to this file (needs matplotlib)")
    ap.add_argument("--quick", action="store_true",
                    help="hd128, S 4k and 16k, sm90 + sm90_kernel + cuDNN + flash (flags given "
                         "explicitly still win)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dims", "--head-dim", dest="head_dims", type=int, nargs="+")
    ap.add_argument("--seqlens", type=int, nargs="+")
    ap.add_argument("--causal", choices=["both", "full", "causal"], default="both")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    # 100 ms: right after another method's rows (cuDNN's, at 2k-4k) a call needs tens of ms to
    # reach its steady speed; with 10 ms our 4k whole call read 606-649 TOPS after the cuDNN
    # rows and 681 without them or with 100 ms (H100, BENCHMARKS.md "Session 9").
    ap.add_argument("--warmup-ms", type=float, default=100.0)
    ap.add_argument("--rep-ms", type=float, default=40.0)
    args = ap.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, list(value))
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark", file=sys.stderr)
        return 1
    start = time.perf_counter()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    causals = {"both": (False, True), "full": (False,), "causal": (True,)}[args.causal]
    print(sageattn.explain(head_dim=max(args.head_dims)), flush=True)
    methods, notes = available(args.methods, args.head_dims)
    for note in notes:
        print("  " + note, flush=True)
    results, failures, timer = run(methods, args.batch, args.heads, args.head_dims,
                                   args.seqlens, causals, dtype, args.warmup_ms, args.rep_ms)
    cap = torch.cuda.get_device_capability()
    title = (f"{torch.cuda.get_device_name()} ({cap[0]}.{cap[1]}): B={args.batch} "
             f"H={args.heads} {args.dtype}, median of {timer} (warmup {args.warmup_ms:g} ms, "
             f"rep {args.rep_ms:g} ms); torch {torch.__version__}; sageattn "
             f"{sageattn.build_info().get('git_revision')}")
    parts = [f"### {title}", ""]
    for D in args.head_dims:
        parts += [table(results, methods, D, causals, args.seqlens), ""]
    parts.append("TOPS = 4*B*H*S^2*D / time (halved when causal); (ratio) = TOPS relative to "
                 "torch SDPA cuDNN in the same run. Whole calls include validation, "
                 "quantization and allocation; \"kernel alone\" rows time only the attention "
                 "kernel on inputs quantized beforehand.")
    parts += [""] + [f"- {note}" for note in notes]
    for (D, causal, key), by_s in sorted(failures.items(), key=str):
        for S, reason in by_s.items():
            parts.append(f"- n/a: {key} hd{D} {'causal' if causal else 'full'} "
                         f"{_slabel(S)}: {reason}")
    if cap == (9, 0) and any(m.startswith("sm89") for m in methods):
        parts.append("- sm89 on 9.0: the E4M3 MMA is emulated with fp16 MMAs there; these "
                     "numbers show the path works, not its speed on Ada / Blackwell consumer "
                     "GPUs.")
    overhead = host_overhead_us(methods)
    if overhead:
        parts += ["", "Host time per call at B=1 H=1 S=64 D=64 (launch overhead): " +
                  ", ".join(f"{label(key)} {us:.1f} us" for key, us in overhead.items())]
    if 128 in args.head_dims and args.batch == 4 and args.heads == 32 and args.dtype == "bf16":
        parts += ["", "#### Issue 3 acceptance (speed; whole call, hd128, bf16)", ""]
        parts += acceptance(results, args.seqlens)
    if args.plot:
        note = plot(results, methods, args.head_dims, causals, args.seqlens, args.plot, title)
        print(note, flush=True)
        parts += ["", f"Plot: {note}."]
    parts += ["", "### Headline", ""] + headline(results, args.seqlens)
    parts.append(f"\nBenchmark wall time {time.perf_counter() - start:.0f} s.")
    text = "\n".join(parts)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
