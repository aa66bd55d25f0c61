// How a key block's P·V product reaches the fp32 output accumulator (DESIGN.md §3):
//   kDirect       the MMA accumulates straight into O (fp32);
//   kBlockFp32    the block's product accumulates from zero in an fp32 MMA accumulator, then is
//                 added to O (two-level: bounds the error of an imprecise FP8 MMA accumulator);
//   kBlockFp16    as kBlockFp32 with an fp16 MMA accumulator (half the registers, about 2x the MMA
//                 rate on consumer parts; safe only if one block's sum stays below 65504).
#pragma once

#include "numeric.cuh"

namespace sageattn {

enum class PvAccum { kDirect, kBlockFp32, kBlockFp16 };

/// @brief O *= per-row factor (rows lane/4 and lane/4 + 8 of every m16n8 tile).
template <int kTiles>
__device__ __forceinline__ void rescale_rows(float (&o)[kTiles][4], const float (&f)[2]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    o[j][0] *= f[0];
    o[j][1] *= f[0];
    o[j][2] *= f[1];
    o[j][3] *= f[1];
  }
}

template <int kTiles>
__device__ __forceinline__ void add_block(float (&o)[kTiles][4], const float (&acc)[kTiles][4]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[j][e] += acc[j][e];
}

template <int kTiles>
__device__ __forceinline__ void add_block(float (&o)[kTiles][4], const u32 (&acc)[kTiles][2]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    float lo, hi;
    unpack_half2(acc[j][0], lo, hi);
    o[j][0] += lo;
    o[j][1] += hi;
    unpack_half2(acc[j][1], lo, hi);
    o[j][2] += lo;
    o[j][3] += hi;
  }
}

}  // namespace sageattn
