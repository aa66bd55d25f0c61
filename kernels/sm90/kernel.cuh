// The sm90 tree: INT8 QK^T + FP8 E4M3 PV attention for Hopper (sm_90a) with wgmma, bulk tensor
// copies and warp specialization. SageAttention2's algorithm (per-thread INT8 Q/K, FP8 V with
// per-channel scales, P scaled by 448 into E4M3; two-level "fp32+fp32" accumulation because
// Hopper's FP8 MMA accumulates with reduced precision) on the quantizer of the other INT8 trees
// (kernels/common/quantize.cuh). One change: the row sums are of the E4M3 P, taken on the
// tensor core beside each P V product (an all-ones B operand), not of the fp32 P on the FMA
// pipe: 64 fewer instructions per warp and step, outputs as accurate, the LSE carrying E4M3's
// rounding of P and the tensor core's truncated sums (NOTES.md sm90 v16).
//
// A CTA owns 128 query rows: warpgroup 0 copies (one thread issues the tensor copies of Q once
// and of K/V per 128-key step into a kStages ring), warpgroups 1 and 2 compute 64 rows each:
// S = Q K^T (wgmma s8, Q and K from shared memory), dequantize, mask, online softmax, P to E4M3
// in registers, O (+)= P V^T (wgmma e4m3, P from registers), then the shared mma.sync epilogue
// (the accumulator layouts are the same).
#pragma once

#include "../common/epilogue_mma_sync.cuh"
#include "../common/grid_dependency.cuh"
#include "../common/pv_accumulate.cuh"
#include "../common/qk_int8_mma.cuh"  // mask_scores
#include "../common/visible_keys.cuh"
#include "async_copy.cuh"
#include "traits.cuh"

namespace sageattn {
namespace sm90 {

constexpr float kLog2PScale = 8.807354922057604f;  // log2(448): P scaled into E4M3's range

/// @brief Base-2 scores of a step that needs masking: INT32 accumulators times the thread's Q
/// scale and the K scale of each 64-key half; keys past the sequence or above the causal
/// diagonal (the shared mask_scores) or in a 64-key half the block mask skips (`skip`: bit 0
/// low half, bit 1 high half) -> -inf.
template <class T>
__device__ __forceinline__ void dequantize_masked_step(float (&s)[T::kKTiles][4], const int (&acc)[T::kKTiles][4],
                                                       float scale_lo, float scale_hi, int key0, long long row0,
                                                       int seq_k, bool causal, long long causal_offset, u32 skip,
                                                       int lane) {
  constexpr int kHalf = T::kKTiles / 2;
  const float neg_inf = -__int_as_float(0x7f800000);
#pragma unroll
  for (int j = 0; j < T::kKTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = static_cast<float>(acc[j][e]) * (j < kHalf ? scale_lo : scale_hi);
  mask_scores<T>(s, key0, row0, seq_k, causal, causal_offset, lane);
#pragma unroll
  for (int j = 0; j < T::kKTiles; ++j)
    if ((skip >> (j < kHalf ? 0 : 1)) & 1u)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = neg_inf;
}

/// Step list entries the producer hands the consumers through shared memory: the step index
/// and which 64-key halves the block mask skips; kEndOfSteps after the last step.
constexpr u32 kSkipLo = 1u << 30, kSkipHi = 1u << 31, kStepMask = kSkipLo - 1;
constexpr u32 kEndOfSteps = kStepMask;

/// @brief Each row's max over score tiles [kFirst, kFirst + kKTiles/2) (one 64-key half), on the
/// unscaled INT32 scores. The overlapping kernels take it with Hopper's three-way integer max
/// (DPX, one instruction per two scores) before the conversion: the same value as the max of
/// the converted scores, +2-5% kernel alone although ptxas then spills 64-76 bytes there. The
/// in-order kernel keeps the max of the converted scores: the DPX max cost it 2-7% at 1k-8k,
/// and a depth-3 tree of DPX maxima more (NOTES.md sm90 v17).
template <class T, int kFirst>
__device__ __forceinline__ void half_row_max(const int (&acc)[T::kKTiles][4], float (&m)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if constexpr (T::kOverlap) {
      int mi = max(acc[kFirst][2 * r], acc[kFirst][2 * r + 1]);
#pragma unroll
      for (int j = kFirst + 1; j < kFirst + T::kKTiles / 2; ++j)
        mi = __vimax3_s32(mi, acc[j][2 * r], acc[j][2 * r + 1]);
      m[r] = static_cast<float>(mi);  // exact: |acc| <= 127 * 127 * kHeadDim < 2^24
    } else {
      m[r] = static_cast<float>(acc[kFirst][2 * r]);
#pragma unroll
      for (int j = kFirst; j < kFirst + T::kKTiles / 2; ++j)
        m[r] = fmaxf(m[r], fmaxf(static_cast<float>(acc[j][2 * r]), static_cast<float>(acc[j][2 * r + 1])));
    }
  }
}

/// @brief The rows' new running max from the two halves' raw maxima (the K scales are >= 0, so
/// scaling commutes with the max), their rescale factors and exponent shifts.
__device__ __forceinline__ void update_row_max(const float (&m_lo)[2], const float (&m_hi)[2], float scale_lo,
                                               float scale_hi, RowStats& st, float (&rescale)[2], float (&shift)[2],
                                               float log2_p_scale) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m = quad_max(fmaxf(st.max[r], fmaxf(m_lo[r] * scale_lo, m_hi[r] * scale_hi)));
    rescale[r] = fast_exp2(st.max[r] - m);
    st.max[r] = m;
    shift[r] = log2_p_scale - m;
  }
}

/// @brief The probabilities of score tiles [kFirst, kLast): p = 2^(acc * scale - shift).
template <class T, int kFirst, int kLast>
__device__ __forceinline__ void unmasked_exp(const int (&acc)[T::kKTiles][4], float scale_lo, float scale_hi,
                                             const float (&shift)[2], float (&p)[T::kKTiles][4]) {
  constexpr int kHalf = T::kKTiles / 2;
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int j = kFirst; j < kLast; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        p[j][2 * r + e] = fast_exp2(fmaf(static_cast<float>(acc[j][2 * r + e]), j < kHalf ? scale_lo : scale_hi, shift[r]));
}

/// @brief Online-softmax step of a step with no masked key, on the raw INT32 scores: the
/// dequantization folds into the exponent's FMA (p = 2^(acc * scale - shift), one rounding) and
/// the row max is taken on the unscaled scores of each 64-key half (the scales are >= 0).
/// Same contract as online_softmax_step<kTiles, false>: `p` comes out scaled by 2^kLog2PScale;
/// the row sums are left to the tensor core (add_row_sums).
template <class T>
__device__ __forceinline__ void softmax_unmasked_step(const int (&acc)[T::kKTiles][4], float scale_lo, float scale_hi,
                                                      float (&p)[T::kKTiles][4], RowStats& st, float (&rescale)[2],
                                                      float log2_p_scale) {
  float m_lo[2], m_hi[2], shift[2];
  half_row_max<T, 0>(acc, m_lo);
  half_row_max<T, T::kKTiles / 2>(acc, m_hi);
  update_row_max(m_lo, m_hi, scale_lo, scale_hi, st, rescale, shift, log2_p_scale);
  unmasked_exp<T, 0, T::kKTiles>(acc, scale_lo, scale_hi, shift, p);
}

/// @brief l = l * rescale + the step's sums of E4M3 P, from the all-ones product's accumulator
/// (`ls`: column 2*(lane%4) of rows lane/4 and lane/4 + 8). Every column holds the whole sum,
/// so the four lanes of a quad carry the same l (keep_quad_leader_sums before the epilogue).
__device__ __forceinline__ void add_row_sums(RowStats& st, const float (&rescale)[2], const float (&ls)[1][4]) {
  st.sum[0] = fmaf(st.sum[0], rescale[0], ls[0][0]);
  st.sum[1] = fmaf(st.sum[1], rescale[1], ls[0][2]);
}

/// @brief The O tiles and the row-sum tile of a "fp32+fp32" step's block (issue_pv_block: N =
/// kHeadDim + 8, the sums in the last tile).
template <class T>
__device__ __forceinline__ const float (&o_tiles(const float (&blk)[T::kOTiles + 1][4]))[T::kOTiles][4] {
  return *reinterpret_cast<const float (*)[T::kOTiles][4]>(&blk[0]);
}
template <class T>
__device__ __forceinline__ const float (&sum_tile(const float (&blk)[T::kOTiles + 1][4]))[1][4] {
  return *reinterpret_cast<const float (*)[1][4]>(&blk[T::kOTiles]);
}

/// @brief Zero the sums of lanes 1-3 of each quad: every lane holds its rows' whole sums, and the
/// epilogue's finish_rows adds the four lanes' partial sums.
__device__ __forceinline__ void keep_quad_leader_sums(RowStats& st, int lane) {
  if (lane % 4 != 0) st.sum[0] = st.sum[1] = 0.f;
}

/// @brief P (fp32, scaled by 448) -> the E4M3 A fragments of the step's four 32-key products.
/// The quantizer stored V^T with keys in fp8_pv_key_slot order, so score tiles 4c..4c+3 of a
/// thread are the A fragment of product c as they stand (no shuffles).
template <class T>
__device__ __forceinline__ void pack_p_e4m3(u32 (&a)[T::kKTiles / 4][4], const float (&p)[T::kKTiles][4]) {
#pragma unroll
  for (int c = 0; c < T::kKTiles / 4; ++c)
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // r = 0: row lane/4 (a0, a2); 1: row lane/4 + 8 (a1, a3)
      a[c][r] = pack_e4m3x4(p[4 * c][2 * r], p[4 * c][2 * r + 1], p[4 * c + 1][2 * r], p[4 * c + 1][2 * r + 1]);
      a[c][2 + r] =
          pack_e4m3x4(p[4 * c + 2][2 * r], p[4 * c + 2][2 * r + 1], p[4 * c + 3][2 * r], p[4 * c + 3][2 * r + 1]);
    }
}

/// @brief Quantize one warp's 16 rows of the caller's Q (16-bit, `src`: kHeadDim x 2 bytes per
/// row) to INT8 in the warpgroup's 64-row tile `dst` (K-major, the copy engine's 128B / 64B
/// swizzle), exactly as quantize_q_block does (kernels/common/quantize.cuh: same lanes, scale
/// groups and rounding). Returns this thread's Q scale (rows lane/4 and lane/4 + 8), times
/// `scale_log2e`.
template <class T>
__device__ __forceinline__ float quantize_q_rows(const char* src, char* dst, int warp, int lane, bool is_bf16,
                                                 bool per_warp, float scale_log2e) {
  constexpr int kHeadDim = T::kHeadDim;
  using G = WarpRows<kHeadDim, 16>;
  const int chunk = lane % G::kLanesPerRow, row_in_pass = lane / G::kLanesPerRow;
  uint4 raw[G::kPasses];
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i)
    raw[i] = *reinterpret_cast<const uint4*>(src + (i * G::kRowsPerPass + row_in_pass) * kHeadDim * 2 + chunk * 16);
  const QScaleGroups<G> amaxes(raw, is_bf16);
  constexpr u32 kSwizzleRows = kHeadDim == 128 ? 7u : 3u;  // 128B / 64B: address bits 7.. into 4..
#pragma unroll
  for (int i = 0; i < G::kPasses; ++i) {
    float x[8];
    bits8_to_float(raw[i], is_bf16, x);
    const u32 offset = static_cast<u32>((warp * 16 + i * G::kRowsPerPass + row_in_pass) * kHeadDim + chunk * 8);
    *reinterpret_cast<uint2*>(dst + (offset ^ (((offset >> 7) & kSwizzleRows) << 4))) =
        pack_int8x8(x, inverse_int8_scale(amaxes.of_pass(i, per_warp)));
  }
  // This thread's group lane/4 lives in pass (lane/4) / kRowsPerPass of the lanes whose first
  // row is (lane/4) % kRowsPerPass.
  const int group = lane / 4, holder = (group % G::kRowsPerPass) * G::kLanesPerRow;
  float amax = amaxes.warp;
#pragma unroll
  for (int i = 0; i < G::kPasses / 2; ++i) {
    const float a = __shfl_sync(0xffffffffu, amaxes.group[i], holder);
    if (!per_warp && i == group / G::kRowsPerPass) amax = a;
  }
  return (amax / 127.f) * scale_log2e;
}

/// The query tile, head and batch of this CTA. Causal: the last query tiles see the most keys;
/// launch them first. Dense non-causal calls whose length is not a multiple of the tile, up to
/// kShortTilesLastMaxTiles tiles per head: the short last tiles of every head go last (CTAs
/// start in blockIdx order, x fastest), where they fill the final wave, whose CTAs would
/// otherwise all be full ones (at 2k, 11 tiles of 192 rows per head, the eleventh two-thirds
/// full). Longer heads keep the plain order: the tail is a smaller share there, and at 8k the
/// whole call read 2-4% lower with it in one A/B (its last wave reads every head's K and V
/// again from memory; not separated from run-to-run noise: NOTES.md sm90 v19).
constexpr int kShortTilesLastMaxTiles = 24;
struct QueryTile {
  int index, head, batch;
};
template <int kBlockQ, bool kShortTilesLast>
__device__ __forceinline__ QueryTile query_tile(const AttnParams& p) {
  const int n_tiles = kBlockQ == kQBlockRows ? p.q_blocks : static_cast<int>(gridDim.x);
  const int x = blockIdx.x, y = blockIdx.y, z = blockIdx.z;
  if (p.causal) return {n_tiles - 1 - x, y, z};
  const int n_full = p.seq_q / kBlockQ, rest = n_tiles - n_full;
  if (!kShortTilesLast || p.cu_seqlens_q != 0 || rest == 0 || n_full == 0 || n_tiles > kShortTilesLastMaxTiles)
    return {x, y, z};
  const long long linear = x + static_cast<long long>(n_tiles) * (y + static_cast<long long>(gridDim.y) * z);
  const long long full_ctas = static_cast<long long>(n_full) * gridDim.y * gridDim.z;
  const bool full = linear < full_ctas;
  const long long j = full ? linear : linear - full_ctas;
  const int per_head = full ? n_full : rest;
  const long long head_batch = j / per_head;
  return {static_cast<int>(j % per_head) + (full ? 0 : n_full), static_cast<int>(head_batch % gridDim.y),
          static_cast<int>(head_batch / gridDim.y)};
}

/// Grid (ceil(q_blocks * 128 / T::kBlockQ), Hq, B), T::kThreads threads, T::kSmemBytes dynamic
/// shared memory; kConsumers compute warpgroups (Traits; the kernel table picks 3 for dense hd64
/// and for the hd128 kernel of non-causal calls). kBlockSparse: walk p.block_mask (the producer
/// hands the kept steps to the consumers through shared memory); dense kernels keep the plain
/// step loop (NOTES.md sm90 v7: the step list cost dense calls 8%).
template <int kHeadDim, PvAccum kAccum, bool kBlockSparse, int kConsumers>
__device__ __forceinline__ void attention(const Sm90AttnParams& params) {
  using T = Traits<kHeadDim, kConsumers>;
  static_assert(!kBlockSparse || kConsumers == 2, "block-sparse CTAs are one mask row: 128 query rows");
  static_assert(kAccum == PvAccum::kDirect || kAccum == PvAccum::kBlockFp32, "fp32 accumulation only");
  const AttnParams& p = params.attn;
  extern __shared__ char smem_raw[];
  const u32 smem_q = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const u32 smem_q_source = smem_q + T::kQBytes;
  const u32 smem_stages = smem_q_source + T::kQSourceBytes;
  const bool q_from_source = params.q_source_dtype >= 0;  // quantize Q here (dense kernels only)
  const u32 ones_tile = smem_stages + T::kStages * T::kStageBytes;  // B of the row sums' products
  const u32 bars = ones_tile + kOnesTileBytes;
  const u32 q_full = bars;
  const auto k_full = [&](int s) { return bars + 8u * (1 + s); };
  const auto v_full = [&](int s) { return bars + 8u * (1 + T::kStages + s); };
  const auto kv_free = [&](int s) { return bars + 8u * (1 + 2 * T::kStages + s); };
  const u32 step_info = bars + 8u * T::kBarriers;          // u32 per stage (kSkip* | step)
  // per stage: K scales [block 0..1][slot 0..3], 16-byte aligned for the bulk copies
  const u32 scale_info = (step_info + 4u * T::kStages + 15u) & ~15u;
  const auto stage_k = [&](int s) { return smem_stages + static_cast<u32>(s) * T::kStageBytes; };
  const auto stage_v = [&](int s) { return stage_k(s) + T::kKBytes; };

  const QueryTile tile = query_tile<T::kBlockQ, !kBlockSparse>(p);
  const int cta = tile.index, h = tile.head, b = tile.batch;
  const int hkv = h / (p.heads_q / p.heads_kv);
  const SeqSpan q_span = seq_span(p.cu_seqlens_q, b, p.seq_q);
  const SeqSpan k_span = seq_span(p.cu_seqlens_k, b, p.seq_k);
  const int q0 = cta * T::kBlockQ;
  if (q0 >= q_span.len) return;  // past this (varlen) sequence's end: nothing to write

  // Steps (128 keys) this block can see, and the first that needs the key mask.
  const VisibleKeys keys = visible_keys<T::kBlockQ, T::kBlockK>(p, q0, q_span, k_span);
  const int n_steps = keys.n_blocks, first_masked = keys.first_masked;
  const long long causal_offset = keys.causal_offset;
  const int bhq = b * p.heads_q + h;
  const int bhk = b * p.heads_kv + hkv;

  // E4M3 ones: the all-ones tile ("fp32" row sums) and the 8 rows after each V^T block of
  // every stage ("fp32+fp32"), which no copy writes; visible to wgmma (the async proxy) after
  // the barrier below.
  constexpr u32 kSumWords = T::kSumRowsBytes / 4;
  for (u32 w = threadIdx.x; w < kOnesTileBytes / 4 + 2 * T::kStages * kSumWords; w += T::kThreads) {
    const u32 r = w - kOnesTileBytes / 4, block = r / kSumWords;  // block: stage * 2 + V block
    const u32 at = w < kOnesTileBytes / 4 ? ones_tile + 4u * w
                                          : stage_v(static_cast<int>(block / 2)) + (block % 2) * T::kVBlockStride +
                                                T::kVBlockBytes + 4u * (r % kSumWords);
    st_shared_u32(at, 0x38383838u);  // E4M3 1.0 x 4
  }
  fence_proxy_async_shared();
  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < T::kStages; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(kv_free(s), 4 * T::kConsumers);  // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();

  // A step's two V^T blocks (64 keys each), each followed by its row of ones in the stage.
  const auto load_v = [&](int s, int step) {
    mbar_arrive_expect_tx(v_full(s), T::kVBytes);
    tma_load_4d(stage_v(s), &params.tmap_v, v_full(s), 0, 0, 2 * step, bhk);
    tma_load_4d(stage_v(s) + T::kVBlockStride, &params.tmap_v, v_full(s), 0, 0, 2 * step + 1, bhk);
  };
  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    // Producer: warp 0 reads the block mask 32 steps at a time (a ballot per 64-key half), its
    // lane 0 issues every copy and writes each stage's step entry; the other warps idle to exit.
    warpgroup_release_registers<T::kProducerRegs>();
    if (!kBlockSparse && threadIdx.x == 0 && n_steps > 0) {
      prefetch_tensor_map(&params.tmap_k);
      prefetch_tensor_map(&params.tmap_v);
      if (q_from_source) {  // the caller's Q: may be copied before the quantizer ends
        mbar_arrive_expect_tx(q_full, T::kQSourceBytes);
        tma_load_4d(smem_q_source, &params.tmap_q, q_full, 0, q0, h, b);
        wait_for_previous_grid();
      } else {
        wait_for_previous_grid();
        mbar_arrive_expect_tx(q_full, T::kQBytes);
        tma_load_3d(smem_q, &params.tmap_q, q_full, 0, q0, bhq);
      }
      // Each step's K scales (4 floats per 64-key block) land beside its K tile, so the
      // consumers read them from shared memory instead of computing addresses and waiting on
      // global loads in the step (NOTES.md sm90 v19).
      const float* k_scale_head = reinterpret_cast<const float*>(p.k_scale) + static_cast<long long>(bhk) * p.k_blocks * 4;
      for (int t = 0; t < n_steps; ++t) {
        const int s = t % T::kStages;
        if (t >= T::kStages) mbar_wait(kv_free(s), ((t / T::kStages) - 1) & 1);
        const u32 scale_bytes = 2 * t + 1 < p.k_blocks ? 32u : 16u;
        mbar_arrive_expect_tx(k_full(s), T::kKBytes + scale_bytes);
        bulk_load(scale_info + 32u * s, k_scale_head + 8 * t, scale_bytes, k_full(s));
        tma_load_3d(stage_k(s), &params.tmap_k, k_full(s), 0, t * T::kBlockK, bhk);
        load_v(s, t);
      }
    }
    if (kBlockSparse && threadIdx.x < 32) {
      wait_for_previous_grid();  // K scales below, then the quantizer's tiles
      const int lane = threadIdx.x;
      const signed char* mask_row =
          p.block_mask == 0 ? nullptr
                            : reinterpret_cast<const signed char*>(p.block_mask) + b * p.mask_stride_b +
                                  h * p.mask_stride_h + static_cast<long long>(cta) * p.mask_stride_q;
      const auto kept = [&](int kb) { return kb < p.k_blocks && mask_row[kb * p.mask_stride_k] != 0; };
      const auto claim_stage = [&](int i) {  // stage of the i-th entry, once its last reader is done
        const int s = i % T::kStages;
        if (i >= T::kStages) mbar_wait(kv_free(s), ((i / T::kStages) - 1) & 1);
        return s;
      };
      const float* k_scale_head = reinterpret_cast<const float*>(p.k_scale) + static_cast<long long>(bhk) * p.k_blocks * 4;
      if (lane == 0) {
        prefetch_tensor_map(&params.tmap_k);
        prefetch_tensor_map(&params.tmap_v);
      }
      int i = 0;
      for (int t0 = 0; t0 < n_steps; t0 += 32) {
        const int t = t0 + lane;
        const u32 lo = __ballot_sync(0xffffffffu, t < n_steps && (mask_row == nullptr || kept(2 * t)));
        const u32 hi = __ballot_sync(0xffffffffu, t < n_steps && (mask_row == nullptr || kept(2 * t + 1)));
        for (u32 any = lo | hi; any != 0; any &= any - 1) {  // warp-uniform
          const int bit = __ffs(any) - 1, step = t0 + bit;
          const int s = claim_stage(i);
          // The step's K scales go beside its tiles: the consumers read them from shared memory
          // right after the barrier instead of waiting on a global load.
          if (lane < 8) {
            const int kb = 2 * step + lane / 4;
            st_shared_u32(scale_info + 32u * s + 4u * lane,
                          __float_as_uint(kb < p.k_blocks ? k_scale_head[kb * 4 + lane % 4] : 0.f));
          }
          __syncwarp();  // lane 0's release (the arrivals below) then covers the other lanes' stores
          if (lane == 0) {
            if (i == 0) {
              mbar_arrive_expect_tx(q_full, T::kQBytes);
              tma_load_3d(smem_q, &params.tmap_q, q_full, 0, q0, bhq);
            }
            // A high half past the keys is not "skipped": the length mask covers it.
            const bool hi_exists = 2 * step + 1 < p.k_blocks;
            const u32 skip = (((lo >> bit) & 1u) ? 0u : kSkipLo) | (((hi >> bit) & 1u) || !hi_exists ? 0u : kSkipHi);
            st_shared_u32(step_info + 4u * s, static_cast<u32>(step) | skip);
            mbar_arrive_expect_tx(k_full(s), T::kKBytes);
            tma_load_3d(stage_k(s), &params.tmap_k, k_full(s), 0, step * T::kBlockK, bhk);
            load_v(s, step);
          }
          ++i;
        }
      }
      if (lane == 0) {
        const int s = claim_stage(i);
        st_shared_u32(step_info + 4u * s, kEndOfSteps);
        mbar_arrive(k_full(s));  // completes the phase with no bytes: the consumers see the end
      }
    }
  } else {
  // setmaxnreg applies only when each warpgroup role is one branch of a single if/else.
  warpgroup_claim_registers<T::kConsumerRegs>();
  const int consumer = __shfl_sync(0xffffffffu, wg - 1, 0);  // warp-uniform to the compiler too
  const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int warp_q0 = q0 + 16 * (consumer * 4 + warp);  // this warp's 16 rows
  const int row0 = warp_q0 + lane / 4;
  // The quantizer's block of those rows and their warp slot in it.
  constexpr bool kWholeBlock = T::kBlockQ == kQBlockRows;  // the CTA is one quantizer block
  const int q_block = kWholeBlock ? cta : warp_q0 / kQBlockRows;
  const int slot_warp = kWholeBlock ? consumer * 4 + warp : (warp_q0 % kQBlockRows) / 16;
  const u32 q_rows = smem_q + static_cast<u32>(consumer) * 64 * kHeadDim;
  // A consumer whose 64 rows all lie past the sequence (in a short last tile) computes nothing:
  // it keeps the ring's arrivals and the turns, and the others then run alone.
  const bool idle = !kBlockSparse && q0 + 64 * consumer >= q_span.len;
  float q_scale = 0.f;
  if (!kBlockSparse && q_from_source && n_steps > 0 && !idle) {
    // Each warp quantizes its 16 rows into the INT8 Q tile as the quantizer's Q job would; the
    // warpgroup's products read all 64 rows, so it syncs (after making the generic-proxy stores
    // visible to wgmma's async proxy). The caller's Q is not the quantizer's output: this runs
    // while the quantize launch may still be draining (programmatic dependent launch).
    mbar_wait(q_full, 0);
    q_scale = quantize_q_rows<T>(smem_raw + (smem_q_source - smem_addr(smem_raw)) + (consumer * 64 + warp * 16) * kHeadDim * 2,
                                 smem_raw + (q_rows - smem_addr(smem_raw)), warp, lane,
                                 params.q_source_dtype == kDtypeBf16, params.q_granularity == kGranPerWarp,
                                 params.q_scale_log2e);
    fence_proxy_async_shared();
    named_barrier_sync(4 + consumer, 128);
  }
  wait_for_previous_grid();  // every global read below is of the quantizer's output
  // Rows past the last block (a 192-row CTA's tail) have no scale: their Q rows read as zeros
  // and are never written.
  if (!q_from_source && (kWholeBlock || q_block < p.q_blocks))
    q_scale = reinterpret_cast<const float*>(p.q_scale)[(static_cast<long long>(bhq) * p.q_blocks + q_block) * 64 +
                                                        slot_warp * 8 + lane / 4];

  float o[T::kOTiles][4];
#pragma unroll
  for (int dc = 0; dc < T::kOTiles; ++dc)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dc][e] = 0.f;
  RowStats st;

  // The i-th step entry (kSkip* | step, or kEndOfSteps), once its K tile has landed: from the
  // producer (block-sparse) or the step itself (dense).
  const auto next_entry = [&](int i) {
    if (!kBlockSparse && i >= n_steps) return kEndOfSteps;
    mbar_wait(k_full(i % T::kStages), (i / T::kStages) & 1);
    return kBlockSparse ? ld_shared_u32(step_info + 4u * (i % T::kStages)) : static_cast<u32>(i);
  };
  // The tiles' descriptors, built once: products advance them to their stage and K slice.
  const u64 q_desc0 = kmajor_desc(q_rows, T::kQkGroupBytes, T::kQkSwizzle);
  const u64 k_desc0 = kmajor_desc(stage_k(0), T::kQkGroupBytes, T::kQkSwizzle);
  const u64 v_desc0 = kmajor_desc(stage_v(0), T::kVGroupBytes, T::kVSwizzle);
  // S = Q K^T of entry i into `acc` (asynchronous: the caller waits).
  // `half` < 0: all 128 keys; 0 or 1: keys 64*half.. into score tiles 8*half.. (N = 64).
  const auto issue_qk = [&](int i, int (&acc)[T::kKTiles][4], int half = -1) {
    // K of stage i % kStages, keys 64*half.. (8 swizzle periods on)
    const u32 k_offset = static_cast<u32>(i % T::kStages) * T::kStageBytes + (half > 0 ? 64u * kHeadDim : 0u);
    const u64 k_tile = desc_advance(k_desc0, k_offset);
    wgmma_fence();
    const auto q_desc = [&](int kk) { return desc_advance(q_desc0, 32u * kk); };
    const auto k_desc = [&](int kk) { return desc_advance(k_tile, 32u * kk); };
    if (half < 0) {
      wgmma_s8_m64n128k32<false>(acc, q_desc(0), k_desc(0));
#pragma unroll
      for (int kk = 1; kk < kHeadDim / 32; ++kk) wgmma_s8_m64n128k32<true>(acc, q_desc(kk), k_desc(kk));
    } else {
      int (&d)[8][4] = *reinterpret_cast<int (*)[8][4]>(&acc[half > 0 ? 8 : 0]);
      wgmma_s8_m64n64k32<false>(d, q_desc(0), k_desc(0));
#pragma unroll
      for (int kk = 1; kk < kHeadDim / 32; ++kk) wgmma_s8_m64n64k32<true>(d, q_desc(kk), k_desc(kk));
    }
    wgmma_commit();
  };
  // P V of entry i's 32-key slices [first, last) (asynchronous, one commit group; the group
  // holding slice 0 waits for V). "fp32+fp32": into a step's block `blk`, from zero at slice 0,
  // with N = kHeadDim + 8: the 8 rows of ones after each V^T block give the rows' sums of the
  // step's E4M3 P in blk's last tile. "fp32": O (+)= P V, and beside each slice ls (+)= P times
  // the all-ones tile (N = 8), from zero at slice 0.
  const auto v_slice_desc = [&](int s, int c) {  // slice c: 64-key block c/2, byte offset 32*(c%2)
    return desc_advance(v_desc0, static_cast<u32>(s) * T::kStageBytes + static_cast<u32>(c / 2) * T::kVBlockStride + 32u * (c % 2));
  };
  const auto issue_pv_block = [&](int i, const u32 (&pa)[T::kKTiles / 4][4], float (&blk)[T::kOTiles + 1][4],
                                  int first = 0, int last = T::kKTiles / 4) {
    const int s = i % T::kStages;
    if (first == 0) mbar_wait(v_full(s), (i / T::kStages) & 1);
    wgmma_fence();
#pragma unroll
    for (int c = 0; c < T::kKTiles / 4; ++c) {
      if (c < first || c >= last) continue;
      if (c == 0) {
        wgmma_pv_sums<kHeadDim, false>(blk, pa[c], v_slice_desc(s, c));
      } else {
        wgmma_pv_sums<kHeadDim, true>(blk, pa[c], v_slice_desc(s, c));
      }
    }
    wgmma_commit();
  };
  const u64 ones = ones_desc(ones_tile);
  const auto issue_pv_direct = [&](int i, const u32 (&pa)[T::kKTiles / 4][4], float (&ls)[1][4]) {
    const int s = i % T::kStages;
    mbar_wait(v_full(s), (i / T::kStages) & 1);
    wgmma_fence();
#pragma unroll
    for (int c = 0; c < T::kKTiles / 4; ++c) {
      wgmma_pv<kHeadDim, true>(o, pa[c], v_slice_desc(s, c));
      if (c == 0) {
        wgmma_e4m3_m64n8k32<false>(ls, pa[c], ones);
      } else {
        wgmma_e4m3_m64n8k32<true>(ls, pa[c], ones);
      }
    }
    wgmma_commit();
  };
  // The K scales of entry i's two 64-key blocks (this thread's slot), which the producer put
  // beside the step's K tile; a high block past the keys has none (its keys are masked).
  const auto step_scales = [&](int i, u32 entry, float (&scale)[2]) {
    const u32 at = scale_info + 32u * (i % T::kStages) + 4u * (lane % 4);
    scale[0] = __uint_as_float(ld_shared_u32(at));
    scale[1] = 2 * static_cast<int>(entry & kStepMask) + 1 < p.k_blocks ? __uint_as_float(ld_shared_u32(at + 16u)) : 0.f;
  };
  // Scores of a step -> probabilities (fp32, scaled by 448) in place, and the rows' rescale.
  const auto softmax = [&](u32 entry, const int (&acc)[T::kKTiles][4], const float (&k_scale)[2],
                           float (&sc)[T::kKTiles][4], float (&rescale)[2]) {
    const int t = static_cast<int>(entry & kStepMask);
    const u32 skip = entry >> 30;
    const float scale_lo = q_scale * k_scale[0], scale_hi = q_scale * k_scale[1];
    if (t < first_masked && skip == 0) {
      softmax_unmasked_step<T>(acc, scale_lo, scale_hi, sc, st, rescale, kLog2PScale);
    } else {
      dequantize_masked_step<T>(sc, acc, scale_lo, scale_hi, t * T::kBlockK, row0, k_span.len, p.causal != 0,
                                causal_offset, skip, lane);
      online_softmax_step<T::kKTiles, false>(sc, st, rescale, kLog2PScale);
    }
  };

  // Ping-pong (FlashAttention-3 §3.1): the consumers take turns issuing their matrix products
  // (named barrier 1 + c is consumer c's turn, handed on to the next consumer in a ring), so one
  // consumer's softmax runs while the others' products occupy the tensor cores. The last
  // consumer hands consumer 0 the first turn; consumer 0 takes back the extra arrival after its
  // loop, so every barrier ends balanced (all consumers see the same entries). In-order
  // consumers (T::kTurns false) issue without turns.
  const int my_turn = 1 + consumer, their_turn = consumer + 1 < T::kConsumers ? my_turn + 1 : 1;
  const auto take_turn = [&]() { if (T::kTurns) named_barrier_sync(my_turn, 256); };
  const auto pass_turn = [&]() { if (T::kTurns) named_barrier_arrive(their_turn, 256); };
  if (T::kTurns && consumer == T::kConsumers - 1) named_barrier_arrive(their_turn, 256);
  float k_scale[2];
  u32 entry = next_entry(0);
  int entries = 0;  // ring entries this consumer read (kept steps)
  if (idle) {
    int i = 0;
    for (; entry != kEndOfSteps; ++i) {
      take_turn();  // one turn per step and one more, as the overlapping loop below takes them
      pass_turn();
      if (lane == 0) mbar_arrive(kv_free(i % T::kStages));
      entry = next_entry(i + 1);
    }
    if (i > 0) take_turn(), pass_turn();
    if (!T::kTurns) named_barrier_sync(1, 128 * T::kConsumers);  // as all consumers, below
    return;  // nothing to write
  }
  if constexpr (!T::kOverlap) {
    // In order (three consumers at hd128: no registers for a second score tile): S(i), its
    // softmax, then P(i) V(i); the other consumers' products and softmaxes fill the gaps. The
    // accumulators live only inside the step, so the P V block reuses the score tile's
    // registers.
    int i = 0;
    for (; entry != kEndOfSteps; ++i) {
      int acc[T::kKTiles][4];
      if (i == 0) mbar_wait(q_full, 0);
      step_scales(i, entry, k_scale);
      const bool split = kAccum == PvAccum::kBlockFp32 && static_cast<int>(entry & kStepMask) < first_masked &&
                         (entry >> 30) == 0;
      issue_qk(i, acc, 0);  // S in two 64-key halves (N = 64 each)
      issue_qk(i, acc, 1);
      u32 pa[T::kKTiles / 4][4];
      float rescale[2];
      if (split) {
        // An unmasked "fp32+fp32" step works in 64-key halves: S as two N=64 products, the
        // row max per half, P V issued per half. Written to overlap each half's math with the
        // other half's product; ptxas still waits for both S halves before the max and issues
        // the four P V products together (SASS), yet the step measured +10-13% at 2k-4k
        // (NOTES.md sm90 v14). The same maxima and sums, in the same order, as
        // softmax_unmasked_step: outputs are bit-identical.
        constexpr int kHalfTiles = T::kKTiles / 2, kHalfSlices = T::kKTiles / 8;
        float m_lo[2], m_hi[2];
        wgmma_wait<1>();
        fence_register_tiles<0, kHalfTiles>(acc);
        half_row_max<T, 0>(acc, m_lo);
        // ptxas sinks register-only math below a wgmma wait, and across any branch it can
        // remove, but not below a branch whose condition needs it: this one keeps the first
        // half's max under the second half's product. Never taken (a converted INT32 max is
        // never a denormal, the bits a head count would read as); 4 instructions.
        if (__float_as_int(fmaxf(m_lo[0], m_lo[1])) == p.heads_q) asm volatile("nanosleep.u32 1;");
        wgmma_wait<0>();
        fence_register_tiles<kHalfTiles, kHalfTiles>(acc);
        half_row_max<T, kHalfTiles>(acc, m_hi);
        float blk[T::kOTiles + 1][4];
        float sc[T::kKTiles][4], shift[2];
        const float scale_lo = q_scale * k_scale[0], scale_hi = q_scale * k_scale[1];
        update_row_max(m_lo, m_hi, scale_lo, scale_hi, st, rescale, shift, kLog2PScale);
        unmasked_exp<T, 0, kHalfTiles>(acc, scale_lo, scale_hi, shift, sc);
        pack_p_e4m3<T>(pa, sc);
        issue_pv_block(i, pa, blk, 0, kHalfSlices);
        unmasked_exp<T, kHalfTiles, T::kKTiles>(acc, scale_lo, scale_hi, shift, sc);
        pack_p_e4m3<T>(pa, sc);
        issue_pv_block(i, pa, blk, kHalfSlices, 2 * kHalfSlices);
        rescale_rows<T::kOTiles>(o, rescale);  // ptxas fuses it with add_block: FFMAs after the wait
        wgmma_wait<0>();
        fence_registers(blk);
        add_block<T::kOTiles>(o, o_tiles<T>(blk));
        add_row_sums(st, rescale, sum_tile<T>(blk));
      } else {
        wgmma_wait<0>();
        fence_registers(acc);
        {
          float sc[T::kKTiles][4];
          softmax(entry, acc, k_scale, sc, rescale);
          pack_p_e4m3<T>(pa, sc);
        }
        if constexpr (kAccum == PvAccum::kBlockFp32) {
          float blk[T::kOTiles + 1][4];
          issue_pv_block(i, pa, blk);
          rescale_rows<T::kOTiles>(o, rescale);  // ptxas fuses it with add_block: FFMAs after the wait
          wgmma_wait<0>();
          fence_registers(blk);
          add_block<T::kOTiles>(o, o_tiles<T>(blk));
          add_row_sums(st, rescale, sum_tile<T>(blk));
        } else {
          float ls[1][4];
          rescale_rows<T::kOTiles>(o, rescale);
          fence_registers(o);
          issue_pv_direct(i, pa, ls);
          wgmma_wait<0>();
          fence_registers(o);
          fence_registers(ls);
          add_row_sums(st, rescale, ls);
        }
      }
      if (lane == 0) mbar_arrive(kv_free(i % T::kStages));
      entry = next_entry(i + 1);
    }
    entries = i;
  } else if (entry != kEndOfSteps) {
    mbar_wait(q_full, 0);
    int acc[T::kKTiles][4];
    float sc[T::kKTiles][4];
    u32 pa[T::kKTiles / 4][4];
    float blk[T::kOTiles + 1][4];  // "fp32+fp32": one step's P V and row sums
    float ls[1][4];                // "fp32": one step's row sums (add_row_sums)
    float rescale[2];
    step_scales(0, entry, k_scale);
    take_turn();
    issue_qk(0, acc);
    pass_turn();
    wgmma_wait<0>();
    fence_registers(acc);
    softmax(entry, acc, k_scale, sc, rescale);
    pack_p_e4m3<T>(pa, sc);
    // Intra-warpgroup overlap: one turn issues S(i+1) = Q K(i+1)^T and then P(i) V(i); the
    // softmax of entry i+1 runs while P(i) V(i) is still in the tensor cores. P(i+1) is packed
    // only after P(i) V(i) retires (its registers are that product's A operand). The last entry
    // is peeled off so no product in the loop is conditional (ptxas then keeps the wgmma
    // pipeline asynchronous).
    const auto pv_step = [&](int i, const u32 (&pa)[T::kKTiles / 4][4]) {  // the caller holds the turn
      if constexpr (kAccum == PvAccum::kBlockFp32) {
        issue_pv_block(i, pa, blk);
      } else {
        issue_pv_direct(i, pa, ls);
      }
    };
    const auto finish_pv = [&](int i) {  // after P(i) V(i) retired: fold it into O and l, free the stage
      if constexpr (kAccum == PvAccum::kBlockFp32) {
        fence_registers(blk);
        rescale_rows<T::kOTiles>(o, rescale);
        add_block<T::kOTiles>(o, o_tiles<T>(blk));
        add_row_sums(st, rescale, sum_tile<T>(blk));
      } else {
        fence_registers(o);
        fence_registers(ls);
        add_row_sums(st, rescale, ls);
      }
      if (lane == 0) mbar_arrive(kv_free(i % T::kStages));  // this warp is done reading the stage
    };
    const auto direct_rescale = [&]() {  // "fp32": O is the PV accumulator; rescale it first
      if constexpr (kAccum == PvAccum::kDirect) {
        rescale_rows<T::kOTiles>(o, rescale);
        fence_registers(o);
      }
    };
    int i = 0;
    for (;; ++i) {
      entry = next_entry(i + 1);
      if (entry == kEndOfSteps) break;
      step_scales(i + 1, entry, k_scale);
      direct_rescale();
      take_turn();
      issue_qk(i + 1, acc);
      pv_step(i, pa);
      pass_turn();
      float rescale_next[2];
      wgmma_wait<1>();  // S(i+1) is done; P(i) V(i) may still run (groups retire in order)
      fence_registers(acc);
      softmax(entry, acc, k_scale, sc, rescale_next);
      wgmma_wait<0>();
      finish_pv(i);
      pack_p_e4m3<T>(pa, sc);
      rescale[0] = rescale_next[0], rescale[1] = rescale_next[1];
    }
    direct_rescale();
    take_turn();
    pv_step(i, pa);
    pass_turn();
    wgmma_wait<0>();
    finish_pv(i);
    entries = i + 1;
  }
  if (T::kTurns && consumer == 0) named_barrier_sync(my_turn, 256);
  // Without turns nothing bounds how far the consumers drift apart: all must be done with the
  // ring before any stages its output there.
  if (!T::kTurns) named_barrier_sync(1, 128 * T::kConsumers);

  const OutputRows rows = output_rows(p, b, h, q_span, bhq);
  const float* col_scale = reinterpret_cast<const float*>(p.v_scale) + static_cast<long long>(bhk) * kHeadDim;
  const float* col_bias = p.v_mean != 0 ? reinterpret_cast<const float*>(p.v_mean) + static_cast<long long>(bhk) * kHeadDim
                                        : nullptr;
  // Stage slots `entries` and `entries + 1` (mod kStages) held steps entries-4 and entries-3 (or
  // nothing, or the sparse end marker, whose tile area no copy writes): every consumer waited
  // for its products of those steps before its last turn, and all copies are done, while the
  // other consumers' last products may still read the latest two. A slot holds two consumers'
  // output rows (4 warps x 16 rows x kHeadDim x 2 bytes each).
  static_assert(T::kStageBytes >= 2 * 4 * 32 * kHeadDim && T::kConsumers <= 4, "two consumers per slot");
  const u32 staging = stage_k((entries + (T::kConsumers == 2 ? consumer : consumer / 2)) % T::kStages) +
                      static_cast<u32>((T::kConsumers == 2 ? 0 : (consumer % 2) * 4) + warp) * 32 * kHeadDim;
  keep_quad_leader_sums(st, lane);
  store_output<T>(p, rows, o, st, kLog2PScale, col_scale, col_bias, row0, lane,
                  smem_raw + (staging - smem_addr(smem_raw)));
  }
}

}  // namespace sm90
}  // namespace sageattn
