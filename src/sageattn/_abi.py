"""The kernel ABI, described once.

Every kernel takes exactly one argument: a POD parameter struct passed by value.  The
structs are described here, in Python, and `kernels/common/params.h` is generated from
this description (``python -m sageattn._abi --write kernels/common/params.h``; a CPU test
checks the header is current).  Python packs the struct with :mod:`ctypes`; the kernels
read it through the generated header, which also carries ``static_assert`` checks of every
size and offset, and each fatbin exports ``sageattn_abi_version`` so the loader refuses a
fatbin built against another layout.

The host layer (the nanobind module) never sees these structs: it launches a kernel with
an opaque byte string.
"""

from __future__ import annotations

import ctypes
import sys

# Bump whenever a struct below changes.
ABI_VERSION = 8

# Codes shared by Python and the kernels.
DTYPE_FP16 = 0
DTYPE_BF16 = 1
GRAN_PER_THREAD = 0
GRAN_PER_WARP = 1

_i32, _i64, _f32, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_uint64


class ChannelStatsParams(ctypes.Structure):
    """Per-channel statistics over tokens of a (B, H, S, D) tensor, fp32 (B, H, D_pad) each:
    mean (K smoothing, V smoothing) and min/max (V's per-channel FP8 scale). Null outputs are
    skipped. ABI 7: ``sample_tokens`` (was padding) lets the K mean come from a sample; V's
    min/max and mean come from one too when its scales take a margin (QuantParams.v_amax_margin)."""

    _fields_ = [
        ("src", _ptr),             # const fp16/bf16*, (B, H, S, D) with strides below
        ("src_stride_b", _i64), ("src_stride_h", _i64), ("src_stride_s", _i64),
        ("mean", _ptr),            # float* (B, H, D_pad) or 0
        ("minimum", _ptr),         # float* (B, H, D_pad) or 0
        ("maximum", _ptr),         # float* (B, H, D_pad) or 0
        ("batch", _i32), ("heads", _i32), ("seq", _i32),
        ("head_dim", _i32), ("head_dim_padded", _i32),
        ("in_dtype", _i32),        # DTYPE_*
        ("vectorized", _i32),      # 1: 16-byte loads are aligned (pointer, strides, head_dim)
        ("sample_tokens", _i32),   # n > 0: statistics of n tokens spread over each sequence
                                   # (emulate.sampled_tokens), all of a shorter one; 0: all
        ("cu_seqlens", _ptr),      # const int32 (B+1) or 0: packed varlen input (src_stride_b unused)
    ]


class QuantParams(ctypes.Structure):
    """One launch quantizes Q and K to INT8 and converts V to fp16 (padded, contiguous)."""

    _fields_ = [
        ("q", _ptr), ("q_stride_b", _i64), ("q_stride_h", _i64), ("q_stride_s", _i64),
        ("k", _ptr), ("k_stride_b", _i64), ("k_stride_h", _i64), ("k_stride_s", _i64),
        ("v", _ptr), ("v_stride_b", _i64), ("v_stride_h", _i64), ("v_stride_s", _i64),
        ("k_mean", _ptr),          # const float* (B, Hkv, D_pad) or 0: no smoothing
        ("q_int8", _ptr),          # int8 (B, Hq, q_blocks*128, D_pad)
        ("q_scale", _ptr),         # float (B, Hq, q_blocks, 64): [warp 0..7][lane/4 0..7]
        ("k_int8", _ptr),          # int8 (B, Hkv, k_blocks*64, D_pad)
        ("k_scale", _ptr),         # float (B, Hkv, k_blocks, 4): [lane%4]
        ("v_fp16", _ptr),          # fp16 (B, Hkv, k_blocks*64, D_pad)
        ("lse_correction", _ptr),  # float (B, Hq, Sq) or 0: q . k_mean * sm_scale
        ("batch", _i32), ("heads_q", _i32), ("heads_kv", _i32),
        ("seq_q", _i32), ("seq_k", _i32),
        ("head_dim", _i32), ("head_dim_padded", _i32),
        ("q_blocks", _i32), ("k_blocks", _i32),
        ("in_dtype", _i32),        # DTYPE_* (q, k and v share it)
        ("granularity", _i32),     # GRAN_*
        ("vec_q", _i32), ("vec_k", _i32), ("vec_v", _i32),
        ("sm_scale", _f32),        # softmax scale (natural-log units)
        ("sm_scale_log2e", _f32),  # sm_scale * log2(e), folded into q_scale
        # FP8 V (sm89 tree); the sm80 tree uses v_fp16 instead.
        ("v_fp8", _ptr),           # e4m3 (B, Hkv, k_blocks, D_pad, 64): V^T per key block, keys permuted
        ("v_scale", _ptr),         # float (B, Hkv, D_pad): per-channel dequantization scale
        ("v_mean", _ptr),          # const float (B, Hkv, D_pad) or 0: subtracted (smooth_v)
        ("v_min", _ptr), ("v_max", _ptr),  # const float (B, Hkv, D_pad): channel min/max of V
        ("v_scale_max", _f32),     # |V| maps to this E4M3 value (448, or 2.25 for fp16 PV accumulation)
        # > 0: v_min / v_max (and v_mean) are of a sample of tokens; a channel's scale is set
        # from margin x its sampled amax, and a head where some value reaches that is redone
        # from exact statistics by the requantize launch. 0: they are exact (ABI 8).
        ("v_amax_margin", _f32),
        # Varlen: const int32 (B+1) token offsets of each sequence in the packed q / k,v (or 0:
        # dense). The *_stride_b fields are then unused; seq_q / seq_k are the maxima.
        ("cu_seqlens_q", _ptr), ("cu_seqlens_k", _ptr),
        # uint8 (B, Hkv, k_blocks) or 0: with a margin, 1 where a V block's E4M3 codes saturated
        # (a value at or beyond ~the bound); the requantize launch then redoes that head exactly.
        ("v_overflow", _ptr),
    ]


class AttnParams(ctypes.Structure):
    """INT8 QK^T + fp16 or FP8 PV attention over pre-quantized operands."""

    _fields_ = [
        ("q_int8", _ptr), ("q_scale", _ptr),
        ("k_int8", _ptr), ("k_scale", _ptr),
        ("v", _ptr),               # fp16 (B, Hkv, k_blocks*64, D_pad)
        ("out", _ptr), ("out_stride_b", _i64), ("out_stride_h", _i64), ("out_stride_s", _i64),
        ("lse", _ptr),             # float (B, Hq, Sq) or 0
        ("lse_correction", _ptr),  # const float (B, Hq, Sq) or 0
        ("causal_offset", _i64),   # key j visible to query i iff j <= i + causal_offset
        ("batch", _i32), ("heads_q", _i32), ("heads_kv", _i32),
        ("seq_q", _i32), ("seq_k", _i32),
        ("head_dim_out", _i32),    # columns written to `out` (<= padded head dim)
        ("q_blocks", _i32), ("k_blocks", _i32),
        ("causal", _i32),
        ("out_dtype", _i32),       # DTYPE_*
        ("v_scale", _ptr),         # const float (B, Hkv, D_pad): FP8 V scales (sm89 tree) or 0
        ("v_mean", _ptr),          # const float (B, Hkv, D_pad): added back in the epilogue, or 0
        # lse element strides (token stride 1); both 0: contiguous (B, Hq, Sq)
        ("lse_stride_b", _i64), ("lse_stride_h", _i64),
        # Varlen (see QuantParams); causal is then bottom-right per sequence (causal_offset unused),
        # out/lse rows are token offsets and their batch strides are unused.
        ("cu_seqlens_q", _ptr), ("cu_seqlens_k", _ptr),
        # Block-sparse: int8 mask (B, Hq, q_blocks, k_blocks) by element strides (0 broadcasts);
        # a key block whose entry is 0 is neither loaded nor multiplied. 0: dense.
        ("block_mask", _ptr),
        ("mask_stride_b", _i64), ("mask_stride_h", _i64), ("mask_stride_q", _i64), ("mask_stride_k", _i64),
    ]


class TensorMap(ctypes.Structure):
    """An opaque CUtensorMap (the copy engine's descriptor of a global tensor), encoded on the
    host by the driver (``_ext.encode_tensor_map``); 64-byte aligned in kernel parameters."""

    _cxx_align_ = 64
    _fields_ = [("bits", ctypes.c_uint64 * 16)]


class Sm90AttnParams(ctypes.Structure):
    """The sm90 tree's attention kernel: AttnParams plus tensor maps over the quantized operands
    (docs/ARCHITECTURE.md: Q int8 (D_pad, q_blocks*128, B*Hq), K int8 (D_pad, k_blocks*64, B*Hkv),
    V^T e4m3 (64, D_pad, k_blocks, B*Hkv), innermost first).

    ``q_source_dtype`` >= 0 (DTYPE_*): ``tmap_q`` maps the caller's 16-bit Q instead, (D, Sq, Hq,
    B), and the kernel quantizes it as the quantizer's Q jobs would (``q_granularity``,
    ``q_scale_log2e`` = sm_scale * log2(e)); ``attn.q_int8`` and ``attn.q_scale`` are unused."""

    _fields_ = [
        ("tmap_q", TensorMap), ("tmap_k", TensorMap), ("tmap_v", TensorMap),
        ("attn", AttnParams),
        ("q_source_dtype", _i32),  # -1: Q int8 from the quantizer; else DTYPE_* of Q itself
        ("q_granularity", _i32),   # GRAN_* (with q_source_dtype >= 0)
        ("q_scale_log2e", _f32),   # sm_scale * log2(e) (with q_source_dtype >= 0)
        ("_pad0", ctypes.c_uint8 * (-(3 * 128 + ctypes.sizeof(AttnParams) + 12) % 64)),
    ]


class QuantFp4Params(ctypes.Structure):
    """One launch quantizes Q, K and V to NVFP4 (sm120 tree): E2M1 codes, two per byte (element
    2i in the low nibble), one E4M3 scale per 16 elements. Q and K along the head dim, V along
    the keys of a 64-key block (V^T tiles, keys in fp4_pv_key_slot order)."""

    _fields_ = [
        ("q", _ptr), ("q_stride_b", _i64), ("q_stride_h", _i64), ("q_stride_s", _i64),
        ("k", _ptr), ("k_stride_b", _i64), ("k_stride_h", _i64), ("k_stride_s", _i64),
        ("v", _ptr), ("v_stride_b", _i64), ("v_stride_h", _i64), ("v_stride_s", _i64),
        ("k_mean", _ptr),          # const float (B, Hkv, D_pad) or 0: no K smoothing
        ("q_seq_mean", _ptr),      # const float (B, Hq, D_pad) or 0: Q's mean per 128-token block
        ("q_mean", _ptr),          # float (B, Hq, q_blocks, D_pad): the mean removed from each Q block
        ("q_fp4", _ptr),           # u8 (B, Hq, q_blocks*128, D_pad/2)
        ("q_sf", _ptr),            # u8 E4M3 (B, Hq, q_blocks*128, D_pad/16)
        ("k_fp4", _ptr),           # u8 (B, Hkv, k_blocks*64, D_pad/2)
        ("k_sf", _ptr),            # u8 E4M3 (B, Hkv, k_blocks*64, D_pad/16)
        ("v_fp4", _ptr),           # u8 (B, Hkv, k_blocks, D_pad, 32): V^T, key slots
        ("v_sf", _ptr),            # u8 E4M3 (B, Hkv, k_blocks, D_pad, 4)
        ("lse_correction", _ptr),  # float (B, Hq, Sq) or 0: q . k_mean * sm_scale
        ("batch", _i32), ("heads_q", _i32), ("heads_kv", _i32),
        ("seq_q", _i32), ("seq_k", _i32),
        ("head_dim", _i32), ("head_dim_padded", _i32),
        ("q_blocks", _i32), ("k_blocks", _i32),
        ("in_dtype", _i32),        # DTYPE_*
        ("vec_q", _i32), ("vec_k", _i32), ("vec_v", _i32),
        ("sm_scale", _f32),        # softmax scale (natural-log units), for lse_correction
    ]


class AttnFp4Params(ctypes.Structure):
    """FP4 attention over NVFP4 operands (sm120 tree); buffers as in QuantFp4Params."""

    _fields_ = [
        ("q_fp4", _ptr), ("q_sf", _ptr), ("q_mean", _ptr),
        ("k_fp4", _ptr), ("k_sf", _ptr), ("v_fp4", _ptr), ("v_sf", _ptr),
        ("out", _ptr), ("out_stride_b", _i64), ("out_stride_h", _i64), ("out_stride_s", _i64),
        ("lse", _ptr),             # float (B, Hq, Sq) or 0
        ("lse_correction", _ptr),  # const float (B, Hq, Sq) or 0
        ("causal_offset", _i64),   # key j visible to query i iff j <= i + causal_offset
        ("lse_stride_b", _i64), ("lse_stride_h", _i64),  # both 0: contiguous (B, Hq, Sq)
        ("batch", _i32), ("heads_q", _i32), ("heads_kv", _i32),
        ("seq_q", _i32), ("seq_k", _i32),
        ("head_dim_out", _i32),    # columns written to `out` (<= padded head dim)
        ("q_blocks", _i32), ("k_blocks", _i32),
        ("causal", _i32),
        ("out_dtype", _i32),       # DTYPE_*
        ("sm_scale_log2e", _f32),  # scores = (Q^ K^T + q_mean . K^) * sm_scale_log2e
        ("_pad0", _i32),
    ]


class Fp4ConvertParams(ctypes.Structure):
    """Element-wise conversions of the sm120 tree, for unit tests: fp32 -> E2M1 codes (two per
    byte) and fp32 -> E4M3 codes, through the device functions the quantizer uses."""

    _fields_ = [
        ("src", _ptr),             # const float (n)
        ("e2m1", _ptr),            # u8 (n/2)
        ("e4m3", _ptr),            # u8 (n)
        ("n", _i32),               # a multiple of 8
        ("_pad0", _i32),
    ]


STRUCTS = (ChannelStatsParams, QuantParams, AttnParams, TensorMap, Sm90AttnParams,
           QuantFp4Params, AttnFp4Params, Fp4ConvertParams)

_C_TYPES = {
    ctypes.c_int32: "int",
    ctypes.c_int64: "long long",
    ctypes.c_float: "float",
    ctypes.c_uint64: "unsigned long long",  # a device pointer
}


def _cxx_field(ctype, name: str) -> str:
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
        element = ctype._type_
        cxx = "unsigned char" if element is ctypes.c_uint8 else _C_TYPES[element]
        return f"{cxx} {name}[{ctype._length_}]"
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
        return f"{ctype.__name__} {name}"
    return f"{_C_TYPES[ctype]} {name}"


def render_header() -> str:
    """The C++ view of the structs above, with layout checks."""
    out = [
        "// Generated by `python -m sageattn._abi --write kernels/common/params.h`. Do not edit.",
        "// The kernel ABI: one POD struct per kernel family, passed by value.",
        "// Builtin types only (LP64: int 32, long long 64 bits), so the header needs no",
        "// includes and builds under nvcc, NVRTC and a host compiler alike.",
        "#pragma once",
        "",
        "namespace sageattn {",
        "",
        f"constexpr unsigned kAbiVersion = {ABI_VERSION};",
        f"constexpr int kDtypeFp16 = {DTYPE_FP16};",
        f"constexpr int kDtypeBf16 = {DTYPE_BF16};",
        f"constexpr int kGranPerThread = {GRAN_PER_THREAD};",
        f"constexpr int kGranPerWarp = {GRAN_PER_WARP};",
        "",
    ]
    for struct in STRUCTS:
        align = getattr(struct, "_cxx_align_", None)
        out.append(f"struct {'alignas(%d) ' % align if align else ''}{struct.__name__} {{")
        for name, ctype in struct._fields_:
            out.append(f"  {_cxx_field(ctype, name)};")
        out.append("};")
        out.append(f"static_assert(sizeof({struct.__name__}) == {ctypes.sizeof(struct)}, \"ABI\");")
        # NVRTC has no offsetof; nvcc and the host compiler check the offsets.
        out.append("#if !defined(__CUDACC_RTC__)")
        for name, _ in struct._fields_:
            off = getattr(struct, name).offset
            out.append(f"static_assert(__builtin_offsetof({struct.__name__}, {name}) == {off}, \"ABI\");")
        out.append("#endif")
        out.append("")
    out.append("}  // namespace sageattn")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        with open(sys.argv[2], "w") as f:
            f.write(render_header())
    else:
        sys.stdout.write(render_header())
