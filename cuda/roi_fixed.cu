// The two small kernels around a deterministic backward pass (deterministic=True): the scale of
// its fixed-point sums before, and the conversion back to the gradient's dtype after. The sums
// themselves are roi_fixed_sink of roi_common.cuh, in each operator's backward kernel.
#include "roi_common.cuh"

__device__ __forceinline__ void roi_atomic_max_abs(float* result, float v)
{
    atomicMax(reinterpret_cast<unsigned int*>(result), __float_as_uint(v));
}

__device__ __forceinline__ void roi_atomic_max_abs(double* result, double v)
{
    atomicMax(reinterpret_cast<unsigned long long*>(result),
              static_cast<unsigned long long>(__double_as_longlong(v)));
}

__device__ __forceinline__ float roi_infinity(float) { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double roi_infinity(double)
{
    return __longlong_as_double(0x7ff0000000000000LL);
}

// *max_abs = the largest finite |values[i]| (0 when there is none). The maximum does not depend
// on the order of the comparisons; non-negative floats order as their bit patterns do, so an
// integer atomicMax on the bits finds it. max_abs must hold 0 before the launch.
//
// Parameters: const T* values [total], I total, C* max_abs [1].
template <typename T, typename I>
__global__ void roi_abs_max(
    const T* __restrict__ values, I total, typename roi_compute<T>::type* __restrict__ max_abs)
{
    typedef typename roi_compute<T>::type C;
    C local = C(0);
    for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
        const C v = roi_abs(roi_load(values[index]));
        if (isfinite(v) && v > local) local = v;
    }
    if (local > C(0)) roi_atomic_max_abs(max_abs, local);
}

// out[i] = the fixed-point sum of element i in the gradient's dtype: hi[i] (+ lo[i] * 2^-low_bits
// for float64) times 2^-exponent, or NaN / an infinity where flags say a non-finite term came in.
// The exponent is recomputed from max_abs and count_bits exactly as the backward kernel did.
//
// Parameters: const unsigned long long* hi [total], const unsigned long long* lo [total] or null,
// const unsigned int* flags [ceil(total / 16)], const C* max_abs [1], I total, int count_bits,
// int low_bits, T* out [total].
template <typename T, typename I>
__global__ void roi_fixed_finish(
    const unsigned long long* __restrict__ hi, const unsigned long long* __restrict__ lo,
    const unsigned int* __restrict__ flags,
    const typename roi_compute<T>::type* __restrict__ max_abs, I total, int count_bits,
    int low_bits, T* __restrict__ out)
{
    typedef typename roi_compute<T>::type C;
    const int exponent = roi_fixed_exponent(*max_abs, count_bits);
    for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
        const unsigned int bits = (flags[index / 16] >> (2 * static_cast<int>(index % 16))) & 3u;
        if (bits != 0) {
            const C inf = roi_infinity(C(0));
            roi_store(out + index, bits == 1 ? inf : (bits == 2 ? -inf : inf - inf));
            continue;
        }
        const long long whole = static_cast<long long>(hi[index]);
        C sum = C(whole);
        if constexpr (sizeof(C) == 8) {
            if (lo != nullptr) {
                // C(whole) may have rounded (|whole| up to 2^61): add back what it dropped, with
                // the residues, so the sum rounds once more at most.
                const long long dropped = whole - static_cast<long long>(sum);
                const C residues = roi_ldexp(C(static_cast<long long>(lo[index])), -low_bits);
                sum += C(dropped) + residues;
            }
        }
        roi_store(out + index, roi_ldexp(sum, -exponent));
    }
}
