// Producer side of the mma.sync trees (sm80, sm89): cp.async copies of padded contiguous tiles
// into swizzled shared memory (every thread of the CTA takes a share of the 16-byte chunks).
// A tree's Traits names the tile geometry: kBlockQ, kBlockK, kQkChunks, kVRows, kVChunks,
// kKBytes, kThreads.
#pragma once

#include "mma_sm80.cuh"

namespace sageattn {

/// @brief Copy kRows rows of kChunks 16-byte chunks from a contiguous global tile.
template <int kRows, int kChunks, int kThreads>
__device__ __forceinline__ void load_tile_async(u32 smem_base, const char* gmem) {
  static_assert((kRows * kChunks) % kThreads == 0, "even split");
  // Step i moves kThreads / kChunks rows down, a multiple of the swizzle's 8-row period: the
  // thread's chunk keeps its column, so one address pair per thread serves every step with
  // constant offsets (immediates in the copy instructions, no per-step address arithmetic).
  constexpr int kRowsPerStep = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRowsPerStep % 8 == 0, "steps keep the swizzle phase");
  const int t = threadIdx.x;
  const u32 dst = smem_base + swizzled_chunk<kChunks>(t / kChunks, t % kChunks) * 16;
  const char* src = gmem + t * 16;
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i)
    cp_async_16(dst + i * kRowsPerStep * kChunks * 16, src + i * kThreads * 16);
}

template <class T>
__device__ __forceinline__ void load_q_tile(u32 smem_q, const char* q_block) {
  load_tile_async<T::kBlockQ, T::kQkChunks, T::kThreads>(smem_q, q_block);
}

/// @brief K (int8) and V (the tree's layout) of one key block into one pipeline stage.
template <class T>
__device__ __forceinline__ void load_kv_stage(u32 smem_stage, const char* k_block, const char* v_block) {
  load_tile_async<T::kBlockK, T::kQkChunks, T::kThreads>(smem_stage, k_block);
  load_tile_async<T::kVRows, T::kVChunks, T::kThreads>(smem_stage + T::kKBytes, v_block);
}

}  // namespace sageattn
