// Tensor-pipe cycles of the wgmma shapes of the sm90 kernel's steps (NOTES.md sm90 v19): the P V
// product of a 32-key slice as m64n128k32 alone, beside the m64n8k32 all-ones product that took
// the row sums before v19, and as one m64n136k32; S as m64n128k32; and a whole step's products
// (S as eight m64n64k32, wait, then P V). One CTA per SM with one or three warpgroups, each
// issuing `iters` rounds (commit, wait); clock64 cycles per round, operands all zero. Standalone:
//
//     nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -o wgmma_shapes bench/wgmma_shapes.cu
//     ./wgmma_shapes        # on an sm_90 GPU
#include <cstdio>
#include <cuda_runtime.h>

typedef unsigned long long u64;
typedef unsigned u32;

// K-major, unswizzled operand descriptor (the data are zeros: only the shapes are timed).
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
  return static_cast<u64>((addr & 0x3FFFF) >> 4) | (static_cast<u64>(lbo >> 4) << 16) |
         (static_cast<u64>(sbo >> 4) << 32);
}
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

// D(64x8 f32) += A(64x32 e4m3, registers) B(32x8 e4m3, shared)
__device__ __forceinline__ void pv_n8(float* d, const u32* a, u64 b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, 1, 1, 1;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// D(64x8 f32) = A(64x32 e4m3, registers) B(32x8 e4m3, shared)
__device__ __forceinline__ void pv0_n8(float* d, const u32* a, u64 b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, 0, 1, 1;"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// D(64x128 f32) += A(64x32 e4m3, registers) B(32x128 e4m3, shared)
__device__ __forceinline__ void pv_n128(float* d, const u32* a, u64 b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, 1, 1, 1;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// D(64x128 f32) = A(64x32 e4m3, registers) B(32x128 e4m3, shared)
__device__ __forceinline__ void pv0_n128(float* d, const u32* a, u64 b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, 0, 1, 1;"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]),
        "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]),
        "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]),
        "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]),
        "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]),
        "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47]),
        "=f"(d[48]), "=f"(d[49]), "=f"(d[50]), "=f"(d[51]), "=f"(d[52]), "=f"(d[53]), "=f"(d[54]), "=f"(d[55]),
        "=f"(d[56]), "=f"(d[57]), "=f"(d[58]), "=f"(d[59]), "=f"(d[60]), "=f"(d[61]), "=f"(d[62]), "=f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// D(64x136 f32) += A(64x32 e4m3, registers) B(32x136 e4m3, shared)
__device__ __forceinline__ void pv_n136(float* d, const u32* a, u64 b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n136k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67}, {%68, %69, %70, %71}, %72, 1, 1, 1;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// D(64x136 f32) = A(64x32 e4m3, registers) B(32x136 e4m3, shared)
__device__ __forceinline__ void pv0_n136(float* d, const u32* a, u64 b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n136k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67}, {%68, %69, %70, %71}, %72, 0, 1, 1;"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]),
        "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]),
        "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]),
        "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]),
        "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]),
        "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47]),
        "=f"(d[48]), "=f"(d[49]), "=f"(d[50]), "=f"(d[51]), "=f"(d[52]), "=f"(d[53]), "=f"(d[54]), "=f"(d[55]),
        "=f"(d[56]), "=f"(d[57]), "=f"(d[58]), "=f"(d[59]), "=f"(d[60]), "=f"(d[61]), "=f"(d[62]), "=f"(d[63]),
        "=f"(d[64]), "=f"(d[65]), "=f"(d[66]), "=f"(d[67])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// D(64x128 s32) += A(64x32 s8, shared) B(32x128 s8, shared)
__device__ __forceinline__ void qk_n128(int* d, u64 a, u64 b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, 1;"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(a), "l"(b));
}

// D(64x64 s32) += A(64x32 s8, shared) B(32x64 s8, shared)
__device__ __forceinline__ void qk_n64(int* d, u64 a, u64 b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, 1;"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "l"(a), "l"(b));
}

// D(64x64 s32) = A(64x32 s8, shared) B(32x64 s8, shared)
__device__ __forceinline__ void qk0_n64(int* d, u64 a, u64 b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, 0;"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]), "=r"(d[4]), "=r"(d[5]), "=r"(d[6]), "=r"(d[7]),
        "=r"(d[8]), "=r"(d[9]), "=r"(d[10]), "=r"(d[11]), "=r"(d[12]), "=r"(d[13]), "=r"(d[14]), "=r"(d[15]),
        "=r"(d[16]), "=r"(d[17]), "=r"(d[18]), "=r"(d[19]), "=r"(d[20]), "=r"(d[21]), "=r"(d[22]), "=r"(d[23]),
        "=r"(d[24]), "=r"(d[25]), "=r"(d[26]), "=r"(d[27]), "=r"(d[28]), "=r"(d[29]), "=r"(d[30]), "=r"(d[31])
      : "l"(a), "l"(b));
}

enum Variant { kPv, kPvOnes, kPv136, kS, kStep, kStepOnes, kStep136 };

template <Variant kVariant, int kWarpgroups>
__global__ void __launch_bounds__(128 * kWarpgroups) rounds(int iters, long long* cycles, float* sink) {
  extern __shared__ __align__(1024) char smem[];
  for (int i = threadIdx.x; i < 65536 / 4; i += blockDim.x) reinterpret_cast<u32*>(smem)[i] = 0;
  __syncthreads();
  const u32 base = static_cast<u32>(__cvta_generic_to_shared(smem));
  const u64 q = smem_desc(base, 128, 256), k = smem_desc(base + 8192, 128, 256);
  const u64 v = smem_desc(base + 16384, 128, 256), ones = smem_desc(base + 32768, 128, 256);
  float o[68];
  int s[64];
  u32 a[4] = {0u, 0u, 0u, 0u};
  for (int i = 0; i < 68; ++i) o[i] = 0.f;
  for (int i = 0; i < 64; ++i) s[i] = 0;
  const long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
    fence();
    if constexpr (kVariant >= kStep) {  // S in two N=64 halves, wait, then P V from zero
      int sc[64];
      qk0_n64(sc, q, k);
#pragma unroll
      for (int c = 1; c < 4; ++c) qk_n64(sc, q + 2 * c, k + 2 * c);
      qk0_n64(sc + 32, q, k + 512);
#pragma unroll
      for (int c = 1; c < 4; ++c) qk_n64(sc + 32, q + 2 * c, k + 512 + 2 * c);
      commit();
      wait_all();
      a[0] += sc[0];
      a[1] += sc[33];
      fence();
      float blk[68];
      if constexpr (kVariant == kStep) {
        pv0_n128(blk, a, v);
#pragma unroll
        for (int c = 1; c < 4; ++c) pv_n128(blk, a, v + 2 * c);
      } else if constexpr (kVariant == kStepOnes) {
        pv0_n128(blk, a, v);
        pv0_n8(blk + 64, a, ones);
#pragma unroll
        for (int c = 1; c < 4; ++c) pv_n128(blk, a, v + 2 * c), pv_n8(blk + 64, a, ones);
      } else {
        pv0_n136(blk, a, v);
#pragma unroll
        for (int c = 1; c < 4; ++c) pv_n136(blk, a, v + 2 * c);
      }
      commit();
      wait_all();
#pragma unroll
      for (int i = 0; i < 64; ++i) o[i & 7] += blk[i];
      if constexpr (kVariant != kStep) o[64] += blk[64];
      continue;
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if constexpr (kVariant == kPv) pv_n128(o, a, v + 2 * c);
      if constexpr (kVariant == kPvOnes) pv_n128(o, a, v + 2 * c), pv_n8(o + 64, a, ones);
      if constexpr (kVariant == kPv136) pv_n136(o, a, v + 2 * c);
      if constexpr (kVariant == kS) qk_n128(s, q + 2 * c, k + 2 * c);
    }
    commit();
    wait_all();
  }
  const long long t1 = clock64();
  float keep = 0.f;  // results reach memory only if nonzero (never): the products stay live
  for (int i = 0; i < 68; ++i) keep += o[i];
  for (int i = 0; i < 64; ++i) keep += static_cast<float>(s[i]);
  if (keep != 0.f) sink[threadIdx.x] = keep;
  if (threadIdx.x % 128 == 0) cycles[blockIdx.x * 4 + threadIdx.x / 128] = (t1 - t0) / iters;
}

template <Variant kVariant, int kWarpgroups>
void report(const char* name, int sms) {
  long long* cycles;
  float* sink;
  cudaMalloc(&cycles, sms * 4 * sizeof(long long));
  cudaMalloc(&sink, 4096);
  cudaFuncSetAttribute(rounds<kVariant, kWarpgroups>, cudaFuncAttributeMaxDynamicSharedMemorySize, 65536);
  rounds<kVariant, kWarpgroups><<<sms, 128 * kWarpgroups, 65536>>>(100, cycles, sink);  // warm-up
  rounds<kVariant, kWarpgroups><<<sms, 128 * kWarpgroups, 65536>>>(4000, cycles, sink);
  long long host[1024];
  cudaMemcpy(host, cycles, sms * 4 * sizeof(long long), cudaMemcpyDeviceToHost);
  double mean = 0;
  for (int i = 0; i < sms; ++i)
    for (int w = 0; w < kWarpgroups; ++w) mean += host[i * 4 + w];
  mean /= sms * kWarpgroups;
  printf("%-40s %d warpgroup(s): %7.1f cycles per round, %6.1f per round of the SM  (%s)\n", name, kWarpgroups, mean,
         mean / kWarpgroups, cudaGetErrorString(cudaGetLastError()));
  cudaFree(cycles);
  cudaFree(sink);
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  if (sms > 256) sms = 256;
  report<kPv, 1>("P V: 4 x n128", sms);
  report<kPvOnes, 1>("P V + sums: 4 x (n128 + n8)", sms);
  report<kPv136, 1>("P V + sums: 4 x n136", sms);
  report<kS, 1>("S: 4 x n128 s8", sms);
  report<kPv, 3>("P V: 4 x n128", sms);
  report<kPvOnes, 3>("P V + sums: 4 x (n128 + n8)", sms);
  report<kPv136, 3>("P V + sums: 4 x n136", sms);
  report<kS, 3>("S: 4 x n128 s8", sms);
  report<kStep, 3>("step: S 8 x n64, P V 4 x n128", sms);
  report<kStepOnes, 3>("step: S 8 x n64, P V 4 x (n128 + n8)", sms);
  report<kStep136, 3>("step: S 8 x n64, P V 4 x n136", sms);
  return 0;
}
