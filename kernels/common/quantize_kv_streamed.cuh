// K and V quantized with one read from DRAM. K's channel mean and V's channel min/max depend
// on every token of a head, so the two-pass sequence reads K and V twice (channel-stats
// launches, then the quantize launch). Here one launch of a few CTAs per SM takes jobs from one
// ticket counter: statistics of a 128-key chunk, and quantization of a chunk, which becomes
// possible once its head's statistics are complete. The ticket order (kv_job_of_ticket) puts a
// head's statistics a fixed lag of tickets ahead of its quantization, so a chunk is read again
// within a window of about (lag x 48 KiB) of traffic: from L2, not DRAM. Each CTA takes its next
// ticket while it works on the current job (the atomic's latency hidden), and a job waits only
// on jobs of lower tickets, which CTAs already running hold: deadlock-free for any grid size.
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
  // [0] the ticket, [1 + 2u] chunks of unit u done, [2 + 2u] its statistics ready (ops.py:
  // _kv_work_bytes mirrors this).
  __device__ __forceinline__ int counter_words() const { return 1 + 2 * units; }
  __device__ __forceinline__ unsigned* done_count(unsigned* c, int unit) const { return c + 1 + 2 * unit; }
  __device__ __forceinline__ unsigned* ready_flag(unsigned* c, int unit) const { return c + 2 + 2 * unit; }
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
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // The CTA's partial (ordered before this fence by the barrier) before the count; the last
    // chunk fences again so every other chunk's partial is read after their counts.
    __threadfence();
    last_chunk = atomicAdd(w.done_count(counters, unit), 1u) == static_cast<unsigned>(w.chunks - 1);
    if (last_chunk) __threadfence();
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
  }
  __syncthreads();  // the statistics (cumulatively, through the barrier) before the flag
  if (threadIdx.x == 0) store_release_gpu(w.ready_flag(counters, unit), 1u);
}

/// A ticket's job: the first `lag` tickets are statistics jobs, then statistics and
/// quantization jobs alternate (quantization first) until the statistics run out, then the rest
/// of the quantization jobs. Job j of either kind is chunk j % chunks of unit j / chunks, so
/// quantization job q waits on statistics jobs <= q + chunks - 1, whose tickets are at least
/// 2 * (lag - chunks) + 1 lower (lag >= 2 * chunks).
struct KvJob {
  bool stats;
  int index;  // < 0: no job left
};

__device__ __forceinline__ KvJob kv_job_of_ticket(unsigned ticket, int jobs, int lag) {
  if (ticket >= 2u * static_cast<unsigned>(jobs)) return {false, -1};
  const int t = static_cast<int>(ticket);
  if (t < lag) return {true, t};
  const int r = t - lag, paired = 2 * (jobs - lag);
  if (r < paired) return (r & 1) ? KvJob{true, lag + r / 2} : KvJob{false, r / 2};
  return {false, jobs - lag + (r - paired)};
}

/// @brief Grid: any size (a few CTAs per SM); 256 threads. Fills what the channel-stats launches
/// and the quantize launch's K and V jobs fill.
template <int kHeadDim>
__device__ __forceinline__ void quantize_kv_fp8_streamed(const QuantParams& p) {
  const KvWorkLayout w(p);
  unsigned* counters = reinterpret_cast<unsigned*>(p.kv_work);
  float* partials = reinterpret_cast<float*>(p.kv_work + w.partials_offset_bytes());
  const int jobs = w.units * w.chunks;  // of each kind
  // The lag: enough tickets that a head's statistics are done (not just taken: every CTA holds
  // two tickets) when its quantization starts, and no more (the re-read window grows with it).
  const int lag = min(jobs, static_cast<int>(gridDim.x) + 2 * w.chunks);
  __shared__ KvJob slot[2];  // thread 0 -> the CTA, alternating (one barrier per job)
  unsigned next = 0;
  if (threadIdx.x == 0) next = atomicAdd(counters, 1u);
  for (int round = 0;; ++round) {
    if (threadIdx.x == 0) {
      const KvJob job = kv_job_of_ticket(next, jobs, lag);
      if (job.index >= 0) next = atomicAdd(counters, 1u);  // used next round: latency hidden
      if (job.index >= 0 && !job.stats) {
        const unsigned* ready = w.ready_flag(counters, job.index / w.chunks);
        while (load_acquire_gpu(ready) == 0) __nanosleep(128);
      }
      slot[round & 1] = job;
    }
    __syncthreads();
    const KvJob job = slot[round & 1];
    if (job.index < 0) return;
    const int unit = job.index / w.chunks, chunk = job.index % w.chunks;
    if (job.stats) {
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
