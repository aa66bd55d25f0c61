"""``python -m sageattn``: what this installation carries, what runs here, and a quick check.

On a GPU: the probe, a correctness check against the exact reference (rel-L1, cosine) and one
speed comparison with torch SDPA, for the default path and for every other path that can be
forced on this GPU (the sm89 FP8 path on an H100, say). Without a GPU: the probe, then the
sm80 and sm89 emulators against the reference on the CPU. Exit status 0 when every check
passes.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import sageattn
from sageattn import emulate, reference

# Loose (max rel-L1, min cos) per path for a self-test; the strict acceptance bounds live in
# tests/gpu. FP8 P and V (sm89) cost about 3.5x the error of FP16 ones (sm80).
_BOUNDS = {"sm80": (0.02, 0.999), "sm89": (0.05, 0.999), "sm90": (0.05, 0.999)}
_PATHS_HERE = ("sm80", "sm89", "sm90")  # the INT8-QK paths the self-test runs (FP4: tests only)


def _inputs(B, H, S, D, dtype, device, seed=0):
    """Random q, k, v with an outlier bias per K channel (as in real DiT/LLM activations)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    k = k + 4 * torch.randn(B, H, 1, D, generator=g)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def _check(label, out, q, k, v, causal, path="sm80") -> bool:
    ref = reference.attention(q, k, v, is_causal=causal)
    m = reference.compare(out, ref)
    max_rel_l1, min_cos = _BOUNDS[path]
    ok = m["finite"] and m["rel_l1"] <= max_rel_l1 and m["cos"] >= min_cos
    print(f"  {label:<28} causal={causal!s:<5}  rel-L1 {m['rel_l1']:.5f}  cos {m['cos']:.6f}  "
          f"max|err| {m['max_abs']:.4f}  {'ok' if ok else 'FAIL'}")
    return ok


def _time_ms(fn, warmup=5, iters=20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def _forced_paths(report) -> list:
    """Paths other than the default that can be forced here, with how they would run."""
    out = []
    for path in _PATHS_HERE:
        if path == report["path"]:
            continue
        other = sageattn.explain(path=path)
        if other["path"] is not None:
            out.append(other)
    return out


def _gpu(report) -> bool:
    ok = True
    forced = _forced_paths(report)
    for other in forced:
        print(f"{'also':>10}: {other['path']} when forced (path='{other['path']}' or "
              f"SAGEATTN_PATH={other['path']}): {other['runs_as']}, kernel {other['kernel']}")
    paths = [(report["path"], None)] + [(o["path"], o["path"]) for o in forced]
    print("\ncorrectness (B=1, H=8, S=2048, D=128, bf16, K outliers) vs fp32 reference:")
    q, k, v = _inputs(1, 8, 2048, 128, torch.bfloat16, "cuda")
    for causal in (False, True):
        for path, force in paths:
            label = f"sageattn ({path}{', forced' if force else ''})"
            ok &= _check(label, sageattn.sageattn(q, k, v, is_causal=causal, path=force),
                         q, k, v, causal, path)
        ok &= _check("torch SDPA",
                     torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
                     q, k, v, causal)
    B, H, S, D = 2, 16, 4096, 128
    print(f"\nspeed (B={B}, H={H}, S={S}, D={D}, bf16, non-causal; median of CUDA events):")
    q, k, v = _inputs(B, H, S, D, torch.bfloat16, "cuda", seed=1)
    flops = 4 * B * H * S * S * D
    runs = [(f"sageattn {path}{' (forced)' if force else ''}",
             lambda force=force: sageattn.sageattn(q, k, v, path=force)) for path, force in paths]
    runs.append(("torch SDPA", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)))
    for label, fn in runs:
        ms = _time_ms(fn)
        print(f"  {label:<24} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TOPS")
    return ok


def _cpu() -> bool:
    print("\nno GPU here: the emulators of the sm80 (FP16 PV) and sm89 (FP8 PV, fp32+fp16) paths "
          "against the fp32 reference on the CPU (B=1, H=2, S=512, D=128, bf16, K outliers):")
    q, k, v = _inputs(1, 2, 512, 128, torch.bfloat16, "cpu")
    ok = True
    for path, emulator in (("sm80", emulate.sm80_attention), ("sm89", emulate.sm89_attention)):
        for causal in (False, True):
            start = time.perf_counter()
            out = emulator(q, k, v, is_causal=causal)
            ok &= _check(f"{path} emulator ({time.perf_counter() - start:.2f} s)", out, q, k, v,
                         causal, path)
    return ok


def _print_build(info) -> None:
    flavour = info["flavour"] or "none (a development build)"
    print(f"build: {info['distribution'] or 'not an installed distribution'}; flavour {flavour}; "
          f"{info['toolkit'] or 'no kernels'}; git {info['git_revision'] or 'unknown'}; "
          f"kernel ABI {info['abi_version']}")
    if info["conflict"]:
        print(f"\nERROR: {info['conflict']}\n")


def main() -> int:
    info = sageattn.build_info()
    print(f"sageattn {sageattn.__version__}  torch {torch.__version__}  "
          f"(torch CUDA {torch.version.cuda or 'none'})")
    _print_build(info)
    if info["conflict"]:
        return 1  # which flavour's files run here is anybody's guess: check nothing else
    report = sageattn.explain()
    print(report)
    if report["device"] is None:
        return 0 if _cpu() else 1
    if report["path"] is None or info["error"]:
        print("\nno path runs on this device; see the reason above")
        return 1
    try:
        return 0 if _gpu(report) else 1
    except Exception as exc:  # report a broken installation instead of a traceback wall
        print(f"\nFAILED: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
