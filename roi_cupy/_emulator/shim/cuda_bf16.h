// CPU stand-in for CUDA's <cuda_bf16.h>.  __nv_bfloat16 is the upper half of an IEEE binary32:
// a float converts by rounding its low 16 bits away (to nearest, ties to even, as the GPU's
// cvt.rn.bf16.f32 does; NaN stays a quiet NaN), and converts back exactly.  Arithmetic goes
// through float (operator float), which is how the kernels use it.
#ifndef ROI_EMULATOR_CUDA_BF16_H
#define ROI_EMULATOR_CUDA_BF16_H

#include <type_traits>

// bfloat16 bits of a float, rounded to nearest even.
inline unsigned short roi_emu_bfloat16_bits(float value) {
  unsigned int x;
  __builtin_memcpy(&x, &value, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((x >> 16) | 0x40u);
  const unsigned int rounding = 0x7fffu + ((x >> 16) & 1u);  // a carry into the exponent is right
  return static_cast<unsigned short>((x + rounding) >> 16);
}

// The float value of bfloat16 bits (exact).
inline float roi_emu_bfloat16_float(unsigned short b) {
  const unsigned int x = static_cast<unsigned int>(b) << 16;
  float f;
  __builtin_memcpy(&f, &x, 4);
  return f;
}

struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __nv_bfloat16 {
  unsigned short value;

  __nv_bfloat16() = default;
  // Every conversion goes through float, as on the GPU: a double is rounded to float first.
  template <class T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
  __nv_bfloat16(T v) : value(roi_emu_bfloat16_bits(static_cast<float>(v))) {}
  __nv_bfloat16(__nv_bfloat16_raw raw) : value(raw.x) {}

  operator float() const { return roi_emu_bfloat16_float(value); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{value}; }
};
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivially_copyable_v<__nv_bfloat16>);

inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
  return __nv_bfloat16(__nv_bfloat16_raw{bits});
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.value; }

#endif  // ROI_EMULATOR_CUDA_BF16_H
