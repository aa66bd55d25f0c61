// The sm120 tree: SageAttention3 (arXiv:2505.11594), NVFP4 microscaling attention with both
// products through the block-scaled FP4 mma.sync (kind::mxf4nvf4, m16n8k64), for sm_120a
// (Blackwell consumer). The same source builds for sm_90 with exact software FP4 (fp4_numeric.cuh),
// which is how the tiling, masks, softmax, scales and epilogue are tested on an H100.
// Roles: quantize_fp4.cuh (Q/K/V to NVFP4) -> load (here) -> dS and S = Q^K^T (mma_qk.cuh) ->
// online softmax (common) -> P to FP4, O += P^V^ (mma_pv.cuh) -> common epilogue.
#pragma once

#include "../common/epilogue_mma_sync.cuh"
#include "../common/mma_sm80.cuh"
#include "mma_pv.cuh"
#include "quantize_fp4.cuh"

namespace sageattn {
namespace sm120 {

// P's first level: the row max maps to 448 * 6 = 2688 (log2 of it, as the emulator's fp32).
constexpr float kLog2PScale = 11.39231742277876f;

/// @brief Copy kBytes (a multiple of 16) of a contiguous global tile to shared memory.
template <int kBytes, int kThreads>
__device__ __forceinline__ void copy_tile_async(u32 smem_dst, const char* src) {
  static_assert(kBytes % 16 == 0, "16-byte chunks");
  for (int i = threadIdx.x; i < kBytes / 16; i += kThreads) cp_async_16(smem_dst + 16 * i, src + 16 * i);
}

/// Grid (q_blocks * 2, Hq, B), T::kThreads threads, T::kSmemBytes dynamic shared memory.
template <int kHeadDim>
__device__ __forceinline__ void attention(const AttnFp4Params& p) {
  using T = Traits<kHeadDim>;
  extern __shared__ __align__(128) char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kQSplit = kQBlockRows / T::kBlockQ;
  const int n_ctas = p.q_blocks * kQSplit;
  // Causal: the last query blocks see the most keys; launch them first.
  const int cta = p.causal ? n_ctas - 1 - static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x);
  const int qb = cta / kQSplit, h = blockIdx.y, b = blockIdx.z;
  const int hkv = h / (p.heads_q / p.heads_kv);
  const int q0 = cta * T::kBlockQ;
  if (q0 >= p.seq_q) return;
  const long long row0 = q0 + warp * 16 + lane / 4;

  // Visible key blocks, and the first that needs masks (a partial last block or the diagonal).
  int n_blocks = (p.seq_k + T::kBlockK - 1) / T::kBlockK;
  long long first_masked = p.seq_k / T::kBlockK;
  if (p.causal) {
    const long long last_visible = q0 + T::kBlockQ - 1 + p.causal_offset;
    n_blocks = last_visible < 0 ? 0 : static_cast<int>(min(static_cast<long long>(n_blocks), last_visible / T::kBlockK + 1));
    const long long first_row_limit = q0 + p.causal_offset;
    first_masked = min(first_masked, first_row_limit < 0 ? 0 : (first_row_limit + 1) / T::kBlockK);
  }

  const long long bhq = static_cast<long long>(b) * p.heads_q + h;
  const long long bhk = static_cast<long long>(b) * p.heads_kv + hkv;
  const long long q_row0 = bhq * p.q_blocks * kQBlockRows + q0;
  const char* k_codes = reinterpret_cast<const char*>(p.k_fp4) + bhk * p.k_blocks * T::kBlockK * T::kRowBytes;
  const char* k_scales = reinterpret_cast<const char*>(p.k_sf) + bhk * p.k_blocks * T::kBlockK * T::kRowScales;
  const char* v_codes = reinterpret_cast<const char*>(p.v_fp4) + bhk * p.k_blocks * kHeadDim * (T::kBlockK / 2);
  const char* v_scales = reinterpret_cast<const char*>(p.v_sf) + bhk * p.k_blocks * kHeadDim * (T::kBlockK / kSfGroup);
  const u32 base = smem_addr(smem);
  copy_tile_async<T::kBlockQ * T::kRowBytes, T::kThreads>(
      base + T::kQCodes, reinterpret_cast<const char*>(p.q_fp4) + q_row0 * T::kRowBytes);
  copy_tile_async<T::kBlockQ * T::kRowScales, T::kThreads>(
      base + T::kQScales, reinterpret_cast<const char*>(p.q_sf) + q_row0 * T::kRowScales);
  copy_tile_async<kHeadDim * 4, T::kThreads>(
      base + T::kQMean, reinterpret_cast<const char*>(p.q_mean) + (bhq * p.q_blocks + qb) * kHeadDim * 4);
  cp_async_commit();

  float o[T::kOTiles][4];
#pragma unroll
  for (int dc = 0; dc < T::kOTiles; ++dc) o[dc][0] = o[dc][1] = o[dc][2] = o[dc][3] = 0.f;
  RowStats st;
  for (int kb = 0; kb < n_blocks; ++kb) {
    copy_tile_async<T::kBlockK * T::kRowBytes, T::kThreads>(base + T::kKCodes, k_codes + kb * T::kBlockK * T::kRowBytes);
    copy_tile_async<T::kBlockK * T::kRowScales, T::kThreads>(base + T::kKScales,
                                                             k_scales + kb * T::kBlockK * T::kRowScales);
    copy_tile_async<kHeadDim * T::kBlockK / 2, T::kThreads>(base + T::kVCodes, v_codes + kb * kHeadDim * (T::kBlockK / 2));
    copy_tile_async<kHeadDim * T::kBlockK / kSfGroup, T::kThreads>(
        base + T::kVScales, v_scales + kb * kHeadDim * (T::kBlockK / kSfGroup));
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    q_mean_dot_keys<T>(smem);
    __syncthreads();
    float s[T::kKTiles][4];
    scores_fp4<T>(s, smem, warp, lane, p.sm_scale_log2e, kb >= first_masked, kb * T::kBlockK, row0, p.seq_k,
                  p.causal != 0, p.causal_offset);
    float rescale[2];
    online_softmax_step<T::kKTiles>(s, st, rescale, kLog2PScale);
    rescale_rows<T::kOTiles>(o, rescale);
    mma_pv_fp4<T>(o, s, smem, lane);
    __syncthreads();  // the next block's copies overwrite this stage
  }
  cp_async_wait<0>();

  OutputRows rows;
  rows.out = reinterpret_cast<u16*>(p.out) + b * p.out_stride_b + h * p.out_stride_h;
  rows.out_stride_s = p.out_stride_s;
  const bool lse_contiguous = p.lse_stride_b == 0 && p.lse_stride_h == 0;
  const long long lse_sb = lse_contiguous ? static_cast<long long>(p.heads_q) * p.seq_q : p.lse_stride_b;
  const long long lse_sh = lse_contiguous ? p.seq_q : p.lse_stride_h;
  rows.lse = p.lse == 0 ? nullptr : reinterpret_cast<float*>(p.lse) + b * lse_sb + h * lse_sh;
  rows.lse_correction =
      p.lse_correction == 0 ? nullptr : reinterpret_cast<const float*>(p.lse_correction) + bhq * p.seq_q;
  rows.len = p.seq_q;
  store_output<T>(p, rows, o, st, kLog2PScale, nullptr, nullptr, static_cast<int>(row0), lane);
}

}  // namespace sm120
}  // namespace sageattn
