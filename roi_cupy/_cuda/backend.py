"""The CUDA backend: the four functions of ``roi_cupy._backend`` for CuPy arrays.

``roi_cupy.ops`` has made the input's device current; kernels launch on its current stream and
nothing here synchronises with the host.
"""
from __future__ import annotations

import functools
from typing import Any

from roi_cupy._backend import Capabilities
from roi_cupy._cuda import launch, roi_align, roi_check, roi_pool
from roi_cupy._cuda import ps_roi_align, ps_roi_pool, roi_align_rotated
from roi_cupy._cuda import multi_scale_roi_align as _multi_scale_roi_align

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
    sampling_ratio: tuple[int, int],
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
    sampling_ratio: tuple[int, int],
    aligned: bool,
    deterministic: bool = False,
) -> Any:
    """Input gradient of RoI Align: ``grad_output`` [K, C, PH, PW] -> [N, C, H, W]; summed in
    fixed point, bitwise the same on every run, with ``deterministic``."""
    return roi_align.backward(
        _runtime(grad_output), grad_output, rois, input_shape, spatial_scale, sampling_ratio,
        aligned, deterministic,
    )


def roi_align_max_forward(
    input: Any,
    rois: Any,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
) -> Any:
    """RoI Align in max mode: ``input`` [N, C, H, W], ``rois`` [K, 5] -> [K, C, PH, PW]."""
    return roi_align.max_forward(
        _runtime(input), input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
    )


def roi_align_max_backward(
    grad_output: Any,
    input: Any,
    rois: Any,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    deterministic: bool = False,
) -> Any:
    """Input gradient of RoI Align in max mode: ``grad_output`` [K, C, PH, PW] and the forward's
    ``input`` [N, C, H, W] -> [N, C, H, W]; summed in fixed point with ``deterministic``."""
    return roi_align.max_backward(
        _runtime(grad_output), grad_output, input, rois, input_shape, spatial_scale, sampling_ratio,
        aligned, deterministic,
    )


def roi_pool_forward(
    input: Any, rois: Any, pooled_h: int, pooled_w: int, spatial_scale: float, indices: bool = True
) -> tuple[Any, Any]:
    """RoI Pool: ``input`` [N, C, H, W], ``rois`` [K, 5] -> (output, argmax) [K, C, PH, PW].

    ``argmax`` is None without ``indices``: the kernel then writes the output only.
    """
    return roi_pool.forward(
        _runtime(input), input, rois, pooled_h, pooled_w, spatial_scale, indices
    )


def roi_pool_backward(
    grad_output: Any,
    rois: Any,
    argmax: Any,
    input_shape: tuple[int, int, int, int],
    deterministic: bool = False,
) -> Any:
    """Input gradient of RoI Pool: ``grad_output`` [K, C, PH, PW] -> [N, C, H, W]; summed in
    fixed point, bitwise the same on every run, with ``deterministic``."""
    return roi_pool.backward(
        _runtime(grad_output), grad_output, rois, argmax, input_shape, deterministic
    )


def first_invalid(
    rois: Any, batch: int, limit: float = float("inf"), indices: Any = None, plane: int = 0
) -> tuple[int, int]:
    """The first invalid RoI of ``rois [K, 5]`` (a value of magnitude above ``limit`` is invalid
    too) and the first of ``indices`` outside ``[-1, plane)``, -1 for none: one or two small
    kernels and one synchronisation."""
    return roi_check.first_invalid(_runtime(rois), rois, batch, limit, indices, plane)


# ----------------------------------------------------------------------------- position-sensitive
def ps_roi_align_forward(
    input: Any,
    rois: Any,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
) -> Any:
    """PS RoI Align: ``input`` [N, C, H, W], ``rois`` [K, 5] -> [K, C / (PH * PW), PH, PW]."""
    return ps_roi_align.forward(
        _runtime(input), input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio
    )


def ps_roi_align_backward(
    grad_output: Any,
    rois: Any,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
) -> Any:
    """Input gradient of PS RoI Align: ``grad_output`` [K, C / (PH * PW), PH, PW] ->
    [N, C, H, W]."""
    return ps_roi_align.backward(
        _runtime(grad_output), grad_output, rois, input_shape, spatial_scale, sampling_ratio
    )


def ps_roi_pool_forward(
    input: Any, rois: Any, pooled_h: int, pooled_w: int, spatial_scale: float
) -> Any:
    """PS RoI Pool: ``input`` [N, C, H, W], ``rois`` [K, 5] -> [K, C / (PH * PW), PH, PW]."""
    return ps_roi_pool.forward(_runtime(input), input, rois, pooled_h, pooled_w, spatial_scale)


def ps_roi_pool_backward(
    grad_output: Any, rois: Any, input_shape: tuple[int, int, int, int], spatial_scale: float
) -> Any:
    """Input gradient of PS RoI Pool: ``grad_output`` [K, C / (PH * PW), PH, PW] ->
    [N, C, H, W]."""
    return ps_roi_pool.backward(
        _runtime(grad_output), grad_output, rois, input_shape, spatial_scale
    )


def multi_scale_roi_align_forward(
    inputs: list[Any],
    rois: Any,
    pooled_h: int,
    pooled_w: int,
    spatial_scales: list[float],
    sampling_ratio: tuple[int, int],
    aligned: bool,
    canonical_scale: int,
    bounds: tuple[float, ...],
) -> Any:
    """RoI Align of each RoI on its level: ``inputs`` [N, C, H_l, W_l] -> [K, C, PH, PW], one
    launch."""
    return _multi_scale_roi_align.forward(
        _runtime(inputs[0]), inputs, rois, pooled_h, pooled_w, spatial_scales, sampling_ratio,
        aligned, canonical_scale, bounds,
    )


def multi_scale_roi_align_backward(
    grad_output: Any,
    rois: Any,
    input_shapes: list[tuple[int, int, int, int]],
    spatial_scales: list[float],
    sampling_ratio: tuple[int, int],
    aligned: bool,
    canonical_scale: int,
    bounds: tuple[float, ...],
) -> list[Any]:
    """Input gradients of multi-scale RoI Align: ``grad_output`` [K, C, PH, PW] -> one
    [N, C, H_l, W_l] per level, one launch."""
    return _multi_scale_roi_align.backward(
        _runtime(grad_output), grad_output, rois, input_shapes, spatial_scales, sampling_ratio,
        aligned, canonical_scale, bounds,
    )


# ----------------------------------------------------------------------------- RoI Align Rotated
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
