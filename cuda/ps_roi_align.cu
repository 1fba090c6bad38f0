// Position-sensitive RoI Align (R-FCN): forward and input gradient. Each bin (ph, pw) of output
// channel c reads input channel (c * PH + ph) * PW + pw, with RoI Align's geometry at aligned=true
// (the half-pixel shift, no minimum size). See roi_common.cuh for the math and the type names T
// (storage), C (compute), I (index).
#include "roi_common.cuh"

// output[k, c, ph, pw] = mean over the bin's gh x gw samples of the bilinear interpolation of
// input[b, (c * PH + ph) * PW + pw]; one thread per output element, consecutive threads on
// consecutive pw.
//
// Parameters: const T* input [N, C, H, W], const C* rois [K, 5], T* output
// [K, C / (PH * PW), PH, PW], I total (= output's size), I channels_out (= C / (PH * PW)),
// I height, I width, I batch, I pooled_h, I pooled_w, C spatial_scale, int sampling_h,
// int sampling_w (samples per bin along y and x; <= 0: adaptive along that axis).
template <typename T, typename I>
__global__ void ps_roi_align_forward(
    const T* __restrict__ input, const typename roi_compute<T>::type* __restrict__ rois,
    T* __restrict__ output, I total, I channels_out, I height, I width, I batch, I pooled_h,
    I pooled_w, typename roi_compute<T>::type spatial_scale, int sampling_h, int sampling_w)
{
    typedef typename roi_compute<T>::type C;
    for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
        const roi_bin<I> o = roi_split(index, channels_out, pooled_h, pooled_w);
        const C* roi = rois + o.k * 5;
        const I b = roi_batch(roi, batch, height, width);
        if (b < 0) {
            roi_store(output + index, C(0));
            continue;
        }
        const T* plane = input + roi_ps_plane(o, b, channels_out, pooled_h, pooled_w) * height *
                                     width;
        roi_store(output + index, roi_align_mean(
            plane, roi, o.ph, o.pw, height, width, pooled_h, pooled_w, spatial_scale, true,
            sampling_h, sampling_w));
    }
}

// grad_input[b, (c * PH + ph) * PW + pw] += for every sample of bin (ph, pw), its four bilinear
// corners weighted by grad_output[k, c, ph, pw] / (gh * gw). One thread per grad_output element,
// atomicAdd into an accumulator of the compute type C (zero-filled by the caller; half is rounded
// once afterwards), or in fixed point.
//
// Parameters: const T* grad_output [K, C / (PH * PW), PH, PW], const C* rois [K, 5],
// C* grad_input [N, C, H, W] or null, then the fixed-point accumulators, null unless grad_input
// is (deterministic=True; roi_fixed_sink of roi_common.cuh): unsigned long long* hi,
// unsigned long long* lo, unsigned int* flags, const C* max_abs, int count_bits, int low_bits,
// I total (= grad_output's size), I channels_out, I height, I width, I batch, I pooled_h,
// I pooled_w, C spatial_scale, int sampling_h, int sampling_w.
template <typename T, typename I>
__global__ void ps_roi_align_backward(
    const T* __restrict__ grad_output, const typename roi_compute<T>::type* __restrict__ rois,
    typename roi_compute<T>::type* __restrict__ grad_input, unsigned long long* __restrict__ hi,
    unsigned long long* __restrict__ lo, unsigned int* __restrict__ flags,
    const typename roi_compute<T>::type* __restrict__ max_abs, int count_bits, int low_bits,
    I total, I channels_out, I height, I width, I batch, I pooled_h, I pooled_w,
    typename roi_compute<T>::type spatial_scale, int sampling_h, int sampling_w)
{
    typedef typename roi_compute<T>::type C;
    // RoI Align's (aligned) adjoint of each bin, on the bin's own channel.
    const auto add_all = [&](const auto& sink) {
        for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
            const roi_bin<I> o = roi_split(index, channels_out, pooled_h, pooled_w);
            const C* roi = rois + o.k * 5;
            const I b = roi_batch(roi, batch, height, width);
            if (b < 0) continue;
            roi_align_spread(
                sink, roi_ps_plane(o, b, channels_out, pooled_h, pooled_w) * height * width,
                grad_output + index, roi, o.ph, o.pw, height, width, pooled_h, pooled_w,
                spatial_scale, true, sampling_h, sampling_w);
        }
    };
    if (grad_input != nullptr) {
        add_all(roi_atomic_sink<C, I>{grad_input});
    } else {
        add_all(roi_fixed_sink<C, I>{
            hi, lo, flags, roi_fixed_exponent(*max_abs, count_bits), low_bits});
    }
}
