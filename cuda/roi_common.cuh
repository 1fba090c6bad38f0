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
__host__ __device__ __forceinline__ float roi_sqrt(float v) { return sqrtf(v); }
__host__ __device__ __forceinline__ double roi_sqrt(double v) { return sqrt(v); }
__host__ __device__ __forceinline__ float roi_fmod(float a, float b) { return fmodf(a, b); }
__host__ __device__ __forceinline__ double roi_fmod(double a, double b) { return fmod(a, b); }
// cos(pi v) and sin(pi v): unlike cosf/sinf they need no large-argument reduction (which CUDA
// does in double precision, even for float).
__host__ __device__ __forceinline__ float roi_cospi(float v) { return cospif(v); }
__host__ __device__ __forceinline__ double roi_cospi(double v) { return cospi(v); }
__host__ __device__ __forceinline__ float roi_sinpi(float v) { return sinpif(v); }
__host__ __device__ __forceinline__ double roi_sinpi(double v) { return sinpi(v); }
// The machine epsilon of the compute type (the argument only selects the overload).
__host__ __device__ __forceinline__ float roi_epsilon(float) { return 1.1920929e-7f; }
__host__ __device__ __forceinline__ double roi_epsilon(double) { return 2.220446049250313e-16; }

// A product and a sum rounded on their own: nvcc fuses a multiply and an add where it can (in one
// kernel and not in another), which the CPU backends do not. Where the result decides which
// samples or pixels a computation visits, these keep every backend on the same numbers.
__host__ __device__ __forceinline__ float roi_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__host__ __device__ __forceinline__ double roi_mul_rn(double a, double b) { return __dmul_rn(a, b); }
__host__ __device__ __forceinline__ float roi_add_rn(float a, float b) { return __fadd_rn(a, b); }
__host__ __device__ __forceinline__ double roi_add_rn(double a, double b) { return __dadd_rn(a, b); }

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

// ----------------------------------------------------------------------------- gradient sums
// A backward kernel hands every term of a gradient element to a sink. roi_atomic_sink adds it in
// the compute type with atomicAdd: fast, but float addition is not associative, so the last bits
// of a sum depend on the order in which threads and blocks happen to run. roi_fixed_sink
// (deterministic=True) adds it as a 64-bit fixed-point integer: integer addition is associative,
// so every run and every launch configuration gives the same bits.
//
// The scale: |term| <= max_abs = max |grad_output| (finite values), and no gradient element takes
// terms of more than 2^count_bits grad_output elements, each of total weight <= 1, so with
// exponent = 61 - e(max_abs) - count_bits (max_abs < 2^e(max_abs)) every partial sum of terms *
// 2^exponent stays below 2^61 in magnitude (plus half a unit per term of rounding: int64 holds
// 2^63). A term is rounded to the nearest multiple of 2^-exponent: the same absolute error for
// every element, small against the largest gradient. For float64 a second word keeps the
// rounding residue of each term, scaled by 2^low_bits (the host picks low_bits so that its sum
// cannot overflow either). Non-finite terms set flags instead:
// two bits per element (+inf seen, -inf seen; both for NaN), so the result is the one IEEE
// addition gives: NaN, or an infinity, whatever the finite terms.
template <typename C, typename I>
struct roi_atomic_sink {
    C* grad;

    __device__ __forceinline__ void add(I at, C v) const { atomicAdd(grad + at, v); }
};

__host__ __device__ __forceinline__ long long roi_llrint(float v) { return __float2ll_rn(v); }
__host__ __device__ __forceinline__ long long roi_llrint(double v) { return __double2ll_rn(v); }
__host__ __device__ __forceinline__ float roi_ldexp(float v, int e) { return ldexpf(v, e); }
__host__ __device__ __forceinline__ double roi_ldexp(double v, int e) { return ldexp(v, e); }
__host__ __device__ __forceinline__ float roi_frexp(float v, int* e) { return frexpf(v, e); }
__host__ __device__ __forceinline__ double roi_frexp(double v, int* e) { return frexp(v, e); }

// The exponent of the fixed point: terms are multiplied by 2^roi_fixed_exponent before rounding.
template <typename C>
__host__ __device__ __forceinline__ int roi_fixed_exponent(C max_abs, int count_bits)
{
    int e = 0;
    roi_frexp(max_abs, &e);  // max_abs < 2^e; 0 gives e = 0
    return 61 - e - count_bits;
}

template <typename C, typename I>
struct roi_fixed_sink {
    unsigned long long* hi;  // one word per gradient element
    unsigned long long* lo;  // float64 only (else null): the residues, times 2^low_bits
    unsigned int* flags;     // two bits per gradient element, 16 elements a word
    int exponent;
    int low_bits;

    __device__ __forceinline__ void add(I at, C v) const
    {
        if (!isfinite(v)) {
            const unsigned int bits = v > C(0) ? 1u : (v < C(0) ? 2u : 3u);
            atomicOr(flags + at / 16, bits << (2 * static_cast<int>(at % 16)));
            return;
        }
        const C scaled = roi_ldexp(v, exponent);
        const long long q = roi_llrint(scaled);
        atomicAdd(hi + at, static_cast<unsigned long long>(q));
        if constexpr (sizeof(C) == 8) {
            if (lo != nullptr) {
                const C residue = scaled - C(q);  // exact: |scaled| < 2^61, q its nearest integer
                atomicAdd(lo + at, static_cast<unsigned long long>(
                                       roi_llrint(roi_ldexp(residue, low_bits))));
            }
        }
    }
};

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

// The same coordinates of a flat index into [K, PH, PW, C] (channels fastest: consecutive
// threads take consecutive channels, which channels-last features hold side by side).
template <typename I>
__host__ __device__ __forceinline__ roi_bin<I> roi_split_last(
    I index, I channels, I pooled_h, I pooled_w)
{
    // roi_split of [K, PH, PW, C]: its (c, ph, pw) are this array's (ph, pw, c).
    const roi_bin<I> t = roi_split(index, pooled_h, pooled_w, channels);
    return roi_bin<I>{t.k, t.pw, t.c, t.ph};
}

// The flat index of (k, c, ph, pw) in a [K, C, PH, PW] array.
template <typename I>
__host__ __device__ __forceinline__ I roi_join(
    const roi_bin<I>& o, I channels, I pooled_h, I pooled_w)
{
    return ((o.k * channels + o.c) * pooled_h + o.ph) * pooled_w + o.pw;
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
    a.start = roi_add_rn(roi_mul_rn(lo, scale), -offset);
    C size = roi_add_rn(roi_add_rn(roi_mul_rn(hi, scale), -offset), -a.start);
    if (!aligned) size = roi_max(size, C(1));
    a.bin = size / C(pooled);
    a.grid = roi_align_grid(size, pooled, sampling_ratio);
    return a;
}

// Position of sample i (of a.grid) in bin p, rounded as the CPU backends round it (no fused
// multiply-add): which samples lie inside the map, and where, is the same on every backend.
template <typename C, typename I>
__host__ __device__ __forceinline__ C roi_align_sample(const roi_align_axis<C>& a, I p, int i)
{
    return roi_add_rn(roi_add_rn(a.start, roi_mul_rn(C(p), a.bin)),
                      roi_mul_rn(C(i) + C(0.5), a.bin) / C(a.grid));
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

// The bilinear value of a sample inside the map, from its rows row_lo and row_hi (pointers to
// pixel 0 of each) and its weights along y and x; summed in the order of docs/semantics.md.
template <typename T, typename C, typename I>
__device__ __forceinline__ C roi_bilinear(
    const T* row_lo, const T* row_hi, const roi_lerp<C, I>& wy, const roi_lerp<C, I>& wx)
{
    return wy.wlo * wx.wlo * roi_load(row_lo[wx.lo]) + wy.wlo * wx.whi * roi_load(row_lo[wx.hi]) +
           wy.whi * wx.wlo * roi_load(row_hi[wx.lo]) + wy.whi * wx.whi * roi_load(row_hi[wx.hi]);
}

// roi_bilinear with every product and sum rounded on its own (roi_mul_rn, roi_add_rn): the value
// RoI Align's max mode compares, so that its forward and backward kernels, and the CPU backends,
// pick the same sample of a near tie.
template <typename T, typename C, typename I>
__device__ __forceinline__ C roi_bilinear_rn(
    const T* row_lo, const T* row_hi, const roi_lerp<C, I>& wy, const roi_lerp<C, I>& wx)
{
    const C a = roi_mul_rn(roi_mul_rn(wy.wlo, wx.wlo), roi_load(row_lo[wx.lo]));
    const C b = roi_mul_rn(roi_mul_rn(wy.wlo, wx.whi), roi_load(row_lo[wx.hi]));
    const C c = roi_mul_rn(roi_mul_rn(wy.whi, wx.wlo), roi_load(row_hi[wx.lo]));
    const C d = roi_mul_rn(roi_mul_rn(wy.whi, wx.whi), roi_load(row_hi[wx.hi]));
    return roi_add_rn(roi_add_rn(roi_add_rn(a, b), c), d);
}

// The first sample of bin s in row-major (iy, ix) order that lies outside its window
// [y_first, y_last) x [x_first, x_last), as (iy, ix); false when the window holds every sample.
// The bin must have samples (both grids >= 1). Such samples lie outside the map: RoI Align's max
// mode reads them as 0, and of equal values it keeps the first.
template <typename C>
__host__ __device__ __forceinline__ bool roi_align_first_outside(
    const roi_align_bin<C>& s, int& iy, int& ix)
{
    iy = 0;
    ix = 0;
    if (s.y_first > 0 || s.x_first > 0 || s.y_first >= s.y_last || s.x_first >= s.x_last)
        return true;
    if (s.x_last < s.x.grid) {
        ix = s.x_last;
        return true;
    }
    if (s.y_last < s.y.grid) {
        iy = s.y_last;
        return true;
    }
    return false;
}

// ----------------------------------------------------------------------------- RoI Align tables
// RoI Align's mean is separable (docs/semantics.md): bin (ph, pw) is the sum over pixels (py, px)
// of Ay(py) * Ax(px) * P[py, px], where Ay(py) adds up the y weights of the bin's sample rows
// that read row py, divided by the samples per axis (Ax likewise). The kernels of roi_align.cu
// build, once per RoI and bin row or column, a table of these (pixel, weight) entries per axis,
// and sum each bin as a sum of per-row sums over its entries: the work of a bin follows the
// pixels it covers, whatever its sample count, and no sum runs over its samples.
//
// A bin's entries along one axis come in one of two forms. Dense (samples at most a pixel apart):
// one entry per pixel from the lowest to the highest pixel read, its weight in closed form from
// the samples of the two pixel intervals around it (how many, and how far past the interval's
// start they lie: an arithmetic progression), found by binary searches on the exact sample
// positions, so a sample is inside, outside or snapped to the edge exactly as the per-sample
// formula says. Sparse (samples more than a pixel apart): each inside sample's two corners, as
// roi_lerp_weights gives them, unmerged. Either way a bin has at most about as many entries as it
// covers pixels (plus two), and an entry costs O(log samples).
//
// 0 * inf is NaN: a pixel read at weight exactly 0 (the far corner of a sample on a pixel centre,
// of a sample snapped to the edge) makes a non-finite value there NaN. A dense entry whose pixel
// some sample reads at weight 0 carries its weight negated (-0.0 when it has no other weight);
// the sums use the magnitude, and fall back to roi_align_flagged only where a result is not finite.

// Entries along both axes that one block's tables hold at a time, and the most bins a block
// handles at a time.
#define ROI_ALIGN_TABLE 2048
#define ROI_ALIGN_ROUND 128

// How many samples of bin p lie below t (at or below t when inclusive). Sample positions are
// monotone in the sample index: those below t are a prefix of the indices (a suffix for a
// reversed box), found by one binary search.
template <typename C, typename I>
__host__ __device__ __forceinline__ int roi_align_below(
    const roi_align_axis<C>& a, I p, C t, bool inclusive)
{
    const bool rising = a.bin >= C(0);
    int lo = 0, hi = a.grid;  // first index where "below" differs from the first index's
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        const C v = roi_align_sample(a, p, mid);
        const bool below = inclusive ? v <= t : v < t;
        if (below == rising) lo = mid + 1; else hi = mid;
    }
    return rising ? lo : a.grid - lo;
}

// The position of the sample of bin p of rank r in increasing position.
template <typename C, typename I>
__host__ __device__ __forceinline__ C roi_align_ranked(const roi_align_axis<C>& a, I p, int r)
{
    return roi_align_sample(a, p, a.bin >= C(0) ? r : a.grid - 1 - r);
}

// One bin along one axis, as its table sees it: entries [0, entries); dense: entry e is pixel
// lo + e; sparse: entry e is corner e % 2 of the sample of rank first + e / 2.
template <typename C, typename I>
struct roi_align_run {
    I lo;
    I entries;
    int first, last;  // ranks of the inside samples
    bool dense;
};

template <typename C, typename I>
__host__ __device__ __forceinline__ roi_align_run<C, I> roi_align_run_of(
    const roi_align_axis<C>& a, I p, I extent)
{
    roi_align_run<C, I> r;
    r.lo = 0;
    r.entries = 0;
    r.first = 0;
    r.last = 0;
    r.dense = true;
    // Positions of a box beyond the compute type's range are NaN or infinite: all outside.
    if (a.grid == 0 || !isfinite(a.start) || !isfinite(a.bin)) return r;
    const int first = roi_align_below(a, p, C(-1), false);
    const int last = roi_align_below(a, p, C(extent), true);
    if (first >= last) return r;
    r.first = first;
    r.last = last;
    r.dense = roi_abs(a.bin) <= C(a.grid);  // samples at most one pixel apart
    if (r.dense) {
        roi_lerp<C, I> lo, hi;
        roi_lerp_weights(roi_align_ranked(a, p, first), extent, lo);
        roi_lerp_weights(roi_align_ranked(a, p, last - 1), extent, hi);
        r.lo = lo.lo;
        r.entries = hi.hi - lo.lo + 1;
    } else {
        r.entries = I(2) * I(last - first);
    }
    return r;
}

// The samples of bin p in [t, next), whose ranks are [r0, r1): how many, and how far past t they
// lie in all (from the lowest one's exact position and the sample step), and whether the lowest
// lies on t (a zero weight for the pixel above).
template <typename C>
struct roi_align_part {
    C count;
    C past;
    bool on_start;
};

template <typename C, typename I>
__host__ __device__ __forceinline__ roi_align_part<C> roi_align_part_of(
    const roi_align_axis<C>& a, I p, int r0, int r1, C t, C step)
{
    roi_align_part<C> s;
    s.count = C(r1 - r0);
    s.past = C(0);
    s.on_start = false;
    if (r1 <= r0) return s;
    const C d = roi_align_ranked(a, p, r0) - t;
    s.past = s.count * d + step * (s.count * C(r1 - r0 - 1) * C(0.5));
    s.on_start = d == C(0);
    return s;
}

// The weight of pixel q in a dense run of bin p on an axis of extent pixels (negated when a
// sample reads q at weight 0; see above), as roi_lerp_weights splits each sample: a sample in
// [-1, 0) reads pixel 0 at weight 1 (and pixel 1 at 0), one at or past extent - 1 reads the last
// pixel at weight 1 (and again at 0), one in [r, r + 1) pixel r at 1 - (y - r) and r + 1 at y - r.
template <typename C, typename I>
__host__ __device__ __forceinline__ C roi_align_dense_weight(
    const roi_align_axis<C>& a, I p, I extent, const roi_align_run<C, I>& r, I q)
{
    const C step = roi_abs(a.bin) / C(a.grid);
    const C fq = C(q);
    C w = C(0);
    bool zero = false;
    const int below_first = r.first;  // samples below -1
    const int below_end = r.last;     // samples at or below extent
    if (extent == 1) {
        w = C(below_end - below_first);  // every inside sample snaps to the one pixel
        zero = w > C(0);
    } else {
        const int below_q = roi_align_below(a, p, fq, false);
        if (q <= 1) {  // samples in [-1, 0)
            const int m = roi_align_below(a, p, C(0), false) - below_first;
            if (q == 0) w += C(m); else zero = zero || m > 0;
        }
        if (q <= extent - 2) {  // the low corner of samples in [q, q + 1)
            const roi_align_part<C> s = roi_align_part_of(
                a, p, below_q, roi_align_below(a, p, fq + C(1), false), fq, step);
            w += roi_max(s.count - s.past, C(0));
        }
        if (q >= 1) {  // the high corner of samples in [q - 1, q)
            const roi_align_part<C> s = roi_align_part_of(
                a, p, roi_align_below(a, p, fq - C(1), false), below_q, fq - C(1), step);
            w += roi_max(s.past, C(0));
            zero = zero || s.on_start;
        }
        if (q == extent - 1) {  // samples in [extent - 1, extent] snap to the last pixel
            const int m = below_end - below_q;
            w += C(m);
            zero = zero || m > 0;
        }
    }
    w = w / C(a.grid);
    return zero ? -w : w;
}

// Entry e of run r of bin p: its pixel and weight (sign as above).
template <typename C, typename I>
__host__ __device__ __forceinline__ void roi_align_entry(
    const roi_align_axis<C>& a, I p, I extent, const roi_align_run<C, I>& r, I e, I& pixel,
    C& weight)
{
    if (r.dense) {
        pixel = r.lo + e;
        weight = roi_align_dense_weight(a, p, extent, r, pixel);
        return;
    }
    roi_lerp<C, I> w;
    roi_lerp_weights(roi_align_ranked(a, p, r.first + static_cast<int>(e / 2)), extent, w);
    const bool high = e % 2 != 0;
    pixel = high ? w.hi : w.lo;
    weight = (high ? w.whi : w.wlo) / C(a.grid);
}

// Whether a term of entries wy and wx on a non-finite value is NaN: some sample reads its pixel
// at weight 0 (the sign of a dense weight, or a sparse weight of 0).
template <typename C>
__host__ __device__ __forceinline__ bool roi_align_flagged(C wy, C wx)
{
    return signbit(wy) || signbit(wx) || wy == C(0) || wx == C(0);
}

// |wy| times the sum of |wx| * P[py, px] over a row's n x entries, entry(e, px, wx) giving
// entry e and load(px) reading P[py, px]; a row that is not finite is summed again with NaN for
// the terms that read a non-finite value at weight 0 (roi_align_flagged).
template <typename C, typename I, typename Entry, typename Load>
__device__ __forceinline__ C roi_align_row(C wy, int n, const Entry& entry, const Load& load)
{
    C r = C(0);
    for (int e = 0; e < n; ++e) {
        I px;
        C wx;
        entry(e, px, wx);
        r += roi_abs(wx) * load(px);
    }
    if (!isfinite(r)) {
        r = C(0);
        for (int e = 0; e < n; ++e) {
            I px;
            C wx;
            entry(e, px, wx);
            const C v = load(px);
            r += roi_abs(wx) * v + (roi_align_flagged(wy, wx) ? C(0) * v : C(0));
        }
    }
    return roi_abs(wy) * r;
}

// The adjoint of roi_align_row: g * |wy| * |wx| to each pixel line + px of the row's entries
// (NaN where a non-finite g meets a pixel read at weight 0), handed to the sink.
template <typename C, typename I, typename Entry, typename Sink>
__device__ __forceinline__ void roi_align_row_spread(
    const Sink& sink, I line, C g, C wy, int n, const Entry& entry)
{
    const C gy = g * roi_abs(wy);
    const bool finite = isfinite(g);
    for (int e = 0; e < n; ++e) {
        I px;
        C wx;
        entry(e, px, wx);
        const C v = gy * roi_abs(wx);
        sink.add(line + px, !finite && roi_align_flagged(wy, wx) ? v + g * C(0) : v);
    }
}

// ----------------------------------------------------------------------------- RoI Align, one bin
// The kernels that give a thread one whole bin (PS RoI Align, multi-scale RoI Align) visit its
// samples one by one while they are few, and otherwise the (pixel, weight) entries of the tables
// above, formed by the thread itself: the work of a bin then follows the pixels it covers,
// whatever its sample count (sampling_ratio=10**9 takes 2**40 samples a bin).

// The samples per entry pair above which a bin is summed by its entries (an entry costs a few
// binary searches), and the fewest samples for which that is considered.
#define ROI_ALIGN_BY_ENTRIES 8
#define ROI_ALIGN_FEW_SAMPLES 128

// Whether bin (ph, pw) of s is summed by its entries (runs ry, rx) rather than sample by sample.
template <typename C, typename I>
__device__ __forceinline__ bool roi_align_by_entries(
    const roi_align_bin<C>& s, I ph, I pw, I height, I width, roi_align_run<C, I>& ry,
    roi_align_run<C, I>& rx)
{
    const C samples = C(s.y_last - s.y_first) * C(s.x_last - s.x_first);
    if (samples <= C(ROI_ALIGN_FEW_SAMPLES)) return false;
    ry = roi_align_run_of(s.y, ph, height);
    rx = roi_align_run_of(s.x, pw, width);
    return samples > C(ROI_ALIGN_BY_ENTRIES) * C(ry.entries) * C(rx.entries);
}

// row(py, wy, n, entry) for every y entry of runs ry, rx of bin (ph, pw), entry(e, px, wx)
// forming its x entry e of n: nothing is stored, each entry is formed where it is used.
template <typename C, typename I, typename Row>
__device__ __forceinline__ void roi_align_rows(
    const roi_align_bin<C>& s, I ph, I pw, I height, I width, const roi_align_run<C, I>& ry,
    const roi_align_run<C, I>& rx, const Row& row)
{
    const auto entry = [&](int e, I& px, C& wx) {
        roi_align_entry(s.x, pw, width, rx, I(e), px, wx);
    };
    for (I ey = 0; ey < ry.entries; ++ey) {
        I py;
        C wy;
        roi_align_entry(s.y, ph, height, ry, ey, py, wy);
        row(py, wy, static_cast<int>(rx.entries), entry);
    }
}

// The value of RoI Align bin (ph, pw) of a valid RoI on one feature plane [height, width]: the
// compensated sum of its inside samples divided by the count of all its samples (at least 1),
// or the same mean as a sum of per-row sums over its entries (roi_align_row).
template <typename T, typename C, typename I>
__device__ __forceinline__ C roi_align_mean(
    const T* plane, const C* roi, I ph, I pw, I height, I width, I pooled_h, I pooled_w, C scale,
    bool aligned, int sampling_h, int sampling_w)
{
    const roi_align_bin<C> s = roi_align_locate(
        roi, ph, pw, height, width, pooled_h, pooled_w, scale, aligned, sampling_h, sampling_w);
    roi_sum<C> sum;
    roi_align_run<C, I> ry, rx;
    if (roi_align_by_entries(s, ph, pw, height, width, ry, rx)) {
        roi_align_rows(s, ph, pw, height, width, ry, rx, [&](I py, C wy, int n, const auto& x) {
            const T* line = plane + py * width;
            sum.add(roi_align_row<C, I>(wy, n, x, [&](I px) { return roi_load(line[px]); }));
        });
        return sum.total;  // the entries' weights are divided by the samples per axis
    }
    for (int iy = s.y_first; iy < s.y_last; ++iy) {
        roi_lerp<C, I> wy;
        if (!roi_lerp_weights(roi_align_sample(s.y, ph, iy), height, wy)) continue;
        const T* row_lo = plane + wy.lo * width;
        const T* row_hi = plane + wy.hi * width;
        for (int ix = s.x_first; ix < s.x_last; ++ix) {
            roi_lerp<C, I> wx;
            if (!roi_lerp_weights(roi_align_sample(s.x, pw, ix), width, wx)) continue;
            sum.add(roi_bilinear(row_lo, row_hi, wy, wx));
        }
    }
    // Samples outside the map count too: they dilute the mean.
    const C count = roi_max(C(s.y.grid) * C(s.x.grid), C(1));
    return sum.total / count;
}

// The adjoint of roi_align_mean: *grad / (gh * gw) spread over the four bilinear corners of every
// inside sample of bin (ph, pw), or over its entry pairs (roi_align_row_spread), each term handed
// to the sink (see "gradient sums" above) at plane + its flat index in the plane [height, width].
template <typename T, typename C, typename I, typename Sink>
__device__ __forceinline__ void roi_align_spread(
    const Sink& sink, I plane, const T* grad, const C* roi, I ph, I pw, I height, I width,
    I pooled_h, I pooled_w, C scale, bool aligned, int sampling_h, int sampling_w)
{
    const roi_align_bin<C> s = roi_align_locate(
        roi, ph, pw, height, width, pooled_h, pooled_w, scale, aligned, sampling_h, sampling_w);
    if (s.y_first >= s.y_last || s.x_first >= s.x_last) return;

    const C g = roi_load(*grad);
    roi_align_run<C, I> ry, rx;
    if (roi_align_by_entries(s, ph, pw, height, width, ry, rx)) {
        roi_align_rows(s, ph, pw, height, width, ry, rx, [&](I py, C wy, int n, const auto& x) {
            roi_align_row_spread<C, I>(sink, plane + py * width, g, wy, n, x);
        });
        return;
    }
    // No max(., 1) here: a bin without samples has no sample to pass gradient to.
    const C count = C(s.y.grid) * C(s.x.grid);
    for (int iy = s.y_first; iy < s.y_last; ++iy) {
        roi_lerp<C, I> wy;
        if (!roi_lerp_weights(roi_align_sample(s.y, ph, iy), height, wy)) continue;
        const I row_lo = plane + wy.lo * width;
        const I row_hi = plane + wy.hi * width;
        for (int ix = s.x_first; ix < s.x_last; ++ix) {
            roi_lerp<C, I> wx;
            if (!roi_lerp_weights(roi_align_sample(s.x, pw, ix), width, wx)) continue;
            sink.add(row_lo + wx.lo, g * (wy.wlo * wx.wlo) / count);
            sink.add(row_lo + wx.hi, g * (wy.wlo * wx.whi) / count);
            sink.add(row_hi + wx.lo, g * (wy.whi * wx.wlo) / count);
            sink.add(row_hi + wx.hi, g * (wy.whi * wx.whi) / count);
        }
    }
}

// The tables of one block: the RoI's geometry, a run per bin row and column of the bins in hand,
// and one chunk of entries of each run.
template <typename C, typename I>
struct roi_align_tables {
    roi_align_axis<C> y, x;
    I batch_index;
    I y_entries, x_entries;  // the most entries of a run in hand, per axis
    roi_align_run<C, I> y_run[ROI_ALIGN_ROUND], x_run[ROI_ALIGN_ROUND];
    I pixel[ROI_ALIGN_TABLE];
    C weight[ROI_ALIGN_TABLE];
};

// Which bins and channels a block handles at a time: rows x columns bins (a rectangle of the
// PH x PW bins: whole bin rows when they fit) times tile channels, so that every thread has one
// (channel, bin) pair. With channels_fastest consecutive threads take consecutive channels
// (coalesced loads from channels-last features), else consecutive bins (coalesced stores to
// [K, C, PH, PW]).
template <typename I>
struct roi_align_shape {
    I rows, cols, tile;
    I channel, row, col;  // this thread's place in the tile
};

template <typename I>
__device__ __forceinline__ roi_align_shape<I> roi_align_shape_of(
    I pooled_h, I pooled_w, bool channels_fastest)
{
    roi_align_shape<I> s;
    const I most = blockDim.x < ROI_ALIGN_ROUND ? I(blockDim.x) : I(ROI_ALIGN_ROUND);
    s.cols = pooled_w < most ? pooled_w : most;
    s.rows = most / s.cols < pooled_h ? most / s.cols : pooled_h;
    if (channels_fastest && s.rows * s.cols * 32 > I(blockDim.x)) {
        // A warp's worth of channels where the block allows it: fewer bins at a time.
        const I bins = I(blockDim.x) / 32 > 0 ? I(blockDim.x) / 32 : I(1);
        s.cols = pooled_w < bins ? pooled_w : bins;
        s.rows = bins / s.cols < pooled_h ? bins / s.cols : pooled_h;
    }
    const I bins = s.rows * s.cols;
    s.tile = I(blockDim.x) / bins;
    const I t = threadIdx.x;
    const I bin = channels_fastest ? t / s.tile : t % bins;
    s.channel = channels_fastest ? t % s.tile : t / bins;
    s.row = bin / s.cols;
    s.col = bin % s.cols;
    return s;
}

// Fills the tables with the chunk of entries from ey0 (y runs; only when ex0 == 0, the y entries
// staying while x moves on) and from ex0 (x runs; only once when they all fit a chunk), between
// two barriers. Consecutive threads take consecutive runs, entry after entry: the entries in use
// (few, for small bins) take the first threads.
template <typename C, typename I>
__device__ __forceinline__ void roi_align_fill(
    roi_align_tables<C, I>& t, I* y_pixel, C* y_weight, I* x_pixel, C* x_weight, I rows,
    I cols, I chunk, I ph0, I pw0, I ey0, I ex0, I ny, I nx, I height, I width)
{
    const bool fill_y = ex0 == 0;
    const bool fill_x = nx > chunk || ey0 == 0;
    const I runs = rows + cols;
    const I ey = ny - ey0 < chunk ? ny - ey0 : chunk;
    const I ex = nx - ex0 < chunk ? nx - ex0 : chunk;
    const I slots = runs * (ey > ex ? ey : ex);
    __syncthreads();
    for (I i = threadIdx.x; i < slots; i += I(blockDim.x)) {
        const I run = i % runs, e = i / runs;
        if (run < rows) {
            if (fill_y && ey0 + e < t.y_run[run].entries) {
                const I at = run * chunk + e;
                roi_align_entry(t.y, ph0 + run, height, t.y_run[run], ey0 + e, y_pixel[at],
                                y_weight[at]);
            }
        } else {
            const I q = run - rows, at = q * chunk + e;
            if (fill_x && ex0 + e < t.x_run[q].entries) {
                roi_align_entry(t.x, pw0 + q, width, t.x_run[q], ex0 + e, x_pixel[at],
                                x_weight[at]);
            }
        }
    }
    __syncthreads();
}

// Every RoI of the launch, a block at a time with a group of its channel tiles, its bins a
// rectangle at a time; for each (channel, bin) pair in hand, op is called (all threads of the
// block call this):
//     op.invalid(k, c, ph, pw)       the RoI is invalid or the plane empty;
//     op.begin(k, b, c, ph, pw)      before the entries of a valid RoI's bin;
//     op.row(py, wy, pixels, weights, count)   one y entry with count x entries;
//     op.end()                       after them.
// The entries come in chunks: a bin's y entries in order, and for each the x entries in order,
// a row split where a bin's x entries exceed a chunk. A group has as many channel tiles as
// leave every block of the grid two items; its tiles share the tables when they fit one chunk.
// Neither the grouping nor the chunks change what op sees for one (channel, bin) but where rows
// split, so results do not depend on the grid.
template <typename C, typename I, typename Op>
__device__ __forceinline__ void roi_align_blocks(
    roi_align_tables<C, I>& t, Op& op, const C* rois, I rois_count, I channels, I height,
    I width, I batch, I pooled_h, I pooled_w, C scale, int sampling_h, int sampling_w,
    bool aligned, bool channels_fastest)
{
    const roi_align_shape<I> s = roi_align_shape_of(pooled_h, pooled_w, channels_fastest);
    const I tiles = (channels + s.tile - 1) / s.tile;
    I per = tiles * rois_count / (I(2) * I(gridDim.x));
    per = per < 1 ? I(1) : (per > tiles ? tiles : per);
    const I groups = (tiles + per - 1) / per;
    const I items = rois_count * groups;
    const I thread = threadIdx.x;
    for (I item = blockIdx.x; item < items; item += gridDim.x) {
        const I k = item / groups;
        const I tile_first = (item % groups) * per;
        const I tile_last = tile_first + per < tiles ? tile_first + per : tiles;
        __syncthreads();  // the previous item's readers are done
        if (thread == 0) {
            const C* roi = rois + k * 5;
            t.batch_index = roi_batch(roi, batch, height, width);
            t.y = roi_align_geometry(roi[2], roi[4], scale, aligned, pooled_h, sampling_h);
            t.x = roi_align_geometry(roi[1], roi[3], scale, aligned, pooled_w, sampling_w);
        }
        __syncthreads();
        const I b = t.batch_index;
        for (I ph0 = 0; ph0 < pooled_h; ph0 += s.rows) {
            for (I pw0 = 0; pw0 < pooled_w; pw0 += s.cols) {
                const I rows = pooled_h - ph0 < s.rows ? pooled_h - ph0 : s.rows;
                const I cols = pooled_w - pw0 < s.cols ? pooled_w - pw0 : s.cols;
                const I ph = ph0 + s.row, pw = pw0 + s.col;
                const bool here = s.channel < s.tile && s.row < rows && s.col < cols;
                if (b < 0) {
                    for (I tile = tile_first; tile < tile_last; ++tile) {
                        const I c = tile * s.tile + s.channel;
                        if (here && c < channels) op.invalid(k, c, ph, pw);
                    }
                    continue;
                }
                __syncthreads();
                for (I i = thread; i < rows + cols; i += I(blockDim.x)) {
                    if (i < rows) {
                        t.y_run[i] = roi_align_run_of(t.y, ph0 + i, height);
                    } else {
                        t.x_run[i - rows] = roi_align_run_of(t.x, pw0 + i - rows, width);
                    }
                }
                __syncthreads();
                if (thread == 0) {
                    I ny = 0, nx = 0;
                    for (I i = 0; i < rows; ++i) {
                        ny = t.y_run[i].entries > ny ? t.y_run[i].entries : ny;
                    }
                    for (I i = 0; i < cols; ++i) {
                        nx = t.x_run[i].entries > nx ? t.x_run[i].entries : nx;
                    }
                    t.y_entries = ny;
                    t.x_entries = nx;
                }
                __syncthreads();
                const I ny = t.y_entries, nx = t.x_entries;
                // Entries per run in a chunk: the table split between the rows and the columns.
                const I chunk = I(ROI_ALIGN_TABLE) / (rows + cols);
                const bool once = ny <= chunk && nx <= chunk;  // one chunk serves every tile
                C* const y_weight = t.weight;
                C* const x_weight = t.weight + rows * chunk;
                I* const y_pixel = t.pixel;
                I* const x_pixel = t.pixel + rows * chunk;
                for (I tile = tile_first; tile < tile_last; ++tile) {
                    const I c = tile * s.tile + s.channel;
                    const bool active = here && c < channels;
                    if (active) op.begin(k, b, c, ph, pw);
                    for (I ey0 = 0; ey0 < ny; ey0 += chunk) {
                        for (I ex0 = 0; ex0 < nx; ex0 += chunk) {
                            if (!once || tile == tile_first) {
                                roi_align_fill(t, y_pixel, y_weight, x_pixel, x_weight, rows,
                                               cols, chunk, ph0, pw0, ey0, ex0, ny, nx, height,
                                               width);
                            }
                            if (!active) continue;
                            const I y_end = t.y_run[s.row].entries - ey0;
                            const I x_end = t.x_run[s.col].entries - ex0;
                            const int ye = static_cast<int>(y_end < chunk ? y_end : chunk);
                            const int xe = static_cast<int>(x_end < chunk ? x_end : chunk);
                            if (ye <= 0 || xe <= 0) continue;
                            const I* xp = x_pixel + s.col * chunk;
                            const C* xw = x_weight + s.col * chunk;
                            for (int e = 0; e < ye; ++e) {
                                op.row(y_pixel[s.row * chunk + e], y_weight[s.row * chunk + e],
                                       xp, xw, xe);
                            }
                        }
                    }
                    if (active) op.end();
                }
            }
        }
    }
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

// ----------------------------------------------------------------------------- position-sensitive
// PS RoI Align and PS RoI Pool (ps_roi_align.cu, ps_roi_pool.cu): output channel c of bin
// (ph, pw) reads input channel (c * PH + ph) * PW + pw, so C = channels_out * PH * PW.

// The input plane that bin (o.ph, o.pw) of output channel o.c reads in image b, as an index into
// the N x C planes of the input.
template <typename I>
__host__ __device__ __forceinline__ I roi_ps_plane(
    const roi_bin<I>& o, I b, I channels_out, I pooled_h, I pooled_w)
{
    return ((b * channels_out + o.c) * pooled_h + o.ph) * pooled_w + o.pw;
}

// PS RoI Pool's box along one axis: corners rounded as for RoI Pool, but the end pixel is not part
// of the box (torchvision's ps_roi_pool): a size of max(round(hi * scale) - round(lo * scale), 1).
template <typename C, typename I>
__host__ __device__ __forceinline__ roi_pool_axis<C> roi_ps_pool_geometry(
    C lo, C hi, C scale, I pooled)
{
    roi_pool_axis<C> a;
    a.start = roi_round(lo * scale);
    const C size = roi_max(roi_round(hi * scale) - a.start, C(1));
    a.bin = size / C(pooled);
    return a;
}

// The pixels [h_first, h_last) x [w_first, w_last) that PS RoI Pool's bin (ph, pw) of a RoI row
// (batch_index, x1, y1, x2, y2) averages, clipped to [0, H - 1] x [0, W - 1]: like torchvision's
// ps_roi_pool, no window reaches the last row or column of the map. height, width >= 1.
template <typename C, typename I>
__host__ __device__ __forceinline__ void roi_ps_pool_window(
    const C* roi, I ph, I pw, I height, I width, I pooled_h, I pooled_w, C scale, I& h_first,
    I& h_last, I& w_first, I& w_last)
{
    roi_pool_window(roi_ps_pool_geometry(roi[2], roi[4], scale, pooled_h), ph, height - 1,
                    h_first, h_last);
    roi_pool_window(roi_ps_pool_geometry(roi[1], roi[3], scale, pooled_w), pw, width - 1,
                    w_first, w_last);
}

// ----------------------------------------------------------------------------- RoI Align Rotated
// A rotated RoI row (batch_index, cx, cy, w, h, angle) is a w x h box centred on (cx, cy) and
// turned by angle degrees, counter-clockwise as an image is shown (x right, y down); clockwise
// with the flag. A bin's samples are placed as RoI Align places them in the box's own frame,
// (yy, xx) measured from the centre, then turned onto the map:
//     y = yy * cos - xx * sin + cy,    x = yy * sin + xx * cos + cx.

// cos and sin of a turn given in degrees. The angle is first reduced exactly, in degrees: to
// a = fmod(angle, 360) moved into [-180, 180] by one more turn where it lies beyond, then to
// r = a - 90 q with q = trunc(a / 90) quarter turns (every step is exact in floating point), so
// |r| < 90, and only r is converted, to half turns r / 180 (rounded once), whose cos and sin are
// cospi and sinpi. The quarter turns are applied by swapping and negating, exactly: multiples of
// 90 degrees give cos and sin of exactly 0 and +-1, and angles equal modulo 360 (370, 10, -350)
// give the same numbers, bit for bit.
template <typename C>
struct roi_turn {
    C cos_a, sin_a;
};

template <typename C>
__host__ __device__ __forceinline__ roi_turn<C> roi_rotation(C degrees)
{
    C a = roi_fmod(degrees, C(360));
    if (a > C(180)) {
        a -= C(360);  // exact: a and 360 are within a factor of two (Sterbenz)
    } else if (a < C(-180)) {
        a += C(360);
    }
    const C q = roi_trunc(a / C(90));  // -2 .. 2
    const C t = (a - q * C(90)) / C(180);
    const C c = roi_cospi(t), s = roi_sinpi(t);
    roi_turn<C> o;
    switch (static_cast<int>(q) & 3) {  // q mod 4, also for negative q
    case 0: o.cos_a = c; o.sin_a = s; break;
    case 1: o.cos_a = -s; o.sin_a = c; break;
    case 2: o.cos_a = -c; o.sin_a = -s; break;
    default: o.cos_a = s; o.sin_a = -c; break;
    }
    return o;
}

// One rotated RoI: its centre and turn on the feature map, and its two axes in its own frame
// (start -h / 2 or -w / 2 from the centre, bin size, samples per bin).
template <typename C>
struct roi_rotated {
    C cy, cx;
    C cos_a, sin_a;
    roi_align_axis<C> y, x;
    // How far beyond the map the sample windows reach (see roi_rotated_rows).
    C margin;
};

// The geometry of a rotated RoI row: as RoI Align, offset = 0.5 with aligned (subtracted from
// the centre only) and sizes of at least 1 without it; clockwise negates the angle.
template <typename C, typename I>
__host__ __device__ __forceinline__ roi_rotated<C> roi_rotated_geometry(
    const C* roi, C scale, bool aligned, bool clockwise, I pooled_h, I pooled_w, int sampling_h,
    int sampling_w)
{
    const C offset = aligned ? C(0.5) : C(0);
    roi_rotated<C> r;
    r.cx = roi[1] * scale - offset;
    r.cy = roi[2] * scale - offset;
    C w = roi[3] * scale;
    C h = roi[4] * scale;
    if (!aligned) {
        w = roi_max(w, C(1));
        h = roi_max(h, C(1));
    }
    const roi_turn<C> t = roi_rotation(clockwise ? -roi[5] : roi[5]);
    r.cos_a = t.cos_a;
    r.sin_a = t.sin_a;
    r.y.start = h * C(-0.5);
    r.y.bin = h / C(pooled_h);
    r.y.grid = roi_align_grid(h, pooled_h, sampling_h);
    r.x.start = w * C(-0.5);
    r.x.bin = w / C(pooled_w);
    r.x.grid = roi_align_grid(w, pooled_w, sampling_w);
    // Some units in the last place of the magnitudes in play (each capped so that the sum stays
    // finite): more than two evaluations of one position can differ by where a compiler fuses a
    // product and a sum (fused multiply-add) in one place and not in another.
    const C big = C(1e30);
    const C size = roi_min(roi_abs(r.cx), big) + roi_min(roi_abs(r.cy), big) +
                   roi_min(roi_abs(w), big) + roi_min(roi_abs(h), big);
    r.margin = C(16) * roi_epsilon(C(0)) * (size + C(1));
    return r;
}

// The map position of the sample at (yy, xx) in the box's frame.
template <typename C>
__host__ __device__ __forceinline__ void roi_rotated_point(
    const roi_rotated<C>& r, C yy, C xx, C& y, C& x)
{
    y = yy * r.cos_a - xx * r.sin_a + r.cy;
    x = yy * r.sin_a + xx * r.cos_a + r.cx;
}

// The first index in [lo, hi) where holds is true, or hi, for a predicate that is false on a
// prefix of [lo, hi) and true on the rest: one binary search.
template <typename F>
__host__ __device__ __forceinline__ int roi_first_where(int lo, int hi, const F& holds)
{
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (holds(mid)) hi = mid; else lo = mid + 1;
    }
    return lo;
}

// Narrows [first, last) to the indices i in [0, n) where holds(i) is true, for a predicate that
// is monotone in i (true on a prefix, on a suffix, everywhere or nowhere): its values at both
// ends tell which, and one binary search finds where it changes.
template <typename F>
__host__ __device__ __forceinline__ void roi_run(int n, const F& holds, int& first, int& last)
{
    if (n <= 0 || first >= last) return;
    const bool head = holds(0);
    const bool tail = holds(n - 1);
    if (head == tail) {
        if (!head) last = first;
        return;
    }
    int lo = 0, hi = n - 1;  // holds(lo) == head, holds(hi) != head
    while (hi - lo > 1) {
        const int mid = lo + (hi - lo) / 2;
        if (holds(mid) == head) lo = mid; else hi = mid;
    }
    if (head) {
        last = last < hi ? last : hi;
    } else {
        first = first > hi ? first : hi;
    }
}

// The samples of one bin of a rotated RoI worth visiting: rows [y_first, y_last), and in each row
// the columns roi_rotated_columns gives; whole when every sample of the bin is inside the map.
struct roi_rotated_bin {
    int y_first, y_last;
    bool whole;
};

// Positions are monotone in each sample index (every rounding step is), so along a row the
// samples inside [-1, height] x [-1, width] are a run, and a row's samples lie between its two
// end samples. Skipping only rows and columns that are certainly outside (the bounds widened by
// r.margin) never changes a result: every visited sample is still tested.
template <typename C, typename I>
__host__ __device__ __forceinline__ roi_rotated_bin roi_rotated_rows(
    const roi_rotated<C>& r, I ph, I pw, I height, I width)
{
    roi_rotated_bin o;
    o.y_first = 0;
    o.y_last = r.x.grid > 0 ? r.y.grid : 0;
    o.whole = false;
    if (o.y_last == 0) return o;
    const C xx0 = roi_align_sample(r.x, pw, 0);
    const C xx1 = roi_align_sample(r.x, pw, r.x.grid - 1);
    const C yy0 = roi_align_sample(r.y, ph, 0);
    const C yy1 = roi_align_sample(r.y, ph, r.y.grid - 1);
    // The four corner samples bound every sample of the bin.
    C y[4], x[4];
    roi_rotated_point(r, yy0, xx0, y[0], x[0]);
    roi_rotated_point(r, yy0, xx1, y[1], x[1]);
    roi_rotated_point(r, yy1, xx0, y[2], x[2]);
    roi_rotated_point(r, yy1, xx1, y[3], x[3]);
    o.whole = true;
    for (int i = 0; i < 4; ++i) {
        o.whole = o.whole && y[i] >= C(-1) && y[i] <= C(height) && x[i] >= C(-1) &&
                  x[i] <= C(width);
    }
    if (o.whole) return o;
    const C y_lo = C(-1) - r.margin, y_hi = C(height) + r.margin;
    const C x_lo = C(-1) - r.margin, x_hi = C(width) + r.margin;
    // Row iy's samples span [min, max] of its two end samples in y and in x; each bound is
    // monotone in iy, so each test below holds on a run of rows.
    const auto ends = [&](int iy, C* ey, C* ex) {
        const C yy = roi_align_sample(r.y, ph, iy);
        roi_rotated_point(r, yy, xx0, ey[0], ex[0]);
        roi_rotated_point(r, yy, xx1, ey[1], ex[1]);
    };
    const int n = r.y.grid;
    // Written as "either end" rather than with min and max, so that NaN passes no test.
    const auto y_after_lo = [&](int iy) {
        C ey[2], ex[2];
        ends(iy, ey, ex);
        return ey[0] >= y_lo || ey[1] >= y_lo;
    };
    const auto y_before_hi = [&](int iy) {
        C ey[2], ex[2];
        ends(iy, ey, ex);
        return ey[0] <= y_hi || ey[1] <= y_hi;
    };
    const auto x_after_lo = [&](int iy) {
        C ey[2], ex[2];
        ends(iy, ey, ex);
        return ex[0] >= x_lo || ex[1] >= x_lo;
    };
    const auto x_before_hi = [&](int iy) {
        C ey[2], ex[2];
        ends(iy, ey, ex);
        return ex[0] <= x_hi || ex[1] <= x_hi;
    };
    roi_run(n, y_after_lo, o.y_first, o.y_last);
    roi_run(n, y_before_hi, o.y_first, o.y_last);
    roi_run(n, x_after_lo, o.y_first, o.y_last);
    roi_run(n, x_before_hi, o.y_first, o.y_last);
    return o;
}

// The columns [first, last) of the row at yy (in the box's frame) of bin column pw worth visiting.
template <typename C, typename I>
__host__ __device__ __forceinline__ void roi_rotated_columns(
    const roi_rotated<C>& r, const roi_rotated_bin& bin, C yy, I pw, I height, I width,
    int& first, int& last)
{
    first = 0;
    last = r.x.grid;
    if (bin.whole) return;
    const C y_lo = C(-1) - r.margin, y_hi = C(height) + r.margin;
    const C x_lo = C(-1) - r.margin, x_hi = C(width) + r.margin;
    const auto at = [&](int ix, C& y, C& x) {
        roi_rotated_point(r, yy, roi_align_sample(r.x, pw, ix), y, x);
    };
    const int n = r.x.grid;
    roi_run(n, [&](int ix) { C y, x; at(ix, y, x); return y >= y_lo; }, first, last);
    roi_run(n, [&](int ix) { C y, x; at(ix, y, x); return y <= y_hi; }, first, last);
    roi_run(n, [&](int ix) { C y, x; at(ix, y, x); return x >= x_lo; }, first, last);
    roi_run(n, [&](int ix) { C y, x; at(ix, y, x); return x <= x_hi; }, first, last);
}
