"""Launchers of the RoI Align kernels (cuda/roi_align.cu), for any runtime (GPU or emulator).

Arguments arrive as ``roi_cupy._backend`` promises: C-contiguous arrays of ``rt.xp``, rois
``[K, 5]`` of the compute dtype.
"""
from __future__ import annotations

import math
from typing import Any

import numpy

from roi_cupy import _interop
from roi_cupy._cuda import fixed, launch

# The kernels take each axis's sampling as an int and cap any grid at 2**20 samples per axis.
_INT32_MAX = 2**31 - 1
_MAX_GRID = 2**20


def _sampling(sampling_ratio: tuple[int, int]) -> tuple[numpy.int32, numpy.int32]:
    return tuple(numpy.int32(max(min(s, _INT32_MAX), -1)) for s in sampling_ratio)


def forward(
    rt: Any,
    input: Any,
    rois: Any,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    *,
    kernel: str = "roi_align_forward",
) -> Any:
    """RoI Align of every RoI.

    Args:
        rt: the runtime (``xp`` and ``function``).
        input (ndarray[N, C, H, W]): features, float16, bfloat16, float32 or float64;
            C-contiguous, or for ``"roi_align_forward"`` also channels-last (a transposed view
            of a C-contiguous ``[N, H, W, C]``), which its kernel reads as it is.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` in the compute dtype.
        pooled_h, pooled_w (int): bins per RoI, >= 1.
        spatial_scale (float): box-to-feature coordinate factor.
        sampling_ratio ((int, int)): samples per bin along y and x; <= 0 for adaptive.
        aligned (bool): shift boxes by -0.5 pixel.
        kernel (str): ``"roi_align_forward"`` (the mean of a bin's samples) or
            ``"roi_align_max_forward"`` (their maximum), which take the same arguments.
            Default: "roi_align_forward".

    Returns:
        ndarray[K, C, PH, PW] in the input's dtype.
    """
    # Only the mean's kernel takes the layout flag (and channels-last features).
    mean = kernel == "roi_align_forward"
    last = mean and _interop.is_channels_last(input)
    layout = (numpy.bool_(last),) if mean else ()
    return launch.pooled_forward(
        rt, kernel, input, rois, input.shape[1], pooled_h, pooled_w,
        lambda real: (
            real(spatial_scale), *_sampling(sampling_ratio), numpy.bool_(aligned), *layout
        ),
        data=input.transpose(0, 2, 3, 1) if last else None,
    )


def backward(
    rt: Any,
    grad_output: Any,
    rois: Any,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    deterministic: bool = False,
) -> Any:
    """Gradient of :func:`forward` with respect to its input.

    Args:
        rt: the runtime.
        grad_output (ndarray[K, C, PH, PW]): float16, bfloat16, float32 or float64.
        rois (ndarray[K, 5]): as for :func:`forward`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)``.
        spatial_scale, sampling_ratio, aligned: as for :func:`forward`.
        deterministic (bool): sum in fixed point (``roi_cupy._cuda.fixed``), bitwise the same on
            every run, instead of with floating-point atomicAdd. Default: False.

    Returns:
        ndarray[N, C, H, W] in grad_output's dtype.
    """
    return _backward(
        rt, "roi_align_backward", (grad_output,), rois, input_shape, spatial_scale,
        sampling_ratio, aligned, deterministic, terms_per_bin(sampling_ratio),
    )


def _backward(
    rt: Any,
    kernel: str,
    reads: tuple[Any, ...],
    rois: Any,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    deterministic: bool,
    bin_terms: int,
) -> Any:
    """Launch backward ``kernel`` (or its ``_deterministic`` twin) on the arrays it reads
    (grad_output first) and the RoIs; ``bin_terms`` bounds the terms one bin adds to one
    gradient element."""
    grad_output = reads[0]
    n, c, h, w = input_shape
    k, _, pooled_h, pooled_w = grad_output.shape
    real = launch.compute_dtype(grad_output.dtype).type
    index64 = launch.use_index64(math.prod(input_shape), grad_output.size, rois.size)
    i = launch.index_scalar(index64)

    def launch_with(accumulators: tuple[Any, ...]) -> None:
        name, sums = fixed.twin(kernel, accumulators)
        grid, block = launch.grid(grad_output.size)
        rt.function(launch.kernel_name(name, grad_output.dtype, index64))(
            grid,
            block,
            (
                *reads, rois, *sums,
                i(grad_output.size), i(c), i(h), i(w), i(n), i(pooled_h), i(pooled_w),
                real(spatial_scale), *_sampling(sampling_ratio), numpy.bool_(aligned),
            ),
        )

    bins = k * pooled_h * pooled_w
    return fixed.accumulate(
        rt, input_shape, grad_output, deterministic, sources=bins, terms=bins * bin_terms,
        launch_with=launch_with,
    )


def terms_per_bin(sampling_ratio: tuple[int, int], adaptive: int = 5) -> int:
    """The most terms one bin can add to one gradient element: four corners of each sample near
    it, with at most ``sampling`` samples per axis (fixed) or ``adaptive`` (5 for upright bins:
    their samples are at least half a pixel apart, and a pixel takes samples from less than two
    pixels around it)."""
    near = [min(s, _MAX_GRID) if s > 0 else adaptive for s in sampling_ratio]
    return 4 * near[0] * near[1]


def max_forward(
    rt: Any,
    input: Any,
    rois: Any,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
) -> Any:
    """RoI Align in max mode: :func:`forward` with each bin's largest sample."""
    return forward(
        rt, input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned,
        kernel="roi_align_max_forward",
    )


def max_backward(
    rt: Any,
    grad_output: Any,
    input: Any,
    rois: Any,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: tuple[int, int],
    aligned: bool,
    deterministic: bool = False,
) -> Any:
    """Gradient of :func:`max_forward` with respect to its input.

    Args:
        rt: the runtime.
        grad_output (ndarray[K, C, PH, PW]): float16, bfloat16, float32 or float64.
        input (ndarray[N, C, H, W]): the forward's features, in grad_output's dtype; each bin's
            pick is found in them again.
        rois (ndarray[K, 5]): as for :func:`forward`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)``.
        spatial_scale, sampling_ratio, aligned: as for :func:`forward`.
        deterministic (bool): as for :func:`backward`. Default: False.

    Returns:
        ndarray[N, C, H, W] in grad_output's dtype.
    """
    # A bin passes its gradient to the four corners of one sample.
    return _backward(
        rt, "roi_align_max_backward", (grad_output, input), rois, input_shape, spatial_scale,
        sampling_ratio, aligned, deterministic, 4,
    )
