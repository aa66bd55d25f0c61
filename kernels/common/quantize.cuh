// Quantization kernels shared by the INT8-QK trees: per-channel K mean (K smoothing) and one
// fused launch that quantizes Q and K to INT8 and converts V to fp16, into padded contiguous
// buffers laid out for the attention kernels. docs/ARCHITECTURE.md states the math exactly;
// the emulator (src/sageattn/emulate.py) follows the same steps.
//
// Scale granularity lives here only: the attention kernel always reads one Q scale per
// (warp, lane/4) and one K scale per (key block, lane%4). "per_thread" gives those slots
// distinct values (the rows/keys one thread's mma fragment owns, SageAttention2 §3);
// "per_warp" writes the same value into all slots of a warp (Q) or key block (K).
#pragma once

#include "numeric.cuh"
#include "params.h"

namespace sageattn {

constexpr int kQuantThreads = 256;
constexpr int kQBlockRows = 128;  // query rows per attention CTA (8 warps x 16 rows)
constexpr int kKBlockRows = 64;   // keys per attention key block

/// @brief 8 consecutive elements d0..d0+7 of a 16-bit row as fp32; zero past `dim`.
/// `vec` promises 16-byte alignment and dim % 8 == 0.
__device__ __forceinline__ void load_row_chunk8(const u16* row, int d0, int dim, bool vec,
                                                bool is_bf16, float (&x)[8]) {
  if (vec && d0 < dim) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + d0);
    const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = bits16_to_float(static_cast<u16>(w[i] & 0xffffu), is_bf16);
      x[2 * i + 1] = bits16_to_float(static_cast<u16>(w[i] >> 16), is_bf16);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = d0 + i < dim ? bits16_to_float(row[d0 + i], is_bf16) : 0.f;
  }
}

/// @brief mean[b, h, :] = mean over tokens of K (fp32). Grid (D_pad/64, Hkv, B), 256 threads:
/// 8 lanes cover 64 channels, 32 row lanes stride the tokens; fixed-order reduction, so the
/// result is deterministic.
__device__ __forceinline__ void k_channel_mean(const KMeanParams& p) {
  __shared__ float partial[32][65];
  const int chunk = threadIdx.x % 8, row_lane = threadIdx.x / 8;
  const int d0 = blockIdx.x * 64 + chunk * 8;
  const int h = blockIdx.y, b = blockIdx.z;
  const bool is_bf16 = p.in_dtype == kDtypeBf16;
  const u16* base = reinterpret_cast<const u16*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
  for (int s = row_lane; s < p.seq; s += 32) {
    float x[8];
    load_row_chunk8(base + s * p.k_stride_s, d0, p.head_dim, p.vectorized != 0, is_bf16, x);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += x[i];
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) partial[row_lane][chunk * 8 + i] = acc[i];
  __syncthreads();
  if (threadIdx.x < 64) {
    float sum = 0.f;
    for (int r = 0; r < 32; ++r) sum += partial[r][threadIdx.x];
    float* mean = reinterpret_cast<float*>(p.mean);
    mean[(static_cast<i64>(b) * p.heads + h) * p.head_dim_padded + blockIdx.x * 64 + threadIdx.x] =
        sum / static_cast<float>(p.seq);
  }
}

/// @brief Max over the `kLanes` consecutive lanes that share a row (kLanes a power of two).
template <int kLanes>
__device__ __forceinline__ float max_over_row_lanes(float x) {
#pragma unroll
  for (int o = 1; o < kLanes; o <<= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <int kLanes>
__device__ __forceinline__ float sum_over_row_lanes(float x) {
#pragma unroll
  for (int o = 1; o < kLanes; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

/// @brief Quantize 8 values with one inverse scale and store them as 8 bytes.
__device__ __forceinline__ void store_int8x8(signed char* dst, const float (&x)[8], float inv) {
  u32 w[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < 8; ++i)
    w[i / 4] |= (static_cast<u32>(quantize_int8(x[i] * inv)) & 0xffu) << (8 * (i % 4));
  *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
}

__device__ __forceinline__ float inverse_int8_scale(float amax) {
  return amax > 0.f ? 127.f / amax : 0.f;
}

/// Geometry of one warp's rows: each row is kHeadDim/8 chunks of 8 elements, one lane a chunk.
template <int kHeadDim, int kRowsPerWarp>
struct WarpRows {
  static constexpr int kLanesPerRow = kHeadDim / 8;         // 8 or 16
  static constexpr int kRowsPerPass = 32 / kLanesPerRow;     // 4 or 2
  static constexpr int kPasses = kRowsPerWarp / kRowsPerPass;
  static_assert(kPasses >= 1 && kRowsPerWarp % kRowsPerPass == 0, "rows per warp");
};

/// @brief Q job: 128 rows (8 warps x 16) of one (b, h, q_block).
template <int kHeadDim>
__device__ __forceinline__ void quantize_q_block(const QuantParams& p, int job) {
  using G = WarpRows<kHeadDim, 16>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int qb = job % p.q_blocks, bh = job / p.q_blocks;
  const int h = bh % p.heads_q, b = bh / p.heads_q;
  const int hkv = h / (p.heads_q / p.heads_kv);
  const int chunk = lane % G::kLanesPerRow, row_in_pass = lane / G::kLanesPerRow;
  const int d0 = chunk * 8;
  const bool is_bf16 = p.in_dtype == kDtypeBf16;
  const u16* src = reinterpret_cast<const u16*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;

  float x[G::kPasses][8], row_amax[G::kPasses];
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const int s = qb * kQBlockRows + warp * 16 + i * G::kRowsPerPass + row_in_pass;
    if (s < p.seq_q) {
      load_row_chunk8(src + s * p.q_stride_s, d0, p.head_dim, p.vec_q != 0, is_bf16, x[i]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) x[i][e] = 0.f;
    }
    float m = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(x[i][e]));
    row_amax[i] = max_over_row_lanes<G::kLanesPerRow>(m);
  }

  // Group amax: per-thread pairs row r with r+8 (same lane, pass i + kPasses/2);
  // per-warp takes all 16 rows.
  float group_amax[G::kPasses / 2];
  float warp_amax = 0.f;
#pragma unroll
  for (int i = 0; i < G::kPasses / 2; ++i) {
    group_amax[i] = fmaxf(row_amax[i], row_amax[i + G::kPasses / 2]);
    warp_amax = fmaxf(warp_amax, group_amax[i]);
  }
#pragma unroll
  for (int o = G::kLanesPerRow; o < 32; o <<= 1)
    warp_amax = fmaxf(warp_amax, __shfl_xor_sync(0xffffffffu, warp_amax, o));
  const bool per_warp = p.granularity == kGranPerWarp;

  const i64 block_row0 = (static_cast<i64>(bh) * p.q_blocks + qb) * kQBlockRows;
  signed char* dst = reinterpret_cast<signed char*>(p.q_int8);
  float* scales = reinterpret_cast<float*>(p.q_scale) + (static_cast<i64>(bh) * p.q_blocks + qb) * 64;
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const float amax = per_warp ? warp_amax : group_amax[i % (G::kPasses / 2)];
    const int r = i * G::kRowsPerPass + row_in_pass;  // row within the warp's 16
    store_int8x8(dst + (block_row0 + warp * 16 + r) * kHeadDim + d0, x[i], inverse_int8_scale(amax));
    if (chunk == 0 && r < 8) scales[warp * 8 + r] = (amax / 127.f) * p.sm_scale_log2e;
  }

  // LSE correction for K smoothing: the kernel's scores miss q . mean_k * sm_scale.
  if (p.lse_correction != 0 && p.k_mean != 0) {
    const float* mean = reinterpret_cast<const float*>(p.k_mean) +
                        (static_cast<i64>(b) * p.heads_kv + hkv) * p.head_dim_padded + d0;
#pragma unroll
    for (int i = 0; i < G::kPasses; ++i) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) dot += x[i][e] * mean[e];
      dot = sum_over_row_lanes<G::kLanesPerRow>(dot);
      const int s = qb * kQBlockRows + warp * 16 + i * G::kRowsPerPass + row_in_pass;
      if (chunk == 0 && s < p.seq_q)
        reinterpret_cast<float*>(p.lse_correction)[static_cast<i64>(bh) * p.seq_q + s] =
            dot * p.sm_scale;
    }
  }
}

/// @brief K job: 64 keys (8 warps x 8) of one (b, hkv, k_block), mean-subtracted.
template <int kHeadDim>
__device__ __forceinline__ void quantize_k_block(const QuantParams& p, int job) {
  using G = WarpRows<kHeadDim, 8>;
  __shared__ float key_amax[kKBlockRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kb = job % p.k_blocks, bh = job / p.k_blocks;
  const int h = bh % p.heads_kv, b = bh / p.heads_kv;
  const int chunk = lane % G::kLanesPerRow, row_in_pass = lane / G::kLanesPerRow;
  const int d0 = chunk * 8;
  const bool is_bf16 = p.in_dtype == kDtypeBf16;
  const u16* src = reinterpret_cast<const u16*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  float mean[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (p.k_mean != 0) {
    const float* m = reinterpret_cast<const float*>(p.k_mean) +
                     static_cast<i64>(bh) * p.head_dim_padded + d0;
#pragma unroll
    for (int e = 0; e < 8; ++e) mean[e] = m[e];
  }

  float x[G::kPasses][8];
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const int key = warp * 8 + i * G::kRowsPerPass + row_in_pass;
    const int s = kb * kKBlockRows + key;
    if (s < p.seq_k) {
      load_row_chunk8(src + s * p.k_stride_s, d0, p.head_dim, p.vec_k != 0, is_bf16, x[i]);
#pragma unroll
      for (int e = 0; e < 8; ++e) x[i][e] -= mean[e];  // padded columns: 0 - 0
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) x[i][e] = 0.f;
    }
    float m = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(x[i][e]));
    m = max_over_row_lanes<G::kLanesPerRow>(m);
    if (chunk == 0) key_amax[key] = m;
  }
  __syncthreads();

  // Per-thread: keys with equal (key % 8) / 2 share a scale (the columns lane%4 owns);
  // per-warp: the whole block shares one.
  const bool per_warp = p.granularity == kGranPerWarp;
  const i64 block_row0 = (static_cast<i64>(bh) * p.k_blocks + kb) * kKBlockRows;
  signed char* dst = reinterpret_cast<signed char*>(p.k_int8);
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const int key = warp * 8 + i * G::kRowsPerPass + row_in_pass;
    float amax = 0.f;
    for (int k = 0; k < kKBlockRows; ++k)
      if (per_warp || ((k % 8) / 2 == (key % 8) / 2)) amax = fmaxf(amax, key_amax[k]);
    store_int8x8(dst + (block_row0 + key) * kHeadDim + d0, x[i], inverse_int8_scale(amax));
  }
  if (threadIdx.x < 4) {
    float amax = 0.f;
    for (int k = 0; k < kKBlockRows; ++k)
      if (per_warp || (k % 8) / 2 == static_cast<int>(threadIdx.x)) amax = fmaxf(amax, key_amax[k]);
    reinterpret_cast<float*>(p.k_scale)[(static_cast<i64>(bh) * p.k_blocks + kb) * 4 + threadIdx.x] =
        amax / 127.f;
  }
}

/// @brief V job: 64 rows of one (b, hkv, k_block) to fp16, zero-padded.
template <int kHeadDim>
__device__ __forceinline__ void convert_v_block(const QuantParams& p, int job) {
  using G = WarpRows<kHeadDim, 8>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kb = job % p.k_blocks, bh = job / p.k_blocks;
  const int h = bh % p.heads_kv, b = bh / p.heads_kv;
  const int chunk = lane % G::kLanesPerRow, row_in_pass = lane / G::kLanesPerRow;
  const int d0 = chunk * 8;
  const bool is_bf16 = p.in_dtype == kDtypeBf16;
  const u16* src = reinterpret_cast<const u16*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  const i64 block_row0 = (static_cast<i64>(bh) * p.k_blocks + kb) * kKBlockRows;
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const int key = warp * 8 + i * G::kRowsPerPass + row_in_pass;
    const int s = kb * kKBlockRows + key;
    float x[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (s < p.seq_k) load_row_chunk8(src + s * p.v_stride_s, d0, p.head_dim, p.vec_v != 0, is_bf16, x);
    const uint4 out = make_uint4(pack_half2(x[0], x[1]), pack_half2(x[2], x[3]),
                                 pack_half2(x[4], x[5]), pack_half2(x[6], x[7]));
    *reinterpret_cast<uint4*>(reinterpret_cast<u16*>(p.v_fp16) + (block_row0 + key) * kHeadDim + d0) = out;
  }
}

/// @brief One launch for all three: blocks [0, nq) quantize Q, the next nk quantize K, the
/// last nk convert V (nq = B*Hq*q_blocks, nk = B*Hkv*k_blocks).
template <int kHeadDim>
__device__ __forceinline__ void quantize_qk_int8_v_fp16(const QuantParams& p) {
  const int nq = p.batch * p.heads_q * p.q_blocks;
  const int nk = p.batch * p.heads_kv * p.k_blocks;
  const int job = blockIdx.x;
  if (job < nq) {
    quantize_q_block<kHeadDim>(p, job);
  } else if (job < nq + nk) {
    quantize_k_block<kHeadDim>(p, job - nq);
  } else {
    convert_v_block<kHeadDim>(p, job - nq - nk);
  }
}

}  // namespace sageattn
