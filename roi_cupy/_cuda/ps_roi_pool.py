"""Launchers of the position-sensitive RoI Pool kernels (cuda/ps_roi_pool.cu), for any runtime
(GPU or emulator).

Arguments arrive as ``roi_cupy._backend`` promises: C-contiguous arrays of ``rt.xp``, rois
``[K, 5]`` of the compute dtype, a channel count C that is a multiple of ``PH * PW``.
"""
from __future__ import annotations

import math
from typing import Any

from roi_cupy._cuda import fixed, launch


def forward(
    rt: Any, input: Any, rois: Any, pooled_h: int, pooled_w: int, spatial_scale: float
) -> Any:
    """PS RoI Pool of every RoI.

    Args:
        rt: the runtime (``xp`` and ``function``).
        input (ndarray[N, C, H, W]): features, float16, bfloat16, float32 or float64; C a
            multiple of ``PH * PW``.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` in the compute dtype.
        pooled_h, pooled_w (int): bins per RoI, >= 1.
        spatial_scale (float): box-to-feature coordinate factor.

    Returns:
        ndarray[K, C / (PH * PW), PH, PW] in the input's dtype.
    """
    # An empty plane gives zeros: every window is empty.
    return launch.pooled_forward(
        rt, "ps_roi_pool_forward", input, rois, input.shape[1] // (pooled_h * pooled_w),
        pooled_h, pooled_w, lambda real: (real(spatial_scale),),
    )


def backward(
    rt: Any,
    grad_output: Any,
    rois: Any,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    deterministic: bool = False,
) -> Any:
    """Gradient of :func:`forward` with respect to its input.

    Args:
        rt: the runtime.
        grad_output (ndarray[K, C / (PH * PW), PH, PW]): float16, bfloat16, float32 or float64.
        rois (ndarray[K, 5]): as for :func:`forward`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)``.
        spatial_scale (float): as for :func:`forward`.
        deterministic (bool): sum in fixed point (``roi_cupy._cuda.fixed``), bitwise the same on
            every run, instead of with floating-point atomicAdd. Default: False.

    Returns:
        ndarray[N, C, H, W] in grad_output's dtype.
    """
    n, _, h, w = input_shape
    k, groups, pooled_h, pooled_w = grad_output.shape
    index64 = launch.use_index64(math.prod(input_shape), grad_output.size, rois.size)
    i = launch.index_scalar(index64)
    real = launch.compute_dtype(grad_output.dtype).type

    def launch_with(accumulators: tuple[Any, ...]) -> None:
        grid, block = launch.grid(grad_output.size)
        rt.function(launch.kernel_name("ps_roi_pool_backward", grad_output.dtype, index64))(
            grid,
            block,
            (
                grad_output, rois, *accumulators,
                i(grad_output.size), i(groups), i(h), i(w), i(n), i(pooled_h), i(pooled_w),
                real(spatial_scale),
            ),
        )

    # An input channel belongs to one bin of one output channel: one term per RoI and pixel.
    return fixed.accumulate(
        rt, input_shape, grad_output, deterministic, sources=k, terms=k, launch_with=launch_with
    )
