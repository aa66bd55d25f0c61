// The sm80 tree: INT8 QK^T + FP16 PV attention with mma.sync (SageAttention2's INT8+FP16
// path, arXiv:2411.10958 §3-4), for sm_80 and every later architecture. The main loop is the
// shared mma.sync one (common/mainloop_mma_sync.cuh); this tree contributes its tile traits
// (traits.cuh) and its PV product (mma_pv.cuh).
#pragma once

#include "../common/mainloop_mma_sync.cuh"
#include "../common/quantize.cuh"
#include "mma_pv.cuh"

namespace sageattn {
namespace sm80 {

/// PV policy: P rounded to fp16, V converted to fp16 by the quantizer; no epilogue terms.
template <PvAccum kAccum>
struct PvFp16 {
  static constexpr float kLog2PScale = 0.f;
  template <class T>
  static __device__ __forceinline__ void mma(float (&o)[T::kOTiles][4], const float (&p)[T::kKTiles][4],
                                             u32 smem_v, int lane) {
    mma_pv<T, kAccum>(o, p, smem_v, lane);
  }
  template <class T>
  static __device__ __forceinline__ const float* col_scale(const AttnParams&, long long) { return nullptr; }
  template <class T>
  static __device__ __forceinline__ const float* col_bias(const AttnParams&, long long) { return nullptr; }
};

template <int kHeadDim, PvAccum kAccum>
__device__ __forceinline__ void attention(const AttnParams& p) {
  attention_mma_sync<Traits<kHeadDim>, PvFp16<kAccum>>(p);
}

}  // namespace sm80
}  // namespace sageattn
