// Tile shapes and shared-memory layout of the sm120 tree (NVFP4 QK^T and PV, mma.sync m16n8k64).
#pragma once

#include "../common/quantize.cuh"
#include "fp4_numeric.cuh"

namespace sageattn {
namespace sm120 {

template <int kHeadDim_>
struct Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "native head dims");
  // 4 warps x 16 query rows (one m16 tile each): half a quantizer Q block per CTA, as in the
  // mma.sync trees. 64 keys per block: one m16n8k64 k-step of the PV product.
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockQ = 64;
  static constexpr int kBlockK = kKBlockRows;
  static constexpr int kKTiles = kBlockK / 8;      // m16n8 score tiles per key block
  static constexpr int kOTiles = kHeadDim / 8;     // m16n8 output tiles
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
