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
        const T* plane = input + (b * channels + o.c) * height * width;
        roi_store(output + index, roi_align_mean(
            plane, roi, o.ph, o.pw, height, width, pooled_h, pooled_w, spatial_scale, aligned,
            sampling_h, sampling_w));
    }
}

// grad_input[b, c] += for every sample of every bin, its four bilinear corners weighted by
// grad_output[k, c, ph, pw] / (gh * gw). One thread per grad_output element, atomicAdd into an
// accumulator of the compute type C (zero-filled by the caller; half is rounded once afterwards).
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
    for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
        const roi_bin<I> o = roi_split(index, channels, pooled_h, pooled_w);
        const C* roi = rois + o.k * 5;
        const I b = roi_batch(roi, batch, height, width);
        if (b < 0) continue;
        C* plane = grad_input + (b * channels + o.c) * height * width;
        roi_align_spread(
            plane, grad_output + index, roi, o.ph, o.pw, height, width, pooled_h, pooled_w,
            spatial_scale, aligned, sampling_h, sampling_w);
    }
}
