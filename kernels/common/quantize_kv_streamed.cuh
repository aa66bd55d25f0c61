// K and V quantized with one read from DRAM. K's channel mean and V's channel min/max depend
// on every token of a head, so the two-pass sequence reads K and V twice (channel-stats
// launches, then the quantize launch). Here one launch of a few CTAs per SM takes jobs from two
// tickets: statistics of a 128-key chunk, and quantization of a chunk, which becomes possible
// once its head's statistics are complete. Tickets run in the same head order, so a chunk is
// read again within a window of about (CTAs x chunk bytes) of the first read: from L2, not
// DRAM. No CTA ever waits for work nobody has taken, so any grid size is deadlock-free.
//
// Statistics, deterministic: chunk c's 256 threads add rows c*128 + l, + kRowLanes, ... per row
// lane l from +0, lane sums in lane order, into the chunk's partial; the head's last chunk to
// finish adds the partials in chunk order and divides by the length
// (tests/gpu/test_quantize_identity.py replays this order). Quantization: the K and V jobs of
// quantize.cuh, reading the head's statistics from the same buffers the channel-stats launches
// fill.
#pragma once

#include "quantize.cuh"

namespace sageattn {

constexpr int kKvChunkBlocks = 2;  // 64-key blocks per job

/// Layout of QuantParams::kv_work: u32 counters (zeroed by the caller) then fp32 partials.
struct KvWorkLayout {
  int units, chunks;  // units: K's (b, h) then V's; chunks per unit
  __device__ __forceinline__ KvWorkLayout(const QuantParams& p)
      : units(2 * p.batch * p.heads_kv), chunks((p.k_blocks + kKvChunkBlocks - 1) / kKvChunkBlocks) {}
  // [0] statistics ticket, [1] quantization ticket, [2 + 2u] chunks of unit u done, [3 + 2u] its
  // statistics ready (ops.py: _kv_work_bytes mirrors this).
  static constexpr int kTicketStats = 0, kTicketQuant = 1;
  __device__ __forceinline__ int counter_words() const { return 2 + 2 * units; }
  __device__ __forceinline__ long long partials_offset_bytes() const {
    return (static_cast<long long>(counter_words()) * 4 + 255) / 256 * 256;
  }
};

__device__ __forceinline__ unsigned load_acquire_gpu(const unsigned* flag) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(flag) : "memory");
  return v;
}

__device__ __forceinline__ void store_release_gpu(unsigned* flag, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(flag), "r"(v) : "memory");
}

/// @brief Statistics job: chunk `chunk` of unit `unit` (sum, min, max per channel) into its
/// partial; the unit's last chunk combines the partials and publishes the head's statistics.
template <int kHeadDim>
__device__ __forceinline__ void kv_stats_chunk(const QuantParams& p, const KvWorkLayout& w, int unit, int chunk,
                                               unsigned* counters, float* partials) {
  constexpr int kLanesPerRow = kHeadDim / 8, kRowLanes = kQuantThreads / kLanesPerRow;
  constexpr int kChunkRows = kKvChunkBlocks * kKBlockRows, kRowsPerLane = kChunkRows / kRowLanes;
  __shared__ float lane_part[3][kRowLanes][kHeadDim + 1];
  __shared__ int last_chunk;
  const int heads = p.batch * p.heads_kv;
  const bool is_k = unit < heads;
  const int bh = is_k ? unit : unit - heads, h = bh % p.heads_kv, b = bh / p.heads_kv;
  const SeqSpan span = seq_span(p.cu_seqlens_k, b, p.seq_k);
  const u16* src = is_k ? rows_of(p.k, p.k_stride_b, p.k_stride_h, p.k_stride_s, p.cu_seqlens_k, b, h, span)
                        : rows_of(p.v, p.v_stride_b, p.v_stride_h, p.v_stride_s, p.cu_seqlens_k, b, h, span);
  const long long stride = is_k ? p.k_stride_s : p.v_stride_s;
  const bool vec = (is_k ? p.vec_k : p.vec_v) != 0, is_bf16 = p.in_dtype == kDtypeBf16;
  const int chunk_lane = threadIdx.x % kLanesPerRow, row_lane = threadIdx.x / kLanesPerRow, d0 = chunk_lane * 8;
  const int first = chunk * kChunkRows + row_lane;

  uint4 raw[kRowsPerLane];  // every load in flight before any add
#pragma unroll
  for (int j = 0; j < kRowsPerLane; ++j) {
    const int s = first + j * kRowLanes;
    raw[j] = s < span.len ? load_row_bits8(src + s * stride, d0, p.head_dim, vec) : make_uint4(0u, 0u, 0u, 0u);
  }
  ChannelRun8 run;
#pragma unroll
  for (int j = 0; j < kRowsPerLane; ++j) {
    if (first + j * kRowLanes >= span.len) break;
    run.add(raw[j], is_bf16);
  }
  run.store(lane_part, row_lane, d0);
  const float inf = __int_as_float(0x7f800000);
  __syncthreads();
  const int d = threadIdx.x;  // threads < kHeadDim: one channel each
  float* mine = partials + (static_cast<long long>(unit) * w.chunks + chunk) * 3 * kHeadDim;
  if (d < kHeadDim) {
    float total = 0.f, mn = inf, mx = -inf;
#pragma unroll 4
    for (int r = 0; r < kRowLanes; ++r) {
      total += lane_part[0][r][d];
      mn = fminf(mn, lane_part[1][r][d]);
      mx = fmaxf(mx, lane_part[2][r][d]);
    }
    // Only what the head needs travels: K's sum (when smoothing), V's min/max (and sum).
    if (is_k ? p.k_mean != 0 : p.v_mean != 0) mine[d] = total;
    if (!is_k) mine[kHeadDim + d] = mn, mine[2 * kHeadDim + d] = mx;
    __threadfence();  // the partial before the count (the last chunk reads it)
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    last_chunk = atomicAdd(&counters[2 + 2 * unit], 1u) == static_cast<unsigned>(w.chunks - 1);
    if (last_chunk) __threadfence();  // and every other chunk's partial after it
  }
  __syncthreads();
  if (!last_chunk) return;

  if (d < kHeadDim) {
    const float* all = partials + static_cast<long long>(unit) * w.chunks * 3 * kHeadDim;
    float total = 0.f, mn = inf, mx = -inf;
    const bool want_sum = is_k ? p.k_mean != 0 : p.v_mean != 0;
    for (int c = 0; c < w.chunks; ++c) {
      const float* part = all + c * 3 * kHeadDim;  // L2: written by other SMs
      if (want_sum) total += __ldcg(part + d);
      if (!is_k) mn = fminf(mn, __ldcg(part + kHeadDim + d)), mx = fmaxf(mx, __ldcg(part + 2 * kHeadDim + d));
    }
    // An empty (varlen) sequence has mean 0 and min/max +-inf (its V scale becomes 0).
    const float mean = span.len > 0 ? total / static_cast<float>(span.len) : 0.f;
    const i64 i = static_cast<i64>(bh) * p.head_dim_padded + d;
    if (is_k && p.k_mean != 0) reinterpret_cast<float*>(p.k_mean)[i] = mean;
    if (!is_k && p.v_mean != 0) reinterpret_cast<float*>(p.v_mean)[i] = mean;
    if (!is_k) reinterpret_cast<float*>(p.v_min)[i] = mn, reinterpret_cast<float*>(p.v_max)[i] = mx;
    __threadfence();  // the statistics before the flag
  }
  __syncthreads();
  if (threadIdx.x == 0) store_release_gpu(&counters[3 + 2 * unit], 1u);
}

/// @brief Grid: any size (a few CTAs per SM: the re-read window is CTAs x 2 blocks); 256
/// threads. Fills what the channel-stats launches and the quantize launch's K and V jobs fill.
template <int kHeadDim>
__device__ __forceinline__ void quantize_kv_fp8_streamed(const QuantParams& p) {
  const KvWorkLayout w(p);
  unsigned* counters = reinterpret_cast<unsigned*>(p.kv_work);
  float* partials = reinterpret_cast<float*>(p.kv_work + w.partials_offset_bytes());
  const unsigned jobs = static_cast<unsigned>(w.units) * w.chunks;  // of each kind
  enum { kExit, kStats, kQuant };
  __shared__ int next_kind, next_job;
  constexpr int kNone = -1, kNoMore = -2;
  int pending = kNone;  // thread 0: the quantization ticket it holds
  for (;;) {
    if (threadIdx.x == 0) {
      if (pending == kNone) {
        const unsigned t = atomicAdd(&counters[KvWorkLayout::kTicketQuant], 1u);
        pending = t < jobs ? static_cast<int>(t) : kNoMore;
      }
      for (;;) {
        if (pending >= 0 && load_acquire_gpu(&counters[3 + 2 * (pending / w.chunks)]) != 0) {
          next_kind = kQuant, next_job = pending, pending = kNone;
          break;
        }
        // Statistics jobs never wait, so whoever holds an unready ticket makes progress here.
        if (*reinterpret_cast<volatile unsigned*>(&counters[KvWorkLayout::kTicketStats]) < jobs) {
          const unsigned t = atomicAdd(&counters[KvWorkLayout::kTicketStats], 1u);
          if (t < jobs) {
            next_kind = kStats, next_job = static_cast<int>(t);
            break;
          }
        }
        if (pending == kNoMore) {
          next_kind = kExit;
          break;
        }
        __nanosleep(256);  // every statistics job is taken: their CTAs finish them
      }
    }
    __syncthreads();
    const int kind = next_kind, job = next_job;
    __syncthreads();  // thread 0 rewrites them next round
    if (kind == kExit) return;
    const int unit = job / w.chunks, chunk = job % w.chunks;
    if (kind == kStats) {
      kv_stats_chunk<kHeadDim>(p, w, unit, chunk, counters, partials);
    } else {
      const int heads = p.batch * p.heads_kv;
      const bool is_k = unit < heads;
      const int bh = is_k ? unit : unit - heads;
      for (int kb = chunk * kKvChunkBlocks; kb < min((chunk + 1) * kKvChunkBlocks, p.k_blocks); ++kb) {
        if (is_k) quantize_k_block<kHeadDim>(p, bh * p.k_blocks + kb);
        else quantize_v_block_fp8<kHeadDim>(p, bh * p.k_blocks + kb);
        __syncthreads();  // the K job's shared scale maxima are rewritten by the next block
      }
    }
  }
}

}  // namespace sageattn
