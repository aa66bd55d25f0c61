// Tile shapes and shared-memory layout of the sm89 tree (INT8 QK^T + FP8 PV, mma.sync).
#pragma once

#include "../common/mma_sync_cta.cuh"

namespace sageattn {
namespace sm89 {

template <int kHeadDim>
struct Traits : MmaSyncCta<kHeadDim> {
  using Cta = MmaSyncCta<kHeadDim>;
  static constexpr int kVRows = kHeadDim;          // V^T tile (E4M3): one row per channel
  static constexpr int kVChunks = Cta::kBlockK / 16;  // 64 one-byte key slots per row
  static constexpr int kVBytes = Cta::kBlockK * kHeadDim;
  static constexpr int kStageBytes = Cta::kKBytes + kVBytes;
  // Layout: [Q][K0 V^T0][K1 V^T1][mask window]; all offsets multiples of 16 bytes (cp.async, ldmatrix).
  static constexpr int kMaskOffset = Cta::kQBytes + Cta::kStages * kStageBytes;
  static constexpr int kSmemBytes = kMaskOffset + Cta::kMaskWindowBytes;
};

}  // namespace sm89
}  // namespace sageattn
