"""RoI Align's functional entry points: check, normalise, dispatch to a backend."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from roi_cupy import _args, _interop
from roi_cupy._args import BoxesLike, SamplingLike, SizeLike


def roi_align(
    input: Any,
    boxes: BoxesLike,
    output_size: SizeLike,
    spatial_scale: float = 1.0,
    sampling_ratio: SamplingLike = -1,
    aligned: bool = False,
    *,
    validate: bool = True,
    mode: str = "avg",
) -> Any:
    """RoI Align (Mask R-CNN): bilinearly sampled crops of each box, averaged or maximised.

    Args:
        input (Tensor[N, C, H, W]): features, float16, bfloat16, float32 or float64.
        boxes (Tensor[K, 5] or list of N Tensor[L_i, 4]): ``(batch_index, x1, y1, x2, y2)`` rows,
            or each image's ``(x1, y1, x2, y2)`` boxes, in input-image coordinates.
        output_size (int or (int, int)): ``PH, PW`` of each crop.
        spatial_scale (float): multiplies box coordinates to reach feature coordinates (e.g.
            1/16 for a stride-16 map). Default: 1.0.
        sampling_ratio (int or (int, int)): samples per bin along each axis, or a pair
            ``(sampling_h, sampling_w)``; ``<= 0`` picks ``ceil(roi_size / output_size)`` along
            that axis per RoI (adaptive). Either way at most 2**20 per
            axis: beyond that (a bin over a million pixels wide) the numbers differ from
            torchvision's, which has no cap. Default: -1.
        aligned (bool): shift box coordinates by -0.5 so that pixel centres are sampled exactly;
            ``False`` keeps the original Mask R-CNN behaviour (and clamps RoI size to >= 1).
            Default: False.
        validate (bool): check that boxes are finite with integral in-range batch indices (one
            device synchronisation on a GPU). With ``False`` an invalid RoI gives zeros and no
            check synchronises. Default: True.
        mode (str): what a bin holds: ``"avg"``, the mean of its samples (torchvision), or
            ``"max"``, the largest of them (mmcv's ``pool_mode="max"``; a sample outside the map
            counts as 0, NaN is the largest value, a bin without samples is 0). Default: "avg".

    Returns:
        Tensor[K, C, PH, PW]: in the input's dtype and array kind.
    """
    call = _args.Call(input, "input")
    _args.check_features(call.array, "input")
    pooled_h, pooled_w = _args.output_size_pair(output_size)
    compute = _args.compute_dtype(call.array.dtype)
    scale, ratio = _args.spatial_scale_of(spatial_scale, compute), _args.sampling_of(sampling_ratio)
    aligned, validate = _args.flag(aligned, "aligned"), _args.flag(validate, "validate")
    mode = _args.align_mode(mode)
    prepared = _args.normalise_boxes(boxes, call.array.shape[0], call.device, compute)
    rois = prepared.array
    forward = (
        call.backend.roi_align_max_forward if mode == "max" else call.backend.roi_align_forward
    )
    with call.scope():
        if validate:
            prepared.check(call.backend, call.array.shape[0])
        features = call.native_or_channels_last() if mode == "avg" else call.native()
        out = forward(features, rois, pooled_h, pooled_w, scale, ratio, aligned)
    return call.give_back(out)


def roi_align_backward(
    grad_output: Any,
    boxes: BoxesLike,
    input_shape: Sequence[int],
    output_size: SizeLike,
    spatial_scale: float = 1.0,
    sampling_ratio: SamplingLike = -1,
    aligned: bool = False,
    *,
    validate: bool = True,
    mode: str = "avg",
    input: Any = None,
    deterministic: bool = False,
) -> Any:
    """Gradient of :func:`roi_align` with respect to its input (boxes get none).

    Args:
        grad_output (Tensor[K, C, PH, PW]): gradient of the loss with respect to the output.
        boxes, output_size, spatial_scale, sampling_ratio, aligned, validate, mode: as passed to
            :func:`roi_align`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)`` of the forward input.
        input (Tensor[N, C, H, W] or None): the forward's features, in grad_output's dtype and
            array kind. Needed with ``mode="max"``, which finds each bin's maximum sample in
            them again and passes the bin's gradient to that sample's four bilinear corners;
            with ``"avg"`` it is checked and unused. Default: None.
        deterministic (bool): the same bits on every run: on a GPU the sums are kept in 64-bit
            fixed point instead of floating-point atomics (docs/semantics.md says how exact they
            are); NumPy always sums in a fixed order. Default: False.

    Returns:
        Tensor[N, C, H, W]: in grad_output's dtype and array kind.
    """
    call = _args.Call(grad_output, "grad_output")
    shape = _args.input_shape_of(input_shape)
    size = _args.output_size_pair(output_size)
    compute = _args.compute_dtype(call.array.dtype)
    scale = _args.spatial_scale_of(spatial_scale, compute)
    ratio = _args.sampling_of(sampling_ratio)
    aligned, validate = _args.flag(aligned, "aligned"), _args.flag(validate, "validate")
    deterministic = _args.flag(deterministic, "deterministic")
    mode = _args.align_mode(mode)
    features = None
    if input is not None:
        features = _interop.unwrap_like(input, "input", call.device, "grad_output")
    _args.check_saved_input(features, mode, shape, call.array.dtype)
    prepared = _args.normalise_boxes(boxes, shape[0], call.device, compute)
    rois = prepared.array
    _args.check_grad_output(call.array, rois.shape[0], shape[1], size)
    with call.scope():
        if validate:
            prepared.check(call.backend, shape[0])
        if mode == "max":
            if not call.backend.CAPABILITIES.strided:
                features = call.xp.ascontiguousarray(features)
            grad_input = call.backend.roi_align_max_backward(
                call.native(), features, rois, shape, scale, ratio, aligned,
                deterministic=deterministic,
            )
        else:
            grad_input = call.backend.roi_align_backward(
                call.native(), rois, shape, scale, ratio, aligned, deterministic=deterministic
            )
    return call.give_back(grad_input)
