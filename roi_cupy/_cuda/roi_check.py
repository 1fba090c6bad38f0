"""Launcher of the RoI validation kernel (cuda/roi_check.cu), for any runtime."""
from __future__ import annotations

from typing import Any

import numpy

from roi_cupy._cuda import launch


def first_invalid(
    rt: Any, rois: Any, batch: int, limit: float, indices: Any = None, plane: int = 0
) -> tuple[int, int]:
    """The first invalid RoI and the first index out of range: one or two small launches into
    one result buffer, one device-to-host copy.

    Args:
        rt: the runtime (``xp`` and ``function``).
        rois (ndarray[K, 5] or [K, 6]): ``(batch_index, x1, y1, x2, y2)`` or rotated
            ``(batch_index, cx, cy, w, h, angle)`` rows, float32 or float64.
        batch (int): the batch size N.
        limit (float): the largest magnitude a value may have (the dtype's largest finite
            value where that is smaller).
        indices (ndarray int64, C-contiguous): RoI Pool indices to check as well, or None.
        plane (int): ``H * W``: indices must lie in ``[-1, plane)``.

    Returns:
        (int, int): the first RoI with a value of magnitude above ``limit`` (NaN and infinities
        included) or a batch index that is not an integer in ``[0, batch)``, and the first flat
        position of an index outside ``[-1, plane)``; -1 for none.
    """
    count = rois.shape[0]
    total = 0 if indices is None else indices.size
    if count == 0 and total == 0:
        return -1, -1
    index64 = launch.use_index64(rois.size, batch, total)
    i = launch.index_scalar(index64)
    first = rt.xp.full((2,), count, dtype=i)  # a fill on the device: nothing is copied up
    first[1:] = total
    if count:
        bound = rois.dtype.type(min(limit, numpy.finfo(rois.dtype).max))
        grid, block = launch.grid(count)
        rt.function(launch.kernel_name("roi_check", rois.dtype, index64))(
            grid, block, (rois, i(count), i(batch), bound, first[:1], numpy.int32(rois.shape[1]))
        )
    if total:
        grid, block = launch.grid(total)
        rt.function(launch.kernel_name("roi_check_indices", None, index64))(
            grid, block, (indices, i(total), numpy.int64(plane), first[1:])
        )
    row, position = (int(v) for v in first.tolist())
    return (-1 if row == count else row), (-1 if position == total else position)
