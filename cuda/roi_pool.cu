// RoI Pool (Fast R-CNN): forward with argmax, and input gradient. See roi_common.cuh for the math
// and the type names T (storage), C (compute), I (index).
#include "roi_common.cuh"

// output[k, c, ph, pw] = max of input[b, c] over the bin's window, argmax its flat index h * W + w
// in the plane (argmax may be null: then only the output is written). Scan row-major with a
// strict '>' from -FLT_MAX: the first maximum wins, NaN is never picked, and a window of values
// <= -FLT_MAX keeps -FLT_MAX with argmax -1. An empty window or an invalid RoI gives 0 and -1. One
// thread per output element: with [N, C, H, W] features consecutive threads take consecutive pw
// (coalesced stores); with [N, H, W, C] ones (Last) consecutive channels, so that a warp's loads
// of a pixel are one run of memory (its stores then stride PH * PW elements). The layout changes
// only where a value is read: the same window, scan and results.
template <typename T, typename I, bool Last>
__device__ __forceinline__ void roi_pool_max(
    const T* __restrict__ input, const typename roi_compute<T>::type* __restrict__ rois,
    T* __restrict__ output, long long* __restrict__ argmax, I total, I channels, I height,
    I width, I batch, I pooled_h, I pooled_w, typename roi_compute<T>::type spatial_scale)
{
    typedef typename roi_compute<T>::type C;
    for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
        const roi_bin<I> o = Last ? roi_split_last(index, channels, pooled_h, pooled_w)
                                  : roi_split(index, channels, pooled_h, pooled_w);
        const I out = Last ? roi_join(o, channels, pooled_h, pooled_w) : index;
        const C* roi = rois + o.k * 5;
        const I b = roi_batch(roi, batch, height, width);
        I h_first = 0, h_last = 0, w_first = 0, w_last = 0;
        if (b >= 0) {
            roi_pool_window(roi_pool_geometry(roi[2], roi[4], spatial_scale, pooled_h), o.ph,
                            height, h_first, h_last);
            roi_pool_window(roi_pool_geometry(roi[1], roi[3], spatial_scale, pooled_w), o.pw,
                            width, w_first, w_last);
        }
        if (h_last <= h_first || w_last <= w_first) {
            roi_store(output + out, C(0));
            if (argmax) argmax[out] = -1;
            continue;
        }
        // Pixel at = h * W + w of plane (b, c) is plane[at * step].
        const T* plane = Last ? input + b * height * width * channels + o.c
                              : input + (b * channels + o.c) * height * width;
        const I step = Last ? channels : I(1);
        C best = C(-ROI_FLT_MAX);
        I best_at = -1;
        for (I h = h_first; h < h_last; ++h) {
            for (I w = w_first; w < w_last; ++w) {
                const I at = h * width + w;
                const C v = roi_load(plane[at * step]);
                if (v > best) {
                    best = v;
                    best_at = at;
                }
            }
        }
        roi_store(output + out, best);
        if (argmax) argmax[out] = best_at;
    }
}

// Parameters: const T* input [N, C, H, W] ([N, H, W, C] with channels_last), const C* rois
// [K, 5], T* output [K, C, PH, PW], long long* argmax [K, C, PH, PW] or null, I total
// (= K * C * PH * PW), I channels, I height, I width, I batch, I pooled_h, I pooled_w,
// C spatial_scale, bool channels_last.
template <typename T, typename I>
__global__ void roi_pool_forward(
    const T* __restrict__ input, const typename roi_compute<T>::type* __restrict__ rois,
    T* __restrict__ output, long long* __restrict__ argmax, I total, I channels, I height,
    I width, I batch, I pooled_h, I pooled_w, typename roi_compute<T>::type spatial_scale,
    bool channels_last)
{
    if (channels_last) {
        roi_pool_max<T, I, true>(input, rois, output, argmax, total, channels, height, width,
                                 batch, pooled_h, pooled_w, spatial_scale);
    } else {
        roi_pool_max<T, I, false>(input, rois, output, argmax, total, channels, height, width,
                                  batch, pooled_h, pooled_w, spatial_scale);
    }
}

// grad_input[b, c].flat[argmax[k, c, ph, pw]] += grad_output[k, c, ph, pw], skipping an argmax
// outside [0, H * W) and an invalid RoI: one thread per grad_output element, each term handed to
// the sink (roi_common.cuh).
template <typename T, typename I, typename Sink>
__device__ __forceinline__ void roi_pool_backward_terms(
    const T* __restrict__ grad_output, const typename roi_compute<T>::type* __restrict__ rois,
    const long long* __restrict__ argmax, const Sink& sink, I total, I channels, I height,
    I width, I batch, I pooled_h, I pooled_w)
{
    for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
        const long long at = argmax[index];
        if (at < 0 || at >= height * width) continue;
        const roi_bin<I> o = roi_split(index, channels, pooled_h, pooled_w);
        const I b = roi_batch(rois + o.k * 5, batch, height, width);
        if (b < 0) continue;
        sink.add((b * channels + o.c) * height * width + static_cast<I>(at),
                 roi_load(grad_output[index]));
    }
}

// The gradient with atomicAdd into an accumulator of the compute type C (zero-filled by the
// caller; half is rounded once afterwards).
//
// Parameters: const T* grad_output [K, C, PH, PW], const C* rois [K, 5],
// const long long* argmax [K, C, PH, PW], C* grad_input [N, C, H, W], I total
// (= K * C * PH * PW), I channels, I height, I width, I batch, I pooled_h, I pooled_w.
template <typename T, typename I>
__global__ void roi_pool_backward(
    const T* __restrict__ grad_output, const typename roi_compute<T>::type* __restrict__ rois,
    const long long* __restrict__ argmax, typename roi_compute<T>::type* __restrict__ grad_input,
    I total, I channels, I height, I width, I batch, I pooled_h, I pooled_w)
{
    typedef typename roi_compute<T>::type C;
    const roi_atomic_sink<C, I> sink{grad_input};
    roi_pool_backward_terms(grad_output, rois, argmax, sink, total, channels, height, width, batch,
                            pooled_h, pooled_w);
}

// The same gradient summed in fixed point (deterministic=True): bitwise the same whatever the
// launch configuration and the order blocks run in. hi, lo and flags zero-filled by the caller
// (lo null but for float64), max_abs the largest finite |grad_output| (roi_abs_max), count_bits
// and low_bits as roi_fixed_sink needs them; roi_fixed_finish turns the sums into the gradient.
//
// Parameters: const T* grad_output [K, C, PH, PW], const C* rois [K, 5],
// const long long* argmax [K, C, PH, PW], unsigned long long* hi [N, C, H, W],
// unsigned long long* lo [N, C, H, W] or null, unsigned int* flags [ceil(N * C * H * W / 16)],
// const C* max_abs [1], int count_bits, int low_bits, I total (= K * C * PH * PW), I channels,
// I height, I width, I batch, I pooled_h, I pooled_w.
template <typename T, typename I>
__global__ void roi_pool_backward_deterministic(
    const T* __restrict__ grad_output, const typename roi_compute<T>::type* __restrict__ rois,
    const long long* __restrict__ argmax, unsigned long long* __restrict__ hi,
    unsigned long long* __restrict__ lo, unsigned int* __restrict__ flags,
    const typename roi_compute<T>::type* __restrict__ max_abs, int count_bits, int low_bits,
    I total, I channels, I height, I width, I batch, I pooled_h, I pooled_w)
{
    typedef typename roi_compute<T>::type C;
    const roi_fixed_sink<C, I> sink{
        hi, lo, flags, roi_fixed_exponent(*max_abs, count_bits), low_bits};
    roi_pool_backward_terms(grad_output, rois, argmax, sink, total, channels, height, width, batch,
                            pooled_h, pooled_w);
}
