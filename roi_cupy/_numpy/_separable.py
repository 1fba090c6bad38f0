"""Position-sensitive bins as sums over products of per-axis pixel weights, shared by PS RoI Align
and PS RoI Pool on NumPy.

Bin ``(ph, pw)`` of a RoI reads some rows, each with a weight along y, and some columns, each
with a weight along x, and every pixel where such a row and column cross; with
``j = ph * PW + pw``::

    out[k, c, ph, pw] = sum over its rows r and columns q of
                        wy[r] * wx[q] * X[b, c * PH * PW + j, r, q]  /  divisor[k, ph, pw]

PS RoI Align's rows are the bilinear corners of the bin's samples, each weighing its samples'
weights added up and divided by the samples per axis (divisor 1); PS RoI Pool's are the rows of
the bin's window, each weighing 1 (divisor: the window's area). :class:`Axis` lists each bin's
pixels and weights along one axis, padded to a common count.

The pixels a bin reads and their weights are the same for every output channel. So the bins of
a block of RoIs that read about as many rows and columns are taken together (a *group*, cut in
*pieces* of bounded size), bin place after bin place and in reading order within one: their
pixel offsets (from output channel 0) and pair weights ``wy * wx`` are laid out once as
``[rows * columns, bins]`` arrays, and each output channel in turn gathers its values straight
from the features (the offsets moved by that channel's stride: no copy of the features, and one
channel's planes stay in cache) and adds them up in float64 against the weights. Padding entries
weigh 0. The backward pass spreads each bin's gradient over the same pairs and adds them up per
pixel with ``bincount`` in float64 (over the whole key space ``[N, PH * PW, H, W]`` of one
channel where that is small, else over only the pixels the bins touch), then rounds each sum
once. Work and memory follow the pairs the bins read, in pieces of bounded size however large a
bin is.

A pixel that an axis reads with weight exactly 0 (a bilinear corner of weight 0) must still turn
a non-finite value there into NaN (``0 * inf``), as in the kernels, which multiply all four
corners, while a padding entry must not. A non-finite value gives a non-finite sum whatever its
weight, so a bin whose sum comes out finite read only finite values and is exact; the few that do
not are summed again with the entries told apart (:func:`_exact`). The backward pass adds
``0 * g`` for zero-weight reads when ``grad_output`` holds a non-finite value.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy
from numpy.lib.stride_tricks import as_strided

from roi_cupy._numpy import _common

# Most pairs (bin, pixel) of one piece: its int64 offsets, float64 weights and gathered values
# take about 24 bytes each.
_PAIRS = 1 << 15
# Pairs of padding worth adding to save one call per channel when grouping bins.
_MERGE = 2048
# Most pairs whose offsets and weights are held at once, for all channels to use in turn.
_RUN = 1 << 17
# Most RoIs in one block: their axes are a few arrays of G * P * (rows read per bin).
_BLOCK = 512
# Most pairs whose scatter is gathered into one array in the backward pass (32 bytes each).
_SCATTER = 1 << 13
# Most pairs the backward pass prepares once and keeps for every channel (about 50 bytes each).
_CACHE = 1 << 19
# Most bytes of the backward pass's float64 sums over the touched pixels, a slice of channels.
_ACCUMULATOR = 96 << 20
# Largest key space (N * PH * PW * H * W) whose float64 sums the backward pass holds for a
# channel (8 bytes an entry) rather than only those of the touched pixels.
_DENSE = 1 << 21
# Largest key space for which the backward pass finds the touched pixels
# with a dense map (5 bytes an entry) rather than by sorting.
_MAP = 1 << 22
# The gathered values are widened to float64 by einsum for these; others first go to float32.
_NATIVE = (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


class Axis(NamedTuple):
    """The pixels each bin of a block of RoIs reads along one axis, padded to ``R`` entries.

    Attributes:
        pixel (ndarray[G, P, R] int64): the row (or column) of each entry; a padding entry repeats
            a pixel of its bin (or is 0).
        weight (ndarray[G, P, R] float64): the entry's weight; 0 for padding.
        zero (ndarray[G, P, R] bool): the bin also reads the entry's pixel with weight exactly 0.
        count (ndarray[G, P] int64): how many entries of each bin are not padding.
    """

    pixel: numpy.ndarray
    weight: numpy.ndarray
    zero: numpy.ndarray
    count: numpy.ndarray

    @classmethod
    def of_sorted(cls, bins, pixel, weight, zero, shape) -> Axis:
        """From one entry per pixel read, sorted by bin ``g * P + p``; ``shape`` is ``(G, P)``."""
        count = numpy.bincount(bins, minlength=shape[0] * shape[1])
        width = max(1, int(count.max(initial=0)))
        first = numpy.cumsum(count) - count
        slot = bins * width + (numpy.arange(bins.size) - first[bins])
        size = count.size * width
        if bins.size:
            pad = numpy.where(count > 0, pixel[numpy.minimum(first, bins.size - 1)], 0)
            pixels = numpy.repeat(pad, width)
            pixels[slot] = pixel
        else:
            pixels = numpy.zeros(size, numpy.int64)
        weights = numpy.zeros(size)
        weights[slot] = weight
        zeros = numpy.zeros(size, bool)
        zeros[slot] = zero
        full = (*shape, width)
        return cls(pixels.reshape(full), weights.reshape(full), zeros.reshape(full),
                   count.reshape(shape))

    @classmethod
    def of_ranges(cls, lo: numpy.ndarray, hi: numpy.ndarray) -> Axis:
        """Every pixel of each window ``[lo, hi)`` ([G, P] int64 each), weighing 1."""
        count = numpy.maximum(hi - lo, 0)
        entry = numpy.arange(max(1, int(count.max(initial=0))))
        pixel = numpy.minimum(lo[..., None] + entry, numpy.maximum(hi - 1, lo)[..., None])
        weight = (entry < count[..., None]).astype(numpy.float64)
        return cls(pixel, weight, numpy.zeros(weight.shape, bool), count)


class Block(NamedTuple):
    """Valid RoIs handled together, and what their bins read.

    Attributes:
        kidx (ndarray[G] int64): the RoIs, as indices into the call's rois.
        b (ndarray[G] int64): their batch indices.
        y (Axis): rows read, ``P = PH``.
        x (Axis): columns read, ``P = PW``.
        divisor (ndarray[G, PH * PW] float64 or None): what each bin's sum is divided by.
    """

    kidx: numpy.ndarray
    b: numpy.ndarray
    y: Axis
    x: Axis
    divisor: numpy.ndarray | None


# prepare(rois [G, 5] of valid rows) -> (y Axis, x Axis, divisor [G, PH * PW] or None)
Prepare = Callable[[numpy.ndarray], tuple[Axis, Axis, "numpy.ndarray | None"]]


class Group(NamedTuple):
    """Bins of a block padded alike: ``rows`` row entries and ``cols`` column entries each, their
    pairs in pieces of row entries ``spans``.

    Attributes:
        roi, place (ndarray[B] int64): each bin's RoI (in the block) and ``j = ph * PW + pw``.
        iy, ix (ndarray[B] int64): its rows of the block's axes flattened to ``[G * PH, R]`` and
            ``[G * PW, R]``.
        start, stop (int): the bins' positions in the block's order (:func:`_groups`).
    """

    roi: numpy.ndarray
    place: numpy.ndarray
    iy: numpy.ndarray
    ix: numpy.ndarray
    start: int
    stop: int
    rows: int
    cols: int
    spans: list[tuple[int, int]]


def _block_size(shape, pooled) -> int:
    """RoIs per block: their axes hold at most ``2**20`` entries whatever the bins read."""
    return max(16, min(_BLOCK, (1 << 20) // (max(pooled) * max(shape[2], shape[3], 1))))


def _blocks(rois, shape, pooled, prepare: Prepare) -> Iterator[Block]:
    """The valid RoIs in blocks; invalid ones are left out (their outputs stay 0)."""
    n = shape[0]
    size = _block_size(shape, pooled)
    for s in range(0, rois.shape[0], size):
        chunk = rois[s : s + size]
        b, valid = _common.batch_index(chunk, n)
        active = numpy.flatnonzero(valid)
        if active.size:
            yield Block(s + active, b[active], *prepare(chunk[active]))


def _bucket(n: numpy.ndarray) -> numpy.ndarray:
    """``n`` rounded up to a step of a quarter of its power of two (at most 25% padding)."""
    step = 1 << numpy.maximum(numpy.frexp(numpy.maximum(n, 1))[1] - 3, 0)
    return -(-n // step) * step


def _groups(block: Block, pooled) -> tuple[numpy.ndarray, list[Group]]:
    """The block's bins that read something, in groups by how many rows and columns they read
    (a group pads little), in pieces of at most ``_PAIRS`` pairs; within a group, bin after bin
    (the bins of one place read one channel) in reading order (image, first row), so that the
    gathers walk through memory.

    Returns:
        (ndarray[S] int64, list of Group): the slot ``j * G + roi`` in the block's
        ``[PH * PW, G]`` sums of each bin in that order, and the groups.
    """
    pooled_h, pooled_w = pooled
    g = block.b.size
    bins = pooled_h * pooled_w
    ry = numpy.repeat(block.y.count.ravel(), pooled_w)
    rx = numpy.broadcast_to(block.x.count[:, None, :], (g, pooled_h, pooled_w)).ravel()
    live = numpy.flatnonzero((ry > 0) & (rx > 0))
    if live.size == 0:
        return live, []
    ry, rx = ry[live], rx[live]
    roi, place = numpy.divmod(live, bins)
    iy = roi * pooled_h + place // pooled_w
    ix = roi * pooled_w + place % pooled_w
    by, bx = _bucket(ry), _bucket(rx)
    kind = by * (int(bx.max()) + 1) + bx
    top = int(block.y.pixel.max()) + 1
    where = block.b[roi] * top + block.y.pixel[:, :, 0].reshape(-1)[iy]
    if (int(kind.max()) + 1) * bins * (int(where.max()) + 1) < 1 << 62:
        order = numpy.argsort((kind * bins + place) * (int(where.max()) + 1) + where,
                              kind="stable")
    else:
        order = numpy.lexsort((where, place, kind))
    kind, ry, rx = kind[order], ry[order], rx[order]
    edges = numpy.flatnonzero(kind[1:] != kind[:-1]) + 1
    starts, stops = numpy.r_[0, edges], numpy.r_[edges, kind.size]
    tops_y = numpy.maximum.reduceat(ry, starts).tolist()
    tops_x = numpy.maximum.reduceat(rx, starts).tolist()
    runs = []  # [start, stop, rows, cols]
    for start, stop, r, q in zip(starts.tolist(), stops.tolist(), tops_y, tops_x):
        if runs:
            # Two groups are padded alike when that adds fewer pairs than a call costs.
            s0, s1, r0, q0 = runs[-1]
            rows, cols = max(r0, r), max(q0, q)
            apart = (s1 - s0) * r0 * q0 + (stop - start) * r * q
            if (stop - s0) * rows * cols - apart < _MERGE:
                runs[-1] = [s0, stop, rows, cols]
                continue
        runs.append([start, stop, r, q])
    roi, place, iy, ix = roi[order], place[order], iy[order], ix[order]
    out = []
    for start, stop, rows, cols in runs:
        count = max(1, _PAIRS // (rows * cols))
        span = rows if count > 1 else max(1, _PAIRS // cols)
        spans = [(a, min(rows, a + span)) for a in range(0, rows, span)]
        for s in range(start, stop, count):
            e = min(stop, s + count)
            out.append(Group(roi[s:e], place[s:e], iy[s:e], ix[s:e], s, e, rows, cols, spans))
    return place * g + roi, out


def _pairs(block: Block, group: Group, span, strides, pooled):
    """Offsets ``[A * cols, B]`` (int64, from output channel 0) and weights (float64) of the
    pairs of row entries ``span = (a0, a1)``, ``A = a1 - a0``, of ``group``'s ``B`` bins: pair
    after pair, each over all the bins (long rows for the sums)."""
    s_n, s_c, s_h, s_w = strides
    a0, a1 = span
    rows, cols = block.y.pixel.shape[2], block.x.pixel.shape[2]
    py = block.y.pixel.reshape(-1, rows).take(group.iy, axis=0)[:, a0:a1].T
    px = block.x.pixel.reshape(-1, cols).take(group.ix, axis=0)[:, : group.cols].T
    base = block.b.take(group.roi) * s_n + group.place * s_c
    offset = (base + py * s_h)[:, None, :] + (px * s_w)[None, :, :]
    wy = block.y.weight.reshape(-1, rows).take(group.iy, axis=0)[:, a0:a1].T
    wx = block.x.weight.reshape(-1, cols).take(group.ix, axis=0)[:, : group.cols].T
    weight = wy[:, None, :] * wx[None, :, :]
    b = group.roi.size
    return offset.reshape(-1, b), weight.reshape(-1, b)


def _masks(block: Block, group: Group, span):
    """Which pairs of ``span`` are real (not padding), and which of those read a pixel with
    weight exactly 0 along an axis: ``[A * cols, B]`` bool each, laid out as :func:`_pairs`."""
    a0, a1 = span
    rows, cols = block.y.pixel.shape[2], block.x.pixel.shape[2]
    ny = block.y.count.reshape(-1).take(group.iy)
    nx = block.x.count.reshape(-1).take(group.ix)
    real = (numpy.arange(a0, a1)[:, None] < ny)[:, None, :] & (
        numpy.arange(group.cols)[:, None] < nx
    )[None, :, :]
    zy = block.y.zero.reshape(-1, rows).take(group.iy, axis=0)[:, a0:a1].T
    zx = block.x.zero.reshape(-1, cols).take(group.ix, axis=0)[:, : group.cols].T
    zero = zy[:, None, :] | zx[None, :, :]
    b = group.roi.size
    return real.reshape(-1, b), (real & zero).reshape(-1, b)


def _runs(block: Block, todo, strides, pooled) -> Iterator[list]:
    """``todo``'s pieces with their pairs (offsets, and weights or None where all are 1), in
    runs of about ``_RUN`` pairs (at least a piece)."""
    run, size = [], 0
    for group in todo:
        for span in group.spans:
            offset, weight = _pairs(block, group, span, strides, pooled)
            # Weights all 1 (a PS RoI Pool piece without padding): a plain float64 sum.
            run.append((group, span, offset, None if (weight == 1).all() else weight))
            size += run[-1][2].size
            if size >= _RUN:
                yield run
                run, size = [], 0
    if run:
        yield run


def _flat(array: numpy.ndarray) -> tuple[numpy.ndarray, tuple[int, ...]]:
    """A 1-D contiguous view over ``array``'s elements and its strides in elements (a copy only
    for strides that are negative or not whole elements)."""
    if array.flags.c_contiguous:
        array = array.reshape(array.shape)
        return array.reshape(-1), tuple(s // array.itemsize for s in array.strides)
    item = array.itemsize
    if any(s < 0 or s % item for s in array.strides):
        array = numpy.ascontiguousarray(array)
        return array.reshape(-1), tuple(s // item for s in array.strides)
    strides = tuple(s // item for s in array.strides)
    span = sum((d - 1) * s for d, s in zip(array.shape, strides)) + 1
    return as_strided(array, shape=(span,), strides=(item,), writeable=False), strides


def _gather(flat, offset, dtype):
    """``flat[offset]`` in a dtype einsum widens to float64."""
    values = flat.take(offset)
    return values if dtype in _NATIVE else values.astype(numpy.float32)


def _exact(flat, step, block, group, strides, pooled, channel, dtype) -> numpy.ndarray:
    """The sums of ``group``'s bins in ``channel``, padding left out and a zero-weight read of a
    pixel kept apart from its positive weight (a non-finite value there gives NaN)."""
    total = 0.0
    for span in group.spans:
        offset, weight = _pairs(block, group, span, strides, pooled)
        real, zero = _masks(block, group, span)
        values = _gather(flat[channel * step :], offset, dtype).astype(numpy.float64)
        total = total + numpy.where(real, weight * values, 0).sum(axis=0)
        total = total + numpy.where(zero, 0 * values, 0).sum(axis=0)
    return total


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
    flat, strides = _flat(input)
    step = bins * strides[1]
    dtype = input.dtype
    flat_out = out.reshape(-1)
    # inf - inf and 0 * inf are NaN, as in the kernels; float16 rounds to inf past its range.
    with numpy.errstate(invalid="ignore", over="ignore"):
        for block in _blocks(rois, input.shape, pooled, prepare):
            slot, todo = _groups(block, pooled)
            # The sums of the bins in the groups' order; then each in its place.
            acc = numpy.zeros((groups, slot.size))
            for run in _runs(block, todo, strides, pooled):
                # Channel after channel, so that one channel's planes stay in cache for the run.
                for ch in range(groups):
                    source, sums = flat[ch * step :], acc[ch]
                    for group, span, offset, weight in run:
                        values = _gather(source, offset, dtype)
                        if weight is None:
                            part = numpy.add.reduce(values, axis=0, dtype=numpy.float64)
                        else:
                            part = numpy.einsum("ji,ji->i", values, weight)
                        if span[0]:
                            sums[group.start : group.stop] += part
                        else:
                            sums[group.start : group.stop] = part
            bad = ~numpy.isfinite(acc)
            if bad.any():
                for group in todo:
                    cols = slice(group.start, group.stop)
                    for ch in numpy.flatnonzero(bad[:, cols].any(axis=1)).tolist():
                        acc[ch, cols] = _exact(flat, step, block, group, strides, pooled, ch,
                                               dtype)
            place, roi = numpy.divmod(slot, block.b.size)
            if block.divisor is not None:
                acc /= block.divisor.reshape(-1)[roi * bins + place]
            # Straight to out[k, ch, ph, pw]; bins that read nothing stay 0.
            at = block.kidx[roi] * (groups * bins) + place
            for ch in range(groups):
                flat_out[ch * bins :][at] = acc[ch]
    return out


class _Run(NamedTuple):
    """Pieces of a block whose pairs the backward pass scatters together.

    Attributes:
        grad (ndarray[groups, S] float64): the block's gradient, bins in the block's order
            (:func:`_groups`), already divided by the divisors.
        pieces (list of (int, int, int)): each piece's bins ``start:stop`` and its pairs.
        key (ndarray[M] int64): each pair's pixel in ``[N, PH * PW, H, W]``, padding at the end
            of that space.
        weight (ndarray[M] float64): each pair's weight (0 for padding).
        zero_key, zero_row (ndarray int64): the real pairs that read their pixel at weight 0,
            and their bins; only with ``zeros``.
    """

    grad: numpy.ndarray
    pieces: list
    key: numpy.ndarray
    weight: numpy.ndarray
    zero_key: numpy.ndarray
    zero_row: numpy.ndarray


def _scatter_runs(block, todo, grad, pooled, strides, space, limit, zeros):
    """The pairs of ``block`` in runs of about ``limit`` (at least a piece), as :class:`_Run`."""
    todo = [(group, span) for group in todo for span in group.spans]
    i = 0
    while i < len(todo):
        j, total = i, 0
        while j < len(todo) and (j == i or total < limit):
            group, (a0, a1) = todo[j]
            total += (group.stop - group.start) * (a1 - a0) * group.cols
            j += 1
        key = numpy.empty(total, numpy.int64)
        weight = numpy.empty(total)
        pieces, zk, zr, at = [], [], [], 0
        for group, span in todo[i:j]:
            offset, w = _pairs(block, group, span, strides, pooled)
            real, zero = _masks(block, group, span)
            m = offset.size
            numpy.copyto(key[at : at + m].reshape(offset.shape), numpy.where(real, offset, space))
            weight[at : at + m] = w.ravel()
            if zeros and zero.any():
                pairs, bins = numpy.nonzero(zero)
                zk.append(offset[pairs, bins])
                zr.append(bins + group.start)
            pieces.append((group.start, group.stop, m))
            at += m
        empty = numpy.zeros(0, numpy.int64)
        yield _Run(grad, pieces, key, weight,
                   numpy.concatenate(zk) if zk else empty, numpy.concatenate(zr) if zr else empty)
        i = j


class _Touched:
    """The pixels of a key space that some pair reads, numbered in increasing order (with a
    dense map where the space is small enough, else by sorting what the pairs read); the end of
    the space (padding) maps to one past the last."""

    def __init__(self, space: int):
        self.space = space
        self.present = numpy.zeros(space + 1, bool) if space <= _MAP else None
        self.keys = numpy.zeros(0, numpy.int64)

    def add(self, key: numpy.ndarray) -> None:
        if self.present is not None:
            self.present[key] = True
        else:
            self.keys = numpy.union1d(self.keys, key[key < self.space])

    def finish(self) -> None:
        if self.present is not None:
            self.present[self.space] = False
            self.keys = numpy.flatnonzero(self.present)
            self.present = None
            self.pos = numpy.empty(self.space + 1, numpy.int32)
            self.pos[self.keys] = numpy.arange(self.keys.size, dtype=numpy.int32)
            self.pos[self.space] = self.keys.size

    def index(self, key: numpy.ndarray) -> numpy.ndarray:
        """The numbers of ``key`` (touched pixels, or the end of the space)."""
        if self.present is None and self.space <= _MAP:
            return self.pos[key].astype(numpy.intp)
        return numpy.searchsorted(self.keys, key)


def backward(
    grad_output: numpy.ndarray, rois: numpy.ndarray, input_shape, prepare: Prepare
) -> numpy.ndarray:
    """The adjoint of :func:`forward`: ``grad_input [N, C, H, W]`` in grad_output's dtype,
    accumulated in float64 in a fixed order (the same bits on every run) and rounded once.

    Each output channel's pairs are summed by ``bincount`` over the key space
    ``[N, PH * PW, H, W]`` where it is small (``_DENSE``), else over only the pixels some pair
    touches.

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
    plane = bins * h * w
    space = n * plane
    strides = (plane, h * w, w, 1)
    zeros = not numpy.isfinite(grad_output).all()
    given = numpy.ascontiguousarray(grad_output).reshape(-1)

    def runs(limit=_SCATTER):
        for block in _blocks(rois, input_shape, pooled, prepare):
            slot, todo = _groups(block, pooled)
            if not todo:
                continue
            # The gradient of each bin in the groups' order, in float64.
            place, roi = numpy.divmod(slot, block.b.size)
            at = block.kidx[roi] * (groups * bins) + place
            grad = numpy.empty((groups, slot.size))
            for ch in range(groups):
                grad[ch] = given.take(at + ch * bins)
            if block.divisor is not None:
                grad /= block.divisor.reshape(-1)[roi * bins + place]
            yield from _scatter_runs(block, todo, grad, pooled, strides, space, limit, zeros)

    # Up to _CACHE pairs of one block (the usual case) are prepared once, as one run summed
    # channel by channel. More are prepared again for each pass (the touched pixels, then the
    # sums of a slice of channels), so that memory does not grow with K or with a bin.
    cached = None
    if rois.shape[0] <= _block_size(input_shape, pooled):
        todo = runs(_CACHE)
        first = next(todo, None)
        if first is None:
            return grad_input
        cached = [first] if next(todo, None) is None else None
        del todo, first
    if space <= _DENSE:
        touched, size = None, space
    else:
        touched = _Touched(space)
        for run in cached or runs():
            touched.add(run.key)
        touched.finish()
        size = touched.keys.size
        if size == 0:
            return grad_input
        target = touched.keys + (touched.keys // plane) * (c - bins) * h * w
    out = grad_input.reshape(-1)
    images = grad_input.reshape(n, c * h * w)

    def store(ch, sums):
        if touched is None:
            images[:, ch * plane : (ch + 1) * plane] = sums.reshape(n, plane)
        else:
            out[ch * plane :][target] = sums.astype(grad_input.dtype)

    cc = groups if cached else max(1, min(groups, _ACCUMULATOR // (8 * size)))
    terms = numpy.empty(0)
    with numpy.errstate(invalid="ignore", over="ignore"):
        for c0 in range(0, groups, cc):
            c1 = min(groups, c0 + cc)
            acc = None if cached else numpy.zeros((c1 - c0, size + 1))
            for run in cached or runs():
                dest = run.key if touched is None else touched.index(run.key)
                zero_dest = run.zero_key if touched is None else touched.index(run.zero_key)
                if terms.size < dest.size:
                    terms = numpy.empty(dest.size)
                for ch in range(c0, c1):
                    at = 0
                    for start, stop, m in run.pieces:
                        numpy.multiply(run.grad[ch, start:stop],
                                       run.weight[at : at + m].reshape(-1, stop - start),
                                       out=terms[at : at + m].reshape(-1, stop - start))
                        at += m
                    if acc is None:
                        sums = numpy.bincount(dest, terms[:at], size + 1)
                    else:
                        sums = acc[ch - c0]
                        numpy.add.at(sums, dest, terms[:at])
                    if zero_dest.size:
                        # 0 * inf is NaN: a zero-weight read passes a non-finite gradient on,
                        # as in the kernels (its term is 0 otherwise, so it is added only here).
                        numpy.add.at(sums, zero_dest, run.grad[ch].take(run.zero_row) * 0.0)
                    if acc is None:
                        store(ch, sums[:size])
            if acc is not None:
                for ch in range(c0, c1):
                    store(ch, acc[ch - c0, :size])
    return grad_input

