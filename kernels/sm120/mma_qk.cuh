// S = Q^ K^T + dS for one warp's 16 rows and one 64-key block (NVFP4 operands in shared
// memory, block-scaled m16n8k64 MMAs, fp32 accumulation), then base-2 scaling and masks.
// dS = q_mean . K^ restores what Q smoothing removed (SageAttention3 §3.2), computed once per
// CTA and block from the same FP4 K.
#pragma once

#include "mma_fp4.cuh"
#include "traits.cuh"

namespace sageattn {
namespace sm120 {

__device__ __forceinline__ u32 lds32(const char* smem, int byte) {
  return *reinterpret_cast<const u32*>(smem + byte);
}

/// @brief dS[key] = sum_d q_mean[d] K^[key][d] for the 64 keys of the stage (all threads; two
/// per key, each half the head dim), into smem_delta. Caller synchronizes before and after.
template <class T>
__device__ __forceinline__ void q_mean_dot_keys(const char* smem) {
  const int key = threadIdx.x / 2, half = threadIdx.x % 2;
  const float* q_mean = reinterpret_cast<const float*>(smem + T::kQMean);
  const unsigned char* codes = reinterpret_cast<const unsigned char*>(smem + T::kKCodes) + key * T::kRowBytes;
  const unsigned char* scales = reinterpret_cast<const unsigned char*>(smem + T::kKScales) + key * T::kRowScales;
  float dot = 0.f;
#pragma unroll
  for (int grp = half * T::kRowScales / 2; grp < (half + 1) * T::kRowScales / 2; ++grp) {
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < kSfGroup; ++i) {
      const int d = grp * kSfGroup + i;
      part += q_mean[d] * e2m1_value((codes[d / 2] >> (4 * (d % 2))) & 15u);
    }
    dot += part * e4m3_value(scales[grp]);
  }
  dot += __shfl_xor_sync(0xffffffffu, dot, 1);
  if (half == 0) reinterpret_cast<float*>(const_cast<char*>(smem) + T::kDelta)[key] = dot;
}

/// @brief Base-2 scores of the warp's 16 rows x 64 keys: (Q^ K^T + dS) * sm_scale_log2e, keys
/// past seq_k or above the causal diagonal -inf (when `apply_mask`).
template <class T>
__device__ __forceinline__ void scores_fp4(float (&s)[T::kKTiles][4], const char* smem, int warp, int lane,
                                           float sm_scale_log2e, bool apply_mask, int key0, long long row0,
                                           int seq_k, bool causal, long long causal_offset) {
  const int g = lane / 4, t = lane % 4;
  const int qrow = warp * 16 + g;
#pragma unroll
  for (int j = 0; j < T::kKTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < T::kQkSteps; ++kk) {
    const int col = kk * 32 + 4 * t;  // byte of the thread's k = 64kk + 8t .. +7
    const u32 a[4] = {lds32(smem + T::kQCodes, qrow * T::kRowBytes + col),
                      lds32(smem + T::kQCodes, (qrow + 8) * T::kRowBytes + col),
                      lds32(smem + T::kQCodes, qrow * T::kRowBytes + col + 16),
                      lds32(smem + T::kQCodes, (qrow + 8) * T::kRowBytes + col + 16)};
    // SF_A: lane 4g gives row g, lane 4g+1 row g+8 (lanes 4g+2, 4g+3 are not read).
    const u32 sfa = lds32(smem + T::kQScales, (qrow + 8 * (t % 2)) * T::kRowScales + 4 * kk);
#pragma unroll
    for (int j = 0; j < T::kKTiles; ++j) {
      const int key = 8 * j + g;
      const u32 b0 = lds32(smem + T::kKCodes, key * T::kRowBytes + col);
      const u32 b1 = lds32(smem + T::kKCodes, key * T::kRowBytes + col + 16);
      const u32 sfb = lds32(smem + T::kKScales, key * T::kRowScales + 4 * kk);
      mma_fp4_m16n8k64(s[j], a, b0, b1, sfa, sfb, lane);
    }
  }
  const float* delta = reinterpret_cast<const float*>(smem + T::kDelta);
  const float neg_inf = -__int_as_float(0x7f800000);
#pragma unroll
  for (int j = 0; j < T::kKTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = 8 * j + 2 * t + (e % 2);
      s[j][e] = (s[j][e] + delta[key]) * sm_scale_log2e;
      const long long row = row0 + 8 * (e / 2);
      if (apply_mask && (key0 + key >= seq_k || (causal && key0 + key > row + causal_offset))) s[j][e] = neg_inf;
    }
}

}  // namespace sm120
}  // namespace sageattn
