"""Accuracy of the emulated paths on the outlier input, against the fp32 reference, on the CPU.

Outlier input: B=1, H=8, S=4096, D=128, bf16, q/k/v ~ N(0, 1) and K plus a per-channel bias
4*N(0, 1) (drawn with torch.Generator().manual_seed(seed) on the CPU). Prints one markdown row
per path and causal setting: rel-L1 = sum|o - ref| / sum|ref|, cosine, max |o - ref|, and
whether every output is finite. The emulators are the kernels' step-by-step models
(sageattn.emulate, sageattn.emulate_fp4), so this predicts the kernels' accuracy on any GPU.

    PYTHONPATH=<install> python bench/emulator_accuracy.py [--seed 1234] [--paths sm120_fp4,sm80,sm89]
"""

from __future__ import annotations

import argparse
import time

import torch

from sageattn import emulate, emulate_fp4, reference

PATHS = {
    "sm120_fp4": ("SageAttention3 NVFP4 (sm120 emulator)",
                  lambda q, k, v, c: emulate_fp4.sm120_attention(q, k, v, is_causal=c)),
    "sm80": ("INT8 QK + FP16 PV, per_thread, fp32 (sm80 emulator)",
             lambda q, k, v, c: emulate.sm80_attention(q, k, v, is_causal=c)),
    "sm89": ("INT8 QK + FP8 PV, per_thread, fp32+fp32 (sm89 emulator)",
             lambda q, k, v, c: emulate.sm89_attention(q, k, v, is_causal=c,
                                                       pv_accum_dtype="fp32+fp32")),
}


def outlier_input(seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 8, 4096, 128, generator=g) for _ in range(3))
    k = k + 4 * torch.randn(1, 8, 1, 128, generator=g)
    return tuple(x.to(torch.bfloat16) for x in (q, k, v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--paths", default=",".join(PATHS))
    args = ap.parse_args()
    q, k, v = outlier_input(args.seed)
    print("| path | causal | rel-L1 | cosine | max abs | finite | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for causal in (False, True):
        ref = reference.attention(q, k, v, is_causal=causal)
        for name in args.paths.split(","):
            label, run = PATHS[name]
            start = time.perf_counter()
            out = run(q, k, v, causal)
            m = reference.compare(out, ref)
            print(f"| {label} | {causal} | {m['rel_l1']:.5f} | {m['cos']:.6f} | "
                  f"{m['max_abs']:.4f} | {m['finite']} | {time.perf_counter() - start:.0f} |",
                  flush=True)
        sdpa = reference.compare(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal), ref)
        print(f"| torch SDPA bf16 (CPU, for scale) | {causal} | {sdpa['rel_l1']:.5f} | "
              f"{sdpa['cos']:.6f} | {sdpa['max_abs']:.4f} | {sdpa['finite']} | |", flush=True)


if __name__ == "__main__":
    main()
