// Force-included (g++ -include) ahead of the unmodified CUDA kernel source: the CUDA C++ dialect
// the kernels use, mapped onto plain C++20 for the CPU emulator.  The launcher that runs the
// kernels (roi_emulator_launch.h) comes after the kernel source in the same translation unit.
#ifndef ROI_EMULATOR_H
#define ROI_EMULATOR_H

#include <cfloat>
#include <cstddef>
#include <math.h>  // libstdc++'s <math.h> puts the float overloads (floor(float), ...) in ::

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// ----------------------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// All threads of a block run as fibers of one OS thread, and blocks run one after another, so a
// static thread_local is shared by the block's threads and reused by the next block.  CUDA shared
// memory starts undefined, so reuse is within the semantics.
#define __shared__ static thread_local

// ----------------------------------------------------------------------------- built-in variables
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};

// Set by the launcher before it runs or resumes each CUDA thread (external linkage so the compiler
// reloads them after every __syncthreads, which switches fibers).
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ----------------------------------------------------------------------------- synchronisation
namespace roi_emu {
void barrier();
}
inline void __syncthreads() { roi_emu::barrier(); }

// Fibers switch only at __syncthreads, so a read-modify-write is never interleaved.
template <class T>
inline T roi_emu_atomic_add(T* address, T value) {
  T old = *address;
  *address = static_cast<T>(old + value);
  return old;
}
inline float atomicAdd(float* a, float v) { return roi_emu_atomic_add(a, v); }
inline double atomicAdd(double* a, double v) { return roi_emu_atomic_add(a, v); }
inline int atomicAdd(int* a, int v) { return roi_emu_atomic_add(a, v); }
inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return roi_emu_atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return roi_emu_atomic_add(a, v);
}
template <class T>
inline T roi_emu_atomic_min(T* address, T value) {
  T old = *address;
  if (value < old) *address = value;
  return old;
}
inline int atomicMin(int* a, int v) { return roi_emu_atomic_min(a, v); }
inline long long atomicMin(long long* a, long long v) { return roi_emu_atomic_min(a, v); }
template <class T>
inline T roi_emu_atomic_max(T* address, T value) {
  T old = *address;
  if (value > old) *address = value;
  return old;
}
inline unsigned int atomicMax(unsigned int* a, unsigned int v) { return roi_emu_atomic_max(a, v); }
inline unsigned long long atomicMax(unsigned long long* a, unsigned long long v) {
  return roi_emu_atomic_max(a, v);
}
inline unsigned int atomicOr(unsigned int* a, unsigned int v) {
  unsigned int old = *a;
  *a = old | v;
  return old;
}
inline __half atomicAdd(__half* a, __half v) {
  __half old = *a;
  *a = __half(static_cast<float>(old) + static_cast<float>(v));
  return old;
}

// ----------------------------------------------------------------------------- math
// CUDA's global min/max overloads (device code calls them without std::).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a); }
inline int __float2int_rz(float a) { return static_cast<int>(a); }
inline int __float2int_rd(float a) { return static_cast<int>(floorf(a)); }
inline int __float2int_ru(float a) { return static_cast<int>(ceilf(a)); }
inline int __float2int_rn(float a) { return static_cast<int>(nearbyintf(a)); }
inline int __double2int_rz(double a) { return static_cast<int>(a); }
inline float __int2float_rn(int a) { return static_cast<float>(a); }
// Products and sums rounded on their own (the host never fuses them: -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
// Round to nearest even, as CUDA's _rn conversions (the host's default rounding mode).
inline long long __float2ll_rn(float a) { return llrintf(a); }
inline long long __double2ll_rn(double a) { return llrint(a); }
inline unsigned int __float_as_uint(float a) { return __builtin_bit_cast(unsigned int, a); }
inline long long __double_as_longlong(double a) { return __builtin_bit_cast(long long, a); }
inline float __int_as_float(int a) { return __builtin_bit_cast(float, a); }
inline double __longlong_as_double(long long a) { return __builtin_bit_cast(double, a); }
// sin(pi x) and cos(pi x), which glibc only offers from 2.41: evaluated in a wider type and
// rounded once (CUDA documents 1 ulp for its own; these are correctly rounded but for rare ties).
inline float sinpif(float a) { return static_cast<float>(sin(M_PI * static_cast<double>(a))); }
inline float cospif(float a) { return static_cast<float>(cos(M_PI * static_cast<double>(a))); }
inline double sinpi(double a)
{
    return static_cast<double>(sinl(3.14159265358979323846264338327950288L * a));
}
inline double cospi(double a)
{
    return static_cast<double>(cosl(3.14159265358979323846264338327950288L * a));
}
template <class T>
inline T __ldg(const T* p) { return *p; }

#endif  // ROI_EMULATOR_H
