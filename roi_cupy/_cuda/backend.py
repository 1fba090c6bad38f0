"""The CUDA backend: the four functions of ``roi_cupy._backend`` for CuPy arrays.

``roi_cupy.ops`` has made the input's device current; kernels launch on its current stream and
nothing here synchronises with the host.
"""
from __future__ import annotations

import functools
from typing import Any

from roi_cupy._backend import Capabilities
from roi_cupy._cuda import launch, roi_align, roi_check, roi_pool
from roi_cupy._cuda import roi_align_rotated

# C-contiguous arrays in; RoI Pool's indices checked by first_invalid's kernel.
CAPABILITIES = Capabilities()


@functools.cache
def _runtime_of(device_id: int) -> launch.CupyRuntime:
    return launch.CupyRuntime(device_id)


def _runtime(array: Any) -> launch.CupyRuntime:
    return _runtime_of(array.device.id)


def roi_align_forward(
    input: Any,
    rois: Any,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Any:
    """RoI Align: ``input`` [N, C, H, W], ``rois`` [K, 5] -> output [K, C, PH, PW]."""
    return roi_align.forward(
        _runtime(input), input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
    )


def roi_align_backward(
    grad_output: Any,
    rois: Any,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Any:
    """Input gradient of RoI Align: ``grad_output`` [K, C, PH, PW] -> [N, C, H, W]."""
    return roi_align.backward(
        _runtime(grad_output), grad_output, rois, input_shape, spatial_scale, sampling_ratio,
        aligned,
    )


def roi_pool_forward(
    input: Any, rois: Any, pooled_h: int, pooled_w: int, spatial_scale: float, indices: bool = True
) -> tuple[Any, Any]:
    """RoI Pool: ``input`` [N, C, H, W], ``rois`` [K, 5] -> (output, argmax) [K, C, PH, PW].

    The kernel writes the argmax whether or not ``indices`` asks for it.
    """
    return roi_pool.forward(_runtime(input), input, rois, pooled_h, pooled_w, spatial_scale)


def roi_pool_backward(
    grad_output: Any, rois: Any, argmax: Any, input_shape: tuple[int, int, int, int]
) -> Any:
    """Input gradient of RoI Pool: ``grad_output`` [K, C, PH, PW] -> [N, C, H, W]."""
    return roi_pool.backward(_runtime(grad_output), grad_output, rois, argmax, input_shape)


def first_invalid(
    rois: Any, batch: int, limit: float = float("inf"), indices: Any = None, plane: int = 0
) -> tuple[int, int]:
    """The first invalid RoI of ``rois [K, 5]`` (a value of magnitude above ``limit`` is invalid
    too) and the first of ``indices`` outside ``[-1, plane)``, -1 for none: one or two small
    kernels and one synchronisation."""
    return roi_check.first_invalid(_runtime(rois), rois, batch, limit, indices, plane)


def roi_align_rotated_forward(
    input: Any,
    rois: Any,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    clockwise: bool,
) -> Any:
    """RoI Align Rotated: ``input`` [N, C, H, W], ``rois`` [K, 6] -> output [K, C, PH, PW]."""
    return roi_align_rotated.forward(
        _runtime(input), input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned,
        clockwise,
    )


def roi_align_rotated_backward(
    grad_output: Any,
    rois: Any,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    clockwise: bool,
) -> Any:
    """Input gradient of RoI Align Rotated: ``grad_output`` [K, C, PH, PW] -> [N, C, H, W]."""
    return roi_align_rotated.backward(
        _runtime(grad_output), grad_output, rois, input_shape, spatial_scale, sampling_ratio,
        aligned, clockwise,
    )
