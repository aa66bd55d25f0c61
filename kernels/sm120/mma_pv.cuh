// O += P^ V^ for one 64-key block (SageAttention3 §3.3): P's second quantization level (one
// E4M3 scale per 16 keys, E2M1 values) straight from the score registers, then one block-scaled
// m16n8k64 MMA per 8 output channels into a zeroed fp32 accumulator that is added to O
// (two-level accumulation). The quantizer stored V^T with keys in fp4_pv_key_slot order, so
// the score registers of tiles 0-3 / 4-7 are the A fragment's first / second 32 slots.
#pragma once

#include "../common/pv_accumulate.cuh"
#include "mma_qk.cuh"

namespace sageattn {
namespace sm120 {

/// @brief P (already scaled by the per-row factor 448*6) to the PV A fragment and its SF_A.
/// a[h] (h = 0..3: rows g, g+8 of slots 0-31, then of slots 32-63) holds tiles 4(h/2)..+3.
template <class T>
__device__ __forceinline__ void p_fragment_fp4(u32 (&a)[4], u32& sfa, const float (&p)[T::kKTiles][4], int lane) {
  u32 sf[4];
#pragma unroll
  for (int h = 0; h < 4; ++h) {
    const int tile0 = 4 * (h / 2), r = h % 2;
    float x[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) x[2 * i] = p[tile0 + i][2 * r], x[2 * i + 1] = p[tile0 + i][2 * r + 1];
    a[h] = quantize_fp4_pair(x, sf[h]);  // lanes t, t^1 share the 16-slot chunk 2(h/2) + t/2
  }
  // Lane t = 0 supplies row g's four chunk scales, lane 1 row g+8's: its own chunks 0 and 2,
  // chunks 1 and 3 from lane t + 2.
  const int r = lane % 2;
  const u32 own = sf[r] | (sf[2 + r] << 8);
  const u32 other = __shfl_xor_sync(0xffffffffu, own, 2);
  sfa = (own & 0xffu) | ((other & 0xffu) << 8) | ((own >> 8) << 16) | ((other >> 8) << 24);
}

template <class T>
__device__ __forceinline__ void mma_pv_fp4(float (&o)[T::kOTiles][4], const float (&p)[T::kKTiles][4],
                                           const char* smem, int lane) {
  u32 a[4], sfa;
  p_fragment_fp4<T>(a, sfa, p, lane);
  const int g = lane / 4, t = lane % 4;
  float acc[T::kOTiles][4];
#pragma unroll
  for (int dc = 0; dc < T::kOTiles; ++dc) {
    const int ch = 8 * dc + g;
    acc[dc][0] = acc[dc][1] = acc[dc][2] = acc[dc][3] = 0.f;
    const u32 b0 = lds32(smem + T::kVCodes, ch * (T::kBlockK / 2) + 4 * t);
    const u32 b1 = lds32(smem + T::kVCodes, ch * (T::kBlockK / 2) + 16 + 4 * t);
    const u32 sfb = lds32(smem + T::kVScales, ch * (T::kBlockK / kSfGroup));
    mma_fp4_m16n8k64(acc[dc], a, b0, b1, sfa, sfb, lane);
  }
  add_block<T::kOTiles>(o, acc);
}

}  // namespace sm120
}  // namespace sageattn
