// O += P V for one warp and one 64-key block: P (fp32 probabilities) rounded to fp16 and
// reused straight from the score accumulator layout as mma A-fragments (the m16n8 C layout of
// two adjacent key tiles is the m16n8k16 A layout), V B-fragments by ldmatrix.trans.
#pragma once

#include "../common/pv_accumulate.cuh"
#include "traits.cuh"

namespace sageattn {
namespace sm80 {

/// @brief A-fragment of keys 16t..16t+15 from the probabilities of score tiles 2t, 2t+1.
template <class T>
__device__ __forceinline__ void p_fragment(u32 (&a)[4], const float (&p)[T::kKTiles][4], int t) {
  a[0] = pack_half2(p[2 * t][0], p[2 * t][1]);
  a[1] = pack_half2(p[2 * t][2], p[2 * t][3]);
  a[2] = pack_half2(p[2 * t + 1][0], p[2 * t + 1][1]);
  a[3] = pack_half2(p[2 * t + 1][2], p[2 * t + 1][3]);
}

/// @brief V B-fragments (b0,b1 of output tiles dc and dc+1) for keys 16t..16t+15.
/// `lane_offset`: v_lane_offset(dc % 8, lane); key steps of 16 and chunk steps of 8 keep the
/// swizzle phase (swizzled_offset), so they are constants.
template <class T>
__device__ __forceinline__ void v_fragments(u32 (&b)[4], u32 smem_v, u32 lane_offset, int t, int dc) {
  ldmatrix_x4_trans(b, smem_v + lane_offset + (16 * t * T::kVChunks + (dc / 8) * 8) * 16);
}

/// @brief The lane's ldmatrix offset at t = 0 for output tiles dc, dc+1 (dc < 8): keys
/// lane%8 + 8((lane/8)%2), chunk dc + lane/16.
template <class T>
__device__ __forceinline__ u32 v_lane_offset(int dc, int lane) {
  return swizzled_offset<T::kVChunks>((lane % 8) + 8 * ((lane / 8) % 2), dc + lane / 16);
}

/// @brief O += P V for one key block, accumulated as kAccum says (kDirect or kBlockFp16).
template <class T, PvAccum kAccum>
__device__ __forceinline__ void mma_pv(float (&o)[T::kOTiles][4], const float (&p)[T::kKTiles][4],
                                       u32 smem_v, int lane) {
  static_assert(kAccum != PvAccum::kBlockFp32, "fp16 MMAs on sm80 are exact enough to accumulate directly");
  u32 acc16[T::kOTiles][2];
  if (kAccum == PvAccum::kBlockFp16) {
#pragma unroll
    for (int dc = 0; dc < T::kOTiles; ++dc) acc16[dc][0] = acc16[dc][1] = 0u;
  }
  constexpr int kPhases = T::kOTiles < 8 ? T::kOTiles / 2 : 4;  // distinct dc % 8 (even dc)
  u32 lane_offset[kPhases];
#pragma unroll
  for (int i = 0; i < kPhases; ++i) lane_offset[i] = v_lane_offset<T>(2 * i, lane);
#pragma unroll
  for (int t = 0; t < T::kBlockK / 16; ++t) {
    u32 a[4];
    p_fragment<T>(a, p, t);
#pragma unroll
    for (int dc = 0; dc < T::kOTiles; dc += 2) {
      u32 b[4];
      v_fragments<T>(b, smem_v, lane_offset[(dc % 8) / 2], t, dc);
      if (kAccum == PvAccum::kBlockFp16) {
        mma_f16_m16n8k16_f16acc(acc16[dc], a, b[0], b[1]);
        mma_f16_m16n8k16_f16acc(acc16[dc + 1], a, b[2], b[3]);
      } else {
        mma_f16_m16n8k16_f32acc(o[dc], a, b[0], b[1]);
        mma_f16_m16n8k16_f32acc(o[dc + 1], a, b[2], b[3]);
      }
    }
  }
  if (kAccum == PvAccum::kBlockFp16) add_block<T::kOTiles>(o, acc16);
}

}  // namespace sm80
}  // namespace sageattn
