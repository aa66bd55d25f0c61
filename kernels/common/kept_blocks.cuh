// Which key blocks a CTA computes: every block below n_blocks for a dense call, or the ones its
// block-sparse mask row keeps (sparse_sageattn: one byte per 64-key block, nonzero = compute).
// The mask row is staged in shared memory as a bitmask, a window of kWindowBlocks blocks at a
// time: each thread reads one byte per 128 blocks (all loads in flight together), __ballot_sync
// packs 32 blocks into a word, and the next kept block is a shared load and __ffs away. Walking
// the row in global memory (one dependent byte load per skipped block) cost 0.25x of the dense
// time at 90% skipped where 0.13x was expected (NOTES.md v5).
#pragma once

#include "numeric.cuh"

namespace sageattn {

/// @brief Byte of read-only global memory (ld.global.nc), zero-extended.
__device__ __forceinline__ u32 load_u8_readonly(const signed char* p) {
  u32 v;
  asm volatile("ld.global.nc.u8 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

/// Cursor over the kept key blocks of one CTA. Every thread of the CTA makes the same calls with
/// the same arguments (the cursor is CTA-uniform): a sparse cursor synchronizes the CTA when it
/// stages the next window of the mask row.
template <int kThreads>
struct KeptBlocks {
  static constexpr int kWarps = kThreads / 32;
  // 64 words = 2048 blocks = 131072 keys per window: one fill covers any sequence up to that,
  // longer rows refill (two __syncthreads per 2048 blocks); no length cap.
  static constexpr int kWindowWords = 64;
  static constexpr int kWindowBlocks = kWindowWords * 32;
  static constexpr int kSmemBytes = kWindowWords * 4;
  static constexpr int kRounds = kWindowWords / kWarps;  // one mask byte per thread per round
  static_assert(kWindowWords % kWarps == 0 && kRounds % 4 == 0, "window = whole batches");

  const signed char* mask_row;  // null: dense
  long long stride;             // bytes between consecutive key blocks' entries (0 broadcasts)
  u32* words;                   // the window, in shared memory
  int n_blocks;                 // blocks past n_blocks are never kept (causal / sequence end)
  int window_end;               // first block past the staged window

  /// @brief The first kept block (n_blocks if none).
  __device__ __forceinline__ int first() {
    // At CTA start nothing else is live: four rounds of loads in flight at once. Later windows
    // (rows past 2048 blocks) load one round at a time, next to the live accumulators.
    if (mask_row != nullptr && n_blocks > 0) fill_window<4>(0);
    return next(-1);
  }

  /// @brief The first kept block after `kb` (n_blocks if none).
  __device__ __forceinline__ int next(int kb) {
    int x = kb + 1;
    if (mask_row == nullptr) return x;
    while (x < n_blocks) {
      if (x >= window_end) fill_window<1>(x);
      const int begin = window_end - kWindowBlocks;
      const int last_word = (min(n_blocks, window_end) - 1 - begin) / 32;  // words past it are stale
      int w = (x - begin) / 32;
      u32 bits = words[w] & (~0u << ((x - begin) % 32));
      while (bits == 0 && w < last_word) bits = words[++w];
      // Bits of blocks >= n_blocks are 0 (fill_window), so a set bit is a real block.
      if (bits != 0) return begin + 32 * w + __ffs(bits) - 1;
      x = window_end;  // nothing kept in the rest of this window
    }
    return n_blocks;
  }

  /// @brief Stage blocks begin .. begin + kWindowBlocks - 1 of the row (0 past n_blocks),
  /// kBatch rounds of loads in flight together.
  template <int kBatch>
  __device__ __forceinline__ void fill_window(int begin) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // every thread is done reading the previous window
    for (int r0 = 0; r0 < kRounds && begin + r0 * kThreads < n_blocks; r0 += kBatch) {
      bool keep[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int block = begin + (r0 + i) * kThreads + static_cast<int>(threadIdx.x);
        keep[i] = block < n_blocks && load_u8_readonly(mask_row + block * stride) != 0;
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        // Round r, warp w: blocks begin + 128 r + 32 w + lane -> word 4 r + w (kWarps = 4).
        const u32 word = __ballot_sync(0xffffffffu, keep[i]);
        if (lane == 0) words[(r0 + i) * kWarps + warp] = word;
      }
    }
    __syncthreads();
    window_end = begin + kWindowBlocks;
  }
};

}  // namespace sageattn
