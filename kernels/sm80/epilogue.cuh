// Epilogue of the sm80 tree: normalize O by the row sums, write it in the caller's dtype and
// strides (only the real head-dim columns and query rows), and the natural-log LSE.
#pragma once

#include "../common/online_softmax.cuh"
#include "traits.cuh"

namespace sageattn {
namespace sm80 {

template <class T>
__device__ __forceinline__ void store_output(const AttnParams& p, const float (&o)[T::kOTiles][4],
                                             const RowStats& st, int b, int h, long long row0, int lane) {
  float sum[2], lse[2];
  finish_rows(st, sum, lse);
  const bool is_bf16 = p.out_dtype == kDtypeBf16;
  // 4-byte stores need even strides and width; otherwise store element by element.
  const bool paired = (p.out_stride_s % 2 == 0) && (p.out_stride_h % 2 == 0) &&
                      (p.out_stride_b % 2 == 0) && (p.head_dim_out % 2 == 0);
  u16* out = reinterpret_cast<u16*>(p.out) + b * p.out_stride_b + h * p.out_stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long row = row0 + 8 * r;
    if (row >= p.seq_q) continue;
    const float inv = sum[r] > 0.f ? 1.f / sum[r] : 0.f;
    u16* dst = out + row * p.out_stride_s;
#pragma unroll
    for (int dc = 0; dc < T::kOTiles; ++dc) {
      const int col = 8 * dc + 2 * (lane % 4);
      if (col >= p.head_dim_out) continue;
      const float x0 = o[dc][2 * r] * inv, x1 = o[dc][2 * r + 1] * inv;
      const u32 packed = is_bf16 ? pack_bf162(x0, x1) : pack_half2(x0, x1);
      if (paired) {
        *reinterpret_cast<u32*>(dst + col) = packed;
      } else {
        dst[col] = static_cast<u16>(packed & 0xffffu);
        if (col + 1 < p.head_dim_out) dst[col + 1] = static_cast<u16>(packed >> 16);
      }
    }
    if (p.lse != 0 && lane % 4 == 0) {
      const long long i = (static_cast<long long>(b) * p.heads_q + h) * p.seq_q + row;
      const float corr = p.lse_correction != 0 ? reinterpret_cast<const float*>(p.lse_correction)[i] : 0.f;
      reinterpret_cast<float*>(p.lse)[i] = lse[r] + corr;
    }
  }
}

}  // namespace sm80
}  // namespace sageattn
