// The attention main loop shared by the mma.sync trees (sm80: FP16 PV, sm89: FP8 PV). A tree
// supplies its Traits and a PV policy:
//   struct Pv { static constexpr float kLog2PScale;            // P scaled by 2^kLog2PScale
//               template <class T> static void mma(o, p, smem_v, lane);   // O += P V (one block)
//               template <class T> static const float* col_scale(p, bhk), *col_bias(p, bhk); }  // epilogue
// Roles: load (smem_tiles.cuh) -> S = QK^T, dequantize, mask (qk_int8_mma.cuh) -> online
// softmax (online_softmax.cuh) -> O += PV (the policy) -> epilogue_mma_sync.cuh.
#pragma once

#include "epilogue_mma_sync.cuh"
#include "kept_blocks.cuh"
#include "pv_accumulate.cuh"
#include "qk_int8_mma.cuh"
#include "quantize.cuh"  // kQBlockRows: the quantizer's Q block
#include "smem_tiles.cuh"
#include "visible_keys.cuh"

namespace sageattn {

/// Grid (q_blocks * 128 / T::kBlockQ, Hq, B), T::kThreads threads, T::kSmemBytes dynamic shared memory.
template <class T, class Pv>
__device__ __forceinline__ void attention_mma_sync(const AttnParams& p) {
  extern __shared__ __align__(128) char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // A CTA takes 1/kQSplit of a quantizer Q block (128 rows, one scale slot set per warp).
  constexpr int kQSplit = kQBlockRows / T::kBlockQ;
  const int n_ctas = p.q_blocks * kQSplit;
  // Causal: the last query blocks see the most keys; launch them first.
  const int cta = p.causal ? n_ctas - 1 - static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x);
  const int qb = cta / kQSplit;                                      // quantizer Q block
  const int slot_warp = (cta % kQSplit) * T::kWarps + warp;          // warp index within it
  const int h = blockIdx.y, b = blockIdx.z;
  const int hkv = h / (p.heads_q / p.heads_kv);
  const SeqSpan q_span = seq_span(p.cu_seqlens_q, b, p.seq_q);
  const SeqSpan k_span = seq_span(p.cu_seqlens_k, b, p.seq_k);
  const int q0 = cta * T::kBlockQ;
  if (q0 >= q_span.len) return;  // past this (varlen) sequence's end: nothing to write
  const int row0 = q0 + warp * 16 + lane / 4;  // the thread's first row (second: +8)

  const VisibleKeys keys = visible_keys<T::kBlockQ, T::kBlockK>(p, q0, q_span, k_span);
  const int n_blocks = keys.n_blocks, first_masked = keys.first_masked;
  const long long causal_offset = keys.causal_offset;
  KeptBlocks<T::kThreads> kept;
  kept.mask_row = p.block_mask == 0 ? nullptr
                                    : reinterpret_cast<const signed char*>(p.block_mask) + b * p.mask_stride_b +
                                          h * p.mask_stride_h + qb * p.mask_stride_q;
  kept.stride = p.mask_stride_k;
  kept.words = reinterpret_cast<u32*>(smem + T::kMaskOffset);
  kept.n_blocks = n_blocks;
  kept.window_end = 0;

  const long long bhq = static_cast<long long>(b) * p.heads_q + h;
  const long long bhk = static_cast<long long>(b) * p.heads_kv + hkv;
  const char* q_block = reinterpret_cast<const char*>(p.q_int8) + (bhq * p.q_blocks * kQSplit + cta) * T::kQBytes;
  const char* k_head = reinterpret_cast<const char*>(p.k_int8) + bhk * p.k_blocks * T::kKBytes;
  const char* v_head = reinterpret_cast<const char*>(p.v) + bhk * p.k_blocks * T::kVBytes;
  const float q_scale = reinterpret_cast<const float*>(p.q_scale)[(bhq * p.q_blocks + qb) * 64 + slot_warp * 8 + lane / 4];
  const float* k_scales = reinterpret_cast<const float*>(p.k_scale) + bhk * p.k_blocks * 4 + lane % 4;

  const u32 smem_q = smem_addr(smem);
  const u32 smem_kv = smem_q + T::kQBytes;

  float o[T::kOTiles][4];
#pragma unroll
  for (int dc = 0; dc < T::kOTiles; ++dc)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dc][e] = 0.f;
  RowStats st;

  // kStages-deep cp.async pipeline over the kept key blocks: the i-th kept block's copies form
  // commit group i (Q joins group 0); every iteration commits one group, empty past the last
  // block, so the counts stay uniform. One cursor walks the kept blocks (the copies run ahead);
  // in_flight remembers which blocks the pending groups hold, oldest first (n_blocks: none).
  int next_load = kept.first();
  int loads_issued = 0;
  const auto load_next = [&]() {
    const int kb = next_load;
    if (kb < n_blocks) {
      load_kv_stage<T>(smem_kv + (loads_issued % T::kStages) * T::kStageBytes,
                       k_head + static_cast<long long>(kb) * T::kKBytes,
                       v_head + static_cast<long long>(kb) * T::kVBytes);
      next_load = kept.next(kb);
    }
    ++loads_issued;
    cp_async_commit();
    return kb;
  };
  if (next_load < n_blocks) load_q_tile<T>(smem_q, q_block);
  int in_flight[T::kStages - 1];
#pragma unroll
  for (int i = 0; i < T::kStages - 1; ++i) in_flight[i] = load_next();
  u32 qf[T::kHeadDim / 32][4];
  for (int it = 0; in_flight[0] < n_blocks; ++it) {
    const int kb = in_flight[0];
    const u32 stage = smem_kv + (it % T::kStages) * T::kStageBytes;
    // Issued before the barrier (a plain load does not cross it), so its latency hides behind
    // the wait and the QK^T MMAs.
    const float k_scale = k_scales[kb * 4];
#pragma unroll
    for (int i = 0; i + 1 < T::kStages - 1; ++i) in_flight[i] = in_flight[i + 1];
    in_flight[T::kStages - 2] = load_next();  // into the stage computed on in iteration it - 1
    cp_async_wait<T::kStages - 1>();          // block kb has landed (this thread's copies)
    __syncthreads();                          // ... and everyone's
    if (it == 0) load_q_fragments<T>(qf, smem_q, warp, lane);

    int acc[T::kKTiles][4];
    mma_qk<T>(acc, qf, stage, lane);
    float s[T::kKTiles][4];
    dequantize_and_mask<T>(s, acc, q_scale * k_scale, kb >= first_masked, kb * T::kBlockK, row0,
                           k_span.len, p.causal != 0, causal_offset, lane);
    float rescale[2];
    online_softmax_step<T::kKTiles>(s, st, rescale, Pv::kLog2PScale);
    rescale_rows<T::kOTiles>(o, rescale);
    Pv::template mma<T>(o, s, stage + T::kKBytes, lane);
    __syncthreads();  // the next iteration's copy overwrites the stage read here
  }

  // The loop's last barrier retired every read of the K/V stages (and no copy is pending):
  // each warp stages its output rows there.
  static_assert(T::kStageBytes >= T::kWarps * 32 * T::kHeadDim, "a stage holds the CTA's output rows");
  const OutputRows rows = output_rows(p, b, h, q_span, bhq);
  store_output<T>(p, rows, o, st, Pv::kLog2PScale, Pv::template col_scale<T>(p, bhk),
                  Pv::template col_bias<T>(p, bhk), row0, lane, smem + T::kQBytes + warp * 32 * T::kHeadDim);
}

}  // namespace sageattn
