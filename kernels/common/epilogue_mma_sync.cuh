// Epilogue of the mma.sync trees: normalize O by the row sums, apply per-channel V scale and
// mean (FP8 V) if given, write O in the caller's dtype and strides (only real head-dim columns
// and query rows), and the natural-log LSE.
#pragma once

#include "online_softmax.cuh"

namespace sageattn {

/// `col_scale`/`col_bias` (per output column, null = 1 / 0) undo V's quantization and smoothing;
/// a row with no visible key is written as zeros, not as the bias.
template <class T>
__device__ __forceinline__ void store_output(const AttnParams& p, const float (&o)[T::kOTiles][4],
                                             const RowStats& st, float log2_p_scale, const float* col_scale,
                                             const float* col_bias, int b, int h, long long row0, int lane) {
  float sum[2], lse[2];
  finish_rows(st, sum, lse, log2_p_scale);
  const bool is_bf16 = p.out_dtype == kDtypeBf16;
  // 4-byte stores need even strides and width; otherwise store element by element.
  const bool paired = (p.out_stride_s % 2 == 0) && (p.out_stride_h % 2 == 0) &&
                      (p.out_stride_b % 2 == 0) && (p.head_dim_out % 2 == 0);
  u16* out = reinterpret_cast<u16*>(p.out) + b * p.out_stride_b + h * p.out_stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long row = row0 + 8 * r;
    if (row >= p.seq_q) continue;
    const bool empty = !(sum[r] > 0.f);
    const float inv = empty ? 0.f : 1.f / sum[r];
    u16* dst = out + row * p.out_stride_s;
#pragma unroll
    for (int dc = 0; dc < T::kOTiles; ++dc) {
      const int col = 8 * dc + 2 * (lane % 4);
      if (col >= p.head_dim_out) continue;
      float x0 = o[dc][2 * r] * inv, x1 = o[dc][2 * r + 1] * inv;
      if (col_scale != nullptr) x0 *= col_scale[col], x1 *= col_scale[col + 1];
      if (col_bias != nullptr && !empty) x0 += col_bias[col], x1 += col_bias[col + 1];
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

}  // namespace sageattn
