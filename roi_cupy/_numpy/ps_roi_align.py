"""Position-sensitive RoI Align on NumPy arrays.

Each bin is RoI Align's (``aligned=True``) on its own channel, and separable like it: along each
axis a bin reads the bilinear corners of its samples, each corner weighing its samples' weights
added up (in float64) and divided by the samples per axis. The sampling of an axis (:class:`_Axis`:
the sample positions, the range test and the weights in the kernels' order of operations) is RoI
Align's (:class:`roi_cupy._numpy.roi_align._Axis`), repeated here so that the numbers stay the
same whatever becomes of RoI Align's internals; :mod:`roi_cupy._numpy._separable` pairs rows
with columns and gathers each bin's channel.
"""
from __future__ import annotations

import numpy

from roi_cupy._numpy import _separable

# Boxes on the feature map start half a pixel up and left, as RoI Align's with aligned=True.
_OFFSET = 0.5
# Most samples per bin and axis, as in the kernels (ROI_MAX_GRID): a gigantic box stays finite work.
_MAX_GRID = float(1 << 20)
# The compute dtypes' machine epsilon (numpy.finfo is slow to ask on every call).
_EPS = {numpy.dtype(t): float(numpy.finfo(t).eps) for t in (numpy.float32, numpy.float64)}
# Most samples expanded at once along one axis (each holds a few dozen bytes of temporaries).
_SAMPLES = 1 << 13


class _Axis:
    """The sampling of one axis (y or x) of every RoI of a block: RoI Align's
    (:class:`roi_cupy._numpy.roi_align._Axis`), in the same order of operations, so the same
    numbers.

    Attributes:
        base (ndarray[G, P]): each bin's first edge, ``start + p * bin`` (compute dtype).
        lo (ndarray[G, P] float64): first sample index worth evaluating in each bin.
        n (ndarray[G, P] int64): how many sample indices from ``lo`` on are evaluated.
        factor (ndarray[G] float64): 1 over the samples per bin (1 for a zero-size bin).
    """

    def __init__(self, start, bin_size, grid, pooled: int, size: int, ct: numpy.dtype):
        self.bin, self.grid, self.size, self.ct = bin_size, grid, size, ct
        g = grid[:, None]
        # (Called under numpy.errstate(all="ignore"): NaN and inf boxes sample nothing.)
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
        self.lo = numpy.where(ok, lo, 0.0)
        self.n = numpy.where(ok, hi - self.lo + 1, 0).astype(numpy.int64)
        self.factor = 1.0 / numpy.where(bin_size == 0, 1.0, numpy.maximum(grid, 1.0))

    def taps(self, rois: numpy.ndarray) -> tuple[numpy.ndarray, ...]:
        """The evaluated samples inside ``[-1, size]`` of the RoIs ``rois`` (block indices).

        Returns:
            (ndarray[S] int64, ndarray[S] int64, ndarray[S] int64, ndarray[S]): for each sample,
            its flat ``(RoI of rois, bin)`` index (sorted), its low and high pixel, and the
            weight of the high pixel in the compute dtype (0 at the snapped edge; the low pixel
            weighs ``1 - frac``).
        """
        ct, size = self.ct, self.size
        n = self.n[rois]
        pooled = n.shape[1]
        counts = n.ravel()
        kp = numpy.repeat(numpy.arange(counts.size), counts)
        first = numpy.cumsum(counts) - counts
        index = self.lo[rois].ravel()[kp] + (numpy.arange(kp.size) - first[kp])
        k = kp // pooled
        y = self.base[rois].ravel()[kp] + (
            (index.astype(ct) + ct.type(0.5)) * self.bin[rois][k]
        ) / self.grid[rois].astype(ct)[k]
        inside = (y >= -1) & (y <= size)  # NaN fails both
        kp, y = kp[inside], y[inside]
        y = numpy.maximum(y, ct.type(0))
        low = numpy.floor(y).astype(numpy.int64)
        edge = low >= size - 1
        low = numpy.where(edge, size - 1, low)
        high = numpy.where(edge, low, low + 1)
        frac = numpy.where(edge, ct.type(0), y - low.astype(ct))
        return kp, low, high, frac

    def entries(self) -> _separable.Axis:
        """The corners each bin reads and their weights: a corner's samples' weights added up
        (float64, low corners first, in sample order) and divided by the samples per axis; a
        corner read at weight exactly 0 is flagged. The samples are expanded for a run of RoIs at
        a time (at most ``_SAMPLES`` samples, or one RoI)."""
        ct, size = self.ct, self.size
        g, pooled = self.n.shape
        per_roi = numpy.cumsum(self.n.sum(axis=1))
        parts, i = [], 0
        while i < g:
            done = int(per_roi[i - 1]) if i else 0
            j = max(i + 1, int(numpy.searchsorted(per_roi, done + _SAMPLES, side="right")))
            rois = numpy.arange(i, j)
            kp, low, high, frac = self.taps(rois)
            factor = self.factor[rois][kp // pooled]
            weight = numpy.concatenate([ct.type(1) - frac, frac]).astype(numpy.float64)
            weight *= numpy.concatenate([factor, factor])
            pixel = numpy.concatenate([low, high])
            bins = numpy.concatenate([kp, kp])
            # Each bin's corners lie in a window of its axis: number them within it and add up
            # each pixel's weights with bincount, in the order above (low corners first, in
            # sample order), a pixel read at weight 0 flagged. Far-apart samples make the
            # windows wide: then number the pixels by sorting.
            count = numpy.bincount(kp, minlength=rois.size * pooled)
            live = numpy.flatnonzero(count)
            starts = (numpy.cumsum(count) - count)[live]
            origin = numpy.zeros(count.size, numpy.int64)
            if live.size:
                origin[live] = numpy.minimum.reduceat(low, starts)
                span = int((numpy.maximum.reduceat(high, starts) - origin[live]).max()) + 1
            else:
                span = 1
            if count.size * span <= 8 * bins.size + 4096:
                key = bins * span + (pixel - origin[bins])
                space = count.size * span
                at = numpy.flatnonzero(numpy.bincount(key, minlength=space))
                slot = at // span
                parts.append((
                    slot + i * pooled, origin[slot] + at % span,
                    numpy.bincount(key, weights=weight, minlength=space)[at],
                    numpy.bincount(key, weights=weight == 0, minlength=space)[at] > 0,
                ))
            else:
                key = bins * size + pixel
                unique, inverse = numpy.unique(key, return_inverse=True)
                inverse = inverse.ravel()
                parts.append((
                    unique // size + i * pooled, unique % size,
                    numpy.bincount(inverse, weights=weight, minlength=unique.size),
                    numpy.bincount(inverse, weights=weight == 0, minlength=unique.size) > 0,
                ))
            i = j
        bins, pixel, weight, zero = (numpy.concatenate(a) for a in zip(*parts))
        return _separable.Axis.of_sorted(bins, pixel, weight, zero, (g, pooled))


def _prepare(shape, pooled, spatial_scale, sampling_ratio, ct):
    """What the bins of a block of valid RoIs read (see :data:`_separable.Prepare`)."""
    _, _, h, w = shape
    pooled_h, pooled_w = pooled
    scale, offset = ct.type(spatial_scale), ct.type(_OFFSET)
    sampling_h, sampling_w = sampling_ratio

    def grid(bin_size, ratio):
        if ratio > 0:
            g = numpy.full(bin_size.shape, float(ratio))
        else:
            g = numpy.ceil(bin_size).astype(numpy.float64)
        # NaN and non-positive grids sample nothing.
        return numpy.where(g >= 1, numpy.minimum(g, _MAX_GRID), 0.0)

    def prepare(rois: numpy.ndarray):
        rois = rois.astype(ct)
        with numpy.errstate(all="ignore"):
            x0 = rois[:, 1] * scale - offset
            y0 = rois[:, 2] * scale - offset
            bw = ((rois[:, 3] * scale - offset) - x0) / ct.type(pooled_w)
            bh = ((rois[:, 4] * scale - offset) - y0) / ct.type(pooled_h)
            ay = _Axis(y0, bh, grid(bh, sampling_h), pooled_h, h, ct)
            ax = _Axis(x0, bw, grid(bw, sampling_w), pooled_w, w, ct)
            return ay.entries(), ax.entries(), None

    return prepare


def ps_roi_align_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
) -> numpy.ndarray:
    """PS RoI Align forward.

    Args:
        input (ndarray[N, C, H, W]): features (float16, bfloat16, float32 or float64), any
            strides; C a multiple of ``PH * PW``.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows in the compute dtype
            (float64 for float64 features, float32 otherwise); invalid rows give zeros.
        pooled_h (int): PH.
        pooled_w (int): PW.
        spatial_scale (float): box-to-feature coordinate scale.
        sampling_ratio ((int, int)): samples per bin along y and x; ``<= 0`` for adaptive.

    Returns:
        ndarray[K, C / (PH * PW), PH, PW]: in the input's dtype. Each bin's weighted sum runs in
        float64; NaN and infinite features reach exactly the bins that sample them.
    """
    ct = numpy.dtype(rois.dtype)
    prepare = _prepare(input.shape, (pooled_h, pooled_w), spatial_scale, sampling_ratio, ct)
    return _separable.forward(input, rois, (pooled_h, pooled_w), prepare)


def ps_roi_align_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    deterministic: bool = False,
) -> numpy.ndarray:
    """Gradient of PS RoI Align with respect to its input; deterministic
    (``deterministic`` is accepted for the backend contract).

    Args:
        grad_output (ndarray[K, C / (PH * PW), PH, PW]): gradient of the output, any strides.
        rois (ndarray[K, 5]): as for :func:`ps_roi_align_forward`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)`` of the forward input.
        spatial_scale (float): box-to-feature coordinate scale.
        sampling_ratio ((int, int)): samples per bin along y and x; ``<= 0`` for adaptive.

    Returns:
        ndarray[N, C, H, W]: in grad_output's dtype, summed in float64 and rounded once.
    """
    pooled = tuple(grad_output.shape[2:])
    ct = numpy.dtype(rois.dtype)
    prepare = _prepare(input_shape, pooled, spatial_scale, sampling_ratio, ct)
    return _separable.backward(grad_output, rois, input_shape, prepare)
