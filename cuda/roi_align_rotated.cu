// RoI Align Rotated (detectron2's ROIAlignRotated, mmcv's roi_align_rotated): forward and input
// gradient. See roi_common.cuh for the math and the type names T (storage), C (compute), I
// (index); a RoI row is (batch_index, cx, cy, w, h, angle in degrees).
#include "roi_common.cuh"

// output[k, c, ph, pw] = mean over the bin's gh x gw samples, turned onto the map, of the
// bilinear interpolation of input[b, c]; one thread per output element, consecutive threads on
// consecutive pw.
//
// Parameters: const T* input [N, C, H, W], const C* rois [K, 6], T* output [K, C, PH, PW],
// I total (= K * C * PH * PW), I channels, I height, I width, I batch, I pooled_h, I pooled_w,
// C spatial_scale, int sampling_h, int sampling_w (samples per bin along the box's height and
// width; <= 0: adaptive along that axis), bool aligned, bool clockwise.
template <typename T, typename I>
__global__ void roi_align_rotated_forward(
    const T* __restrict__ input, const typename roi_compute<T>::type* __restrict__ rois,
    T* __restrict__ output, I total, I channels, I height, I width, I batch, I pooled_h,
    I pooled_w, typename roi_compute<T>::type spatial_scale, int sampling_h, int sampling_w,
    bool aligned, bool clockwise)
{
    typedef typename roi_compute<T>::type C;
    for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
        const roi_bin<I> o = roi_split(index, channels, pooled_h, pooled_w);
        const C* roi = rois + o.k * 6;
        const I b = roi_batch(roi, batch, height, width, 6);
        if (b < 0) {
            roi_store(output + index, C(0));
            continue;
        }
        const roi_rotated<C> r = roi_rotated_geometry(
            roi, spatial_scale, aligned, clockwise, pooled_h, pooled_w, sampling_h, sampling_w);
        const roi_rotated_bin s = roi_rotated_rows(r, o.ph, o.pw, height, width);

        const T* plane = input + (b * channels + o.c) * height * width;
        roi_sum<C> sum;
        for (int iy = s.y_first; iy < s.y_last; ++iy) {
            const C yy = roi_align_sample(r.y, o.ph, iy);
            int x_first, x_last;
            roi_rotated_columns(r, s, yy, o.pw, height, width, x_first, x_last);
            for (int ix = x_first; ix < x_last; ++ix) {
                C y, x;
                roi_rotated_point(r, yy, roi_align_sample(r.x, o.pw, ix), y, x);
                roi_lerp<C, I> wy, wx;
                if (!roi_lerp_weights(y, height, wy) || !roi_lerp_weights(x, width, wx)) continue;
                const T* row_lo = plane + wy.lo * width;
                const T* row_hi = plane + wy.hi * width;
                sum.add(wy.wlo * wx.wlo * roi_load(row_lo[wx.lo]) +
                        wy.wlo * wx.whi * roi_load(row_lo[wx.hi]) +
                        wy.whi * wx.wlo * roi_load(row_hi[wx.lo]) +
                        wy.whi * wx.whi * roi_load(row_hi[wx.hi]));
            }
        }
        // Samples outside the map count too: they dilute the mean.
        const C count = roi_max(C(r.y.grid) * C(r.x.grid), C(1));
        roi_store(output + index, sum.total / count);
    }
}

// grad_input[b, c] += for every sample of every bin, its four bilinear corners weighted by
// grad_output[k, c, ph, pw] / (gh * gw). One thread per grad_output element, atomicAdd into an
// accumulator of the compute type C (zero-filled by the caller; half is rounded once afterwards),
// or in fixed point.
//
// Parameters: const T* grad_output [K, C, PH, PW], const C* rois [K, 6],
// C* grad_input [N, C, H, W] or null, then the fixed-point
// accumulators, null unless grad_input is (deterministic=True; roi_fixed_sink of roi_common.cuh):
// unsigned long long* hi, unsigned long long* lo, unsigned int* flags, const C* max_abs,
// int count_bits, int low_bits, I total (= K * C * PH * PW), I channels, I height, I width, I batch,
// I pooled_h, I pooled_w, C spatial_scale, int sampling_h, int sampling_w, bool aligned,
// bool clockwise.
template <typename T, typename I>
__global__ void roi_align_rotated_backward(
    const T* __restrict__ grad_output, const typename roi_compute<T>::type* __restrict__ rois,
    typename roi_compute<T>::type* __restrict__ grad_input, unsigned long long* __restrict__ hi,
    unsigned long long* __restrict__ lo, unsigned int* __restrict__ flags,
    const typename roi_compute<T>::type* __restrict__ max_abs, int count_bits, int low_bits,
    I total, I channels, I height, I width, I batch, I pooled_h, I pooled_w,
    typename roi_compute<T>::type spatial_scale, int sampling_h, int sampling_w, bool aligned,
    bool clockwise)
{
    typedef typename roi_compute<T>::type C;
    const auto add_all = [&](const auto& sink) {
        for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
            const roi_bin<I> o = roi_split(index, channels, pooled_h, pooled_w);
            const C* roi = rois + o.k * 6;
            const I b = roi_batch(roi, batch, height, width, 6);
            if (b < 0) continue;
            const roi_rotated<C> r = roi_rotated_geometry(
                roi, spatial_scale, aligned, clockwise, pooled_h, pooled_w, sampling_h,
                sampling_w);
            const roi_rotated_bin s = roi_rotated_rows(r, o.ph, o.pw, height, width);
            if (s.y_first >= s.y_last) continue;

            // No max(., 1) here: a bin without samples has no sample to pass gradient to.
            const C count = C(r.y.grid) * C(r.x.grid);
            const C g = roi_load(grad_output[index]);
            const I plane = (b * channels + o.c) * height * width;
            for (int iy = s.y_first; iy < s.y_last; ++iy) {
                const C yy = roi_align_sample(r.y, o.ph, iy);
                int x_first, x_last;
                roi_rotated_columns(r, s, yy, o.pw, height, width, x_first, x_last);
                for (int ix = x_first; ix < x_last; ++ix) {
                    C y, x;
                    roi_rotated_point(r, yy, roi_align_sample(r.x, o.pw, ix), y, x);
                    roi_lerp<C, I> wy, wx;
                    if (!roi_lerp_weights(y, height, wy) || !roi_lerp_weights(x, width, wx)) {
                        continue;
                    }
                    const I row_lo = plane + wy.lo * width;
                    const I row_hi = plane + wy.hi * width;
                    sink.add(row_lo + wx.lo, g * (wy.wlo * wx.wlo) / count);
                    sink.add(row_lo + wx.hi, g * (wy.wlo * wx.whi) / count);
                    sink.add(row_hi + wx.lo, g * (wy.whi * wx.wlo) / count);
                    sink.add(row_hi + wx.hi, g * (wy.whi * wx.whi) / count);
                }
            }
        }
    };
    if (grad_input != nullptr) {
        add_all(roi_atomic_sink<C, I>{grad_input});
    } else {
        add_all(roi_fixed_sink<C, I>{
            hi, lo, flags, roi_fixed_exponent(*max_abs, count_bits), low_bits});
    }
}
