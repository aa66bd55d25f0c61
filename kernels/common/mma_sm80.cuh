// Warp-level tensor-core and data-movement wrappers available from sm_80 on (mma.sync,
// ldmatrix, cp.async). Fragment layouts are the PTX ISA's; each wrapper names its shape.
#pragma once

#include "numeric.cuh"

namespace sageattn {

/// @brief Shared-memory byte address of a generic pointer, for PTX operands.
__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

/// @brief 16-byte asynchronous global -> shared copy, bypassing L1.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

/// @brief Wait until at most N committed groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

/// @brief Four 8x8 b16 matrices from shared memory; lane t gives the row address of matrix t/8.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

/// @brief As ldmatrix_x4, each matrix transposed (rows become columns).
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

/// @brief D(16x8 s32) += A(16x32 s8, row) * B(32x8 s8, col).
__device__ __forceinline__ void mma_s8_m16n8k32(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// @brief D(16x8 f32) += A(16x16 f16, row) * B(16x8 f16, col).
__device__ __forceinline__ void mma_f16_m16n8k16_f32acc(float (&d)[4], const u32 (&a)[4], u32 b0,
                                                        u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// @brief D(16x8 f16x2) += A(16x16 f16) * B(16x8 f16): fp16 accumulation.
__device__ __forceinline__ void mma_f16_m16n8k16_f16acc(u32 (&d)[2], const u32 (&a)[4], u32 b0,
                                                        u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%0,%1}, {%2,%3,%4,%5}, {%6,%7}, "
      "{%0,%1};"
      : "+r"(d[0]), "+r"(d[1])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// @brief Index of 16-byte chunk `chunk` of row `row` in a tile whose rows hold kChunks
/// chunks, XOR-swizzled so that the 8 row addresses of one ldmatrix fall in 8 distinct
/// 16-byte bank groups (no conflicts for a column of chunks).
template <int kChunks>
__device__ __forceinline__ int swizzled_chunk(int row, int chunk) {
  static_assert(kChunks == 4 || kChunks % 8 == 0, "row must be 64 bytes or a multiple of 128");
  const int flip = kChunks == 4 ? ((row >> 1) & 3) : (row & 7);
  return row * kChunks + (chunk ^ flip);
}

/// @brief Byte offset of (row, chunk) in a swizzled tile, for rows a warp's ldmatrix walks in
/// steps of 8: the swizzle repeats every 8 rows (and every 8 chunks of a row of >= 8 chunks),
/// so offset(row + 8m, chunk + 8n) = offset(row, chunk) + (8m * kChunks + 8n) * 16. Callers keep
/// offset(lane's row, lane's chunk) per distinct chunk phase and add the rest as constants.
template <int kChunks>
__device__ __forceinline__ u32 swizzled_offset(int row, int chunk) {
  return static_cast<u32>(swizzled_chunk<kChunks>(row, chunk)) * 16u;
}

/// @brief Max over the 4 lanes of a quad (the lanes that share an accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

/// @brief Sum over the 4 lanes of a quad.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace sageattn
