// Multi-scale RoI Align (FPN): each RoI pooled by RoI Align from the pyramid level its size picks,
// every level in one launch, no gather or scatter of RoIs. See roi_common.cuh for the bin math and
// the type names T (storage), C (compute), I (index); docs/semantics.md for the level rule.
#include "roi_common.cuh"

// Levels per launch: each level is five kernel parameters (a struct or an array of them would
// need a host-to-device copy per call).
#define MSRA_MAX_LEVELS 8

template <typename T>
using msra_compute = typename roi_compute<T>::type;

// Level n's parameters: its array (the forward's features [N, C, H_n, W_n]; the backward's offset
// of its gradient in the accumulator), H_n, W_n, its spatial scale, and bound_n, the least
// q = sqrt(area) / canonical_scale of a RoI pooled from beyond level n.
#define MSRA_LEVEL(A, n) A array##n, I height##n, I width##n, msra_compute<T> scale##n, \
    msra_compute<T> bound##n
#define MSRA_LEVELS(A) MSRA_LEVEL(A, 0), MSRA_LEVEL(A, 1), MSRA_LEVEL(A, 2), MSRA_LEVEL(A, 3), \
    MSRA_LEVEL(A, 4), MSRA_LEVEL(A, 5), MSRA_LEVEL(A, 6), MSRA_LEVEL(A, 7)
// The parameter `name` of level l (0 <= l < 8), through a switch: indexing an array of the eight
// with a run-time l would put it in local memory.
#define MSRA_PICK(l, name) msra_pick(l, name##0, name##1, name##2, name##3, name##4, name##5, \
    name##6, name##7)

template <typename V>
__device__ __forceinline__ V msra_pick(int l, V v0, V v1, V v2, V v3, V v4, V v5, V v6, V v7)
{
    switch (l) {
    case 0: return v0;
    case 1: return v1;
    case 2: return v2;
    case 3: return v3;
    case 4: return v4;
    case 5: return v5;
    case 6: return v6;
    default: return v7;
    }
}

// The level a RoI row (batch_index, x1, y1, x2, y2) is pooled from: the number of the first
// `bounds` of bound0..bound7 that q = sqrt((x2 - x1) * (y2 - y1)) / canonical_scale reaches (the
// bounds rise), or -1 when q is NaN (a box reversed along one axis has a negative area) or
// reaches `levels` of them. The host derives the bounds from torchvision's rule, floor(k0 +
// log2(q) + 1e-6) clamped to the pyramid, so that comparisons decide here what a correctly
// rounded log2 would: the same level on every backend.
template <typename C>
__device__ __forceinline__ int msra_level(
    const C* roi, C canonical_scale, int levels, int bounds, C bound0, C bound1, C bound2,
    C bound3, C bound4, C bound5, C bound6, C bound7)
{
    const C q = roi_sqrt((roi[3] - roi[1]) * (roi[4] - roi[2])) / canonical_scale;
    if (isnan(q)) return -1;
    const C bound[MSRA_MAX_LEVELS] = {bound0, bound1, bound2, bound3, bound4, bound5, bound6,
                                      bound7};
    int level = 0;
#pragma unroll
    for (int j = 0; j < MSRA_MAX_LEVELS; ++j) level += j < bounds && q >= bound[j] ? 1 : 0;
    return level < levels ? level : -1;
}

// output[k] = RoI Align of RoI k on its level's features at its level's scale (zeros for an
// invalid RoI or one without a level); one thread per output element, consecutive threads on
// consecutive pw.
//
// Parameters: const C* rois [K, 5], T* output [K, C, PH, PW], I total (= K * C * PH * PW),
// I channels, I batch, I pooled_h, I pooled_w, int sampling_h, int sampling_w, bool aligned,
// C canonical_scale, int levels (1 to 8), int bounds (0 to levels), then for each of the eight
// levels: const T* input [N, C, H, W] (any array for a level >= levels), I height, I width,
// C spatial_scale, C bound.
template <typename T, typename I>
__global__ void multi_scale_roi_align_forward(
    const msra_compute<T>* __restrict__ rois, T* __restrict__ output, I total, I channels,
    I batch, I pooled_h, I pooled_w, int sampling_h, int sampling_w, bool aligned,
    msra_compute<T> canonical_scale, int levels, int bounds, MSRA_LEVELS(const T* __restrict__))
{
    typedef msra_compute<T> C;
    for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
        const roi_bin<I> o = roi_split(index, channels, pooled_h, pooled_w);
        const C* roi = rois + o.k * 5;
        const int l = msra_level(roi, canonical_scale, levels, bounds, bound0, bound1, bound2,
                                 bound3, bound4, bound5, bound6, bound7);
        const I height = MSRA_PICK(l, height);
        const I width = MSRA_PICK(l, width);
        const I b = l < 0 ? I(-1) : roi_batch(roi, batch, height, width);
        if (b < 0) {
            roi_store(output + index, C(0));
            continue;
        }
        const T* plane = MSRA_PICK(l, array) + (b * channels + o.c) * height * width;
        roi_store(output + index, roi_align_mean(
            plane, roi, o.ph, o.pw, height, width, pooled_h, pooled_w, MSRA_PICK(l, scale),
            aligned, sampling_h, sampling_w));
    }
}

// The input gradient of every level: for each grad_output element, RoI Align's backward on its
// RoI's level, added into one zero-filled accumulator holding the levels' [N, C, H, W] gradients
// back to back: with atomicAdd into grad_input, of C (half is rounded once afterwards), or, when
// grad_input is null (deterministic=True), in fixed point into hi, lo and flags (roi_fixed_sink of
// roi_common.cuh; roi_fixed_finish turns them into the gradient).
//
// Parameters: const T* grad_output [K, C, PH, PW], const C* rois [K, 5], C* grad_input (all
// levels) or null, unsigned long long* hi (all levels) or null, unsigned long long* lo or null,
// unsigned int* flags or null, const C* max_abs [1] or null, int count_bits, int low_bits,
// I total (= K * C * PH * PW), I channels, I batch, I pooled_h, I pooled_w, int sampling_h,
// int sampling_w, bool aligned, C canonical_scale, int levels, int bounds, then for each of the
// eight levels: I offset (of its gradient in the accumulator), I height, I width,
// C spatial_scale, C bound.
template <typename T, typename I>
__global__ void multi_scale_roi_align_backward(
    const T* __restrict__ grad_output, const msra_compute<T>* __restrict__ rois,
    msra_compute<T>* __restrict__ grad_input, unsigned long long* __restrict__ hi,
    unsigned long long* __restrict__ lo, unsigned int* __restrict__ flags,
    const msra_compute<T>* __restrict__ max_abs, int count_bits, int low_bits, I total,
    I channels, I batch, I pooled_h, I pooled_w, int sampling_h, int sampling_w, bool aligned,
    msra_compute<T> canonical_scale, int levels, int bounds, MSRA_LEVELS(I))
{
    typedef msra_compute<T> C;
    const auto spread_all = [&](const auto& sink) {
        for (I index = roi_first<I>(); index < total; index = roi_next(index, total)) {
            const roi_bin<I> o = roi_split(index, channels, pooled_h, pooled_w);
            const C* roi = rois + o.k * 5;
            const int l = msra_level(roi, canonical_scale, levels, bounds, bound0, bound1, bound2,
                                     bound3, bound4, bound5, bound6, bound7);
            const I height = MSRA_PICK(l, height);
            const I width = MSRA_PICK(l, width);
            const I b = l < 0 ? I(-1) : roi_batch(roi, batch, height, width);
            if (b < 0) continue;
            roi_align_spread(
                sink, MSRA_PICK(l, array) + (b * channels + o.c) * height * width,
                grad_output + index, roi, o.ph, o.pw, height, width, pooled_h, pooled_w,
                MSRA_PICK(l, scale), aligned, sampling_h, sampling_w);
        }
    };
    if (grad_input != nullptr) {
        spread_all(roi_atomic_sink<C, I>{grad_input});
    } else {
        spread_all(roi_fixed_sink<C, I>{
            hi, lo, flags, roi_fixed_exponent(*max_abs, count_bits), low_bits});
    }
}
