"""The emulator backend: the four functions of ``roi_cupy._backend`` on NumPy arrays, computed by
the CUDA kernels compiled for the CPU and driven by the same launch code as on a GPU."""
from __future__ import annotations

import numpy

import roi_cupy._emulator as emulator
from roi_cupy._backend import Capabilities
from roi_cupy._cuda import roi_align, roi_check, roi_pool
from roi_cupy._cuda import roi_align_rotated

# C-contiguous arrays in; RoI Pool's indices checked by first_invalid's kernel.
CAPABILITIES = Capabilities()


def roi_align_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> numpy.ndarray:
    """RoI Align of ``input [N, C, H, W]`` over ``rois [K, 5]``; returns ``[K, C, PH, PW]``."""
    return roi_align.forward(
        emulator.runtime(), input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
    )


def roi_align_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> numpy.ndarray:
    """Input gradient of RoI Align for ``grad_output [K, C, PH, PW]``; returns ``[N, C, H, W]``."""
    return roi_align.backward(
        emulator.runtime(), grad_output, rois, input_shape, spatial_scale, sampling_ratio, aligned
    )


def roi_pool_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    indices: bool = True,
) -> tuple[numpy.ndarray, numpy.ndarray]:
    """RoI Pool of ``input [N, C, H, W]`` over ``rois [K, 5]``.

    Returns:
        (output [K, C, PH, PW], argmax int64 [K, C, PH, PW]): the kernel writes the argmax
        whether or not ``indices`` asks for it.
    """
    return roi_pool.forward(emulator.runtime(), input, rois, pooled_h, pooled_w, spatial_scale)


def roi_pool_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    argmax: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
) -> numpy.ndarray:
    """Input gradient of RoI Pool for ``grad_output [K, C, PH, PW]``; returns ``[N, C, H, W]``."""
    return roi_pool.backward(emulator.runtime(), grad_output, rois, argmax, input_shape)


def first_invalid(
    rois: numpy.ndarray,
    batch: int,
    limit: float = numpy.inf,
    indices: numpy.ndarray | None = None,
    plane: int = 0,
) -> tuple[int, int]:
    """The first invalid RoI of ``rois [K, 5]`` (a value of magnitude above ``limit`` is invalid
    too) and the first of ``indices`` outside ``[-1, plane)``; -1 for none."""
    return roi_check.first_invalid(emulator.runtime(), rois, batch, limit, indices, plane)


def roi_align_rotated_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    clockwise: bool,
) -> numpy.ndarray:
    """RoI Align Rotated of ``input [N, C, H, W]`` over ``rois [K, 6]``; returns
    ``[K, C, PH, PW]``."""
    return roi_align_rotated.forward(
        emulator.runtime(), input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio,
        aligned, clockwise,
    )


def roi_align_rotated_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    clockwise: bool,
) -> numpy.ndarray:
    """Input gradient of RoI Align Rotated for ``grad_output [K, C, PH, PW]``; returns
    ``[N, C, H, W]``."""
    return roi_align_rotated.backward(
        emulator.runtime(), grad_output, rois, input_shape, spatial_scale, sampling_ratio,
        aligned, clockwise,
    )
