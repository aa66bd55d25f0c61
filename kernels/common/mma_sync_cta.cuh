// The CTA shape shared by the mma.sync trees (sm80, sm89): they differ only in V's tile.
#pragma once

#include "kept_blocks.cuh"
#include "quantize.cuh"

namespace sageattn {

template <int kHeadDim_>
struct MmaSyncCta {
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "native head dims");
  // 16 query rows per warp (one m16 tile: O is 16 x kHeadDim fp32, 64 registers at 128), 4 warps:
  // half a quantizer Q block per CTA, so two CTAs per SM interleave their phases and barriers
  // (NOTES.md v3: +11-20% over one 8-warp CTA).
  static constexpr int kBlockQ = 64;
  static constexpr int kBlockK = kKBlockRows;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 2;  // 3 stages measured no faster (NOTES.md v2)

  static constexpr int kQkChunks = kHeadDim / 16;  // 16-byte chunks per int8 row
  static constexpr int kKTiles = kBlockK / 8;      // m16n8 score tiles per warp per key block
  static constexpr int kOTiles = kHeadDim / 8;     // m16n8 output tiles per warp
  static constexpr int kQBytes = kBlockQ * kHeadDim;
  static constexpr int kKBytes = kBlockK * kHeadDim;
  static constexpr int kMaskWindowBytes = KeptBlocks<kThreads>::kSmemBytes;  // block-sparse bitmask
};

}  // namespace sageattn
