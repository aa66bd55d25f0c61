// The block-scaled FP4 MMA of the sm120 tree (PTX ISA: mma.sync ... kind::mxf4nvf4.block_scale
// .scale_vec::4X.m16n8k64, E2M1 A/B, UE4M3 scales, fp32 accumulation):
//   D = C + sum_{c<4} SF_A[r][c] * SF_B[c][n] * sum_{k in 16c..16c+15} A[r][k] * B[k][n].
// Fragments (lane = 4g + t): a0 = A[g][8t..8t+7], a1 = A[g+8][8t..], a2 = A[g][32+8t..],
// a3 = A[g+8][32+8t..]; b0 = B[8t..8t+7][g], b1 = B[32+8t..][g]; element i of a register in
// bits 4i..4i+3. Scales with {byte-id, thread-id} = {0, 0}: SF_A of row g comes from lane 4g,
// of row g+8 from lane 4g+1, SF_B of column g from lane 4g; byte c of each is chunk c.
#pragma once

#include "fp4_numeric.cuh"

namespace sageattn {
namespace sm120 {

#if !SAGEATTN_FP4_NATIVE
/// @brief One 16-element chunk of a row of A times a column of B, exactly (E2M1 x E2M1 sums
/// are integers of quarter units, |sum| <= 16 * 36).
__device__ __forceinline__ int chunk_dot_x4(u32 a_lo, u32 a_hi, u32 b_lo, u32 b_hi) {
  int sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    sum += e2m1_twice((a_lo >> (4 * i)) & 15u) * e2m1_twice((b_lo >> (4 * i)) & 15u);
    sum += e2m1_twice((a_hi >> (4 * i)) & 15u) * e2m1_twice((b_hi >> (4 * i)) & 15u);
  }
  return sum;
}
#endif

#if !SAGEATTN_FP4_NATIVE
struct Fp4Acc {
  float d[4];
};

/// @brief The exact software equivalent of the block-scaled FP4 MMA (sm_90 verification build):
/// every lane gathers its two rows of A and two columns of B by shuffles, forms each chunk's dot
/// product exactly in integers, scales it by the product of the two E4M3 scales (exact in fp32)
/// and adds the four chunks in fp32. Out of line: one copy instead of 32 inlined ones per kernel
/// (build time; its speed is not what the sm_90 build measures).
__device__ __noinline__ Fp4Acc mma_fp4_m16n8k64_soft(Fp4Acc acc_in, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1,
                                                      u32 sfa, u32 sfb) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const u32 a[4] = {a0, a1, a2, a3};
  u32 ra[4][4], rb[2][4][2];
#pragma unroll
  for (int u = 0; u < 4; ++u) {
#pragma unroll
    for (int r = 0; r < 4; ++r) ra[u][r] = __shfl_sync(0xffffffffu, a[r], 4 * g + u);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      rb[c][u][0] = __shfl_sync(0xffffffffu, b0, 4 * (2 * t + c) + u);
      rb[c][u][1] = __shfl_sync(0xffffffffu, b1, 4 * (2 * t + c) + u);
    }
  }
  const u32 sa[2] = {__shfl_sync(0xffffffffu, sfa, 4 * g), __shfl_sync(0xffffffffu, sfa, 4 * g + 1)};
  const u32 sb[2] = {__shfl_sync(0xffffffffu, sfb, 8 * t), __shfl_sync(0xffffffffu, sfb, 8 * t + 4)};
  Fp4Acc out = acc_in;
#pragma unroll
  for (int hi = 0; hi < 2; ++hi)      // row g / g + 8
#pragma unroll
    for (int c = 0; c < 2; ++c) {     // column 2t / 2t + 1
      float acc = 0.f;
#pragma unroll
      for (int chunk = 0; chunk < 4; ++chunk) {
        // Chunk k = 16c..16c+15: register half chunk/2 of lanes u = 2(chunk%2), 2(chunk%2)+1.
        const int u = 2 * (chunk % 2), half = chunk / 2;
        const int dot = chunk_dot_x4(ra[u][2 * half + hi], ra[u + 1][2 * half + hi], rb[c][u][half],
                                     rb[c][u + 1][half]);
        const float scale = e4m3_value(sa[hi] >> (8 * chunk)) * e4m3_value(sb[c] >> (8 * chunk));
        acc += (0.25f * static_cast<float>(dot)) * scale;
      }
      out.d[2 * hi + c] += acc;
    }
  return out;
}
#endif

/// @brief D(16x8 f32) += (A(16x64 e2m1) . SF_A) (B(64x8 e2m1) . SF_B): the tensor core on
/// sm_120a, the exact software equivalent above on sm_90.
__device__ __forceinline__ void mma_fp4_m16n8k64(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, u32 sfa,
                                                 u32 sfb, int lane) {
#if SAGEATTN_FP4_NATIVE
  asm volatile(
      "mma.sync.aligned.kind::mxf4nvf4.block_scale.scale_vec::4X.m16n8k64.row.col.f32.e2m1.e2m1.f32.ue4m3 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3}, %10, {0, 0}, %11, {0, 0};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(sfa), "r"(sfb));
#else
  (void)lane;
  const Fp4Acc r = mma_fp4_m16n8k64_soft(Fp4Acc{{d[0], d[1], d[2], d[3]}}, a[0], a[1], a[2], a[3], b0, b1, sfa, sfb);
  d[0] = r.d[0], d[1] = r.d[1], d[2] = r.d[2], d[3] = r.d[3];
#endif
}

}  // namespace sm120
}  // namespace sageattn
