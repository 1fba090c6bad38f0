// Shared math of the RoI kernels: the one place that says how a RoI, a bin, a bilinear sample and
// a max-pool window are computed (docs/semantics.md). roi_align.cu, roi_pool.cu only loop and store.
//
// Type names: T is the storage type (__half, __nv_bfloat16, float, double), C the compute type
// (float for the first three, double for double; boxes and gradient accumulators use C), I the
// index type (int, or long long when an element count exceeds 2**31 - 1).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// At most this many samples per bin along one axis: an adaptive grid of a gigantic box is capped
// in floating point before it is converted to int, so it cannot overflow.
#define ROI_MAX_GRID (1 << 20)
// The float32 maximum, the starting value of every RoI Pool window (for every dtype).
#define ROI_FLT_MAX 3.402823466e+38f

template <typename T> struct roi_compute { typedef T type; };
template <> struct roi_compute<__half> { typedef float type; };
template <> struct roi_compute<__nv_bfloat16> { typedef float type; };

// ----------------------------------------------------------------------------- scalar helpers
// Float and double spelled out, so that no float path is promoted to double by accident.
__host__ __device__ __forceinline__ float roi_floor(float v) { return floorf(v); }
__host__ __device__ __forceinline__ double roi_floor(double v) { return floor(v); }
__host__ __device__ __forceinline__ float roi_ceil(float v) { return ceilf(v); }
__host__ __device__ __forceinline__ double roi_ceil(double v) { return ceil(v); }
__host__ __device__ __forceinline__ float roi_round(float v) { return roundf(v); }
__host__ __device__ __forceinline__ double roi_round(double v) { return round(v); }
__host__ __device__ __forceinline__ float roi_trunc(float v) { return truncf(v); }
__host__ __device__ __forceinline__ double roi_trunc(double v) { return trunc(v); }
__host__ __device__ __forceinline__ float roi_abs(float v) { return fabsf(v); }
__host__ __device__ __forceinline__ double roi_abs(double v) { return fabs(v); }
__host__ __device__ __forceinline__ float roi_min(float a, float b) { return fminf(a, b); }
__host__ __device__ __forceinline__ double roi_min(double a, double b) { return fmin(a, b); }
__host__ __device__ __forceinline__ float roi_max(float a, float b) { return fmaxf(a, b); }
__host__ __device__ __forceinline__ double roi_max(double a, double b) { return fmax(a, b); }

// fmin/fmax drop a NaN, so a NaN lands on lo: the result always converts to an integer safely.
// A compensated (Kahan) sum. A plain float32 sum stops taking in small terms once it has grown
// (2**24 samples of 0.5 add nothing more), so a bin's mean would depend on how many samples it
// takes; this one stays within a few ulp of the exact sum whatever their number. Non-finite terms
// sum as they would plainly (the carry is dropped once the total is not finite).
template <typename C>
struct roi_sum {
    C total;
    C carry;

    __host__ __device__ __forceinline__ roi_sum() : total(C(0)), carry(C(0)) {}

    __host__ __device__ __forceinline__ void add(C v)
    {
        const C y = v - carry;
        const C t = total + y;
        carry = isfinite(t) ? (t - total) - y : C(0);
        total = t;
    }
};

template <typename C>
__host__ __device__ __forceinline__ C roi_clamp(C v, C lo, C hi)
{
    return roi_min(roi_max(v, lo), hi);
}

__device__ __forceinline__ float roi_load(__half v) { return __half2float(v); }
__device__ __forceinline__ float roi_load(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float roi_load(float v) { return v; }
__device__ __forceinline__ double roi_load(double v) { return v; }
__device__ __forceinline__ void roi_store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void roi_store(__nv_bfloat16* p, float v)
{
    *p = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void roi_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void roi_store(double* p, double v) { *p = v; }

// ----------------------------------------------------------------------------- grid-stride loop
// for (I i = roi_first<I>(); i < total; i = roi_next(i, total)) visits every element once with
// any grid; the step cannot overflow I (i + stride is only formed when it stays below total).
template <typename I>
__device__ __forceinline__ I roi_first()
{
    return static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
}

template <typename I>
__device__ __forceinline__ I roi_next(I i, I total)
{
    const I stride = static_cast<I>(blockDim.x) * static_cast<I>(gridDim.x);
    return total - i > stride ? i + stride : total;
}

// Coordinates (k, c, ph, pw) of a flat index into a [K, C, PH, PW] array.
template <typename I>
struct roi_bin {
    I k, c, ph, pw;
};

template <typename I>
__host__ __device__ __forceinline__ roi_bin<I> roi_split(
    I index, I channels, I pooled_h, I pooled_w)
{
    roi_bin<I> o;
    o.pw = index % pooled_w;
    index /= pooled_w;
    o.ph = index % pooled_h;
    index /= pooled_h;
    o.c = index % channels;
    o.k = index / channels;
    return o;
}

// ----------------------------------------------------------------------------- RoIs
// The image a RoI row (batch_index, x1, y1, x2, y2) refers to, or -1 when the row is invalid: a
// batch index outside [0, batch) after truncation toward zero, or a non-finite value. columns is
// the row's width (6 for a rotated row (batch_index, cx, cy, w, h, angle)).
template <typename C, typename I>
__host__ __device__ __forceinline__ I roi_image(const C* roi, I batch, int columns = 5)
{
    bool finite = true;
    for (int i = 0; i < columns; ++i) finite = finite && isfinite(roi[i]);
    const C b = roi_trunc(roi[0]);
    if (!finite || !(b >= C(0) && b < C(batch))) return -1;
    const I index = static_cast<I>(b);
    return index < batch ? index : -1;
}

// The image a RoI reads, or -1 when the RoI is invalid (see roi_image) or the feature plane is
// empty. An invalid RoI yields zeros, zero gradient and argmax -1.
template <typename C, typename I>
__host__ __device__ __forceinline__ I roi_batch(
    const C* roi, I batch, I height, I width, int columns = 5)
{
    return height > 0 && width > 0 ? roi_image(roi, batch, columns) : I(-1);
}

// ----------------------------------------------------------------------------- RoI Align
// One axis of one RoI: where it starts, how wide a bin is, and how many samples a bin takes.
template <typename C>
struct roi_align_axis {
    C start;
    C bin;
    int grid;
};

// Samples per bin along an axis of size (feature pixels) cut into pooled bins: sampling_ratio,
// or with sampling_ratio <= 0 ceil(size / pooled) (adaptive, per RoI); capped at ROI_MAX_GRID.
template <typename C, typename I>
__host__ __device__ __forceinline__ int roi_align_grid(C size, I pooled, int sampling_ratio)
{
    if (sampling_ratio > 0) return sampling_ratio < ROI_MAX_GRID ? sampling_ratio : ROI_MAX_GRID;
    // A negative size gives 0 samples; clamping precedes the conversion.
    return static_cast<int>(roi_clamp(roi_ceil(size / C(pooled)), C(0), C(ROI_MAX_GRID)));
}

// start: the scaled box corner; end: the opposite corner; pooled: bins along the axis.
template <typename C, typename I>
__host__ __device__ __forceinline__ roi_align_axis<C> roi_align_geometry(
    C lo, C hi, C scale, bool aligned, I pooled, int sampling_ratio)
{
    const C offset = aligned ? C(0.5) : C(0);
    roi_align_axis<C> a;
    a.start = lo * scale - offset;
    C size = hi * scale - offset - a.start;
    if (!aligned) size = roi_max(size, C(1));
    a.bin = size / C(pooled);
    a.grid = roi_align_grid(size, pooled, sampling_ratio);
    return a;
}

// Position of sample i (of a.grid) in bin p.
template <typename C, typename I>
__host__ __device__ __forceinline__ C roi_align_sample(const roi_align_axis<C>& a, I p, int i)
{
    return a.start + C(p) * a.bin + (C(i) + C(0.5)) * a.bin / C(a.grid);
}

template <typename C, typename I>
__host__ __device__ __forceinline__ bool roi_align_inside(
    const roi_align_axis<C>& a, I p, int i, I extent)
{
    const C v = roi_align_sample(a, p, i);
    return v >= C(-1) && v <= C(extent);
}

// The samples of bin p that can lie inside [-1, extent], as [first, last). Sample positions are
// monotone in i (each rounding step is), so the inside ones are contiguous: only they are
// visited, and a box reaching far outside the map costs no more than one inside it. The loops
// still test every visited sample, so this never changes a result.
template <typename C, typename I>
__host__ __device__ __forceinline__ void roi_align_window(
    const roi_align_axis<C>& a, I p, I extent, int& first, int& last)
{
    const int n = a.grid;
    first = 0;
    last = n;
    if (n == 0 || (roi_align_inside(a, p, 0, extent) && roi_align_inside(a, p, n - 1, extent)))
        return;
    // Binary searches on the two monotone predicates "not yet past the near end" and "already
    // past the far end"; which end is near depends on the sign of the bin size.
    const bool rising = a.bin >= C(0);
    int lo = 0, hi = n;
    while (lo < hi) {  // first sample that is not before the interval
        const int mid = lo + (hi - lo) / 2;
        const C v = roi_align_sample(a, p, mid);
        if (rising ? v >= C(-1) : v <= C(extent)) hi = mid; else lo = mid + 1;
    }
    first = lo;
    hi = n;
    while (lo < hi) {  // first sample that is beyond the interval
        const int mid = lo + (hi - lo) / 2;
        const C v = roi_align_sample(a, p, mid);
        if (rising ? v > C(extent) : v < C(-1)) hi = mid; else lo = mid + 1;
    }
    last = lo;
}

// One RoI Align bin: both axes and the samples of each that can lie inside the map.
template <typename C>
struct roi_align_bin {
    roi_align_axis<C> y, x;
    int y_first, y_last, x_first, x_last;
};

// The bin (ph, pw) of a RoI row (batch_index, x1, y1, x2, y2); sampling_h and sampling_w are the
// samples per bin along y and x (<= 0: adaptive along that axis).
template <typename C, typename I>
__host__ __device__ __forceinline__ roi_align_bin<C> roi_align_locate(
    const C* roi, I ph, I pw, I height, I width, I pooled_h, I pooled_w, C scale, bool aligned,
    int sampling_h, int sampling_w)
{
    roi_align_bin<C> s;
    s.y = roi_align_geometry(roi[2], roi[4], scale, aligned, pooled_h, sampling_h);
    s.x = roi_align_geometry(roi[1], roi[3], scale, aligned, pooled_w, sampling_w);
    roi_align_window(s.y, ph, height, s.y_first, s.y_last);
    roi_align_window(s.x, pw, width, s.x_first, s.x_last);
    return s;
}

// Bilinear weights along one axis: the two neighbouring pixels and their weights.
template <typename C, typename I>
struct roi_lerp {
    I lo, hi;
    C wlo, whi;
};

// False for a sample outside [-1, extent] (NaN included): it contributes nothing (but still
// counts). Inside, a sample in [-1, 0) snaps to pixel 0 and one in (extent - 1, extent] to pixel
// extent - 1. extent >= 1 (roi_batch rejects empty planes), so lo and hi are valid pixels.
template <typename C, typename I>
__host__ __device__ __forceinline__ bool roi_lerp_weights(C v, I extent, roi_lerp<C, I>& w)
{
    if (!(v >= C(-1) && v <= C(extent))) return false;
    v = roi_max(v, C(0));
    w.lo = static_cast<I>(v);
    if (w.lo >= extent - 1) {
        w.lo = w.hi = extent - 1;
        v = C(w.lo);
    } else {
        w.hi = w.lo + 1;
    }
    w.whi = v - C(w.lo);
    w.wlo = C(1) - w.whi;
    return true;
}

// ----------------------------------------------------------------------------- RoI Pool
// Scaled box corners rounded half away from zero; the end pixel is inclusive, a box at least one
// pixel. All of it in floating point: nothing is converted to an integer before roi_pool_window
// has clipped it to the map.
template <typename C>
struct roi_pool_axis {
    C start;
    C bin;
};

template <typename C, typename I>
__host__ __device__ __forceinline__ roi_pool_axis<C> roi_pool_geometry(
    C lo, C hi, C scale, I pooled)
{
    roi_pool_axis<C> a;
    a.start = roi_round(lo * scale);
    const C size = roi_max(roi_round(hi * scale) - a.start + C(1), C(1));
    a.bin = size / C(pooled);
    return a;
}

// Pixels [first, last) of bin p, clipped to [0, extent]; adjacent bins may overlap. The clamp in
// C keeps the casts in range; C(extent) may round up (float32 past 2**24), so the bound is applied
// again in I, exactly.
template <typename C, typename I>
__host__ __device__ __forceinline__ void roi_pool_window(
    const roi_pool_axis<C>& a, I p, I extent, I& first, I& last)
{
    const C hi = C(extent);
    first = static_cast<I>(roi_clamp(roi_floor(C(p) * a.bin) + a.start, C(0), hi));
    last = static_cast<I>(roi_clamp(roi_ceil(C(p + 1) * a.bin) + a.start, C(0), hi));
    first = first < extent ? first : extent;
    last = last < extent ? last : extent;
}
