// Issue rates of the instructions the mma.sync trees' loops are made of (issue 5: the sm89 tree
// forced on the H100): INT8 and FP16 mma.sync, the E4M3 mma.sync that ptxas lowers to FP16 MMAs on
// sm_90, and the conversions and exponentials around them. One CTA per SM with 4, 8 or 16 warps;
// each warp issues `iters` rounds of 8 independent instructions; clock64 cycles per instruction
// and SM sub-partition (4 per SM), the two integer adds that renew each round's B operands
// included. The products are the kernels' own wrappers. Standalone:
//
//     nvcc -O3 -std=c++17 -Ikernels -gencode arch=compute_90a,code=sm_90a \
//          -o mma_sync_rates bench/mma_sync_rates.cu
//     ./mma_sync_rates        # on the GPU
#include <cstdio>
#include <cuda_runtime.h>

#include "common/mma_sm80.cuh"
#include "sm89/mma_pv.cuh"

using namespace sageattn;

enum Op { kImma, kHmmaF32, kHmmaF16, kE4m3F32, kE4m3F16, kUnpackE4m3, kPackE4m3, kI2f, kEx2, kOps };
static const char* kNames[kOps] = {
    "mma s8 m16n8k32 (s32)",      "mma f16 m16n8k16 (f32)",    "mma f16 m16n8k16 (f16)",
    "mma e4m3 m16n8k32 (f32)",    "mma e4m3 m16n8k32 (f16)",   "cvt f16x2 <- e4m3x2",
    "cvt e4m3x2 <- f32 x2",       "cvt f32 <- s32",            "ex2.approx f32"};

template <Op kOp>
__global__ void rounds(int iters, long long* cycles, u32* sink) {
  u32 a[4] = {threadIdx.x, threadIdx.x * 3u, threadIdx.x * 5u, threadIdx.x * 7u};
  u32 b[8][2];  // fresh B operands each round (as the kernels' V fragments): nothing to hoist
  for (int j = 0; j < 8; ++j) b[j][0] = threadIdx.x * 11u + j, b[j][1] = threadIdx.x * 13u + j;
  int si[8][4] = {};
  float sf[8][4] = {};
  u32 sh[8][2] = {};
  u32 conv[8] = {};
  float x[8];
  for (int i = 0; i < 8; ++i) x[i] = 1e-3f * (threadIdx.x + i);
  __syncthreads();
  const long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const u32 b0 = b[j][0] += 0x01010101u, b1 = b[j][1] += 0x01010101u;
      if constexpr (kOp == kImma) mma_s8_m16n8k32(si[j], a, b0, b1);
      if constexpr (kOp == kHmmaF32) mma_f16_m16n8k16_f32acc(sf[j], a, b0, b1);
      if constexpr (kOp == kHmmaF16) mma_f16_m16n8k16_f16acc(sh[j], a, b0, b1);
      if constexpr (kOp == kE4m3F32) sm89::mma_e4m3_m16n8k32_f32acc(sf[j], a, b0, b1);
      if constexpr (kOp == kE4m3F16) sm89::mma_e4m3_m16n8k32_f16acc(sh[j], a, b0, b1);
      if constexpr (kOp == kUnpackE4m3) {
        u32 r;
        asm volatile("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(static_cast<unsigned short>(a[j % 4] + it)));
        conv[j] ^= r;
      }
      if constexpr (kOp == kPackE4m3) {
        unsigned short r;
        asm volatile("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(x[j]), "f"(x[(j + 1) % 8]));
        conv[j] += r;
      }
      if constexpr (kOp == kI2f) {
        float r;
        asm volatile("cvt.rn.f32.s32 %0, %1;" : "=f"(r) : "r"(static_cast<int>(a[j % 4]) + it));
        x[j] += r;
      }
      if constexpr (kOp == kEx2) {
        float r;
        asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x[j]));
        x[j] = r;
      }
    }
  }
  const long long t1 = clock64();
  u32 acc = 0;
  for (int j = 0; j < 8; ++j) {
    acc += static_cast<u32>(si[j][0] + si[j][3]) + __float_as_uint(sf[j][0] + sf[j][3]) + sh[j][0] + sh[j][1] +
           conv[j] + __float_as_uint(x[j]);
  }
  sink[blockIdx.x * blockDim.x + threadIdx.x] = acc;
  if (threadIdx.x % 32 == 0) cycles[blockIdx.x * 32 + threadIdx.x / 32] = t1 - t0;
}

template <Op kOp>
float cycles_per_instruction(int sms, int warps, int iters, long long* d_cycles, u32* d_sink) {
  rounds<kOp><<<sms, 32 * warps>>>(iters, d_cycles, d_sink);
  cudaDeviceSynchronize();
  static long long h[132 * 32];
  cudaMemcpy(h, d_cycles, sizeof(long long) * sms * 32, cudaMemcpyDeviceToHost);
  long long worst = 0;
  for (int b = 0; b < sms; ++b)
    for (int w = 0; w < warps; ++w) worst = h[b * 32 + w] > worst ? h[b * 32 + w] : worst;
  // warps / 4 warps share each sub-partition; each issued 8 * iters instructions.
  return static_cast<float>(worst) / (8.f * iters * (warps / 4.f));
}

template <Op kOp>
void row(int sms, long long* d_cycles, u32* d_sink) {
  const int iters = 4096;
  cycles_per_instruction<kOp>(sms, 4, 64, d_cycles, d_sink);  // warm-up
  printf("| %s |", kNames[kOp]);
  for (int warps : {4, 8, 16}) printf(" %.2f |", cycles_per_instruction<kOp>(sms, warps, iters, d_cycles, d_sink));
  printf("\n");
}

int main() {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  const int sms = prop.multiProcessorCount < 132 ? prop.multiProcessorCount : 132;
  long long* d_cycles;
  u32* d_sink;
  cudaMalloc(&d_cycles, sizeof(long long) * 132 * 32);
  cudaMalloc(&d_sink, sizeof(u32) * 132 * 1024);
  printf("%s: cycles per warp instruction per SM sub-partition (8 independent per warp)\n\n", prop.name);
  printf("| instruction | 1 warp/SMSP | 2 warps/SMSP | 4 warps/SMSP |\n|---|---|---|---|\n");
  row<kImma>(sms, d_cycles, d_sink);
  row<kHmmaF32>(sms, d_cycles, d_sink);
  row<kHmmaF16>(sms, d_cycles, d_sink);
  row<kE4m3F32>(sms, d_cycles, d_sink);
  row<kE4m3F16>(sms, d_cycles, d_sink);
  row<kUnpackE4m3>(sms, d_cycles, d_sink);
  row<kPackE4m3>(sms, d_cycles, d_sink);
  row<kI2f>(sms, d_cycles, d_sink);
  row<kEx2>(sms, d_cycles, d_sink);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    printf("CUDA error: %s\n", cudaGetErrorString(err));
    return 1;
  }
  return 0;
}
