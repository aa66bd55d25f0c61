"""The kernel table: every kernel the build compiles, as data.

`build_kernels.py` writes each tree's translation unit from this table (one `extern "C"`
wrapper per row around the tree's templates), compiles the tree for its architectures and
writes the manifest that Python reads.  The kernel name is the one key used everywhere: the
symbol, the manifest entry, the dispatch row, test ids and bench labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Kernel:
    name: str
    kind: str            # "channel_stats" | "quantize" | "attention"
    params: str          # struct in kernels/common/params.h
    call: str            # C++ expression run by the wrapper, with `p` the params
    threads: int
    smem: int = 0        # dynamic shared memory bytes (static_assert-ed against the traits)
    smem_expr: str = ""  # C++ constant expression that must equal `smem`
    head_dim: int = 0
    pv_accum: str = ""


@dataclass(frozen=True)
class Tree:
    name: str
    header: str          # included by the generated translation unit
    sass: tuple          # real architectures: SASS in the fatbin
    ptx: tuple           # virtual architectures: PTX in the fatbin (forward compatibility)
    kernels: tuple = field(default_factory=tuple)


def _sm80_kernels():
    rows = [
        Kernel("sm80_channel_stats", "channel_stats", "ChannelStatsParams",
               "sageattn::channel_stats(p)", threads=256),
    ]
    for hd in (64, 128):
        rows.append(Kernel(
            f"sm80_quantize_qk_int8_v_fp16_hd{hd}", "quantize", "QuantParams",
            f"sageattn::quantize_qk_int8_v_fp16<{hd}>(p)", threads=256, head_dim=hd))
    # "fp32": fp32 MMA accumulation; "fp16+fp32": fp16 inside a key block, fp32 across blocks.
    for acc_tag, acc, cxx in (("acc32", "fp32", "kDirect"), ("acc16x32", "fp16+fp32", "kBlockFp16")):
        for hd in (64, 128):
            smem = 512 * hd  # Q tile 128*hd int8 + 2 stages of (K 64*hd int8 + V 64*hd fp16)
            rows.append(Kernel(
                f"sm80_qkint8_pvfp16_{acc_tag}_hd{hd}", "attention", "AttnParams",
                f"sageattn::sm80::attention<{hd}, sageattn::PvAccum::{cxx}>(p)", threads=256,
                smem=smem, smem_expr=f"sageattn::sm80::Traits<{hd}>::kSmemBytes",
                head_dim=hd, pv_accum=acc))
    return tuple(rows)


TREES = (
    Tree("sm80", "sm80/kernel.cuh",
         sass=("sm_80", "sm_86", "sm_89", "sm_90", "sm_120"), ptx=("compute_80",),
         kernels=_sm80_kernels()),
)
