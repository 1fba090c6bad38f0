"""RoI Align on NumPy arrays, through its separable form.

A bin's sample grid is the Cartesian product of ``gh`` sample rows and ``gw`` sample columns, the
range test splits into a y test and an x test, and the bilinear weights are products of a y weight
and an x weight. So for one RoI the whole output is a pair of small matrix products::

    out[k, c] = Ay[k] @ X[b, c] @ Ax[k].T        Ay[k]: [PH, H], Ax[k]: [PW, W]

where row ``ph`` of ``Ay[k]`` holds the bin's sample rows' 1-D bilinear weights summed and divided
by ``gh`` (a sample outside ``[-1, H]`` adds nothing but still counts in ``gh``), and likewise for
``Ax[k]``; ``1/gh * 1/gw`` is the ``1/count`` of the direct form. The backward pass is the
transposed product ``grad[b, c] += Ay[k].T @ G[k, c] @ Ax[k]``.

Each RoI touches few rows and columns, so ``Ay[k]`` and ``Ax[k]`` are stored compressed to the
rows and columns that carry a weight. RoIs of similar compressed size are grouped; a group gathers
its windows from a channels-last copy of the features in one ``take`` and contracts them with two
batched matrix products (BLAS), so there is no Python work per output element or per sample.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy

from roi_cupy._numpy import _common

# Most RoIs in one group.
_GROUP = 4096


class _Axis:
    """The sampling of one axis (y or x) of every RoI of a block.

    Attributes:
        start (ndarray[K]): the RoI's first edge in feature coordinates (compute dtype).
        bin (ndarray[K]): bin size (compute dtype; negative for a reversed box).
        grid (ndarray[K] float64): samples per bin (0 where a bin has none).
        base (ndarray[K, P]): each bin's first edge, ``start + p * bin`` (compute dtype).
        lo (ndarray[K, P] float64): first sample index worth evaluating in each bin.
        n (ndarray[K, P] int64): how many sample indices from ``lo`` on are evaluated.
        bound (ndarray[K] int64): an upper bound on the distinct pixels the RoI touches.
    """

    def __init__(self, start, bin_size, grid, pooled: int, size: int, ct: numpy.dtype):
        self.start, self.bin, self.grid, self.size, self.ct = start, bin_size, grid, size, ct
        g = grid[:, None]
        with numpy.errstate(all="ignore"):
            self.base = start[:, None] + numpy.arange(pooled, dtype=ct) * bin_size[:, None]
            b64 = self.base.astype(numpy.float64)
            step = (bin_size.astype(numpy.float64) / grid)[:, None]
            # Sample indices whose coordinate lands in [-1, size], widened by the rounding
            # error of the compute dtype; the exact test is redone on every evaluated sample.
            first = (-1.0 - b64) / step - 0.5
            last = (size - b64) / step - 0.5
            slack = 2.0 + 4.0 * numpy.finfo(ct).eps * (numpy.abs(b64) + numpy.abs(step)) / numpy.abs(
                step
            )
            lo = numpy.clip(numpy.floor(numpy.fmin(first, last) - slack), 0, g - 1)
            hi = numpy.clip(numpy.ceil(numpy.fmax(first, last) + slack), 0, g - 1)
        # A zero-size bin puts all its samples on one point: evaluate it once, weight 1.
        collapsed = (bin_size == 0)[:, None] & (g >= 1)
        lo = numpy.where(collapsed, 0.0, lo)
        hi = numpy.where(collapsed, 0.0, hi)
        ok = (g >= 1) & numpy.isfinite(lo) & numpy.isfinite(hi) & (hi >= lo)
        self.lo = numpy.where(ok, lo, 0.0)
        self.n = numpy.where(ok, hi - self.lo + 1, 0).astype(numpy.int64)
        self.factor = numpy.where(bin_size == 0, 1.0, 1.0 / numpy.maximum(grid, 1.0))
        self.bound = numpy.minimum(size, 2 * self.n.sum(axis=1))

    def weights(self, rois: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
        """Compressed weight matrices of the RoIs ``rois`` (indices into the block).

        Returns:
            (ndarray[G, P, R], ndarray[G, R] int64, ndarray[G] int64): ``A`` with
            ``A[g, p, r]`` the weight of pixel ``pixels[g, r]`` in bin ``p``, the pixel indices
            (0 where padded, with zero weight), and how many of the R columns each RoI uses.
        """
        ct, size = self.ct, self.size
        n = self.n[rois]
        kg, pooled = n.shape
        counts = n.ravel()
        total = int(counts.sum())
        kp = numpy.repeat(numpy.arange(kg * pooled), counts)
        first = numpy.cumsum(counts) - counts
        index = self.lo[rois].ravel()[kp] + (numpy.arange(total) - first[kp])
        k = kp // pooled
        bin_size = self.bin[rois][k]
        with numpy.errstate(all="ignore"):
            y = self.base[rois].ravel()[kp] + (
                (index.astype(ct) + ct.type(0.5)) * bin_size
            ) / self.grid[rois].astype(ct)[k]
        inside = (y >= -1) & (y <= size)  # NaN fails both
        kp, k, y = kp[inside], k[inside], y[inside]
        y = numpy.maximum(y, ct.type(0))
        low = numpy.floor(y).astype(numpy.int64)
        edge = low >= size - 1
        low = numpy.where(edge, size - 1, low)
        high = numpy.where(edge, low, low + 1)
        frac = numpy.where(edge, ct.type(0), y - low.astype(ct))
        factor = self.factor[rois][k]
        w_low = (ct.type(1) - frac).astype(numpy.float64) * factor
        w_high = frac.astype(numpy.float64) * factor

        kp = numpy.concatenate([kp, kp])
        k = numpy.concatenate([k, k])
        pixel = numpy.concatenate([low, high])
        w = numpy.concatenate([w_low, w_high])

        # Number the distinct pixels of each RoI in increasing order.
        unique, inverse = numpy.unique(k * size + pixel, return_inverse=True)
        k_u = unique // size
        used = numpy.bincount(k_u, minlength=kg)
        pos_u = numpy.arange(unique.size) - (numpy.cumsum(used) - used)[k_u]
        width = max(1, int(used.max(initial=0)))
        pixels = numpy.zeros((kg, width), dtype=numpy.int64)
        pixels[k_u, pos_u] = unique - k_u * size
        flat = kp * width + pos_u[inverse.ravel()]
        a = numpy.bincount(flat, weights=w, minlength=kg * pooled * width)
        return a.reshape(kg, pooled, width).astype(ct), pixels, used


def _axes(rois, shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct):
    """The y and x sampling of a block of RoIs (features of ``shape`` = (N, C, H, W))."""
    _, _, h, w = shape
    scale = ct.type(spatial_scale)
    offset = ct.type(0.5 if aligned else 0.0)
    with numpy.errstate(all="ignore"):
        x0 = rois[:, 1] * scale - offset
        y0 = rois[:, 2] * scale - offset
        rw = (rois[:, 3] * scale - offset) - x0
        rh = (rois[:, 4] * scale - offset) - y0
        if not aligned:
            rw = numpy.maximum(rw, ct.type(1))
            rh = numpy.maximum(rh, ct.type(1))
        bw = rw / ct.type(pooled_w)
        bh = rh / ct.type(pooled_h)
        if sampling_ratio > 0:
            gh = numpy.full(rois.shape[0], float(sampling_ratio))
            gw = gh
        else:
            gh = numpy.ceil(bh).astype(numpy.float64)
            gw = numpy.ceil(bw).astype(numpy.float64)
    gh = numpy.where(gh >= 1, gh, 0.0)  # NaN and non-positive grids sample nothing
    gw = numpy.where(gw >= 1, gw, 0.0)
    return _Axis(y0, bh, gh, pooled_h, h, ct), _Axis(x0, bw, gw, pooled_w, w, ct)


def _groups(rb, cb, pooled_h, pooled_w, row_bytes) -> Iterator[tuple[int, int]]:
    """Split RoIs into runs whose padded windows fit the group budget.

    ``rb`` and ``cb`` are the RoIs' row and column counts, sorted by their buckets; a run
    never spans two buckets, so each run pads little in either direction.
    """
    bucket = _bucket(rb) * (1 << 32) + _bucket(cb)
    i, k = 0, rb.size
    while i < k:
        j = min(k, i + _GROUP, int(numpy.searchsorted(bucket, bucket[i], side="right")))
        r = numpy.maximum.accumulate(numpy.maximum(rb[i:j], pooled_h))
        c = numpy.maximum.accumulate(numpy.maximum(cb[i:j], pooled_w))
        size = numpy.arange(1, j - i + 1) * r * c * row_bytes
        j = i + max(1, int(numpy.searchsorted(size, _common.GROUP_BUDGET, side="right")))
        yield i, j
        i = j


def _bucket(rows: numpy.ndarray) -> numpy.ndarray:
    """Size buckets 25% wide (at least 4 rows)."""
    return numpy.floor(numpy.log(numpy.maximum(rows, 4) / 4.0) / numpy.log(1.25)).astype(
        numpy.int64
    )


def _plan(rois, shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct, row_bytes):
    """Yield ``(kidx, b, ay, rows, used_y, ax, cols, used_x)`` for every group of RoIs that
    touches the features; RoIs left out get zeros."""
    n, _, h, w = shape
    # RoIs whose weights are built together: their padded weight matrices stay small.
    block = max(16, min(1024, (1 << 22) // (max(pooled_h, pooled_w) * max(h, w))))
    for s in range(0, rois.shape[0], block):
        chunk = rois[s : s + block]
        b, valid = _common.batch_index(chunk, n)
        safe = numpy.where(valid[:, None], chunk, 0).astype(ct)
        ay, ax = _axes(safe, shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct)
        active = numpy.flatnonzero(valid & (ay.bound > 0) & (ax.bound > 0))
        if active.size == 0:
            continue
        wy, rows, used_y = ay.weights(active)
        wx, cols, used_x = ax.weights(active)
        # Group RoIs of similar window size so that little of a group's gather is padding.
        order = numpy.lexsort((used_x, _bucket(used_x), _bucket(used_y)))
        order = order[(used_y[order] > 0) & (used_x[order] > 0)]
        for i, j in _groups(used_y[order], used_x[order], pooled_h, pooled_w, row_bytes):
            sel = order[i:j]
            r, q = int(used_y[sel].max()), int(used_x[sel].max())
            yield (
                s + active[sel], b[active[sel]],
                wy[sel, :, :r], rows[sel, :r], used_y[sel],
                wx[sel, :, :q], cols[sel, :q], used_x[sel],
            )


def roi_align_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> numpy.ndarray:
    """RoI Align forward.

    Args:
        input (ndarray[N, C, H, W]): features (float16, float32 or float64), C-contiguous.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows in the compute dtype
            (float64 for float64 features, float32 otherwise); invalid rows give zeros.
        pooled_h (int): PH.
        pooled_w (int): PW.
        spatial_scale (float): box-to-feature coordinate scale.
        sampling_ratio (int): samples per bin and axis; ``<= 0`` for adaptive.
        aligned (bool): shift boxes by -0.5 pixel (and do not clamp their size to 1).

    Returns:
        ndarray[K, C, PH, PW]: in the input's dtype.
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = numpy.zeros((k, c, pooled_h, pooled_w), dtype=input.dtype)
    if out.size == 0 or h == 0 or w == 0:
        return out
    ct = _common.compute_dtype(input.dtype)
    cc = _common.channel_chunk(c, n * h * w, ct.itemsize)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        x = _common.channels_last(input, c0, c1, ct)
        plan = _plan(
            rois, input.shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct,
            (c1 - c0) * ct.itemsize,
        )
        with _common.serial_blas():
            for kidx, b, wy, rows, _, wx, cols, _ in plan:
                g, r, q = wy.shape[0], rows.shape[1], cols.shape[1]
                pixel = (b[:, None, None] * h + rows[:, :, None]) * w + cols[:, None, :]
                window = x.take(pixel, axis=0).reshape(g, r, q * (c1 - c0))
                tmp = numpy.matmul(wy, window).reshape(g, pooled_h, q, c1 - c0)
                res = numpy.matmul(wx[:, None], tmp)  # [G, PH, PW, Cc]
                out[kidx, c0:c1] = res.transpose(0, 3, 1, 2)
    return out


def roi_align_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> numpy.ndarray:
    """Gradient of RoI Align with respect to its input; deterministic.

    Contributions are summed RoI by RoI in a fixed order, in float32 for float16/float32 and in
    float64 for float64, and rounded once into the result.

    Args:
        grad_output (ndarray[K, C, PH, PW]): gradient of the output, C-contiguous.
        rois (ndarray[K, 5]): as for :func:`roi_align_forward`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)`` of the forward input.
        spatial_scale (float): box-to-feature coordinate scale.
        sampling_ratio (int): samples per bin and axis; ``<= 0`` for adaptive.
        aligned (bool): as in the forward pass.

    Returns:
        ndarray[N, C, H, W]: in grad_output's dtype.
    """
    n, c, h, w = input_shape
    k, _, pooled_h, pooled_w = grad_output.shape
    grad_input = numpy.zeros((n, c, h, w), dtype=grad_output.dtype)
    if grad_input.size == 0 or k == 0:
        return grad_input
    ct = _common.compute_dtype(grad_output.dtype)
    cc = _common.channel_chunk(c, n * h * w, ct.itemsize)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        acc = numpy.zeros((n * h * w, c1 - c0), dtype=ct)
        plan = _plan(
            rois, input_shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, ct,
            (c1 - c0) * ct.itemsize,
        )
        for kidx, b, wy, rows, used_y, wx, cols, used_x in plan:
            g, r, q = wy.shape[0], rows.shape[1], cols.shape[1]
            grad = numpy.empty((g, pooled_h, pooled_w, c1 - c0), dtype=ct)
            grad[...] = grad_output[kidx, c0:c1].transpose(0, 2, 3, 1)
            with _common.serial_blas():
                tmp = numpy.matmul(wx.transpose(0, 2, 1)[:, None], grad)  # [G, PH, Q, Cc]
                part = numpy.matmul(
                    wy.transpose(0, 2, 1), tmp.reshape(g, pooled_h, q * (c1 - c0))
                )
            part = part.reshape(g, r, q, c1 - c0)
            pixel = (b[:, None, None] * h + rows[:, :, None]) * w + cols[:, None, :]
            # A RoI's pixels are distinct, so one buffered add per RoI is exact; the RoI order is
            # fixed by the inputs, so the sum is the same on every run.
            for i in range(g):
                ry, rx = used_y[i], used_x[i]
                acc[pixel[i, :ry, :rx].ravel()] += part[i, :ry, :rx].reshape(ry * rx, c1 - c0)
        grad_input[:, c0:c1] = acc.reshape(n, h, w, c1 - c0).transpose(0, 3, 1, 2)
    return grad_input
