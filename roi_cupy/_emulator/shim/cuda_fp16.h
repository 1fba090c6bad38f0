// CPU stand-in for CUDA's <cuda_fp16.h>.  __half is an IEEE binary16 whose conversions round
// exactly as the GPU's cvt.rn does (to nearest, ties to even): through the compiler's _Float16
// where it has one (GCC >= 12 and Clang >= 15 on x86-64, GCC on AArch64), else in software.
// Arithmetic on __half goes through float (operator float), which is how the kernels use it.
#ifndef ROI_EMULATOR_CUDA_FP16_H
#define ROI_EMULATOR_CUDA_FP16_H

#include <type_traits>

// binary16 bits of a double, rounded to nearest even (every float is exactly a double, so this
// is also the single rounding of a float).
inline unsigned short roi_emu_half_bits(double value) {
  unsigned long long x;
  __builtin_memcpy(&x, &value, 8);
  const unsigned short sign = static_cast<unsigned short>((x >> 48) & 0x8000u);
  const unsigned long long magnitude = x & 0x7fffffffffffffffull;
  if (magnitude > 0x7ff0000000000000ull) return sign | 0x7e00u;    // NaN stays a (quiet) NaN
  if (magnitude >= 0x40effe0000000000ull) return sign | 0x7c00u;  // >= 65520 rounds to inf
  const int exponent = static_cast<int>(magnitude >> 52);          // biased by 1023
  if (exponent < 997) return sign;                                 // < 2**-26 rounds to 0
  const unsigned long long mantissa = (magnitude & 0xfffffffffffffull) | (1ull << 52);
  // Normal halves keep 10 of the 52 fraction bits; subnormals count units of 2**-24.
  const int shift = exponent >= 1009 ? 42 : 1051 - exponent;
  unsigned int bits = exponent >= 1009
                          ? (static_cast<unsigned int>(exponent - 1008) << 10) |
                                static_cast<unsigned int>((mantissa >> 42) & 0x3ffu)
                          : static_cast<unsigned int>(mantissa >> shift);
  const unsigned long long rest = mantissa & ((1ull << shift) - 1);
  const unsigned long long half_way = 1ull << (shift - 1);
  if (rest > half_way || (rest == half_way && (bits & 1u))) ++bits;  // a carry is still right
  return static_cast<unsigned short>(sign | bits);
}

// The float value of binary16 bits (exact).
inline float roi_emu_half_float(unsigned short h) {
  const unsigned int sign = (h & 0x8000u) << 16;
  unsigned int exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, x;
  if (exponent == 0x1f) {
    x = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    x = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    x = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      --exponent;
    }
    x = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &x, 4);
  return f;
}

struct __half_raw {
  unsigned short x;
};

struct __half {
#if defined(__FLT16_MAX__)
  _Float16 value;
  template <class T>
  static _Float16 from(T v) { return static_cast<_Float16>(v); }
  float to_float() const { return static_cast<float>(value); }
#else
  unsigned short value;
  template <class T>
  static unsigned short from(T v) { return roi_emu_half_bits(static_cast<double>(v)); }
  float to_float() const { return roi_emu_half_float(value); }
#endif

  __half() = default;
  template <class T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
  __half(T v) : value(from(v)) {}
  __half(__half_raw raw) { __builtin_memcpy(&value, &raw.x, 2); }

  operator float() const { return to_float(); }
  operator __half_raw() const {
    __half_raw raw;
    __builtin_memcpy(&raw.x, &value, 2);
    return raw;
  }
};
static_assert(sizeof(__half) == 2 && std::is_trivially_copyable_v<__half>);

inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __double2half(double d) { return __half(d); }
inline __half __int2half_rn(int i) { return __half(i); }
inline __half __ushort_as_half(unsigned short bits) { return __half(__half_raw{bits}); }
inline unsigned short __half_as_ushort(__half h) { return static_cast<__half_raw>(h).x; }
inline bool __hisnan(__half h) { return __builtin_isnan(static_cast<float>(h)); }
inline bool __hisinf(__half h) { return __builtin_isinf(static_cast<float>(h)); }

#endif  // ROI_EMULATOR_CUDA_FP16_H
