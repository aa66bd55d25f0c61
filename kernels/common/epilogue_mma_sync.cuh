// Epilogue of the mma.sync trees: normalize O by the row sums, apply per-channel V scale and
// mean (FP8 V) if given, write O in the caller's dtype and strides (only real head-dim columns
// and query rows), and the natural-log LSE.
#pragma once

#include "online_softmax.cuh"
#include "quantize.cuh"  // SeqSpan

namespace sageattn {

/// Where one (b, h) sequence's results go: `out` and `lse` point at its row 0 (lse may be null),
/// `lse_correction` at its K-smoothing correction row 0 (or null); rows >= `len` are not written.
struct OutputRows {
  u16* out;
  long long out_stride_s;
  float* lse;
  const float* lse_correction;
  int len;
};

/// @brief Outputs of (b, h): dense rows, or the sequence's token rows in packed varlen output.
__device__ __forceinline__ OutputRows output_rows(const AttnParams& p, int b, int h, const SeqSpan& q_span,
                                                  long long bhq) {
  const bool varlen = p.cu_seqlens_q != 0;
  OutputRows rows;
  rows.out = reinterpret_cast<u16*>(p.out) + h * p.out_stride_h + (varlen ? q_span.first * p.out_stride_s : b * p.out_stride_b);
  rows.out_stride_s = p.out_stride_s;
  const bool lse_contiguous = p.lse_stride_b == 0 && p.lse_stride_h == 0;
  const long long lse_sb = lse_contiguous ? static_cast<long long>(p.heads_q) * p.seq_q : p.lse_stride_b;
  const long long lse_sh = lse_contiguous ? p.seq_q : p.lse_stride_h;
  rows.lse = p.lse == 0 ? nullptr : reinterpret_cast<float*>(p.lse) + h * lse_sh + (varlen ? q_span.first : b * lse_sb);
  rows.lse_correction =
      p.lse_correction == 0 ? nullptr : reinterpret_cast<const float*>(p.lse_correction) + bhq * p.seq_q;
  rows.len = q_span.len;
  return rows;
}

/// `col_scale`/`col_bias` (per output column, null = 1 / 0) undo V's quantization and smoothing;
/// a row with no visible key is written as zeros (LSE -inf), not as the bias. `Params`: any
/// attention params struct with out_dtype and head_dim_out (AttnParams, AttnFp4Params).
///
/// `staging` (optional): 16 * T::kHeadDim * 2 bytes of shared memory this warp alone may use.
/// With it, the warp's 16 rows go through shared memory and leave as whole 16-byte runs of a row
/// (4-byte stores straight from the accumulator layout touch 8 rows per instruction: 2.9 us per
/// 128-row sm90 tile, NOTES.md sm90 v8); without it, or when the output's strides or width do
/// not allow 16-byte stores, each thread stores its own column pairs.
template <class T, class Params>
__device__ __forceinline__ void store_output(const Params& p, const OutputRows& dst_rows,
                                             const float (&o)[T::kOTiles][4], const RowStats& st,
                                             float log2_p_scale, const float* col_scale, const float* col_bias,
                                             int row0, int lane, char* staging = nullptr) {
  float sum[2], lse[2];
  finish_rows(st, sum, lse, log2_p_scale);
  // The column factors first, all loads in flight at once: loaded inside the store loop, each
  // waited for its own global round trip behind the stores before it (7 us per 128-row sm90
  // tile, more than five main-loop steps: NOTES.md sm90 v8).
  float scale[T::kOTiles][2], bias[T::kOTiles][2];
#pragma unroll
  for (int dc = 0; dc < T::kOTiles; ++dc) {
    const int col = 8 * dc + 2 * (lane % 4);  // col + 1 < the padded head dim the factors cover
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      scale[dc][e] = col_scale != nullptr ? col_scale[col + e] : 1.f;
      bias[dc][e] = col_bias != nullptr ? col_bias[col + e] : 0.f;
    }
  }
  const bool is_bf16 = p.out_dtype == kDtypeBf16;
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) inv[r] = sum[r] > 0.f ? 1.f / sum[r] : 0.f;
  // Rounded as o * inv * scale + bias, one operation at a time (the emulators' order); rows
  // with no visible key are zeros.
  const auto packed = [&](int r, int dc) {
    float x0 = 0.f, x1 = 0.f;
    if (sum[r] > 0.f) {
      x0 = __fadd_rn(__fmul_rn(o[dc][2 * r] * inv[r], scale[dc][0]), bias[dc][0]);
      x1 = __fadd_rn(__fmul_rn(o[dc][2 * r + 1] * inv[r], scale[dc][1]), bias[dc][1]);
    }
    return is_bf16 ? pack_bf162(x0, x1) : pack_half2(x0, x1);
  };
  const auto address = reinterpret_cast<unsigned long long>(dst_rows.out);
  constexpr int kChunks = T::kHeadDim / 8;  // 16-byte runs per row
  if (staging != nullptr && p.head_dim_out == T::kHeadDim && dst_rows.out_stride_s % 8 == 0 && address % 16 == 0) {
    // Row r of the warp at r * kHeadDim * 2 bytes; its 16-byte run c at slot c ^ (r % 8), so
    // that both the 4-byte writes (8 rows, one run) and the 16-byte reads (one row, 8 runs) of a
    // quarter warp hit distinct banks.
    const int warp_row0 = row0 - lane / 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int wr = lane / 4 + 8 * r;
#pragma unroll
      for (int dc = 0; dc < T::kOTiles; ++dc)
        *reinterpret_cast<u32*>(staging + wr * 2 * T::kHeadDim + 16 * (dc ^ (wr % 8)) + 4 * (lane % 4)) =
            packed(r, dc);
    }
    __syncwarp();
    constexpr int kRowsPerPass = 32 / kChunks;
#pragma unroll
    for (int pass = 0; pass < 16 / kRowsPerPass; ++pass) {
      const int wr = pass * kRowsPerPass + lane / kChunks, c = lane % kChunks;
      const uint4 v = *reinterpret_cast<const uint4*>(staging + wr * 2 * T::kHeadDim + 16 * (c ^ (wr % 8)));
      if (warp_row0 + wr < dst_rows.len)
        *reinterpret_cast<uint4*>(dst_rows.out + (warp_row0 + wr) * dst_rows.out_stride_s + 8 * c) = v;
    }
  } else {
    // 4-byte stores need an even row stride and width (torch's allocation is 16-byte aligned).
    const bool paired = (dst_rows.out_stride_s % 2 == 0) && (p.head_dim_out % 2 == 0) && (address % 4 == 0);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      if (row >= dst_rows.len) continue;
      u16* dst = dst_rows.out + row * dst_rows.out_stride_s;
#pragma unroll
      for (int dc = 0; dc < T::kOTiles; ++dc) {
        const int col = 8 * dc + 2 * (lane % 4);
        if (col >= p.head_dim_out) continue;
        const u32 v = packed(r, dc);
        if (paired) {
          *reinterpret_cast<u32*>(dst + col) = v;
        } else {
          dst[col] = static_cast<u16>(v & 0xffffu);
          if (col + 1 < p.head_dim_out) dst[col + 1] = static_cast<u16>(v >> 16);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    if (row < dst_rows.len && dst_rows.lse != nullptr && lane % 4 == 0)
      dst_rows.lse[row] = lse[r] + (dst_rows.lse_correction != nullptr ? dst_rows.lse_correction[row] : 0.f);
  }
}

}  // namespace sageattn
