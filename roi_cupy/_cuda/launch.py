"""Launch geometry, index width and the CuPy runtime the launchers drive.

A *runtime* (see ``roi_align.py``) has ``xp`` (the array module that allocates) and
``function(name_expression)`` returning ``launch(grid, block, args)``. :class:`CupyRuntime` is the
GPU one; the emulator provides another with NumPy arrays.
"""
from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy

from roi_cupy._cuda import kernels

# Largest element count the 32-bit index path handles (tests lower it to reach the 64-bit path).
INDEX32_LIMIT = 2**31 - 1

BLOCK = 256
# 4096 blocks of 256 threads keep every SM of current GPUs busy several times over; larger
# outputs are covered by the kernels' grid-stride loops.
MAX_GRID = 4096


def use_index64(*counts: int) -> bool:
    """Whether any element count (of an input or output array) needs the 64-bit index path."""
    return max(counts) > INDEX32_LIMIT


def index_scalar(index64: bool) -> type:
    """The numpy scalar type of the kernels' index parameters on that path."""
    return numpy.int64 if index64 else numpy.int32


def grid(total: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(grid, block)`` for ``total`` elements (> 0) handled one per thread."""
    blocks = min(-(-total // BLOCK), MAX_GRID)
    return (blocks, 1, 1), (BLOCK, 1, 1)


def compute_dtype(dtype: Any) -> numpy.dtype:
    """float64 for float64 storage, float32 otherwise (the kernels' compute type)."""
    return numpy.dtype(numpy.float64 if numpy.dtype(dtype) == numpy.float64 else numpy.float32)


def kernel_name(kernel: str, dtype: Any, index64: bool) -> str:
    return kernels.name_expression(kernel, None if dtype is None else numpy.dtype(dtype), index64)


class CupyRuntime:
    """Runs the kernels of one CUDA device on the current stream.

    Args:
        device_id (int): the CUDA device whose compiled module is used; launches must happen
            while that device is current.
    """

    def __init__(self, device_id: int):
        import cupy

        self.xp: ModuleType = cupy
        self.device_id = device_id
        self._functions: dict[str, Callable[..., None]] = {}

    def function(self, name_expression: str) -> Callable[..., None]:
        """The kernel's launch object, looked up once per runtime (so once per device): a
        ``cupy.RawFunction``, called as ``(grid, block, args)``, launches on the current stream."""
        found = self._functions.get(name_expression)
        if found is None:
            found = kernels.module(self.device_id).get_function(name_expression)
            self._functions[name_expression] = found
        return found


def pooled_forward(
    rt: Any,
    kernel: str,
    input: Any,
    rois: Any,
    channels: int,
    pooled_h: int,
    pooled_w: int,
    tail: Callable[[type], tuple[Any, ...]],
    data: Any = None,
) -> Any:
    """Launch a forward kernel that writes one output element per thread (or, as RoI Align's
    mean does, walks the output in blocks over the same grid) and return its output
    ``[K, channels, PH, PW]`` in the input's dtype (all zeros when the feature plane is empty:
    there is no pixel to read, so every RoI is invalid).

    The kernel takes ``(input, rois, output, I total, I channels, I H, I W, I N, I PH, I PW,
    *tail(real))``, ``real`` the numpy scalar type of the compute dtype (for the spatial scale and
    what follows it). ``data`` is the array the kernel reads in place of ``input`` (the same
    elements in another layout), ``input`` itself when None.
    """
    n, _, h, w = input.shape
    output = rt.xp.empty((rois.shape[0], channels, pooled_h, pooled_w), dtype=input.dtype)
    if output.size == 0:
        return output
    if input.size == 0:
        output[...] = 0
        return output
    index64 = use_index64(input.size, output.size, rois.size)
    i = index_scalar(index64)
    blocks, threads = grid(output.size)
    rt.function(kernel_name(kernel, input.dtype, index64))(
        blocks,
        threads,
        (
            input if data is None else data, rois, output,
            i(output.size), i(channels), i(h), i(w), i(n), i(pooled_h), i(pooled_w),
            *tail(compute_dtype(input.dtype).type),
        ),
    )
    return output
