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

The pixels a bin reads and their weights are the same for every output channel. So RoIs with
about as many rows and columns per bin are taken together (a *piece*): their bins' pixel
offsets (from output channel 0) and pair weights ``wy * wx`` are laid out once as
``[bins, rows * columns]`` arrays, and each output channel gathers its values straight from the
features (the offsets moved by that channel's stride: no copy of the features) and adds them up
in float64 against the weights. Padding entries weigh 0. The backward pass scatters the same
pairs, with float64 sums over only the pixels the bins touch, then rounds each once. Work and
memory follow the pairs the bins read, in pieces of bounded size however large a bin is, never
the plane.

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
# Most pairs whose scatter is gathered into one array in the backward pass (25 bytes each).
_SCATTER = 1 << 13
# Most pairs the backward pass prepares once and keeps for every channel (about 50 bytes each).
_CACHE = 1 << 19
# Most bytes of the backward pass's float64 sums over the touched pixels, a slice of channels.
_ACCUMULATOR = 96 << 20
# Largest key space (N * PH * PW * H * W) for which the backward pass finds the touched pixels
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
        roi, ph, pw (ndarray[B] int64): each bin's RoI (in the block) and place.
        start, stop (int): the bins' positions in the block's order (:func:`_groups`).
    """

    roi: numpy.ndarray
    ph: numpy.ndarray
    pw: numpy.ndarray
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
    (the bins of one place read one channel) in reading order (image, row, column), so that the
    gathers walk through memory.

    Returns:
        (ndarray[S] int64, list of Group): the slot ``j * G + roi`` in the block's
        ``[PH * PW, G]`` sums of each bin in that order, and the groups.
    """
    pooled_h, pooled_w = pooled
    g = block.b.size
    ry = numpy.broadcast_to(block.y.count[:, :, None], (g, pooled_h, pooled_w)).ravel()
    rx = numpy.broadcast_to(block.x.count[:, None, :], (g, pooled_h, pooled_w)).ravel()
    live = numpy.flatnonzero((ry > 0) & (rx > 0))
    if live.size == 0:
        return live, []
    ry, rx = ry[live], rx[live]
    roi, place = live // (pooled_h * pooled_w), live % (pooled_h * pooled_w)
    ph, pw = place // pooled_w, place % pooled_w
    by, bx = _bucket(ry), _bucket(rx)
    where = (block.b[roi] * (int(block.y.pixel.max()) + 1) + block.y.pixel[roi, ph, 0]) * (
        int(block.x.pixel.max()) + 1
    ) + block.x.pixel[roi, pw, 0]
    kinds = (by.max() + 1) * (bx.max() + 1) * pooled_h * pooled_w
    if kinds * (int(where.max()) + 1) < 1 << 62:
        order = numpy.argsort(((by * (bx.max() + 1) + bx) * (pooled_h * pooled_w) + place)
                              * (int(where.max()) + 1) + where, kind="stable")
    else:
        order = numpy.lexsort((where, place, bx, by))
    key = (by * (bx.max() + 1) + bx)[order]
    ry, rx = ry[order], rx[order]
    edges = numpy.flatnonzero(numpy.diff(key)) + 1
    starts, stops = numpy.r_[0, edges], numpy.r_[edges, key.size]
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
    out = []
    for start, stop, rows, cols in runs:
        count = max(1, _PAIRS // (rows * cols))
        span = rows if count > 1 else max(1, _PAIRS // cols)
        spans = [(a, min(rows, a + span)) for a in range(0, rows, span)]
        for s in range(start, stop, count):
            e = min(stop, s + count)
            pick = order[s:e]
            out.append(Group(roi[pick], ph[pick], pw[pick], s, e, rows, cols, spans))
    return (place * g + roi)[order], out


def _pairs(block: Block, group: Group, span, strides, pooled):
    """Offsets ``[B, A * cols]`` (int64, from output channel 0) and weights (float64) of the
    pairs of row entries ``span`` of ``group``'s bins."""
    s_n, s_c, s_h, s_w = strides
    a0, a1 = span
    k, ph, pw = group.roi, group.ph, group.pw
    py = block.y.pixel[k, ph, a0:a1]
    px = block.x.pixel[k, pw, : group.cols]
    base = block.b[k] * s_n + (ph * pooled[1] + pw) * s_c
    offset = (base[:, None, None] + (py * s_h)[:, :, None]) + (px * s_w)[:, None, :]
    weight = block.y.weight[k, ph, a0:a1][:, :, None] * block.x.weight[k, pw, : group.cols][
        :, None, :
    ]
    return offset.reshape(k.size, -1), weight.reshape(k.size, -1)


def _masks(block: Block, group: Group, span):
    """Which pairs of ``span`` are real (not padding), and which of those read a pixel with
    weight exactly 0 along an axis: ``[B, A * cols]`` bool each, laid out as :func:`_pairs`."""
    a0, a1 = span
    k, ph, pw = group.roi, group.ph, group.pw
    ry = numpy.arange(a0, a1) < block.y.count[k, ph][:, None]
    rx = numpy.arange(group.cols) < block.x.count[k, pw][:, None]
    real = ry[:, :, None] & rx[:, None, :]
    zero = block.y.zero[k, ph, a0:a1][:, :, None] | block.x.zero[k, pw, : group.cols][:, None, :]
    return real.reshape(k.size, -1), (real & zero).reshape(k.size, -1)


def _runs(block: Block, todo, strides, pooled) -> Iterator[list]:
    """``todo``'s pieces with their pairs, in runs of about ``_RUN`` pairs (at least a piece)."""
    run, size = [], 0
    for group in todo:
        for span in group.spans:
            run.append((group, span, *_pairs(block, group, span, strides, pooled)))
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
        total = total + numpy.where(real, weight * values, 0).sum(axis=1)
        total = total + numpy.where(zero, 0 * values, 0).sum(axis=1)
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
                        part = numpy.einsum("ij,ij->i", _gather(source, offset, dtype), weight)
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
            placed = numpy.zeros((groups, bins * block.b.size))
            placed[:, slot] = acc
            if block.divisor is not None:
                placed /= block.divisor.T.ravel()
            acc = placed.reshape(groups, *pooled, block.b.size)
            out[block.kidx] = acc.transpose(3, 0, 1, 2)
    return out


def _keys(block, todo, pooled, strides, limit) -> Iterator[tuple[numpy.ndarray, ...]]:
    """``(key, row, weight, zero)`` of the real pairs of ``block``, in runs of about ``limit``
    pairs: ``key`` is the pixel's index in ``[N, PH * PW, H, W]``, ``row`` the bin's position in
    the block's order (:func:`_groups`), ``zero`` whether the pair reads its pixel at weight 0."""
    parts, size = [], 0
    for group in todo:
        for span in group.spans:
            offset, weight = _pairs(block, group, span, strides, pooled)
            real, zero = _masks(block, group, span)
            row = numpy.broadcast_to(numpy.arange(group.start, group.stop)[:, None], real.shape)
            parts.append((offset[real], row[real], weight[real], zero[real]))
            del offset, weight, real, zero, row
            size += parts[-1][0].size
            if size >= limit:
                yield tuple(numpy.concatenate(p) for p in zip(*parts))
                parts, size = [], 0
    if parts:
        yield tuple(numpy.concatenate(p) for p in zip(*parts))


class _Touched:
    """The pixels of a key space that some pair reads, numbered in increasing order: with a
    dense map where the space is small enough, else by sorting what the pairs read."""

    def __init__(self, space: int):
        self.space = space
        self.present = numpy.zeros(space, bool) if space <= _MAP else None
        self.keys = numpy.zeros(0, numpy.int64)

    def add(self, key: numpy.ndarray) -> None:
        if self.present is not None:
            self.present[key] = True
        else:
            self.keys = numpy.union1d(self.keys, key)

    def finish(self) -> None:
        if self.present is not None:
            self.keys = numpy.flatnonzero(self.present)
            self.present = None
            self.pos = numpy.empty(self.space, numpy.int32)
            self.pos[self.keys] = numpy.arange(self.keys.size, dtype=numpy.int32)

    def index(self, key: numpy.ndarray) -> numpy.ndarray:
        """The numbers of ``key`` (touched pixels)."""
        if self.space <= _MAP:
            return self.pos[key].astype(numpy.intp)
        return numpy.searchsorted(self.keys, key)


def backward(
    grad_output: numpy.ndarray, rois: numpy.ndarray, input_shape, prepare: Prepare
) -> numpy.ndarray:
    """The adjoint of :func:`forward`: ``grad_input [N, C, H, W]`` in grad_output's dtype,
    accumulated in float64 in a fixed order (the same bits on every run) and rounded once.

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
    strides = (plane, h * w, w, 1)
    non_finite = not numpy.isfinite(grad_output).all()

    def runs():
        for block in _blocks(rois, input_shape, pooled, prepare):
            slot, todo = _groups(block, pooled)
            if not todo:
                continue
            grad = numpy.empty((groups, pooled_h, pooled_w, block.b.size))
            grad[...] = grad_output[block.kidx].transpose(1, 2, 3, 0)
            grad = grad.reshape(groups, -1)
            if block.divisor is not None:
                grad /= block.divisor.T.ravel()
            grad = grad[:, slot]
            for run in _keys(block, todo, pooled, strides, _SCATTER):
                yield grad, run

    # Up to _CACHE pairs (the usual case) are prepared once, as one run summed channel by
    # channel. More are prepared again for each pass (the touched pixels, then the sums of a
    # slice of channels), so that memory does not grow with K or with a bin.
    cached, total = [], 0
    if rois.shape[0] > _block_size(input_shape, pooled):
        cached = None
    for grad, run in runs() if cached is not None else ():
        cached.append((grad, run))
        total += run[0].size
        if total > _CACHE:
            cached = None
            break
    if cached is not None and len(cached) > 1:
        grads, seen, parts, shift = [], set(), [], 0
        for grad, (key, row, weight, zero) in cached:
            if id(grad) not in seen:
                seen.add(id(grad))
                grads.append(grad)
                shift = sum(g.shape[1] for g in grads[:-1])
            parts.append((key, row + shift, weight, zero))
        cached = [(numpy.concatenate(grads, axis=1),
                   tuple(numpy.concatenate(p) for p in zip(*parts)))]
        del grads, parts
    touched = _Touched(n * plane)
    for _, (key, *_) in cached or runs():
        touched.add(key)
    touched.finish()
    if touched.keys.size == 0:
        return grad_input
    # Where each touched pixel lies in grad_input, in output channel 0.
    target = touched.keys + (touched.keys // plane) * (c - bins) * h * w
    size = touched.keys.size
    out = grad_input.reshape(-1)
    cc = groups if cached else max(1, min(groups, _ACCUMULATOR // (8 * size)))
    with numpy.errstate(invalid="ignore", over="ignore"):
        for c0 in range(0, groups, cc):
            c1 = min(groups, c0 + cc)
            acc = None if cached else numpy.zeros((c1 - c0, size))
            for grad, (key, row, weight, zero) in cached or runs():
                dest = touched.index(key)
                # 0 * inf is NaN: a zero-weight read passes a non-finite gradient on, as in the
                # kernels; its term is 0 otherwise, so it is added only then.
                zero = numpy.flatnonzero(zero) if non_finite else zero[:0]
                for ch in range(c0, c1):
                    terms = grad[ch].take(row)
                    terms *= weight
                    if acc is None:
                        part = numpy.bincount(dest, terms, size)
                        if zero.size:
                            part += numpy.bincount(dest[zero], grad[ch].take(row[zero]) * 0.0,
                                                   size)
                        out[ch * plane :][target] = part
                    else:
                        numpy.add.at(acc[ch - c0], dest, terms)
                        if zero.size:
                            numpy.add.at(acc[ch - c0], dest[zero], grad[ch].take(row[zero]) * 0.0)
            if acc is not None:
                for ch in range(c0, c1):
                    out[ch * plane :][target] = acc[ch - c0]
    return grad_input
