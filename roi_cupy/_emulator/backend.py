"""The emulator backend: the four functions of ``roi_cupy._backend`` on NumPy arrays, computed by
the CUDA kernels compiled for the CPU and driven by the same launch code as on a GPU."""
from __future__ import annotations

import numpy

import roi_cupy._emulator as emulator
from roi_cupy._backend import Capabilities
from roi_cupy._cuda import roi_align, roi_check, roi_pool
from roi_cupy._cuda import ps_roi_align, ps_roi_pool, roi_align_rotated
from roi_cupy._cuda import multi_scale_roi_align as _multi_scale_roi_align

# C-contiguous arrays in; RoI Pool's indices checked by first_invalid's kernel.
CAPABILITIES = Capabilities()


def roi_align_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
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
    sampling_ratio: tuple[int, int],
    aligned: bool,
    deterministic: bool = False,
) -> numpy.ndarray:
    """Input gradient of RoI Align for ``grad_output [K, C, PH, PW]``; returns ``[N, C, H, W]``,
    summed in fixed point with ``deterministic``."""
    return roi_align.backward(
        emulator.runtime(), grad_output, rois, input_shape, spatial_scale, sampling_ratio, aligned,
        deterministic,
    )


def roi_align_max_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
) -> numpy.ndarray:
    """RoI Align in max mode: ``input`` [N, C, H, W], ``rois`` [K, 5] -> [K, C, PH, PW]."""
    return roi_align.max_forward(
        emulator.runtime(), input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
    )


def roi_align_max_backward(
    grad_output: numpy.ndarray,
    input: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    deterministic: bool = False,
) -> numpy.ndarray:
    """Input gradient of RoI Align in max mode: ``grad_output`` [K, C, PH, PW] and the forward's
    ``input`` [N, C, H, W] -> [N, C, H, W]; summed in fixed point with ``deterministic``."""
    return roi_align.max_backward(
        emulator.runtime(), grad_output, input, rois, input_shape, spatial_scale, sampling_ratio,
        aligned, deterministic,
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
        (output [K, C, PH, PW], argmax int64 [K, C, PH, PW] or None without ``indices``, when
        the kernel writes the output only).
    """
    return roi_pool.forward(
        emulator.runtime(), input, rois, pooled_h, pooled_w, spatial_scale, indices
    )


def roi_pool_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    argmax: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    deterministic: bool = False,
) -> numpy.ndarray:
    """Input gradient of RoI Pool for ``grad_output [K, C, PH, PW]``; returns ``[N, C, H, W]``,
    summed in fixed point with ``deterministic``."""
    return roi_pool.backward(
        emulator.runtime(), grad_output, rois, argmax, input_shape, deterministic
    )


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


# ----------------------------------------------------------------------------- position-sensitive
def ps_roi_align_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
) -> numpy.ndarray:
    """PS RoI Align of ``input [N, C, H, W]`` over ``rois [K, 5]``; returns
    ``[K, C / (PH * PW), PH, PW]``."""
    return ps_roi_align.forward(
        emulator.runtime(), input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio
    )


def ps_roi_align_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
) -> numpy.ndarray:
    """Input gradient of PS RoI Align for ``grad_output [K, C / (PH * PW), PH, PW]``; returns
    ``[N, C, H, W]``."""
    return ps_roi_align.backward(
        emulator.runtime(), grad_output, rois, input_shape, spatial_scale, sampling_ratio
    )


def ps_roi_pool_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
) -> numpy.ndarray:
    """PS RoI Pool of ``input [N, C, H, W]`` over ``rois [K, 5]``; returns
    ``[K, C / (PH * PW), PH, PW]``."""
    return ps_roi_pool.forward(emulator.runtime(), input, rois, pooled_h, pooled_w, spatial_scale)


def ps_roi_pool_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
) -> numpy.ndarray:
    """Input gradient of PS RoI Pool for ``grad_output [K, C / (PH * PW), PH, PW]``; returns
    ``[N, C, H, W]``."""
    return ps_roi_pool.backward(emulator.runtime(), grad_output, rois, input_shape, spatial_scale)


def multi_scale_roi_align_forward(
    inputs: list[numpy.ndarray],
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scales: list[float],
    sampling_ratio: tuple[int, int],
    aligned: bool,
    canonical_scale: int,
    bounds: tuple[float, ...],
) -> numpy.ndarray:
    """RoI Align of each RoI of ``rois [K, 5]`` on its level of ``inputs [N, C, H_l, W_l]``;
    returns ``[K, C, PH, PW]`` (one launch)."""
    return _multi_scale_roi_align.forward(
        emulator.runtime(), inputs, rois, pooled_h, pooled_w, spatial_scales, sampling_ratio,
        aligned, canonical_scale, bounds,
    )


def multi_scale_roi_align_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shapes: list[tuple[int, int, int, int]],
    spatial_scales: list[float],
    sampling_ratio: tuple[int, int],
    aligned: bool,
    canonical_scale: int,
    bounds: tuple[float, ...],
) -> list[numpy.ndarray]:
    """Input gradients for ``grad_output [K, C, PH, PW]``; returns one ``[N, C, H_l, W_l]`` per
    level (one launch)."""
    return _multi_scale_roi_align.backward(
        emulator.runtime(), grad_output, rois, input_shapes, spatial_scales, sampling_ratio,
        aligned, canonical_scale, bounds,
    )


# ----------------------------------------------------------------------------- RoI Align Rotated
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
