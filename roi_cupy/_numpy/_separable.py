"""Position-sensitive bins as sums over products of per-axis pixel weights, shared by PS RoI Align
and PS RoI Pool on NumPy.

Bin ``(ph, pw)`` of a RoI reads some rows, each with a weight along y, and some columns, each
with a weight along x, and every pixel where such a row and column cross; with
``j = ph * PW + pw``::

    out[k, c, ph, pw] = sum over its rows r and columns q of
                        wy[r] * wx[q] * X[b, c * PH * PW + j, r, q]  /  divisor[k, ph, pw]

PS RoI Align's rows are the bilinear corners of the bin's samples, each weighing its samples'
weights added up and divided by the samples per axis (divisor 1); PS RoI Pool's are the rows of
the bin's window, each weighing 1 (divisor: the window's area). :class:`Entries` lists each
bin's pixels and weights along one axis; the *pairs* (row, column) of every bin are then
gathered from a copy of the features laid out ``[PH * PW, N * H * W, C / (PH * PW)]`` (the
channels of one pair contiguous), weighted and added up in float64. The backward pass scatters
the same pairs. The work follows the pairs the bins read, not the plane, and runs in chunks of
bounded size however large a bin is.

A pixel that an axis reads with weight exactly 0 (a bilinear corner of weight 0) is listed apart
from its positive weight, so that a non-finite value there gives NaN (``0 * inf``) as it does in
the kernels, which multiply all four corners.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy

from roi_cupy._numpy import _common

# Bytes of one chunk of pairs: their gathered float64 values and about eight int64 or float64
# index and weight arrays.
_CHUNK_BYTES = 4 << 20
# Most RoIs in one block: their entries and row units are a few arrays of G * PH * PW * rows.
_BLOCK = 256


class Entries(NamedTuple):
    """The pixels each bin of a block of RoIs reads along one axis, bin after bin.

    Attributes:
        start (ndarray[G * P + 1] int64): the entries of bin ``p`` of the block's RoI ``g`` are
            ``start[g * P + p] : start[g * P + p + 1]``.
        pixel (ndarray[E] int64): the row (or column) each entry reads.
        weight (ndarray[E] float64): its weight.
    """

    start: numpy.ndarray
    pixel: numpy.ndarray
    weight: numpy.ndarray

    @classmethod
    def of_sorted(cls, bins, pixel, weight, count: int) -> Entries:
        """Entries from ``(bin, pixel, weight)`` triples sorted by bin; ``count`` bins."""
        return cls(numpy.searchsorted(bins, numpy.arange(count + 1)), pixel, weight)


def merge(bins, pixel, weight, size: int) -> tuple[numpy.ndarray, ...]:
    """One ``(bin, pixel, weight)`` triple per pixel read, from one per read (any order): the
    weights of a pixel in a bin added up, a weight of exactly 0 kept apart. Sorted by bin, then
    pixel; ``size`` is the axis length."""
    key = (bins * size + pixel) * 2 + (weight == 0)
    unique, inverse = numpy.unique(key, return_inverse=True)
    total = numpy.bincount(inverse.ravel(), weights=weight, minlength=unique.size)
    at = unique // 2
    return at // size, at % size, total


class Block(NamedTuple):
    """Valid RoIs handled together, and what their bins read.

    Attributes:
        kidx (ndarray[G] int64): the RoIs, as indices into the call's rois.
        b (ndarray[G] int64): their batch indices.
        y (Entries): rows read, over ``G * PH`` bins.
        x (Entries): columns read, over ``G * PW`` bins.
        divisor (ndarray[G * PH * PW] float64): what each bin's sum is divided by.
    """

    kidx: numpy.ndarray
    b: numpy.ndarray
    y: Entries
    x: Entries
    divisor: numpy.ndarray


# prepare(rois [G, 5] of valid rows) -> (y Entries, x Entries, divisor [G * PH * PW])
Prepare = Callable[[numpy.ndarray], tuple[Entries, Entries, numpy.ndarray]]


def _blocks(rois, shape, pooled, prepare: Prepare) -> Iterator[Block]:
    """The valid RoIs in blocks; invalid ones are left out (their outputs stay 0)."""
    n, _, h, w = shape
    size = max(16, min(_BLOCK, (1 << 18) // (max(pooled) * max(h, w, 1))))
    for s in range(0, rois.shape[0], size):
        chunk = rois[s : s + size]
        b, valid = _common.batch_index(chunk, n)
        active = numpy.flatnonzero(valid)
        if active.size:
            yield Block(s + active, b[active], *prepare(chunk[active]))


def _pairs(block: Block, shape, pooled, budget: int):
    """The pairs of every bin of ``block``, in chunks of about ``budget`` pairs (at least one row
    entry of one bin).

    Yields:
        (ndarray[P] int64, ndarray[P] int64, ndarray[P] float64): each pair's bin
        ``g * PH * PW + j`` (non-decreasing), its row in the layout of :func:`_by_bin`, and its
        weight ``wy * wx``.
    """
    n, _, h, w = shape
    g = block.kidx.size
    pooled_h, pooled_w = pooled
    bins = pooled_h * pooled_w
    full = (g, pooled_h, pooled_w)
    rows = numpy.broadcast_to(numpy.diff(block.y.start).reshape(g, pooled_h, 1), full).ravel()
    cols = numpy.broadcast_to(numpy.diff(block.x.start).reshape(g, 1, pooled_w), full).ravel()
    y_first = numpy.broadcast_to(block.y.start[:-1].reshape(g, pooled_h, 1), full).ravel()
    x_first = numpy.broadcast_to(block.x.start[:-1].reshape(g, 1, pooled_w), full).ravel()
    # A unit is one row entry of one bin; it pairs with every column entry of that bin.
    unit_bin = numpy.repeat(numpy.arange(rows.size), rows)
    unit_row = numpy.arange(unit_bin.size) - (numpy.cumsum(rows) - rows)[unit_bin]
    unit_row += y_first[unit_bin]
    unit_pairs = cols[unit_bin]
    total = numpy.cumsum(unit_pairs)
    u = 0
    while u < unit_bin.size:
        done = int(total[u - 1]) if u else 0
        v = max(u + 1, int(numpy.searchsorted(total, done + budget, side="right")))
        counts = unit_pairs[u:v]
        unit = numpy.repeat(numpy.arange(u, v), counts)
        if unit.size:
            offset = numpy.arange(unit.size) - (numpy.cumsum(counts) - counts)[unit - u]
            f = unit_bin[unit]
            row, col = unit_row[unit], x_first[f] + offset
            pixel = (block.b[f // bins] * h + block.y.pixel[row]) * w + block.x.pixel[col]
            yield f, (f % bins) * (n * h * w) + pixel, block.y.weight[row] * block.x.weight[col]
        u = v


def _by_bin(input: numpy.ndarray, c0: int, c1: int, bins: int, ct) -> numpy.ndarray:
    """Output channels ``c0:c1`` of ``input`` [N, C, H, W] as ``[bins * N * H * W, c1 - c0]`` in
    ``ct``: row ``j * N * H * W + (b * H + r) * W + q`` holds pixel ``(r, q)`` of image ``b`` in
    the channels that bin ``j`` reads, one per output channel."""
    n, c, h, w = input.shape
    out = numpy.empty((bins, n, h, w, c1 - c0), dtype=ct)
    out[...] = input.reshape(n, c // bins, bins, h, w)[:, c0:c1].transpose(2, 0, 3, 4, 1)
    return out.reshape(bins * n * h * w, c1 - c0)


def _budget(channels: int) -> int:
    """Pairs per chunk for ``channels`` output channels."""
    return max(256, _CHUNK_BYTES // (8 * (channels + 8)))


def forward(input: numpy.ndarray, rois: numpy.ndarray, pooled, prepare: Prepare) -> numpy.ndarray:
    """``out [K, C / (PH * PW), PH, PW]`` in the input's dtype (see the module docstring).

    Args:
        input (ndarray[N, C, H, W]): features of any strides; C a multiple of ``PH * PW``.
        rois (ndarray[K, 5]): in the compute dtype; invalid rows give zeros.
        pooled ((int, int)): ``(PH, PW)``.
        prepare: what the valid rows of a block read (see :data:`Prepare`).
    """
    n, c, h, w = input.shape
    bins = pooled[0] * pooled[1]
    groups = c // bins
    out = numpy.zeros((rois.shape[0], groups) + tuple(pooled), dtype=input.dtype)
    if out.size == 0 or h == 0 or w == 0:
        return out
    ct = _common.compute_dtype(input.dtype)
    cc = _common.channel_chunk(groups, bins * n * h * w, ct.itemsize)
    # inf - inf and 0 * inf are NaN, as in the kernels; float16 rounds to inf past its range.
    with numpy.errstate(invalid="ignore", over="ignore"):
        for c0 in range(0, groups, cc):
            c1 = min(groups, c0 + cc)
            x = _by_bin(input, c0, c1, bins, ct)
            for block in _blocks(rois, input.shape, pooled, prepare):
                acc = numpy.zeros((block.kidx.size * bins, c1 - c0))
                for f, flat, weight in _pairs(block, input.shape, pooled, _budget(c1 - c0)):
                    values = x.take(flat, axis=0) * weight[:, None]
                    starts = numpy.flatnonzero(numpy.r_[True, f[1:] != f[:-1]])
                    acc[f[starts]] += numpy.add.reduceat(values, starts, axis=0)
                acc /= block.divisor[:, None]
                acc = acc.reshape(block.kidx.size, *pooled, c1 - c0)
                out[block.kidx, c0:c1] = acc.transpose(0, 3, 1, 2)
    return out


def backward(
    grad_output: numpy.ndarray, rois: numpy.ndarray, input_shape, prepare: Prepare
) -> numpy.ndarray:
    """The adjoint of :func:`forward`: ``grad_input [N, C, H, W]`` in grad_output's dtype,
    accumulated in float64 in a fixed order (the same bits on every run).

    Args:
        grad_output (ndarray[K, C / (PH * PW), PH, PW]): any strides.
        rois (ndarray[K, 5]): as for :func:`forward`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)``.
        prepare: as for :func:`forward`.
    """
    n, c, h, w = input_shape
    k, groups, pooled_h, pooled_w = grad_output.shape
    pooled, bins = (pooled_h, pooled_w), pooled_h * pooled_w
    grad_input = numpy.zeros(input_shape, dtype=grad_output.dtype)
    if grad_input.size == 0 or k == 0:
        return grad_input
    cc = _common.channel_chunk(groups, bins * n * h * w, 8)
    with numpy.errstate(invalid="ignore", over="ignore"):
        for c0 in range(0, groups, cc):
            c1 = min(groups, c0 + cc)
            acc = numpy.zeros((bins * n * h * w, c1 - c0))
            for block in _blocks(rois, input_shape, pooled, prepare):
                g = block.kidx.size
                grad = numpy.empty((g, pooled_h, pooled_w, c1 - c0))
                grad[...] = grad_output[block.kidx, c0:c1].transpose(0, 2, 3, 1)
                grad = grad.reshape(g * bins, c1 - c0) / block.divisor[:, None]
                for f, flat, weight in _pairs(block, input_shape, pooled, _budget(c1 - c0)):
                    order = numpy.argsort(flat, kind="stable")
                    flat = flat[order]
                    part = grad[f[order]] * weight[order, None]
                    starts = numpy.flatnonzero(numpy.r_[True, flat[1:] != flat[:-1]])
                    acc[flat[starts]] += numpy.add.reduceat(part, starts, axis=0)
            acc = acc.reshape(bins, n, h, w, c1 - c0).transpose(1, 4, 0, 2, 3)
            grad_input.reshape(n, groups, bins, h, w)[:, c0:c1] = acc
    return grad_input
