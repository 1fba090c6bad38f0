"""Dask adapter: RoI Align and RoI Pool of feature maps chunked along the batch axis N.

``import roi_cupy.dask`` imports Dask (``import roi_cupy`` never does). :func:`roi_align` and
:func:`roi_pool` take features as a dask array ``[N, C, H, W]`` chunked along N only, with NumPy
or CuPy chunks (CuPy on ``dask_cuda`` GPU workers), and return a lazy dask array
``[K, C, PH, PW]`` of the crops in the boxes' order, with :func:`roi_cupy.roi_align`'s and
:func:`roi_cupy.roi_pool`'s signatures, defaults and numbers.

Routing: boxes are small, so they are made concrete (computed, copied to the host) and checked
once, up front, by roi_cupy's own checks (a row that is not finite or whose batch index is not an
integer in ``[0, N)`` raises the usual ``ValueError`` naming it). They are sorted by image
(stably), and each N-chunk gets the boxes of its images, with their batch index made chunk-local.
The graph has one task per N-chunk that holds boxes, which reads that chunk alone; chunks without
boxes get no task, so their features are never read. The per-chunk crops are concatenated and one
``take`` puts them back in the boxes' order (no ``take`` when the boxes come sorted by image).
The graph has no shuffle of the features: each task reads one N-chunk, and only crops are moved
between tasks. Sort large box sets by image: in random order the ``take`` moves most crops
between workers once more. No box at all gives an empty array of the chunks' kind made by a task
where it runs, so that the graph carries no CuPy array and the scheduler, which unpickles it,
needs no GPU.

Chunking: features must be chunked along N only, one chunk along C, H and W; anything else is
refused with a ``ValueError`` rather than rechunked here, since merging the C, H and W chunks of an
N-chunk copies its features and may make chunks far larger than the caller chose. Rechunk with
``features.rechunk({1: -1, 2: -1, 3: -1})`` (``python -m roi_cupy extract`` reads whole N-chunks
itself).

Reproducibility: the result is the same, bit for bit, whatever the chunking of the features and
the number of workers. CuPy chunks run the CUDA kernels once per N-chunk (each output element is
computed by one thread from its own RoI, whatever else is in the call); so do NumPy chunks for
RoI Pool (maxima and per-RoI coordinates, all exact or correctly rounded). The NumPy backend's RoI
Align is the exception: it batches RoIs into matrix products whose padding and shapes depend on
the other RoIs of the call, and BLAS rounds a product differently for different shapes, so a
RoI's result could change (by an ulp or so) with the boxes around it. NumPy chunks therefore run
RoI Align one call per image, whose inputs (the image's features and its boxes in their given
order) do not depend on the chunking. Against one call per chunk that costs 1.2-1.5x where
images hold tens of boxes ([8-16, 64-256, 32-64, 32-64] features), nothing where one call's
working copy outgrows the cache ([48, 256, 48, 48], 64 boxes each: 0.85x), and about 0.35 ms
per image where images are tiny and hold few boxes. The result equals ``roi_cupy.roi_align``
called image by image bit for bit, and a call over all images within roi_cupy's tolerances.
Bits are the same on workers of the same CPU and library versions; BLAS picks its kernels by
CPU.

What runs where: NumPy chunks run on the backend :func:`roi_cupy.use_backend` selected when the
graph was built (``"numpy"`` by default), CuPy chunks on the CUDA kernels of the chunk's device.
Task functions are module-level and refer to roi_cupy by name; the compiled kernels are built by
each worker process on first use (roi_cupy memoises them per process and device) and are never
part of the task graph.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import dask
import dask.array as da
import numpy
from dask.array.utils import meta_from_array
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from roi_cupy import _args, _backend, _interop, ops

__all__ = ["roi_align", "roi_pool"]

BoxesLike = ops.BoxesLike  # dask arrays included


@dataclasses.dataclass(frozen=True)
class _Crop:
    """One op and its static arguments, as a task carries them (small and picklable)."""

    op: str  # "align" or "pool"
    output_size: tuple[int, int]
    spatial_scale: float
    sampling_ratio: int = -1
    aligned: bool = False
    backend: str = "numpy"  # roi_cupy.use_backend's choice when the graph was built
    mode: str = "avg"  # RoI Align's: "avg" or "max"

    def __call__(self, features: Any, rois: Any) -> Any:
        """The crops ``[k, C, PH, PW]`` of ``features`` [n, C, H, W] for checked ``rois``."""
        if self.op == "align":
            return ops.roi_align(
                features, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                self.aligned, validate=False, mode=self.mode,
            )
        return ops.roi_pool(features, rois, self.output_size, self.spatial_scale, validate=False)


# ----------------------------------------------------------------------------- tasks
def _crop_block(crop: _Crop, chunk: Any, rois: numpy.ndarray) -> Any:
    """The crops of one N-chunk: ``chunk`` [n, C, H, W] (NumPy or CuPy) and its ``rois``
    [k, 5] (NumPy, chunk-local batch indices, sorted by image); returns ``[k, C, PH, PW]`` of
    the chunk's kind."""
    with _backend.use_backend(crop.backend):
        if _interop.is_cupy_array(chunk):
            with chunk.device:
                return crop(chunk, _interop.cupy_or_none().asarray(rois))
        if crop.op == "align" and crop.backend == "numpy":
            return _per_image(crop, chunk, rois)
        return crop(chunk, rois)


def _per_image(crop: _Crop, chunk: numpy.ndarray, rois: numpy.ndarray) -> numpy.ndarray:
    """``crop`` called once per image of ``chunk``, so that no image's result depends on which
    other images share its chunk (see the module docstring)."""
    starts = numpy.flatnonzero(numpy.diff(rois[:, 0], prepend=-1.0))
    ends = numpy.append(starts[1:], rois.shape[0])
    parts = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        image = int(rois[start, 0])
        local = rois[start:end].copy()
        local[:, 0] = 0
        parts.append(crop(chunk[image : image + 1], local))
    return numpy.concatenate(parts)  # routed chunks hold at least one box


def _empty(module: str, shape: tuple, dtype: numpy.dtype) -> Any:
    """An empty array of ``module`` (``"numpy"`` or ``"cupy"``), made where the task runs."""
    return importlib.import_module(module).empty(shape, dtype)


# ----------------------------------------------------------------------------- graph
def _check_features(features: Any) -> da.Array:
    if not isinstance(features, da.Array):
        raise TypeError(
            "features must be a dask array [N, C, H, W] chunked along N, got "
            f"{type(features).__module__}.{type(features).__qualname__}: wrap it with "
            "dask.array.from_array(x, chunks=(n, -1, -1, -1)), or call roi_cupy.roi_align"
        )
    _args.check_features(features, "features")
    if any(numpy.isnan(size) for size in features.chunks[0]):
        raise ValueError(
            "features must have known chunk sizes along N to route boxes to them, got unknown "
            "ones: call features.compute_chunk_sizes() first"
        )
    if any(len(sizes) != 1 for sizes in features.chunks[1:]):
        raise ValueError(
            "features must be chunked along N only (one chunk along C, H and W), got "
            f"{features.numblocks} blocks of up to {features.chunksize}: rechunk with "
            "features.rechunk({1: -1, 2: -1, 3: -1}) first"
        )
    return features


def _scale(spatial_scale: Any, features: da.Array) -> float:
    return _args.spatial_scale_of(spatial_scale, _args.compute_dtype(features.dtype))


def _host(boxes: Any) -> Any:
    """A CuPy array copied to the host; anything else as it is, for roi_cupy's checks."""
    return boxes.get() if _interop.is_cupy_array(boxes) else boxes


def _concrete(boxes: BoxesLike) -> Any:
    """The boxes with dask arrays among them computed (together) and CuPy arrays on the host."""
    if isinstance(boxes, (list, tuple)):
        boxes = list(boxes)
        lazy = [i for i, b in enumerate(boxes) if isinstance(b, da.Array)]
        for i, b in zip(lazy, dask.compute(*(boxes[i] for i in lazy))):
            boxes[i] = b
        return [_host(b) for b in boxes]
    if isinstance(boxes, da.Array):
        boxes = boxes.compute()
    return _host(boxes)


def _route(boxes: BoxesLike, features: da.Array) -> tuple[numpy.ndarray, list]:
    """Check the boxes and hand each N-chunk its own.

    Returns:
        (ndarray[K] int64, list of (int, ndarray[k_i, 5])): the boxes' rows stably sorted by
        image, and for each N-chunk holding boxes its block index and its rows in that order,
        in the compute dtype, with the batch index made chunk-local.
    """
    n = features.shape[0]
    compute = _args.compute_dtype(features.dtype)
    prepared = _args.normalise_boxes(_concrete(boxes), n, "cpu", compute)
    prepared.check(_backend.backend_for(numpy), n)
    rois = prepared.array
    image = rois[:, 0].astype(numpy.int64)  # integers in [0, N): checked
    order = numpy.argsort(image, kind="stable")
    offsets = numpy.cumsum((0,) + features.chunks[0])
    cuts = numpy.searchsorted(image[order], offsets).tolist()
    blocks = []
    for i in range(len(features.chunks[0])):
        if cuts[i + 1] > cuts[i]:
            local = rois[order[cuts[i] : cuts[i + 1]]]
            local[:, 0] -= offsets[i]
            blocks.append((i, local))
    return order, blocks


def _crops(features: da.Array, boxes: BoxesLike, crop: _Crop) -> da.Array:
    """The lazy crops ``[K, C, PH, PW]`` of checked ``features`` for ``boxes``, in the boxes'
    order."""
    order, blocks = _route(boxes, features)
    c = features.shape[1]
    meta = meta_from_array(features._meta, ndim=4, dtype=features.dtype)
    if not blocks:  # no box at all: nothing to read
        shape = (0, c) + crop.output_size
        task = (_empty, _interop.array_module(meta).__name__, shape, features.dtype)
        name = f"roi_{crop.op}-empty-" + tokenize(*task[1:])
        graph = HighLevelGraph.from_collections(name, {(name, 0, 0, 0, 0): task})
        return da.Array(graph, name, chunks=tuple((s,) for s in shape), meta=meta)
    name = f"roi_{crop.op}-" + tokenize(features.name, crop, blocks)
    layer = {
        (name, j, 0, 0, 0): (_crop_block, crop, (features.name, i, 0, 0, 0), local)
        for j, (i, local) in enumerate(blocks)
    }
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[features])
    sizes = tuple(local.shape[0] for _, local in blocks)
    out = da.Array(graph, name, chunks=(sizes, (c,)) + tuple((s,) for s in crop.output_size),
                   meta=meta)
    if numpy.array_equal(order, numpy.arange(order.size)):
        return out
    return out[numpy.argsort(order)]


# ----------------------------------------------------------------------------- public API
def roi_align(
    features: da.Array,
    boxes: BoxesLike,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    *,
    mode: str = "avg",
) -> da.Array:
    """RoI Align (Mask R-CNN) of features chunked along N: :func:`roi_cupy.roi_align`'s numbers.

    Args:
        features (dask.array.Array[N, C, H, W]): float16, bfloat16, float32 or float64 features,
            chunked along N only (one chunk along C, H and W), with NumPy or CuPy chunks.
        boxes (Array[K, 5] or list of N Array[L_i, 4]): ``(batch_index, x1, y1, x2, y2)`` rows,
            or each image's ``(x1, y1, x2, y2)`` boxes, as any array kind roi_cupy takes or as
            dask arrays; computed and checked when this function is called.
        output_size (int or (int, int)): ``PH, PW`` of each crop.
        spatial_scale (float): multiplies box coordinates to reach feature coordinates.
            Default: 1.0.
        sampling_ratio (int or (int, int)): samples per bin along each axis, or a pair
            ``(sampling_h, sampling_w)``; ``<= 0`` picks ``ceil(roi_size / output_size)``
            along that axis per RoI (adaptive). Default: -1.
        aligned (bool): shift box coordinates by -0.5 (Detectron2). Default: False.
        mode (str): ``"avg"`` (a bin's mean) or ``"max"`` (its largest sample), as for
            :func:`roi_cupy.roi_align`. Default: "avg".

    Returns:
        dask.array.Array[K, C, PH, PW]: lazy, in the features' dtype and chunk kind, row ``i``
        the crop of box ``i``; chunked along K as the N-chunks route the boxes when they come
        sorted by image.

    Raises:
        TypeError, ValueError: for features that are not a dask array chunked along N only, and
            for any argument or box row roi_cupy.roi_align would refuse.
    """
    features = _check_features(features)
    crop = _Crop(
        "align", _args.output_size_pair(output_size), _scale(spatial_scale, features),
        _args.sampling_of(sampling_ratio), _args.flag(aligned, "aligned"),
        _backend.current_backend(), _args.align_mode(mode),
    )
    return _crops(features, boxes, crop)


def roi_pool(
    features: da.Array,
    boxes: BoxesLike,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> da.Array:
    """RoI Pool (Fast R-CNN) of features chunked along N: :func:`roi_cupy.roi_pool`'s numbers.

    Args:
        features (dask.array.Array[N, C, H, W]): as for :func:`roi_align`.
        boxes (Array[K, 5] or list of N Array[L_i, 4]): as for :func:`roi_align`.
        output_size (int or (int, int)): ``PH, PW`` of each crop.
        spatial_scale (float): multiplies box coordinates to reach feature coordinates.
            Default: 1.0.

    Returns:
        dask.array.Array[K, C, PH, PW]: the maxima, lazy, as for :func:`roi_align`.

    Raises:
        TypeError, ValueError: as for :func:`roi_align`.
    """
    features = _check_features(features)
    crop = _Crop(
        "pool", _args.output_size_pair(output_size), _scale(spatial_scale, features),
        backend=_backend.current_backend(),
    )
    return _crops(features, boxes, crop)
