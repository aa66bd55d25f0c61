// Tile shapes and shared-memory layout of the sm120 tree (NVFP4 QK^T and PV, mma.sync m16n8k64).
#pragma once

#include "../common/quantize.cuh"
#include "../common/mma_sync_cta.cuh"
#include "fp4_numeric.cuh"

namespace sageattn {
namespace sm120 {

template <int kHeadDim>
struct Traits : MmaSyncCta<kHeadDim> {
  using Cta = MmaSyncCta<kHeadDim>;
  // The mma.sync CTA shape: 4 warps x 16 query rows, half a quantizer Q block per CTA; 64 keys
  // per block, which is one m16n8k64 k-step of the PV product. (Cta's int8 byte counts do not
  // apply: FP4 rows are packed, below.)
  using Cta::kBlockK;
  using Cta::kBlockQ;
  using Cta::kThreads;
  static constexpr int kQkSteps = kHeadDim / 64;   // m16n8k64 steps of QK^T
  static constexpr int kRowBytes = kHeadDim / 2;   // packed E2M1 Q/K row
  static constexpr int kRowScales = kHeadDim / kSfGroup;
  // Shared memory, one stage (a 2-stage pipeline waits for a Blackwell part to be measured on):
  // [Q codes][Q scales][q_mean][dS][K codes][K scales][V^T codes][V^T scales], 16-byte aligned.
  static constexpr int kQCodes = 0;
  static constexpr int kQScales = kQCodes + kBlockQ * kRowBytes;
  static constexpr int kQMean = kQScales + kBlockQ * kRowScales;
  static constexpr int kDelta = kQMean + kHeadDim * 4;
  static constexpr int kKCodes = kDelta + kBlockK * 4;
  static constexpr int kKScales = kKCodes + kBlockK * kRowBytes;
  static constexpr int kVCodes = kKScales + kBlockK * kRowScales;
  static constexpr int kVScales = kVCodes + kHeadDim * (kBlockK / 2);
  static constexpr int kSmemBytes = kVScales + kHeadDim * (kBlockK / kSfGroup);
};

}  // namespace sm120
}  // namespace sageattn
