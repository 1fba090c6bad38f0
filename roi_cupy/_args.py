"""Argument checks and box normalisation shared by every entry point.

The functional ops (``roi_cupy._ops``), the framework adapters and the layers all check their
arguments here, so that a bad argument gets the same error wherever it is passed, and normalise
boxes here to the ``[K, 5]`` array of the compute dtype that backends take.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy

from roi_cupy import _backend, _interop

BoxesLike = Any  # an array [K, 5], or a sequence of N arrays [L_i, 4]
SizeLike = int | tuple[int, int]
SamplingLike = int | tuple[int, int]  # one for both axes, or (sampling_h, sampling_w)

_FEATURE_DTYPES = ("float16", "float32", "float64", "bfloat16")
_INT32_MAX = 2**31 - 1


def check_features(array: Any, what: str) -> None:
    if array.ndim != 4:
        raise ValueError(f"{what} must have shape [N, C, H, W], got {tuple(array.shape)}")
    if numpy.dtype(array.dtype).name not in _FEATURE_DTYPES:
        raise TypeError(
            f"{what} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {array.dtype}"
        )


def output_size_pair(output_size: Any) -> tuple[int, int]:
    def is_int(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if is_int(output_size):
        size = (int(output_size), int(output_size))
    elif (
        isinstance(output_size, Sequence)
        and len(output_size) == 2
        and all(is_int(v) for v in output_size)
    ):
        size = (int(output_size[0]), int(output_size[1]))
    else:
        raise TypeError(f"output_size must be an int or a pair of ints, got {output_size!r}")
    if min(size) <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    if max(size) > _INT32_MAX:  # the kernels count bins in int
        raise ValueError(f"output_size must be at most {_INT32_MAX} per side, got {output_size!r}")
    return size


def spatial_scale_of(spatial_scale: Any, compute: Any = None) -> float:
    """``spatial_scale`` as a float; with ``compute`` (the compute dtype) it must also lie
    within that dtype's range, since the backends multiply in it."""
    if not isinstance(spatial_scale, numbers.Real) or isinstance(spatial_scale, bool):
        raise TypeError(f"spatial_scale must be a real number, got {spatial_scale!r}")
    value = float(spatial_scale)
    if not 0 < value < math.inf:  # comparisons only: torch.compile traces a symbolic scale
        raise ValueError(f"spatial_scale must be positive and finite, got {spatial_scale!r}")
    if compute is not None and value > float(numpy.finfo(compute).max):
        raise ValueError(
            f"spatial_scale must lie within {numpy.dtype(compute).name}'s range, the precision "
            f"these features are computed in, got {spatial_scale!r}"
        )
    return value


def sampling_of(sampling_ratio: Any, most: int | None = None) -> tuple[int, int]:
    """``sampling_ratio`` (an int, or a pair ``(sampling_h, sampling_w)``) as a pair of ints;
    a value ``<= 0`` makes that axis adaptive. ``most``: the largest fixed value an op takes
    (None: any; the backends cap the grid at 2**20)."""

    def is_int(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if is_int(sampling_ratio):
        pair = int(sampling_ratio), int(sampling_ratio)
    elif (
        isinstance(sampling_ratio, Sequence)
        and not isinstance(sampling_ratio, str)
        and len(sampling_ratio) == 2
        and all(is_int(v) for v in sampling_ratio)
    ):
        pair = int(sampling_ratio[0]), int(sampling_ratio[1])
    else:
        raise TypeError(
            "sampling_ratio must be an int or a pair of ints (sampling_h, sampling_w), <= 0 for "
            f"adaptive, got {sampling_ratio!r}"
        )
    if most is not None and max(pair) > most:
        raise ValueError(
            f"sampling_ratio must be at most {most} along each axis for this op (<= 0 for "
            f"adaptive), got {sampling_ratio!r}"
        )
    return pair


def flag(value: Any, what: str) -> bool:
    """A bool argument: ``True``/``False`` or a NumPy bool scalar; anything else is refused, since
    ``bool("False")`` and ``bool(numpy.array([True, False]))`` would mislead."""
    if not isinstance(value, (bool, numpy.bool_)):
        raise TypeError(f"{what} must be a bool, got {value!r}")
    return bool(value)


def input_shape_of(input_shape: Any) -> tuple[int, int, int, int]:
    ok = (
        isinstance(input_shape, Sequence)
        and len(input_shape) == 4
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in input_shape)
        and all(v >= 0 for v in input_shape)
    )
    if not ok:
        raise ValueError(
            f"input_shape must be four non-negative ints (N, C, H, W), got {input_shape!r}"
        )
    return tuple(int(v) for v in input_shape)


def compute_dtype(dtype: Any) -> numpy.dtype:
    """The dtype coordinates are computed in: float64 for float64 features, float32 otherwise."""
    return numpy.dtype(numpy.float64 if numpy.dtype(dtype) == numpy.float64 else numpy.float32)


def check_box_dtype(array: Any, what: str) -> None:
    kind = numpy.dtype(array.dtype).kind
    if kind not in "fiu" and numpy.dtype(array.dtype).name != "bfloat16":
        raise TypeError(f"{what} must have a real dtype, got {array.dtype}")


def convert_boxes_to_roi_format(boxes: BoxesLike) -> Any:
    """Turn per-image boxes into the ``[sum L_i, 5]`` format the operators take.

    Args:
        boxes (Tensor[B, K, 4] or list of B Tensor[L_i, 4]): boxes ``(x1, y1, x2, y2)`` of each
            image, as any array kind roi_cupy accepts.

    Returns:
        Tensor[sum L_i, 5]: rows ``(batch_index, x1, y1, x2, y2)``, image-major (b0k0, b0k1, ...,
        b1k0, ...), in the boxes' dtype and array kind.
    """
    if isinstance(boxes, (list, tuple)):
        if not boxes:
            raise ValueError("boxes must hold at least one image's boxes, got an empty list")
        arrays = [_interop.unwrap(b, f"boxes[{i}]") for i, b in enumerate(boxes)]
        kind = arrays[0][1]
        rois = concat_per_image([a for a, _ in arrays])
        return _interop.wrap(rois, kind)
    array, kind = _interop.unwrap(boxes, "boxes")
    if array.ndim != 3 or array.shape[2] != 4:
        raise ValueError(f"boxes must have shape [B, K, 4], got {tuple(array.shape)}")
    check_box_dtype(array, "boxes")
    if array.shape[0] == 0:  # no image: no RoI
        xp = _interop.array_module(array)
        with device_scope(array):
            return _interop.wrap(xp.empty((0, 5), dtype=array.dtype), kind)
    return _interop.wrap(concat_per_image(list(array)), kind)


def concat_per_image(per_image: list[Any], compute: Any = None, columns: int = 5) -> Any:
    """``[L_i, 4]`` arrays (one per image, one device) -> ``[sum L_i, 5]`` with the index column
    (``[L_i, columns - 1]`` -> ``[sum L_i, columns]`` for other row widths, 6 for rotated boxes).

    The result has the boxes' dtype, or with ``compute`` the wider of the two (the index column
    then holds every image index exactly, also for float16 and bfloat16 boxes); in the boxes'
    own dtype an index it cannot hold exactly is refused.
    """
    first = per_image[0]
    xp = _interop.array_module(first)
    device = _interop.device_of(first)
    dtype = first.dtype
    wide = dtype if compute is None else numpy.promote_types(dtype, compute)
    last = len(per_image) - 1
    if numpy.asarray(last, dtype=wide).item() != last:
        raise ValueError(
            f"boxes of dtype {numpy.dtype(dtype).name} cannot hold image index {last} exactly: "
            "convert them to float32 first"
        )
    for i, b in enumerate(per_image):
        if _interop.device_of(b) != device:
            raise ValueError(f"boxes[{i}] is on {_interop.device_of(b)} but boxes[0] is on {device}")
        check_box_dtype(b, f"boxes[{i}]")
        if b.ndim != 2 or b.shape[1] != columns - 1:
            raise ValueError(
                f"boxes[{i}] must have shape [L, {columns - 1}] (one image's boxes), "
                f"got {tuple(b.shape)}"
            )
        if b.dtype != dtype:
            raise TypeError(f"boxes[{i}] has dtype {b.dtype} but boxes[0] has {dtype}")
    with device_scope(first):
        counts = [b.shape[0] for b in per_image]
        rois = xp.empty((sum(counts), columns), dtype=wide)
        # A fill and a copy per image that has boxes, on the device: no host-to-device copy
        # (CUDA graph capture allows none from pageable memory; CuPy's concatenate of more than
        # a few arrays sends their pointers from the host).
        start = 0
        for i, (b, count) in enumerate(zip(per_image, counts)):
            if count:
                rois[start : start + count, 0] = i
                rois[start : start + count, 1:] = b
            start += count
        return rois


def refuse_nested_lists(boxes: Sequence[Any], columns: int = 5) -> None:
    """A list is taken as one array per image; a list of Python lists or numbers is most likely
    a ``[K, 5]`` (``[K, columns]``) table written out, so say how to pass it."""
    plain = next((b for b in boxes if isinstance(b, (list, tuple, numbers.Number))), None)
    if plain is not None:
        raise TypeError(
            f"boxes must be an array [K, {columns}] or a list of one array [L_i, {columns - 1}] "
            "per image, got a "
            f"list of {type(plain).__module__}.{type(plain).__qualname__}: pass "
            "numpy.asarray(boxes, dtype=numpy.float32)"
        )


def device_scope(array: Any) -> Any:
    """Make ``array``'s GPU current, so that new arrays and launches land beside it."""
    if _interop.is_cupy_array(array):
        return array.device
    import contextlib

    return contextlib.nullcontext()


def normalise_boxes(
    boxes: BoxesLike, n: int, device: str, compute: numpy.dtype, columns: int = 5
) -> Rois:
    """Normalise ``boxes`` (an array [K, 5] or a list of N arrays [L_i, 4]) to a contiguous
    ``[K, 5]`` array of the compute dtype on ``device``; ``columns`` is the row width with the
    batch index (6 for rotated boxes ``(batch_index, cx, cy, w, h, angle)``)."""
    if isinstance(boxes, (list, tuple)):
        refuse_nested_lists(boxes, columns)
        if len(boxes) != n:
            raise ValueError(
                f"boxes must hold one array per image: got a list of {len(boxes)} for N = {n}"
            )
        if n == 0:
            xp = numpy if device == "cpu" else _interop.cupy_or_none()
            empty = xp.empty((0, columns), dtype=compute)
            return Rois(empty, empty)
        per_image = [
            _interop.unwrap_like(b, f"boxes[{i}]", device, "input") for i, b in enumerate(boxes)
        ]
        rois = concat_per_image(per_image, compute, columns)
    else:
        rois = _interop.unwrap_like(boxes, "boxes", device, "input")
        check_box_dtype(rois, "boxes")
        if rois.ndim != 2 or rois.shape[1] != columns:
            raise ValueError(
                f"boxes must have shape [K, {columns}] or be a list of [L, {columns - 1}] per "
                f"image, got {tuple(rois.shape)}"
            )
    if rois.dtype == compute and rois.flags.c_contiguous:
        return Rois(rois, rois)
    xp = _interop.array_module(rois)
    with device_scope(rois):
        with numpy.errstate(over="ignore"):  # beyond float32's range: inf, an invalid RoI
            return Rois(xp.ascontiguousarray(rois, dtype=compute), rois)


class Rois:
    """The ``[K, 5]`` RoIs of a call in the compute dtype (``array``), and the boxes as given.

    ``check()`` validates the boxes at their own precision where it is wider than the compute
    dtype (float64 boxes for float32 features), so that a fractional batch index or a value
    beyond float32's range is caught before narrowing hides it.
    """

    def __init__(self, array: Any, given: Any):
        self.array = array
        self.given = given

    def check(
        self,
        backend: Any,
        n: int,
        indices: Any = None,
        input_shape: tuple[int, int, int, int] | None = None,
        shown: Any = None,
    ) -> None:
        """Reject values that are not finite in the compute dtype and batch indices that are not
        integers in ``[0, n)``; with ``indices``, also RoI Pool indices outside ``[-1, H * W)``
        (the error shows the value of ``shown``, the indices as given, where they were
        converted).

        The backend finds the first bad row and index (on a GPU: small kernels and one
        synchronisation); they are read back only to word the error.
        """
        rois, compute = self.array, numpy.dtype(self.array.dtype)
        if numpy.dtype(self.given.dtype) == numpy.float64 and compute != numpy.float64:
            with device_scope(rois):
                rois = _interop.array_module(rois).ascontiguousarray(self.given)
        limit = float(numpy.finfo(compute).max)
        h, w = input_shape[2:] if input_shape is not None else (0, 0)
        row, position = backend.first_invalid(rois, n, limit, indices, h * w)
        if row >= 0:
            reject_row(rois, row, n, compute)
        if position >= 0:
            reject_index(indices if shown is None else shown, position, input_shape)


def reject_index(indices: Any, position: int, input_shape: tuple[int, int, int, int]) -> None:
    """Raise the ValueError that names the index at flat ``position`` and its range."""
    h, w = input_shape[2:]
    where = tuple(int(v) for v in numpy.unravel_index(position, indices.shape))
    raise ValueError(
        f"indices must lie in [-1, {h * w}) for an H x W = {h} x {w} plane, "
        f"got {int(indices[where])} at {where}"
    )


def reject_row(rois: Any, row: int, n: int, compute: numpy.dtype) -> None:
    """Raise the ValueError that says what is wrong with RoI ``row``."""
    limit = float(numpy.finfo(compute).max)
    values = [float(v) for v in rois[row].tolist()]
    if not all(numpy.isfinite(values)):
        raise ValueError(f"boxes must be finite, got row {row}: {values}")
    if not all(abs(v) <= limit for v in values):
        raise ValueError(
            f"boxes must lie within {compute.name}'s range (+-{limit:.7g}), the precision "
            f"they are computed in for these features, got row {row}: {values}"
        )
    raise ValueError(
        f"boxes' batch index must be an integer in [0, {n}), got {values[0]!r} in row {row}"
    )


class Call:
    """One op call's arguments, unwrapped and checked; ``give_back`` wraps a result."""

    def __init__(self, array: Any, what: str):
        self.array, self.kind = _interop.unwrap(array, what)
        self.device = _interop.device_of(self.array)
        self.xp = _interop.array_module(self.array)
        self.backend = _backend.backend_for(self.xp)

    def native(self) -> Any:
        """The array as the backend takes it: C-contiguous, unless the backend reads any
        strides (``Capabilities.strided``), so that no copy of a large strided input is made."""
        if self.backend.CAPABILITIES.strided:
            return self.array
        with device_scope(self.array):
            return self.xp.ascontiguousarray(self.array)

    def native_or_channels_last(self) -> Any:
        """:meth:`native`, but features laid out channels-last stay as they are for a backend
        that reads them so (``Capabilities.channels_last``): a torch ``channels_last`` tensor,
        say, is not copied to ``[N, C, H, W]`` order."""
        if self.backend.CAPABILITIES.channels_last and _interop.is_channels_last(self.array):
            return self.array
        return self.native()

    def scope(self) -> Any:
        return device_scope(self.array)

    def give_back(self, result: Any) -> Any:
        return _interop.wrap(result, self.kind)


def check_grad_output(grad: Any, k: int, c: int, size: tuple[int, int] | None) -> None:
    check_features(grad, "grad_output")
    expected = (k, c) + (size if size is not None else tuple(grad.shape[2:]))
    if tuple(grad.shape) != expected:
        raise ValueError(
            f"grad_output must have shape [K, C, PH, PW] = {list(expected)} to fit boxes and "
            f"input_shape, got {tuple(grad.shape)}"
        )


# ----------------------------------------------------------------------------- position-sensitive
def position_groups(channels: int, size: tuple[int, int], what: str, output_size: Any) -> int:
    """``C / (PH * PW)``, the output channels of a position-sensitive operator, whose output
    channel ``c`` at bin ``(ph, pw)`` reads input channel ``(c * PH + ph) * PW + pw``.

    Raises:
        ValueError: naming ``what`` (the features or ``input_shape``) and ``output_size`` when C
            is not a multiple of ``PH * PW``.
    """
    bins = size[0] * size[1]
    if channels % bins:
        raise ValueError(
            f"{what} must have a channel count C that is a multiple of PH * PW = {bins} for "
            f"output_size {output_size!r} (each bin reads its own C / (PH * PW) channels), "
            f"got C = {channels}"
        )
    return channels // bins


def check_position_grad_output(grad: Any, k: int, groups: int, size: tuple[int, int]) -> None:
    check_features(grad, "grad_output")
    expected = (k, groups) + size
    if tuple(grad.shape) != expected:
        raise ValueError(
            f"grad_output must have shape [K, C / (PH * PW), PH, PW] = {list(expected)} to fit "
            f"boxes, input_shape and output_size, got {tuple(grad.shape)}"
        )


# ----------------------------------------------------------------------------- RoI Align modes
# What a RoI Align bin holds: the mean of its samples, or the largest of them (mmcv's max mode).
ALIGN_MODES = ("avg", "max")


def align_mode(mode: Any) -> str:
    """RoI Align's ``mode``: ``"avg"`` or ``"max"`` (see docs/semantics.md)."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, 'avg' or 'max', got {mode!r}")
    if mode not in ALIGN_MODES:
        raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")
    return str(mode)


def check_saved_input(
    array: Any, mode: str, input_shape: tuple[int, int, int, int], dtype: Any
) -> None:
    """The forward's features that ``roi_align_backward`` takes as ``input``: ``None`` (refused
    for ``mode="max"``, which finds each bin's maximum in them again) or an array of
    ``input_shape`` and grad_output's dtype."""
    if array is None:
        if mode == "max":
            raise TypeError(
                "roi_align_backward(mode='max') needs input, the forward's features "
                "[N, C, H, W], to find each bin's maximum sample again: pass input=..."
            )
        return
    check_features(array, "input")
    if tuple(array.shape) != tuple(input_shape):
        raise ValueError(
            f"input must have shape input_shape = {tuple(input_shape)}, got {tuple(array.shape)}"
        )
    if numpy.dtype(array.dtype) != numpy.dtype(dtype):
        raise TypeError(
            f"input must have grad_output's dtype {numpy.dtype(dtype).name}, got {array.dtype}"
        )


# ----------------------------------------------------------------------------- feature pyramids
MAX_LEVELS = 8  # levels of one multi-scale call (each is five kernel parameters)
_LEVEL_RULE_MAX = 2**24  # canonical_scale and |canonical_level| stay exact in float32


def pyramid_of(features: Any) -> list[Any]:
    """The maps of a pyramid, unwrapped and checked: 1 to :data:`MAX_LEVELS` arrays
    ``[N, C, H_l, W_l]`` of one floating dtype, N and C, on one device (as ``features[0]``)."""
    if not isinstance(features, Sequence) or isinstance(features, str):
        raise TypeError(
            "features must be a list of arrays [N, C, H_l, W_l], one per level, got "
            f"{type(features).__module__}.{type(features).__qualname__}"
        )
    if not 1 <= len(features) <= MAX_LEVELS:
        raise ValueError(f"features must hold 1 to {MAX_LEVELS} levels, got {len(features)}")
    arrays = [_interop.unwrap(f, f"features[{i}]")[0] for i, f in enumerate(features)]
    first = arrays[0]
    for i, array in enumerate(arrays):
        check_features(array, f"features[{i}]")
        if _interop.device_of(array) != _interop.device_of(first):
            raise ValueError(
                f"features[{i}] is on {_interop.device_of(array)} but features[0] is on "
                f"{_interop.device_of(first)}; move all levels to the same device"
            )
        if array.dtype != first.dtype:
            raise TypeError(
                f"features[{i}] has dtype {array.dtype} but features[0] has {first.dtype}"
            )
        if tuple(array.shape[:2]) != tuple(first.shape[:2]):
            raise ValueError(
                f"features[{i}] must have the N and C of features[0] = {tuple(first.shape[:2])}, "
                f"got shape {tuple(array.shape)}"
            )
    return arrays


def input_shapes_of(input_shapes: Any) -> list[tuple[int, int, int, int]]:
    """The forward's level shapes: 1 to :data:`MAX_LEVELS` shapes ``(N, C, H_l, W_l)`` with one
    N and C."""
    if not isinstance(input_shapes, Sequence) or isinstance(input_shapes, str):
        raise TypeError(
            f"input_shapes must be a list of (N, C, H_l, W_l), one per level, got {input_shapes!r}"
        )
    if not 1 <= len(input_shapes) <= MAX_LEVELS:
        raise ValueError(
            f"input_shapes must hold 1 to {MAX_LEVELS} levels, got {len(input_shapes)}"
        )
    shapes = [input_shape_of(shape) for shape in input_shapes]
    for i, shape in enumerate(shapes):
        if shape[:2] != shapes[0][:2]:
            raise ValueError(
                f"input_shapes[{i}] must have the N and C of input_shapes[0] = {shapes[0][:2]}, "
                f"got {shape}"
            )
    return shapes


def spatial_scales_of(spatial_scales: Any, levels: int, compute: Any) -> list[float]:
    """One positive finite scale per level, each within the compute dtype's range and, since
    the level rule reads the first and the last in float32, within float32's."""
    if not isinstance(spatial_scales, Sequence) or isinstance(spatial_scales, str):
        raise TypeError(
            f"spatial_scales must be a list of {levels} real numbers (one per level), "
            f"got {spatial_scales!r}"
        )
    if len(spatial_scales) != levels:
        raise ValueError(
            f"spatial_scales must hold one scale per level ({levels}), got {len(spatial_scales)}: "
            f"{list(spatial_scales)!r}"
        )
    scales = []
    for i, scale in enumerate(spatial_scales):
        try:
            scales.append(spatial_scale_of(scale, compute))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"spatial_scales[{i}]: {exc}") from None
        if not 0 < numpy.float32(scales[-1]) < numpy.inf:
            raise ValueError(
                f"spatial_scales[{i}] must lie within float32's range (positive once rounded), "
                f"got {scale!r}"
            )
    return scales


def canonical_of(canonical_scale: Any, canonical_level: Any) -> tuple[int, int]:
    """The level rule's ``(canonical_scale, canonical_level)``: ints, the scale in
    ``[1, 2**24]`` and the level in ``[-2**24, 2**24]`` (both exact in float32)."""
    for value, what in ((canonical_scale, "canonical_scale"), (canonical_level, "canonical_level")):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{what} must be an int, got {value!r}")
    if not 1 <= canonical_scale <= _LEVEL_RULE_MAX:
        raise ValueError(
            f"canonical_scale must be an int in [1, {_LEVEL_RULE_MAX}], got {canonical_scale!r}"
        )
    if not -_LEVEL_RULE_MAX <= canonical_level <= _LEVEL_RULE_MAX:
        raise ValueError(
            f"canonical_level must be an int in [-{_LEVEL_RULE_MAX}, {_LEVEL_RULE_MAX}], "
            f"got {canonical_level!r}"
        )
    return int(canonical_scale), int(canonical_level)
