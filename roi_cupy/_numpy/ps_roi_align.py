"""Position-sensitive RoI Align on NumPy arrays.

Each bin is RoI Align's (``aligned=True``) on its own channel, and separable like it: along each
axis a bin reads the bilinear corners of its samples, each corner weighing its samples' weights
added up (in float64) and divided by the samples per axis. The sampling of an axis is RoI
Align's (:class:`roi_cupy._numpy.roi_align._Axis`: the sample positions, the range test and the
weights in the kernels' order of operations); :mod:`roi_cupy._numpy._separable` pairs rows with
columns and gathers each bin's channel.
"""
from __future__ import annotations

import numpy

from roi_cupy._numpy import _separable
from roi_cupy._numpy.roi_align import _Axis, _geometry

# Boxes on the feature map start half a pixel up and left, as RoI Align's with aligned=True.
_ALIGNED = True

# Most samples expanded at once along one axis (each holds a few dozen bytes of temporaries).
_SAMPLES = 1 << 13


def _entries(axis: _Axis) -> _separable.Axis:
    """The corners each bin of ``axis``'s RoIs reads and their weights: a corner's samples'
    weights added up (float64, low corners first, in sample order) and divided by the samples
    per axis; a corner read at weight exactly 0 is flagged. The samples are expanded for a run
    of RoIs at a time (at most ``_SAMPLES`` samples and closed-form entries, or one RoI); bins
    with many samples per pixel take RoI Align's closed form (:meth:`_Axis.closed_entries`)."""
    ct, size = axis.ct, axis.size
    g, pooled = axis.n.shape
    per_roi = numpy.cumsum(axis.n.sum(axis=1) + axis.span.sum(axis=1))
    parts, i = [], 0
    while i < g:
        done = int(per_roi[i - 1]) if i else 0
        j = max(i + 1, int(numpy.searchsorted(per_roi, done + _SAMPLES, side="right")))
        rois = numpy.arange(i, j)
        kp, low, high, frac = axis.taps(rois)
        factor = axis.factor[rois][kp // pooled]
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
        # Bins with many samples per pixel come in closed form, one entry per pixel; a bin's
        # entries all come from one side, so a stable sort by bin keeps each bin's order.
        kp, pixel, weight, zero = axis.closed_entries(rois)
        if kp.size:
            merged = [numpy.concatenate(a) for a in zip(parts[-1], (kp + i * pooled, pixel,
                                                                    weight, zero))]
            order = numpy.argsort(merged[0], kind="stable")
            parts[-1] = tuple(a[order] for a in merged)
        i = j
    bins, pixel, weight, zero = (numpy.concatenate(a) for a in zip(*parts))
    return _separable.Axis.of_sorted(bins, pixel, weight, zero, (g, pooled))


def _prepare(shape, pooled, spatial_scale, sampling_ratio, ct):
    """What the bins of a block of valid RoIs read (see :data:`_separable.Prepare`)."""
    _, _, h, w = shape
    pooled_h, pooled_w = pooled

    def prepare(rois: numpy.ndarray):
        y0, bh, gh, x0, bw, gw = _geometry(
            rois.astype(ct), pooled_h, pooled_w, spatial_scale, sampling_ratio, _ALIGNED, ct
        )
        ay = _Axis(y0, bh, gh, pooled_h, h, ct)
        ax = _Axis(x0, bw, gw, pooled_w, w, ct)
        return _entries(ay), _entries(ax), None

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
