"""Launchers of the RoI Pool kernels (cuda/roi_pool.cu), for any runtime (GPU or emulator).

Arguments arrive as ``roi_cupy._backend`` promises: C-contiguous arrays of ``rt.xp`` (or, for
the forward's features, channels-last ones), rois ``[K, 5]`` of the compute dtype, argmax int64.
"""
from __future__ import annotations

import math
from typing import Any

import numpy

from roi_cupy import _interop
from roi_cupy._cuda import fixed, launch


def forward(
    rt: Any,
    input: Any,
    rois: Any,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    indices: bool = True,
) -> tuple[Any, Any]:
    """RoI Pool of every RoI.

    Args:
        rt: the runtime (``xp`` and ``function``).
        input (ndarray[N, C, H, W]): features, float16, bfloat16, float32 or float64;
            C-contiguous, or channels-last (a transposed view of a C-contiguous
            ``[N, H, W, C]``), which the kernel reads as it is.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` in the compute dtype.
        pooled_h, pooled_w (int): bins per RoI, >= 1.
        spatial_scale (float): box-to-feature coordinate factor.
        indices (bool): also compute the argmax; without it the kernel writes the output only
            (no int64 array of the output's size is allocated or written). Default: True.

    Returns:
        (ndarray[K, C, PH, PW] in the input's dtype, int64 argmax ndarray[K, C, PH, PW] or None
        without ``indices``).
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    output = rt.xp.empty((k, c, pooled_h, pooled_w), dtype=input.dtype)
    argmax = rt.xp.empty((k, c, pooled_h, pooled_w), dtype=numpy.int64) if indices else None
    if output.size == 0:
        return output, argmax
    if input.size == 0:  # every bin is empty
        output[...] = 0
        if indices:
            argmax[...] = -1
        return output, argmax
    index64 = launch.use_index64(input.size, output.size, rois.size)
    i = launch.index_scalar(index64)
    real = launch.compute_dtype(input.dtype).type
    last = _interop.is_channels_last(input)
    grid, block = launch.grid(output.size)
    rt.function(launch.kernel_name("roi_pool_forward", input.dtype, index64))(
        grid,
        block,
        (
            input.transpose(0, 2, 3, 1) if last else input, rois, output, argmax,
            i(output.size), i(c), i(h), i(w), i(n), i(pooled_h), i(pooled_w),
            real(spatial_scale), numpy.bool_(last),
        ),
    )
    return output, argmax


def backward(
    rt: Any,
    grad_output: Any,
    rois: Any,
    argmax: Any,
    input_shape: tuple[int, int, int, int],
    deterministic: bool = False,
) -> Any:
    """Gradient of :func:`forward` with respect to its input.

    Args:
        rt: the runtime.
        grad_output (ndarray[K, C, PH, PW]): float16, bfloat16, float32 or float64.
        rois (ndarray[K, 5]): as for :func:`forward`.
        argmax (ndarray[K, C, PH, PW]): int64 flat indices into the H x W plane; values outside
            ``[0, H * W)`` are skipped.
        input_shape ((int, int, int, int)): ``(N, C, H, W)``.
        deterministic (bool): sum in fixed point (``roi_cupy._cuda.fixed``), bitwise the same on
            every run, instead of with floating-point atomicAdd. Default: False.

    Returns:
        ndarray[N, C, H, W] in grad_output's dtype.
    """
    n, c, h, w = input_shape
    k, _, pooled_h, pooled_w = grad_output.shape
    index64 = launch.use_index64(math.prod(input_shape), grad_output.size, rois.size)
    i = launch.index_scalar(index64)

    def launch_with(accumulators: tuple[Any, ...]) -> None:
        name, sums = fixed.twin("roi_pool_backward", accumulators)
        grid, block = launch.grid(grad_output.size)
        rt.function(launch.kernel_name(name, grad_output.dtype, index64))(
            grid,
            block,
            (
                grad_output, rois, argmax, *sums,
                i(grad_output.size), i(c), i(h), i(w), i(n), i(pooled_h), i(pooled_w),
            ),
        )

    # A gradient element takes at most one term from each of the K * PH * PW bins of its channel.
    bins = k * pooled_h * pooled_w
    return fixed.accumulate(
        rt, input_shape, grad_output, deterministic, sources=bins, terms=bins,
        launch_with=launch_with,
    )
