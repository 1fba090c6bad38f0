"""Launcher of the RoI validation kernel (cuda/roi_check.cu), for any runtime."""
from __future__ import annotations

from typing import Any

import numpy

from roi_cupy._cuda import launch


def first_invalid(rt: Any, rois: Any, batch: int, limit: float) -> int:
    """Index of the first RoI with a value of magnitude above ``limit`` (NaN and infinities
    included) or a batch index that is not an integer in ``[0, batch)``, or -1 when all are
    valid: one launch and one device-to-host copy.

    Args:
        rt: the runtime (``xp`` and ``function``).
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)``, float32 or float64.
        batch (int): the batch size N.
        limit (float): the largest magnitude a value may have (the dtype's largest finite
            value where that is smaller).
    """
    count = rois.shape[0]
    if count == 0:
        return -1
    index64 = launch.use_index64(rois.size, batch)
    i = launch.index_scalar(index64)
    first = rt.xp.full((1,), count, dtype=i)
    grid, block = launch.grid(count)
    bound = rois.dtype.type(min(limit, numpy.finfo(rois.dtype).max))
    rt.function(launch.kernel_name("roi_check", rois.dtype, index64))(
        grid, block, (rois, i(count), i(batch), bound, first)
    )
    found = int(first[0])
    return -1 if found == count else found
