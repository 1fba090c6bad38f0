"""JAX adapter: roi_cupy's operators as JAX functions that jit, differentiate and vmap.

``import roi_cupy.jax`` imports JAX (``import roi_cupy`` never does). :func:`roi_align` and
:func:`roi_pool` take and return JAX arrays, with the signatures, defaults and numbers of
``torchvision.ops``. They work eagerly and under ``jax.jit``, ``jax.grad`` (reverse mode:
``jax.custom_vjp``), ``jax.vmap`` and any nesting of these. Gradients flow to the features;
boxes get a zero cotangent, as torchvision gives them none. Forward mode (``jax.jvp``,
``jax.jacfwd``) is not defined.

:func:`multi_scale_roi_align` does the same for a feature pyramid given as a list of arrays: one
host call of :func:`roi_cupy.ops.multi_scale_roi_align` per forward, and one of its backward for
every level's gradient. :func:`ps_roi_align`, :func:`ps_roi_pool` and
:func:`roi_align_rotated` work as :func:`roi_align` does.

What runs where: each forward and each backward pass is one host callback into roi_cupy's own
functional ops (:func:`roi_cupy.ops.roi_align`, ``roi_align_backward``,
``roi_pool(..., return_indices=True)``, ``roi_pool_backward``) on NumPy arrays, i.e. roi_cupy's
NumPy backend (or the one :func:`roi_cupy.use_backend` selected when the call was traced), on the
host CPU:

- on the CPU platform through ``jax.experimental.buffer_callback``: the ops read XLA's input
  buffers in place and their results are copied once into XLA's output buffers;
- on any other platform (a GPU) through ``jax.pure_callback``: XLA copies the operands from the
  device to the host before each call and the results back after it, and the work runs on the
  CPU, not in roi_cupy's CUDA kernels. This path is tested on the CPU only; the adapter has not
  been run on a GPU.

Why both: measured on 2 cores of an Intel Xeon (jax 0.10.2), RoI Align forward float32,
``sampling_ratio=2``, ``aligned=True``, median per call over 15 repeats, in one run::

    workload                                  NumPy op  pure_callback    buffer_callback
                                                        eager    jit     eager    jit
    small  [1, 4, 16, 16], 4 boxes, 2x2        0.37 ms  0.71     0.64    0.50     0.43
    medium [2, 64, 32, 32], 64 boxes, 7x7      1.84 ms  2.41     2.33    2.17     2.03
    large  [2, 256, 64, 64], 256 boxes, 7x7   24.4 ms  28.5     28.3    26.0     25.4

Under jit ``pure_callback`` adds 0.27 / 0.49 / 3.9 ms to the op and ``buffer_callback`` 0.07 /
0.20 / 1.0 ms: ``pure_callback`` wraps every operand as a jax array on the CPU device and copies
the returned arrays into XLA's, a cost that grows with the data. ``buffer_callback`` is
experimental and, on a GPU, hands over device buffers that NumPy cannot read, so it is used for
the CPU platform only (``jax.lax.platform_dependent``); ``pure_callback`` keeps every other
platform correct. This adapter itself (eager: argument checks, then one compiled call) measured
0.58 / 2.21 / 25.6 ms eagerly with ``validate=True`` and 0.48 / 2.13 / 26.4 ms under jit.

vmap: a vmapped call is one call of the op, not a loop: the vmapped axes are folded into the
batch axis N (element ``b``'s boxes get batch index ``index + b * N``; a box that is invalid in
its own element stays invalid), and features that are not vmapped are not copied. For float16,
bfloat16 and float32 features the folded batch (vmapped size times N) must stay below 2**24,
the integers float32 boxes hold exactly, as N itself must for roi_cupy.

Boxes (``validate``): argument checks (output_size, spatial_scale, sampling_ratio, the features'
rank and dtype, the boxes' shape and dtype) are roi_cupy's own and raise ``ValueError`` /
``TypeError`` when the call is traced. Box *values* can only be checked where they are concrete:
with ``validate=True`` (the default), an eager call (or an eager ``jax.grad``) with boxes that
are not finite or whose batch index is not an integer in ``[0, N)`` raises roi_cupy's usual
``ValueError`` naming the row (the check reads the boxes back to the host first). Under
``jax.jit``, ``jax.vmap`` and other tracing the boxes are abstract and are not checked (a
callback must not raise), so such a RoI gives what it gives with ``validate=False`` everywhere:
zeros, zero gradient, never a read out of bounds. A batch index is read by truncation toward
zero, as roi_cupy reads it: with ``validate=False`` 1.5 is image 1 and -0.5 image 0.

Padding: K is static under ``jax.jit``. To keep one compiled function for varying box counts,
pad the boxes to a fixed K with rows whose batch index is -1 and pass ``validate=False`` (eagerly
too, where ``validate=True`` would reject them); padded rows give zero outputs and contribute no
gradient.

The position-sensitive :func:`ps_roi_align` and :func:`ps_roi_pool` work the same way (one host
call of :func:`roi_cupy.ops.ps_roi_align` or ``ps_roi_pool`` per pass, and of its backward).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy

from roi_cupy import _args, _backend, ops
from roi_cupy._ops import roi_align_rotated as rotated
from roi_cupy._numpy._common import batch_index

try:  # experimental in jax 0.10; without it every platform takes jax.pure_callback
    from jax.experimental.buffer_callback import buffer_callback
except ImportError:
    buffer_callback = None

__all__ = [
    "multi_scale_roi_align",
    "ps_roi_align",
    "ps_roi_pool",
    "roi_align",
    "roi_align_rotated",
    "roi_pool",
]

BoxesLike = Any  # a jax array [K, 5], or a sequence of N jax arrays [L_i, 4]

# vmap: unbatched operands get a leading axis of size 1 (not a copy per element).
_VMAP = "expand_dims"


@dataclasses.dataclass(frozen=True)
class _Static:
    """The static arguments of one call (hashable: a nondiff argument of the custom_vjp)."""

    shape: tuple[int, int, int, int]  # the features' (N, C, H, W)
    output_size: tuple[int, int]
    spatial_scale: float
    sampling_ratio: int = -1
    aligned: bool = False
    backend: str = "numpy"  # roi_cupy.use_backend's choice when the call was traced
    index_dtype: Any = None  # RoI Pool's argmax residual
    mode: str = "avg"  # RoI Align's: "avg" or "max"
    clockwise: bool = False  # RoI Align Rotated's flag
    deterministic: bool = False  # the backward passes' sums (on a GPU)


@dataclasses.dataclass(frozen=True)
class _PyramidStatic:
    """The static arguments of one multi-scale call (hashable, as :class:`_Static`)."""

    shapes: tuple[tuple[int, int, int, int], ...]  # each level's (N, C, H, W)
    output_size: tuple[int, int]
    spatial_scales: tuple[float, ...]
    sampling_ratio: tuple[int, int]
    aligned: bool
    canonical_scale: int
    canonical_level: int
    backend: str = "numpy"


# ----------------------------------------------------------------------------- arguments
def _features(input: Any) -> jax.Array:
    try:
        array = jnp.asarray(input)
    except TypeError as exc:
        raise TypeError(f"input must be a JAX array, got {type(input).__qualname__}") from exc
    _args.check_features(array, "input")
    return array


def _placeholder(array: Any) -> numpy.ndarray:
    """A NumPy stand-in with ``array``'s shape and dtype and no memory of its size, so that
    roi_cupy's own checks of shapes and dtypes run on traced boxes too."""
    return numpy.broadcast_to(numpy.zeros((), dtype=array.dtype), array.shape)


def _rois(boxes: BoxesLike, features: jax.Array, validate: bool, columns: int = 5) -> jax.Array:
    """``boxes`` as a ``[K, 5]`` (``[K, columns]``) jax array, checked as :mod:`roi_cupy.ops`
    checks them."""
    n = features.shape[0]
    compute = _args.compute_dtype(features.dtype)
    if isinstance(boxes, (list, tuple)):
        per_image = [jnp.asarray(b) for b in boxes]
        _args.normalise_boxes([_placeholder(b) for b in per_image], n, "cpu", compute, columns)
        # The index column in a dtype that holds every image index exactly (not bfloat16's).
        wide = jnp.promote_types(per_image[0].dtype, compute) if per_image else compute
        rows = [
            jnp.concatenate([jnp.full((b.shape[0], 1), i, wide), b.astype(wide)], axis=1)
            for i, b in enumerate(per_image)
        ]
        rois = jnp.concatenate(rows) if rows else jnp.zeros((0, columns), compute)
    else:
        rois = jnp.asarray(boxes)
        _args.normalise_boxes(_placeholder(rois), n, "cpu", compute, columns)
    if validate and not isinstance(rois, jax.core.Tracer):
        prepared = _args.normalise_boxes(numpy.asarray(rois), n, "cpu", compute, columns)
        prepared.check(_backend.backend_for(numpy), n)
    if not jnp.issubdtype(rois.dtype, jnp.floating):
        # Integer boxes have no cotangent space; the ops read them in the compute dtype anyway.
        rois = rois.astype(compute)
    return rois


def _static(features: jax.Array, output_size: Any, spatial_scale: Any, **kwargs: Any) -> _Static:
    return _Static(
        shape=tuple(int(v) for v in features.shape),
        output_size=_args.output_size_pair(output_size),
        spatial_scale=_args.spatial_scale_of(spatial_scale, _args.compute_dtype(features.dtype)),
        backend=_backend.current_backend(),
        **kwargs,
    )


def _index_dtype(height: int, width: int) -> numpy.dtype:
    """int32 for RoI Pool's argmax where the H x W plane allows it, else int64 (needs x64)."""
    if height * width <= numpy.iinfo(numpy.int32).max:
        return numpy.dtype(numpy.int32)
    if jax.dtypes.canonicalize_dtype(numpy.int64) == numpy.int64:
        return numpy.dtype(numpy.int64)
    raise ValueError(
        f"input's H x W = {height} x {width} plane is too large for RoI Pool's int32 indices; "
        "enable jax_enable_x64 for int64 ones"
    )


# ----------------------------------------------------------------------------- host side
def _lead(*pairs: tuple[numpy.ndarray, int]) -> tuple[int, ...]:
    """The vmapped leading axes of ``(array, rank without them)`` pairs, broadcast together."""
    return numpy.broadcast_shapes(*(a.shape[: a.ndim - rank] for a, rank in pairs))


def _flat(array: numpy.ndarray, lead: tuple[int, ...], rank: int) -> numpy.ndarray:
    """``array`` [*lead or 1s, *tail] -> [prod(lead) * tail[0], *tail[1:]] (tail of ``rank``)."""
    tail = array.shape[array.ndim - rank :]
    array = numpy.broadcast_to(array, lead + tail)
    return array.reshape((math.prod(lead) * tail[0],) + tail[1:])


def _fold_rois(rois: numpy.ndarray, lead: tuple[int, ...], n: int, compute: Any) -> numpy.ndarray:
    """Boxes [*lead, K, 5] -> [prod(lead) * K, 5] for features folded to [prod(lead) * N, ...]:
    element ``b``'s batch index ``i`` becomes ``i + b * N``, read as the backends read it, and a
    row invalid in its own element gets index -1 (it would otherwise land in another element)."""
    with numpy.errstate(over="ignore"):  # beyond float32's range: inf, an invalid RoI
        flat = numpy.array(_flat(rois, lead, 2), dtype=compute)
    k = rois.shape[-2]
    index, valid = batch_index(flat, n)
    offset = numpy.repeat(numpy.arange(math.prod(lead)) * n, k)
    flat[:, 0] = numpy.where(valid, index + offset, -1)
    return flat


def _fold_forward(
    static: _Static, x: numpy.ndarray, rois: numpy.ndarray
) -> tuple[numpy.ndarray, numpy.ndarray, tuple[int, ...]]:
    """Features [*lead or 1s, N, C, H, W] and boxes [*lead or 1s, K, 5] -> one call's operands."""
    lead = _lead((x, 4), (rois, 2))
    if math.prod(x.shape[:-4]) == 1:
        # The same features for every element: no copy, no offsets.
        return x.reshape(static.shape), _flat(rois, lead, 2), lead
    compute = _args.compute_dtype(x.dtype)
    return _flat(x, lead, 4), _fold_rois(rois, lead, static.shape[0], compute), lead


def _align_forward(static: _Static, x: numpy.ndarray, rois: numpy.ndarray) -> numpy.ndarray:
    k = rois.shape[-2]
    x, rois, lead = _fold_forward(static, x, rois)
    out = ops.roi_align(
        x, rois, static.output_size, static.spatial_scale, static.sampling_ratio,
        static.aligned, validate=False, mode=static.mode,
    )
    return out.reshape(lead + (k,) + out.shape[1:])


def _align_backward(
    static: _Static, g: numpy.ndarray, rois: numpy.ndarray, x: numpy.ndarray | None = None
) -> numpy.ndarray:
    """The features' gradient; ``x``, the forward's features, in max mode only."""
    n, c, h, w = static.shape
    pairs = ((g, 4), (rois, 2)) + (() if x is None else ((x, 4),))
    lead = _lead(*pairs)
    rois = _fold_rois(rois, lead, n, _args.compute_dtype(g.dtype))
    grad = ops.roi_align_backward(
        _flat(g, lead, 4), rois, (math.prod(lead) * n, c, h, w), static.output_size,
        static.spatial_scale, static.sampling_ratio, static.aligned, validate=False,
        mode=static.mode, input=None if x is None else _flat(x, lead, 4),
        deterministic=static.deterministic,
    )
    return grad.reshape(lead + static.shape)


def _pool_forward(
    static: _Static, x: numpy.ndarray, rois: numpy.ndarray
) -> tuple[numpy.ndarray, numpy.ndarray]:
    k = rois.shape[-2]
    x, rois, lead = _fold_forward(static, x, rois)
    out, argmax = ops.roi_pool(
        x, rois, static.output_size, static.spatial_scale, return_indices=True, validate=False
    )
    shape = lead + (k,) + out.shape[1:]
    return out.reshape(shape), argmax.astype(static.index_dtype).reshape(shape)


def _pool_backward(
    static: _Static, g: numpy.ndarray, rois: numpy.ndarray, argmax: numpy.ndarray
) -> numpy.ndarray:
    n, c, h, w = static.shape
    lead = _lead((g, 4), (rois, 2), (argmax, 4))
    rois = _fold_rois(rois, lead, n, _args.compute_dtype(g.dtype))
    grad = ops.roi_pool_backward(
        _flat(g, lead, 4), rois, _flat(argmax, lead, 4), (math.prod(lead) * n, c, h, w),
        validate=False, deterministic=static.deterministic,
    )
    return grad.reshape(lead + static.shape)


def _fold_pyramid(
    static: _PyramidStatic, features: list[numpy.ndarray], rois: numpy.ndarray
) -> tuple[list[numpy.ndarray], numpy.ndarray, tuple[int, ...]]:
    """Maps [*lead or 1s, N, C, H_l, W_l] and boxes [*lead or 1s, K, 5] -> one call's operands
    (see :func:`_fold_forward`)."""
    lead = _lead(*((x, 4) for x in features), (rois, 2))
    if all(math.prod(x.shape[:-4]) == 1 for x in features):
        maps = [x.reshape(shape) for x, shape in zip(features, static.shapes)]
        return maps, _flat(rois, lead, 2), lead
    compute = _args.compute_dtype(features[0].dtype)
    n = static.shapes[0][0]
    return [_flat(x, lead, 4) for x in features], _fold_rois(rois, lead, n, compute), lead


def _multi_scale_forward(static: _PyramidStatic, *arrays: numpy.ndarray) -> numpy.ndarray:
    *features, rois = arrays
    k = rois.shape[-2]
    maps, rois, lead = _fold_pyramid(static, features, rois)
    out = ops.multi_scale_roi_align(
        maps, rois, static.output_size, list(static.spatial_scales), static.sampling_ratio,
        static.aligned, static.canonical_scale, static.canonical_level, validate=False,
    )
    return out.reshape(lead + (k,) + out.shape[1:])


def _multi_scale_backward(
    static: _PyramidStatic, g: numpy.ndarray, rois: numpy.ndarray
) -> list[numpy.ndarray]:
    lead = _lead((g, 4), (rois, 2))
    rois = _fold_rois(rois, lead, static.shapes[0][0], _args.compute_dtype(g.dtype))
    shapes = [(math.prod(lead) * n,) + shape[1:] for shape in static.shapes for n in shape[:1]]
    grads = ops.multi_scale_roi_align_backward(
        _flat(g, lead, 4), rois, shapes, static.output_size, list(static.spatial_scales),
        static.sampling_ratio, static.aligned, static.canonical_scale, static.canonical_level,
        validate=False,
    )
    return [grad.reshape(lead + shape) for grad, shape in zip(grads, static.shapes)]


# ----------------------------------------------------------------------------- JAX side
@dataclasses.dataclass(frozen=True)
class _Host:
    """``function(static, *arrays)`` on NumPy views of a callback's operands, under the backend
    chosen when the call was traced. Equal for equal arguments, so that JAX's cache of eager
    calls finds the compiled callback again (a new closure per call would compile every call)."""

    function: Any
    static: _Static

    def __call__(self, *arrays: Any) -> Any:
        with _backend.use_backend(self.static.backend):
            return self.function(self.static, *(numpy.asarray(a) for a in arrays))


@dataclasses.dataclass(frozen=True)
class _HostInto(_Host):
    """:class:`_Host` in ``buffer_callback``'s form: writes the results into XLA's output
    buffers, which on the CPU are host memory that NumPy views."""

    def __call__(self, context: Any, out: Any, *arrays: Any) -> None:
        results = super().__call__(*arrays)
        for buffer, result in zip(jax.tree.leaves(out), jax.tree.leaves(results)):
            numpy.asarray(buffer)[...] = result


def _callback(host: Any, static: _Static, result: Any, *arrays: jax.Array) -> Any:
    """``host(static, *arrays)`` on the host CPU, as one call even under vmap: through
    ``buffer_callback`` on the CPU platform, ``pure_callback`` (a host round trip) elsewhere."""

    def round_trip(*arrays: jax.Array) -> Any:
        return jax.pure_callback(_Host(host, static), result, *arrays, vmap_method=_VMAP)

    if buffer_callback is None:
        return round_trip(*arrays)

    def in_place(*arrays: jax.Array) -> Any:
        return buffer_callback(_HostInto(host, static), result, vmap_method=_VMAP)(*arrays)

    return jax.lax.platform_dependent(*arrays, cpu=in_place, default=round_trip)


def _out_shape(static: _Static, rois: jax.Array) -> tuple[int, int, int, int]:
    return (rois.shape[0], static.shape[1]) + static.output_size


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _roi_align(static: _Static, input: jax.Array, rois: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct(_out_shape(static, rois), input.dtype)
    return _callback(_align_forward, static, out, input, rois)


def _roi_align_fwd(
    static: _Static, input: jax.Array, rois: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    # Max mode finds each bin's maximum again in the features: they are a residual too.
    saved = (rois, input) if static.mode == "max" else (rois,)
    return _roi_align(static, input, rois), saved


def _roi_align_bwd(
    static: _Static, saved: tuple[jax.Array, ...], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    grad = jax.ShapeDtypeStruct(static.shape, g.dtype)
    grad = _callback(_align_backward, static, grad, g, *saved)
    return grad, jnp.zeros_like(saved[0])


_roi_align.defvjp(_roi_align_fwd, _roi_align_bwd)
# Eager calls take jit's compiled fast path instead of tracing the custom_vjp every call.
_roi_align_jit = jax.jit(_roi_align, static_argnums=0)


def _pool_call(static: _Static, input: jax.Array, rois: jax.Array) -> tuple[jax.Array, jax.Array]:
    shape = _out_shape(static, rois)
    out = (
        jax.ShapeDtypeStruct(shape, input.dtype),
        jax.ShapeDtypeStruct(shape, static.index_dtype),
    )
    return _callback(_pool_forward, static, out, input, rois)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _roi_pool(static: _Static, input: jax.Array, rois: jax.Array) -> jax.Array:
    return _pool_call(static, input, rois)[0]


def _roi_pool_fwd(
    static: _Static, input: jax.Array, rois: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    out, argmax = _pool_call(static, input, rois)
    return out, (rois, argmax)


def _roi_pool_bwd(
    static: _Static, residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    rois, argmax = residuals
    grad = jax.ShapeDtypeStruct(static.shape, g.dtype)
    grad = _callback(_pool_backward, static, grad, g, rois, argmax)
    return grad, jnp.zeros_like(rois)


_roi_pool.defvjp(_roi_pool_fwd, _roi_pool_bwd)
_roi_pool_jit = jax.jit(_roi_pool, static_argnums=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _multi_scale(
    static: _PyramidStatic, features: tuple[jax.Array, ...], rois: jax.Array
) -> jax.Array:
    shape = (rois.shape[0], static.shapes[0][1]) + static.output_size
    out = jax.ShapeDtypeStruct(shape, features[0].dtype)
    return _callback(_multi_scale_forward, static, out, *features, rois)


def _multi_scale_fwd(
    static: _PyramidStatic, features: tuple[jax.Array, ...], rois: jax.Array
) -> tuple[jax.Array, jax.Array]:
    return _multi_scale(static, features, rois), rois


def _multi_scale_bwd(
    static: _PyramidStatic, rois: jax.Array, g: jax.Array
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    grads = [jax.ShapeDtypeStruct(shape, g.dtype) for shape in static.shapes]
    grads = _callback(_multi_scale_backward, static, grads, g, rois)
    return tuple(grads), jnp.zeros_like(rois)


_multi_scale.defvjp(_multi_scale_fwd, _multi_scale_bwd)
_multi_scale_jit = jax.jit(_multi_scale, static_argnums=0)


# ----------------------------------------------------------------------------- public API
def roi_align(
    input: jax.Array,
    boxes: BoxesLike,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = False,
    *,
    validate: bool = True,
    mode: str = "avg",
    deterministic: bool = False,
) -> jax.Array:
    """RoI Align (Mask R-CNN) of JAX arrays: :func:`roi_cupy.roi_align`'s numbers.

    Args:
        input (Array[N, C, H, W]): features, float16, bfloat16, float32 or float64 (with x64).
        boxes (Array[K, 5] or list of N Array[L_i, 4]): ``(batch_index, x1, y1, x2, y2)`` rows,
            or each image's ``(x1, y1, x2, y2)`` boxes, in input-image coordinates.
        output_size (int or (int, int)): ``PH, PW`` of each crop.
        spatial_scale (float): multiplies box coordinates to reach feature coordinates.
            Default: 1.0.
        sampling_ratio (int or (int, int)): samples per bin along each axis, or a pair
            ``(sampling_h, sampling_w)``; ``<= 0`` picks ``ceil(roi_size / output_size)``
            along that axis per RoI (adaptive). Default: -1.
        aligned (bool): shift box coordinates by -0.5 (Detectron2). Default: False.
        validate (bool): check concrete boxes (eager calls) and raise ``ValueError`` naming a
            row that is not finite or whose batch index is not an integer in ``[0, N)``. Traced
            boxes (under jit, vmap) cannot be checked; an invalid RoI then gives zeros, as it
            always does with ``False``. Default: True.
        mode (str): ``"avg"`` (a bin's mean) or ``"max"`` (its largest sample, mmcv's
            ``pool_mode="max"``; the vjp keeps the features as a residual to find it again).
            Default: "avg".
        deterministic (bool): passed to :func:`roi_cupy.roi_align_backward`. The host calls run
            roi_cupy's NumPy backend, whose gradients have the same bits on every run anyway;
            the flag matters under ``roi_cupy.use_backend("emulator")``, which runs the GPU's
            fixed-point sums. Default: False.

    Returns:
        Array[K, C, PH, PW]: in the input's dtype. ``jax.grad`` reaches the input; the boxes'
        cotangent is zero.
    """
    features = _features(input)
    static = _static(
        features, output_size, spatial_scale,
        sampling_ratio=_args.sampling_of(sampling_ratio), aligned=_args.flag(aligned, "aligned"),
        mode=_args.align_mode(mode), deterministic=_args.flag(deterministic, "deterministic"),
    )
    return _roi_align_jit(
        static, features, _rois(boxes, features, _args.flag(validate, "validate"))
    )


def roi_pool(
    input: jax.Array,
    boxes: BoxesLike,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    *,
    validate: bool = True,
    deterministic: bool = False,
) -> jax.Array:
    """RoI Pool (Fast R-CNN) of JAX arrays: :func:`roi_cupy.roi_pool`'s numbers.

    Args:
        input (Array[N, C, H, W]): features, float16, bfloat16, float32 or float64 (with x64).
        boxes (Array[K, 5] or list of N Array[L_i, 4]): as for :func:`roi_align`.
        output_size (int or (int, int)): ``PH, PW`` of each crop.
        spatial_scale (float): multiplies box coordinates to reach feature coordinates.
            Default: 1.0.
        validate (bool): as for :func:`roi_align`. Default: True.
        deterministic (bool): as for :func:`roi_align`. Default: False.

    Returns:
        Array[K, C, PH, PW]: in the input's dtype. ``jax.grad`` reaches the input (through the
        argmax, kept as an int32 residual, int64 for a plane of 2**31 pixels or more); the
        boxes' cotangent is zero.
    """
    features = _features(input)
    static = _static(
        features, output_size, spatial_scale, index_dtype=_index_dtype(*features.shape[2:]),
        deterministic=_args.flag(deterministic, "deterministic"),
    )
    return _roi_pool_jit(static, features, _rois(boxes, features, _args.flag(validate, "validate")))


# ----------------------------------------------------------------------------- position-sensitive
def _ps_align_forward(static: _Static, x: numpy.ndarray, rois: numpy.ndarray) -> numpy.ndarray:
    k = rois.shape[-2]
    x, rois, lead = _fold_forward(static, x, rois)
    out = ops.ps_roi_align(
        x, rois, static.output_size, static.spatial_scale, static.sampling_ratio, validate=False
    )
    return out.reshape(lead + (k,) + out.shape[1:])


def _ps_align_backward(static: _Static, g: numpy.ndarray, rois: numpy.ndarray) -> numpy.ndarray:
    n, c, h, w = static.shape
    lead = _lead((g, 4), (rois, 2))
    rois = _fold_rois(rois, lead, n, _args.compute_dtype(g.dtype))
    grad = ops.ps_roi_align_backward(
        _flat(g, lead, 4), rois, (math.prod(lead) * n, c, h, w), static.output_size,
        static.spatial_scale, static.sampling_ratio, validate=False,
    )
    return grad.reshape(lead + static.shape)


def _ps_pool_forward(static: _Static, x: numpy.ndarray, rois: numpy.ndarray) -> numpy.ndarray:
    k = rois.shape[-2]
    x, rois, lead = _fold_forward(static, x, rois)
    out = ops.ps_roi_pool(x, rois, static.output_size, static.spatial_scale, validate=False)
    return out.reshape(lead + (k,) + out.shape[1:])


def _ps_pool_backward(static: _Static, g: numpy.ndarray, rois: numpy.ndarray) -> numpy.ndarray:
    n, c, h, w = static.shape
    lead = _lead((g, 4), (rois, 2))
    rois = _fold_rois(rois, lead, n, _args.compute_dtype(g.dtype))
    grad = ops.ps_roi_pool_backward(
        _flat(g, lead, 4), rois, (math.prod(lead) * n, c, h, w), static.output_size,
        static.spatial_scale, validate=False,
    )
    return grad.reshape(lead + static.shape)


def _position_sensitive(forward: Any, backward: Any) -> Any:
    """A jitted ``op(static, input, rois)`` whose passes are the host calls ``forward`` and
    ``backward``: a ``custom_vjp`` for an operator linear in ``input`` (the backward needs only
    the boxes), with an output ``[K, C / (PH * PW), PH, PW]``."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def op(static: _Static, input: jax.Array, rois: jax.Array) -> jax.Array:
        pooled_h, pooled_w = static.output_size
        shape = (rois.shape[0], static.shape[1] // (pooled_h * pooled_w), pooled_h, pooled_w)
        return _callback(forward, static, jax.ShapeDtypeStruct(shape, input.dtype), input, rois)

    def fwd(static: _Static, input: jax.Array, rois: jax.Array) -> tuple[jax.Array, jax.Array]:
        return op(static, input, rois), rois

    def bwd(static: _Static, rois: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
        grad = jax.ShapeDtypeStruct(static.shape, g.dtype)
        return _callback(backward, static, grad, g, rois), jnp.zeros_like(rois)

    op.defvjp(fwd, bwd)
    return jax.jit(op, static_argnums=0)


_ps_roi_align_jit = _position_sensitive(_ps_align_forward, _ps_align_backward)
_ps_roi_pool_jit = _position_sensitive(_ps_pool_forward, _ps_pool_backward)


def ps_roi_align(
    input: jax.Array,
    boxes: BoxesLike,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
    *,
    validate: bool = True,
) -> jax.Array:
    """Position-sensitive RoI Align (R-FCN) of JAX arrays: :func:`roi_cupy.ps_roi_align`'s
    numbers.

    Args:
        input (Array[N, C, H, W]): features, float16, bfloat16, float32 or float64 (with x64);
            C a multiple of ``PH * PW``.
        boxes (Array[K, 5] or list of N Array[L_i, 4]): as for :func:`roi_align`.
        output_size (int or (int, int)): ``PH, PW`` of each crop.
        spatial_scale (float): multiplies box coordinates to reach feature coordinates.
            Default: 1.0.
        sampling_ratio (int or (int, int)): samples per bin along each axis, or a pair
            ``(sampling_h, sampling_w)``; ``<= 0`` adaptive. Default: -1.
        validate (bool): as for :func:`roi_align`. Default: True.

    Returns:
        Array[K, C / (PH * PW), PH, PW]: in the input's dtype; bin ``(ph, pw)`` of channel ``c``
        reads input channel ``(c * PH + ph) * PW + pw``. ``jax.grad`` reaches the input; the
        boxes' cotangent is zero.
    """
    features = _features(input)
    static = _static(
        features, output_size, spatial_scale, sampling_ratio=_args.sampling_of(sampling_ratio)
    )
    _args.position_groups(static.shape[1], static.output_size, "input", output_size)
    return _ps_roi_align_jit(
        static, features, _rois(boxes, features, _args.flag(validate, "validate"))
    )


def ps_roi_pool(
    input: jax.Array,
    boxes: BoxesLike,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    *,
    validate: bool = True,
) -> jax.Array:
    """Position-sensitive RoI Pool (R-FCN) of JAX arrays: :func:`roi_cupy.ps_roi_pool`'s numbers.

    Args:
        input (Array[N, C, H, W]): features, float16, bfloat16, float32 or float64 (with x64);
            C a multiple of ``PH * PW``.
        boxes (Array[K, 5] or list of N Array[L_i, 4]): as for :func:`roi_align`.
        output_size (int or (int, int)): ``PH, PW`` of each crop.
        spatial_scale (float): multiplies box coordinates to reach feature coordinates.
            Default: 1.0.
        validate (bool): as for :func:`roi_align`. Default: True.

    Returns:
        Array[K, C / (PH * PW), PH, PW]: each bin's window mean on its own channel, in the
        input's dtype. ``jax.grad`` reaches the input; the boxes' cotangent is zero.
    """
    features = _features(input)
    static = _static(features, output_size, spatial_scale)
    _args.position_groups(static.shape[1], static.output_size, "input", output_size)
    return _ps_roi_pool_jit(
        static, features, _rois(boxes, features, _args.flag(validate, "validate"))
    )


def multi_scale_roi_align(
    features: list[jax.Array],
    boxes: BoxesLike,
    output_size: int | tuple[int, int],
    spatial_scales: list[float],
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = False,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    *,
    validate: bool = True,
) -> jax.Array:
    """RoI Align over a feature pyramid (FPN) of JAX arrays: the numbers of
    :func:`roi_cupy.multi_scale_roi_align`, each box pooled from the level torchvision's
    ``MultiScaleRoIAlign`` picks for it.

    Args:
        features (list of Array[N, C, H_l, W_l]): 1 to 8 maps, finest first, of one dtype, N
            and C.
        boxes (Array[K, 5] or list of N Array[L_i, 4]): as for :func:`roi_align`.
        output_size (int or (int, int)): ``PH, PW`` of each crop.
        spatial_scales (list of float): each level's box-to-feature scale.
        sampling_ratio (int or (int, int)): as for :func:`roi_align`. Default: -1.
        aligned (bool): as for :func:`roi_align`. Default: False.
        canonical_scale (int): the box side that maps to ``canonical_level``. Default: 224.
        canonical_level (int): the level of a box of side ``canonical_scale``. Default: 4.
        validate (bool): as for :func:`roi_align`. Default: True.

    Returns:
        Array[K, C, PH, PW]: in the features' dtype, in box order. ``jax.grad`` reaches every
        level (one host call for all of them); the boxes' cotangent is zero. Under ``jax.vmap``
        the mapped axes fold into N, as for :func:`roi_align`.
    """
    if not isinstance(features, (list, tuple)):
        raise TypeError(
            "features must be a list of JAX arrays [N, C, H_l, W_l], one per level, got "
            f"{type(features).__qualname__}"
        )
    maps = tuple(_features(x) for x in features)
    _args.pyramid_of([_placeholder(x) for x in maps])
    compute = _args.compute_dtype(maps[0].dtype)
    static = _PyramidStatic(
        shapes=tuple(tuple(int(v) for v in x.shape) for x in maps),
        output_size=_args.output_size_pair(output_size),
        spatial_scales=tuple(_args.spatial_scales_of(spatial_scales, len(maps), compute)),
        sampling_ratio=_args.sampling_of(sampling_ratio),
        aligned=_args.flag(aligned, "aligned"),
        canonical_scale=_args.canonical_of(canonical_scale, canonical_level)[0],
        canonical_level=int(canonical_level),
        backend=_backend.current_backend(),
    )
    return _multi_scale_jit(
        static, maps, _rois(boxes, maps[0], _args.flag(validate, "validate"))
    )


# ----------------------------------------------------------------------------- RoI Align Rotated
def _rotated_forward(static: _Static, x: numpy.ndarray, rois: numpy.ndarray) -> numpy.ndarray:
    k = rois.shape[-2]
    x, rois, lead = _fold_forward(static, x, rois)
    out = ops.roi_align_rotated(
        x, rois, static.output_size, static.spatial_scale, static.sampling_ratio,
        static.aligned, static.clockwise, validate=False,
    )
    return out.reshape(lead + (k,) + out.shape[1:])


def _rotated_backward(static: _Static, g: numpy.ndarray, rois: numpy.ndarray) -> numpy.ndarray:
    n, c, h, w = static.shape
    lead = _lead((g, 4), (rois, 2))
    rois = _fold_rois(rois, lead, n, _args.compute_dtype(g.dtype))
    grad = ops.roi_align_rotated_backward(
        _flat(g, lead, 4), rois, (math.prod(lead) * n, c, h, w), static.output_size,
        static.spatial_scale, static.sampling_ratio, static.aligned, static.clockwise,
        validate=False,
    )
    return grad.reshape(lead + static.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _roi_align_rotated(static: _Static, input: jax.Array, rois: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct(_out_shape(static, rois), input.dtype)
    return _callback(_rotated_forward, static, out, input, rois)


def _roi_align_rotated_fwd(
    static: _Static, input: jax.Array, rois: jax.Array
) -> tuple[jax.Array, jax.Array]:
    return _roi_align_rotated(static, input, rois), rois


def _roi_align_rotated_bwd(
    static: _Static, rois: jax.Array, g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    grad = jax.ShapeDtypeStruct(static.shape, g.dtype)
    grad = _callback(_rotated_backward, static, grad, g, rois)
    return grad, jnp.zeros_like(rois)


_roi_align_rotated.defvjp(_roi_align_rotated_fwd, _roi_align_rotated_bwd)
_roi_align_rotated_jit = jax.jit(_roi_align_rotated, static_argnums=0)


def roi_align_rotated(
    input: jax.Array,
    boxes: BoxesLike,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = True,
    clockwise: bool = False,
    *,
    validate: bool = True,
) -> jax.Array:
    """RoI Align of rotated boxes, JAX arrays: :func:`roi_cupy.roi_align_rotated`'s numbers.

    Args:
        input (Array[N, C, H, W]): features, float16, bfloat16, float32 or float64 (with x64).
        boxes (Array[K, 6] or list of N Array[L_i, 5]): ``(batch_index, cx, cy, w, h, angle)``
            rows, or each image's ``(cx, cy, w, h, angle)`` boxes, the angle in degrees
            (counter-clockwise as the image is shown).
        output_size (int or (int, int)): ``PH, PW`` of each crop.
        spatial_scale (float): multiplies box centres and sizes to reach feature coordinates.
            Default: 1.0.
        sampling_ratio (int or (int, int)): samples per bin along both box axes, or
            ``(sampling_h, sampling_w)``; ``<= 0`` adaptive. Default: -1.
        aligned (bool): half-pixel shift of the centre (detectron2); ``False`` is mmcv's legacy
            rule. Default: True.
        clockwise (bool): the angle turns clockwise. Default: False.
        validate (bool): as for :func:`roi_align` (concrete boxes only). Default: True.

    Returns:
        Array[K, C, PH, PW]: in the input's dtype. ``jax.grad`` reaches the input; the boxes'
        cotangent is zero.
    """
    features = _features(input)
    static = _static(
        features, output_size, spatial_scale,
        sampling_ratio=_args.sampling_of(sampling_ratio, rotated.MOST_SAMPLES),
        aligned=_args.flag(aligned, "aligned"), clockwise=_args.flag(clockwise, "clockwise"),
    )
    rois = _rois(boxes, features, _args.flag(validate, "validate"), columns=6)
    return _roi_align_rotated_jit(static, features, rois)
