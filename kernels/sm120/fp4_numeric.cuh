// NVFP4 pieces of the sm120 tree: E2M1 values (0, 0.5, 1, 1.5, 2, 3, 4, 6 and signs; code bit 3
// is the sign) with one E4M3 scale per 16 elements (PTX ISA: .e2m1 / .ue4m3 block scaling).
//
// The tree's one compile-time switch, kFp4Native, is set by the target alone (no -D flag):
//   sm_120a / sm_121a: the FP4 conversion and block-scaled MMA instructions (native);
//   sm_90:             exact software equivalents, so the same kernels run on an H100, where
//                      they are checked against the emulator (the verification build; the
//                      dispatch table reaches it only when the path is forced).
#pragma once

#include "../common/numeric.cuh"

#if defined(__CUDA_ARCH__)
#if defined(__CUDA_ARCH_FEAT_SM120_ALL) || defined(__CUDA_ARCH_FEAT_SM121_ALL)
#define SAGEATTN_FP4_NATIVE 1
#elif __CUDA_ARCH__ == 900
#define SAGEATTN_FP4_NATIVE 0
#else
#error "the sm120 tree builds for sm_120a/sm_121a (native FP4) or sm_90 (software FP4, tests only)"
#endif
#else
#define SAGEATTN_FP4_NATIVE 0  // host pass: no device code
#endif

namespace sageattn {
namespace sm120 {

constexpr bool kFp4Native = SAGEATTN_FP4_NATIVE != 0;
constexpr int kSfGroup = 16;        // elements per E4M3 scale
constexpr float kE2m1Max = 6.f;

/// @brief fp32 -> E4M3 code (low byte), round to nearest even, saturated to +-448 (sm_89+).
__device__ __forceinline__ u32 e4m3_code(float x) {
  u16 pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.f), "f"(x));
  return pair & 0xffu;
}

/// @brief E4M3 code (low byte) -> fp32, exact (through f16x2, sm_89+).
__device__ __forceinline__ float e4m3_value(u32 code) {
  u32 h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(static_cast<u16>(code & 0xffu)));
  return half_bits_to_float(static_cast<u16>(h2 & 0xffffu));
}

/// @brief fp32 -> E2M1 code in software, exactly as cvt.rn.satfinite.e2m1x2.f32: nearest value,
/// ties to the even mantissa (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4),
/// saturated to +-6, the sign of zero kept.
__device__ __forceinline__ u32 e2m1_code_soft(float x) {
  const float a = fminf(fabsf(x), kE2m1Max);
  const u32 mag = a <= 0.25f ? 0u : a < 0.75f ? 1u : a <= 1.25f ? 2u : a < 1.75f ? 3u
                : a <= 2.5f ? 4u : a < 3.5f ? 5u : a <= 5.f ? 6u : 7u;
  return mag | ((__float_as_uint(x) >> 31) << 3);
}

/// @brief Eight fp32 -> eight E2M1 codes packed in a u32 (x[i] in bits 4i..4i+3: the MMA
/// operand order).
__device__ __forceinline__ u32 pack_e2m1x8(const float (&x)[8]) {
#if SAGEATTN_FP4_NATIVE
  u32 r;
  // cvt ... d, a, b puts a in the high nibble and b in the low one.
  asm("{\n .reg .b8 b0, b1, b2, b3;\n"
      " cvt.rn.satfinite.e2m1x2.f32 b0, %2, %1;\n"
      " cvt.rn.satfinite.e2m1x2.f32 b1, %4, %3;\n"
      " cvt.rn.satfinite.e2m1x2.f32 b2, %6, %5;\n"
      " cvt.rn.satfinite.e2m1x2.f32 b3, %8, %7;\n"
      " mov.b32 %0, {b0, b1, b2, b3};\n}"
      : "=r"(r)
      : "f"(x[0]), "f"(x[1]), "f"(x[2]), "f"(x[3]), "f"(x[4]), "f"(x[5]), "f"(x[6]), "f"(x[7]));
  return r;
#else
  u32 r = 0u;
#pragma unroll
  for (int i = 0; i < 8; ++i) r |= e2m1_code_soft(x[i]) << (4 * i);
  return r;
#endif
}

/// @brief Twice the value of an E2M1 code (an integer: 0, 1, 2, 3, 4, 6, 8, 12, signed).
__device__ __forceinline__ int e2m1_twice(u32 code) {
  const int mag = static_cast<int>((0x0c08060403020100ull >> (8 * (code & 7u))) & 0xffu);
  return (code & 8u) ? -mag : mag;
}

/// @brief E2M1 code -> fp32 value (exact).
__device__ __forceinline__ float e2m1_value(u32 code) { return 0.5f * static_cast<float>(e2m1_twice(code)); }

/// @brief NVFP4 of 16 values held by two adjacent lanes (8 each, lanes 2i and 2i+1 of a pair):
/// scale = E4M3(amax / 6), codes = E2M1(x / scale) (+-0 when the scale is 0). Returns the 8
/// packed codes of this lane; `sf` gets the scale's E4M3 code (same in both lanes).
__device__ __forceinline__ u32 quantize_fp4_pair(const float (&x)[8], u32& sf) {
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(x[i]));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  sf = e4m3_code(amax / kE2m1Max);
  const float scale = e4m3_value(sf);
  float y[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) y[i] = scale > 0.f ? x[i] / scale : x[i] * 0.f;
  return pack_e2m1x8(y);
}

}  // namespace sm120
}  // namespace sageattn
