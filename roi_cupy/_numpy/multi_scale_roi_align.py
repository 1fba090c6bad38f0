"""Multi-scale RoI Align on NumPy arrays: each level's RoIs through the NumPy RoI Align.

The levels are found for all RoIs at once; then RoI Align runs once per level on the RoIs of
that level (a level without RoIs costs nothing) and the crops land in box order. Each level's
numbers are therefore those of :func:`roi_align_forward` called with that level's RoIs, bit for
bit.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy

from roi_cupy._numpy.roi_align import roi_align_backward, roi_align_forward


def levels_of(
    rois: numpy.ndarray, canonical_scale: int, bounds: Sequence[float], levels: int
) -> numpy.ndarray:
    """The level of each RoI, -1 for none (see ``roi_cupy._backend``).

    Args:
        rois (ndarray[K, 5]): in the compute dtype, which the level is computed in.
        canonical_scale (int): divides the square root of a box's area.
        bounds (sequence of float): the least ``q`` beyond each level, rising.
        levels (int): the number of maps.

    Returns:
        ndarray[K] int64: the number of bounds ``q = sqrt(area) / canonical_scale`` reaches, or
        -1 where ``q`` is NaN or reaches ``levels`` of them.
    """
    ct = rois.dtype.type
    with numpy.errstate(invalid="ignore", over="ignore"):  # a negative area's root is NaN
        area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        q = numpy.sqrt(area) / ct(canonical_scale)
    level = (q[:, None] >= numpy.asarray(bounds, dtype=rois.dtype)[None, :]).sum(axis=1)
    return numpy.where(numpy.isnan(q) | (level >= levels), -1, level)


def multi_scale_roi_align_forward(
    inputs: Sequence[numpy.ndarray],
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scales: Sequence[float],
    sampling_ratio: tuple[int, int],
    aligned: bool,
    canonical_scale: int,
    bounds: Sequence[float],
) -> numpy.ndarray:
    """Multi-scale RoI Align forward.

    Args:
        inputs (list of ndarray[N, C, H_l, W_l]): the levels' features, one dtype, any strides.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows in the compute dtype;
            invalid rows give zeros.
        pooled_h, pooled_w (int): PH, PW.
        spatial_scales (list of float): each level's scale.
        sampling_ratio ((int, int)): samples per bin along y and x; ``<= 0`` for adaptive.
        aligned (bool): as for RoI Align.
        canonical_scale (int): the level rule's divisor of ``sqrt(area)``.
        bounds (list of float): the least ``q`` beyond each level (see :func:`levels_of`).

    Returns:
        ndarray[K, C, PH, PW]: in the inputs' dtype; zeros for a RoI without a level.
    """
    n, c = inputs[0].shape[:2]
    out = numpy.zeros((rois.shape[0], c, pooled_h, pooled_w), dtype=inputs[0].dtype)
    if out.size == 0:
        return out
    level = levels_of(rois, canonical_scale, bounds, len(inputs))
    for index, (input, scale) in enumerate(zip(inputs, spatial_scales)):
        chosen = numpy.flatnonzero(level == index)
        if chosen.size:
            out[chosen] = roi_align_forward(
                input, rois[chosen], pooled_h, pooled_w, scale, sampling_ratio, aligned
            )
    return out


def multi_scale_roi_align_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shapes: Sequence[tuple[int, int, int, int]],
    spatial_scales: Sequence[float],
    sampling_ratio: tuple[int, int],
    aligned: bool,
    canonical_scale: int,
    bounds: Sequence[float],
    deterministic: bool = False,
) -> list[numpy.ndarray]:
    """Gradient of :func:`multi_scale_roi_align_forward` with respect to each level;
    deterministic (``deterministic`` is accepted for the backend contract).

    Args:
        grad_output (ndarray[K, C, PH, PW]): gradient of the output, any strides.
        rois (ndarray[K, 5]): as for :func:`multi_scale_roi_align_forward`.
        input_shapes (list of (int, int, int, int)): each level's ``(N, C, H_l, W_l)``.
        spatial_scales, sampling_ratio, aligned, canonical_scale, bounds: as for the forward.

    Returns:
        list of ndarray[N, C, H_l, W_l]: in grad_output's dtype, each level's RoI Align
        backward of its RoIs (zeros for a level without RoIs).
    """
    level = levels_of(rois, canonical_scale, bounds, len(input_shapes))
    grads = []
    for index, (shape, scale) in enumerate(zip(input_shapes, spatial_scales)):
        chosen = numpy.flatnonzero(level == index)
        if chosen.size:
            grads.append(roi_align_backward(
                grad_output[chosen], rois[chosen], shape, scale, sampling_ratio, aligned
            ))
        else:
            grads.append(numpy.zeros(shape, dtype=grad_output.dtype))
    return grads
