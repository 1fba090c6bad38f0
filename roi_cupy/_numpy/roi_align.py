"""RoI Align on NumPy arrays, through its separable form.

A bin's sample grid is the Cartesian product of ``gh`` sample rows and ``gw`` sample columns, the
range test splits into a y test and an x test, and the bilinear weights are products of a y weight
and an x weight. So for one RoI the whole output is a pair of small matrix products::

    out[k, c] = Ay[k] @ X[b, c] @ Ax[k].T        Ay[k]: [PH, H], Ax[k]: [PW, W]

where row ``ph`` of ``Ay[k]`` holds the bin's sample rows' 1-D bilinear weights summed and divided
by ``gh`` (a sample outside ``[-1, H]`` adds nothing but still counts in ``gh``), and likewise for
``Ax[k]``; ``1/gh * 1/gw`` is the ``1/count`` of the direct form. The backward pass is the
transposed product ``grad[b, c] += Ay[k].T @ G[k, c] @ Ax[k]``.

Each RoI touches few rows and columns, so ``Ay[k]`` and ``Ax[k]`` are stored compressed to the
rows and columns that carry a weight. RoIs of similar compressed size are grouped; a group gathers
its windows from a channels-last copy of the features in one ``take`` and contracts them with two
batched matrix products (BLAS), so there is no Python work per output element or per sample.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy

from roi_cupy._numpy import _common

# Most RoIs in one group.
_GROUP = 4096
# Most samples expanded at once along one axis (each holds a few dozen bytes of temporaries).
_TAPS = 1 << 18
# Most samples per bin and axis, as in the kernels (ROI_MAX_GRID): a gigantic box stays finite work.
_MAX_GRID = float(1 << 20)
# A bin gets its weights in closed form (:meth:`_Axis.closed_entries`, the kernels' dense tables:
# one weight per pixel from counts and sums of its samples found by binary search) where it has
# more than _CLOSED_GRID samples and at least _CLOSED_DENSITY of them per pixel; other bins expand
# their samples one by one. The closed form costs some 4 binary searches (up to 20 steps) per
# pixel, the expansion a few temporaries per sample: past a few samples per pixel the closed form
# is cheaper, and grids of up to 32 samples (every sampling_ratio in common use, and the adaptive
# grid, about one sample per pixel) keep the sample-by-sample numbers bit for bit.
_CLOSED_GRID = 32
_CLOSED_DENSITY = 4
# The compute dtypes' machine epsilon (numpy.finfo is slow to ask on every call).
_EPS = {numpy.dtype(t): float(numpy.finfo(t).eps) for t in (numpy.float32, numpy.float64)}


class _Axis:
    """The sampling of one axis (y or x) of every RoI of a block.

    Attributes:
        start (ndarray[K]): the RoI's first edge in feature coordinates (compute dtype).
        bin (ndarray[K]): bin size (compute dtype; negative for a reversed box).
        grid (ndarray[K] float64): samples per bin (0 where a bin has none).
        base (ndarray[K, P]): each bin's first edge, ``start + p * bin`` (compute dtype).
        lo (ndarray[K, P] float64): first sample index worth evaluating in each bin.
        n (ndarray[K, P] int64): how many sample indices from ``lo`` on are evaluated.
        bound (ndarray[K] int64): an upper bound on the distinct pixels the RoI touches.
    """

    def __init__(self, start, bin_size, grid, pooled: int, size: int, ct: numpy.dtype):
        self.start, self.bin, self.grid, self.size, self.ct = start, bin_size, grid, size, ct
        g = grid[:, None]
        with numpy.errstate(all="ignore"):
            self.base = start[:, None] + numpy.arange(pooled, dtype=ct) * bin_size[:, None]
            b64 = self.base.astype(numpy.float64)
            step = (bin_size.astype(numpy.float64) / grid)[:, None]
            # Sample indices whose coordinate lands in [-1, size], widened by the rounding
            # error of the compute dtype; the exact test is redone on every evaluated sample.
            first = (-1.0 - b64) / step - 0.5
            last = (size - b64) / step - 0.5
            eps = _EPS[ct]
            slack = 2.0 + 4.0 * eps * (numpy.abs(b64) + numpy.abs(step)) / numpy.abs(step)
            lo = numpy.clip(numpy.floor(numpy.fmin(first, last) - slack), 0, g - 1)
            hi = numpy.clip(numpy.ceil(numpy.fmax(first, last) + slack), 0, g - 1)
        # A zero-size bin puts all its samples on one point: evaluate it once, weight 1.
        collapsed = (bin_size == 0)[:, None] & (g >= 1)
        lo = numpy.where(collapsed, 0.0, lo)
        hi = numpy.where(collapsed, 0.0, hi)
        ok = (g >= 1) & numpy.isfinite(lo) & numpy.isfinite(hi) & (hi >= lo)
        # Bins with many samples per pixel get their weights in closed form: they expand no
        # sample, and read at most the pixels they cover.
        self.closed = ok & ~collapsed & _is_closed(bin_size[:, None], g)
        with numpy.errstate(all="ignore"):
            span = numpy.minimum(size, numpy.abs(step) * g + 3)
        self.span = numpy.where(self.closed, span, 0).astype(numpy.int64)
        self.lo = numpy.where(ok, lo, 0.0)
        self.n = numpy.where(ok & ~self.closed, hi - self.lo + 1, 0).astype(numpy.int64)
        # What a sample's weight is divided by: its bin's sample count along this axis.
        self.divisor = numpy.where(bin_size == 0, 1.0, numpy.maximum(grid, 1.0))
        self.factor = 1.0 / self.divisor
        self.bound = numpy.minimum(size, 2 * self.n.sum(axis=1) + self.span.sum(axis=1))

    def taps(self, rois: numpy.ndarray) -> tuple[numpy.ndarray, ...]:
        """The evaluated samples inside ``[-1, size]`` of the RoIs ``rois`` (block indices).

        Returns:
            (ndarray[S] int64, ndarray[S] int64, ndarray[S] int64, ndarray[S]): for each sample,
            its flat ``(RoI of rois, bin)`` index (sorted), its low and high pixel, and the
            weight of the high pixel in the compute dtype (0 at the snapped edge; the low pixel
            weighs ``1 - frac``), computed in the kernels' order of operations.
        """
        kp, _, low, high, frac = self.samples(rois)
        return kp, low, high, frac

    def samples(self, rois: numpy.ndarray) -> tuple[numpy.ndarray, ...]:
        """:meth:`taps` with each sample's index in its bin's grid (int64, increasing within a
        bin) second."""
        ct, size = self.ct, self.size
        n = self.n[rois]
        kg, pooled = n.shape
        counts = n.ravel()
        total = int(counts.sum())
        kp = numpy.repeat(numpy.arange(kg * pooled), counts)
        first = numpy.cumsum(counts) - counts
        index = self.lo[rois].ravel()[kp] + (numpy.arange(total) - first[kp])
        k = kp // pooled
        bin_size = self.bin[rois][k]
        y = _sample_position(self.base[rois].ravel()[kp], bin_size, self.grid[rois][k], index, ct)
        inside = (y >= -1) & (y <= size)  # NaN fails both
        kp, index, y = kp[inside], index[inside].astype(numpy.int64), y[inside]
        return (kp, index, *_common.lerp(y, size, ct))

    def closed_entries(self, rois: numpy.ndarray) -> tuple[numpy.ndarray, ...]:
        """The weights of the closed-form bins of the RoIs ``rois`` (block indices), one entry
        per pixel from the lowest to the highest pixel a bin reads, as the kernels'
        ``roi_align_dense_weight`` forms them.

        A pixel's weight adds up the weights of the samples of the two pixel intervals around
        it: how many samples each holds and how far past its start they lie (an arithmetic
        progression from the first one's exact position), found by binary searches on the exact
        sample positions, so each sample is inside, outside or snapped to the edge as
        :meth:`samples` finds it. Summed in float64 and divided by the bin's samples; the sums
        differ from the sample-by-sample ones by the rounding of the positions.

        Returns:
            (ndarray[E] int64, ndarray[E] int64, ndarray[E] float64, ndarray[E] bool): each
            entry's flat ``(RoI of rois, bin)`` index (sorted, then the pixel rising), its pixel,
            its weight, and whether some sample reads the pixel at weight exactly 0 (the far
            corner of a sample on a pixel centre or snapped to the edge).
        """
        ct, size = self.ct, self.size
        pooled = self.n.shape[1]
        kp = numpy.flatnonzero(self.closed[rois].ravel())
        k = rois[kp // pooled]
        base, bin_size = self.base[rois].ravel()[kp], self.bin[k]
        grid = self.grid[k].astype(numpy.int64)
        rising = bin_size >= 0

        def position(b, rank):  # the sample of bin b of rank ``rank`` in increasing position
            i = numpy.where(rising[b], rank, grid[b] - 1 - rank)
            return _sample_position(base[b], bin_size[b], grid[b], i, ct)

        def below(b, t, inclusive=False):  # how many samples of bin b lie below t (or at it)
            t = numpy.asarray(t).astype(ct)

            def past(i):  # the sample of rank i is not counted: false on a prefix of ranks
                v = position(b, i)
                return v > t if inclusive else v >= t

            return _first_where(numpy.zeros_like(b), grid[b], past)

        every = numpy.arange(kp.size)
        first, last = below(every, -1.0), below(every, float(size), inclusive=True)
        live = numpy.flatnonzero(first < last)
        low = _common.lerp(position(live, first[live]), size, ct)[0]
        high = _common.lerp(position(live, last[live] - 1), size, ct)[1]
        span = high - low + 1
        b = numpy.repeat(live, span)
        q = numpy.repeat(low, span) + (
            numpy.arange(b.size) - numpy.repeat(numpy.cumsum(span) - span, span)
        )
        first, last = first[b], last[b]
        step = numpy.abs(bin_size[b].astype(numpy.float64)) / grid[b]

        def part(r0, r1, t):  # the samples of ranks [r0, r1), from t on: count, offset sum, on t
            count = (r1 - r0).astype(numpy.float64)
            d = position(b, numpy.minimum(r0, grid[b] - 1)).astype(numpy.float64) - t
            d = numpy.where(r1 > r0, d, 0.0)
            return count, count * d + step * (count * (count - 1) * 0.5), (r1 > r0) & (d == 0)

        if size == 1:  # every inside sample snaps to the one pixel, its far corner at weight 0
            weight = (last - first).astype(numpy.float64)
            zero = numpy.ones(b.size, bool)
        else:
            at_q = below(b, q)
            edge = below(b, numpy.zeros(b.size)) - first  # samples in [-1, 0)
            weight = numpy.where(q == 0, edge, 0).astype(numpy.float64)
            zero = (q == 1) & (edge > 0)
            count, offsets, _ = part(at_q, below(b, q + 1), q.astype(numpy.float64))
            weight += numpy.where(q <= size - 2, numpy.maximum(count - offsets, 0.0), 0.0)
            _, offsets, on = part(below(b, q - 1), at_q, q - 1.0)
            weight += numpy.where(q >= 1, numpy.maximum(offsets, 0.0), 0.0)
            zero |= (q >= 1) & on
            snapped = numpy.where(q == size - 1, last - at_q, 0)  # samples in [size - 1, size]
            weight += snapped
            zero |= snapped > 0
        return kp[b], q, weight / grid[b], zero

    def candidates(self, rois: numpy.ndarray) -> tuple[numpy.ndarray, ...]:
        """Max mode's candidate samples of the RoIs ``rois`` (block indices), as the kernels'
        ``roi_align_max_next`` finds them (docs/semantics.md, "RoI Align, max mode"): of each
        group of a bin's inside samples that read the same low pixel, the first, and the first
        whose high-pixel weight equals the group's last one's. Found by binary searches on the
        exact sample positions, so the work follows the pixels a bin covers, not its samples.

        Returns:
            :meth:`samples`' five arrays for the candidates (sorted by bin, then index), and
            ``[G * P]`` int64: how many of each bin's samples, from index 0 on, lie inside
            ``[-1, size]``.
        """
        ct, size = self.ct, self.size
        pooled = self.n.shape[1]
        k = numpy.repeat(numpy.arange(rois.size), pooled)
        base, step = self.base[rois].ravel(), self.bin[rois][k]
        grid = self.grid[rois][k].astype(numpy.int64)
        rising = step >= 0

        def position(b, i):
            return _sample_position(base[b], step[b], grid[b], i, ct)

        every = numpy.arange(k.size)
        # The inside samples [first, last) in index order, as roi_align_window finds them.
        first = _first_where(numpy.zeros_like(grid), grid, lambda i: numpy.where(
            rising, position(every, i) >= -1, position(every, i) <= size))
        last = _first_where(first, grid, lambda i: numpy.where(
            rising, position(every, i) > size, position(every, i) < -1))
        lead = numpy.where(first == 0, last, 0)
        bins = numpy.flatnonzero(first < last)
        first, last = first[bins], last[bins]

        def lerp(b, i, f, l):  # an inside sample's low pixel and weight (i clipped into it)
            return _common.lerp(position(b, numpy.clip(i, f, l - 1)), size, ct)[::2]

        # A bin's groups are found from whichever are fewer, its inside samples or the pixels
        # they read (each at most the run's budget, _Axis.n or _Axis.span).
        low, _ = lerp(bins, first, first, last)
        end, _ = lerp(bins, last - 1, first, last)
        span = numpy.abs(end - low) + 1
        few = last - first <= span
        kp, index = _concatenated([
            self._candidates_by_sample(bins[few], first[few], last[few], lerp),
            self._candidates_by_pixel(bins[~few], first[~few], last[~few], low[~few],
                                      span[~few], rising, lerp),
        ])
        order = numpy.lexsort((index, kp))
        kp, index = kp[order], index[order]
        return (kp, index, *_common.lerp(position(kp, index), size, ct), lead)

    @staticmethod
    def _candidates_by_sample(bins, first, last, lerp) -> tuple[numpy.ndarray, numpy.ndarray]:
        """:meth:`candidates` of ``bins`` from each of their inside samples ``[first, last)``:
        ``(bin, index)`` of each."""
        count = last - first
        if bins.size == 0:
            return bins, first
        b = numpy.repeat(bins, count)
        f, l = numpy.repeat(first, count), numpy.repeat(last, count)
        i = f + (numpy.arange(b.size) - numpy.repeat(numpy.cumsum(count) - count, count))
        low, weight = lerp(b, i, f, l)
        start = numpy.ones(b.size, bool)  # the first sample of a group
        start[1:] = (b[1:] != b[:-1]) | (low[1:] != low[:-1])
        group = numpy.cumsum(start) - 1
        ends = numpy.append(numpy.flatnonzero(start)[1:], b.size)
        # Weights are monotone in a group: those equal to its last one's are a suffix of it.
        tail = weight == weight[ends - 1][group]
        earlier = numpy.concatenate([[False], tail[:-1]])
        keep = start | (tail & (start | ~earlier))
        return b[keep], i[keep]

    @staticmethod
    def _candidates_by_pixel(bins, first, last, low, span, rising, lerp):
        """:meth:`candidates` of ``bins`` from each low pixel their inside samples
        ``[first, last)`` read, from ``low`` on, ``span`` of them, walked in index order (down
        for a reversed box): a group starts at the first index that reads its pixel, and its
        second candidate is found by binary search. ``(bin, index)`` of each."""
        if bins.size == 0:
            return bins, first
        b = numpy.repeat(bins, span)
        f, l = numpy.repeat(first, span), numpy.repeat(last, span)
        sign = numpy.where(rising[b], 1, -1)
        pixel = numpy.repeat(low, span) + sign * (
            numpy.arange(b.size) - numpy.repeat(numpy.cumsum(span) - span, span)
        )
        start = _first_where(f, l, lambda i: sign * lerp(b, i, f, l)[0] >= sign * pixel)
        stop = numpy.append(start[1:], 0)
        stop = numpy.where(numpy.append(b[1:] != b[:-1], True), l, stop)
        keep = start < stop
        b, f, l, start, stop = b[keep], f[keep], l[keep], start[keep], stop[keep]
        head = lerp(b, start, f, l)[1]
        tail = lerp(b, stop - 1, f, l)[1]
        second = _first_where(start + 1, stop - 1, lambda i: lerp(b, i, f, l)[1] == tail)
        second = numpy.where(head == tail, -1, second)
        kp = numpy.stack([b, b], axis=1).ravel()
        index = numpy.stack([start, second], axis=1).ravel()
        return kp[index >= 0], index[index >= 0]

    def weights(self, rois: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
        """Compressed weight matrices of the RoIs ``rois`` (indices into the block).

        The samples are expanded for a run of RoIs at a time (at most ``_TAPS`` of them and of
        closed-form entries, or one RoI), so that a large ``sampling_ratio`` costs memory per
        RoI, not per block; bins with many samples per pixel take the closed form
        (:meth:`closed_entries`), whose work follows the pixels they cover.

        Returns:
            (ndarray[G, P, R], ndarray[G, R] int64, ndarray[G] int64): ``A`` with
            ``A[g, p, r]`` the weight of pixel ``pixels[g, r]`` in bin ``p``, the pixel indices
            (0 where padded, with zero weight), and how many of the R columns each RoI uses.
        """
        total = numpy.cumsum(self.n[rois].sum(axis=1) + self.span[rois].sum(axis=1))
        if rois.size == 0 or total[-1] <= _TAPS:
            return self._weights(rois)
        parts, i = [], 0
        while i < rois.size:
            done = int(total[i - 1]) if i else 0
            j = max(i + 1, int(numpy.searchsorted(total, done + _TAPS, side="right")))
            parts.append(self._weights(rois[i:j]))
            i = j
        width = max(a.shape[2] for a, _, _ in parts)
        # Padding columns weigh 0 and point at pixel 0, as within one run.
        a = numpy.concatenate(
            [numpy.pad(a, ((0, 0), (0, 0), (0, width - a.shape[2]))) for a, _, _ in parts]
        )
        pixels = numpy.concatenate(
            [numpy.pad(p, ((0, 0), (0, width - p.shape[1]))) for _, p, _ in parts]
        )
        return a, pixels, numpy.concatenate([u for _, _, u in parts])

    def _weights(self, rois: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
        """:meth:`weights` for a run of RoIs expanded at once."""
        ct, size = self.ct, self.size
        kg, pooled = rois.size, self.n.shape[1]
        kp, low, high, frac = self.taps(rois)
        k = kp // pooled
        factor = self.factor[rois][k]
        w_low = (ct.type(1) - frac).astype(numpy.float64) * factor
        w_high = frac.astype(numpy.float64) * factor

        # Closed-form bins after the others: each bin's sums keep the order of its own entries.
        ckp, cpixel, cw, _ = self.closed_entries(rois)
        kp = numpy.concatenate([kp, kp, ckp])
        k = kp // pooled
        pixel = numpy.concatenate([low, high, cpixel])
        w = numpy.concatenate([w_low, w_high, cw])

        # Number the distinct pixels of each RoI in increasing order.
        unique, inverse = numpy.unique(k * size + pixel, return_inverse=True)
        k_u = unique // size
        used = numpy.bincount(k_u, minlength=kg)
        pos_u = numpy.arange(unique.size) - (numpy.cumsum(used) - used)[k_u]
        width = max(1, int(used.max(initial=0)))
        pixels = numpy.zeros((kg, width), dtype=numpy.int64)
        pixels[k_u, pos_u] = unique - k_u * size
        flat = kp * width + pos_u[inverse.ravel()]
        a = numpy.bincount(flat, weights=w, minlength=kg * pooled * width)
        return a.reshape(kg, pooled, width).astype(ct), pixels, used


def _is_closed(bin_size: numpy.ndarray, grid: numpy.ndarray) -> numpy.ndarray:
    """Whether bins of ``bin_size`` (compute dtype) with ``grid`` samples (float64) get their
    weights in closed form (see ``_CLOSED_GRID``); NaN and infinite bins do not."""
    with numpy.errstate(invalid="ignore"):
        return (grid > _CLOSED_GRID) & (
            numpy.abs(bin_size.astype(numpy.float64)) * _CLOSED_DENSITY <= grid
        )


def _sample_position(base, bin_size, grid, index, ct: numpy.dtype) -> numpy.ndarray:
    """The kernels' ``roi_align_sample`` in the compute dtype ``ct``, in their order of
    operations: sample ``index`` (integers) of a bin whose first edge is ``base``, of
    ``bin_size``, with ``grid`` samples (arrays that broadcast)."""
    with numpy.errstate(all="ignore"):
        return base + ((index.astype(ct) + ct.type(0.5)) * bin_size) / grid.astype(ct)


def _concatenated(parts) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Pairs of int64 arrays, concatenated pairwise."""
    return tuple(numpy.concatenate([p[j] for p in parts]).astype(numpy.int64) for j in (0, 1))


def _first_where(lo: numpy.ndarray, hi: numpy.ndarray, holds) -> numpy.ndarray:
    """For each element, the first index in ``[lo, hi)`` where ``holds(index)`` (an array
    predicate, false on a prefix and true on the rest) is true, or ``hi``: the kernels'
    ``roi_first_where``, one binary search for all elements at once."""
    lo, hi = lo.copy(), hi.copy()
    while True:
        open_ = lo < hi
        if not open_.any():
            return lo
        mid = lo + (hi - lo) // 2
        true = holds(mid)
        hi = numpy.where(open_ & true, mid, hi)
        lo = numpy.where(open_ & ~true, mid + 1, lo)


def _axes(rois, shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct):
    """The y and x sampling of a block of RoIs (features of ``shape`` = (N, C, H, W))."""
    _, _, h, w = shape
    y0, bh, gh, x0, bw, gw = _geometry(rois, pooled_h, pooled_w, spatial_scale, sampling_ratio,
                                       aligned, ct)
    return _Axis(y0, bh, gh, pooled_h, h, ct), _Axis(x0, bw, gw, pooled_w, w, ct)


def _geometry(rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct):
    """Each RoI's first edge, bin size (compute dtype) and samples per bin (float64, 0 for none)
    along y, then along x."""
    scale = ct.type(spatial_scale)
    offset = ct.type(0.5 if aligned else 0.0)
    with numpy.errstate(all="ignore"):
        x0 = rois[:, 1] * scale - offset
        y0 = rois[:, 2] * scale - offset
        rw = (rois[:, 3] * scale - offset) - x0
        rh = (rois[:, 4] * scale - offset) - y0
        if not aligned:
            rw = numpy.maximum(rw, ct.type(1))
            rh = numpy.maximum(rh, ct.type(1))
        bw = rw / ct.type(pooled_w)
        bh = rh / ct.type(pooled_h)
        sampling_h, sampling_w = sampling_ratio
        if sampling_h > 0:
            gh = numpy.full(rois.shape[0], float(sampling_h))
        else:
            gh = numpy.ceil(bh).astype(numpy.float64)
        if sampling_w > 0:
            gw = numpy.full(rois.shape[0], float(sampling_w))
        else:
            gw = numpy.ceil(bw).astype(numpy.float64)
    # NaN and non-positive grids sample nothing.
    gh = numpy.where(gh >= 1, numpy.minimum(gh, _MAX_GRID), 0.0)
    gw = numpy.where(gw >= 1, numpy.minimum(gw, _MAX_GRID), 0.0)
    return y0, bh, gh, x0, bw, gw


def _groups(rb, cb, pooled_h, pooled_w, row_bytes) -> Iterator[tuple[int, int]]:
    """Split RoIs into runs whose padded windows fit the group budget.

    ``rb`` and ``cb`` are the RoIs' row and column counts, sorted by their buckets; a run
    never spans two buckets, so each run pads little in either direction.
    """
    bucket = _bucket(rb) * (1 << 32) + _bucket(cb)
    i, k = 0, rb.size
    while i < k:
        j = min(k, i + _GROUP, int(numpy.searchsorted(bucket, bucket[i], side="right")))
        r = numpy.maximum.accumulate(numpy.maximum(rb[i:j], pooled_h))
        c = numpy.maximum.accumulate(numpy.maximum(cb[i:j], pooled_w))
        size = numpy.arange(1, j - i + 1) * r * c * row_bytes
        j = i + max(1, int(numpy.searchsorted(size, _common.GROUP_BUDGET, side="right")))
        yield i, j
        i = j


def _bucket(rows: numpy.ndarray) -> numpy.ndarray:
    """Size buckets 25% wide (at least 4 rows)."""
    return numpy.floor(numpy.log(numpy.maximum(rows, 4) / 4.0) / numpy.log(1.25)).astype(
        numpy.int64
    )


class _Group(NamedTuple):
    """RoIs whose windows are gathered and contracted together.

    Attributes:
        kidx (ndarray[G] int64): the RoIs, as indices into ``rois``.
        b (ndarray[G] int64): their batch indices.
        wy (ndarray[G, PH, R]), rows (ndarray[G, R] int64), used_y (ndarray[G] int64): the
            compressed y weights (see :meth:`_Axis.weights`).
        wx (ndarray[G, PW, Q]), cols (ndarray[G, Q] int64), used_x (ndarray[G] int64): the same
            along x.
        ay (_Axis), ax (_Axis), local (ndarray[G] int64): the sampling of the RoIs' block and
            the RoIs' indices in it, for the sample-by-sample path.
    """

    kidx: numpy.ndarray
    b: numpy.ndarray
    wy: numpy.ndarray
    rows: numpy.ndarray
    used_y: numpy.ndarray
    wx: numpy.ndarray
    cols: numpy.ndarray
    used_x: numpy.ndarray
    ay: _Axis
    ax: _Axis
    local: numpy.ndarray

    def pixels(self, h: int, w: int) -> numpy.ndarray:
        """``[G, R, Q]`` flat ``(b * H + row) * W + col`` indices of the windows."""
        return (self.b[:, None, None] * h + self.rows[:, :, None]) * w + self.cols[:, None, :]

    def touched(self, bad: numpy.ndarray) -> numpy.ndarray:
        """The group positions of the RoIs whose window has a True in ``bad`` [G, R, Q]
        outside its padding."""
        r, q = bad.shape[1:]
        bad = bad & (numpy.arange(r) < self.used_y[:, None])[:, :, None]
        bad &= (numpy.arange(q) < self.used_x[:, None])[:, None, :]
        return numpy.flatnonzero(bad.any(axis=(1, 2)))


# Bytes of a RoI's window (its rows' and columns' spans, channels included) from which reading it
# in place beats gathering it. In place, each RoI is two products large enough for BLAS to
# thread (NumPy's OpenBLAS uses the machine's cores there), and no window is copied; below this
# the per-RoI calls cost more than they save. Measured forward, ms (gathered -> in place, 2
# cores): cpu-aligned 33.4 -> 21.9, cpu-f64 50.8 -> 36.8, cpu-core 32.2 -> 23.0; cpu-many (64
# channels, small windows) stays gathered: with every RoI in place 54.8 -> 64.2.
_IN_PLACE_BYTES = 32 << 10
# Most pixels a RoI's spans may hold for every pixel its weights use (sparse samples leave
# gaps, read in place at weight 0).
_IN_PLACE_SPREAD = 4


def _in_place_pays(group: _Group, pixel_bytes: int) -> bool:
    """Whether the group's RoIs are read in place (:func:`_forward_in_place`): their windows are
    large, and their spans hold at most ``_IN_PLACE_SPREAD`` times the pixels they use."""
    g = group.wy.shape[0]
    last = numpy.arange(g)
    span_y = group.rows[last, group.used_y - 1] - group.rows[:, 0] + 1
    span_x = group.cols[last, group.used_x - 1] - group.cols[:, 0] + 1
    area = span_y * span_x
    return bool(
        area.min() * pixel_bytes >= _IN_PLACE_BYTES
        and area.sum() <= _IN_PLACE_SPREAD * (group.used_y * group.used_x).sum()
    )


def _forward_in_place(x: numpy.ndarray, group: _Group, out, c0: int, c1: int) -> None:
    """The group's bins from ``x`` (channels-last ``[N, H, W, Cc]``, finite) RoI by RoI, each
    window a view of its rows' and columns' spans (no gather); pixels of a span that the RoI
    does not use weigh 0 (finite data: an exact 0 term). The products may run on BLAS's
    threads."""
    pooled_h, pooled_w = group.wy.shape[1], group.wx.shape[1]
    cc = c1 - c0
    for i in range(group.wy.shape[0]):
        ry, rx = int(group.used_y[i]), int(group.used_x[i])
        rows, cols = group.rows[i, :ry], group.cols[i, :rx]
        y0, x0 = int(rows[0]), int(cols[0])
        wy = _spread(group.wy[i, :, :ry], rows - y0, int(rows[-1]) - y0 + 1)
        wx = _spread(group.wx[i, :, :rx], cols - x0, int(cols[-1]) - x0 + 1)
        window = x[group.b[i], y0 : y0 + wy.shape[1], x0 : x0 + wx.shape[1]]
        tmp = numpy.matmul(wy, window.reshape(wy.shape[1], wx.shape[1] * cc))
        res = numpy.matmul(wx, tmp.reshape(pooled_h, wx.shape[1], cc))  # [PH, PW, Cc]
        with numpy.errstate(over="ignore"):  # float16 rounds to inf past its range
            out[group.kidx[i], c0:c1] = res.transpose(2, 0, 1)


def _spread(weights: numpy.ndarray, at: numpy.ndarray, span: int) -> numpy.ndarray:
    """``[P, span]`` weights, column ``at[j]`` holding ``weights[:, j]`` and zeros elsewhere."""
    if span == at.size:
        return numpy.ascontiguousarray(weights)  # a strided operand costs matmul its BLAS call
    dense = numpy.zeros((weights.shape[0], span), dtype=weights.dtype)
    dense[:, at] = weights
    return dense


def _plan(rois, shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct, row_bytes):
    """Yield a :class:`_Group` for every group of RoIs that touches the features; RoIs left out
    get zeros."""
    n, _, h, w = shape
    # RoIs whose weights are built together: their padded weight matrices stay small.
    block = max(16, min(1024, (1 << 22) // (max(pooled_h, pooled_w) * max(h, w))))
    for s in range(0, rois.shape[0], block):
        chunk = rois[s : s + block]
        b, valid = _common.batch_index(chunk, n)
        safe = numpy.where(valid[:, None], chunk, 0).astype(ct)
        ay, ax = _axes(safe, shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct)
        active = numpy.flatnonzero(valid & (ay.bound > 0) & (ax.bound > 0))
        if active.size == 0:
            continue
        wy, rows, used_y = ay.weights(active)
        wx, cols, used_x = ax.weights(active)
        # Group RoIs of similar window size so that little of a group's gather is padding.
        order = numpy.lexsort((used_x, _bucket(used_x), _bucket(used_y)))
        order = order[(used_y[order] > 0) & (used_x[order] > 0)]
        for i, j in _groups(used_y[order], used_x[order], pooled_h, pooled_w, row_bytes):
            sel = order[i:j]
            r, q = int(used_y[sel].max()), int(used_x[sel].max())
            yield _Group(
                s + active[sel], b[active[sel]],
                wy[sel, :, :r], rows[sel, :r], used_y[sel],
                wx[sel, :, :q], cols[sel, :q], used_x[sel],
                ay, ax, active[sel],
            )


def _sample_pairs(group: _Group, i: int, channels: int):
    """The samples of RoI ``i`` of ``group``, paired as the kernels visit them.

    Every y sample of bin row ``p`` pairs with every x sample of the RoI, the pair landing in
    bin ``(p, px[j])``.

    Returns:
        (ndarray[Sx] int64, scalar, iterator): the x samples' bins, a bin's sample count
        ``gh * gw`` in the compute dtype, and blocks ``(p, taps)`` of bin row ``p``'s y samples,
        small enough for a few ``[len(block), Sx, channels]`` temporaries. ``taps`` lists the
        four corners as ``(rows [len(block)] int64, cols [Sx] int64, weight [len(block), Sx])``,
        the weights in the compute dtype and formed as in the kernels.
    """
    ay, ax, k = group.ay, group.ax, group.local[i : i + 1]
    ct = ay.ct
    py, y_lo, y_hi, fy = ay.taps(k)
    px, x_lo, x_hi, fx = ax.taps(k)
    wy = ((y_lo, ct.type(1) - fy), (y_hi, fy))
    wx = ((x_lo, ct.type(1) - fx), (x_hi, fx))
    step = max(1, _common.GROUP_BUDGET // (4 * max(1, px.size) * channels * ct.itemsize))

    def blocks():
        for p in numpy.unique(py) if px.size else ():
            row = numpy.flatnonzero(py == p)
            for s in range(0, row.size, step):
                ii = row[s : s + step]
                yield p, [
                    (yr[ii], xc, wyv[ii][:, None] * wxv[None, :])
                    for yr, wyv in wy
                    for xc, wxv in wx
                ]

    return px, ct.type(ay.divisor[k[0]]) * ct.type(ax.divisor[k[0]]), blocks()


def _exact_forward(x: numpy.ndarray, group: _Group, i: int, h: int, w: int) -> numpy.ndarray:
    """RoI ``i`` of ``group`` sample by sample: ``[PH, PW, Cc]`` in the compute dtype.

    The separable products weigh every pixel of a RoI's window in every bin, mostly by zero, and
    ``0 * inf`` is NaN; so with non-finite features they would spread NaN and inf to bins that
    never read them. Like the kernels, this path reads only the four corners of each sample that
    lies inside the map (a corner of weight 0 included: ``0 * inf`` is NaN in the kernels too).
    """
    if _has_closed(group, i):
        return _closed_forward(x, group, i, h, w)
    pooled_h, pooled_w = group.wy.shape[1], group.wx.shape[1]
    out = numpy.zeros((pooled_h, pooled_w, x.shape[1]), dtype=x.dtype)
    px, count, blocks = _sample_pairs(group, i, x.shape[1])
    bins, first = numpy.unique(px, return_index=True)
    base = int(group.b[i]) * h * w
    with numpy.errstate(invalid="ignore", over="ignore"):  # inf - inf and 0 * inf are NaN
        for p, taps in blocks:
            part = 0
            for rows, cols, weight in taps:
                part = part + weight[:, :, None] * x[(base + rows * w)[:, None] + cols]
            total = part.sum(axis=0)  # [Sx, Cc]
            out[p, bins] += numpy.add.reduceat(total, first, axis=0)
        return out / count


def _exact_backward(acc, grad: numpy.ndarray, group: _Group, i: int, h: int, w: int) -> None:
    """Add RoI ``i`` of ``group``'s gradient ``grad`` [PH, PW, Cc] into ``acc`` [N*H*W, Cc]
    sample by sample (see :func:`_exact_forward`: non-finite gradients reach only the corners
    of their own bin's samples)."""
    if _has_closed(group, i):
        _closed_backward(acc, grad, group, i, h, w)
        return
    px, count, blocks = _sample_pairs(group, i, grad.shape[2])
    base = int(group.b[i]) * h * w
    with numpy.errstate(invalid="ignore", over="ignore"):  # inf - inf and 0 * inf are NaN
        for p, taps in blocks:
            g = grad[p, px]  # [Sx, Cc]: every pair of the block with y bin p
            for rows, cols, weight in taps:
                pixel = (base + rows * w)[:, None] + cols
                part = g * weight[:, :, None] / count  # the kernels' order of operations
                numpy.add.at(acc, pixel.ravel(), part.reshape(-1, g.shape[1]))


# A RoI with closed-form bins has too many samples to visit one by one. Its exact path weighs
# each pixel by its dense weight along y and x in float64, as the kernels' tables do, and makes a
# non-finite value NaN where either axis reads its pixel at weight 0 (0 * inf in the kernels).


def _has_closed(group: _Group, i: int) -> bool:
    """Whether RoI ``i`` of ``group`` has a closed-form bin along y or x."""
    k = group.local[i]
    return bool(group.ay.closed[k].any() or group.ax.closed[k].any())


def _dense_axis(axis: _Axis, k: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """RoI ``k`` (block index)'s weights along ``axis``, ``[P, size]`` float64, and whether
    some sample of a bin reads a pixel at weight 0."""
    pooled, size, ct = axis.n.shape[1], axis.size, axis.ct
    rois = numpy.array([k])
    weight = numpy.zeros((pooled, size))
    zero = numpy.zeros((pooled, size), bool)
    kp, low, high, frac = axis.taps(rois)
    for pixel, part in ((low, ct.type(1) - frac), (high, frac)):
        numpy.add.at(weight, (kp, pixel), part.astype(numpy.float64) * axis.factor[k])
        zero[kp[part == 0], pixel[part == 0]] = True
    kp, pixel, part, flag = axis.closed_entries(rois)
    weight[kp, pixel] += part
    zero[kp, pixel] |= flag
    return weight, zero


def _closed_forward(x: numpy.ndarray, group: _Group, i: int, h: int, w: int) -> numpy.ndarray:
    """:func:`_exact_forward` of a RoI with closed-form bins: ``[PH, PW, Cc]``, summed in
    float64."""
    k = group.local[i]
    wy, zy = _dense_axis(group.ay, k)
    wx, zx = _dense_axis(group.ax, k)
    plane = x[int(group.b[i]) * h * w :][: h * w].reshape(h, w, -1)

    def carry(ay, values, ax):  # [H, W, Cc] -> [PH, PW, Cc]
        return numpy.matmul(ax, numpy.tensordot(ay, values, (1, 0)))

    out = carry(wy, numpy.where(numpy.isfinite(plane), plane, 0).astype(numpy.float64), wx)
    _non_finite(out, plane, wy, zy, wx, zx, carry)
    return out.astype(x.dtype)


def _closed_backward(acc, grad: numpy.ndarray, group: _Group, i: int, h: int, w: int) -> None:
    """:func:`_exact_backward` of a RoI with closed-form bins, summed in float64."""
    k = group.local[i]
    wy, zy = _dense_axis(group.ay, k)
    wx, zx = _dense_axis(group.ax, k)

    def carry(ay, values, ax):  # [PH, PW, Cc] -> [H, W, Cc]
        return numpy.matmul(ax.T, numpy.tensordot(ay, values, (0, 0)))

    part = carry(wy, numpy.where(numpy.isfinite(grad), grad, 0).astype(numpy.float64), wx)
    _non_finite(part, grad, wy, zy, wx, zx, carry)
    base = int(group.b[i]) * h * w
    with numpy.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN
        acc[base : base + h * w] += part.reshape(h * w, -1).astype(acc.dtype)


def _non_finite(out, values, wy, zy, wx, zx, carry) -> None:
    """Give ``out`` (the finite values' sums) the non-finite ``values`` that reach it, as the
    kernels' sums of ``|wy| * |wx| * value`` would: NaN where a NaN reaches, or infinities of
    both signs, or a non-finite value read at weight 0 along either axis; else an infinity's
    sign. ``carry(ay, v, ax)`` takes ``values``-shaped terms to ``out``'s elements through the
    weights ``ay`` and ``ax``; here it counts what reaches each element."""
    bad = ~numpy.isfinite(values)
    if not bad.any():
        return
    ry, rx = ((wy != 0) | zy).astype(numpy.float64), ((wx != 0) | zx).astype(numpy.float64)

    def reach(mask, ay, ax):
        return carry(ay, mask.astype(numpy.float64), ax) > 0

    with numpy.errstate(invalid="ignore"):
        up, down = reach(values == numpy.inf, ry, rx), reach(values == -numpy.inf, ry, rx)
    nan = reach(numpy.isnan(values), ry, rx) | (up & down)
    nan |= reach(bad, zy.astype(numpy.float64), rx) | reach(bad, ry, zx.astype(numpy.float64))
    out[up] = numpy.inf
    out[down] = -numpy.inf
    out[nan] = numpy.nan


# ----------------------------------------------------------------------------- small calls
# On a small map with a few RoIs (a latency-bound head, a test) the tiled path above is all fixed
# cost: its windows, groups and compressed weights take some 150 NumPy calls whatever the size.
# There the weight matrices are built dense instead, [K, PH, H] and [K, PW, W], every sample of
# every bin evaluated (one outside [-1, size] weighs 0), and each RoI's whole plane is contracted
# with them: the same weights, summed per pixel in the same order, in some 40 NumPy calls.
# Non-finite features or gradients take the tiled path, which keeps NaN and inf to the bins that
# sample them (a dense product would spread them as 0 * inf).

# Most RoIs, values in their planes (K * C * H * W) and samples along one axis (K * P * g).
_SMALL_ROIS = 64
_SMALL_VALUES = 1 << 16
_SMALL_SAMPLES = 1 << 13


def _dense(start, bin_size, grid, pooled, size, ct) -> numpy.ndarray:
    """Dense weights of both axes at once, rows ``a`` of ``[A, P, S]``.

    Row ``a`` is one axis of one RoI (``start``, ``bin_size``: compute dtype, ``grid``: float64,
    ``pooled`` and ``size``: int64, all ``[A]``); its bin ``p < pooled[a]`` holds the bin's
    samples' 1-D bilinear weights added up per pixel ``< size[a]`` (float64, in
    :meth:`_Axis.weights`' order) and divided by the bin's sample count, the rest zeros.
    """
    rows = start.shape[0]
    big_p, big_s = int(pooled.max()), int(size.max())
    # A zero-size bin puts all its samples on one point: evaluated once, weight 1.
    count = numpy.where(bin_size == 0, numpy.minimum(grid, 1.0), grid)[:, None, None]
    index = numpy.arange(int(count.max(initial=0)), dtype=ct)
    bins = numpy.arange(big_p)
    with numpy.errstate(all="ignore"):
        base = start[:, None] + bins.astype(ct) * bin_size[:, None]
    y = _sample_position(base[:, :, None], bin_size[:, None, None], grid[:, None, None], index, ct)
    top = size[:, None, None]
    # NaN fails the range test; so do the padding bins and samples.
    inside = (y >= -1) & (y <= top) & (index < count)
    if (pooled != big_p).any():
        inside &= (bins < pooled[:, None])[:, :, None]
    low, high, frac = _common.lerp(numpy.where(inside, y, ct.type(0)), top, ct)
    factor = 1.0 / numpy.where(bin_size == 0, 1.0, numpy.maximum(grid, 1.0))
    factor = numpy.where(inside, factor[:, None, None], 0.0)
    w_low = (ct.type(1) - frac).astype(numpy.float64) * factor
    w_high = frac.astype(numpy.float64) * factor
    first = (numpy.arange(rows * big_p) * big_s).reshape(rows, big_p, 1)
    flat = numpy.concatenate([(first + low).ravel(), (first + high).ravel()])
    a = numpy.bincount(
        flat, weights=numpy.concatenate([w_low.ravel(), w_high.ravel()]),
        minlength=rows * big_p * big_s,
    )
    return a.reshape(rows, big_p, big_s).astype(ct)


def _small(rois, shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct):
    """``(b, valid, Ay [K, PH, H], Ax [K, PW, W])`` for a call small enough for dense weights
    (see above), else None."""
    n, c, h, w = shape
    k = rois.shape[0]
    if k > _SMALL_ROIS or k * c * h * w > _SMALL_VALUES:
        return None
    b, valid = _common.batch_index(rois, n)
    safe = numpy.where(valid[:, None], rois, 0).astype(ct)
    y0, bh, gh, x0, bw, gw = _geometry(
        safe, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct
    )
    # Closed-form bins take the tiled path, which builds their weights (_Axis.closed_entries).
    if _is_closed(bh, gh).any() or _is_closed(bw, gw).any():
        return None
    # _dense holds [2K, P, G] samples and [2K, P, max(H, W)] sums.
    rows = 2 * k * max(pooled_h, pooled_w)
    if rows * max(1.0, gh.max(initial=0), gw.max(initial=0)) > _SMALL_SAMPLES:
        return None
    if rows * max(h, w) > _SMALL_VALUES:
        return None
    a = _dense(
        numpy.concatenate([y0, x0]), numpy.concatenate([bh, bw]), numpy.concatenate([gh, gw]),
        numpy.repeat([pooled_h, pooled_w], k), numpy.repeat([h, w], k), ct,
    )
    return b, valid, a[:k, :pooled_h, :h], a[k:, :pooled_w, :w]


def _small_forward(input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned):
    """:func:`roi_align_forward` of a small call, or None where the tiled path must do it: a
    large call, non-finite values in the images read, or a partial product past the compute
    dtype's range (a dense product would turn it into NaN where a zero weight meets it)."""
    ct = _common.compute_dtype(input.dtype)
    n, c, h, w = input.shape
    small = _small(rois, input.shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct)
    if small is None:
        return None
    b, valid, ay, ax = small
    k = b.size
    out = numpy.zeros((k, c, pooled_h, pooled_w), dtype=input.dtype)
    if not valid.any():
        return out
    # The images the valid RoIs read, as [image, H, C, W] (invalid RoIs read the first).
    images, slot = numpy.unique(numpy.where(valid, b, b[valid][0]), return_inverse=True)
    x = numpy.empty((images.size, h, c, w), dtype=ct)
    x[...] = input[images].transpose(0, 2, 1, 3)
    if not numpy.isfinite(x).all():
        return None
    with _common.serial_blas(), numpy.errstate(over="ignore", invalid="ignore"):
        rows = numpy.matmul(ay, x[slot].reshape(k, h, c * w))  # [K, PH, C * W]
        if not numpy.isfinite(rows).all():
            return None
        res = numpy.matmul(rows.reshape(k, pooled_h * c, w), ax.transpose(0, 2, 1))
    with numpy.errstate(over="ignore"):  # float16 rounds to inf past its range
        out[valid] = res.reshape(k, pooled_h, c, pooled_w).transpose(0, 2, 1, 3)[valid]
    return out


def _small_backward(grad_output, rois, input_shape, spatial_scale, sampling_ratio, aligned):
    """:func:`roi_align_backward` of a small call, or None where the tiled path must do it (as
    for :func:`_small_forward`)."""
    n, c, h, w = input_shape
    k, _, pooled_h, pooled_w = grad_output.shape
    ct = _common.compute_dtype(grad_output.dtype)
    small = _small(rois, input_shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct)
    if small is None:
        return None
    b, valid, ay, ax = small
    grad = numpy.empty((k, pooled_h, c, pooled_w), dtype=ct)
    grad[...] = grad_output.transpose(0, 2, 1, 3)
    if not numpy.isfinite(grad[valid]).all():
        return None
    with _common.serial_blas(), numpy.errstate(over="ignore", invalid="ignore"):
        cols = numpy.matmul(grad.reshape(k, pooled_h * c, pooled_w), ax)  # [K, PH * C, W]
        if not numpy.isfinite(cols[valid]).all():
            return None
        part = numpy.matmul(ay.transpose(0, 2, 1), cols.reshape(k, pooled_h, c * w))
    grad_input = numpy.zeros((n, c, h, w), dtype=grad_output.dtype)
    if not valid.any():
        return grad_input
    # The images the valid RoIs write, summed RoI by RoI in index order (the same every run).
    images, slot = numpy.unique(b[valid], return_inverse=True)
    acc = numpy.zeros((images.size, h, c * w), dtype=ct)
    numpy.add.at(acc, slot, part[valid])
    with numpy.errstate(over="ignore"):  # float16 rounds to inf past its range
        grad_input[images] = acc.reshape(images.size, h, c, w).transpose(0, 2, 1, 3)
    return grad_input


def roi_align_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
) -> numpy.ndarray:
    """RoI Align forward.

    Args:
        input (ndarray[N, C, H, W]): features (float16, bfloat16, float32 or float64),
            C-contiguous.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows in the compute dtype
            (float64 for float64 features, float32 otherwise); invalid rows give zeros.
        pooled_h (int): PH.
        pooled_w (int): PW.
        spatial_scale (float): box-to-feature coordinate scale.
        sampling_ratio ((int, int)): samples per bin along y and x; ``<= 0`` for adaptive.
        aligned (bool): shift boxes by -0.5 pixel (and do not clamp their size to 1).

    Returns:
        ndarray[K, C, PH, PW]: in the input's dtype. NaN and infinite features reach exactly
        the bins that sample them.
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = numpy.zeros((k, c, pooled_h, pooled_w), dtype=input.dtype)
    if out.size == 0 or h == 0 or w == 0:
        return out
    small = _small_forward(input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned)
    if small is not None:
        return small
    ct = _common.compute_dtype(input.dtype)
    cc = _common.channel_chunk(c, n * h * w, ct.itemsize)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        x = _common.channels_last(input, c0, c1, ct)
        finite = numpy.isfinite(x)
        bad, clean = None, x
        if not finite.all():
            # The products read zeros instead (padding reads pixels too); the RoIs whose windows
            # hold a non-finite pixel are then redone sample by sample from x.
            bad = ~finite.all(axis=1)  # [N * H * W]
            clean = numpy.where(finite, x, ct.type(0))
        plan = _plan(
            rois, input.shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct,
            (c1 - c0) * ct.itemsize,
        )
        for group in plan:
            if bad is None and _in_place_pays(group, (c1 - c0) * ct.itemsize):
                _forward_in_place(clean.reshape(n, h, w, c1 - c0), group, out, c0, c1)
                continue
            with _common.serial_blas():
                g, r, q = group.wy.shape[0], group.rows.shape[1], group.cols.shape[1]
                pixels = group.pixels(h, w)
                exact = () if bad is None else group.touched(bad[pixels])
                window = clean.take(pixels, axis=0).reshape(g, r, q * (c1 - c0))
                tmp = numpy.matmul(group.wy, window).reshape(g, pooled_h, q, c1 - c0)
                res = numpy.matmul(group.wx[:, None], tmp)  # [G, PH, PW, Cc]
                for i in exact:
                    res[i] = _exact_forward(x, group, i, h, w)
                with numpy.errstate(over="ignore"):  # float16 rounds to inf past its range
                    out[group.kidx, c0:c1] = res.transpose(0, 3, 1, 2)
    return out


def roi_align_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    deterministic: bool = False,
) -> numpy.ndarray:
    """Gradient of RoI Align with respect to its input; deterministic.

    Contributions are summed RoI by RoI in a fixed order, in float32 for float16/float32 and in
    float64 for float64, and rounded once into the result.

    Args:
        grad_output (ndarray[K, C, PH, PW]): gradient of the output, C-contiguous.
        rois (ndarray[K, 5]): as for :func:`roi_align_forward`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)`` of the forward input.
        spatial_scale (float): box-to-feature coordinate scale.
        sampling_ratio ((int, int)): samples per bin along y and x; ``<= 0`` for adaptive.
        aligned (bool): as in the forward pass.
        deterministic (bool): accepted for the backend contract; this path always is.
            Default: False.

    Returns:
        ndarray[N, C, H, W]: in grad_output's dtype. A NaN or infinite gradient reaches
        exactly the pixels its bin samples.
    """
    n, c, h, w = input_shape
    k, _, pooled_h, pooled_w = grad_output.shape
    grad_input = numpy.zeros((n, c, h, w), dtype=grad_output.dtype)
    if grad_input.size == 0 or k == 0:
        return grad_input
    small = _small_backward(
        grad_output, rois, input_shape, spatial_scale, sampling_ratio, aligned
    )
    if small is not None:
        return small
    ct = _common.compute_dtype(grad_output.dtype)
    cc = _common.channel_chunk(c, n * h * w, ct.itemsize)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        acc = numpy.zeros((n * h * w, c1 - c0), dtype=ct)
        plan = _plan(
            rois, input_shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct,
            (c1 - c0) * ct.itemsize,
        )
        for group in plan:
            g, r, q = group.wy.shape[0], group.rows.shape[1], group.cols.shape[1]
            grad = numpy.empty((g, pooled_h, pooled_w, c1 - c0), dtype=ct)
            grad[...] = grad_output[group.kidx, c0:c1].transpose(0, 2, 3, 1)
            exact = ()
            if not numpy.isfinite(grad).all():
                exact = numpy.flatnonzero(~numpy.isfinite(grad).all(axis=(1, 2, 3)))
                for i in exact:
                    _exact_backward(acc, grad[i], group, i, h, w)
                grad[exact] = 0
            with _common.serial_blas():
                tmp = numpy.matmul(group.wx.transpose(0, 2, 1)[:, None], grad)  # [G, PH, Q, Cc]
                part = numpy.matmul(
                    group.wy.transpose(0, 2, 1), tmp.reshape(g, pooled_h, q * (c1 - c0))
                )
            part = part.reshape(g, r, q, c1 - c0)
            pixel = group.pixels(h, w)
            # A RoI's pixels are distinct, so one buffered add per RoI is exact; the RoI order is
            # fixed by the inputs, so the sum is the same on every run.
            for i in range(g):
                ry, rx = group.used_y[i], group.used_x[i]
                acc[pixel[i, :ry, :rx].ravel()] += part[i, :ry, :rx].reshape(ry * rx, c1 - c0)
        with numpy.errstate(over="ignore"):  # float16 rounds to inf past its range
            grad_input[:, c0:c1] = acc.reshape(n, h, w, c1 - c0).transpose(0, 3, 1, 2)
    return grad_input



# ----------------------------------------------------------------------------- max mode
# Max mode (docs/semantics.md, "RoI Align, max mode") needs samples' own values, which the
# separable products above never form. A bin's largest sample is among the pairs of its
# candidates along y and x (_Axis.candidates: at most two per pixel row or column it covers),
# numbered bin by bin, row-major (iy, ix) within a bin. Bins with equal pair counts are
# evaluated together, a bounded slice at a time: four gathers from the channels-last features
# summed in the kernels' order of operations, then the first maximum along each bin's pairs. A bin too large for one slice is evaluated in pieces
# whose picks are merged in order, so memory stays bounded whatever the sampling grid. Samples
# outside the map read 0; only the first of them in a bin can be its pick, merged in last.

# Bytes of per-pair temporaries in one slice, and of the running picks of one run of RoIs.
_PAIR_BUDGET = 4 << 20
_PICK_BUDGET = 16 << 20
# Bytes per pair and channel in a slice (four gathers, their sum, the first-maximum search) and
# per pick and channel (value, pair, and the working copies of a merge).
_PAIR_BYTES = 72
_PICK_BYTES = 40


class _Pairs:
    """The pairs of a run of RoIs: each bin's candidates along y times its candidates along x
    (all inside the map).

    Pairs are numbered bin by bin (C order over ``(RoI, ph, pw)``), row-major within a bin.
    """

    def __init__(self, ay: _Axis, ax: _Axis, local: numpy.ndarray, b: numpy.ndarray, h, w):
        g, pooled_h, pooled_w = local.size, ay.n.shape[1], ax.n.shape[1]
        self.ct, self.w, self.pooled = ay.ct, w, (pooled_h, pooled_w)
        self.base = b * (h * w)
        ky, self.iy, self.ylo, self.yhi, self.fy, lead_y = ay.candidates(local)
        kx, self.ix, self.xlo, self.xhi, self.fx, lead_x = ax.candidates(local)
        self.ny = numpy.bincount(ky, minlength=g * pooled_h)
        self.nx = numpy.bincount(kx, minlength=g * pooled_w)
        self.sy = numpy.cumsum(self.ny) - self.ny
        self.sx = numpy.cumsum(self.nx) - self.nx
        gh = ay.grid[local].astype(numpy.int64)
        self.gw = ax.grid[local].astype(numpy.int64)
        # lead: how many samples of each bin row (column) from index 0 on are inside.
        my = lead_y.reshape(g, pooled_h, 1)
        mx = lead_x.reshape(g, 1, pooled_w)
        gh3, gw3 = gh[:, None, None], self.gw[:, None, None]
        # Each bin's first outside sample in row-major order, as iy * gw + ix; -1 for none.
        self.outside = numpy.where(
            my == 0, 0, numpy.where(mx < gw3, mx, numpy.where(my < gh3, my * gw3, -1))
        ).reshape(-1)
        self.count = (self.ny.reshape(g, pooled_h, 1) * self.nx.reshape(g, 1, pooled_w)).ravel()
        self.ends = numpy.cumsum(self.count)
        self.total = int(self.ends[-1]) if self.ends.size else 0

    def locate(self, t: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
        """``(bin, y sample, x sample)`` of the pairs ``t`` (values in ``[0, total)``)."""
        j = numpy.searchsorted(self.ends, t, side="right")
        return (j, *self.taps(j, t - (self.ends[j] - self.count[j])))

    def taps(self, j: numpy.ndarray, u: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
        """``(y sample, x sample)`` of pair ``u`` (row-major, in ``[0, count[j])``) of bins
        ``j``."""
        pooled_h, pooled_w = self.pooled
        column = j // (pooled_h * pooled_w) * pooled_w + j % pooled_w
        across = self.nx[column]
        return self.sy[j // pooled_w] + u // across, self.sx[column] + u % across

    def position(self, j: numpy.ndarray, yt: numpy.ndarray, xt: numpy.ndarray) -> numpy.ndarray:
        """The row-major position ``iy * gw + ix`` of pairs in their bins ``j``."""
        pooled_h, pooled_w = self.pooled
        return self.iy[yt] * self.gw[j // (pooled_h * pooled_w)] + self.ix[xt]

    def corners(self, j, yt, xt):
        """The four ``(pixel, weight)`` corners of pairs, as the kernels form them: pixels are
        flat ``(b * H + row) * W + col``, weights in the compute dtype."""
        pooled_h, pooled_w = self.pooled
        ct, w = self.ct, self.w
        one = ct.type(1)
        wyh, wxh = self.fy[yt], self.fx[xt]
        wyl, wxl = one - wyh, one - wxh
        base = self.base[j // (pooled_h * pooled_w)]
        r0, r1 = base + self.ylo[yt] * w, base + self.yhi[yt] * w
        c0, c1 = self.xlo[xt], self.xhi[xt]
        return (
            (r0 + c0, wyl * wxl), (r0 + c1, wyl * wxh), (r1 + c0, wyh * wxl), (r1 + c1, wyh * wxh)
        )


def _values(x: numpy.ndarray, pairs: _Pairs, j: numpy.ndarray, u: numpy.ndarray) -> numpy.ndarray:
    """``[S, Cc]``: the values of pairs ``u`` of bins ``j``, as the kernels form them (the four
    products summed left to right, in the compute dtype)."""
    (p0, w0), (p1, w1), (p2, w2), (p3, w3) = pairs.corners(j, *pairs.taps(j, u))
    return w0[:, None] * x[p0] + w1[:, None] * x[p1] + w2[:, None] * x[p2] + w3[:, None] * x[p3]


def _first_max(v: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
    """The first maximum along axis 1 of ``v`` [B, L, Cc] (NaN the largest) and its index."""
    size = v.shape[1]
    if size < 256:
        # Faster than argmax along a short strided axis: the maximum (NaN if any), then the
        # first index that holds it, as the largest of the reversed ranks (L - i) of the hits.
        top = v.max(axis=1)
        hit = v == top[:, None]
        if numpy.isnan(top).any():
            hit |= numpy.isnan(v)
        rank = numpy.arange(size, 0, -1, dtype=numpy.uint8)[None, :, None]
        first = size - (hit * rank).max(axis=1).astype(numpy.int64)
    else:
        first = v.argmax(axis=1)  # the first maximum, or the first NaN
    # The value at the index (not the maximum itself): -0.0 and 0.0 are equal, the first wins.
    return numpy.take_along_axis(v, first[:, None, :], axis=1)[:, 0], first


def _pick(x: numpy.ndarray, pairs: _Pairs, cc: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """The picks of every bin of a run, from ``x`` (channels-last ``[N * H * W, Cc]``).

    Bins with the same number of pairs are evaluated together as ``[bins, pairs, Cc]``, whose
    first maximum along the pairs (or first NaN) is the kernels' pick. A bin with more pairs
    than one slice holds is evaluated a slice at a time, and a later slice's pick replaces the
    earlier one only when strictly greater, or NaN over a number.

    Returns:
        (ndarray[B, Cc], ndarray[B, Cc] int64): each bin's pick's value (0 for an outside pick
        or a bin without samples) and its pair (-1 where it has no corners).
    """
    ct = pairs.ct
    count = pairs.count
    bins = count.size
    value = numpy.zeros((bins, cc), dtype=ct)
    pair = numpy.full((bins, cc), -1, dtype=numpy.int64)
    most = max(1, _PAIR_BUDGET // (cc * _PAIR_BYTES))  # pairs in one slice
    order = numpy.argsort(count, kind="stable")
    sizes = count[order]
    edges = numpy.flatnonzero(numpy.diff(sizes, prepend=-1)).tolist() + [bins]
    with numpy.errstate(invalid="ignore", over="ignore"):  # 0 * inf and inf - inf are NaN
        for a, b in zip(edges[:-1], edges[1:]):
            size = int(sizes[a])
            if size == 0:
                continue
            group = order[a:b]
            step = max(1, most // size)
            for s in range(0, group.size, step):
                j = group[s : s + step]
                for u0 in range(0, size, most):
                    u = numpy.arange(u0, min(size, u0 + most))
                    v = _values(x, pairs, numpy.repeat(j, u.size), numpy.tile(u, j.size))
                    new, first = _first_max(v.reshape(j.size, u.size, cc))
                    t = (pairs.ends[j] - size + u0)[:, None] + first
                    if u0:
                        old = value[j]
                        take = (new > old) | (numpy.isnan(new) & ~numpy.isnan(old))
                        new, t = numpy.where(take, new, old), numpy.where(take, t, pair[j])
                    value[j], pair[j] = new, t
    found = count > 0
    # The first outside sample (value 0) where it comes before an equal pick, or beats it.
    rows = numpy.flatnonzero(pairs.outside >= 0)
    if rows.size:
        cur, held = value[rows], pair[rows]
        earlier = numpy.ones(held.shape, dtype=bool)
        tied = (held >= 0) & (cur == 0)
        if tied.any():
            outside = numpy.broadcast_to(pairs.outside[rows, None], held.shape)
            earlier[tied] = outside[tied] < pairs.position(*pairs.locate(held[tied]))
        out = ~found[rows, None] | (cur < 0) | ((cur == 0) & earlier)
        value[rows] = numpy.where(out, ct.type(0), cur)
        pair[rows] = numpy.where(out, -1, held)
    return value, pair


def _corner_table(pairs: _Pairs, t: numpy.ndarray, cc: int, index: numpy.dtype):
    """``[S, 4]`` corners of the pairs ``t``: ``pixel * cc`` (of dtype ``index``) and weights.
    Channels share pairs, so where the run has fewer pairs than ``t`` holds, every pair's
    corners are formed once and looked up."""
    if pairs.total <= t.size:
        count = pairs.count
        j = numpy.repeat(numpy.arange(count.size), count)
        u = numpy.arange(pairs.total) - numpy.repeat(pairs.ends - count, count)
        pixel, weight = _stacked(pairs.corners(j, *pairs.taps(j, u)))
        return (pixel * cc).astype(index)[t], weight[t]
    pixel, weight = _stacked(pairs.corners(*pairs.locate(t)))
    return (pixel * cc).astype(index), weight


def _stacked(corners) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Four ``(pixel, weight)`` corners as ``[S, 4]`` pixels and ``[S, 4]`` weights."""
    return numpy.stack([p for p, _ in corners], axis=1), numpy.stack([w for _, w in corners], 1)


def _max_runs(x, shape, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned):
    """Yield ``(kidx, pairs, value, pair)`` (see :func:`_pick`) for every run of RoIs that has a
    sample inside the map, picked from ``x``, a channel slice of features of ``shape`` =
    (N, C, H, W) as channels-last ``[N * H * W, Cc]``; RoIs left out hold 0 in every bin."""
    n, _, h, w = shape
    ct, cc = x.dtype, x.shape[1]
    block = max(16, min(1024, (1 << 22) // (max(pooled_h, pooled_w) * max(h, w))))
    per_roi = pooled_h * pooled_w * cc * _PICK_BYTES
    for s in range(0, rois.shape[0], block):
        chunk = rois[s : s + block]
        b, valid = _common.batch_index(chunk, n)
        safe = numpy.where(valid[:, None], chunk, 0).astype(ct)
        ay, ax = _axes(safe, shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct)
        active = numpy.flatnonzero(valid & (ay.bound > 0) & (ax.bound > 0))
        # Runs whose samples (an upper bound; pixels for closed-form bins) and picks fit their
        # budgets; at least one RoI.
        taps = numpy.cumsum(
            (ay.n + ay.span)[active].sum(axis=1) + (ax.n + ax.span)[active].sum(axis=1)
        )
        most = max(1, _PICK_BUDGET // per_roi)
        i = 0
        while i < active.size:
            done = int(taps[i - 1]) if i else 0
            j = int(numpy.searchsorted(taps, done + _TAPS, side="right"))
            j = max(i + 1, min(j, i + most))
            local = active[i:j]
            pairs = _Pairs(ay, ax, local, b[local], h, w)
            value, pair = _pick(x, pairs, cc)
            yield s + local, pairs, value, pair
            i = j


def _max_channels(c: int, n: int, h: int, w: int, pooled: int, itemsize: int) -> int:
    """Channels per slice: one channels-last copy within its budget, and one RoI's picks within
    theirs."""
    one_roi = _PICK_BUDGET // (pooled * _PICK_BYTES)
    return max(1, min(_common.channel_chunk(c, n * h * w, itemsize), one_roi))


def roi_align_max_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
) -> numpy.ndarray:
    """RoI Align in max mode: each bin holds its largest sample (docs/semantics.md).

    Args:
        input (ndarray[N, C, H, W]): features (float16, bfloat16, float32 or float64), any
            strides.
        rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned: as for
            :func:`roi_align_forward`.

    Returns:
        ndarray[K, C, PH, PW]: in the input's dtype. A bin holds the value of its first sample
        in row-major order that no other exceeds (NaN the largest; a sample outside the map
        reads 0), 0 without samples.
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = numpy.zeros((k, c, pooled_h, pooled_w), dtype=input.dtype)
    if out.size == 0 or h == 0 or w == 0:
        return out
    ct = _common.compute_dtype(input.dtype)
    cc = _max_channels(c, n, h, w, pooled_h * pooled_w, ct.itemsize)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        x = _common.channels_last(input, c0, c1, ct)
        runs = _max_runs(
            x, (n, c, h, w), rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
        )
        for kidx, _, value, _ in runs:
            value = value.reshape(kidx.size, pooled_h, pooled_w, c1 - c0)
            with numpy.errstate(over="ignore"):  # float16 rounds to inf past its range
                out[kidx, c0:c1] = value.transpose(0, 3, 1, 2)
    return out


def roi_align_max_backward(
    grad_output: numpy.ndarray,
    input: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    deterministic: bool = False,
) -> numpy.ndarray:
    """Gradient of :func:`roi_align_max_forward` with respect to its input; deterministic.

    Each bin's pick is found again in ``input``, and the bin's gradient goes to the pick's four
    bilinear corners, ``grad * weight``; a pick outside the map and a bin without samples pass
    nothing. Summed in the compute dtype in a fixed order and rounded once.

    Args:
        grad_output (ndarray[K, C, PH, PW]): gradient of the output, any strides.
        input (ndarray[N, C, H, W]): the forward's features, in grad_output's dtype, any strides.
        rois, input_shape, spatial_scale, sampling_ratio, aligned, deterministic: as for
            :func:`roi_align_backward`.

    Returns:
        ndarray[N, C, H, W]: in grad_output's dtype.
    """
    n, c, h, w = input_shape
    k, _, pooled_h, pooled_w = grad_output.shape
    grad_input = numpy.zeros((n, c, h, w), dtype=grad_output.dtype)
    if grad_input.size == 0 or k == 0:
        return grad_input
    ct = _common.compute_dtype(grad_output.dtype)
    cc = _max_channels(c, n, h, w, pooled_h * pooled_w, ct.itemsize)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        x = _common.channels_last(input, c0, c1, ct)
        acc = numpy.zeros((n * h * w, c1 - c0), dtype=ct)
        index = numpy.dtype(numpy.int32 if acc.size < 2**31 else numpy.int64)
        runs = _max_runs(
            x, (n, c, h, w), rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
        )
        for kidx, pairs, _, pair in runs:
            picked = numpy.flatnonzero(pair >= 0)  # into [bins, Cc], grad's layout too
            if picked.size == 0:
                continue
            grad = numpy.empty((kidx.size, pooled_h, pooled_w, c1 - c0), dtype=ct)
            grad[...] = grad_output[kidx, c0:c1].transpose(0, 2, 3, 1)
            g = grad.reshape(-1)[picked]
            start, weight = _corner_table(pairs, pair.reshape(-1)[picked], c1 - c0, index)
            flat = start + (picked % (c1 - c0)).astype(index)[:, None]
            with numpy.errstate(invalid="ignore", over="ignore"):  # 0 * inf is NaN
                part = g[:, None] * weight
            # Pick by pick, corner by corner: the order of the sum is the same for any runs.
            numpy.add.at(acc.reshape(-1), flat.ravel(), part.ravel())
        with numpy.errstate(over="ignore"):  # float16 rounds to inf past its range
            grad_input[:, c0:c1] = acc.reshape(n, h, w, c1 - c0).transpose(0, 3, 1, 2)
    return grad_input
