"""Every emulated path on an attention-sink input, the pattern LLMs show: a few keys that every
query attends to strongly (here 4 keys taking 68% or 99% of the softmax mass) whose values are
small (10x smaller), next to thousands of keys sharing the rest.

Why it is a test: a quantization that keeps relative precision (E4M3 P and V) handles it, one
with a shared scale per block of values does not. INT8 P and V (u8 P, s8 V per channel) looked
better than E4M3 on the outlier input and measured 3.5x worse here (NOTES.md, "FP8 P V
precision"); the FP4 path (16-token V blocks, one E4M3 scale each) measures rel-L1 0.42 here.
The bounds sit ~15-20% above the measured values (CPU, torch 2.13; in the comments) so that such a
change of algorithm fails, while rounding-level changes pass.
"""

import math

import pytest
import torch

from sageattn import emulate, emulate_fp4, reference


def sink_input(boost, S=2048, H=2, D=128, seed=0):
    """q = N(0,1) + u per head, k = N(0,1), keys 0..3 along u with scores ~``boost`` above the
    rest (natural-log units), their V scaled by 0.1; bf16."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, S, D, generator=g) for _ in range(3))
    u = torch.randn(1, H, 1, D, generator=g)
    q = q + u
    k[:, :, :4] = u / (u * u).sum(-1, keepdim=True) * boost * math.sqrt(D) + 0.3 * k[:, :, :4]
    v[:, :, :4] *= 0.1
    return tuple(x.to(torch.bfloat16) for x in (q, k, v))


PATHS = {  # emulator(q, k, v, causal), rel-L1 bound, cosine bound; measured values in comments
    "sm80": (lambda q, k, v, c: emulate.sm80_attention(q, k, v, is_causal=c),
             0.013, 0.9999),                                # <= 0.0105, cos >= 0.99994
    "sm89 fp32+fp32": (lambda q, k, v, c: emulate.sm89_attention(
        q, k, v, is_causal=c, pv_accum_dtype="fp32+fp32"), 0.039, 0.9993),   # <= 0.0333, 0.99943
    "sm89 fp32+fp16": (lambda q, k, v, c: emulate.sm89_attention(
        q, k, v, is_causal=c, pv_accum_dtype="fp32+fp16"), 0.040, 0.9992),   # <= 0.0348, 0.99937
    "sm90": (lambda q, k, v, c: emulate.sm90_attention(q, k, v, is_causal=c),
             0.039, 0.9993),                                # <= 0.0333, cos >= 0.99942
}


@pytest.mark.parametrize("boost", [8.0, 12.0], ids=["mass0.68", "mass0.99"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("path", list(PATHS))
def test_sink_input_accuracy(path, causal, boost):
    q, k, v = sink_input(boost)
    run, rel_bound, cos_bound = PATHS[path]
    m = reference.compare(run(q, k, v, causal), reference.attention(q, k, v, is_causal=causal))
    print(f"\n{path} causal={causal} boost={boost}: rel-L1 {m['rel_l1']:.5f} cos {m['cos']:.6f}")
    assert m["finite"] and m["rel_l1"] <= rel_bound and m["cos"] >= cos_bound, m


def test_sink_input_fp4_is_far_less_accurate():
    # Recorded, not endorsed: NVFP4 loses the small sink values (and the tail of P next to the
    # sink); measured rel-L1 0.4247, cos 0.92018. The bound catches it getting worse still.
    q, k, v = sink_input(8.0)
    m = reference.compare(emulate_fp4.sm120_attention(q, k, v), reference.attention(q, k, v))
    fp8 = reference.compare(emulate.sm90_attention(q, k, v), reference.attention(q, k, v))
    assert m["finite"] and 0.30 <= m["rel_l1"] <= 0.50 and m["cos"] >= 0.90, m
    assert m["rel_l1"] > 8 * fp8["rel_l1"], (m, fp8)
