// Tile shapes and shared-memory layout of the sm90 tree (INT8 QK^T + FP8 PV with wgmma).
#pragma once

#include "../common/quantize.cuh"  // kQBlockRows, kKBlockRows: the quantizer's blocks
#include "wgmma.cuh"

namespace sageattn {
namespace sm90 {

template <int kHeadDim_, int kConsumers_ = 2>
struct Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "native head dims");
  // A producer warpgroup (copies) and kConsumers consumer warpgroups of 64 query rows each
  // (wgmma's M). Two consumers: one CTA = one quantizer Q block (128 rows). Three: 192 rows, a
  // block and a half (NOTES.md sm90 v11-v12: a warpgroup's softmax outlasts its products, so a
  // third hides more of it). Each consumer warp's 16 rows lie in one quantizer block, whose
  // per-thread Q scale slots line up with the wgmma accumulator rows.
  static constexpr int kConsumers = kConsumers_;
  static_assert(kConsumers == 2 || kConsumers == 3, "2 or 3 consumers");
  // Intra-warpgroup overlap (S(t+1) issued with P(t)V(t)) holds a second score tile, for which
  // 160 registers (three consumers) leave no room at hd128: there each step runs in order.
  static constexpr bool kOverlap = kConsumers == 2 || kHeadDim == 64;
  // Overlapping consumers take turns issuing their products (ping-pong); in-order consumers
  // issue freely (v12: turns cost them 7-13%).
  static constexpr bool kTurns = kOverlap;
  static constexpr int kBlockQ = 64 * kConsumers;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kBlockK = 2 * kKBlockRows;  // keys per step: the wgmma N of QK^T
  // S(t+1) is issued while step t is still in flight, so a step's copy must land while the step
  // before it computes: 4 stages (NOTES.md sm90 v6: 2, 3, 4 stages = 649, 833, 847 TOPS).
  static constexpr int kStages = 4;
  static constexpr int kProducerRegs = 24, kConsumerRegs = kConsumers == 2 ? 240 : 160;
  static_assert(128 * (kProducerRegs + kConsumers * kConsumerRegs) <= 65536, "the register file");

  static constexpr int kKTiles = kBlockK / 8;   // m16n8 score tiles per warp per step
  static constexpr int kOTiles = kHeadDim / 8;  // m16n8 output tiles per warp
  // Q and K: rows of kHeadDim int8 (K-major), one swizzle span per row.
  static constexpr Swizzle kQkSwizzle = kHeadDim == 128 ? Swizzle::k128B : Swizzle::k64B;
  static constexpr u32 kQkGroupBytes = 8 * kHeadDim;
  // V^T: per 64-key block, kHeadDim rows of 64 e4m3 keys (K-major for the PV product).
  static constexpr Swizzle kVSwizzle = Swizzle::k64B;
  static constexpr u32 kVGroupBytes = 8 * kKBlockRows;
  static constexpr u32 kVBlockBytes = kHeadDim * kKBlockRows;
  // In a stage each V^T block is followed by 8 rows (one swizzle group) of E4M3 ones, so the
  // "fp32+fp32" P V product (N = kHeadDim + 8) yields the rows' sums of P in its last 8 columns
  // (NOTES.md sm90 v19). The gap is padded to 1024 bytes: every block keeps the alignment the
  // K tiles' copies have (the 128B swizzle's period; the V copies' 64B swizzle needs 512).
  static constexpr u32 kSumRowsBytes = 8 * kKBlockRows;
  static constexpr u32 kVBlockStride = kVBlockBytes + 1024;

  static constexpr int kQBytes = kBlockQ * kHeadDim;
  // The caller's 16-bit Q rows, unswizzled, when the kernel quantizes Q itself
  // (Sm90AttnParams::q_source_dtype >= 0).
  static constexpr int kQSourceBytes = 2 * kBlockQ * kHeadDim;
  static constexpr int kKBytes = kBlockK * kHeadDim;
  static constexpr int kVBytes = kBlockK * kHeadDim;  // copied per step
  static constexpr int kStageBytes = kKBytes + 2 * kVBlockStride;
  static constexpr int kBarriers = 1 + 3 * kStages;  // Q full; K full, V full, K/V free per stage
  // [align slack][Q][Q source][stage 0: K, V^T block, ones, V^T block, ones]...[ones tile]
  // [barriers][step entry per stage][8 K scales per stage, 16-byte aligned]; tiles on 1024-byte
  // boundaries (the 128B swizzle's period), which every size above is a multiple of.
  static constexpr int kSmemBytes = 1024 + kQBytes + kQSourceBytes + kStages * kStageBytes + kOnesTileBytes +
                                    8 * kBarriers + 4 * kStages + 16 + 32 * kStages;
};

}  // namespace sm90
}  // namespace sageattn
