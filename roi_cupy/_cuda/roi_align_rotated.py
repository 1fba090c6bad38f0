"""Launchers of the RoI Align Rotated kernels (cuda/roi_align_rotated.cu), for any runtime (GPU or
emulator).

Arguments arrive as ``roi_cupy._backend`` promises: C-contiguous arrays of ``rt.xp``, rois
``[K, 6]`` of the compute dtype.
"""
from __future__ import annotations

import math
from typing import Any

import numpy

from roi_cupy._cuda import fixed, launch, roi_align
from roi_cupy._cuda.roi_align import _sampling

# Adaptive samples near a pixel along one axis of a turned bin: they are at least half a pixel
# apart along the box's axes, and a 2 x 2 square holds fewer than 7 x 7 points of such a lattice
# whatever its angle.
_ADAPTIVE_NEAR = 7


def forward(
    rt: Any,
    input: Any,
    rois: Any,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    clockwise: bool,
) -> Any:
    """RoI Align Rotated of every RoI.

    Args:
        rt: the runtime (``xp`` and ``function``).
        input (ndarray[N, C, H, W]): features, float16, bfloat16, float32 or float64.
        rois (ndarray[K, 6]): ``(batch_index, cx, cy, w, h, angle)`` in the compute dtype, the
            angle in degrees.
        pooled_h, pooled_w (int): bins per RoI, >= 1.
        spatial_scale (float): box-to-feature coordinate factor.
        sampling_ratio ((int, int)): samples per bin along the box's height and width; <= 0
            for adaptive.
        aligned (bool): shift the centre by -0.5 pixel (else sizes are at least 1).
        clockwise (bool): the angle turns clockwise.

    Returns:
        ndarray[K, C, PH, PW] in the input's dtype.
    """
    return launch.pooled_forward(
        rt, "roi_align_rotated_forward", input, rois, input.shape[1], pooled_h, pooled_w,
        lambda real: (
            real(spatial_scale), *_sampling(sampling_ratio), numpy.bool_(aligned),
            numpy.bool_(clockwise),
        ),
    )


def backward(
    rt: Any,
    grad_output: Any,
    rois: Any,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    clockwise: bool,
    deterministic: bool = False,
) -> Any:
    """Gradient of :func:`forward` with respect to its input.

    Args:
        rt: the runtime.
        grad_output (ndarray[K, C, PH, PW]): float16, bfloat16, float32 or float64.
        rois (ndarray[K, 6]): as for :func:`forward`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)``.
        spatial_scale, sampling_ratio, aligned, clockwise: as for :func:`forward`.
        deterministic (bool): sum in fixed point (``roi_cupy._cuda.fixed``), bitwise the same on
            every run, instead of with floating-point atomicAdd. Default: False.

    Returns:
        ndarray[N, C, H, W] in grad_output's dtype.
    """
    n, c, h, w = input_shape
    k, _, pooled_h, pooled_w = grad_output.shape
    index64 = launch.use_index64(math.prod(input_shape), grad_output.size, rois.size)
    i = launch.index_scalar(index64)
    real = launch.compute_dtype(grad_output.dtype).type

    def launch_with(accumulators: tuple[Any, ...]) -> None:
        grid, block = launch.grid(grad_output.size)
        name = launch.kernel_name("roi_align_rotated_backward", grad_output.dtype, index64)
        rt.function(name)(
            grid,
            block,
            (
                grad_output, rois, *accumulators,
                i(grad_output.size), i(c), i(h), i(w), i(n), i(pooled_h), i(pooled_w),
                real(spatial_scale), *_sampling(sampling_ratio), numpy.bool_(aligned),
                numpy.bool_(clockwise),
            ),
        )

    bins = k * pooled_h * pooled_w
    return fixed.accumulate(
        rt, input_shape, grad_output, deterministic, sources=bins,
        terms=bins * roi_align.terms_per_bin(sampling_ratio, adaptive=_ADAPTIVE_NEAR),
        launch_with=launch_with,
    )
