"""Launchers of the multi-scale RoI Align kernels (cuda/multi_scale_roi_align.cu), for any runtime
(GPU or emulator): every level in one launch.

Arguments arrive as ``roi_cupy._backend`` promises: C-contiguous arrays of ``rt.xp``, rois
``[K, 5]`` of the compute dtype, 2 to 8 levels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy

from roi_cupy._cuda import fixed, launch, roi_align
from roi_cupy._cuda.roi_align import _sampling

# The kernels take this many levels' parameters (MSRA_MAX_LEVELS).
MAX_LEVELS = 8


def _levels(
    arrays: Sequence[Any],
    shapes: Sequence[Sequence[int]],
    scales: Sequence[float],
    bounds: Sequence[float],
    i: type,
    real: type,
) -> list[Any]:
    """The kernels' per-level parameters ``(array, H, W, scale, bound)`` of all eight levels.

    Levels past the last are never picked (the kernel picks level < ``levels``) and repeat the
    first array; bounds past ``len(bounds)`` are never compared.
    """
    if len(arrays) > MAX_LEVELS:
        raise ValueError(f"the kernels take at most {MAX_LEVELS} levels, got {len(arrays)}")
    params: list[Any] = []
    for level in range(MAX_LEVELS):
        bound = real(bounds[level]) if level < len(bounds) else real(0)
        if level < len(arrays):
            h, w = shapes[level][2:]
            params += [arrays[level], i(h), i(w), real(scales[level]), bound]
        else:
            params += [arrays[0], i(0), i(0), real(0), bound]
    return params


def forward(
    rt: Any,
    inputs: Sequence[Any],
    rois: Any,
    pooled_h: int,
    pooled_w: int,
    spatial_scales: Sequence[float],
    sampling_ratio: tuple[int, int],
    aligned: bool,
    canonical_scale: int,
    bounds: Sequence[float],
) -> Any:
    """Multi-scale RoI Align of every RoI, one launch.

    Args:
        rt: the runtime (``xp`` and ``function``).
        inputs (list of ndarray[N, C, H_l, W_l]): the levels' features, one dtype.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` in the compute dtype.
        pooled_h, pooled_w (int): bins per RoI, >= 1.
        spatial_scales (list of float): each level's scale.
        sampling_ratio ((int, int)): samples per bin along y and x; <= 0 for adaptive.
        aligned (bool): shift boxes by -0.5 pixel.
        canonical_scale (int): the level rule's divisor of ``sqrt(area)``.
        bounds (list of float): the least ``q`` beyond each level, rising.

    Returns:
        ndarray[K, C, PH, PW] in the inputs' dtype.
    """
    n, c = inputs[0].shape[:2]
    k = rois.shape[0]
    dtype = inputs[0].dtype
    output = rt.xp.empty((k, c, pooled_h, pooled_w), dtype=dtype)
    if output.size == 0:
        return output
    index64 = launch.use_index64(output.size, rois.size, *(x.size for x in inputs))
    i = launch.index_scalar(index64)
    real = launch.compute_dtype(dtype).type
    grid, block = launch.grid(output.size)
    rt.function(launch.kernel_name("multi_scale_roi_align_forward", dtype, index64))(
        grid,
        block,
        (
            rois, output, i(output.size), i(c), i(n), i(pooled_h), i(pooled_w),
            *_sampling(sampling_ratio), numpy.bool_(aligned), real(canonical_scale),
            numpy.int32(len(inputs)), numpy.int32(len(bounds)),
            *_levels(inputs, [x.shape for x in inputs], spatial_scales, bounds, i, real),
        ),
    )
    return output


def backward(
    rt: Any,
    grad_output: Any,
    rois: Any,
    input_shapes: Sequence[tuple[int, int, int, int]],
    spatial_scales: Sequence[float],
    sampling_ratio: tuple[int, int],
    aligned: bool,
    canonical_scale: int,
    bounds: Sequence[float],
    deterministic: bool = False,
) -> list[Any]:
    """Gradient of :func:`forward` with respect to each level, one launch.

    Args:
        rt: the runtime.
        grad_output (ndarray[K, C, PH, PW]): float16, bfloat16, float32 or float64.
        rois (ndarray[K, 5]): as for :func:`forward`.
        input_shapes (list of (int, int, int, int)): each level's ``(N, C, H_l, W_l)``.
        spatial_scales, sampling_ratio, aligned, canonical_scale, bounds: as for :func:`forward`.
        deterministic (bool): sum in fixed point (``roi_cupy._cuda.fixed``), bitwise the same on
            every run, instead of with floating-point atomicAdd. Default: False.

    Returns:
        list of ndarray[N, C, H_l, W_l] in grad_output's dtype: views into one array holding
        every level.
    """
    n, c = input_shapes[0][:2]
    k, _, pooled_h, pooled_w = grad_output.shape
    real = launch.compute_dtype(grad_output.dtype).type
    sizes = [math.prod(shape) for shape in input_shapes]
    offsets = [sum(sizes[:level]) for level in range(len(sizes))]
    total = sum(sizes)
    index64 = launch.use_index64(total, grad_output.size, rois.size)
    i = launch.index_scalar(index64)

    def launch_with(accumulators: tuple[Any, ...]) -> None:
        grid, block = launch.grid(grad_output.size)
        name = launch.kernel_name("multi_scale_roi_align_backward", grad_output.dtype, index64)
        rt.function(name)(
            grid,
            block,
            (
                grad_output, rois, *accumulators, i(grad_output.size), i(c), i(n), i(pooled_h),
                i(pooled_w), *_sampling(sampling_ratio), numpy.bool_(aligned),
                real(canonical_scale), numpy.int32(len(input_shapes)), numpy.int32(len(bounds)),
                *_levels([i(o) for o in offsets], input_shapes, spatial_scales, bounds, i, real),
            ),
        )

    # Every level's gradient back to back, in one accumulator.
    bins = k * pooled_h * pooled_w
    flat = fixed.accumulate(
        rt, (total,), grad_output, deterministic, sources=bins,
        terms=bins * roi_align.terms_per_bin(sampling_ratio), launch_with=launch_with,
    )
    return [
        flat[offset : offset + size].reshape(shape)
        for offset, size, shape in zip(offsets, sizes, input_shapes)
    ]
