// Scalar conversions and fast math through inline PTX: no cuda_fp16.h / cuda_bf16.h, so the
// trees build the same with nvcc and with NVRTC from PyPI (no toolkit headers needed).
#pragma once

namespace sageattn {

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

/// @brief fp16 bits -> fp32 (exact).
__device__ __forceinline__ float half_bits_to_float(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

/// @brief bf16 bits -> fp32 (exact: bf16 is the top half of an fp32).
__device__ __forceinline__ float bf16_bits_to_float(u16 h) {
  return __uint_as_float(static_cast<u32>(h) << 16);
}

/// @brief 16-bit storage (fp16 or bf16, chosen at run time) -> fp32.
__device__ __forceinline__ float bits16_to_float(u16 h, bool is_bf16) {
  return is_bf16 ? bf16_bits_to_float(h) : half_bits_to_float(h);
}

/// @brief fp32 -> fp16 bits, round to nearest even.
__device__ __forceinline__ u16 float_to_half_bits(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

/// @brief Two fp32 -> packed f16x2 (lo in bits 0..15), round to nearest even.
__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

/// @brief Two fp32 -> packed bf16x2 (lo in bits 0..15), round to nearest even.
__device__ __forceinline__ u32 pack_bf162(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

/// @brief Packed f16x2 -> two fp32.
__device__ __forceinline__ void unpack_half2(u32 v, float& lo, float& hi) {
  lo = half_bits_to_float(static_cast<u16>(v & 0xffffu));
  hi = half_bits_to_float(static_cast<u16>(v >> 16));
}

/// @brief 2^x with the SFU (about 2 ulp); exp2(-inf) = +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// @brief Four fp32 -> four E4M3 bytes (x[0] in bits 0..7), round to nearest even, saturating
/// to +-448. The conversion instruction exists from sm_89 on.
__device__ __forceinline__ u32 pack_e4m3x4(float x0, float x1, float x2, float x3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  u16 lo, hi;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(x1), "f"(x0));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(x3), "f"(x2));
  return static_cast<u32>(lo) | (static_cast<u32>(hi) << 16);
#else
  __trap();  // FP8 paths are only built for sm_89 and later
  return 0u;
#endif
}

/// @brief Four E4M3 bytes -> two f16x2: `lo` holds bytes 0 and 1, `hi` bytes 2 and 3 (exact).
__device__ __forceinline__ void unpack_e4m3x4(u32 x, u32& lo, u32& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n cvt.rn.f16x2.e4m3x2 %1, h;\n}"
      : "=r"(lo), "=r"(hi)
      : "r"(x));
#else
  __trap();
  lo = hi = 0u;
#endif
}

/// @brief Symmetric INT8 code: round half to even, clamp to [-127, 127].
__device__ __forceinline__ int quantize_int8(float x) {
  int q = __float2int_rn(x);
  return q > 127 ? 127 : (q < -127 ? -127 : q);
}

/// @brief Round half to even and saturate to [-128, 127] in one conversion; NaN gives 0.
__device__ __forceinline__ int round_saturate_int8(float x) {
  int q;
  asm("cvt.rni.sat.s8.f32 %0, %1;" : "=r"(q) : "f"(x));
  return q;
}

}  // namespace sageattn
