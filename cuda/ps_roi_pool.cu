// Position-sensitive RoI Pool (R-FCN): forward and input gradient. Each bin (ph, pw) of output
// channel c averages input channel (c * PH + ph) * PW + pw over a window of whole pixels. See
// roi_common.cuh for the math and the type names T (storage), C (compute), I (index).
#include "roi_common.cuh"

// output[k, c, ph, pw] = mean of input[b, (c * PH + ph) * PW + pw] over the bin's window (summed
// with compensation in C); an empty window or an invalid RoI gives 0. One thread per output
// element, consecutive threads on consecutive pw.
//
// Parameters: const T* input [N, C, H, W], const C* rois [K, 5], T* output
// [K, C / (PH * PW), PH, PW], I total (= output's size), I channels_out (= C / (PH * PW)),
// I height, I width, I batch, I pooled_h, I pooled_w, C spatial_scale.
template <typename T, typename I>
__global__ void ps_roi_pool_forward(
    const T* __restrict__ input, const typename roi_compute<T>::type* __restrict__ rois,
    T* __restrict__ output, I total, I channels_out, I height, I width, I batch, I pooled_h,
    I pooled_w, typename roi_compute<T>::type spatial_scale)
{
    typedef typename roi_compute<T>::type C;
    for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
        const roi_bin<I> o = roi_split(index, channels_out, pooled_h, pooled_w);
        const C* roi = rois + o.k * 5;
        const I b = roi_batch(roi, batch, height, width);
        I h_first = 0, h_last = 0, w_first = 0, w_last = 0;
        if (b >= 0) {
            roi_ps_pool_window(roi, o.ph, o.pw, height, width, pooled_h, pooled_w, spatial_scale,
                               h_first, h_last, w_first, w_last);
        }
        if (h_last <= h_first || w_last <= w_first) {
            roi_store(output + index, C(0));
            continue;
        }
        const T* plane = input + roi_ps_plane(o, b, channels_out, pooled_h, pooled_w) * height *
                                     width;
        roi_sum<C> sum;
        for (I h = h_first; h < h_last; ++h) {
            for (I w = w_first; w < w_last; ++w) sum.add(roi_load(plane[h * width + w]));
        }
        const C area = C(h_last - h_first) * C(w_last - w_first);
        roi_store(output + index, sum.total / area);
    }
}

// grad_input[b, (c * PH + ph) * PW + pw] += grad_output[k, c, ph, pw] / area over the bin's
// window, the adjoint of the forward pass (windows clipped to H - 1 and W - 1 here too). One
// thread per grad_output element, atomicAdd into an accumulator of the compute type C
// (zero-filled by the caller; half is rounded once afterwards), or in fixed point.
//
// Parameters: const T* grad_output [K, C / (PH * PW), PH, PW], const C* rois [K, 5],
// C* grad_input [N, C, H, W] or null, then the fixed-point
// accumulators, null unless grad_input is (deterministic=True; roi_fixed_sink of roi_common.cuh):
// unsigned long long* hi, unsigned long long* lo, unsigned int* flags, const C* max_abs,
// int count_bits, int low_bits, I total (= grad_output's size), I channels_out, I height, I width,
// I batch, I pooled_h, I pooled_w, C spatial_scale.
template <typename T, typename I>
__global__ void ps_roi_pool_backward(
    const T* __restrict__ grad_output, const typename roi_compute<T>::type* __restrict__ rois,
    typename roi_compute<T>::type* __restrict__ grad_input, unsigned long long* __restrict__ hi,
    unsigned long long* __restrict__ lo, unsigned int* __restrict__ flags,
    const typename roi_compute<T>::type* __restrict__ max_abs, int count_bits, int low_bits,
    I total, I channels_out, I height, I width, I batch, I pooled_h, I pooled_w,
    typename roi_compute<T>::type spatial_scale)
{
    typedef typename roi_compute<T>::type C;
    const auto add_all = [&](const auto& sink) {
        for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
            const roi_bin<I> o = roi_split(index, channels_out, pooled_h, pooled_w);
            const C* roi = rois + o.k * 5;
            const I b = roi_batch(roi, batch, height, width);
            if (b < 0) continue;
            I h_first, h_last, w_first, w_last;
            roi_ps_pool_window(roi, o.ph, o.pw, height, width, pooled_h, pooled_w, spatial_scale,
                               h_first, h_last, w_first, w_last);
            if (h_last <= h_first || w_last <= w_first) continue;
            const C area = C(h_last - h_first) * C(w_last - w_first);
            const C g = roi_load(grad_output[index]) / area;
            const I plane = roi_ps_plane(o, b, channels_out, pooled_h, pooled_w) * height * width;
            for (I h = h_first; h < h_last; ++h) {
                for (I w = w_first; w < w_last; ++w) sink.add(plane + h * width + w, g);
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
