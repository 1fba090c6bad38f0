// RoI Align (Mask R-CNN): forward and input gradient. See roi_common.cuh for the math and the
// type names T (storage), C (compute), I (index).
#include "roi_common.cuh"

// output[k, c, ph, pw] = mean over the bin's gh x gw samples of the bilinear interpolation of
// input[b, c]; one thread per output element, consecutive threads on consecutive pw.
//
// Parameters: const T* input [N, C, H, W], const C* rois [K, 5], T* output [K, C, PH, PW],
// I total (= K * C * PH * PW), I channels, I height, I width, I batch, I pooled_h, I pooled_w,
// C spatial_scale, int sampling_h, int sampling_w (samples per bin along y and x; <= 0:
// adaptive along that axis), bool aligned.
template <typename T, typename I>
__global__ void roi_align_forward(
    const T* __restrict__ input, const typename roi_compute<T>::type* __restrict__ rois,
    T* __restrict__ output, I total, I channels, I height, I width, I batch, I pooled_h,
    I pooled_w, typename roi_compute<T>::type spatial_scale, int sampling_h, int sampling_w,
    bool aligned)
{
    typedef typename roi_compute<T>::type C;
    for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
        const roi_bin<I> o = roi_split(index, channels, pooled_h, pooled_w);
        const C* roi = rois + o.k * 5;
        const I b = roi_batch(roi, batch, height, width);
        if (b < 0) {
            roi_store(output + index, C(0));
            continue;
        }
        const roi_align_bin<C> s = roi_align_locate(
            roi, o.ph, o.pw, height, width, pooled_h, pooled_w, spatial_scale, aligned,
            sampling_h, sampling_w);

        const T* plane = input + (b * channels + o.c) * height * width;
        roi_sum<C> sum;
        for (int iy = s.y_first; iy < s.y_last; ++iy) {
            roi_lerp<C, I> wy;
            if (!roi_lerp_weights(roi_align_sample(s.y, o.ph, iy), height, wy)) continue;
            const T* row_lo = plane + wy.lo * width;
            const T* row_hi = plane + wy.hi * width;
            for (int ix = s.x_first; ix < s.x_last; ++ix) {
                roi_lerp<C, I> wx;
                if (!roi_lerp_weights(roi_align_sample(s.x, o.pw, ix), width, wx)) continue;
                sum.add(wy.wlo * wx.wlo * roi_load(row_lo[wx.lo]) +
                        wy.wlo * wx.whi * roi_load(row_lo[wx.hi]) +
                        wy.whi * wx.wlo * roi_load(row_hi[wx.lo]) +
                        wy.whi * wx.whi * roi_load(row_hi[wx.hi]));
            }
        }
        // Samples outside the map count too: they dilute the mean.
        const C count = roi_max(C(s.y.grid) * C(s.x.grid), C(1));
        roi_store(output + index, sum.total / count);
    }
}

// grad_input[b, c] += for every sample of every bin, its four bilinear corners weighted by
// grad_output[k, c, ph, pw] / (gh * gw): one thread per grad_output element, each term handed to
// the sink (roi_common.cuh).
template <typename T, typename I, typename Sink>
__device__ __forceinline__ void roi_align_backward_terms(
    const T* __restrict__ grad_output, const typename roi_compute<T>::type* __restrict__ rois,
    const Sink& sink, I total, I channels, I height, I width, I batch, I pooled_h, I pooled_w,
    typename roi_compute<T>::type spatial_scale, int sampling_h, int sampling_w, bool aligned)
{
    typedef typename roi_compute<T>::type C;
    for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
        const roi_bin<I> o = roi_split(index, channels, pooled_h, pooled_w);
        const C* roi = rois + o.k * 5;
        const I b = roi_batch(roi, batch, height, width);
        if (b < 0) continue;
        const roi_align_bin<C> s = roi_align_locate(
            roi, o.ph, o.pw, height, width, pooled_h, pooled_w, spatial_scale, aligned,
            sampling_h, sampling_w);
        if (s.y_first >= s.y_last || s.x_first >= s.x_last) continue;

        // No max(., 1) here: a bin without samples has no sample to pass gradient to.
        const C count = C(s.y.grid) * C(s.x.grid);
        const C g = roi_load(grad_output[index]);
        const I plane = (b * channels + o.c) * height * width;
        for (int iy = s.y_first; iy < s.y_last; ++iy) {
            roi_lerp<C, I> wy;
            if (!roi_lerp_weights(roi_align_sample(s.y, o.ph, iy), height, wy)) continue;
            const I row_lo = plane + wy.lo * width;
            const I row_hi = plane + wy.hi * width;
            for (int ix = s.x_first; ix < s.x_last; ++ix) {
                roi_lerp<C, I> wx;
                if (!roi_lerp_weights(roi_align_sample(s.x, o.pw, ix), width, wx)) continue;
                sink.add(row_lo + wx.lo, g * (wy.wlo * wx.wlo) / count);
                sink.add(row_lo + wx.hi, g * (wy.wlo * wx.whi) / count);
                sink.add(row_hi + wx.lo, g * (wy.whi * wx.wlo) / count);
                sink.add(row_hi + wx.hi, g * (wy.whi * wx.whi) / count);
            }
        }
    }
}

// The gradient with atomicAdd into an accumulator of the compute type C (zero-filled by the
// caller; half is rounded once afterwards).
//
// Parameters: const T* grad_output [K, C, PH, PW], const C* rois [K, 5], C* grad_input
// [N, C, H, W], I total (= K * C * PH * PW), I channels, I height, I width, I batch,
// I pooled_h, I pooled_w, C spatial_scale, int sampling_h, int sampling_w, bool aligned.
template <typename T, typename I>
__global__ void roi_align_backward(
    const T* __restrict__ grad_output, const typename roi_compute<T>::type* __restrict__ rois,
    typename roi_compute<T>::type* __restrict__ grad_input, I total, I channels, I height,
    I width, I batch, I pooled_h, I pooled_w, typename roi_compute<T>::type spatial_scale,
    int sampling_h, int sampling_w, bool aligned)
{
    typedef typename roi_compute<T>::type C;
    const roi_atomic_sink<C, I> sink{grad_input};
    roi_align_backward_terms(grad_output, rois, sink, total, channels, height, width, batch,
                             pooled_h, pooled_w, spatial_scale, sampling_h, sampling_w, aligned);
}

// The same gradient summed in fixed point (deterministic=True): bitwise the same whatever the
// launch configuration and the order blocks run in. hi, lo and flags zero-filled by the caller
// (lo null but for float64), max_abs the largest finite |grad_output| (roi_abs_max), count_bits
// and low_bits as roi_fixed_sink needs them; roi_fixed_finish turns the sums into the gradient.
//
// Parameters: const T* grad_output [K, C, PH, PW], const C* rois [K, 5],
// unsigned long long* hi [N, C, H, W], unsigned long long* lo [N, C, H, W] or null,
// unsigned int* flags [ceil(N * C * H * W / 16)], const C* max_abs [1], int count_bits,
// int low_bits, I total (= K * C * PH * PW), I channels, I height, I width, I batch, I pooled_h,
// I pooled_w, C spatial_scale, int sampling_h, int sampling_w, bool aligned.
template <typename T, typename I>
__global__ void roi_align_backward_deterministic(
    const T* __restrict__ grad_output, const typename roi_compute<T>::type* __restrict__ rois,
    unsigned long long* __restrict__ hi, unsigned long long* __restrict__ lo,
    unsigned int* __restrict__ flags, const typename roi_compute<T>::type* __restrict__ max_abs,
    int count_bits, int low_bits, I total, I channels, I height, I width, I batch, I pooled_h,
    I pooled_w, typename roi_compute<T>::type spatial_scale, int sampling_h, int sampling_w,
    bool aligned)
{
    typedef typename roi_compute<T>::type C;
    const roi_fixed_sink<C, I> sink{
        hi, lo, flags, roi_fixed_exponent(*max_abs, count_bits), low_bits};
    roi_align_backward_terms(grad_output, rois, sink, total, channels, height, width, batch,
                             pooled_h, pooled_w, spatial_scale, sampling_h, sampling_w, aligned);
}
