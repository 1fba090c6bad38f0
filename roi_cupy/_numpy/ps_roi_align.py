"""Position-sensitive RoI Align on NumPy arrays.

Each bin is RoI Align's (``aligned=True``) on its own channel, and separable like it: along each
axis a bin reads the bilinear corners of its samples, each corner weighing its samples' weights
added up (in float64) and divided by the samples per axis. RoI Align's sampling of an axis
(:class:`roi_cupy._numpy.roi_align._Axis`: the sample positions, the range test and the weights
in the kernels' order of operations) gives the corners; :mod:`roi_cupy._numpy._separable` pairs
rows with columns and gathers each bin's channel.
"""
from __future__ import annotations

import numpy

from roi_cupy._numpy import _separable
from roi_cupy._numpy.roi_align import _axes

# Boxes on the feature map start half a pixel up and left, as RoI Align's with aligned=True.
_ALIGNED = True
# Most samples expanded at once along one axis (each holds a few dozen bytes of temporaries).
_SAMPLES = 1 << 15


def _entries(axis, pooled: int, size: int) -> _separable.Entries:
    """The corners each bin of ``axis``'s RoIs reads along it, and their weights; the samples are
    expanded for a run of RoIs at a time (at most ``_SAMPLES`` samples, or one RoI)."""
    ct = axis.ct
    g = axis.n.shape[0]
    per_roi = numpy.cumsum(axis.n.sum(axis=1))
    parts, i = [], 0
    while i < g:
        done = int(per_roi[i - 1]) if i else 0
        j = max(i + 1, int(numpy.searchsorted(per_roi, done + _SAMPLES, side="right")))
        rois = numpy.arange(i, j)
        bins, low, high, frac = axis.taps(rois)
        factor = numpy.tile(axis.factor[rois][bins // pooled], 2)
        weight = numpy.concatenate([ct.type(1) - frac, frac]).astype(numpy.float64) * factor
        pixel = numpy.concatenate([low, high])
        parts.append(_separable.merge(numpy.tile(bins + i * pooled, 2), pixel, weight, size))
        i = j
    bins, pixel, weight = (numpy.concatenate(a) for a in zip(*parts))
    return _separable.Entries.of_sorted(bins, pixel, weight, g * pooled)


def _prepare(shape, pooled, spatial_scale, sampling_ratio, ct):
    """What the bins of a block of valid RoIs read (see :data:`_separable.Prepare`)."""
    _, _, h, w = shape
    pooled_h, pooled_w = pooled

    def prepare(rois: numpy.ndarray):
        ay, ax = _axes(
            rois.astype(ct), shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, _ALIGNED,
            ct,
        )
        divisor = numpy.ones(rois.shape[0] * pooled_h * pooled_w)
        return _entries(ay, pooled_h, h), _entries(ax, pooled_w, w), divisor

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
