"""Input validation of the RoIs on the host (the NumPy counterpart of cuda/roi_check.cu)."""
from __future__ import annotations

import numpy


# Indices checked together: a block stays in cache between its two reductions.
_INDEX_BLOCK = 1 << 16


def first_invalid(
    rois: numpy.ndarray,
    batch: int,
    limit: float = numpy.inf,
    indices: numpy.ndarray | None = None,
    plane: int = 0,
) -> tuple[int, int]:
    """The first invalid RoI and the first RoI Pool index out of range.

    Args:
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows.
        batch (int): the batch size N.
        limit (float): the largest magnitude a value may have. Default: any finite value.
        indices (ndarray of an integer dtype, any strides): indices to check too, or None.
        plane (int): ``H * W``: indices must lie in ``[-1, plane)``.

    Returns:
        (int, int): the first RoI with a value of magnitude above ``limit`` (NaN and infinities
        included) or a batch index that is not an integer in ``[0, batch)``, and the first flat
        (C-order) position of an index outside ``[-1, plane)``; -1 for none.
    """
    b = rois[:, 0]
    # NaN fails every comparison (comparisons never warn), and so does an infinity against a
    # finite limit.
    good = numpy.abs(rois) <= limit
    if limit == numpy.inf:
        good &= numpy.isfinite(rois)
    bad = ~good.all(axis=1) | (b < 0) | (b >= batch) | (b != numpy.trunc(b))
    row = int(bad.argmax()) if bad.any() else -1
    return row, -1 if indices is None else first_out_of_range(indices, plane)


def first_out_of_range(indices: numpy.ndarray, plane: int) -> int:
    """The first flat (C-order) position of ``indices`` (any integer dtype and strides) outside
    ``[-1, plane)``, or -1; block by block along the first axis (two reductions each, while the
    block is in cache), so that no mask or copy of the indices' size is made."""
    if indices.size == 0:
        return -1
    if indices.ndim == 0:
        indices = indices.reshape(1)
    row = indices[0].size
    step = max(1, _INDEX_BLOCK // max(1, row))
    for s in range(0, indices.shape[0], step):
        block = indices[s : s + step]
        if block.min() < -1 or block.max() >= plane:
            wrong = numpy.flatnonzero((block < -1) | (block >= plane))
            return s * row + int(wrong[0])
    return -1
