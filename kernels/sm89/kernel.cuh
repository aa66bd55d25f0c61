// The sm89 tree: INT8 QK^T + FP8 PV attention with mma.sync (SageAttention2, arXiv:2411.10958,
// and SageAttention2++'s fp16-accumulated FP8 PV), for sm_89 (Ada) and sm_120/121 (Blackwell
// consumer). Runs on sm_90 too (the e4m3 mma is emulated there with fp16 MMAs), which is how it
// is tested on an H100. The main loop is the shared mma.sync one; this tree contributes traits
// and the FP8 PV product.
#pragma once

#include "../common/mainloop_mma_sync.cuh"
#include "../common/quantize.cuh"
#include "mma_pv.cuh"

namespace sageattn {
namespace sm89 {

/// PV policy: P scaled into E4M3 by 448 (= 2^log2(448)); epilogue multiplies each channel by
/// V's scale and adds V's mean back (rows of P sum to 1).
template <PvAccum kAccum>
struct PvFp8 {
  static constexpr float kLog2PScale = 8.807354922057604f;  // log2(448)
  template <class T>
  static __device__ __forceinline__ void mma(float (&o)[T::kOTiles][4], const float (&p)[T::kKTiles][4],
                                             u32 smem_v, int lane) {
    mma_pv<T, kAccum>(o, p, smem_v, lane);
  }
  template <class T>
  static __device__ __forceinline__ const float* col_scale(const AttnParams& p, long long bhk) {
    return reinterpret_cast<const float*>(p.v_scale) + bhk * T::kHeadDim;
  }
  template <class T>
  static __device__ __forceinline__ const float* col_bias(const AttnParams& p, long long bhk) {
    return p.v_mean != 0 ? reinterpret_cast<const float*>(p.v_mean) + bhk * T::kHeadDim : nullptr;
  }
};

template <int kHeadDim, PvAccum kAccum>
__device__ __forceinline__ void attention(const AttnParams& p) {
  attention_mma_sync<Traits<kHeadDim>, PvFp8<kAccum>>(p);
}

}  // namespace sm89
}  // namespace sageattn
