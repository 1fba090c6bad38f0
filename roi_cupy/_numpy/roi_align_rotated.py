"""RoI Align Rotated on NumPy arrays: the kernels' samples, vectorised over chunks of bins.

A turned bin's samples form no Cartesian product on the map, so the separable products of
``roi_align.py`` do not apply: the samples themselves are listed. For a chunk of bins (flat
``(k, ph, pw)`` indices), the samples worth visiting are found as the kernels find them (a bin
whose four corner samples lie inside the map is visited whole; otherwise binary searches on
predicates that are monotone in the sample indices bound the rows, and in each row the columns,
that can lie inside), then expanded a bounded number at a time. Their bilinear corners are folded
into one weight per (bin, pixel) (summed in float64, divided by the bin's sample count), and the
features are gathered once per such pair from a channels-first copy ``[C, N * H * W]``, in slices
of bounded size: every gather, product and segment sum then runs along contiguous rows, one per
channel (three times faster than along the rows of a channels-last copy, measured on
[2, 256, 64, 64]). The forward pass multiplies in the compute dtype and sums each bin in float64,
so a bin's mean keeps its precision however many pixels it reads; the backward pass sums into an
accumulator of the compute dtype, as the kernels do. The memory is bounded by the chunk sizes,
not by the number of samples; the sums run in a fixed order, so results are deterministic.

Positions, bilinear weights and the sample count are computed in the compute dtype in the
kernels' order of operations (cuda/roi_common.cuh), so the samples and their inside test are the
kernels'; only the summation differs (per-pixel weights here, a compensated sum there).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy

from roi_cupy._numpy import _common

# Most bins worked out together (their windows' binary searches run vectorised over them).
_BINS = 1 << 14
# Most sample rows, and most samples, expanded at once (each holds some 100 bytes of temporaries).
_ROWS = 1 << 16
_SAMPLES = 1 << 16
# Bytes of gathered features (in float64) per product.
_GATHER = 8 << 20
# Most samples per bin and axis, as in the kernels (ROI_MAX_GRID).
_MAX_GRID = 1 << 20


def _rotation(degrees: numpy.ndarray, ct: numpy.dtype) -> tuple[numpy.ndarray, numpy.ndarray]:
    """``(cos, sin)`` of turns in degrees, as ``roi_rotation`` computes them: reduced exactly to
    ``a = fmod(angle, 360)`` in ``[-180, 180]``, then to ``r = a - 90 q`` with
    ``q = trunc(a / 90)`` quarter turns, ``r`` converted to half turns ``r / 180`` in ``ct``, the
    quarter turns applied by swapping and negating.

    cos and sin of ``pi t`` are evaluated in float64 and rounded once to ``ct``: for float32 the
    nearest value, as the emulator's cospif and sinpif give it (NumPy's own float32 cos and sin
    vary with the CPU's instruction set); for float64 within a unit or two of the last place.
    """
    a = numpy.fmod(degrees, ct.type(360))
    a = numpy.where(a > 180, a - ct.type(360), numpy.where(a < -180, a + ct.type(360), a))
    q = numpy.trunc(a / ct.type(90))
    t = ((a - q * ct.type(90)) / ct.type(180)).astype(numpy.float64) * numpy.pi
    c = numpy.cos(t).astype(ct)
    s = numpy.sin(t).astype(ct)
    turn = q.astype(numpy.int64) & 3
    quarter = [turn == 0, turn == 1, turn == 2, turn == 3]
    return numpy.select(quarter, [c, -s, -c, s]), numpy.select(quarter, [s, c, -s, -c])


def _grid(size: numpy.ndarray, pooled: int, sampling: int) -> numpy.ndarray:
    """Samples per bin along an axis (``roi_align_grid``): int64, 0 for none."""
    if sampling > 0:
        return numpy.full(size.shape, min(sampling, _MAX_GRID), dtype=numpy.int64)
    with numpy.errstate(invalid="ignore"):
        grid = numpy.ceil(size / size.dtype.type(pooled))
    # NaN and non-positive sizes sample nothing.
    return numpy.where(grid >= 1, numpy.minimum(grid, _MAX_GRID), 0).astype(numpy.int64)


class _Geometry(NamedTuple):
    """Each RoI's (or, indexed by bins, each bin's RoI's) geometry, in the compute dtype.

    Attributes:
        b (ndarray int64): batch index (0 for an invalid RoI, whose grids are then 0).
        cy, cx: the centre on the map; cos, sin: the turn.
        start_y, bin_y, start_x, bin_x: the box's axes from its centre (``-h / 2``, ``h / PH``).
        grid_y, grid_x (ndarray int64): samples per bin along each axis.
        count: a bin's sample count ``grid_y * grid_x``, as the compute dtype forms it.
    """

    b: numpy.ndarray
    cy: numpy.ndarray
    cx: numpy.ndarray
    cos: numpy.ndarray
    sin: numpy.ndarray
    start_y: numpy.ndarray
    bin_y: numpy.ndarray
    grid_y: numpy.ndarray
    start_x: numpy.ndarray
    bin_x: numpy.ndarray
    grid_x: numpy.ndarray
    count: numpy.ndarray

    def take(self, index: numpy.ndarray) -> _Geometry:
        return _Geometry(*(field[index] for field in self))


def _geometry(rois, n, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, clockwise, ct):
    """The :class:`_Geometry` of every RoI (``roi_rotated_geometry``)."""
    b, valid = _common.batch_index(rois, n)
    safe = numpy.where(valid[:, None], rois, 0).astype(ct)
    scale = ct.type(spatial_scale)
    offset = ct.type(0.5 if aligned else 0.0)
    with numpy.errstate(all="ignore"):
        cx = safe[:, 1] * scale - offset
        cy = safe[:, 2] * scale - offset
        w = safe[:, 3] * scale
        h = safe[:, 4] * scale
        if not aligned:
            w = numpy.fmax(w, ct.type(1))
            h = numpy.fmax(h, ct.type(1))
        cos, sin = _rotation(-safe[:, 5] if clockwise else safe[:, 5], ct)
        sampling_h, sampling_w = sampling_ratio
        grid_y = numpy.where(valid, _grid(h, pooled_h, sampling_h), 0)
        grid_x = numpy.where(valid, _grid(w, pooled_w, sampling_w), 0)
        count = grid_y.astype(ct) * grid_x.astype(ct)
        return _Geometry(
            b, cy, cx, cos, sin,
            h * ct.type(-0.5), h / ct.type(pooled_h), grid_y,
            w * ct.type(-0.5), w / ct.type(pooled_w), grid_x,
            count,
        )


def _sample(start, size, grid, p, i):
    """``roi_align_sample``: sample ``i`` of bin ``p`` along an axis, in the compute dtype."""
    ct = start.dtype.type
    with numpy.errstate(all="ignore"):
        return start + p.astype(ct) * size + (i.astype(ct) + ct(0.5)) * size / grid.astype(ct)


def _point(g: _Geometry, yy, xx):
    """``roi_rotated_point``: the map position ``(y, x)`` of ``(yy, xx)`` in the box's frame."""
    with numpy.errstate(all="ignore"):
        return yy * g.cos - xx * g.sin + g.cy, yy * g.sin + xx * g.cos + g.cx


def _run(n, holds: Callable, first, last):
    """``roi_run`` for many runs at once: narrow ``[first, last)`` (int64 arrays, in place) to the
    indices in ``[0, n)`` where ``holds(sel, i)`` is true, a predicate monotone in ``i`` for each
    element; ``sel`` lists the elements the index array ``i`` is for."""
    live = numpy.flatnonzero((n > 0) & (first < last))
    if live.size == 0:
        return
    top = n[live] - 1
    head = holds(live, numpy.zeros_like(top))
    tail = holds(live, top)
    nowhere = ~head & ~tail
    last[live[nowhere]] = first[live[nowhere]]
    change = head != tail
    live, head, hi = live[change], head[change], top[change]
    lo = numpy.zeros_like(hi)
    active = numpy.flatnonzero(hi - lo > 1)
    while active.size:
        mid = (lo[active] + hi[active]) // 2
        same = holds(live[active], mid) == head[active]
        lo[active[same]] = mid[same]
        hi[active[~same]] = mid[~same]
        active = active[hi[active] - lo[active] > 1]
    last[live[head]] = numpy.minimum(last[live[head]], hi[head])
    first[live[~head]] = numpy.maximum(first[live[~head]], hi[~head])


def _expand(first, last, budget: int) -> Iterator[tuple[numpy.ndarray, numpy.ndarray]]:
    """``(item, value)`` chunks of at most ``budget`` listing every ``value`` in
    ``[first[item], last[item])``, item by item in order (an item may span chunks)."""
    count = numpy.maximum(last - first, 0)
    ends = numpy.cumsum(count)
    total = int(ends[-1]) if ends.size else 0
    for s in range(0, total, budget):
        pos = numpy.arange(s, min(s + budget, total), dtype=numpy.int64)
        item = numpy.searchsorted(ends, pos, side="right")
        yield item, first[item] + (pos - (ends[item] - count[item]))


class _Taps(NamedTuple):
    """Folded bilinear taps of a chunk of samples: one entry per distinct (bin, pixel).

    Attributes:
        bin (ndarray int64): the bin, as an index into the chunk of bins (non-decreasing).
        pixel (ndarray int64): the pixel, flat ``(b * H + row) * W + col``.
        weight (ndarray float64): the summed corner weights, each divided by its bin's count.
        zero (ndarray bool): some corner of weight 0 reads this pixel (``0 * inf`` is NaN in
            the kernels, which multiply every corner).
    """

    bin: numpy.ndarray
    pixel: numpy.ndarray
    weight: numpy.ndarray
    zero: numpy.ndarray


def _inside_tests(h: int, w: int) -> tuple[Callable, ...]:
    """The four tests of a position ``(y, x)`` that together say it lies in [-1, H] x [-1, W]."""
    return (
        lambda y, x: y >= -1, lambda y, x: y <= h, lambda y, x: x >= -1, lambda y, x: x <= w
    )


def _taps(g: _Geometry, ph, pw, h: int, w: int, ct) -> Iterator[_Taps]:
    """The folded taps of the bins (``g``, ``ph``, ``pw`` indexed by bin), in chunks."""
    nb = ph.size
    xx0 = _sample(g.start_x, g.bin_x, g.grid_x, pw, numpy.zeros_like(pw))
    xx1 = _sample(g.start_x, g.bin_x, g.grid_x, pw, g.grid_x - 1)
    yy0 = _sample(g.start_y, g.bin_y, g.grid_y, ph, numpy.zeros_like(ph))
    yy1 = _sample(g.start_y, g.bin_y, g.grid_y, ph, g.grid_y - 1)
    whole = (g.grid_y > 0) & (g.grid_x > 0)
    for yy, xx in ((yy0, xx0), (yy0, xx1), (yy1, xx0), (yy1, xx1)):
        y, x = _point(g, yy, xx)
        whole &= (y >= -1) & (y <= h) & (x >= -1) & (x <= w)

    # Rows: each bound of a row's two end samples is monotone in the row index.
    first = numpy.zeros(nb, dtype=numpy.int64)
    last = numpy.where(g.grid_x > 0, g.grid_y, 0)
    part = numpy.flatnonzero(~whole & (last > 0))
    sub = g.take(part)

    def ends(sel, iy):
        s = sub.take(sel)
        yy = _sample(s.start_y, s.bin_y, s.grid_y, ph[part[sel]], iy)
        return _point(s, yy, xx0[part[sel]]), _point(s, yy, xx1[part[sel]])

    def rows(test):
        def holds(sel, iy):
            (ya, xa), (yb, xb) = ends(sel, iy)
            return test(ya, xa) | test(yb, xb)

        return holds

    run_first, run_last = first[part], last[part]
    for test in _inside_tests(h, w):
        _run(sub.grid_y, rows(test), run_first, run_last)
    first[part], last[part] = run_first, run_last

    for row_bin, iy in _expand(first, last, _ROWS):
        yy = _sample(g.start_y[row_bin], g.bin_y[row_bin], g.grid_y[row_bin], ph[row_bin], iy)
        r = g.take(row_bin)
        c_first = numpy.zeros(row_bin.size, dtype=numpy.int64)
        c_last = r.grid_x.copy()
        part = numpy.flatnonzero(~whole[row_bin])
        sub, sub_yy, sub_pw = r.take(part), yy[part], pw[row_bin[part]]

        def cols(test):
            def holds(sel, ix):
                s = sub.take(sel)
                xx = _sample(s.start_x, s.bin_x, s.grid_x, sub_pw[sel], ix)
                return test(*_point(s, sub_yy[sel], xx))

            return holds

        run_first, run_last = c_first[part], c_last[part]
        for test in _inside_tests(h, w):
            _run(sub.grid_x, cols(test), run_first, run_last)
        c_first[part], c_last[part] = run_first, run_last

        for row, ix in _expand(c_first, c_last, _SAMPLES):
            tap = _fold(g, row_bin[row], yy[row], pw[row_bin[row]], ix, h, w, ct)
            if tap is not None:
                yield tap


def _fold(g: _Geometry, bin_, yy, pw, ix, h: int, w: int, ct) -> _Taps | None:
    """The samples ``(bin_, yy, ix)``: inside test, bilinear corners, folded per (bin, pixel)."""
    s = g.take(bin_)
    y, x = _point(s, yy, _sample(s.start_x, s.bin_x, s.grid_x, pw, ix))
    inside = (y >= -1) & (y <= h) & (x >= -1) & (x <= w)  # NaN fails
    if not inside.any():
        return None
    bin_, y, x = bin_[inside], y[inside], x[inside]
    y_lo, y_hi, fy = _common.lerp(y, h, ct)
    x_lo, x_hi, fx = _common.lerp(x, w, ct)
    one = ct.type(1)
    base = s.b[inside] * h
    pixel = numpy.concatenate([
        (base + y_lo) * w + x_lo, (base + y_lo) * w + x_hi,
        (base + y_hi) * w + x_lo, (base + y_hi) * w + x_hi,
    ])
    weight = numpy.concatenate([(one - fy) * (one - fx), (one - fy) * fx, fy * (one - fx), fy * fx])
    bin4 = numpy.tile(bin_, 4)
    order = numpy.lexsort((pixel, bin4))
    bin4, pixel, weight = bin4[order], pixel[order], weight[order]
    start = numpy.flatnonzero(
        numpy.concatenate([[True], (bin4[1:] != bin4[:-1]) | (pixel[1:] != pixel[:-1])])
    )
    per = weight.astype(numpy.float64) / g.count[bin4].astype(numpy.float64)
    return _Taps(
        bin4[start], pixel[start], numpy.add.reduceat(per, start),
        numpy.logical_or.reduceat(weight == 0, start),
    )


def _starts(key: numpy.ndarray) -> numpy.ndarray:
    """Where each run of equal values of the sorted ``key`` starts."""
    return numpy.flatnonzero(numpy.concatenate([[True], key[1:] != key[:-1]]))


def _channels_first(array: numpy.ndarray, c0: int, c1: int, dtype: numpy.dtype) -> numpy.ndarray:
    """Channels ``c0:c1`` of ``array`` [N, C, H, W] (any strides) as a contiguous
    ``[c1 - c0, N * H * W]`` of ``dtype``: each channel one row, pixels ``(b * H + y) * W + x``."""
    n, _, h, w = array.shape
    out = numpy.empty((c1 - c0, n, h, w), dtype=dtype)
    out[...] = array[:, c0:c1].transpose(1, 0, 2, 3)
    return out.reshape(c1 - c0, n * h * w)


def _weigh(values: numpy.ndarray, weight: numpy.ndarray, zero: numpy.ndarray) -> None:
    """``values`` [Cc, U] (compute dtype) times each pair's weight, in place, in the compute dtype
    (a float32 product is twice as fast as a mixed one; the sums are then taken in float64, so
    their error stays that of one product per term, however many terms a bin has). A pair that
    a corner of weight 0 also reads gets ``+ 0 * value``: NaN where the value is not finite."""
    values *= weight.astype(values.dtype)
    if zero.any():
        values[:, zero] += values[:, zero] * values.dtype.type(0)


def _slices(taps: _Taps, channels: int) -> Iterator[slice]:
    """Slices of the taps whose gathered features stay within ``_GATHER`` bytes."""
    step = max(1, _GATHER // (8 * max(1, channels)))
    for s in range(0, taps.bin.size, step):
        yield slice(s, s + step)


def _chunks(geometry: _Geometry, pooled_h: int, pooled_w: int):
    """``(bins, g, ph, pw)`` for chunks of the flat bin range ``[0, K * PH * PW)``, skipping
    RoIs without samples."""
    per_roi = pooled_h * pooled_w
    live = numpy.flatnonzero((geometry.grid_y > 0) & (geometry.grid_x > 0))
    # Whole RoIs per chunk where they fit, else one RoI's bins in pieces.
    roi_step = max(1, _BINS // per_roi)
    for r0 in range(0, live.size, roi_step):
        rois = live[r0 : r0 + roi_step]
        for b0 in range(0, rois.size * per_roi, _BINS):
            flat = numpy.arange(b0, min(b0 + _BINS, rois.size * per_roi), dtype=numpy.int64)
            kk = rois[flat // per_roi]
            rest = flat % per_roi
            ph, pw = rest // pooled_w, rest % pooled_w
            yield (kk * pooled_h + ph) * pooled_w + pw, geometry.take(kk), ph, pw


def roi_align_rotated_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    clockwise: bool,
) -> numpy.ndarray:
    """RoI Align Rotated forward.

    Args:
        input (ndarray[N, C, H, W]): features (float16, bfloat16, float32 or float64), any
            strides.
        rois (ndarray[K, 6]): ``(batch_index, cx, cy, w, h, angle)`` rows in the compute dtype
            (float64 for float64 features, float32 otherwise), angles in degrees; invalid rows
            give zeros.
        pooled_h (int): PH.
        pooled_w (int): PW.
        spatial_scale (float): box-to-feature coordinate scale.
        sampling_ratio ((int, int)): samples per bin along the box's height and width; ``<= 0``
            for adaptive.
        aligned (bool): shift the centre by -0.5 pixel (else sizes are at least 1).
        clockwise (bool): the angle turns clockwise.

    Returns:
        ndarray[K, C, PH, PW]: in the input's dtype. NaN and infinite features reach exactly
        the bins that sample them.
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = numpy.zeros((k, c, pooled_h, pooled_w), dtype=input.dtype)
    if out.size == 0 or h == 0 or w == 0:
        return out
    ct = _common.compute_dtype(input.dtype)
    geometry = _geometry(
        rois, n, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, clockwise, ct
    )
    cc = _common.channel_chunk(c, n * h * w, ct.itemsize)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        x = _channels_first(input, c0, c1, ct)
        for bins, g, ph, pw in _chunks(geometry, pooled_h, pooled_w):
            acc = numpy.zeros((bins.size, c1 - c0))  # rows: a fancy-indexed add along rows is fast
            # inf - inf and 0 * inf are NaN; float16 rounds to inf past its range.
            with numpy.errstate(invalid="ignore", over="ignore"):
                for taps in _taps(g, ph, pw, h, w, ct):
                    for part in _slices(taps, c1 - c0):
                        terms = x.take(taps.pixel[part], axis=1)
                        _weigh(terms, taps.weight[part], taps.zero[part])
                        bin_ = taps.bin[part]
                        start = _starts(bin_)
                        sums = numpy.add.reduceat(terms, start, axis=1, dtype=numpy.float64)
                        acc[bin_[start]] += sums.T
                kk = bins // (pooled_h * pooled_w)
                out[kk, c0:c1, ph, pw] = acc.astype(ct)
    return out


def roi_align_rotated_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    clockwise: bool,
    deterministic: bool = False,
) -> numpy.ndarray:
    """Gradient of RoI Align Rotated with respect to its input; deterministic
    (``deterministic`` is accepted for the backend contract).

    Contributions are summed in a fixed order into an accumulator of the compute dtype (float32
    for float16, bfloat16 and float32, float64 for float64) and rounded once into the result.

    Args:
        grad_output (ndarray[K, C, PH, PW]): gradient of the output, any strides.
        rois (ndarray[K, 6]): as for :func:`roi_align_rotated_forward`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)`` of the forward input.
        spatial_scale, sampling_ratio, aligned, clockwise: as in the forward pass.

    Returns:
        ndarray[N, C, H, W]: in grad_output's dtype. A NaN or infinite gradient reaches
        exactly the pixels its bin samples.
    """
    n, c, h, w = input_shape
    k, _, pooled_h, pooled_w = grad_output.shape
    grad_input = numpy.zeros((n, c, h, w), dtype=grad_output.dtype)
    if grad_input.size == 0 or k == 0:
        return grad_input
    ct = _common.compute_dtype(grad_output.dtype)
    geometry = _geometry(
        rois, n, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, clockwise, ct
    )
    cc = _common.channel_chunk(c, n * h * w, ct.itemsize)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        acc = numpy.zeros((n * h * w, c1 - c0), dtype=ct)  # rows, as in the forward
        for bins, g, ph, pw in _chunks(geometry, pooled_h, pooled_w):
            kk = bins // (pooled_h * pooled_w)
            grad = numpy.empty((c1 - c0, bins.size), dtype=ct)
            grad[...] = grad_output[kk, c0:c1, ph, pw].T
            with numpy.errstate(invalid="ignore", over="ignore"):  # inf - inf, 0 * inf: NaN
                for taps in _taps(g, ph, pw, h, w, ct):
                    for part in _slices(taps, c1 - c0):
                        # Sum per pixel (stable: a fixed order), then one buffered add.
                        order = numpy.argsort(taps.pixel[part], kind="stable")
                        pixel = taps.pixel[part][order]
                        terms = grad.take(taps.bin[part][order], axis=1)
                        _weigh(terms, taps.weight[part][order], taps.zero[part][order])
                        start = _starts(pixel)
                        # In the accumulator's dtype: a pixel's few terms add as they would into
                        # it one by one (float64 accumulation would be slower here, where runs
                        # are short, and rounded away by the accumulator anyway).
                        acc[pixel[start]] += numpy.add.reduceat(terms, start, axis=1).T
        with numpy.errstate(over="ignore"):  # float16 rounds to inf past its range
            grad_input[:, c0:c1] = acc.reshape(n, h, w, c1 - c0).transpose(0, 3, 1, 2)
    return grad_input
