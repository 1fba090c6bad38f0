// RoI Align (Mask R-CNN): forward and input gradient. See roi_common.cuh for the math and the
// type names T (storage), C (compute), I (index).
#include "roi_common.cuh"

// ----------------------------------------------------------------------------- avg mode
// A block per (RoI, channel tile), a thread per (channel, bin) of it, each bin a sum over the
// (pixel, weight) entries of its per-axis tables (roi_align_blocks, roi_common.cuh).

// The mean of each bin: a compensated sum of per-row sums |wy| * sum(|wx| * P[py, px]); a row
// that is not finite is summed again with NaN for the terms that read a non-finite value at
// weight 0 (roi_align_flagged). The features are [N, C, H, W], or [N, H, W, C] when Last.
template <typename T, typename C, typename I, bool Last>
struct roi_align_mean_op {
    const T* input;
    T* output;
    I channels, height, width, pooled_h, pooled_w;
    const T* plane;
    I at;
    roi_sum<C> sum;

    __device__ __forceinline__ I out(I k, I c, I ph, I pw) const
    {
        return ((k * channels + c) * pooled_h + ph) * pooled_w + pw;
    }

    __device__ __forceinline__ void invalid(I k, I c, I ph, I pw) const
    {
        roi_store(output + out(k, c, ph, pw), C(0));
    }

    __device__ __forceinline__ void begin(I k, I b, I c, I ph, I pw)
    {
        plane = input + b * channels * height * width + (Last ? c : c * height * width);
        at = out(k, c, ph, pw);
        sum = roi_sum<C>();
    }

    __device__ __forceinline__ C load(const T* line, I px) const
    {
        return roi_load(line[Last ? px * channels : px]);
    }

    __device__ __forceinline__ void row(I py, C wy, const I* xp, const C* xw, int n)
    {
        const T* line = plane + (Last ? py * width * channels : py * width);
        sum.add(roi_align_row<C, I>(wy, n, [&](int e, I& px, C& wx) { px = xp[e]; wx = xw[e]; },
                                    [&](I px) { return load(line, px); }));
    }

    __device__ __forceinline__ void end() const { roi_store(output + at, sum.total); }
};

// output[k, c, ph, pw] = mean over the bin's gh x gw samples of the bilinear interpolation of
// input[b, c] (docs/semantics.md), as the separable sum above.
//
// Parameters: const T* input [N, C, H, W] ([N, H, W, C] with channels_last), const C* rois
// [K, 5], T* output [K, C, PH, PW], I total (= K * C * PH * PW), I channels, I height, I width,
// I batch, I pooled_h, I pooled_w, C spatial_scale, int sampling_h, int sampling_w (samples per
// bin along y and x; <= 0: adaptive along that axis), bool aligned, bool channels_last.
template <typename T, typename I>
__global__ void roi_align_forward(
    const T* __restrict__ input, const typename roi_compute<T>::type* __restrict__ rois,
    T* __restrict__ output, I total, I channels, I height, I width, I batch, I pooled_h,
    I pooled_w, typename roi_compute<T>::type spatial_scale, int sampling_h, int sampling_w,
    bool aligned, bool channels_last)
{
    typedef typename roi_compute<T>::type C;
    __shared__ roi_align_tables<C, I> tables;
    const I count = total / (channels * pooled_h * pooled_w);
    if (channels_last) {
        roi_align_mean_op<T, C, I, true> op{input, output, channels, height, width, pooled_h,
                                            pooled_w};
        roi_align_blocks(tables, op, rois, count, channels, height, width, batch, pooled_h,
                         pooled_w, spatial_scale, sampling_h, sampling_w, aligned, true);
    } else {
        roi_align_mean_op<T, C, I, false> op{input, output, channels, height, width, pooled_h,
                                             pooled_w};
        roi_align_blocks(tables, op, rois, count, channels, height, width, batch, pooled_h,
                         pooled_w, spatial_scale, sampling_h, sampling_w, aligned, false);
    }
}

// The adjoint: each bin's gradient g spread over the pixels its entries pair, g * |wy| * |wx| to
// each (NaN where a non-finite g meets a pixel read at weight 0), handed to the sink.
template <typename T, typename C, typename I, typename Sink>
struct roi_align_spread_op {
    const T* grad_output;
    Sink sink;
    I channels, height, width, pooled_h, pooled_w;
    I plane;
    C g;

    __device__ __forceinline__ void invalid(I, I, I, I) const {}

    __device__ __forceinline__ void begin(I k, I b, I c, I ph, I pw)
    {
        plane = (b * channels + c) * height * width;
        g = roi_load(grad_output[((k * channels + c) * pooled_h + ph) * pooled_w + pw]);
    }

    __device__ __forceinline__ void row(I py, C wy, const I* xp, const C* xw, int n) const
    {
        roi_align_row_spread<C, I>(sink, plane + py * width, g, wy, n,
                                   [&](int e, I& px, C& wx) { px = xp[e]; wx = xw[e]; });
    }

    __device__ __forceinline__ void end() const {}
};

template <typename T, typename I, typename Sink>
__device__ __forceinline__ void roi_align_backward_blocks(
    const T* __restrict__ grad_output, const typename roi_compute<T>::type* __restrict__ rois,
    const Sink& sink, I total, I channels, I height, I width, I batch, I pooled_h, I pooled_w,
    typename roi_compute<T>::type spatial_scale, int sampling_h, int sampling_w, bool aligned)
{
    typedef typename roi_compute<T>::type C;
    __shared__ roi_align_tables<C, I> tables;
    roi_align_spread_op<T, C, I, Sink> op{grad_output, sink, channels, height, width, pooled_h,
                                          pooled_w};
    roi_align_blocks(tables, op, rois, total / (channels * pooled_h * pooled_w), channels,
                     height, width, batch, pooled_h, pooled_w, spatial_scale, sampling_h,
                     sampling_w, aligned, false);
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
    roi_align_backward_blocks(grad_output, rois, sink, total, channels, height, width, batch,
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
    roi_align_backward_blocks(grad_output, rois, sink, total, channels, height, width, batch,
                              pooled_h, pooled_w, spatial_scale, sampling_h, sampling_w, aligned);
}

// ----------------------------------------------------------------------------- max mode
// A bin's pick in max mode: the first of its samples, in row-major (iy, ix) order, whose value no
// later sample exceeds, NaN counting as the largest value (docs/semantics.md, "RoI Align, max
// mode"). A sample outside the map has value 0 and no corners; a bin without samples picks
// nothing and holds 0.
template <typename C, typename I>
struct roi_align_pick {
    C value;
    int iy, ix;
    bool found;   // the bin has a sample
    bool inside;  // the pick lies inside the map: wy and wx hold its corners
    roi_lerp<C, I> wy, wx;
};

// Whether a sample of value v, later in row-major order, replaces the current pick: only when it
// is strictly greater, or NaN over a number. So the first maximum wins, and the first NaN.
template <typename C>
__device__ __forceinline__ bool roi_align_max_takes(C v, C best, bool found)
{
    return !found || v > best || (isnan(v) && !isnan(best));
}

// Along one axis of bin p, the candidate that follows candidate i (an inside sample), or last,
// the end of the bin's inside samples (docs/semantics.md, "RoI Align, max mode"). The samples
// that read the same low pixel (roi_lerp_weights' lo) form a group, a run of indices along which
// the high pixel's weight is monotone; a group's candidates are its first sample and the first
// whose weight equals its last one's. On a pair of groups the value is affine in each axis'
// weight, so it is largest at a pair of candidates, which no other sample of that value
// precedes. With at most two samples per bin every sample is taken: one that repeats a
// candidate's weight repeats its value later, and is never picked.
template <typename C, typename I>
__device__ __forceinline__ int roi_align_max_next(
    const roi_align_axis<C>& a, I p, I extent, int i, int last)
{
    if (a.grid <= 2) return i + 1;
    // An inside sample's pixel and weight; a sample outside (none is, in [i, last)) ends a group.
    const auto lerp = [&](int j, roi_lerp<C, I>& w) {
        return roi_lerp_weights(roi_align_sample(a, p, j), extent, w);
    };
    roi_lerp<C, I> w;
    if (!lerp(i, w)) return last;
    const I group = w.lo;
    const int end = roi_first_where(i + 1, last, [&](int j) {
        roi_lerp<C, I> v;
        return !lerp(j, v) || v.lo != group;
    });
    roi_lerp<C, I> e;
    lerp(end - 1, e);
    if (e.whi == w.whi) return end;
    return roi_first_where(i + 1, end - 1, [&](int j) {
        roi_lerp<C, I> v;
        return !lerp(j, v) || v.whi == e.whi;
    });
}

// The pick of bin (ph, pw) of s on plane [H, W]: the pairs of its candidates along y and x
// (roi_align_max_next) visited in row-major order, then the first sample outside the window
// (value 0) put in its place. The work follows the pixels the bin covers, not its samples. The
// forward and backward kernels both call this, so the gradient goes to the sample whose value
// the forward stored.
template <typename T, typename C, typename I>
__device__ __forceinline__ roi_align_pick<C, I> roi_align_max_pick(
    const T* plane, const roi_align_bin<C>& s, I ph, I pw, I height, I width)
{
    roi_align_pick<C, I> best;
    best.value = C(0);
    best.iy = 0;
    best.ix = 0;
    best.found = false;
    best.inside = false;
    if (s.y.grid == 0 || s.x.grid == 0) return best;
    for (int iy = s.y_first; iy < s.y_last;
         iy = roi_align_max_next(s.y, ph, height, iy, s.y_last)) {
        roi_lerp<C, I> wy;
        const bool row = roi_lerp_weights(roi_align_sample(s.y, ph, iy), height, wy);
        for (int ix = s.x_first; ix < s.x_last;
             ix = roi_align_max_next(s.x, pw, width, ix, s.x_last)) {
            roi_lerp<C, I> wx;
            const bool inside = row && roi_lerp_weights(roi_align_sample(s.x, pw, ix), width, wx);
            const C v = inside
                ? roi_bilinear_rn(plane + wy.lo * width, plane + wy.hi * width, wy, wx) : C(0);
            if (roi_align_max_takes(v, best.value, best.found)) {
                best.value = v;
                best.iy = iy;
                best.ix = ix;
                best.found = true;
                best.inside = inside;
                if (inside) {
                    best.wy = wy;
                    best.wx = wx;
                }
            }
            if (!row) break;  // the rest of the row is outside too: 0 again, not taken
        }
    }
    int oy, ox;
    if (roi_align_first_outside(s, oy, ox)) {
        const bool earlier = oy < best.iy || (oy == best.iy && ox < best.ix);
        if (!best.found || C(0) > best.value || (C(0) == best.value && earlier)) {
            best.value = C(0);
            best.iy = oy;
            best.ix = ox;
            best.found = true;
            best.inside = false;
        }
    }
    return best;
}

// output[k, c, ph, pw] = the value of the bin's pick (roi_align_max_pick); one thread per output
// element, consecutive threads on consecutive pw.
//
// Parameters: as roi_align_forward.
template <typename T, typename I>
__global__ void roi_align_max_forward(
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
        roi_store(output + index, roi_align_max_pick(plane, s, o.ph, o.pw, height, width).value);
    }
}

// grad_input[b, c] += grad_output[k, c, ph, pw] times each of the four bilinear weights of the
// bin's pick, found again in input; nothing for a pick outside the map or a bin without samples.
// One thread per grad_output element, each term handed to the sink (roi_common.cuh).
template <typename T, typename I, typename Sink>
__device__ __forceinline__ void roi_align_max_backward_terms(
    const T* __restrict__ grad_output, const T* __restrict__ input,
    const typename roi_compute<T>::type* __restrict__ rois, const Sink& sink, I total,
    I channels, I height, I width, I batch, I pooled_h, I pooled_w,
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
        const I offset = (b * channels + o.c) * height * width;
        const roi_align_pick<C, I> m =
            roi_align_max_pick(input + offset, s, o.ph, o.pw, height, width);
        if (!m.inside) continue;

        const C g = roi_load(grad_output[index]);
        const I row_lo = offset + m.wy.lo * width;
        const I row_hi = offset + m.wy.hi * width;
        sink.add(row_lo + m.wx.lo, g * (m.wy.wlo * m.wx.wlo));
        sink.add(row_lo + m.wx.hi, g * (m.wy.wlo * m.wx.whi));
        sink.add(row_hi + m.wx.lo, g * (m.wy.whi * m.wx.wlo));
        sink.add(row_hi + m.wx.hi, g * (m.wy.whi * m.wx.whi));
    }
}

// The max-mode gradient with atomicAdd into an accumulator of the compute type C (zero-filled by
// the caller).
//
// Parameters: const T* grad_output [K, C, PH, PW], const T* input [N, C, H, W] (the forward's
// features), const C* rois [K, 5], C* grad_input [N, C, H, W], then as roi_align_backward.
template <typename T, typename I>
__global__ void roi_align_max_backward(
    const T* __restrict__ grad_output, const T* __restrict__ input,
    const typename roi_compute<T>::type* __restrict__ rois,
    typename roi_compute<T>::type* __restrict__ grad_input, I total, I channels, I height,
    I width, I batch, I pooled_h, I pooled_w, typename roi_compute<T>::type spatial_scale,
    int sampling_h, int sampling_w, bool aligned)
{
    typedef typename roi_compute<T>::type C;
    const roi_atomic_sink<C, I> sink{grad_input};
    roi_align_max_backward_terms(grad_output, input, rois, sink, total, channels, height, width,
                                 batch, pooled_h, pooled_w, spatial_scale, sampling_h,
                                 sampling_w, aligned);
}

// The max-mode gradient in fixed point (deterministic=True), as roi_align_backward_deterministic.
//
// Parameters: const T* grad_output [K, C, PH, PW], const T* input [N, C, H, W], const C* rois
// [K, 5], then hi, lo, flags, max_abs, count_bits, low_bits as roi_align_backward_deterministic,
// then as roi_align_backward from total on.
template <typename T, typename I>
__global__ void roi_align_max_backward_deterministic(
    const T* __restrict__ grad_output, const T* __restrict__ input,
    const typename roi_compute<T>::type* __restrict__ rois, unsigned long long* __restrict__ hi,
    unsigned long long* __restrict__ lo, unsigned int* __restrict__ flags,
    const typename roi_compute<T>::type* __restrict__ max_abs, int count_bits, int low_bits,
    I total, I channels, I height, I width, I batch, I pooled_h, I pooled_w,
    typename roi_compute<T>::type spatial_scale, int sampling_h, int sampling_w, bool aligned)
{
    typedef typename roi_compute<T>::type C;
    const roi_fixed_sink<C, I> sink{
        hi, lo, flags, roi_fixed_exponent(*max_abs, count_bits), low_bits};
    roi_align_max_backward_terms(grad_output, input, rois, sink, total, channels, height, width,
                                 batch, pooled_h, pooled_w, spatial_scale, sampling_h,
                                 sampling_w, aligned);
}
