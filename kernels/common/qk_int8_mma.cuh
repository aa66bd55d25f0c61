// S = Q K^T for one warp's 16 rows and one 64-key block: INT8 mma.sync m16n8k32 with INT32
// accumulation, then per-thread dequantization (one q scale x one k scale per thread: the
// quantizer grouped exactly the rows/keys this thread's fragment holds).
// Shared by the sm80 and sm89 trees (identical QK^T; they differ in PV).
#pragma once

#include "mma_sm80.cuh"

namespace sageattn {

/// @brief The warp's Q A-fragments for the whole head dim (kept in registers all along).
template <class T>
__device__ __forceinline__ void load_q_fragments(u32 (&qf)[T::kHeadDim / 32][4], u32 smem_q, int warp,
                                                 int lane) {
  // Matrices: rows 0-7 / 8-15 of the warp's slice x 16-byte chunk 2kk / 2kk+1.
  const int row = warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
#pragma unroll
  for (int kk = 0; kk < T::kHeadDim / 32; ++kk) {
    const int chunk = 2 * kk + lane / 16;
    ldmatrix_x4(qf[kk], smem_q + swizzled_chunk<T::kQkChunks>(row, chunk) * 16);
  }
}

/// @brief Integer scores of the warp's 16 rows against the 64 keys in shared memory.
template <class T>
__device__ __forceinline__ void mma_qk(int (&acc)[T::kKTiles][4], const u32 (&qf)[T::kHeadDim / 32][4],
                                       u32 smem_k, int lane) {
#pragma unroll
  for (int j = 0; j < T::kKTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0;
  // Matrices: keys 8j..8j+7 / 8j+8.. x chunk 2kk / 2kk+1 -> b0,b1 of tiles j and j+1. Key steps
  // of 8 keep the swizzle phase (swizzled_offset): one lane offset per kk, keys as constants.
  const int key = (lane % 8) + 8 * (lane / 16);
  u32 lane_offset[T::kHeadDim / 32];
#pragma unroll
  for (int kk = 0; kk < T::kHeadDim / 32; ++kk)
    lane_offset[kk] = swizzled_offset<T::kQkChunks>(key, 2 * kk + (lane / 8) % 2);
#pragma unroll
  for (int kk = 0; kk < T::kHeadDim / 32; ++kk) {
#pragma unroll
    for (int j = 0; j < T::kKTiles; j += 2) {
      u32 b[4];
      ldmatrix_x4(b, smem_k + lane_offset[kk] + 8 * j * T::kQkChunks * 16);
      mma_s8_m16n8k32(acc[j], qf[kk], b[0], b[1]);
      mma_s8_m16n8k32(acc[j + 1], qf[kk], b[2], b[3]);
    }
  }
}

/// @brief Scores of keys past seq_k or above the causal diagonal -> -inf. Only the blocks from
/// the first masked one on run it (the diagonal and the partial last block); tools/sass_mix.py
/// counts it apart from the steady state by this function's name.
template <class T>
__device__ __forceinline__ void mask_scores(float (&s)[T::kKTiles][4], int key0, long long row0, int seq_k,
                                            bool causal, long long causal_offset, int lane) {
  const float neg_inf = -__int_as_float(0x7f800000);
  // Per row, the last visible key as a column of this block, clamped into [-1, kBlockK]: key
  // key0 + col is masked iff col > last (key >= seq_k, or key > row + causal_offset), so each
  // score costs one 32-bit compare instead of 64-bit key/row arithmetic.
  int last[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    long long limit = static_cast<long long>(seq_k) - 1 - key0;
    if (causal) limit = min(limit, row0 + 8 * r + causal_offset - key0);
    last[r] = static_cast<int>(max(-1LL, min(limit, static_cast<long long>(T::kBlockK))));
  }
#pragma unroll
  for (int j = 0; j < T::kKTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (8 * j + 2 * (lane % 4) + (e % 2) > last[e / 2]) s[j][e] = neg_inf;
}

/// @brief Dequantize to base-2 scores and mask keys past seq_k or above the causal diagonal.
/// `key0`: index of this block's first key; `row0`: query index of the thread's first row.
template <class T>
__device__ __forceinline__ void dequantize_and_mask(float (&s)[T::kKTiles][4], const int (&acc)[T::kKTiles][4],
                                                    float scale, bool apply_mask, int key0, long long row0,
                                                    int seq_k, bool causal, long long causal_offset,
                                                    int lane) {
#pragma unroll
  for (int j = 0; j < T::kKTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = static_cast<float>(acc[j][e]) * scale;
  if (apply_mask) mask_scores<T>(s, key0, row0, seq_k, causal, causal_offset, lane);
}

}  // namespace sageattn
