"""RoI Align Rotated's functional entry points: check, normalise, dispatch to a backend."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from roi_cupy import _args
from roi_cupy._args import BoxesLike, SamplingLike, SizeLike

# A rotated RoI row: (batch_index, cx, cy, w, h, angle).
_COLUMNS = 6
# The largest fixed sampling_ratio along an axis. A turned sample grid has no per-axis form to
# fold its samples into, so a bin's samples are visited one by one: at most 1024 x 1024 of them
# with a fixed ratio. An adaptive grid puts samples at most a pixel apart, so there the samples
# visited (those near the map) follow the pixels whatever the box.
MOST_SAMPLES = 1024


def roi_align_rotated(
    input: Any,
    boxes: BoxesLike,
    output_size: SizeLike,
    spatial_scale: float = 1.0,
    sampling_ratio: SamplingLike = -1,
    aligned: bool = True,
    clockwise: bool = False,
    *,
    validate: bool = True,
) -> Any:
    """RoI Align of rotated boxes (detectron2's ROIAlignRotated, mmcv's roi_align_rotated).

    Each box is cut into ``PH x PW`` bins in its own frame; each bin's samples, placed as
    :func:`roi_align` places them, are turned about the box's centre onto the map and averaged.

    Args:
        input (Tensor[N, C, H, W]): features, float16, bfloat16, float32 or float64.
        boxes (Tensor[K, 6] or list of N Tensor[L_i, 5]): ``(batch_index, cx, cy, w, h,
            angle)`` rows, or each image's ``(cx, cy, w, h, angle)`` boxes: centre, width,
            height in input-image coordinates, angle in degrees, counter-clockwise as the image
            is shown (x right, y down).
        output_size (int or (int, int)): ``PH, PW`` of each crop, along the box's height and
            width.
        spatial_scale (float): multiplies box centres and sizes to reach feature coordinates.
            Default: 1.0.
        sampling_ratio (int or (int, int)): samples per bin along both box axes, or a pair
            ``(sampling_h, sampling_w)``; ``<= 0`` picks ``ceil(size / output_size)`` along that
            axis per RoI (adaptive, capped at 2**20). A fixed value is at most 1024 (else
            ``ValueError``): a rotated bin's samples are visited one by one. Default: -1.
        aligned (bool): shift the centre by -0.5 so that pixel centres are sampled exactly
            (detectron2); ``False`` keeps mmcv's legacy rule (no shift, sizes clamped to >= 1).
            Default: True.
        clockwise (bool): the angle turns clockwise (mmcv's flag: the angle's sign is flipped).
            Default: False.
        validate (bool): check that boxes are finite with integral in-range batch indices (one
            device synchronisation on a GPU). With ``False`` an invalid RoI gives zeros and no
            check synchronises. Default: True.

    Returns:
        Tensor[K, C, PH, PW]: in the input's dtype and array kind.
    """
    call = _args.Call(input, "input")
    _args.check_features(call.array, "input")
    pooled_h, pooled_w = _args.output_size_pair(output_size)
    compute = _args.compute_dtype(call.array.dtype)
    scale = _args.spatial_scale_of(spatial_scale, compute)
    ratio = _args.sampling_of(sampling_ratio, MOST_SAMPLES)
    aligned, clockwise = _args.flag(aligned, "aligned"), _args.flag(clockwise, "clockwise")
    validate = _args.flag(validate, "validate")
    prepared = _args.normalise_boxes(boxes, call.array.shape[0], call.device, compute, _COLUMNS)
    with call.scope():
        if validate:
            prepared.check(call.backend, call.array.shape[0])
        out = call.backend.roi_align_rotated_forward(
            call.native(), prepared.array, pooled_h, pooled_w, scale, ratio, aligned, clockwise
        )
    return call.give_back(out)


def roi_align_rotated_backward(
    grad_output: Any,
    boxes: BoxesLike,
    input_shape: Sequence[int],
    output_size: SizeLike,
    spatial_scale: float = 1.0,
    sampling_ratio: SamplingLike = -1,
    aligned: bool = True,
    clockwise: bool = False,
    *,
    validate: bool = True,
    deterministic: bool = False,
) -> Any:
    """Gradient of :func:`roi_align_rotated` with respect to its input (boxes get none).

    Args:
        grad_output (Tensor[K, C, PH, PW]): gradient of the loss with respect to the output.
        boxes, output_size, spatial_scale, sampling_ratio, aligned, clockwise, validate: as
            passed to :func:`roi_align_rotated`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)`` of the forward input.
        deterministic (bool): the same bits on every run: on a GPU the sums are kept in 64-bit
            fixed point instead of floating-point atomics (docs/semantics.md); NumPy always sums
            in a fixed order. Default: False.

    Returns:
        Tensor[N, C, H, W]: in grad_output's dtype and array kind.
    """
    call = _args.Call(grad_output, "grad_output")
    shape = _args.input_shape_of(input_shape)
    size = _args.output_size_pair(output_size)
    compute = _args.compute_dtype(call.array.dtype)
    scale = _args.spatial_scale_of(spatial_scale, compute)
    ratio = _args.sampling_of(sampling_ratio, MOST_SAMPLES)
    aligned, clockwise = _args.flag(aligned, "aligned"), _args.flag(clockwise, "clockwise")
    validate = _args.flag(validate, "validate")
    deterministic = _args.flag(deterministic, "deterministic")
    prepared = _args.normalise_boxes(boxes, shape[0], call.device, compute, _COLUMNS)
    _args.check_grad_output(call.array, prepared.array.shape[0], shape[1], size)
    with call.scope():
        if validate:
            prepared.check(call.backend, shape[0])
        grad_input = call.backend.roi_align_rotated_backward(
            call.native(), prepared.array, shape, scale, ratio, aligned, clockwise,
            deterministic=deterministic,
        )
    return call.give_back(grad_input)
