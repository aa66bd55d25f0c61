// The attention main loop shared by the mma.sync trees (sm80: FP16 PV, sm89: FP8 PV). A tree
// supplies its Traits and a PV policy:
//   struct Pv { static constexpr float kLog2PScale;            // P scaled by 2^kLog2PScale
//               template <class T> static void mma(o, p, smem_v, lane);   // O += P V (one block)
//               template <class T> static const float* col_scale(p, bhk), *col_bias(p, bhk); }  // epilogue
// Roles: load (smem_tiles.cuh) -> S = QK^T, dequantize, mask (qk_int8_mma.cuh) -> online
// softmax (online_softmax.cuh) -> O += PV (the policy) -> epilogue_mma_sync.cuh.
#pragma once

#include "epilogue_mma_sync.cuh"
#include "pv_accumulate.cuh"
#include "qk_int8_mma.cuh"
#include "quantize.cuh"  // kQBlockRows: the quantizer's Q block
#include "smem_tiles.cuh"

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
  const long long q0 = static_cast<long long>(cta) * T::kBlockQ;
  const long long row0 = q0 + warp * 16 + lane / 4;  // the thread's first row (second: +8)

  // Key blocks this query block can see, and from which one masking is needed.
  int n_blocks = p.k_blocks;
  long long first_masked = p.seq_k / T::kBlockK;  // a partial last block needs the seq_k mask
  if (p.causal) {
    const long long last_visible = q0 + T::kBlockQ - 1 + p.causal_offset;
    n_blocks = last_visible < 0 ? 0
                                : static_cast<int>(min(static_cast<long long>(p.k_blocks), last_visible / T::kBlockK + 1));
    const long long first_row_limit = q0 + p.causal_offset;  // keys above it are masked for row q0
    const long long diag = first_row_limit < 0 ? 0 : (first_row_limit + 1) / T::kBlockK;
    first_masked = min(first_masked, diag);
  }

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

  // kStages-deep cp.async pipeline: block i's copies form commit group i (Q joins group 0);
  // every iteration commits one group, empty past the last block, so the counts stay uniform.
  const auto load_block = [&](int i) {
    if (i < n_blocks)
      load_kv_stage<T>(smem_kv + (i % T::kStages) * T::kStageBytes, k_head + static_cast<long long>(i) * T::kKBytes,
                       v_head + static_cast<long long>(i) * T::kVBytes);
  };
  if (n_blocks > 0) load_q_tile<T>(smem_q, q_block);
#pragma unroll
  for (int i = 0; i < T::kStages - 1; ++i) {
    load_block(i);
    cp_async_commit();
  }
  u32 qf[T::kHeadDim / 32][4];
  for (int kb = 0; kb < n_blocks; ++kb) {
    const u32 stage = smem_kv + (kb % T::kStages) * T::kStageBytes;
    load_block(kb + T::kStages - 1);  // into the stage computed on in iteration kb - 1
    cp_async_commit();
    cp_async_wait<T::kStages - 1>();  // block kb has landed (this thread's copies)
    __syncthreads();                  // ... and everyone's
    if (kb == 0) load_q_fragments<T>(qf, smem_q, warp, lane);

    int acc[T::kKTiles][4];
    mma_qk<T>(acc, qf, stage, lane);
    float s[T::kKTiles][4];
    dequantize_and_mask<T>(s, acc, q_scale * k_scales[kb * 4], kb >= first_masked, kb * T::kBlockK, row0,
                           p.seq_k, p.causal != 0, p.causal_offset, lane);
    float rescale[2];
    online_softmax_step<T::kKTiles>(s, st, rescale, Pv::kLog2PScale);
    rescale_rows<T::kOTiles>(o, rescale);
    Pv::template mma<T>(o, s, stage + T::kKBytes, lane);
    __syncthreads();  // the next iteration's copy overwrites the stage read here
  }
  store_output<T>(p, o, st, Pv::kLog2PScale, Pv::template col_scale<T>(p, bhk), Pv::template col_bias<T>(p, bhk), b,
                  h, row0, lane);
}

}  // namespace sageattn
