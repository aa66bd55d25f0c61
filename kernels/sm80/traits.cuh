// Tile shapes and shared-memory layout of the sm80 tree (INT8 QK^T + FP16 PV, mma.sync).
#pragma once

#include "../common/quantize.cuh"

namespace sageattn {
namespace sm80 {

template <int kHeadDim_>
struct Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "native head dims");
  // 16 query rows per warp (one m16 tile: O is 16 x kHeadDim fp32, 64 registers at 128),
  // 4 warps per CTA.
  static constexpr int kBlockQ = 64;  // half a quantizer Q block: two CTAs per SM interleave
  static constexpr int kBlockK = kKBlockRows;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 2;  // 3 stages measured no faster (NOTES.md)

  static constexpr int kQkChunks = kHeadDim / 16;  // 16-byte chunks per int8 row
  static constexpr int kVRows = kBlockK;           // V tile: keys x head dim, fp16
  static constexpr int kVChunks = kHeadDim / 8;    // 16-byte chunks per fp16 row
  static constexpr int kKTiles = kBlockK / 8;      // m16n8 score tiles per warp per key block
  static constexpr int kOTiles = kHeadDim / 8;     // m16n8 output tiles per warp

  static constexpr int kQBytes = kBlockQ * kHeadDim;
  static constexpr int kKBytes = kBlockK * kHeadDim;
  static constexpr int kVBytes = kBlockK * kHeadDim * 2;
  static constexpr int kStageBytes = kKBytes + kVBytes;
  // Layout: [Q][K0 V0][K1 V1]; all offsets multiples of 16 bytes (cp.async, ldmatrix).
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes;
};

}  // namespace sm80
}  // namespace sageattn
