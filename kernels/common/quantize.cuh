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

#include "grid_dependency.cuh"
#include "numeric.cuh"
#include "params.h"

namespace sageattn {

constexpr int kQuantThreads = 256;
constexpr int kQBlockRows = 128;  // query rows per attention CTA (8 warps x 16 rows)
constexpr int kKBlockRows = 64;   // keys per attention key block

/// @brief Where sequence b starts (token index in the source) and how long it is: packed varlen
/// input when `cu_seqlens` (int32, B+1 offsets) is set, else the dense length.
struct SeqSpan {
  long long first;
  int len;
};

__device__ __forceinline__ SeqSpan seq_span(unsigned long long cu_seqlens, int b, int dense_len) {
  if (cu_seqlens == 0) return {0, dense_len};
  const int* cu = reinterpret_cast<const int*>(cu_seqlens);
  return {cu[b], cu[b + 1] - cu[b]};
}

/// @brief Row 0 of (b, h) in a 16-bit source: batch stride for dense input, token offset for varlen.
__device__ __forceinline__ const u16* rows_of(unsigned long long base, long long stride_b, long long stride_h,
                                              long long stride_s, unsigned long long cu_seqlens, int b, int h,
                                              const SeqSpan& span) {
  const u16* p = reinterpret_cast<const u16*>(base) + h * stride_h;
  return cu_seqlens == 0 ? p + b * stride_b : p + span.first * stride_s;
}

/// @brief 8 consecutive 16-bit elements d0..d0+7 of a row as raw bits (x in bits 0..15 of .x);
/// zero past `dim`. `vec` promises 16-byte alignment and dim % 8 == 0. Split from the
/// conversion so callers can issue every load of a job before using any (bytes in flight).
__device__ __forceinline__ uint4 load_row_bits8(const u16* row, int d0, int dim, bool vec) {
  if (vec) return d0 < dim ? *reinterpret_cast<const uint4*>(row + d0) : make_uint4(0u, 0u, 0u, 0u);
  u32 w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const u32 lo = d0 + 2 * i < dim ? row[d0 + 2 * i] : 0u;
    const u32 hi = d0 + 2 * i + 1 < dim ? row[d0 + 2 * i + 1] : 0u;
    w[i] = lo | (hi << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

/// @brief 8 packed 16-bit values (fp16 or bf16, exact) -> fp32; zero bits give +0.
__device__ __forceinline__ void bits8_to_float(const uint4& raw, bool is_bf16, float (&x)[8]) {
  const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = bits16_to_float(static_cast<u16>(w[i] & 0xffffu), is_bf16);
    x[2 * i + 1] = bits16_to_float(static_cast<u16>(w[i] >> 16), is_bf16);
  }
}

/// @brief 8 consecutive elements d0..d0+7 of a 16-bit row as fp32; zero past `dim`.
__device__ __forceinline__ void load_row_chunk8(const u16* row, int d0, int dim, bool vec,
                                                bool is_bf16, float (&x)[8]) {
  bits8_to_float(load_row_bits8(row, d0, dim, vec), is_bf16, x);
}

/// Running per-channel sum / min / max of 8 consecutive channels over the rows added in turn.
struct ChannelRun8 {
  float sum[8], lo[8], hi[8];
  __device__ __forceinline__ ChannelRun8() {
    const float inf = __int_as_float(0x7f800000);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum[i] = 0.f, lo[i] = inf, hi[i] = -inf;
  }
  __device__ __forceinline__ void add(const uint4& raw, bool is_bf16) {
    float x[8];
    bits8_to_float(raw, is_bf16, x);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum[i] += x[i], lo[i] = fminf(lo[i], x[i]), hi[i] = fmaxf(hi[i], x[i]);
  }
  /// Into part[0 / 1 / 2][row_lane][c0 .. c0 + 7] (shared partials: sum, min, max).
  template <class Partials>
  __device__ __forceinline__ void store(Partials& part, int row_lane, int c0) const {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      part[0][row_lane][c0 + i] = sum[i];
      part[1][row_lane][c0 + i] = lo[i];
      part[2][row_lane][c0 + i] = hi[i];
    }
  }
};

/// @brief Token of sample i (of n) of a sequence of `len` > n tokens: the floor of a point in the
/// i-th of n equal strata, at a fixed pseudo-random offset inside it (a golden-ratio hash of i),
/// so a periodic pattern along the sequence (rotary embeddings) cannot alias with the sample.
/// Exact integer math (n <= 65536: no overflow), mirrored by emulate.sampled_tokens.
__device__ __forceinline__ int sampled_token(int i, int len, int n) {
  const unsigned long long offset = (static_cast<unsigned>(i) * 2654435769u) >> 22;  // [0, 1024)
  return static_cast<int>((static_cast<unsigned long long>(i) * 1024u + offset) * static_cast<unsigned>(len) /
                          (static_cast<unsigned long long>(n) * 1024u));
}

/// @brief Per-channel mean / min / max over tokens (fp32, (B, H, D_pad) each; null outputs
/// skipped). Grid (D_pad/64, H, B), 256 threads: 8 lanes cover 64 channels, 32 row lanes stride
/// the tokens; fixed-order reduction, so the result is deterministic.
///
/// Each row lane sums its rows (row_lane, row_lane + 32, ...) in that order; the loop fetches
/// kStatsBatch of them before adding any, so a thread keeps 128 bytes in flight instead of one
/// 16-byte load per add (the adds, and so the bits of the mean, are unchanged).
///
/// `sample_tokens` n > 0 and a sequence longer than n: the rows are the n sampled tokens
/// (sampled_token, in sample order) and the mean divides by n. The K mean: any per-channel
/// vector subtracted from every key leaves the softmax as it was, so a sample costs nothing but
/// a little smoothing (NOTES.md "K mean from a sample"). V's min/max (and mean): the quantize
/// launch sets each channel's scale from a margin times the sample's amax and flags the blocks
/// whose codes saturate, whose heads the requantize launch redoes exactly (v_channel_bound).
constexpr int kStatsBatch = 8;

__device__ __forceinline__ void channel_stats(const ChannelStatsParams& p) {
  __shared__ float partial[3][32][65];
  allow_next_grid_to_start();  // the statistics of V need none of K's
  const int chunk = threadIdx.x % 8, row_lane = threadIdx.x / 8;
  const int d0 = blockIdx.x * 64 + chunk * 8;
  const int h = blockIdx.y, b = blockIdx.z;
  const bool is_bf16 = p.in_dtype == kDtypeBf16, vec = p.vectorized != 0;
  const SeqSpan span = seq_span(p.cu_seqlens, b, p.seq);
  const u16* base = rows_of(p.src, p.src_stride_b, p.src_stride_h, p.src_stride_s, p.cu_seqlens, b, h, span);
  const float inf = __int_as_float(0x7f800000);
  const bool sampled = p.sample_tokens > 0 && p.sample_tokens < span.len;
  const int rows = sampled ? p.sample_tokens : span.len;
  ChannelRun8 run;
  for (int s0 = row_lane; s0 < rows; s0 += 32 * kStatsBatch) {
    uint4 raw[kStatsBatch];
#pragma unroll
    for (int r = 0; r < kStatsBatch; ++r) {
      const int i = s0 + 32 * r;
      const int s = sampled ? sampled_token(i, span.len, rows) : i;
      raw[r] = i < rows ? load_row_bits8(base + s * p.src_stride_s, d0, p.head_dim, vec) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int r = 0; r < kStatsBatch; ++r) {
      if (s0 + 32 * r >= rows) break;
      run.add(raw[r], is_bf16);
    }
  }
  run.store(partial, row_lane, chunk * 8);
  __syncthreads();
  if (threadIdx.x < 64) {
    float total = 0.f, mn = inf, mx = -inf;
    for (int r = 0; r < 32; ++r) {
      total += partial[0][r][threadIdx.x];
      mn = fminf(mn, partial[1][r][threadIdx.x]);
      mx = fmaxf(mx, partial[2][r][threadIdx.x]);
    }
    const i64 i = (static_cast<i64>(b) * p.heads + h) * p.head_dim_padded + blockIdx.x * 64 + threadIdx.x;
    // An empty (varlen) sequence has mean 0 and min/max +-inf (its V scale becomes 0).
    if (p.mean != 0) reinterpret_cast<float*>(p.mean)[i] = rows > 0 ? total / static_cast<float>(rows) : 0.f;
    if (p.minimum != 0) reinterpret_cast<float*>(p.minimum)[i] = mn;
    if (p.maximum != 0) reinterpret_cast<float*>(p.maximum)[i] = mx;
  }
  wait_for_previous_grid();  // reads nothing of the previous launch: only ends after it
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

/// @brief 8 values quantized with one inverse scale, as 8 bytes (element i in byte i).
///
/// The values are their group's own (|x| <= amax, inv = 127/amax rounded), so x * inv is at
/// most 127 (1 + 2^-24) in magnitude and rounds into [-127, 127]: the conversion's saturation
/// is all the clamping needed, one instruction a value instead of three. Only inv = +inf
/// (amax < 127 / FLT_MAX) gives +-inf, where quantize_int8's clamp keeps -127 (saturation
/// alone would give -128); that rare group takes the clamped conversion. NaN gives 0 in both.
__device__ __forceinline__ uint2 pack_int8x8(const float (&x)[8], float inv) {
  u32 w[2] = {0u, 0u};
  if (inv <= 3.40282347e38f) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      w[i / 4] |= (static_cast<u32>(round_saturate_int8(x[i] * inv)) & 0xffu) << (8 * (i % 4));
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      w[i / 4] |= (static_cast<u32>(quantize_int8(x[i] * inv)) & 0xffu) << (8 * (i % 4));
  }
  return make_uint2(w[0], w[1]);
}

/// @brief Quantize 8 values with one inverse scale and store them as 8 bytes.
__device__ __forceinline__ void store_int8x8(signed char* dst, const float (&x)[8], float inv) {
  *reinterpret_cast<uint2*>(dst) = pack_int8x8(x, inv);
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

/// Which block of which (b, h) a quantizer job covers, and where this thread works in it: its
/// warp, and the 8-element chunk of each row its lane loads.
template <int kHeadDim, int kRowsPerWarp>
struct JobLanes {
  using G = WarpRows<kHeadDim, kRowsPerWarp>;
  int warp, blk, bh, h, b, chunk, row_in_pass, d0;
  __device__ __forceinline__ JobLanes(int job, int blocks, int heads) {
    const int lane = threadIdx.x % 32;
    warp = threadIdx.x / 32;
    // Unsigned: a signed division by a run-time divisor costs twice the instructions.
    const unsigned bh_u = static_cast<unsigned>(job) / static_cast<unsigned>(blocks);
    blk = job - static_cast<int>(bh_u) * blocks, bh = static_cast<int>(bh_u);
    const unsigned b_u = bh_u / static_cast<unsigned>(heads);
    h = bh - static_cast<int>(b_u) * heads, b = static_cast<int>(b_u);
    chunk = lane % G::kLanesPerRow, row_in_pass = lane / G::kLanesPerRow;
    d0 = chunk * 8;
  }
};

/// @brief Raw bits of this lane's chunk of each pass's row (zero for rows past `len`), all
/// loads issued before any is used: kPasses x 16 bytes in flight per thread.
template <class G>
__device__ __forceinline__ void load_job_rows(const u16* src, long long stride_s, int first_row,
                                              int len, int d0, int dim, bool vec, uint4 (&raw)[G::kPasses]) {
  const u16* row = src + first_row * stride_s;  // one 64-bit product; then a pointer step a pass
  const long long pass_stride = G::kRowsPerPass * stride_s;
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i, row += pass_stride) {
    const int s = first_row + i * G::kRowsPerPass;
    raw[i] = s < len ? load_row_bits8(row, d0, dim, vec) : make_uint4(0u, 0u, 0u, 0u);
  }
}

/// The amax of each Q scale group of one warp's 16 rows (raw bits as load_job_rows lays them
/// out): per-thread groups pair row r with r + 8 (same lane, pass i + kPasses/2); per-warp takes
/// all 16 rows. Rows past the end are +0.
template <class G>
struct QScaleGroups {
  float group[G::kPasses / 2];  // group i % (kPasses/2) of pass i
  float warp;

  __device__ __forceinline__ QScaleGroups(const uint4 (&raw)[G::kPasses], bool is_bf16) {
    float row_amax[G::kPasses];
#pragma unroll
    for (int i = 0; i < G::kPasses; ++i) {
      float x[8];
      bits8_to_float(raw[i], is_bf16, x);
      float m = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(x[e]));
      row_amax[i] = max_over_row_lanes<G::kLanesPerRow>(m);
    }
    warp = 0.f;
#pragma unroll
    for (int i = 0; i < G::kPasses / 2; ++i) {
      group[i] = fmaxf(row_amax[i], row_amax[i + G::kPasses / 2]);
      warp = fmaxf(warp, group[i]);
    }
#pragma unroll
    for (int o = G::kLanesPerRow; o < 32; o <<= 1) warp = fmaxf(warp, __shfl_xor_sync(0xffffffffu, warp, o));
  }

  /// The amax that scales pass i's row.
  __device__ __forceinline__ float of_pass(int i, bool per_warp) const {
    return per_warp ? warp : group[i % (G::kPasses / 2)];
  }
};

/// @brief Q job: 128 rows (8 warps x 16) of one (b, h, q_block); kBf16: the source format.
template <int kHeadDim, bool kBf16>
__device__ __forceinline__ void quantize_q_block(const QuantParams& p, const JobLanes<kHeadDim, 16>& j,
                                                 const SeqSpan& span) {
  using G = WarpRows<kHeadDim, 16>;
  const int warp = j.warp, qb = j.blk, bh = j.bh, h = j.h, b = j.b, chunk = j.chunk,
            row_in_pass = j.row_in_pass, d0 = j.d0;
  const int hkv = h / (p.heads_q / p.heads_kv);
  constexpr bool is_bf16 = kBf16;
  const u16* src = rows_of(p.q, p.q_stride_b, p.q_stride_h, p.q_stride_s, p.cu_seqlens_q, b, h, span);

  uint4 raw[G::kPasses];
  load_job_rows<G>(src, p.q_stride_s, qb * kQBlockRows + warp * 16 + row_in_pass, span.len, d0,
                   p.head_dim, p.vec_q != 0, raw);
  wait_for_previous_grid();  // K's channel mean (LSE correction); the loads above are in flight
  // Only the raw bits stay live (32 registers, not 64 floats); each use converts again (exact).
  const QScaleGroups<G> amaxes(raw, is_bf16);
  const bool per_warp = p.granularity == kGranPerWarp;

  const i64 block_row0 = (static_cast<i64>(bh) * p.q_blocks + qb) * kQBlockRows;
  signed char* dst = reinterpret_cast<signed char*>(p.q_int8);
  float* scales = reinterpret_cast<float*>(p.q_scale) + (static_cast<i64>(bh) * p.q_blocks + qb) * 64;
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const float amax = amaxes.of_pass(i, per_warp);
    const int r = i * G::kRowsPerPass + row_in_pass;  // row within the warp's 16
    float x[8];
    bits8_to_float(raw[i], is_bf16, x);
    store_int8x8(dst + (block_row0 + warp * 16 + r) * kHeadDim + d0, x, inverse_int8_scale(amax));
    if (chunk == 0 && r < 8) scales[warp * 8 + r] = (amax / 127.f) * p.sm_scale_log2e;
  }

  // LSE correction for K smoothing: the kernel's scores miss q . mean_k * sm_scale.
  if (p.lse_correction != 0 && p.k_mean != 0) {
    const float4* m = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(p.k_mean) +
                                                      (static_cast<i64>(b) * p.heads_kv + hkv) * p.head_dim_padded + d0);
    const float4 m0 = m[0], m1 = m[1];  // once: the lse stores below may alias for the compiler
    const float mean[8] = {m0.x, m0.y, m0.z, m0.w, m1.x, m1.y, m1.z, m1.w};
#pragma unroll
    for (int i = 0; i < G::kPasses; ++i) {
      float x[8], dot = 0.f;
      bits8_to_float(raw[i], is_bf16, x);
#pragma unroll
      for (int e = 0; e < 8; ++e) dot += x[e] * mean[e];
      dot = sum_over_row_lanes<G::kLanesPerRow>(dot);
      const int s = qb * kQBlockRows + warp * 16 + i * G::kRowsPerPass + row_in_pass;
      if (chunk == 0 && s < span.len)  // internal layout (B, Hq, seq_q max)
        reinterpret_cast<float*>(p.lse_correction)[static_cast<i64>(bh) * p.seq_q + s] =
            dot * p.sm_scale;
    }
  }
}

/// @brief a[i] by selects: a run-time index into a register array would send it to local memory.
__device__ __forceinline__ float pick4(const float (&a)[4], int i) {
  return i == 0 ? a[0] : i == 1 ? a[1] : i == 2 ? a[2] : a[3];
}

/// @brief K job: 64 keys (8 warps x 8) of one (b, hkv, k_block), mean-subtracted.
///
/// Scale groups: key k belongs to group (k % 8) / 2 (the columns lane % 4 owns). Warp w holds
/// keys 8w..8w+7, i.e. keys 2g and 2g+1 of every group g: the warp folds its pair per group with
/// one shuffle, and the block's 8 x 4 partial maxima meet in shared memory (max is exact and
/// order-free, so this gives the same bits as a max over the 64 key maxima).
template <int kHeadDim, bool kBf16>
__device__ __forceinline__ void quantize_k_block(const QuantParams& p, const JobLanes<kHeadDim, 8>& j,
                                                 const SeqSpan& span) {
  using G = WarpRows<kHeadDim, 8>;
  constexpr int kGroups = 4;
  __shared__ __align__(16) float warp_group_amax[kQuantThreads / 32][kGroups];
  const int warp = j.warp, kb = j.blk, bh = j.bh, h = j.h, b = j.b, chunk = j.chunk,
            row_in_pass = j.row_in_pass, d0 = j.d0;
  constexpr bool is_bf16 = kBf16;
  const u16* src = rows_of(p.k, p.k_stride_b, p.k_stride_h, p.k_stride_s, p.cu_seqlens_k, b, h, span);
  uint4 raw[G::kPasses];
  load_job_rows<G>(src, p.k_stride_s, kb * kKBlockRows + warp * 8 + row_in_pass, span.len, d0,
                   p.head_dim, p.vec_k != 0, raw);
  wait_for_previous_grid();  // K's channel mean; the loads above are in flight
  float mean[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (p.k_mean != 0) {
    const float4* m = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(p.k_mean) +
                                                      static_cast<i64>(bh) * p.head_dim_padded + d0);
    const float4 m0 = m[0], m1 = m[1];
    mean[0] = m0.x, mean[1] = m0.y, mean[2] = m0.z, mean[3] = m0.w;
    mean[4] = m1.x, mean[5] = m1.y, mean[6] = m1.z, mean[7] = m1.w;
  }

  float x[G::kPasses][8];
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const int key = warp * 8 + i * G::kRowsPerPass + row_in_pass;
    const int s = kb * kKBlockRows + key;
    bits8_to_float(raw[i], is_bf16, x[i]);
    if (s < span.len) {
#pragma unroll
      for (int e = 0; e < 8; ++e) x[i][e] -= mean[e];  // padded columns: 0 - 0
    }  // padded keys stay +0 (not -mean)
    float m = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(x[i][e]));
    m = max_over_row_lanes<G::kLanesPerRow>(m);
    // Keys 2g and 2g+1 sit in lanes kLanesPerRow apart (row_in_pass differs in bit 0).
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, G::kLanesPerRow));
    if (chunk == 0 && row_in_pass % 2 == 0) warp_group_amax[warp][(key % 8) / 2] = m;
  }
  __syncthreads();

  float group_amax[kGroups] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int w = 0; w < kQuantThreads / 32; ++w) {
    const float4 g = *reinterpret_cast<const float4*>(warp_group_amax[w]);
    group_amax[0] = fmaxf(group_amax[0], g.x), group_amax[1] = fmaxf(group_amax[1], g.y);
    group_amax[2] = fmaxf(group_amax[2], g.z), group_amax[3] = fmaxf(group_amax[3], g.w);
  }
  const float block_amax = fmaxf(fmaxf(group_amax[0], group_amax[1]), fmaxf(group_amax[2], group_amax[3]));
  const bool per_warp = p.granularity == kGranPerWarp;
  const i64 block_row0 = (static_cast<i64>(bh) * p.k_blocks + kb) * kKBlockRows;
  signed char* dst = reinterpret_cast<signed char*>(p.k_int8);
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const int key = warp * 8 + i * G::kRowsPerPass + row_in_pass;
    const float amax = per_warp ? block_amax : pick4(group_amax, (key % 8) / 2);
    store_int8x8(dst + (block_row0 + key) * kHeadDim + d0, x[i], inverse_int8_scale(amax));
  }
  if (threadIdx.x < kGroups)
    reinterpret_cast<float*>(p.k_scale)[(static_cast<i64>(bh) * p.k_blocks + kb) * kGroups + threadIdx.x] =
        (per_warp ? block_amax : pick4(group_amax, threadIdx.x)) / 127.f;
}

/// @brief V job: 64 rows of one (b, hkv, k_block) to fp16, zero-padded.
template <int kHeadDim, bool kBf16>
__device__ __forceinline__ void convert_v_block(const QuantParams& p, const JobLanes<kHeadDim, 8>& j,
                                                const SeqSpan& span) {
  using G = WarpRows<kHeadDim, 8>;
  const int warp = j.warp, kb = j.blk, bh = j.bh, h = j.h, b = j.b, row_in_pass = j.row_in_pass, d0 = j.d0;
  constexpr bool is_bf16 = kBf16;
  const u16* src = rows_of(p.v, p.v_stride_b, p.v_stride_h, p.v_stride_s, p.cu_seqlens_k, b, h, span);
  const i64 block_row0 = (static_cast<i64>(bh) * p.k_blocks + kb) * kKBlockRows;
  uint4 raw[G::kPasses];
  load_job_rows<G>(src, p.v_stride_s, kb * kKBlockRows + warp * 8 + row_in_pass, span.len, d0,
                   p.head_dim, p.vec_v != 0, raw);
  wait_for_previous_grid();  // nothing of the previous launch is read: only ends after it
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    const int key = warp * 8 + i * G::kRowsPerPass + row_in_pass;
    float x[8];
    bits8_to_float(raw[i], is_bf16, x);
    const uint4 out = make_uint4(pack_half2(x[0], x[1]), pack_half2(x[2], x[3]),
                                 pack_half2(x[4], x[5]), pack_half2(x[6], x[7]));
    *reinterpret_cast<uint4*>(reinterpret_cast<u16*>(p.v_fp16) + (block_row0 + key) * kHeadDim + d0) = out;
  }
}

/// @brief Position of key `p` (0..63 in its block) in the FP8 V^T tile. An FP8 m16n8k32 A
/// fragment holds keys 4c..4c+3 and 16+4c..16+4c+3 of a 32-key step (c = lane % 4), while the
/// score accumulator gives lane c keys 8j+2c, 8j+2c+1; storing V's keys in this order makes the
/// score registers usable as A fragments with no shuffles (the sum over keys is order-free).
__device__ __forceinline__ int fp8_pv_key_slot(int p) {
  const int step = p / 32, half = (p % 32) / 16, j = (p % 16) / 8, c = (p % 8) / 2, e = p % 2;
  return 32 * step + 16 * half + 4 * c + 2 * j + e;
}

/// @brief Largest |V - mean| of a channel from its min/max (and mean when smoothing).
__device__ __forceinline__ float channel_amax(float lo, float hi, float mean) {
  return fmaxf(fmaxf(hi - mean, mean - lo), 0.f);  // 0 for an empty sequence (lo = +inf, hi = -inf)
}

/// @brief The amax a V channel's E4M3 scale is set from in the quantize launch: from exact
/// statistics as they are (v_amax_margin 0); from a sample's, v_amax_margin times that (the
/// sample's own where the product overflows fp32). E4M3 spaces its values alike over its whole
/// normal range, so a wide scale costs only the channel's tiniest values; a block whose codes
/// saturate is flagged and its head redone exactly (requantize_v_heads; emulate.v_channel_amax).
__device__ __forceinline__ float v_channel_bound(const QuantParams& p, float lo, float hi, float mean) {
  const float amax = channel_amax(lo, hi, mean);
  if (p.v_amax_margin <= 0.f) return amax;
  const float bound = amax * p.v_amax_margin;
  return bound <= 3.40282347e38f ? bound : amax;
}

/// @brief V job (FP8): 64 keys of one (b, hkv, k_block) -> E4M3 V^T tile [D_pad][64 slots],
/// per-channel scale amax/v_scale_max, mean removed when smoothing. Block 0 writes the scales.
/// kFull: all 64 keys lie inside the sequence (no per-key checks and selects: a fifth of the
/// job's instructions; only a sequence's last block needs them). The amax: `exact_amax[d]`
/// when given (requantize_v_heads' exact statistics), else v_channel_bound. With a margin and
/// no `exact_amax`, the job also writes the block's v_overflow flag: 1 when some code came out
/// +-448 or NaN (E4M3's saturated magnitudes: a value at >= 432/448 of its bound, or beyond).
/// Tested on the packed codes (three integer operations a word) rather than on the values:
/// a per-value test raised the kernel's registers past three CTAs per SM.
///
/// No shared-memory transpose: a 16-byte run of a tile row (slots 16q..16q+15 of channel d)
/// holds exactly keys 16q..16q+15 (fp8_pv_key_slot permutes within such a run), so a thread
/// that loads kChannels channels x those 16 keys builds its tile runs in registers. Lane l takes
/// run q = l % 4 and channel group warp * 8 + l / 4: the 4 lanes of a group write one whole
/// 64-byte tile row, and each load of a key reads one full 32-byte sector per run.
template <int kHeadDim, bool kBf16, bool kFull>
__device__ __forceinline__ void quantize_v_block_fp8(const QuantParams& p, const JobLanes<kHeadDim, 8>& j,
                                                     const SeqSpan& span, const float* exact_amax = nullptr) {
  constexpr int kChannels = kHeadDim / 64;  // channels per thread: 8 warps x 8 groups x kChannels
  constexpr int kRunKeys = 16;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int run = lane % 4, d_first = (warp * 8 + lane / 4) * kChannels;
  const int kb = j.blk, bh = j.bh, h = j.h, b = j.b;
  constexpr bool is_bf16 = kBf16;
  const u16* src = rows_of(p.v, p.v_stride_b, p.v_stride_h, p.v_stride_s, p.cu_seqlens_k, b, h, span);
  const int first_key = kb * kKBlockRows + run * kRunKeys;

  // bits[k]: channels d_first.. of key first_key + k, packed like the source (zero past the end).
  u32 bits[kRunKeys];
  const bool pair_load = kChannels == 2 && p.vec_v != 0;  // 4-byte aligned channel pair
  const u16* row = src + first_key * p.v_stride_s + d_first;  // then a pointer step a key
#pragma unroll
  for (int k = 0; k < kRunKeys; ++k, row += p.v_stride_s) {
    const int s = first_key + k;
    u32 w = 0u;
    if (kFull || s < span.len) {
      if (pair_load) {  // dim % 8 == 0 here: both channels real or both padding
        if (d_first < p.head_dim) w = *reinterpret_cast<const u32*>(row);
      } else {
#pragma unroll
        for (int c = 0; c < kChannels; ++c)
          if (d_first + c < p.head_dim) w |= static_cast<u32>(row[c]) << (16 * c);
      }
    }
    bits[k] = w;
  }
  wait_for_previous_grid();  // V's channel statistics; the loads above are in flight

  const i64 stats = static_cast<i64>(bh) * p.head_dim_padded;
  const float* vmin = reinterpret_cast<const float*>(p.v_min) + stats;
  const float* vmax = reinterpret_cast<const float*>(p.v_max) + stats;
  const float* vmean = p.v_mean != 0 ? reinterpret_cast<const float*>(p.v_mean) + stats : nullptr;
  unsigned char* tile = reinterpret_cast<unsigned char*>(p.v_fp8) +
                        (static_cast<i64>(bh) * p.k_blocks + kb) * kHeadDim * kKBlockRows;
  const auto amax_of = [&](int d, float mean) {
    return exact_amax != nullptr ? exact_amax[d] : v_channel_bound(p, vmin[d], vmax[d], mean);
  };
  const bool flag_block = p.v_amax_margin > 0.f && exact_amax == nullptr;  // block-uniform
  u32 saturated = 0u;  // bit 7 of a byte: that code's magnitude is 0x7e (448) or 0x7f (NaN)
#pragma unroll
  for (int c = 0; c < kChannels; ++c) {
    const int d = d_first + c;
    const float mean = vmean != nullptr ? vmean[d] : 0.f;
    const float amax = amax_of(d, mean);
    const float inv = amax > 0.f ? p.v_scale_max / amax : 0.f;
    float y[kRunKeys];
#pragma unroll
    for (int k = 0; k < kRunKeys; ++k) {
      const float x = bits16_to_float(static_cast<u16>(bits[k] >> (16 * c)), is_bf16);
      y[k] = kFull || first_key + k < span.len ? (x - mean) * inv : 0.f;  // padded keys: +0
    }
    // Slot 4c' + 2j + e of the run holds key 8j + 2c' + e (fp8_pv_key_slot).
    u32 word[4];
#pragma unroll
    for (int cq = 0; cq < 4; ++cq) word[cq] = pack_e4m3x4(y[2 * cq], y[2 * cq + 1], y[8 + 2 * cq], y[9 + 2 * cq]);
    *reinterpret_cast<uint4*>(tile + d * kKBlockRows + run * kRunKeys) = make_uint4(word[0], word[1], word[2], word[3]);
    if (flag_block)
#pragma unroll
      for (int cq = 0; cq < 4; ++cq) saturated |= ((word[cq] & 0x7f7f7f7fu) + 0x02020202u) & 0x80808080u;
  }
  if (kb == 0 && static_cast<int>(threadIdx.x) < kHeadDim) {
    const int d = threadIdx.x;
    reinterpret_cast<float*>(p.v_scale)[stats + d] = amax_of(d, vmean != nullptr ? vmean[d] : 0.f) / p.v_scale_max;
  }
  if (flag_block) {
    const int flag = __syncthreads_or(saturated != 0u);
    if (threadIdx.x == 0)
      reinterpret_cast<unsigned char*>(p.v_overflow)[static_cast<i64>(bh) * p.k_blocks + kb] = static_cast<unsigned char>(flag);
  }
}

/// @brief Exact amax of |V - mean| of every channel of head (b, hkv) over all its tokens, into
/// `amax[0 .. kHeadDim)` (shared): per-channel min and max in channel_stats' lanes (8-channel
/// chunks x row lanes), then channel_amax, as exact statistics would give it. The requantize
/// launch's slow path: one CTA reads the whole head.
template <int kHeadDim>
__device__ __forceinline__ void exact_v_amax(const QuantParams& p, const SeqSpan& span, int b, int h, float* amax) {
  constexpr int kChunks = kHeadDim / 8, kRowLanes = kQuantThreads / kChunks;
  __shared__ float partial[2][kRowLanes][kHeadDim + 1];
  const int chunk = threadIdx.x % kChunks, row_lane = threadIdx.x / kChunks, d0 = chunk * 8;
  const bool is_bf16 = p.in_dtype == kDtypeBf16, vec = p.vec_v != 0;
  const u16* base = rows_of(p.v, p.v_stride_b, p.v_stride_h, p.v_stride_s, p.cu_seqlens_k, b, h, span);
  ChannelRun8 run;  // its sums are unused (dead code)
  for (int s0 = row_lane; s0 < span.len; s0 += kRowLanes * kStatsBatch) {
    uint4 raw[kStatsBatch];
#pragma unroll
    for (int r = 0; r < kStatsBatch; ++r) {
      const int s = s0 + kRowLanes * r;
      raw[r] = s < span.len ? load_row_bits8(base + s * p.v_stride_s, d0, p.head_dim, vec) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int r = 0; r < kStatsBatch; ++r) {
      if (s0 + kRowLanes * r >= span.len) break;
      run.add(raw[r], is_bf16);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) partial[0][row_lane][d0 + i] = run.lo[i], partial[1][row_lane][d0 + i] = run.hi[i];
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < kHeadDim) {
    const int d = threadIdx.x;
    float lo = partial[0][0][d], hi = partial[1][0][d];
    for (int r = 1; r < kRowLanes; ++r) lo = fminf(lo, partial[0][r][d]), hi = fmaxf(hi, partial[1][r][d]);
    const i64 at = (static_cast<i64>(b) * p.heads_kv + h) * p.head_dim_padded + d;
    amax[d] = channel_amax(lo, hi, p.v_mean != 0 ? reinterpret_cast<const float*>(p.v_mean)[at] : 0.f);
  }
  __syncthreads();
}

/// @brief The requantize launch, after a quantize launch with v_amax_margin > 0: CTA i checks
/// heads i, i + gridDim.x, ... (one wave of CTAs, however many heads). A head with a flagged V
/// block (saturated codes) is quantized again, every block, from its exact amax (block 0
/// rewrites the scales) by that one CTA: slow (a whole head's V read twice by one CTA) but
/// rare. A call without such a value pays one read of each head's flags. Its own kernel: inside
/// the quantize kernel this path raised that kernel's registers from 80 to 115; and one wave:
/// 8 CTAs per head took 4 waves of it at B=4 H=32 1k (NOTES.md "V's scales from a sample").
template <int kHeadDim, bool kBf16>
__device__ __forceinline__ void requantize_v_heads(const QuantParams& p) {
  wait_for_previous_grid();  // the quantize launch's flags and tiles
  __shared__ float amax[kHeadDim];
  for (int bh = blockIdx.x; bh < p.batch * p.heads_kv; bh += gridDim.x) {
    const unsigned char* flags = reinterpret_cast<const unsigned char*>(p.v_overflow) + static_cast<i64>(bh) * p.k_blocks;
    int any = 0;
    for (int i = threadIdx.x; i < p.k_blocks; i += kQuantThreads) any |= flags[i];
    if (!__syncthreads_or(any)) continue;
    const int b = bh / p.heads_kv, h = bh % p.heads_kv;
    const SeqSpan span = seq_span(p.cu_seqlens_k, b, p.seq_k);
    exact_v_amax<kHeadDim>(p, span, b, h, amax);
    for (int kb = 0; kb < p.k_blocks; ++kb) {
      const JobLanes<kHeadDim, 8> j(bh * p.k_blocks + kb, p.k_blocks, p.heads_kv);
      if ((kb + 1) * kKBlockRows <= span.len) {
        quantize_v_block_fp8<kHeadDim, kBf16, true>(p, j, span, amax);
      } else {
        quantize_v_block_fp8<kHeadDim, kBf16, false>(p, j, span, amax);
      }
    }
    __syncthreads();  // amax is rewritten for the next flagged head
  }
}

enum class VOut { kFp16, kFp8Transposed };

/// @brief One launch for all three: blocks [0, nq) quantize Q, the next nk quantize K, the
/// last nk convert V (nq = B*Hq*q_blocks, nk = B*Hkv*k_blocks). The source format is a
/// template parameter of the job bodies (quantize_qkv dispatches on it once), so a conversion
/// is one instruction rather than a predicated pair of both.
template <int kHeadDim, VOut kVOut, bool kBf16>
__device__ __forceinline__ void quantize_qkv_from(const QuantParams& p) {
  allow_next_grid_to_start();  // the attention kernel's prologue needs none of this launch
  const int nq = p.batch * p.heads_q * p.q_blocks;
  const int nk = p.batch * p.heads_kv * p.k_blocks;
  const int job = blockIdx.x;
  if (job < nq) {
    const JobLanes<kHeadDim, 16> j(job, p.q_blocks, p.heads_q);
    quantize_q_block<kHeadDim, kBf16>(p, j, seq_span(p.cu_seqlens_q, j.b, p.seq_q));
    return;
  }
  const JobLanes<kHeadDim, 8> j(job < nq + nk ? job - nq : job - nq - nk, p.k_blocks, p.heads_kv);
  const SeqSpan span = seq_span(p.cu_seqlens_k, j.b, p.seq_k);
  if (job < nq + nk) {
    quantize_k_block<kHeadDim, kBf16>(p, j, span);
  } else if (kVOut == VOut::kFp16) {
    convert_v_block<kHeadDim, kBf16>(p, j, span);
  } else if ((j.blk + 1) * kKBlockRows <= span.len) {
    quantize_v_block_fp8<kHeadDim, kBf16, true>(p, j, span);
  } else {
    quantize_v_block_fp8<kHeadDim, kBf16, false>(p, j, span);
  }
}

template <int kHeadDim, VOut kVOut>
__device__ __forceinline__ void quantize_qkv(const QuantParams& p) {
  if (p.in_dtype == kDtypeBf16) {
    quantize_qkv_from<kHeadDim, kVOut, true>(p);
  } else {
    quantize_qkv_from<kHeadDim, kVOut, false>(p);
  }
}

template <int kHeadDim>
__device__ __forceinline__ void quantize_qk_int8_v_fp16(const QuantParams& p) {
  quantize_qkv<kHeadDim, VOut::kFp16>(p);
}

template <int kHeadDim>
__device__ __forceinline__ void quantize_qk_int8_v_fp8(const QuantParams& p) {
  quantize_qkv<kHeadDim, VOut::kFp8Transposed>(p);
}

/// @brief The requantize launch (requantize_v_heads), after a quantize launch with a margin.
template <int kHeadDim>
__device__ __forceinline__ void requantize_v_fp8(const QuantParams& p) {
  allow_next_grid_to_start();  // the attention kernel's prologue needs none of this launch
  if (p.in_dtype == kDtypeBf16) {
    requantize_v_heads<kHeadDim, true>(p);
  } else {
    requantize_v_heads<kHeadDim, false>(p);
  }
}

}  // namespace sageattn
