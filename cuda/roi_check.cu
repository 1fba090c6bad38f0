// Input validation on the device: the RoIs (and, for RoI Pool's backward, the indices) are checked
// by small kernels that atomicMin the first bad position into one result buffer, so that
// validate=True costs one read-back, one synchronisation. See roi_common.cuh for T, C and I.
#include "roi_common.cuh"

// *first_invalid = min(*first_invalid, k) for every RoI k whose row holds a value of magnitude
// above limit (NaN and infinities included) or whose batch index is not an integer in
// [0, batch). limit is the largest finite value of the compute dtype the RoIs will be converted
// to, so that float64 boxes for float32 features are checked before they are narrowed. The
// caller initialises *first_invalid to count, so count afterwards means every RoI is valid.
//
// Parameters: const C* rois [K, columns], I count (= K), I batch (= N), C limit,
// I* first_invalid, int columns (5, or 6 for rotated RoIs).
template <typename T, typename I>
__global__ void roi_check(
    const typename roi_compute<T>::type* __restrict__ rois, I count, I batch,
    typename roi_compute<T>::type limit, I* __restrict__ first_invalid, int columns)
{
    typedef typename roi_compute<T>::type C;
    for (I k = roi_first<I>(); k < count; k = roi_next(k, count)) {
        const C* roi = rois + k * columns;
        const C b = roi[0];
        // roi_image accepts what truncates into range; validation wants an exact integer.
        bool bad = b != roi_trunc(b) || roi_image(roi, batch, columns) < 0;
        for (int i = 0; i < columns; ++i) bad = bad || !(roi_abs(roi[i]) <= limit);
        if (bad) atomicMin(first_invalid, k);
    }
}

// *first_bad = min(*first_bad, i) for every i whose index argmax[i] lies outside [-1, plane)
// (-1 marks an empty bin). The caller initialises *first_bad to total.
//
// Parameters: const long long* argmax [total], I total, long long plane (= H * W), I* first_bad.
template <typename I>
__global__ void roi_check_indices(
    const long long* __restrict__ argmax, I total, long long plane, I* __restrict__ first_bad)
{
    for (I i = roi_first<I>(); i < total; i = roi_next(i, total)) {
        const long long at = argmax[i];
        if (at < -1 || at >= plane) atomicMin(first_bad, i);
    }
}
