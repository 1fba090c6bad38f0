// Input validation of the RoIs on the device: one launch, one atomicMin, so that validate=True
// costs a single small kernel and one synchronisation. See roi_common.cuh for T, C and I.
#include "roi_common.cuh"

// *first_invalid = min(*first_invalid, k) for every RoI k whose row holds a non-finite value or
// whose batch index is not an integer in [0, batch). The caller initialises *first_invalid to
// count, so count afterwards means every RoI is valid.
//
// Parameters: const C* rois [K, 5], I count (= K), I batch (= N), I* first_invalid.
template <typename T, typename I>
__global__ void roi_check(
    const typename roi_compute<T>::type* __restrict__ rois, I count, I batch,
    I* __restrict__ first_invalid)
{
    typedef typename roi_compute<T>::type C;
    for (I k = roi_first<I>(); k < count; k = roi_next(k, count)) {
        const C* roi = rois + k * 5;
        const C b = roi[0];
        // roi_image accepts what truncates into range; validation wants an exact integer.
        if (b != roi_trunc(b) || roi_image(roi, batch) < 0) atomicMin(first_invalid, k);
    }
}
