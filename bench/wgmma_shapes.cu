// Tensor-pipe cycles of the wgmma shapes of the sm90 kernel's steps (NOTES.md sm90 v19): the P V
// product of a 32-key slice as m64n128k32 alone, beside the m64n8k32 all-ones product that took
// the row sums before v19, and as one m64n136k32; S as m64n128k32; and a whole step's products
// (S as eight m64n64k32, wait, then P V). The products are the kernel's own wrappers
// (kernels/sm90/wgmma.cuh). One CTA per SM with one or three warpgroups, each issuing `iters`
// rounds (commit, wait); clock64 cycles per round, operands all zero. Standalone:
//
//     nvcc -O3 -std=c++17 -Ikernels -gencode arch=compute_90a,code=sm_90a \
//          -o wgmma_shapes bench/wgmma_shapes.cu
//     ./wgmma_shapes        # on an sm_90 GPU
#include <cstdio>
#include <cuda_runtime.h>

#include "sm90/wgmma.cuh"

using namespace sageattn;
using namespace sageattn::sm90;

// K-major, unswizzled operand descriptor (the data are zeros: only the shapes are timed).
__device__ __forceinline__ u64 plain_desc(u32 addr, u32 lbo, u32 sbo) {
  return static_cast<u64>((addr & 0x3FFFF) >> 4) | (static_cast<u64>(lbo >> 4) << 16) |
         (static_cast<u64>(sbo >> 4) << 32);
}

enum Variant { kPv, kPvOnes, kPv136, kS, kStep, kStepOnes, kStep136 };

template <Variant kVariant, int kWarpgroups>
__global__ void __launch_bounds__(128 * kWarpgroups) rounds(int iters, long long* cycles, float* sink) {
  extern __shared__ __align__(1024) char smem[];
  for (int i = threadIdx.x; i < 65536 / 4; i += blockDim.x) reinterpret_cast<u32*>(smem)[i] = 0;
  __syncthreads();
  const u32 base = static_cast<u32>(__cvta_generic_to_shared(smem));
  const u64 q = plain_desc(base, 128, 256), k = plain_desc(base + 8192, 128, 256);
  const u64 v = plain_desc(base + 16384, 128, 256), ones = plain_desc(base + 32768, 128, 256);
  float o[17][4];  // P V accumulator (and, in tile 16, the row sums)
  int s[16][4];    // S accumulator
  u32 a[4] = {0u, 0u, 0u, 0u};
  for (int i = 0; i < 17; ++i)
    for (int e = 0; e < 4; ++e) o[i][e] = 0.f;
  for (int i = 0; i < 16; ++i)
    for (int e = 0; e < 4; ++e) s[i][e] = 0;
  float (&o128)[16][4] = *reinterpret_cast<float (*)[16][4]>(&o[0]);
  float (&sums)[1][4] = *reinterpret_cast<float (*)[1][4]>(&o[16]);
  const long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
    wgmma_fence();
    if constexpr (kVariant >= kStep) {  // S in two N=64 halves, wait, then P V from zero
      int sc[16][4];
      int (&lo)[8][4] = *reinterpret_cast<int (*)[8][4]>(&sc[0]);
      int (&hi)[8][4] = *reinterpret_cast<int (*)[8][4]>(&sc[8]);
      wgmma_s8_m64n64k32<false>(lo, q, k);
#pragma unroll
      for (int c = 1; c < 4; ++c) wgmma_s8_m64n64k32<true>(lo, q + 2 * c, k + 2 * c);
      wgmma_s8_m64n64k32<false>(hi, q, k + 512);
#pragma unroll
      for (int c = 1; c < 4; ++c) wgmma_s8_m64n64k32<true>(hi, q + 2 * c, k + 512 + 2 * c);
      wgmma_commit();
      wgmma_wait<0>();
      a[0] += sc[0][0];
      a[1] += sc[8][1];
      wgmma_fence();
      float blk[17][4];
      float (&blk128)[16][4] = *reinterpret_cast<float (*)[16][4]>(&blk[0]);
      float (&blk_sums)[1][4] = *reinterpret_cast<float (*)[1][4]>(&blk[16]);
      if constexpr (kVariant == kStep) {
        wgmma_e4m3_m64n128k32<false>(blk128, a, v);
#pragma unroll
        for (int c = 1; c < 4; ++c) wgmma_e4m3_m64n128k32<true>(blk128, a, v + 2 * c);
      } else if constexpr (kVariant == kStepOnes) {
        wgmma_e4m3_m64n128k32<false>(blk128, a, v);
        wgmma_e4m3_m64n8k32<false>(blk_sums, a, ones);
#pragma unroll
        for (int c = 1; c < 4; ++c) {
          wgmma_e4m3_m64n128k32<true>(blk128, a, v + 2 * c);
          wgmma_e4m3_m64n8k32<true>(blk_sums, a, ones);
        }
      } else {
        wgmma_e4m3_m64n136k32<false>(blk, a, v);
#pragma unroll
        for (int c = 1; c < 4; ++c) wgmma_e4m3_m64n136k32<true>(blk, a, v + 2 * c);
      }
      wgmma_commit();
      wgmma_wait<0>();
      // Fold the block into 8 registers (the kernel adds it into O; here only liveness counts).
#pragma unroll
      for (int i = 0; i < 64; ++i) (&o[0][0])[i & 7] += blk[i / 4][i % 4];
      if constexpr (kVariant != kStep) o[16][0] += blk[16][0];
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if constexpr (kVariant == kPv) wgmma_e4m3_m64n128k32<true>(o128, a, v + 2 * c);
        if constexpr (kVariant == kPvOnes) {
          wgmma_e4m3_m64n128k32<true>(o128, a, v + 2 * c);
          wgmma_e4m3_m64n8k32<true>(sums, a, ones);
        }
        if constexpr (kVariant == kPv136) wgmma_e4m3_m64n136k32<true>(o, a, v + 2 * c);
        if constexpr (kVariant == kS) wgmma_s8_m64n128k32<true>(s, q + 2 * c, k + 2 * c);
      }
      wgmma_commit();
      wgmma_wait<0>();
    }
  }
  const long long t1 = clock64();
  float keep = 0.f;  // results reach memory only if nonzero (never): the products stay live
  for (int i = 0; i < 17; ++i)
    for (int e = 0; e < 4; ++e) keep += o[i][e];
  for (int i = 0; i < 16; ++i)
    for (int e = 0; e < 4; ++e) keep += static_cast<float>(s[i][e]);
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
