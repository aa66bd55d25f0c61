// Tile shapes and shared-memory layout of the sm89 tree (INT8 QK^T + FP8 PV, mma.sync).
#pragma once

#include "../common/quantize.cuh"

namespace sageattn {
namespace sm89 {

template <int kHeadDim_>
struct Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "native head dims");
  // Same CTA shape as the sm80 tree (128 query rows, 8 warps x 16, 64-key blocks): QK^T is
  // identical; only V's tile differs (FP8, transposed: head dim rows x 64 key slots).
  static constexpr int kBlockQ = 64;  // half a quantizer Q block: two CTAs per SM interleave
  static constexpr int kBlockK = kKBlockRows;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 2;  // 3 stages measured no faster (NOTES.md)

  static constexpr int kQkChunks = kHeadDim / 16;   // 16-byte chunks per int8 row
  static constexpr int kVRows = kHeadDim;           // V^T tile: one row per channel
  static constexpr int kVChunks = kBlockK / 16;     // 64 one-byte key slots per row
  static constexpr int kKTiles = kBlockK / 8;
  static constexpr int kOTiles = kHeadDim / 8;

  static constexpr int kQBytes = kBlockQ * kHeadDim;
  static constexpr int kKBytes = kBlockK * kHeadDim;
  static constexpr int kVBytes = kBlockK * kHeadDim;
  static constexpr int kStageBytes = kKBytes + kVBytes;
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes;
};

}  // namespace sm89
}  // namespace sageattn
