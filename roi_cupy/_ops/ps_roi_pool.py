"""Position-sensitive RoI Pool's functional entry points: check, normalise, dispatch to a
backend."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from roi_cupy import _args
from roi_cupy._args import BoxesLike, SizeLike


def ps_roi_pool(
    input: Any,
    boxes: BoxesLike,
    output_size: SizeLike,
    spatial_scale: float = 1.0,
    *,
    validate: bool = True,
) -> Any:
    """Position-sensitive RoI Pool (R-FCN): the mean of each bin's window, each bin reading its
    own channels.

    Output channel ``c`` at bin ``(ph, pw)`` averages input channel ``(c * PH + ph) * PW + pw``
    over a window of whole pixels: torchvision's ``ps_roi_pool``. Box corners are scaled and
    rounded half away from zero; unlike :func:`roi_pool` the end pixel is exclusive, and windows
    are clipped to ``[0, H - 1] x [0, W - 1]`` (the last row and column are never read).

    Args:
        input (Tensor[N, C, H, W]): features, float16, bfloat16, float32 or float64; C must be a
            multiple of ``PH * PW``.
        boxes (Tensor[K, 5] or list of N Tensor[L_i, 4]): as for :func:`ps_roi_align`.
        output_size (int or (int, int)): ``PH, PW`` of each crop.
        spatial_scale (float): multiplies box coordinates to reach feature coordinates.
            Default: 1.0.
        validate (bool): as for :func:`ps_roi_align`. Default: True.

    Returns:
        Tensor[K, C / (PH * PW), PH, PW]: in the input's dtype and array kind; an empty window
        gives 0.
    """
    call = _args.Call(input, "input")
    _args.check_features(call.array, "input")
    pooled_h, pooled_w = _args.output_size_pair(output_size)
    _args.position_groups(call.array.shape[1], (pooled_h, pooled_w), "input", output_size)
    compute = _args.compute_dtype(call.array.dtype)
    scale = _args.spatial_scale_of(spatial_scale, compute)
    validate = _args.flag(validate, "validate")
    prepared = _args.normalise_boxes(boxes, call.array.shape[0], call.device, compute)
    with call.scope():
        if validate:
            prepared.check(call.backend, call.array.shape[0])
        out = call.backend.ps_roi_pool_forward(
            call.native(), prepared.array, pooled_h, pooled_w, scale
        )
    return call.give_back(out)


def ps_roi_pool_backward(
    grad_output: Any,
    boxes: BoxesLike,
    input_shape: Sequence[int],
    output_size: SizeLike,
    spatial_scale: float = 1.0,
    *,
    validate: bool = True,
    deterministic: bool = False,
) -> Any:
    """Gradient of :func:`ps_roi_pool` with respect to its input (boxes get none): each pixel of
    a bin's window receives the bin's gradient divided by the window's area.

    Args:
        grad_output (Tensor[K, C / (PH * PW), PH, PW]): gradient of the loss with respect to the
            output.
        boxes, output_size, spatial_scale, validate: as passed to :func:`ps_roi_pool`.
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
    groups = _args.position_groups(shape[1], size, "input_shape", output_size)
    compute = _args.compute_dtype(call.array.dtype)
    scale = _args.spatial_scale_of(spatial_scale, compute)
    validate = _args.flag(validate, "validate")
    deterministic = _args.flag(deterministic, "deterministic")
    prepared = _args.normalise_boxes(boxes, shape[0], call.device, compute)
    _args.check_position_grad_output(call.array, prepared.array.shape[0], groups, size)
    with call.scope():
        if validate:
            prepared.check(call.backend, shape[0])
        grad_input = call.backend.ps_roi_pool_backward(
            call.native(), prepared.array, shape, scale, deterministic=deterministic
        )
    return call.give_back(grad_input)
