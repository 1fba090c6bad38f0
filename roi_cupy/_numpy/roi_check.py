"""Input validation of the RoIs on the host (the NumPy counterpart of cuda/roi_check.cu)."""
from __future__ import annotations

import numpy


def first_invalid_roi(rois: numpy.ndarray, batch: int, limit: float = numpy.inf) -> int:
    """Index of the first RoI with a value of magnitude above ``limit`` (NaN and infinities
    included) or a batch index that is not an integer in ``[0, batch)``, or -1 when all are
    valid.

    Args:
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows.
        batch (int): the batch size N.
        limit (float): the largest magnitude a value may have. Default: any finite value.
    """
    b = rois[:, 0]
    with numpy.errstate(invalid="ignore"):
        bad = ~numpy.isfinite(rois).all(axis=1) | ~(numpy.abs(rois) <= limit).all(axis=1)
        bad |= (b < 0) | (b >= batch) | (b != numpy.trunc(b))
    return int(numpy.argmax(bad)) if bad.any() else -1
