// One-pass K and V quantization for the sm90 tree. K's channel mean (K smoothing) and V's
// channel min/max (per-channel FP8 scales) depend on every token of a head, so the quantizer of
// the other trees reads K and V twice: a channel-stats launch, then the quantize launch. Here a
// thread-block cluster owns one (tensor, b, h): each CTA reads its share of the head's 64-key
// blocks once, keeps them in shared memory, adds its partial statistics, and after one cluster
// barrier every CTA combines all partials (distributed shared memory, rank order: the bits do
// not depend on scheduling) and quantizes its blocks from the copy. A share must fit in shared
// memory (ops.py sends longer sequences to the two-pass sequence). Math and output layout: those
// of kernels/common/quantize.cuh.
#pragma once

#include <cooperative_groups.h>

#include "../common/mma_sm80.cuh"  // cp.async
#include "../common/quantize.cuh"

namespace sageattn::sm90 {

constexpr int kKvCluster = 8;  // CTAs per (tensor, b, h): the portable cluster size
// Threads per CTA: all copy; the first kQuantThreads add the statistics (in the order below);
// kKvJobs groups of kQuantThreads quantize blocks concurrently (one CTA per SM holds the copy,
// and one 256-thread job at a time left the SM mostly idle: 1.3 TB/s measured).
constexpr int kKvJobs = 4;
constexpr int kKvThreads = kKvJobs * kQuantThreads;
static_assert(kKvJobs <= kMaxJobGroups, "named barriers per job group");

template <int kHeadDim>
struct KvPassTraits {
  static constexpr int kBlockBytes = kKBlockRows * kHeadDim * 2;          // one 64-key block, 16-bit
  static constexpr int kMaxShareBlocks = 192 * 1024 / kBlockBytes;         // 12 (hd128) / 24 (hd64)
  static constexpr int kMaxSmemBytes = kMaxShareBlocks * kBlockBytes;     // dynamic: the copy
  static constexpr int kLanesPerRow = kHeadDim / 8;                        // 8 elements per lane
  static constexpr int kRowLanes = kQuantThreads / kLanesPerRow;           // 32 (hd64) / 16 (hd128)
  static constexpr int kCopyRowLanes = kKvThreads / kLanesPerRow;          // 128 / 64
};

/// Rows [first_row, ...) of a sequence copied to shared memory, kHeadDim 16-bit elements each.
/// The 16-byte chunk c of row r sits at chunk c ^ swizzle(r): the V job reads 4 rows 16 apart
/// at the same channels in one instruction, which would otherwise hit the same banks.
template <int kHeadDim>
struct SharedRows {
  const u16* base;
  int first_row;

  static __device__ __forceinline__ int offset_in(int r, int d) {  // element offset of (row r, d)
    const int swizzle = ((r >> 4) & 3) * (kHeadDim / 64);
    return r * kHeadDim + (((d >> 3) ^ swizzle) << 3) + (d & 7);
  }
  __device__ __forceinline__ uint4 chunk8(int s, int d0) const {
    return *reinterpret_cast<const uint4*>(base + offset_in(s - first_row, d0));
  }
  template <int kChannels>
  __device__ __forceinline__ u32 channels(int s, int d) const {
    const u16* at = base + offset_in(s - first_row, d);
    return kChannels == 2 ? *reinterpret_cast<const u32*>(at) : static_cast<u32>(*at);
  }
};

__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait_acquire() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

/// @brief Grid: kKvCluster CTAs per (tensor, b, hkv), K's heads first, then V's; kKvThreads;
/// dynamic shared memory: share * KvPassTraits::kBlockBytes (at most kMaxSmemBytes), where CTA
/// r of a cluster owns 64-key blocks [r * share, (r + 1) * share), share = ceil(k_blocks /
/// kKvCluster).
///
/// Statistics, in this order (tests/gpu/test_quantize_identity.py replays it): row lane l of
/// CTA r adds its rows first + l, first + l + kRowLanes, ... from +0; the lanes' sums are added
/// in lane order, then the CTAs' in rank order; one division by the length. Rank 0 writes the
/// head's statistics (k_mean; v_min, v_max, v_mean) for the attention kernel and the Q jobs.
template <int kHeadDim>
__device__ __forceinline__ void quantize_kv_fp8_one_pass(const QuantParams& p) {
  using T = KvPassTraits<kHeadDim>;
  constexpr int kRowLanes = T::kRowLanes;
  extern __shared__ __align__(128) char smem_raw[];
  __shared__ float lane_part[3][kRowLanes][kHeadDim];  // sum, min, max per row lane
  __shared__ float cta_part[3][kHeadDim];              // this CTA's: read by the whole cluster
  __shared__ float head_stat[3][kHeadDim];             // the head's mean, min, max

  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int unit = blockIdx.x / kKvCluster, heads = p.batch * p.heads_kv;
  const bool is_k = unit < heads;
  const int bh = is_k ? unit : unit - heads, h = bh % p.heads_kv, b = bh / p.heads_kv;
  const SeqSpan span = seq_span(p.cu_seqlens_k, b, p.seq_k);
  const GlobalRows source =
      is_k ? GlobalRows{rows_of(p.k, p.k_stride_b, p.k_stride_h, p.k_stride_s, p.cu_seqlens_k, b, h, span),
                        p.k_stride_s, p.head_dim, p.vec_k != 0}
           : GlobalRows{rows_of(p.v, p.v_stride_b, p.v_stride_h, p.v_stride_s, p.cu_seqlens_k, b, h, span),
                        p.v_stride_s, p.head_dim, p.vec_v != 0};

  const int share = (p.k_blocks + kKvCluster - 1) / kKvCluster;
  const int kb_first = rank * share, kb_end = min(kb_first + share, p.k_blocks);
  unsigned dynamic_bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_bytes));
  if (static_cast<unsigned>(share * T::kBlockBytes) > dynamic_bytes) __trap();  // the launch's contract
  const int row_first = kb_first * kKBlockRows;
  const int row_end = min(kb_end * kKBlockRows, span.len);  // <= row_first: nothing to read
  u16* copy = reinterpret_cast<u16*>(smem_raw);

  // Pass 1: copy the share to shared memory with every copy in flight (two halves), then the
  // first kQuantThreads threads add the statistics, each over rows row_lane + kRowLanes * j.
  const int chunk = threadIdx.x % T::kLanesPerRow, d0 = chunk * 8;
  const int rows = max(row_end - row_first, 0);
  const int half_rows = min((rows / 2 + kRowLanes - 1) / kRowLanes * kRowLanes, rows);
  const bool async_copy = source.vec && d0 < p.head_dim;  // 16-byte aligned and real
  for (int half = 0; half < 2; ++half) {
    for (int r = (half ? half_rows : 0) + static_cast<int>(threadIdx.x) / T::kLanesPerRow;
         r < (half ? rows : half_rows); r += T::kCopyRowLanes) {
      u16* dst = copy + SharedRows<kHeadDim>::offset_in(r, d0);
      if (async_copy) cp_async_16(smem_addr(dst), source.base + (row_first + r) * source.stride + d0);
      else *reinterpret_cast<uint4*>(dst) = source.chunk8(row_first + r, d0);  // padding columns, odd layouts
    }
    cp_async_commit();
  }

  const int row_lane = threadIdx.x / T::kLanesPerRow;  // < kRowLanes: a statistics thread
  const bool is_bf16 = p.in_dtype == kDtypeBf16;
  const float inf = __int_as_float(0x7f800000);
  float sum[8], lo[8], hi[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) sum[i] = 0.f, lo[i] = inf, hi[i] = -inf;
  const auto add_rows = [&](int r, int end) {
    for (; r < end; r += kRowLanes) {
      float x[8];
      bits8_to_float(*reinterpret_cast<const uint4*>(copy + SharedRows<kHeadDim>::offset_in(r, d0)), is_bf16, x);
#pragma unroll
      for (int i = 0; i < 8; ++i) sum[i] += x[i], lo[i] = fminf(lo[i], x[i]), hi[i] = fmaxf(hi[i], x[i]);
    }
  };
  cp_async_wait<1>();  // the first half landed (half_rows: a multiple of kRowLanes, so each
  __syncthreads();     // statistics thread's rows stay in order across the halves)
  if (row_lane < kRowLanes) add_rows(row_lane, half_rows);
  cp_async_wait<0>();
  __syncthreads();
  if (row_lane < kRowLanes) add_rows(half_rows + row_lane, rows);
  if (row_lane < kRowLanes) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      lane_part[0][row_lane][d0 + i] = sum[i];
      lane_part[1][row_lane][d0 + i] = lo[i];
      lane_part[2][row_lane][d0 + i] = hi[i];
    }
  }
  __syncthreads();
  const int d = threadIdx.x;  // threads < kHeadDim: one channel each
  if (d < kHeadDim) {
    float total = 0.f, mn = inf, mx = -inf;
    for (int r = 0; r < kRowLanes; ++r) {
      total += lane_part[0][r][d];
      mn = fminf(mn, lane_part[1][r][d]);
      mx = fmaxf(mx, lane_part[2][r][d]);
    }
    cta_part[0][d] = total, cta_part[1][d] = mn, cta_part[2][d] = mx;
  }
  cluster.sync();  // every CTA's partials written and visible to the cluster

  if (d < kHeadDim) {
    float total = 0.f, mn = inf, mx = -inf;
    for (int r = 0; r < kKvCluster; ++r) {
      const float* part = cluster.map_shared_rank(&cta_part[0][0], r);
      total += part[d];
      mn = fminf(mn, part[kHeadDim + d]);
      mx = fmaxf(mx, part[2 * kHeadDim + d]);
    }
    // An empty (varlen) sequence has mean 0 and min/max +-inf (its V scale becomes 0).
    const float mean = span.len > 0 ? total / static_cast<float>(span.len) : 0.f;
    head_stat[0][d] = mean, head_stat[1][d] = mn, head_stat[2][d] = mx;
    if (rank == 0) {
      const i64 i = static_cast<i64>(bh) * p.head_dim_padded + d;
      if (is_k && p.k_mean != 0) reinterpret_cast<float*>(p.k_mean)[i] = mean;
      if (!is_k && p.v_mean != 0) reinterpret_cast<float*>(p.v_mean)[i] = mean;
      if (!is_k) reinterpret_cast<float*>(p.v_min)[i] = mn, reinterpret_cast<float*>(p.v_max)[i] = mx;
    }
  }
  // The other CTAs may still read cta_part: arrive now, leave only after they all have.
  cluster_arrive_release();
  __syncthreads();

  // Pass 2: kKvJobs groups quantize the share's blocks from the copy, block kb_first + g + kKvJobs * i
  // in group g.
  const SharedRows<kHeadDim> kept{copy, row_first};
  const float* k_mean = p.k_mean != 0 ? head_stat[0] : nullptr;
  const float* v_mean = p.v_mean != 0 ? head_stat[0] : nullptr;
  const JobThreads group{static_cast<int>(threadIdx.x) % kQuantThreads, static_cast<int>(threadIdx.x) / kQuantThreads};
  for (int kb = kb_first + group.group; kb < kb_end; kb += kKvJobs) {
    const int job = bh * p.k_blocks + kb;
    if (is_k) quantize_k_block<kHeadDim>(p, job, kept, span.len, k_mean, group);
    else quantize_v_block_fp8<kHeadDim>(p, job, kept, span.len, head_stat[1], head_stat[2], v_mean, group);
    group.sync();  // the K job's shared scale maxima are rewritten by the group's next block
  }
  cluster_wait_acquire();
}

}  // namespace sageattn::sm90
