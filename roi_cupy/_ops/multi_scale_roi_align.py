"""Multi-scale RoI Align's functional entry points: check, normalise, turn the level rule into the
bounds the backends compare against, dispatch to a backend."""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy

from roi_cupy import _args
from roi_cupy._args import BoxesLike, SamplingLike, SizeLike

# torchvision's LevelMapper eps, added before the floor so that a box whose sqrt(area) falls a
# rounding error short of canonical_scale * 2**j still lands on level canonical_level + j.
_EPS = 1e-6


def _pyramid_level(scale: float) -> int:
    """The pyramid level ``k`` of a map at ``scale`` as torchvision infers it, ``int(-log2(s))``
    with ``s`` in float32 (truncation toward zero, so exact for powers of two)."""
    return int(-float(numpy.float32(math.log2(float(numpy.float32(scale))))))


def _raw_level(q: Any, compute: numpy.dtype, canonical_level: int) -> float:
    """``floor(canonical_level + log2(q) + eps)`` in the compute dtype, each step rounded as
    torch rounds it; log2 is the C library's in float64, rounded to the compute dtype."""
    t = compute.type
    log2 = t(math.log2(q)) if q > 0 else t(-math.inf)
    with numpy.errstate(over="ignore"):
        v = t(t(t(canonical_level) + log2) + t(_EPS))
    return math.floor(v) if math.isfinite(v) else float(v)


@functools.lru_cache(maxsize=256)
def _bounds(
    compute_name: str, first: int, last: int, levels: int, canonical_level: int
) -> tuple[float, ...]:
    """The least ``q`` of the compute dtype that goes beyond level 0, 1, ... (see
    :func:`level_bounds`), found by bisection over the ordered bit patterns of ``q >= 0``."""
    compute = numpy.dtype(compute_name)
    if last < first:  # torch.clamp(min > max) gives max: every box below level 0, on no map
        return (0.0,) * levels
    bits = numpy.dtype(f"u{compute.itemsize}")
    infinity = int(numpy.array(numpy.inf, compute).view(bits))
    bounds = []
    for j in range(1, min(last - first, levels) + 1):
        lo, hi = 0, infinity  # level(0) = -inf, level(inf) = inf: the bound lies in (0, inf]
        while lo < hi:
            mid = (lo + hi) // 2
            q = numpy.array(mid, bits).view(compute)[()]
            if _raw_level(float(q), compute, canonical_level) >= first + j:
                hi = mid
            else:
                lo = mid + 1
        bounds.append(float(numpy.array(lo, bits).view(compute)[()]))
    return tuple(bounds)


def level_bounds(
    spatial_scales: Sequence[float], canonical_level: int, compute: Any
) -> tuple[float, ...]:
    """torchvision's level rule as the bounds the backends compare ``q`` against.

    A box's level is ``clamp(floor(canonical_level + log2(q) + 1e-6), k_min, k_max) - k_min``
    with ``q = sqrt(area) / canonical_scale``, ``k_min`` and ``k_max`` the pyramid levels of the
    first and the last scale. Every step is monotone in ``q``, so the level is the number of
    bounds ``q`` reaches: bound ``j`` (from 1) is the least ``q`` of level ``j`` or more. A box that
    reaches ``len(spatial_scales)`` bounds (the clamp allows more levels than there are maps)
    or whose ``q`` is NaN is pooled from no map.

    Returns:
        tuple of float: at most ``len(spatial_scales)`` rising values, each exactly a value of
        the compute dtype.
    """
    first, last = _pyramid_level(spatial_scales[0]), _pyramid_level(spatial_scales[-1])
    return _bounds(
        numpy.dtype(compute).name, first, last, len(spatial_scales), canonical_level
    )


def multi_scale_roi_align(
    features: Sequence[Any],
    boxes: BoxesLike,
    output_size: SizeLike,
    spatial_scales: Sequence[float],
    sampling_ratio: SamplingLike = -1,
    aligned: bool = False,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    *,
    validate: bool = True,
) -> Any:
    """RoI Align over a feature pyramid (FPN): each box pooled from the level its size picks.

    Box ``(x1, y1, x2, y2)`` goes to level ``clamp(floor(canonical_level + log2(sqrt((x2 - x1) *
    (y2 - y1)) / canonical_scale) + 1e-6), k_min, k_max) - k_min``, with ``k = int(-log2(s))``
    of the first and the last scale, computed in the compute dtype: the level
    ``torchvision.ops.MultiScaleRoIAlign`` picks (docs/semantics.md gives the details). A box with
    a negative area (reversed along one axis) or a level past the last map gives zeros, as in
    torchvision. With one level every box is pooled from it (:func:`roi_align`).

    Args:
        features (list of Tensor[N, C, H_l, W_l]): 1 to 8 maps, finest first, of one dtype
            (float16, bfloat16, float32 or float64), N, C and device.
        boxes (Tensor[K, 5] or list of N Tensor[L_i, 4]): ``(batch_index, x1, y1, x2, y2)`` rows,
            or each image's ``(x1, y1, x2, y2)`` boxes, in input-image coordinates.
        output_size (int or (int, int)): ``PH, PW`` of each crop.
        spatial_scales (list of float): each level's box-to-feature scale (``1/4``, ``1/8``, ...),
            positive and finite.
        sampling_ratio (int or (int, int)): as for :func:`roi_align`. Default: -1.
        aligned (bool): as for :func:`roi_align`. Default: False.
        canonical_scale (int): the box side that maps to ``canonical_level``, in
            ``[1, 2**24]``. Default: 224.
        canonical_level (int): the level of a box of side ``canonical_scale`` (the FPN paper's
            k0), in ``[-2**24, 2**24]``. Default: 4.
        validate (bool): as for :func:`roi_align`. Default: True.

    Returns:
        Tensor[K, C, PH, PW]: in the features' dtype and features[0]'s array kind, in box order.
        On a GPU one kernel launch computes every level.
    """
    maps = _args.pyramid_of(features)
    call = _args.Call(features[0], "features[0]")
    n = maps[0].shape[0]
    pooled_h, pooled_w = _args.output_size_pair(output_size)
    compute = _args.compute_dtype(maps[0].dtype)
    scales = _args.spatial_scales_of(spatial_scales, len(maps), compute)
    ratio = _args.sampling_of(sampling_ratio)
    canonical_scale, canonical_level = _args.canonical_of(canonical_scale, canonical_level)
    aligned, validate = _args.flag(aligned, "aligned"), _args.flag(validate, "validate")
    prepared = _args.normalise_boxes(boxes, n, call.device, compute)
    rois = prepared.array
    with call.scope():
        if validate:
            prepared.check(call.backend, n)
        if len(maps) == 1:
            out = call.backend.roi_align_forward(
                call.native(), rois, pooled_h, pooled_w, scales[0], ratio, aligned
            )
        else:
            inputs = [_native(call, m) for m in maps]
            out = call.backend.multi_scale_roi_align_forward(
                inputs, rois, pooled_h, pooled_w, scales, ratio, aligned, canonical_scale,
                level_bounds(scales, canonical_level, compute),
            )
    return call.give_back(out)


def multi_scale_roi_align_backward(
    grad_output: Any,
    boxes: BoxesLike,
    input_shapes: Sequence[Sequence[int]],
    output_size: SizeLike,
    spatial_scales: Sequence[float],
    sampling_ratio: SamplingLike = -1,
    aligned: bool = False,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    *,
    validate: bool = True,
    deterministic: bool = False,
) -> list[Any]:
    """Gradient of :func:`multi_scale_roi_align` with respect to each level (boxes get none).

    Args:
        grad_output (Tensor[K, C, PH, PW]): gradient of the loss with respect to the output.
        boxes, output_size, spatial_scales, sampling_ratio, aligned, canonical_scale,
            canonical_level, validate: as passed to :func:`multi_scale_roi_align`.
        input_shapes (list of (int, int, int, int)): each level's ``(N, C, H_l, W_l)``.
        deterministic (bool): as for :func:`roi_cupy.roi_align_backward`: the same bits on
            every run, on a GPU too. Default: False.

    Returns:
        list of Tensor[N, C, H_l, W_l]: one gradient per level, in grad_output's dtype and
        array kind (a level no box is pooled from gets zeros). On a GPU one kernel launch
        computes every level.
    """
    call = _args.Call(grad_output, "grad_output")
    shapes = _args.input_shapes_of(input_shapes)
    size = _args.output_size_pair(output_size)
    compute = _args.compute_dtype(call.array.dtype)
    scales = _args.spatial_scales_of(spatial_scales, len(shapes), compute)
    ratio = _args.sampling_of(sampling_ratio)
    canonical_scale, canonical_level = _args.canonical_of(canonical_scale, canonical_level)
    aligned, validate = _args.flag(aligned, "aligned"), _args.flag(validate, "validate")
    deterministic = _args.flag(deterministic, "deterministic")
    n, channels = shapes[0][:2]
    prepared = _args.normalise_boxes(boxes, n, call.device, compute)
    rois = prepared.array
    _args.check_grad_output(call.array, rois.shape[0], channels, size)
    with call.scope():
        if validate:
            prepared.check(call.backend, n)
        if len(shapes) == 1:
            grads = [
                call.backend.roi_align_backward(
                    call.native(), rois, shapes[0], scales[0], ratio, aligned,
                    deterministic=deterministic,
                )
            ]
        else:
            grads = call.backend.multi_scale_roi_align_backward(
                call.native(), rois, shapes, scales, ratio, aligned, canonical_scale,
                level_bounds(scales, canonical_level, compute), deterministic=deterministic,
            )
    return [call.give_back(g) for g in grads]


def _native(call: _args.Call, array: Any) -> Any:
    """``array`` (a level of ``call``'s pyramid) as the backend takes it (see
    :meth:`_args.Call.native`)."""
    if call.backend.CAPABILITIES.strided:
        return array
    with call.scope():
        return call.xp.ascontiguousarray(array)
