"""RoI Pool's functional entry points: check, normalise, dispatch to a backend."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy

from roi_cupy import _args, _backend, _interop
from roi_cupy._args import BoxesLike, SizeLike


def roi_pool(
    input: Any,
    boxes: BoxesLike,
    output_size: SizeLike,
    spatial_scale: float = 1.0,
    *,
    return_indices: bool = False,
    validate: bool = True,
) -> Any:
    """RoI Pool (Fast R-CNN): the maximum of each bin of each box, on the integer pixel grid.

    Box corners are scaled and rounded half away from zero; the end pixel is inclusive.

    Args:
        input (Tensor[N, C, H, W]): features, float16, bfloat16, float32 or float64.
        boxes (Tensor[K, 5] or list of N Tensor[L_i, 4]): as for :func:`roi_align`.
        output_size (int or (int, int)): ``PH, PW`` of each crop.
        spatial_scale (float): multiplies box coordinates to reach feature coordinates.
            Default: 1.0.
        return_indices (bool): also return where each maximum was found. Default: False.
        validate (bool): as for :func:`roi_align`. Default: True.

    Returns:
        Tensor[K, C, PH, PW], or ``(output, indices)`` with indices an int64 Tensor[K, C, PH, PW]
        holding the flat index ``h * W + w`` of the maximum inside its H x W plane (-1 for an
        empty bin), the convention of ``max_pool2d(return_indices=True)``.
    """
    call = _args.Call(input, "input")
    _args.check_features(call.array, "input")
    pooled_h, pooled_w = _args.output_size_pair(output_size)
    compute = _args.compute_dtype(call.array.dtype)
    scale = _args.spatial_scale_of(spatial_scale, compute)
    return_indices = _args.flag(return_indices, "return_indices")
    validate = _args.flag(validate, "validate")
    prepared = _args.normalise_boxes(boxes, call.array.shape[0], call.device, compute)
    rois = prepared.array
    with call.scope():
        if validate:
            prepared.check(call.backend, call.array.shape[0])
        out, argmax = call.backend.roi_pool_forward(
            call.native_or_channels_last(), rois, pooled_h, pooled_w, scale,
            indices=return_indices,
        )
    if return_indices:
        return call.give_back(out), call.give_back(argmax)
    return call.give_back(out)


def roi_pool_backward(
    grad_output: Any,
    boxes: BoxesLike,
    indices: Any,
    input_shape: Sequence[int],
    *,
    validate: bool = True,
    deterministic: bool = False,
) -> Any:
    """Gradient of :func:`roi_pool` with respect to its input.

    Args:
        grad_output (Tensor[K, C, PH, PW]): gradient of the loss with respect to the output.
        boxes: as passed to :func:`roi_pool`.
        indices (Tensor[K, C, PH, PW]): the indices :func:`roi_pool` returned.
        input_shape ((int, int, int, int)): ``(N, C, H, W)`` of the forward input.
        validate (bool): also check that every index lies in ``[-1, H * W)`` (with ``False`` an
            index outside that range is ignored). Default: True.
        deterministic (bool): the same bits on every run: on a GPU the sums are kept in 64-bit
            fixed point instead of floating-point atomics (docs/semantics.md says how exact they
            are); NumPy always sums in a fixed order. Default: False.

    Returns:
        Tensor[N, C, H, W]: in grad_output's dtype and array kind.
    """
    call = _args.Call(grad_output, "grad_output")
    shape = _args.input_shape_of(input_shape)
    validate = _args.flag(validate, "validate")
    deterministic = _args.flag(deterministic, "deterministic")
    compute = _args.compute_dtype(call.array.dtype)
    prepared = _args.normalise_boxes(boxes, shape[0], call.device, compute)
    rois = prepared.array
    _args.check_grad_output(call.array, rois.shape[0], shape[1], None)
    argmax = _interop.unwrap_like(indices, "indices", call.device, "grad_output")
    if numpy.dtype(argmax.dtype).kind not in "iu":
        raise TypeError(f"indices must have an integer dtype, got {argmax.dtype}")
    if tuple(argmax.shape) != tuple(call.array.shape):
        raise ValueError(
            f"indices must have grad_output's shape {tuple(call.array.shape)}, "
            f"got {tuple(argmax.shape)}"
        )
    given = argmax  # what the caller passed, for the messages
    with call.scope():
        if not call.backend.CAPABILITIES.strided:
            if validate and numpy.dtype(argmax.dtype) == numpy.uint64:
                # int64 would wrap these (2**64 - 1 to -1, an empty bin): refuse them first.
                beyond = argmax > numpy.iinfo(numpy.int64).max
                if bool(beyond.any()):
                    _args.reject_index(given, int(beyond.argmax()), shape)
            argmax = call.xp.ascontiguousarray(argmax, dtype=numpy.int64)
        fused = validate and call.backend.CAPABILITIES.fused_index_check
        if validate:
            prepared.check(call.backend, shape[0], None if fused else argmax, shape, shown=given)
        try:
            if fused:
                grad_input = call.backend.roi_pool_backward(
                    call.native(), rois, argmax, shape, check_indices=True,
                    deterministic=deterministic,
                )
            else:
                grad_input = call.backend.roi_pool_backward(
                    call.native(), rois, argmax, shape, deterministic=deterministic
                )
        except _backend.IndexOutOfRange as bad:
            _args.reject_index(given, bad.position, shape)
    return call.give_back(grad_input)
