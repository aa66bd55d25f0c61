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
    kind: str            # "channel_stats" | "quantize" | "requantize" | "attention"
    params: str          # struct in kernels/common/params.h
    call: str            # C++ expression run by the wrapper, with `p` the params
    threads: int
    min_blocks: int = 1  # __launch_bounds__ minimum CTAs per SM (caps registers)
    q_rows: int = 0      # attention: query rows per CTA (grid.x = ceil(q_blocks * 128 / q_rows))
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
            # 4 warps x 16 rows, 2 CTAs per SM (NOTES.md: +11-20% over 8 warps x 16 rows, 1 CTA).
            # Q tile 64*hd int8 + 2 stages of (K 64*hd int8 + V 64*hd fp16) + the block-sparse
            # mask window (64 words: kernels/common/kept_blocks.cuh).
            smem = 448 * hd + 256
            rows.append(Kernel(
                f"sm80_qkint8_pvfp16_{acc_tag}_hd{hd}", "attention", "AttnParams",
                f"sageattn::sm80::attention<{hd}, sageattn::PvAccum::{cxx}>(p)", threads=128,
                min_blocks=2, q_rows=64, smem=smem, smem_expr=f"sageattn::sm80::Traits<{hd}>::kSmemBytes",
                head_dim=hd, pv_accum=acc))
    return tuple(rows)


def _sm89_kernels():
    rows = [
        Kernel("sm89_channel_stats", "channel_stats", "ChannelStatsParams",
               "sageattn::channel_stats(p)", threads=256),
    ]
    # No min_blocks here: the sm90 tree's cap of 64 registers spills 256 bytes in this kernel's
    # sm_120a image (Q and K jobs) and 16 bytes in its sm_89 one, and was measured on the H100 only.
    for hd in (64, 128):
        rows.append(Kernel(
            f"sm89_quantize_qk_int8_v_fp8_hd{hd}", "quantize", "QuantParams",
            f"sageattn::quantize_qk_int8_v_fp8<{hd}>(p)", threads=256, head_dim=hd))
        # After a quantize launch whose V scales took a margin: heads with saturated codes again.
        rows.append(Kernel(
            f"sm89_requantize_v_fp8_hd{hd}", "requantize", "QuantParams",
            f"sageattn::requantize_v_fp8<{hd}>(p)", threads=256, head_dim=hd))
    # "fp32": FP8 MMA straight into O; "fp32+fp32": per-block fp32 accumulator added to O
    # (two-level); "fp32+fp16": per-block fp16 accumulator (SageAttention2++).
    for acc_tag, acc, cxx in (("acc32", "fp32", "kDirect"), ("acc32x32", "fp32+fp32", "kBlockFp32"),
                              ("acc16x32", "fp32+fp16", "kBlockFp16")):
        for hd in (64, 128):
            rows.append(Kernel(
                f"sm89_qkint8_pvfp8_{acc_tag}_hd{hd}", "attention", "AttnParams",
                f"sageattn::sm89::attention<{hd}, sageattn::PvAccum::{cxx}>(p)", threads=128,
                min_blocks=2, q_rows=64,
                # Q 64*hd int8 + 2 stages of (K 64*hd int8 + V^T hd*64 e4m3) + mask window.
                smem=320 * hd + 256,
                smem_expr=f"sageattn::sm89::Traits<{hd}>::kSmemBytes",
                head_dim=hd, pv_accum=acc))
    return tuple(rows)


def _sm90_kernels():
    rows = [
        Kernel("sm90_channel_stats", "channel_stats", "ChannelStatsParams",
               "sageattn::channel_stats(p)", threads=256),
    ]
    # The sm89 tree's quantizer (INT8 Q/K, E4M3 V^T tiles), capped at 64 registers here (sm_90a):
    # four CTAs per SM instead of three keep more loads in flight (the launch is memory-bound:
    # -4-5% at 2k-16k on the H100, NOTES.md; only the LSE-correction path of Q jobs then uses
    # 32 bytes of stack). At head dim 64 a thread has half the bytes in flight, so five CTAs
    # (48 registers; the same 32 bytes of stack, Q jobs' LSE path only).
    for hd in (64, 128):
        rows.append(Kernel(
            f"sm90_quantize_qk_int8_v_fp8_hd{hd}", "quantize", "QuantParams",
            f"sageattn::quantize_qk_int8_v_fp8<{hd}>(p)", threads=256, min_blocks=4 if hd == 128 else 5,
            head_dim=hd))
        # After a quantize launch whose V scales took a margin: heads with saturated codes again.
        rows.append(Kernel(
            f"sm90_requantize_v_fp8_hd{hd}", "requantize", "QuantParams",
            f"sageattn::requantize_v_fp8<{hd}>(p)", threads=256, head_dim=hd))
    # "fp32+fp32": each 128-key step's PV from zero in the wgmma accumulator, added to O
    # (two-level); "fp32": the wgmma accumulates into O directly. Consumer warpgroups (64 query
    # rows each): three for dense hd64 kernels and for the "_q192" hd128 kernel non-causal calls
    # take (in-order steps, NOTES.md sm90 v12), two elsewhere (kernels/sm90/traits.cuh).
    for acc_tag, acc, cxx, sparse, hds in (("acc32", "fp32", "kDirect", False, (64, 128)),
                                           ("acc32x32", "fp32+fp32", "kBlockFp32", False, (64, 128)),
                                           ("acc32x32_q192", "fp32+fp32", "kBlockFp32", False, (128,)),
                                           ("acc32x32_sparse", "fp32+fp32", "kBlockFp32", True, (64, 128))):
        for hd in hds:
            consumers = 3 if (hd == 64 and not sparse) or acc_tag.endswith("_q192") else 2
            rows.append(Kernel(
                f"sm90_qkint8_pvfp8_{acc_tag}_hd{hd}", "attention", "Sm90AttnParams",
                f"sageattn::sm90::attention<{hd}, sageattn::PvAccum::{cxx}, {str(sparse).lower()}, "
                f"{consumers}>(p)",
                threads=128 * (1 + consumers), min_blocks=1, q_rows=64 * consumers,
                # align slack + Q int8 64*consumers*hd and 16-bit source 2x that + 4 stages
                # of (K 128*hd + two V^T blocks of 64*hd, each followed by 1024 bytes: 8 rows
                # of ones and padding) + the all-ones tile of the row sums (256) + 13
                # mbarriers + a step entry per stage + 16 alignment slack + 8 K scales per stage
                smem=1024 + 3 * 64 * consumers * hd + 4 * (256 * hd + 2048) + 256 + 104 + 16 + 16 + 128,
                smem_expr=f"sageattn::sm90::Traits<{hd}, {consumers}>::kSmemBytes",
                head_dim=hd, pv_accum=acc))
    return tuple(rows)


def _sm120_kernels():
    rows = [
        Kernel("sm120_channel_stats", "channel_stats", "ChannelStatsParams",
               "sageattn::channel_stats(p)", threads=256),
        # Unit-test kernel: the quantizer's E2M1 and E4M3 conversions, element-wise.
        Kernel("sm120_convert_fp4_e4m3", "convert", "Fp4ConvertParams",
               "sageattn::sm120::convert_fp4_e4m3(p)", threads=256),
    ]
    for hd in (64, 128):
        rows.append(Kernel(
            f"sm120_quantize_qkv_fp4_hd{hd}", "quantize", "QuantFp4Params",
            f"sageattn::sm120::quantize_qkv_fp4<{hd}>(p)", threads=256, head_dim=hd))
    for hd in (64, 128):
        # One stage: Q codes+scales+mean, dS, K codes+scales, V^T codes+scales (traits.cuh).
        rows.append(Kernel(
            f"sm120_qkfp4_pvfp4_hd{hd}", "attention", "AttnFp4Params",
            f"sageattn::sm120::attention<{hd}>(p)", threads=128, min_blocks=2, q_rows=64,
            smem=112 * hd + 256, smem_expr=f"sageattn::sm120::Traits<{hd}>::kSmemBytes",
            head_dim=hd, pv_accum="fp32+fp32"))
    return tuple(rows)


TREES = (
    Tree("sm80", "sm80/kernel.cuh",
         sass=("sm_80", "sm_86", "sm_89", "sm_90", "sm_120"), ptx=("compute_80",),
         kernels=_sm80_kernels()),
    # mma.sync e4m3 is native (QMMA) on sm_89 and sm_120, emulated with HMMA on sm_90 (tests
    # only). Plain sm_120 SASS also runs on sm_121; no arch-specific (a) features are used.
    Tree("sm89", "sm89/kernel.cuh",
         sass=("sm_89", "sm_90", "sm_120"), ptx=("compute_89",),
         kernels=_sm89_kernels()),
    # wgmma and setmaxnreg exist only on sm_90a, which has no forward-compatible PTX.
    Tree("sm90", "sm90/kernel.cuh", sass=("sm_90a",), ptx=(),
         kernels=_sm90_kernels()),
    # SageAttention3: the block-scaled FP4 mma.sync is native on sm_120a only. The sm_90 build
    # swaps in exact software FP4 behind one compile-time switch (kernels/sm120/fp4_numeric.cuh)
    # so the H100 can check these kernels against the emulator; dispatch runs it on 9.0 only
    # when forced. sm_121a (DGX Spark): built by toolchains that know it (nvcc 13.0, cu130); the
    # cu128 flavour's NVRTC 12.8 predates it and leaves it out.
    Tree("sm120", "sm120/kernel.cuh", sass=("sm_90", "sm_120a", "sm_121a"), ptx=(),
         kernels=_sm120_kernels()),
)
