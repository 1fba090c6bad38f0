"""PyTorch adapter: roi_cupy's operators as torch operators that train and compile.

``import roi_cupy.torch`` registers each operator and its backward pass in the ``roi_cupy``
namespace with ``torch.library.custom_op`` (``torch.ops.roi_cupy.roi_align`` and
``roi_align_backward``; likewise ``roi_pool``, ``ps_roi_align``, ``ps_roi_pool``,
``roi_align_rotated`` and ``multi_scale_roi_align``): each has a fake (meta) implementation, so
``torch.compile`` traces through it with ``fullgraph=True``, and each forward operator has an
autograd formula whose backward is itself one of these operators. The functions and modules
below have the signatures, defaults and numbers of ``torchvision.ops`` (of detectron2's
``ROIAlignRotated`` for the rotated one). :class:`MultiScaleRoIAlign` pools every level of a
feature pyramid in one call (one kernel launch on a GPU). The operators that are linear in the
features (all but RoI Pool and RoI Align's max mode) have second derivatives too.

What runs where: CPU tensors run roi_cupy's NumPy backend on the tensor's own memory (no copy,
any strides, bfloat16 reinterpreted bit for bit); CUDA tensors run the CUDA kernels through CuPy
on the tensor's device, launched on ``torch.cuda.current_stream()``, with every array the
launch needs (the output included) allocated by torch's caching allocator on that stream.

Gradients flow to the features; boxes get none, as in torchvision. Argument checks are roi_cupy's
own (:mod:`roi_cupy.ops`), so errors read the same as for the functional ops. Under
``torch.use_deterministic_algorithms(True)`` every backward pass on a GPU sums in fixed point,
bitwise the same on every run (``deterministic=True`` of the functional ops); on the CPU every
backward pass always is.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from roi_cupy import _args, ops
from roi_cupy._ops import roi_align_rotated as rotated

__all__ = [
    "MultiScaleRoIAlign",
    "PSRoIAlign",
    "PSRoIPool",
    "RoIAlign",
    "RoIAlignRotated",
    "RoIPool",
    "multi_scale_roi_align",
    "ps_roi_align",
    "ps_roi_pool",
    "roi_align",
    "roi_align_rotated",
    "roi_pool",
]


# ----------------------------------------------------------------------------- running the ops
def _torch_allocator(device: torch.device) -> Any:
    """A CuPy allocator that takes its memory from torch's caching allocator on ``device``."""
    import cupy

    def allocate(size: int) -> Any:
        block = torch.empty(size, dtype=torch.uint8, device=device)
        memory = cupy.cuda.UnownedMemory(block.data_ptr(), size, block, device.index)
        return cupy.cuda.MemoryPointer(memory, 0)

    return allocate


@contextlib.contextmanager
def _on_device_of(tensor: Tensor) -> Iterator[None]:
    """For a CUDA tensor: its device current, CuPy on torch's current stream and allocator.

    Everything roi_cupy does inside, the DLPack exchange of the results included, is ordered on
    the stream torch's own next operation uses, so CUDA graph capture and side streams see one
    stream. For a CPU tensor: nothing to do.
    """
    if tensor.device.type != "cuda":
        yield
        return
    try:
        import cupy
    except ImportError as exc:
        raise ValueError(
            f"a CUDA tensor needs CuPy, which is not importable ({exc}): "
            "pip install 'roi_cupy[cuda13]' (or [cuda12])"
        ) from exc

    device = tensor.device
    with cupy.cuda.Device(device.index):
        stream = _cupy_stream(cupy, torch.cuda.current_stream(device))
        with stream, cupy.cuda.using_allocator(_torch_allocator(device)):
            yield


def _cupy_stream(cupy: Any, stream: torch.cuda.Stream) -> Any:
    """``stream`` (torch's) as a CuPy stream, through the CUDA stream protocol where CuPy has it
    (CuPy 14 deprecates ``ExternalStream``). The caller has made its device current."""
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, stream.device.index)


def _refuse_validation_in_capture(input: Tensor, validate: bool) -> None:
    """Validation reads its verdict back to the host, which a CUDA graph capture forbids."""
    if validate and input.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "validate=True reads the boxes' check back to the host, which a CUDA graph capture "
            "(torch.cuda.graph, torch.compile(mode='reduce-overhead')) forbids: pass "
            "validate=False inside the capture (invalid boxes then give zeros)"
        )


def _given_boxes(boxes: list[Tensor], per_image: bool) -> Any:
    """The boxes argument as the functional ops take it (detached: no graph crosses DLPack)."""
    detached = [b.detach() for b in boxes]
    return detached if per_image else detached[0]


def _roi_count(boxes: list[Tensor], per_image: bool) -> Any:
    return sum(b.shape[0] for b in boxes) if per_image else boxes[0].shape[0]


def _deterministic() -> bool:
    """Whether the backward passes must give the same bits on every run: PyTorch's own switch,
    ``torch.use_deterministic_algorithms(True)``, read when the backward pass runs (under
    ``torch.compile`` when it is traced; the compiled graph is guarded on it)."""
    return torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------- RoI Align operators
@torch.library.custom_op("roi_cupy::roi_align", mutates_args=())
def _roi_align(
    input: Tensor,
    boxes: list[Tensor],
    per_image: bool,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: Sequence[int],
    aligned: bool,
    validate: bool,
    mode: str = "avg",
) -> Tensor:
    _refuse_validation_in_capture(input, validate)
    with _on_device_of(input):
        return ops.roi_align(
            input.detach(), _given_boxes(boxes, per_image), (pooled_h, pooled_w), spatial_scale,
            sampling_ratio, aligned, validate=validate, mode=mode,
        )


@_roi_align.register_fake
def _(input, boxes, per_image, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned,
      validate, mode="avg"):
    return input.new_empty((_roi_count(boxes, per_image), input.shape[1], pooled_h, pooled_w))


@torch.library.custom_op("roi_cupy::roi_align_backward", mutates_args=())
def _roi_align_backward(
    grad_output: Tensor,
    boxes: list[Tensor],
    per_image: bool,
    input_shape: Sequence[int],
    spatial_scale: float,
    sampling_ratio: Sequence[int],
    aligned: bool,
    mode: str = "avg",
    input: Tensor | None = None,
    deterministic: bool = False,
) -> Tensor:
    pooled = tuple(grad_output.shape[2:])
    with _on_device_of(grad_output):
        return ops.roi_align_backward(
            grad_output.detach(), _given_boxes(boxes, per_image), tuple(input_shape), pooled,
            spatial_scale, sampling_ratio, aligned, validate=False, mode=mode,
            input=None if input is None else input.detach(), deterministic=deterministic,
        )


@_roi_align_backward.register_fake
def _(grad_output, boxes, per_image, input_shape, spatial_scale, sampling_ratio, aligned,
      mode="avg", input=None, deterministic=False):
    return grad_output.new_empty(tuple(input_shape))


def _roi_align_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input, boxes, per_image, _, _, spatial_scale, sampling_ratio, aligned, _, mode = inputs
    # Max mode finds each bin's maximum again in the forward's features.
    ctx.save_for_backward(*boxes, *([input] if mode == "max" else []))
    ctx.boxes = len(boxes)
    ctx.args = (per_image, tuple(input.shape), spatial_scale, sampling_ratio, aligned, mode)


def _roi_align_grad(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
    per_image, shape, spatial_scale, sampling_ratio, aligned, mode = ctx.args
    saved = ctx.saved_tensors
    boxes, features = list(saved[: ctx.boxes]), (saved[ctx.boxes] if mode == "max" else None)
    grad_input = _roi_align_backward(
        grad_output, boxes, per_image, shape, spatial_scale, sampling_ratio, aligned, mode,
        features, _deterministic(),
    )
    # One None per other argument as dispatched: torch leaves out those equal to their defaults.
    return (grad_input, [None] * len(boxes)) + (None,) * (len(ctx.needs_input_grad) - 2)


_roi_align.register_autograd(_roi_align_grad, setup_context=_roi_align_setup)


def _roi_align_backward_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    grad_output, boxes, per_image, _, spatial_scale, sampling_ratio, aligned, mode = inputs[:8]
    ctx.save_for_backward(*boxes)
    ctx.args = (
        per_image, tuple(grad_output.shape[2:]), spatial_scale, sampling_ratio, aligned, mode
    )


def _roi_align_backward_grad(ctx: Any, grad_grad_input: Tensor) -> tuple[Any, ...]:
    # The backward is linear in grad_output; in avg mode its adjoint is the forward.
    per_image, (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned, mode = ctx.args
    if mode != "avg":
        raise RuntimeError(
            "roi_align(mode='max') has no second derivative here: its backward is differentiable "
            "only in avg mode"
        )
    grad_grad_output = _roi_align(
        grad_grad_input, list(ctx.saved_tensors), per_image, pooled_h, pooled_w, spatial_scale,
        sampling_ratio, aligned, False,
    )
    rest = (None,) * (len(ctx.needs_input_grad) - 2)  # as in _roi_align_grad
    return (grad_grad_output, [None] * len(ctx.saved_tensors)) + rest


_roi_align_backward.register_autograd(
    _roi_align_backward_grad, setup_context=_roi_align_backward_setup
)


# ----------------------------------------------------------------------------- RoI Pool operators
@torch.library.custom_op("roi_cupy::roi_pool", mutates_args=())
def _roi_pool(
    input: Tensor,
    boxes: list[Tensor],
    per_image: bool,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    validate: bool,
) -> tuple[Tensor, Tensor]:
    _refuse_validation_in_capture(input, validate)
    with _on_device_of(input):
        return ops.roi_pool(
            input.detach(), _given_boxes(boxes, per_image), (pooled_h, pooled_w), spatial_scale,
            return_indices=True, validate=validate,
        )


@_roi_pool.register_fake
def _(input, boxes, per_image, pooled_h, pooled_w, spatial_scale, validate):
    shape = (_roi_count(boxes, per_image), input.shape[1], pooled_h, pooled_w)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("roi_cupy::roi_pool_backward", mutates_args=())
def _roi_pool_backward(
    grad_output: Tensor,
    boxes: list[Tensor],
    per_image: bool,
    indices: Tensor,
    input_shape: Sequence[int],
    deterministic: bool = False,
) -> Tensor:
    with _on_device_of(grad_output):
        return ops.roi_pool_backward(
            grad_output.detach(), _given_boxes(boxes, per_image), indices.detach(),
            tuple(input_shape), validate=False, deterministic=deterministic,
        )


@_roi_pool_backward.register_fake
def _(grad_output, boxes, per_image, indices, input_shape, deterministic=False):
    return grad_output.new_empty(tuple(input_shape))


def _roi_pool_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    input, boxes, per_image = inputs[:3]
    ctx.save_for_backward(output[1], *boxes)
    ctx.args = (per_image, tuple(input.shape))


def _roi_pool_grad(ctx: Any, grad_output: Tensor, _grad_indices: Any) -> tuple[Any, ...]:
    per_image, shape = ctx.args
    indices, *boxes = ctx.saved_tensors
    grad_input = _roi_pool_backward(
        grad_output, boxes, per_image, indices, shape, _deterministic()
    )
    return (grad_input, [None] * len(boxes)) + (None,) * 5


_roi_pool.register_autograd(_roi_pool_grad, setup_context=_roi_pool_setup)


# ----------------------------------------------------------------------------- multi-scale ops
@torch.library.custom_op("roi_cupy::multi_scale_roi_align", mutates_args=())
def _multi_scale_roi_align_op(
    features: list[Tensor],
    boxes: list[Tensor],
    per_image: bool,
    pooled_h: int,
    pooled_w: int,
    spatial_scales: Sequence[float],
    sampling_ratio: Sequence[int],
    aligned: bool,
    canonical_scale: int,
    canonical_level: int,
    validate: bool,
) -> Tensor:
    _refuse_validation_in_capture(features[0], validate)
    with _on_device_of(features[0]):
        return ops.multi_scale_roi_align(
            [f.detach() for f in features], _given_boxes(boxes, per_image), (pooled_h, pooled_w),
            list(spatial_scales), sampling_ratio, aligned, canonical_scale, canonical_level,
            validate=validate,
        )


@_multi_scale_roi_align_op.register_fake
def _(features, boxes, per_image, pooled_h, pooled_w, spatial_scales, sampling_ratio, aligned,
      canonical_scale, canonical_level, validate):
    shape = (_roi_count(boxes, per_image), features[0].shape[1], pooled_h, pooled_w)
    return features[0].new_empty(shape)


@torch.library.custom_op("roi_cupy::multi_scale_roi_align_backward", mutates_args=())
def _multi_scale_roi_align_backward_op(
    grad_output: Tensor,
    boxes: list[Tensor],
    per_image: bool,
    input_shapes: Sequence[int],
    spatial_scales: Sequence[float],
    sampling_ratio: Sequence[int],
    aligned: bool,
    canonical_scale: int,
    canonical_level: int,
    deterministic: bool = False,
) -> list[Tensor]:
    """``input_shapes`` holds each level's (N, C, H, W), one after another (the schema has no
    list of lists)."""
    pooled = tuple(grad_output.shape[2:])
    with _on_device_of(grad_output):
        return ops.multi_scale_roi_align_backward(
            grad_output.detach(), _given_boxes(boxes, per_image), _shapes(input_shapes), pooled,
            list(spatial_scales), sampling_ratio, aligned, canonical_scale, canonical_level,
            validate=False, deterministic=deterministic,
        )


@_multi_scale_roi_align_backward_op.register_fake
def _(grad_output, boxes, per_image, input_shapes, spatial_scales, sampling_ratio, aligned,
      canonical_scale, canonical_level, deterministic=False):
    return [grad_output.new_empty(shape) for shape in _shapes(input_shapes)]


def _shapes(flat: Sequence[Any]) -> list[tuple[Any, ...]]:
    return [tuple(flat[i : i + 4]) for i in range(0, len(flat), 4)]


def _multi_scale_roi_align_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    features, boxes, per_image, _, _, *rule, _ = inputs
    ctx.save_for_backward(*boxes)
    ctx.args = (per_image, [v for f in features for v in f.shape], *rule)


def _multi_scale_roi_align_grad(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
    grads = _multi_scale_roi_align_backward_op(
        grad_output, list(ctx.saved_tensors), *ctx.args, _deterministic()
    )
    return (grads, [None] * len(ctx.saved_tensors)) + (None,) * 9


_multi_scale_roi_align_op.register_autograd(
    _multi_scale_roi_align_grad, setup_context=_multi_scale_roi_align_setup
)


def _multi_scale_roi_align_backward_setup(
    ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]
) -> None:
    grad_output, boxes, per_image = inputs[:3]
    rule = inputs[4:9]  # spatial_scales .. canonical_level
    ctx.save_for_backward(*boxes)
    ctx.args = (per_image, *grad_output.shape[2:], *rule)


def _multi_scale_roi_align_backward_grad(
    ctx: Any, grad_grad_inputs: list[Tensor]
) -> tuple[Any, ...]:
    # The backward is linear in grad_output; its adjoint is the forward.
    grad_grad_output = _multi_scale_roi_align_op(
        list(grad_grad_inputs), list(ctx.saved_tensors), *ctx.args, False
    )
    rest = (None,) * (len(ctx.needs_input_grad) - 2)  # as dispatched: defaults may be left out
    return (grad_grad_output, [None] * len(ctx.saved_tensors)) + rest


_multi_scale_roi_align_backward_op.register_autograd(
    _multi_scale_roi_align_backward_grad, setup_context=_multi_scale_roi_align_backward_setup
)


# ----------------------------------------------------------------------------- functional
def _boxes(boxes: Any, columns: int = 5) -> tuple[list[Tensor], bool]:
    """``(tensors, per_image)``: ``[boxes]`` for a ``Tensor[K, 5]`` (``[K, columns]``), else the
    per-image list."""
    if isinstance(boxes, Tensor):
        return [boxes], False
    if isinstance(boxes, (list, tuple)):
        stray = next((b for b in boxes if not isinstance(b, Tensor)), None)
        if stray is None:
            return list(boxes), True
        got = f"a list holding {type(stray).__module__}.{type(stray).__qualname__}"
    else:
        got = f"{type(boxes).__module__}.{type(boxes).__qualname__}"
    raise TypeError(
        f"boxes must be a torch.Tensor[K, {columns}] or a list of torch.Tensor[L, {columns - 1}] "
        f"(one per image), got {got}"
    )


def _check_input(input: Any) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(
            f"input must be a torch.Tensor, got {type(input).__module__}.{type(input).__qualname__}"
            " (roi_cupy.roi_align takes NumPy, CuPy and DLPack arrays)"
        )


def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = False,
    *,
    validate: bool = True,
    mode: str = "avg",
) -> Tensor:
    """RoI Align with autograd, as ``torchvision.ops.roi_align``.

    Args:
        input (Tensor[N, C, H, W]): features, float16, bfloat16, float32 or float64, on the CPU
            or a CUDA device.
        boxes (Tensor[K, 5] or list of N Tensor[L_i, 4]): ``(batch_index, x1, y1, x2, y2)`` rows,
            or each image's ``(x1, y1, x2, y2)`` boxes, on the input's device.
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): box-to-feature coordinate factor. Default: 1.0.
        sampling_ratio (int or (int, int)): samples per bin along both axes, or
            ``(sampling_h, sampling_w)``; ``<= 0`` adaptive. Default: -1.
        aligned (bool): half-pixel shift of the boxes. Default: False.
        validate (bool): reject non-finite boxes and batch indices outside ``[0, N)`` (on a GPU
            one synchronisation, which a CUDA graph capture does not allow); with ``False``
            such RoIs give zeros. Default: True.
        mode (str): ``"avg"`` (a bin's mean, torchvision's) or ``"max"`` (its largest sample,
            mmcv's ``pool_mode="max"``; the backward keeps the features to find it again, and
            has no second derivative). Default: "avg".

    Returns:
        Tensor[K, C, PH, PW]: in the input's dtype and device; differentiable in ``input``.
    """
    _check_input(input)
    tensors, per_image = _boxes(boxes)
    pooled_h, pooled_w = _args.output_size_pair(output_size)
    return _roi_align(
        input, tensors, per_image, pooled_h, pooled_w, _args.spatial_scale_of(spatial_scale),
        _args.sampling_of(sampling_ratio), _args.flag(aligned, "aligned"),
        _args.flag(validate, "validate"), _args.align_mode(mode),
    )


def roi_pool(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    *,
    validate: bool = True,
) -> Tensor:
    """RoI Pool with autograd, as ``torchvision.ops.roi_pool``.

    Args:
        input (Tensor[N, C, H, W]): features, float16, bfloat16, float32 or float64.
        boxes (Tensor[K, 5] or list of N Tensor[L_i, 4]): as for :func:`roi_align`.
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): box-to-feature coordinate factor. Default: 1.0.
        validate (bool): as for :func:`roi_align`. Default: True.

    Returns:
        Tensor[K, C, PH, PW]: in the input's dtype and device; differentiable in ``input``.
    """
    _check_input(input)
    tensors, per_image = _boxes(boxes)
    pooled_h, pooled_w = _args.output_size_pair(output_size)
    output, _ = _roi_pool(
        input, tensors, per_image, pooled_h, pooled_w, _args.spatial_scale_of(spatial_scale),
        _args.flag(validate, "validate"),
    )
    return output


def multi_scale_roi_align(
    features: list[Tensor],
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scales: list[float],
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = False,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    *,
    validate: bool = True,
) -> Tensor:
    """RoI Align over a feature pyramid with autograd: :func:`roi_cupy.multi_scale_roi_align`.

    Each box is pooled from the level torchvision's ``MultiScaleRoIAlign`` picks for it (see
    :class:`MultiScaleRoIAlign`), here with the levels' scales given.

    Args:
        features (list of Tensor[N, C, H_l, W_l]): 1 to 8 maps, finest first, of one dtype and
            device.
        boxes (Tensor[K, 5] or list of N Tensor[L_i, 4]): as for :func:`roi_align`.
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scales (list of float): each level's box-to-feature scale.
        sampling_ratio (int or (int, int)): as for :func:`roi_align`. Default: -1.
        aligned (bool): as for :func:`roi_align`. Default: False.
        canonical_scale (int): the box side that maps to ``canonical_level``. Default: 224.
        canonical_level (int): the level of a box of side ``canonical_scale``. Default: 4.
        validate (bool): as for :func:`roi_align`. Default: True.

    Returns:
        Tensor[K, C, PH, PW]: in the features' dtype and device, in box order; differentiable
        in every level.
    """
    if not isinstance(features, (list, tuple)):
        raise TypeError(
            "features must be a list of torch.Tensor[N, C, H_l, W_l], one per level, got "
            f"{type(features).__module__}.{type(features).__qualname__}"
        )
    for feature in features:
        _check_input(feature)
    tensors, per_image = _boxes(boxes)
    pooled_h, pooled_w = _args.output_size_pair(output_size)
    if not isinstance(spatial_scales, (list, tuple)):
        raise TypeError(f"spatial_scales must be a list of real numbers, got {spatial_scales!r}")
    scales = [_args.spatial_scale_of(scale) for scale in spatial_scales]
    canonical = _args.canonical_of(canonical_scale, canonical_level)
    return _multi_scale_roi_align_op(
        list(features), tensors, per_image, pooled_h, pooled_w, scales,
        _args.sampling_of(sampling_ratio), _args.flag(aligned, "aligned"), *canonical,
        _args.flag(validate, "validate"),
    )


# ----------------------------------------------------------------------------- modules
class RoIAlign(nn.Module):
    """:func:`roi_align` as a module, as ``torchvision.ops.RoIAlign``.

    Args:
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): box-to-feature coordinate factor.
        sampling_ratio (int or (int, int)): samples per bin along both axes or per axis,
            ``<= 0`` adaptive.
        aligned (bool): half-pixel shift of the boxes. Default: False.
        validate (bool): as for :func:`roi_align`; ``False`` inside a CUDA graph capture.
            Default: True.
        mode (str): ``"avg"`` or ``"max"``, as for :func:`roi_align`. Default: "avg".
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
        *,
        validate: bool = True,
        mode: str = "avg",
    ):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.validate = validate
        self.mode = _args.align_mode(mode)

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
            validate=self.validate, mode=self.mode,
        )

    def __repr__(self) -> str:
        mode = "" if self.mode == "avg" else f", mode={self.mode!r}"
        return (
            f"{type(self).__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, "
            f"aligned={self.aligned}{mode})"
        )


class RoIPool(nn.Module):
    """:func:`roi_pool` as a module, as ``torchvision.ops.RoIPool``.

    Args:
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): box-to-feature coordinate factor.
        validate (bool): as for :func:`roi_pool`. Default: True.
    """

    def __init__(
        self, output_size: int | tuple[int, int], spatial_scale: float, *, validate: bool = True
    ):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.validate = validate

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale, validate=self.validate)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale})"
        )


class MultiScaleRoIAlign(nn.Module):
    """RoI Align over a feature pyramid, as ``torchvision.ops.MultiScaleRoIAlign``.

    Each box is pooled from one level: ``k = floor(canonical_level + log2(sqrt(area) /
    canonical_scale) + 1e-6)``, clamped to the levels present (the FPN paper's eq. 1). The
    level scales are inferred on the first call from the feature and image sizes,
    ``2 ** round(log2(feature_size / image_size))`` along the height, and kept. Results come in
    the boxes' order. Every box goes through one :func:`multi_scale_roi_align` call (one kernel
    launch for all levels on a GPU), so at most 8 maps are pooled from.

    Args:
        featmap_names (list[str]): the keys of the feature maps to pool from; maps are taken in
            the order of the dict given to :meth:`forward`.
        output_size (int or (int, int)): ``PH, PW``.
        sampling_ratio (int or (int, int)): samples per bin along both axes or per axis,
            ``<= 0`` adaptive.
        canonical_scale (int): box size that maps to ``canonical_level``. Default: 224.
        canonical_level (int): the level a box of side ``canonical_scale`` is pooled from (the
            FPN paper's k0). Default: 4.
        validate (bool): as for :func:`roi_align`; ``False`` inside a CUDA graph capture.
            Default: True.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | tuple[int, int] | list[int],
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        validate: bool = True,
    ):
        super().__init__()
        if not 1 <= len(featmap_names) <= _args.MAX_LEVELS:
            raise ValueError(
                f"featmap_names must name 1 to {_args.MAX_LEVELS} maps (the levels of one call), "
                f"got {len(featmap_names)}: {list(featmap_names)!r}"
            )
        self.featmap_names = featmap_names
        self.output_size = _args.output_size_pair(output_size)
        _args.sampling_of(sampling_ratio)  # checked here, kept as given
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.validate = validate
        self.scales: list[float] | None = None

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """Pool every box from its level.

        Args:
            x (dict[str, Tensor[N, C, H_l, W_l]]): the feature maps, finest first.
            boxes (list of N Tensor[L_i, 4]): each image's boxes in image coordinates.
            image_shapes (list of (int, int)): each image's ``(height, width)`` before the
                backbone, from which the level scales are inferred.

        Returns:
            Tensor[sum L_i, C, PH, PW]
        """
        features = _chosen_maps(x, self.featmap_names)
        if self.scales is None:
            self.scales = _infer_scales(features, image_shapes)
        return _multi_scale_roi_align(
            features, boxes, self.output_size, self.sampling_ratio, self.scales,
            self.canonical_scale, self.canonical_level, self.validate,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(featmap_names={self.featmap_names}, "
            f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio})"
        )


def _chosen_maps(x: dict[str, Tensor], featmap_names: Sequence[str]) -> list[Tensor]:
    """The maps of ``x`` named in ``featmap_names``, in ``x``'s order."""
    features = [v for k, v in x.items() if k in featmap_names]
    if not features:
        raise ValueError(
            f"x must hold at least one of the maps {featmap_names}, got keys {list(x)}"
        )
    return features


def _infer_scales(features: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[float]:
    """Each map's scale: the power of two nearest ``map height / largest image height``."""
    if not image_shapes:
        raise ValueError("image_shapes must hold each image's (height, width), got an empty list")
    height = max(int(shape[0]) for shape in image_shapes)
    scales = []
    for feature in features:
        ratio = float(feature.shape[-2]) / float(height)
        scales.append(2.0 ** float(torch.tensor(ratio).log2().round()))
    return scales


def _multi_scale_roi_align(
    features: list[Tensor],
    boxes: list[Tensor],
    output_size: tuple[int, int],
    sampling_ratio: int,
    scales: list[float],
    canonical_scale: int,
    canonical_level: int,
    validate: bool,
) -> Tensor:
    """Each box pooled from its level, in box order (see :class:`MultiScaleRoIAlign`)."""
    # torchvision casts each level's crops to the first map's dtype (autocast may give levels
    # different dtypes); one call needs one dtype, so the maps are cast instead.
    first = features[0].dtype
    features = [f if f.dtype == first else f.to(first) for f in features]
    return multi_scale_roi_align(
        features, boxes, output_size, scales, sampling_ratio, False, canonical_scale,
        canonical_level, validate=validate,
    )


# FX's symbolic tracing keeps these calls whole (they iterate over lists of tensors), so that a
# detection model holding a MultiScaleRoIAlign can be traced, as with torchvision's.
for _name in ("_chosen_maps", "_infer_scales", "_multi_scale_roi_align"):
    torch.fx.wrap(_name)
del _name


# ----------------------------------------------------------------------------- position-sensitive
@torch.library.custom_op("roi_cupy::ps_roi_align", mutates_args=())
def _ps_roi_align(
    input: Tensor,
    boxes: list[Tensor],
    per_image: bool,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: Sequence[int],
    validate: bool,
) -> Tensor:
    _refuse_validation_in_capture(input, validate)
    with _on_device_of(input):
        return ops.ps_roi_align(
            input.detach(), _given_boxes(boxes, per_image), (pooled_h, pooled_w), spatial_scale,
            sampling_ratio, validate=validate,
        )


def _ps_shape(input: Tensor, boxes: list[Tensor], per_image: bool, pooled_h: int,
              pooled_w: int) -> tuple[Any, ...]:
    """``[K, C / (PH * PW), PH, PW]``: a position-sensitive output's shape."""
    return (_roi_count(boxes, per_image), input.shape[1] // (pooled_h * pooled_w), pooled_h,
            pooled_w)


@_ps_roi_align.register_fake
def _(input, boxes, per_image, pooled_h, pooled_w, spatial_scale, sampling_ratio, validate):
    return input.new_empty(_ps_shape(input, boxes, per_image, pooled_h, pooled_w))


@torch.library.custom_op("roi_cupy::ps_roi_align_backward", mutates_args=())
def _ps_roi_align_backward(
    grad_output: Tensor,
    boxes: list[Tensor],
    per_image: bool,
    input_shape: Sequence[int],
    spatial_scale: float,
    sampling_ratio: Sequence[int],
    deterministic: bool = False,
) -> Tensor:
    pooled = tuple(grad_output.shape[2:])
    with _on_device_of(grad_output):
        return ops.ps_roi_align_backward(
            grad_output.detach(), _given_boxes(boxes, per_image), tuple(input_shape), pooled,
            spatial_scale, sampling_ratio, validate=False, deterministic=deterministic,
        )


@_ps_roi_align_backward.register_fake
def _(grad_output, boxes, per_image, input_shape, spatial_scale, sampling_ratio,
      deterministic=False):
    return grad_output.new_empty(tuple(input_shape))


def _ps_roi_align_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input, boxes, per_image, _, _, spatial_scale, sampling_ratio, _ = inputs
    ctx.save_for_backward(*boxes)
    ctx.args = (per_image, tuple(input.shape), spatial_scale, sampling_ratio)


def _ps_roi_align_grad(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
    per_image, shape, spatial_scale, sampling_ratio = ctx.args
    grad_input = _ps_roi_align_backward(
        grad_output, list(ctx.saved_tensors), per_image, shape, spatial_scale, sampling_ratio,
        _deterministic(),
    )
    return (grad_input, [None] * len(ctx.saved_tensors)) + (None,) * 6


_ps_roi_align.register_autograd(_ps_roi_align_grad, setup_context=_ps_roi_align_setup)


def _ps_roi_align_backward_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    grad_output, boxes, per_image, _, spatial_scale, sampling_ratio = inputs[:6]
    ctx.save_for_backward(*boxes)
    ctx.args = (per_image, tuple(grad_output.shape[2:]), spatial_scale, sampling_ratio)


def _ps_roi_align_backward_grad(ctx: Any, grad_grad_input: Tensor) -> tuple[Any, ...]:
    # The backward is linear in grad_output; its adjoint is the forward.
    per_image, (pooled_h, pooled_w), spatial_scale, sampling_ratio = ctx.args
    grad_grad_output = _ps_roi_align(
        grad_grad_input, list(ctx.saved_tensors), per_image, pooled_h, pooled_w, spatial_scale,
        sampling_ratio, False,
    )
    rest = (None,) * (len(ctx.needs_input_grad) - 2)  # as dispatched: defaults may be left out
    return (grad_grad_output, [None] * len(ctx.saved_tensors)) + rest


_ps_roi_align_backward.register_autograd(
    _ps_roi_align_backward_grad, setup_context=_ps_roi_align_backward_setup
)


@torch.library.custom_op("roi_cupy::ps_roi_pool", mutates_args=())
def _ps_roi_pool(
    input: Tensor,
    boxes: list[Tensor],
    per_image: bool,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    validate: bool,
) -> Tensor:
    _refuse_validation_in_capture(input, validate)
    with _on_device_of(input):
        return ops.ps_roi_pool(
            input.detach(), _given_boxes(boxes, per_image), (pooled_h, pooled_w), spatial_scale,
            validate=validate,
        )


@_ps_roi_pool.register_fake
def _(input, boxes, per_image, pooled_h, pooled_w, spatial_scale, validate):
    return input.new_empty(_ps_shape(input, boxes, per_image, pooled_h, pooled_w))


@torch.library.custom_op("roi_cupy::ps_roi_pool_backward", mutates_args=())
def _ps_roi_pool_backward(
    grad_output: Tensor,
    boxes: list[Tensor],
    per_image: bool,
    input_shape: Sequence[int],
    spatial_scale: float,
    deterministic: bool = False,
) -> Tensor:
    pooled = tuple(grad_output.shape[2:])
    with _on_device_of(grad_output):
        return ops.ps_roi_pool_backward(
            grad_output.detach(), _given_boxes(boxes, per_image), tuple(input_shape), pooled,
            spatial_scale, validate=False, deterministic=deterministic,
        )


@_ps_roi_pool_backward.register_fake
def _(grad_output, boxes, per_image, input_shape, spatial_scale, deterministic=False):
    return grad_output.new_empty(tuple(input_shape))


def _ps_roi_pool_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input, boxes, per_image, _, _, spatial_scale, _ = inputs
    ctx.save_for_backward(*boxes)
    ctx.args = (per_image, tuple(input.shape), spatial_scale)


def _ps_roi_pool_grad(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
    per_image, shape, spatial_scale = ctx.args
    grad_input = _ps_roi_pool_backward(
        grad_output, list(ctx.saved_tensors), per_image, shape, spatial_scale, _deterministic()
    )
    return (grad_input, [None] * len(ctx.saved_tensors)) + (None,) * 5


_ps_roi_pool.register_autograd(_ps_roi_pool_grad, setup_context=_ps_roi_pool_setup)


def _ps_roi_pool_backward_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    grad_output, boxes, per_image, _, spatial_scale = inputs[:5]
    ctx.save_for_backward(*boxes)
    ctx.args = (per_image, tuple(grad_output.shape[2:]), spatial_scale)


def _ps_roi_pool_backward_grad(ctx: Any, grad_grad_input: Tensor) -> tuple[Any, ...]:
    # The backward is linear in grad_output; its adjoint is the forward.
    per_image, (pooled_h, pooled_w), spatial_scale = ctx.args
    grad_grad_output = _ps_roi_pool(
        grad_grad_input, list(ctx.saved_tensors), per_image, pooled_h, pooled_w, spatial_scale,
        False,
    )
    rest = (None,) * (len(ctx.needs_input_grad) - 2)  # as dispatched: defaults may be left out
    return (grad_grad_output, [None] * len(ctx.saved_tensors)) + rest


_ps_roi_pool_backward.register_autograd(
    _ps_roi_pool_backward_grad, setup_context=_ps_roi_pool_backward_setup
)


def ps_roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
    *,
    validate: bool = True,
) -> Tensor:
    """Position-sensitive RoI Align with autograd, as ``torchvision.ops.ps_roi_align``.

    Args:
        input (Tensor[N, C, H, W]): features, float16, bfloat16, float32 or float64, on the CPU
            or a CUDA device; C a multiple of ``PH * PW``.
        boxes (Tensor[K, 5] or list of N Tensor[L_i, 4]): as for :func:`roi_align`.
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): box-to-feature coordinate factor. Default: 1.0.
        sampling_ratio (int or (int, int)): samples per bin along both axes, or
            ``(sampling_h, sampling_w)``; ``<= 0`` adaptive. Default: -1.
        validate (bool): as for :func:`roi_align`. Default: True.

    Returns:
        Tensor[K, C / (PH * PW), PH, PW]: in the input's dtype and device; bin ``(ph, pw)`` of
        channel ``c`` reads input channel ``(c * PH + ph) * PW + pw``. Differentiable in
        ``input``.
    """
    _check_input(input)
    tensors, per_image = _boxes(boxes)
    pooled_h, pooled_w = _args.output_size_pair(output_size)
    _args.position_groups(input.shape[1], (pooled_h, pooled_w), "input", output_size)
    return _ps_roi_align(
        input, tensors, per_image, pooled_h, pooled_w, _args.spatial_scale_of(spatial_scale),
        _args.sampling_of(sampling_ratio), _args.flag(validate, "validate"),
    )


def ps_roi_pool(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    *,
    validate: bool = True,
) -> Tensor:
    """Position-sensitive RoI Pool with autograd, as ``torchvision.ops.ps_roi_pool``.

    Args:
        input (Tensor[N, C, H, W]): features, float16, bfloat16, float32 or float64; C a
            multiple of ``PH * PW``.
        boxes (Tensor[K, 5] or list of N Tensor[L_i, 4]): as for :func:`roi_align`.
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): box-to-feature coordinate factor. Default: 1.0.
        validate (bool): as for :func:`roi_align`. Default: True.

    Returns:
        Tensor[K, C / (PH * PW), PH, PW]: each bin's window mean on its own channel, in the
        input's dtype and device; differentiable in ``input`` (the gradient of this forward pass,
        where torchvision's differs at the last row and column, see docs/semantics.md).
    """
    _check_input(input)
    tensors, per_image = _boxes(boxes)
    pooled_h, pooled_w = _args.output_size_pair(output_size)
    _args.position_groups(input.shape[1], (pooled_h, pooled_w), "input", output_size)
    return _ps_roi_pool(
        input, tensors, per_image, pooled_h, pooled_w, _args.spatial_scale_of(spatial_scale),
        _args.flag(validate, "validate"),
    )


class PSRoIAlign(nn.Module):
    """:func:`ps_roi_align` as a module, as ``torchvision.ops.PSRoIAlign``.

    Args:
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): box-to-feature coordinate factor.
        sampling_ratio (int or (int, int)): samples per bin along both axes or per axis,
            ``<= 0`` adaptive.
        validate (bool): as for :func:`ps_roi_align`; ``False`` inside a CUDA graph capture.
            Default: True.
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        *,
        validate: bool = True,
    ):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.validate = validate

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return ps_roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
            validate=self.validate,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio})"
        )


class PSRoIPool(nn.Module):
    """:func:`ps_roi_pool` as a module, as ``torchvision.ops.PSRoIPool``.

    Args:
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): box-to-feature coordinate factor.
        validate (bool): as for :func:`ps_roi_pool`. Default: True.
    """

    def __init__(
        self, output_size: int | tuple[int, int], spatial_scale: float, *, validate: bool = True
    ):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.validate = validate

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return ps_roi_pool(
            input, rois, self.output_size, self.spatial_scale, validate=self.validate
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale})"
        )


# ----------------------------------------------------------------------------- RoI Align Rotated
@torch.library.custom_op("roi_cupy::roi_align_rotated", mutates_args=())
def _roi_align_rotated(
    input: Tensor,
    boxes: list[Tensor],
    per_image: bool,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: Sequence[int],
    aligned: bool,
    clockwise: bool,
    validate: bool,
) -> Tensor:
    _refuse_validation_in_capture(input, validate)
    with _on_device_of(input):
        return ops.roi_align_rotated(
            input.detach(), _given_boxes(boxes, per_image), (pooled_h, pooled_w), spatial_scale,
            sampling_ratio, aligned, clockwise, validate=validate,
        )


@_roi_align_rotated.register_fake
def _(input, boxes, per_image, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned,
      clockwise, validate):
    return input.new_empty((_roi_count(boxes, per_image), input.shape[1], pooled_h, pooled_w))


@torch.library.custom_op("roi_cupy::roi_align_rotated_backward", mutates_args=())
def _roi_align_rotated_backward(
    grad_output: Tensor,
    boxes: list[Tensor],
    per_image: bool,
    input_shape: Sequence[int],
    spatial_scale: float,
    sampling_ratio: Sequence[int],
    aligned: bool,
    clockwise: bool,
    deterministic: bool = False,
) -> Tensor:
    pooled = tuple(grad_output.shape[2:])
    with _on_device_of(grad_output):
        return ops.roi_align_rotated_backward(
            grad_output.detach(), _given_boxes(boxes, per_image), tuple(input_shape), pooled,
            spatial_scale, sampling_ratio, aligned, clockwise, validate=False,
            deterministic=deterministic,
        )


@_roi_align_rotated_backward.register_fake
def _(grad_output, boxes, per_image, input_shape, spatial_scale, sampling_ratio, aligned,
      clockwise, deterministic=False):
    return grad_output.new_empty(tuple(input_shape))


def _roi_align_rotated_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input, boxes, per_image, _, _, spatial_scale, sampling_ratio, aligned, clockwise, _ = inputs
    ctx.save_for_backward(*boxes)
    ctx.args = (per_image, tuple(input.shape), spatial_scale, sampling_ratio, aligned, clockwise)


def _roi_align_rotated_grad(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
    grad_input = _roi_align_rotated_backward(
        grad_output, list(ctx.saved_tensors), *ctx.args, _deterministic()
    )
    return (grad_input, [None] * len(ctx.saved_tensors)) + (None,) * 8


_roi_align_rotated.register_autograd(
    _roi_align_rotated_grad, setup_context=_roi_align_rotated_setup
)


def _roi_align_rotated_backward_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    grad_output, boxes, per_image, _, spatial_scale, sampling_ratio, aligned, clockwise = inputs[:8]
    ctx.save_for_backward(*boxes)
    ctx.args = (
        per_image, tuple(grad_output.shape[2:]), spatial_scale, sampling_ratio, aligned, clockwise
    )


def _roi_align_rotated_backward_grad(ctx: Any, grad_grad_input: Tensor) -> tuple[Any, ...]:
    # The backward is linear in grad_output; its adjoint is the forward.
    per_image, (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned, clockwise = ctx.args
    grad_grad_output = _roi_align_rotated(
        grad_grad_input, list(ctx.saved_tensors), per_image, pooled_h, pooled_w, spatial_scale,
        sampling_ratio, aligned, clockwise, False,
    )
    rest = (None,) * (len(ctx.needs_input_grad) - 2)  # as dispatched: defaults may be left out
    return (grad_grad_output, [None] * len(ctx.saved_tensors)) + rest


_roi_align_rotated_backward.register_autograd(
    _roi_align_rotated_backward_grad, setup_context=_roi_align_rotated_backward_setup
)


def roi_align_rotated(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = True,
    clockwise: bool = False,
    *,
    validate: bool = True,
) -> Tensor:
    """RoI Align of rotated boxes with autograd: :func:`roi_cupy.roi_align_rotated`'s numbers
    (detectron2's ROIAlignRotated, mmcv's roi_align_rotated with the angle in degrees).

    Args:
        input (Tensor[N, C, H, W]): features, float16, bfloat16, float32 or float64, on the CPU
            or a CUDA device.
        boxes (Tensor[K, 6] or list of N Tensor[L_i, 5]): ``(batch_index, cx, cy, w, h, angle)``
            rows, or each image's ``(cx, cy, w, h, angle)`` boxes, the angle in degrees
            (counter-clockwise as the image is shown), on the input's device.
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): box-to-feature coordinate factor. Default: 1.0.
        sampling_ratio (int or (int, int)): samples per bin along both box axes, or
            ``(sampling_h, sampling_w)``; ``<= 0`` adaptive. Default: -1.
        aligned (bool): half-pixel shift of the centre (detectron2); ``False`` is mmcv's legacy
            rule. Default: True.
        clockwise (bool): the angle turns clockwise. Default: False.
        validate (bool): as for :func:`roi_align`. Default: True.

    Returns:
        Tensor[K, C, PH, PW]: in the input's dtype and device; differentiable in ``input``.
    """
    _check_input(input)
    tensors, per_image = _boxes(boxes, 6)
    pooled_h, pooled_w = _args.output_size_pair(output_size)
    return _roi_align_rotated(
        input, tensors, per_image, pooled_h, pooled_w, _args.spatial_scale_of(spatial_scale),
        _args.sampling_of(sampling_ratio, rotated.MOST_SAMPLES),
        _args.flag(aligned, "aligned"), _args.flag(clockwise, "clockwise"),
        _args.flag(validate, "validate"),
    )


class RoIAlignRotated(nn.Module):
    """:func:`roi_align_rotated` as a module, as detectron2's ``ROIAlignRotated`` and mmcv's
    ``RoIAlignRotated``.

    Args:
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): box-to-feature coordinate factor.
        sampling_ratio (int or (int, int)): samples per bin along both box axes or per axis,
            ``<= 0`` adaptive.
        aligned (bool): half-pixel shift of the centre. Default: True.
        clockwise (bool): the angle turns clockwise. Default: False.
        validate (bool): as for :func:`roi_align`; ``False`` inside a CUDA graph capture.
            Default: True.
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int | tuple[int, int],
        aligned: bool = True,
        clockwise: bool = False,
        *,
        validate: bool = True,
    ):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.clockwise = clockwise
        self.validate = validate

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align_rotated(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
            self.clockwise, validate=self.validate,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, "
            f"aligned={self.aligned}, clockwise={self.clockwise})"
        )
