// O += P V with FP8 E4M3 mma.sync m16n8k32 (SageAttention2 §4: FP8 PV with per-channel V
// scales). P arrives scaled by 448 (the E4M3 maximum) from the softmax; the quantizer stored
// V^T with keys in fp8_pv_key_slot order, so the score registers of tiles 4t..4t+3 are the
// A fragment of 32-key step t as they stand.
#pragma once

#include "../common/pv_accumulate.cuh"
#include "traits.cuh"

namespace sageattn {
namespace sm89 {

/// @brief D(16x8 f32) += A(16x32 e4m3) * B(32x8 e4m3).
__device__ __forceinline__ void mma_e4m3_m16n8k32_f32acc(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// @brief D(16x8 f16x2) += A(16x32 e4m3) * B(32x8 e4m3): fp16 accumulation (PTX ISA 8.7+).
__device__ __forceinline__ void mma_e4m3_m16n8k32_f16acc(u32 (&d)[2], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f16.e4m3.e4m3.f16 {%0,%1}, {%2,%3,%4,%5}, {%6,%7}, {%0,%1};"
      : "+r"(d[0]), "+r"(d[1])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// @brief A fragment of 32-key step t: rows lane/4 and lane/4+8, from score tiles 4t..4t+3.
template <class T>
__device__ __forceinline__ void p_fragment_e4m3(u32 (&a)[4], const float (&p)[T::kKTiles][4], int t) {
  a[0] = pack_e4m3x4(p[4 * t][0], p[4 * t][1], p[4 * t + 1][0], p[4 * t + 1][1]);
  a[1] = pack_e4m3x4(p[4 * t][2], p[4 * t][3], p[4 * t + 1][2], p[4 * t + 1][3]);
  a[2] = pack_e4m3x4(p[4 * t + 2][0], p[4 * t + 2][1], p[4 * t + 3][0], p[4 * t + 3][1]);
  a[3] = pack_e4m3x4(p[4 * t + 2][2], p[4 * t + 2][3], p[4 * t + 3][2], p[4 * t + 3][3]);
}

/// @brief B fragments (b0,b1 of output tiles dc and dc+1) of step t from the V^T tile.
/// `lane_offset`: vt_lane_offset(t, lane); channel steps of 8 rows keep the swizzle phase.
template <class T>
__device__ __forceinline__ void vt_fragments(u32 (&b)[4], u32 smem_vt, u32 lane_offset, int dc) {
  ldmatrix_x4(b, smem_vt + lane_offset + 8 * dc * T::kVChunks * 16);
}

/// @brief The lane's ldmatrix offset for step t at dc = 0: rows (channels) lane%8 + 8(lane/16),
/// chunk 2t + (lane/8)%2.
template <class T>
__device__ __forceinline__ u32 vt_lane_offset(int t, int lane) {
  return swizzled_offset<T::kVChunks>((lane % 8) + 8 * (lane / 16), 2 * t + (lane / 8) % 2);
}

// On sm_90 (the H100, where this tree is tested) there is no E4M3 mma.sync: ptxas lowers each
// one to two f16 HMMAs and adds their result into the accumulator with separate fp16/fp32 adds.
// Written out here instead, the HMMAs accumulate themselves: the same E4M3 values and products,
// 64 (fp16 accumulators) to 128 (fp32) fewer instructions per 64-key block and warp. (E4M3 x
// E4M3 products are exact in f16 and f32 alike; only where the fp16 sums round moves.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
constexpr bool kPvAsF16Mma = true;
#else
constexpr bool kPvAsF16Mma = false;
#endif

/// @brief f16 m16n8k16 into an f16x2 or an fp32 accumulator, by the accumulator's type.
__device__ __forceinline__ void mma_f16_m16n8k16_acc(u32 (&d)[2], const u32 (&a)[4], u32 b0, u32 b1) {
  mma_f16_m16n8k16_f16acc(d, a, b0, b1);
}
__device__ __forceinline__ void mma_f16_m16n8k16_acc(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  mma_f16_m16n8k16_f32acc(d, a, b0, b1);
}

/// @brief An E4M3 m16n8k32 A fragment as the A fragments of two f16 m16n8k16 products: keys
/// 4c..4c+1 of each 4-key group become f16 keys 2c..2c+1 and keys 4c+2..4c+3 become 2c+8..2c+9
/// (a relabelling of the block's keys, applied to B alike in mma_e4m3_as_f16).
__device__ __forceinline__ void unpack_a_fragment(u32 (&a16)[2][4], const u32 (&a)[4]) {
  unpack_e4m3x4(a[0], a16[0][0], a16[0][2]);
  unpack_e4m3x4(a[1], a16[0][1], a16[0][3]);
  unpack_e4m3x4(a[2], a16[1][0], a16[1][2]);
  unpack_e4m3x4(a[3], a16[1][1], a16[1][3]);
}

/// @brief D += A(16x32) B(32x8) with A unpacked by unpack_a_fragment and B as E4M3 (b0: keys
/// 0..15, b1: keys 16..31 of the step), through two f16 products.
/// Acc: u32[2] (f16x2, "fp32+fp16" blocks) or float[4]; the f16 product picked by overload.
template <class Acc>
__device__ __forceinline__ void mma_e4m3_as_f16(Acc& d, const u32 (&a16)[2][4], u32 b0, u32 b1) {
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    u32 lo, hi;
    unpack_e4m3x4(k == 0 ? b0 : b1, lo, hi);
    mma_f16_m16n8k16_acc(d, a16[k], lo, hi);
  }
}

template <class T, PvAccum kAccum>
__device__ __forceinline__ void mma_pv(float (&o)[T::kOTiles][4], const float (&p)[T::kKTiles][4], u32 smem_vt,
                                       int lane) {
  float acc32[T::kOTiles][4];
  u32 acc16[T::kOTiles][2];
#pragma unroll
  for (int dc = 0; dc < T::kOTiles; ++dc) {
    if (kAccum == PvAccum::kBlockFp32) acc32[dc][0] = acc32[dc][1] = acc32[dc][2] = acc32[dc][3] = 0.f;
    if (kAccum == PvAccum::kBlockFp16) acc16[dc][0] = acc16[dc][1] = 0u;
  }
  float (&acc)[T::kOTiles][4] = kAccum == PvAccum::kDirect ? o : acc32;  // sm_90's fp32 target
#pragma unroll
  for (int t = 0; t < T::kBlockK / 32; ++t) {
    u32 a[4];
    p_fragment_e4m3<T>(a, p, t);
    u32 a16[2][4];
    if constexpr (kPvAsF16Mma) unpack_a_fragment(a16, a);
    const u32 lane_offset = vt_lane_offset<T>(t, lane);
#pragma unroll
    for (int dc = 0; dc < T::kOTiles; dc += 2) {
      u32 b[4];
      vt_fragments<T>(b, smem_vt, lane_offset, dc);
      if constexpr (kPvAsF16Mma) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (kAccum == PvAccum::kBlockFp16) mma_e4m3_as_f16(acc16[dc + h], a16, b[2 * h], b[2 * h + 1]);
          else mma_e4m3_as_f16(acc[dc + h], a16, b[2 * h], b[2 * h + 1]);
        }
      } else if (kAccum == PvAccum::kBlockFp16) {  // native E4M3 (sm_89, sm_120): as before 130db6f
        mma_e4m3_m16n8k32_f16acc(acc16[dc], a, b[0], b[1]);
        mma_e4m3_m16n8k32_f16acc(acc16[dc + 1], a, b[2], b[3]);
      } else if (kAccum == PvAccum::kBlockFp32) {
        mma_e4m3_m16n8k32_f32acc(acc32[dc], a, b[0], b[1]);
        mma_e4m3_m16n8k32_f32acc(acc32[dc + 1], a, b[2], b[3]);
      } else {
        mma_e4m3_m16n8k32_f32acc(o[dc], a, b[0], b[1]);
        mma_e4m3_m16n8k32_f32acc(o[dc + 1], a, b[2], b[3]);
      }
    }
  }
  if (kAccum == PvAccum::kBlockFp32) add_block<T::kOTiles>(o, acc32);
  if (kAccum == PvAccum::kBlockFp16) add_block<T::kOTiles>(o, acc16);
}

}  // namespace sm89
}  // namespace sageattn
