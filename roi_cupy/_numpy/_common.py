"""Helpers shared by the NumPy RoI operators: dtypes, RoI validity, chunk sizes, layouts."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
from collections.abc import Iterator

import numpy

# The float32 maximum: RoI Pool's running maximum starts at its negation for every dtype.
FLT_MAX = float(numpy.finfo(numpy.float32).max)

# Working-set budgets in bytes; together they keep the extra memory well under 256 MiB.
PLANE_BUDGET = 64 << 20  # a channels-last copy of (a channel slice of) the features
# The gathered windows of one group of RoIs: small enough to stay in cache between the gather
# and the products that read them (measured on [2, 256, 64, 64], 256 boxes: 16 MiB 33 ms,
# 4 MiB 22 ms, 2 MiB 22 ms, 512 KiB 23 ms; on [2, 256, 200, 304], 1024 boxes 167 -> 132 ms).
GROUP_BUDGET = 2 << 20


def compute_dtype(dtype: numpy.dtype) -> numpy.dtype:
    """float64 for float64 data, float32 for everything narrower (float16, bfloat16, float32)."""
    return numpy.dtype(numpy.float64 if numpy.dtype(dtype) == numpy.float64 else numpy.float32)


def batch_index(rois: numpy.ndarray, n: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Batch index of each RoI (truncated toward zero) and whether the RoI is usable.

    Args:
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows.
        n (int): the batch size N.

    Returns:
        (ndarray[K] int64, ndarray[K] bool): the index (0 where unusable) and the mask of RoIs
        whose row is finite and whose truncated index lies in ``[0, n)``.
    """
    finite = numpy.isfinite(rois).all(axis=1)
    b = numpy.where(finite, numpy.trunc(rois[:, 0]), -1.0)
    valid = finite & (b >= 0) & (b < n)
    return numpy.where(valid, b, 0).astype(numpy.int64), valid


def lerp(v: numpy.ndarray, extent, ct: numpy.dtype) -> tuple[numpy.ndarray, ...]:
    """The kernels' ``roi_lerp_weights`` along one axis, for positions ``v`` known to lie in
    ``[-1, extent]`` (``extent`` an int or an array broadcasting with ``v``): the low pixel,
    the high pixel (int64) and the high pixel's weight in the compute dtype (the low pixel
    weighs ``1 - frac``). A position below 0 reads pixel 0; one past the last pixel's centre
    snaps to it (high = low, frac = 0)."""
    v = numpy.maximum(v, ct.type(0))
    low = v.astype(numpy.int64)  # v >= 0: truncation is the floor
    edge = low >= extent - 1
    low = numpy.where(edge, extent - 1, low)
    high = numpy.where(edge, low, low + 1)
    return low, high, numpy.where(edge, ct.type(0), v - low.astype(ct))


def channel_chunk(c: int, plane: int, itemsize: int) -> int:
    """How many channels fit one channels-last working copy of ``plane`` = N*H*W pixels."""
    return max(1, min(c, PLANE_BUDGET // max(1, plane * itemsize)))


def channels_last(array: numpy.ndarray, c0: int, c1: int, dtype: numpy.dtype) -> numpy.ndarray:
    """Channels ``c0:c1`` of ``array`` [N, C, H, W] as a contiguous ``[N * H * W, c1 - c0]``.

    Channels-last makes every pixel a contiguous vector, so gathering pixels copies whole rows.
    """
    n, _, h, w = array.shape
    out = numpy.empty((n, h, w, c1 - c0), dtype=dtype)
    out[...] = array[:, c0:c1].transpose(0, 2, 3, 1)
    return out.reshape(n * h * w, c1 - c0)


@functools.cache
def _openblas() -> ctypes.CDLL | None:
    """NumPy's bundled OpenBLAS when it is loaded and offers a per-thread thread count, else None.

    Only a library already in the process is used (``RTLD_NOLOAD``): loading another BLAS would
    start its own thread pool. NumPy built against any other BLAS (MKL, Accelerate, a system
    library) finds nothing here, and so does a platform without ``RTLD_NOLOAD``.
    """
    mode = getattr(os, "RTLD_NOLOAD", None)
    if mode is None:
        return None
    site = os.path.dirname(os.path.dirname(numpy.__file__))
    folders = (os.path.join(site, "numpy.libs"), os.path.join(site, "numpy", ".dylibs"))
    for path in sorted(p for f in folders for p in glob.glob(os.path.join(f, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path, mode=mode | os.RTLD_LAZY)
            setter = lib.openblas_set_num_threads_local  # int (int): returns the previous count
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        return lib
    return None


@contextlib.contextmanager
def serial_blas() -> Iterator[None]:
    """Run the enclosed BLAS calls of this thread on one core.

    The products here are many small ones (a few rows each); threading them only adds
    synchronisation, and on a busy machine spinning worker threads slow them down (by 1.3-1.7x
    with one competing process on two cores, more under heavier load). Only the calling thread
    is affected; a NumPy without its bundled OpenBLAS is left as it is.
    """
    lib = _openblas()
    if lib is None:
        yield
        return
    previous = lib.openblas_set_num_threads_local(1)
    try:
        yield
    finally:
        if previous >= 1:
            lib.openblas_set_num_threads_local(previous)
