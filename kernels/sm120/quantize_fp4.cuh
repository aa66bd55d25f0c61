// The sm120 tree's quantizer (SageAttention3, arXiv:2505.11594 §3): one launch turns Q, K and V
// into NVFP4 tiles for the attention kernel. Q loses its per-128-token block mean (the scores
// get q_mean . K^ back), K its channel mean (softmax is unchanged; the LSE gets q . k_mean
// back), V is quantized along keys. docs/ARCHITECTURE.md ("The sm120 FP4 path, exactly") and
// src/sageattn/emulate_fp4.py follow the same steps.
#pragma once

#include "../common/quantize.cuh"
#include "fp4_numeric.cuh"

namespace sageattn {
namespace sm120 {

/// @brief Slot of key p (0..63) in a V^T tile: key 8j+2t+e (the score registers of lane t in
/// tile j) goes where the m16n8k64 A fragment of lane t reads it, so P needs no shuffles:
/// slot 32*(j/4) + 8t + 2*(j%4) + e. A 16-slot scale chunk then holds the keys of two lanes.
__device__ __forceinline__ int fp4_pv_key_slot(int p) {
  const int j = p / 8, t = (p % 8) / 2, e = p % 2;
  return 32 * (j / 4) + 8 * t + 2 * (j % 4) + e;
}

/// @brief NVFP4 of one row chunk (8 elements at d0 of `row`, lane pairs = 16-element groups):
/// stores the 4 code bytes and (even lane of the pair) the scale byte.
__device__ __forceinline__ void store_fp4_chunk(unsigned char* codes_row, unsigned char* sf_row, int d0,
                                                const float (&x)[8]) {
  u32 sf;
  const u32 packed = quantize_fp4_pair(x, sf);
  *reinterpret_cast<u32*>(codes_row + d0 / 2) = packed;
  if ((d0 / 8) % 2 == 0) sf_row[d0 / kSfGroup] = static_cast<unsigned char>(sf);
}

/// @brief Q job: 128 rows of one (b, h, q_block): block mean (or the given sequence mean)
/// removed, NVFP4 per 16 channels; the removed mean goes to q_mean; LSE correction.
template <int kHeadDim>
__device__ __forceinline__ void quantize_q_block_fp4(const QuantFp4Params& p, int job) {
  using G = WarpRows<kHeadDim, 16>;
  __shared__ float col_sum[8][kHeadDim];
  const JobLanes<kHeadDim, 16> j(job, p.q_blocks, p.heads_q);
  const int hkv = j.h / (p.heads_q / p.heads_kv);
  const bool is_bf16 = p.in_dtype == kDtypeBf16;
  const u16* src = rows_of(p.q, p.q_stride_b, p.q_stride_h, p.q_stride_s, 0, j.b, j.h, SeqSpan{0, p.seq_q});
  const int rows = min(kQBlockRows, p.seq_q - j.blk * kQBlockRows);

  float x[G::kPasses][8], sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const int r = j.warp * 16 + i * G::kRowsPerPass + j.row_in_pass;
#pragma unroll
    for (int e = 0; e < 8; ++e) x[i][e] = 0.f;
    if (r < rows) load_row_chunk8(src + (j.blk * kQBlockRows + r) * p.q_stride_s, j.d0, p.head_dim, p.vec_q != 0,
                                  is_bf16, x[i]);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum[e] += x[i][e];
  }
  // LSE correction for K smoothing, from the unsmoothed q: the kernel's scores miss q . k_mean.
  if (p.lse_correction != 0 && p.k_mean != 0) {
    const float* km = reinterpret_cast<const float*>(p.k_mean) +
                      (static_cast<i64>(j.b) * p.heads_kv + hkv) * p.head_dim_padded + j.d0;
#pragma unroll
    for (int i = 0; i < G::kPasses; ++i) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) dot += x[i][e] * km[e];
      dot = sum_over_row_lanes<G::kLanesPerRow>(dot);
      const int r = j.warp * 16 + i * G::kRowsPerPass + j.row_in_pass;
      if (j.chunk == 0 && r < rows)
        reinterpret_cast<float*>(p.lse_correction)[static_cast<i64>(j.bh) * p.seq_q + j.blk * kQBlockRows + r] =
            dot * p.sm_scale;
    }
  }
  // Column sums in a fixed order: lanes of a pass, then warps (deterministic).
#pragma unroll
  for (int e = 0; e < 8; ++e)
#pragma unroll
    for (int o = G::kLanesPerRow; o < 32; o <<= 1) sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], o);
  if (j.row_in_pass == 0)
#pragma unroll
    for (int e = 0; e < 8; ++e) col_sum[j.warp][j.d0 + e] = sum[e];
  __syncthreads();
  float mean[8];
  const float* seq_mean = p.q_seq_mean == 0 ? nullptr
                        : reinterpret_cast<const float*>(p.q_seq_mean) + static_cast<i64>(j.bh) * p.head_dim_padded;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    float total = 0.f;
    for (int w = 0; w < 8; ++w) total += col_sum[w][j.d0 + e];
    mean[e] = seq_mean != nullptr ? seq_mean[j.d0 + e] : total / static_cast<float>(rows);
  }
  if (threadIdx.x < G::kLanesPerRow) {  // warp 0, pass lane 0: one writer per chunk
    float* qm = reinterpret_cast<float*>(p.q_mean) + (static_cast<i64>(j.bh) * p.q_blocks + j.blk) * p.head_dim_padded;
#pragma unroll
    for (int e = 0; e < 8; ++e) qm[j.d0 + e] = mean[e];
  }

  const i64 row0 = (static_cast<i64>(j.bh) * p.q_blocks + j.blk) * kQBlockRows;
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const int r = j.warp * 16 + i * G::kRowsPerPass + j.row_in_pass;
    if (r < rows)  // padded rows stay 0 (never smoothed)
#pragma unroll
      for (int e = 0; e < 8; ++e) x[i][e] -= mean[e];
    store_fp4_chunk(reinterpret_cast<unsigned char*>(p.q_fp4) + (row0 + r) * (kHeadDim / 2),
                    reinterpret_cast<unsigned char*>(p.q_sf) + (row0 + r) * (kHeadDim / kSfGroup), j.d0, x[i]);
  }
}

/// @brief K job: 64 keys of one (b, hkv, k_block), channel mean removed, NVFP4 per 16 channels.
template <int kHeadDim>
__device__ __forceinline__ void quantize_k_block_fp4(const QuantFp4Params& p, int job) {
  using G = WarpRows<kHeadDim, 8>;
  const JobLanes<kHeadDim, 8> j(job, p.k_blocks, p.heads_kv);
  const bool is_bf16 = p.in_dtype == kDtypeBf16;
  const u16* src = rows_of(p.k, p.k_stride_b, p.k_stride_h, p.k_stride_s, 0, j.b, j.h, SeqSpan{0, p.seq_k});
  float mean[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (p.k_mean != 0) {
    const float* m = reinterpret_cast<const float*>(p.k_mean) + static_cast<i64>(j.bh) * p.head_dim_padded + j.d0;
#pragma unroll
    for (int e = 0; e < 8; ++e) mean[e] = m[e];
  }
  const i64 row0 = (static_cast<i64>(j.bh) * p.k_blocks + j.blk) * kKBlockRows;
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const int key = j.warp * 8 + i * G::kRowsPerPass + j.row_in_pass;
    const int s = j.blk * kKBlockRows + key;
    float x[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (s < p.seq_k) {
      load_row_chunk8(src + s * p.k_stride_s, j.d0, p.head_dim, p.vec_k != 0, is_bf16, x);
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] -= mean[e];
    }
    store_fp4_chunk(reinterpret_cast<unsigned char*>(p.k_fp4) + (row0 + key) * (kHeadDim / 2),
                    reinterpret_cast<unsigned char*>(p.k_sf) + (row0 + key) * (kHeadDim / kSfGroup), j.d0, x);
  }
}

/// @brief V job: 64 keys of one (b, hkv, k_block) -> V^T tile [D_pad][32 bytes] in key-slot
/// order, NVFP4 per 16 slots of a channel, scales [D_pad][4].
template <int kHeadDim>
__device__ __forceinline__ void quantize_v_block_fp4(const QuantFp4Params& p, int job) {
  using G = WarpRows<kHeadDim, 8>;
  __shared__ float tile[kHeadDim][kKBlockRows + 1];
  const JobLanes<kHeadDim, 8> j(job, p.k_blocks, p.heads_kv);
  const bool is_bf16 = p.in_dtype == kDtypeBf16;
  const u16* src = rows_of(p.v, p.v_stride_b, p.v_stride_h, p.v_stride_s, 0, j.b, j.h, SeqSpan{0, p.seq_k});
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const int key = j.warp * 8 + i * G::kRowsPerPass + j.row_in_pass;
    const int s = j.blk * kKBlockRows + key;
    float x[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (s < p.seq_k) load_row_chunk8(src + s * p.v_stride_s, j.d0, p.head_dim, p.vec_v != 0, is_bf16, x);
    const int slot = fp4_pv_key_slot(key);
#pragma unroll
    for (int e = 0; e < 8; ++e) tile[j.d0 + e][slot] = x[e];
  }
  __syncthreads();
  // Thread pairs take 16 slots of one channel (8 each): kHeadDim * 8 half-groups.
  const i64 tile0 = (static_cast<i64>(j.bh) * p.k_blocks + j.blk) * kHeadDim;
  for (int idx = threadIdx.x; idx < kHeadDim * 8; idx += kQuantThreads) {
    const int d = idx / 8, slot0 = (idx % 8) * 8;
    float x[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = tile[d][slot0 + e];
    store_fp4_chunk(reinterpret_cast<unsigned char*>(p.v_fp4) + (tile0 + d) * (kKBlockRows / 2),
                    reinterpret_cast<unsigned char*>(p.v_sf) + (tile0 + d) * (kKBlockRows / kSfGroup), slot0, x);
  }
}

/// @brief Blocks [0, nq) quantize Q, the next nk K, the last nk V (nq = B*Hq*q_blocks,
/// nk = B*Hkv*k_blocks); 256 threads.
template <int kHeadDim>
__device__ __forceinline__ void quantize_qkv_fp4(const QuantFp4Params& p) {
  const int nq = p.batch * p.heads_q * p.q_blocks;
  const int nk = p.batch * p.heads_kv * p.k_blocks;
  const int job = blockIdx.x;
  if (job < nq) {
    quantize_q_block_fp4<kHeadDim>(p, job);
  } else if (job < nq + nk) {
    quantize_k_block_fp4<kHeadDim>(p, job - nq);
  } else {
    quantize_v_block_fp4<kHeadDim>(p, job - nq - nk);
  }
}

/// @brief Unit-test kernel: 8 elements per thread through the quantizer's conversions.
__device__ __forceinline__ void convert_fp4_e4m3(const Fp4ConvertParams& p) {
  const int i0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (i0 >= p.n) return;
  const float* src = reinterpret_cast<const float*>(p.src) + i0;
  float x[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = src[e];
  *reinterpret_cast<u32*>(reinterpret_cast<unsigned char*>(p.e2m1) + i0 / 2) = pack_e2m1x8(x);
#pragma unroll
  for (int e = 0; e < 8; ++e) reinterpret_cast<unsigned char*>(p.e4m3)[i0 + e] = static_cast<unsigned char>(e4m3_code(x[e]));
}

}  // namespace sm120
}  // namespace sageattn
