// Tile shapes and shared-memory layout of the sm80 tree (INT8 QK^T + FP16 PV, mma.sync).
#pragma once

#include "../common/mma_sync_cta.cuh"

namespace sageattn {
namespace sm80 {

template <int kHeadDim>
struct Traits : MmaSyncCta<kHeadDim> {
  using Cta = MmaSyncCta<kHeadDim>;
  static constexpr int kVRows = Cta::kBlockK;      // V tile: keys x head dim, fp16
  static constexpr int kVChunks = kHeadDim / 8;    // 16-byte chunks per fp16 row
  static constexpr int kVBytes = Cta::kBlockK * kHeadDim * 2;
  static constexpr int kStageBytes = Cta::kKBytes + kVBytes;
  // Layout: [Q][K0 V0][K1 V1][mask window]; all offsets multiples of 16 bytes (cp.async, ldmatrix).
  static constexpr int kMaskOffset = Cta::kQBytes + Cta::kStages * kStageBytes;
  static constexpr int kSmemBytes = kMaskOffset + Cta::kMaskWindowBytes;
};

}  // namespace sm80
}  // namespace sageattn
