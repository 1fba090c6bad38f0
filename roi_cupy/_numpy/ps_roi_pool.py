"""Position-sensitive RoI Pool on NumPy arrays.

A bin's window is a product of a range of rows and a range of columns, so each bin is a sum over
the pairs of its rows and columns divided by its area (:mod:`roi_cupy._numpy._separable`, every
row and column weighing 1). Windows follow docs/semantics.md: corners rounded half away from
zero, the end pixel exclusive, edges clipped to ``[0, H - 1]`` and ``[0, W - 1]``.
"""
from __future__ import annotations

import numpy

from roi_cupy._numpy import _separable
from roi_cupy._numpy.roi_pool import _round


def _windows(rois, h: int, w: int, pooled, spatial_scale: float, ct):
    """Clipped window edges ``(hs, he [G, PH], ws, we [G, PW])`` (int64) of valid rows."""
    pooled_h, pooled_w = pooled
    r = rois.astype(ct)
    scale = ct.type(spatial_scale)
    with numpy.errstate(all="ignore"):
        xs, ys, xe, ye = (_round(r[:, i] * scale).astype(numpy.float64) for i in (1, 2, 3, 4))
        bw = numpy.maximum(xe - xs, 1).astype(ct) / ct.type(pooled_w)  # the end pixel is out
        bh = numpy.maximum(ye - ys, 1).astype(ct) / ct.type(pooled_h)

    def edges(pooled, size, start, bin_size):
        p = numpy.arange(pooled, dtype=ct)
        with numpy.errstate(all="ignore"):
            lo = numpy.floor(p * bin_size[:, None]).astype(numpy.float64) + start[:, None]
            hi = numpy.ceil((p + 1) * bin_size[:, None]).astype(numpy.float64) + start[:, None]
        # Clipped to [0, size - 1]; fmax/fmin drop a NaN (0 * inf for a box that overflows),
        # which lands on 0 as in the kernels' clamp.
        return tuple(numpy.fmin(numpy.fmax(e, 0), size - 1).astype(numpy.int64) for e in (lo, hi))

    return (*edges(pooled_h, h, ys, bh), *edges(pooled_w, w, xs, bw))


def _prepare(shape, pooled, spatial_scale, ct):
    """What the bins of a block of valid RoIs read (see :data:`_separable.Prepare`)."""
    _, _, h, w = shape

    def prepare(rois: numpy.ndarray):
        hs, he, ws, we = _windows(rois, h, w, pooled, spatial_scale, ct)
        area = numpy.maximum(he - hs, 0)[:, :, None] * numpy.maximum(we - ws, 0)[:, None, :]
        divisor = numpy.where(area > 0, area, 1).astype(numpy.float64)
        y, x = _separable.Axis.of_ranges(hs, he), _separable.Axis.of_ranges(ws, we)
        return y, x, divisor.reshape(rois.shape[0], -1)

    return prepare


def ps_roi_pool_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
) -> numpy.ndarray:
    """PS RoI Pool forward.

    Args:
        input (ndarray[N, C, H, W]): features (float16, bfloat16, float32 or float64), any
            strides; C a multiple of ``PH * PW``.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows in the compute dtype;
            invalid rows give zeros.
        pooled_h (int): PH.
        pooled_w (int): PW.
        spatial_scale (float): box-to-feature coordinate scale.

    Returns:
        ndarray[K, C / (PH * PW), PH, PW]: each window's mean (summed in float64), 0 for an
        empty window, in the input's dtype.
    """
    prepare = _prepare(input.shape, (pooled_h, pooled_w), spatial_scale, numpy.dtype(rois.dtype))
    return _separable.forward(input, rois, (pooled_h, pooled_w), prepare)


def ps_roi_pool_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    deterministic: bool = False,
) -> numpy.ndarray:
    """Gradient of PS RoI Pool with respect to its input; deterministic
    (``deterministic`` is accepted for the backend contract).

    Args:
        grad_output (ndarray[K, C / (PH * PW), PH, PW]): gradient of the output, any strides.
        rois (ndarray[K, 5]): as for :func:`ps_roi_pool_forward`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)`` of the forward input.
        spatial_scale (float): box-to-feature coordinate scale.

    Returns:
        ndarray[N, C, H, W]: in grad_output's dtype; each pixel of a bin's window receives the
        bin's gradient divided by the window's area.
    """
    pooled = tuple(grad_output.shape[2:])
    prepare = _prepare(input_shape, pooled, spatial_scale, numpy.dtype(rois.dtype))
    return _separable.backward(grad_output, rois, input_shape, prepare)
