"""RoI Pool on NumPy arrays.

The maximum over a rectangle is the maximum over its rows of the maximum over its columns, so each
RoI costs two passes of contiguous reductions over its window of a channels-last copy of the
features (one per bin row, then one per bin column), every reduction vectorised over channels.

The reductions run on int64 keys that order like the scan the operator is defined by: the high
32 bits map the value to an order-preserving integer (NaN and values ``<= -FLT_MAX`` become
``-FLT_MAX``, ``-0.0`` becomes ``0.0``) and the low 32 bits hold ``2**32 - 1 - (h * W + w)``, so
the largest key is the largest value at its first position in row-major order and a plain
``max`` yields both the maximum and its argmax. A float32 value fits its 32 bits exactly. A
float64 value keeps only its top 32 bits there, so values that share them tie and the first
wins; a second pass takes each bin's exact float64 maximum, and a bin whose key picked a smaller
value (which happens only when values that close compete) is scanned again directly.

The copy covers the whole plane when the RoIs together read at least as much; otherwise each RoI
is pooled from a copy of its own window, so that the memory follows what the RoIs read, not the
plane. The backward pass scatters gradients with ``numpy.add.at`` into accumulators of a bounded
size, in a fixed order.
"""
from __future__ import annotations

import sys

import numpy

from roi_cupy import _backend
from roi_cupy._numpy import _common, roi_check

_LOW = numpy.int64(0xFFFFFFFF)
# Keys carry the position in 32 bits: larger planes scan every bin directly.
_KEYED_PLANE = 2**32
# Which int32 of an int64 holds its high bits.
_HIGH = 1 if sys.byteorder == "little" else 0
# Output elements staged together: small enough for the staging buffers to stay in cache.
_STAGE_ELEMENTS = 1 << 18
# What a RoI pooled from its own window costs beyond the pixels it reads, in pixel-channels of
# a channels-last copy: RoIs that read less than the plane by this much take their windows.
_ROI_COST = 1 << 14
_ZERO = numpy.zeros(1, dtype=numpy.int64)  # batch index and RoI of a window pooled alone
# Gradient elements scattered together by the backward pass (its index and value buffers).
_BACKWARD_CHUNK = 1 << 15
# Accumulator elements of one image's channels in the backward pass: small enough to stay in
# cache while the gradients of that image's RoIs are added into it.
_SEGMENT = 1 << 16
# Accumulator elements of all of one image's channels, summed at a time where they fit (their
# gradients then read in whole blocks of RoIs).
_IMAGE_SEGMENT = 5 << 16
# Gradients per pixel below which the backward sums straight into grad_input.
_DIRECT = 1.0
# Gradients up to which the backward adds them all in one call (:func:`_backward_once`).
_ONCE = _BACKWARD_CHUNK
# Planes of more pixels are accumulated one channel and one range of at most this many pixels
# at a time, only where indices fall: the memory then follows the indices, not the plane.
_SEGMENT_PLANE = 1 << 20


def _round(v: numpy.ndarray) -> numpy.ndarray:
    """Round half away from zero (C ``round``), exactly: ``v - trunc(v)`` is exact."""
    t = numpy.trunc(v)
    return t + numpy.where(numpy.abs(v - t) >= 0.5, numpy.sign(v), 0)


def _bins(rois, n, h, w, pooled_h, pooled_w, spatial_scale, ct):
    """Batch index, validity and clipped bin edges ``(hs, he, ws, we)`` ([K, PH] / [K, PW]).

    Both axes go through each operation together (rows, then columns), as ``[K, 2, P]`` with
    ``P = max(PH, PW)``: the same arithmetic, element by element, in fewer NumPy calls.
    """
    b, valid = _common.batch_index(rois, n)
    r = numpy.where(valid[:, None], rois[:, (2, 1, 4, 3)], 0).astype(ct)  # y1, x1, y2, x2
    pooled = max(pooled_h, pooled_w)
    with numpy.errstate(all="ignore"):
        corners = _round(r * ct.type(spatial_scale)).astype(numpy.float64)
        start = corners[:, :2, None]
        extent = numpy.maximum(corners[:, 2:] - corners[:, :2] + 1, 1).astype(ct)
        bin_size = (extent / numpy.array([pooled_h, pooled_w], dtype=ct))[:, :, None]
        p = numpy.arange(pooled, dtype=ct)
        lo = numpy.floor(p * bin_size).astype(numpy.float64) + start
        hi = numpy.ceil((p + 1) * bin_size).astype(numpy.float64) + start
    # fmax/fmin drop a NaN (0 * inf for a box that overflows), which lands on 0 as in the
    # kernels' clamp.
    size = numpy.array([h, w], dtype=numpy.float64)[:, None]
    lo, hi = (numpy.fmin(numpy.fmax(e, 0), size).astype(numpy.int64) for e in (lo, hi))
    return (b, valid, lo[:, 0, :pooled_h], hi[:, 0, :pooled_h], lo[:, 1, :pooled_w],
            hi[:, 1, :pooled_w])


def _values(input: numpy.ndarray, c0: int, c1: int, ct: numpy.dtype) -> numpy.ndarray:
    """Channels ``c0:c1`` as ``[N, H, W, Cc]`` in ``ct``, NaN and ``<= -FLT_MAX`` as -FLT_MAX."""
    n, _, h, w = input.shape
    v = _common.channels_last(input, c0, c1, ct)
    floor = ct.type(-_common.FLT_MAX)
    numpy.copyto(v, floor, where=~(v > floor))
    return v.reshape(n, h, w, c1 - c0)


def _keys(input: numpy.ndarray, c0: int, c1: int, ct: numpy.dtype, rare: bool = True):
    """Channels ``c0:c1`` as int64 keys ``[N, H, W, Cc]`` (see the module docstring), and
    whether they hold values that need work after pooling: ``(keys, (low, negative_zero))``,
    whether a value is NaN or ``<= -FLT_MAX`` and whether one is -0.0 (both True unless
    ``rare``, which asks to find out)."""
    n, _, h, w = input.shape
    floor = ct.type(-_common.FLT_MAX)
    v = input[:, c0:c1].astype(ct)
    low = ~(v > floor)
    numpy.copyto(v, floor, where=low)
    found = (True, True)
    if rare:
        sign = numpy.int32(-(2**31)) if ct == numpy.float32 else numpy.int64(-(2**63))
        found = (bool(low.any()), bool((v.view(sign.dtype) == sign).any()))  # -0.0's bits
    del low  # not to be held while the keys are made
    v += ct.type(0)  # -0.0 -> 0.0: the two compare equal
    if ct == numpy.float32:
        bits = v.view(numpy.int32)
        bits ^= (bits >> 31) & numpy.int32(0x7FFFFFFF)
        order = bits
    else:
        bits = v.view(numpy.int64)
        bits ^= (bits >> 63) & numpy.int64(0x7FFFFFFFFFFFFFFF)
        order = (bits >> 32).astype(numpy.int32)
    keys = numpy.empty((n, h, w, c1 - c0), dtype=numpy.int64)
    halves = keys.view(numpy.int32).reshape(n, h, w, c1 - c0, 2)
    halves[..., _HIGH] = order.transpose(0, 2, 3, 1)
    position = (_LOW - numpy.arange(h * w, dtype=numpy.int64)).astype(numpy.uint32)
    halves[..., 1 - _HIGH] = position.view(numpy.int32).reshape(1, h, w, 1)
    return keys, found


class _Buffers:
    """Arrays reused from one group of RoIs to the next (a fresh array per group costs more than
    the arithmetic that fills it)."""

    def __init__(self):
        self.arrays = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype) -> numpy.ndarray:
        size = 1
        for n in shape:
            size *= n
        array = self.arrays.get(name)
        if array is None or array.size < size or array.dtype != dtype:
            array = self.arrays[name] = numpy.empty(size, dtype=dtype)
        return array[:size].reshape(shape)


def _decode(stage, value, argmax, low) -> None:
    """float32 keys ``stage`` -> ``value`` (float32 bits, as int32) and ``argmax`` (int64), all
    of one shape; argmax -1 where nothing was picked, which only ``low`` values (NaN,
    ``<= -FLT_MAX``) can cause."""
    halves = stage.view(numpy.int32).reshape(stage.shape + (2,))
    order = halves[..., _HIGH]
    numpy.right_shift(order, 31, out=value)
    numpy.bitwise_and(value, numpy.int32(0x7FFFFFFF), out=value)
    numpy.bitwise_xor(order, value, out=value)
    numpy.subtract(_LOW, halves[..., 1 - _HIGH].view(numpy.uint32), out=argmax, dtype=numpy.int64)
    if low:
        floor = value.view(numpy.float32) == numpy.float32(-_common.FLT_MAX)
        numpy.copyto(argmax, -1, where=floor)


def _pool(data, b, hs, he, ws, we, stage) -> None:
    """Each bin's maximum of ``data`` [N, H, W, Cc] into ``stage`` [k, Cc, PH, PW].

    Bins that are empty (no row or no column) hold garbage.
    """
    pooled_h, pooled_w = hs.shape[1], ws.shape[1]
    y0, y1, x0, x1 = hs[:, 0], he[:, -1], ws[:, 0], we[:, -1]
    # Python ints for the loop: NumPy scalars would make every slice slower.
    b, y0l, y1l, x0l, x1l = (a.tolist() for a in (b, y0, y1, x0, x1))
    hs, he = (hs - y0[:, None]).tolist(), (he - y0[:, None]).tolist()
    ws, we = (ws - x0[:, None]).tolist(), (we - x0[:, None]).tolist()
    rowmax = numpy.empty((pooled_h,) + data.shape[2:], dtype=data.dtype)
    # Bins channels-last, moved into the output layout once per RoI: a reduction into the
    # [Cc, PH] slice of the output itself would write each channel at a stride.
    binmax = numpy.empty((pooled_h, pooled_w, data.shape[-1]), dtype=data.dtype)
    reduce = numpy.maximum.reduce  # the ufunc method itself: numpy.max adds a wrapper per call
    for i in range(len(b)):
        if y1l[i] <= y0l[i] or x1l[i] <= x0l[i]:
            continue
        window = data[b[i], y0l[i] : y1l[i], x0l[i] : x1l[i]]
        rows = rowmax[:, : x1l[i] - x0l[i]]
        for p, (r0, r1) in enumerate(zip(hs[i], he[i])):
            if r1 > r0:
                reduce(window[r0:r1], axis=0, out=rows[p])
        for q, (s0, s1) in enumerate(zip(ws[i], we[i])):
            if s1 > s0:
                reduce(rows[:, s0:s1], axis=1, out=binmax[:, q])
        stage[i] = binmax.transpose(2, 0, 1)


def _pool_direct(values, b, hs, he, ws, we, w, bins, out_v, out_i) -> None:
    """Scan the bins ``bins`` ([M, 3] rows ``(roi, ph, pw)``) straight from ``values``
    [N, H, W, Cc] (cleaned, float64): each channel's first maximum, or -1 where none exceeds
    -FLT_MAX. Writes ``out_v`` and ``out_i`` [k, Cc, PH, PW] at those bins."""
    cc = values.shape[-1]
    lanes = numpy.arange(cc)
    for i, p, q in bins.tolist():
        h0, h1, w0, w1 = hs[i, p], he[i, p], ws[i, q], we[i, q]
        window = values[b[i], h0:h1, w0:w1].reshape(-1, cc)
        a = window.argmax(axis=0)  # the first maximum; values hold no NaN
        v = window[a, lanes]
        out_v[i, :, p, q] = v
        out_i[i, :, p, q] = numpy.where(
            v > -_common.FLT_MAX, (h0 + a // (w1 - w0)) * w + w0 + a % (w1 - w0), -1
        )


def _stage_float32(input, c0, keys, args, shape, buffers, found=(True, True), value=None,
                   argmax=None):
    """float16/float32 bins of one group of RoIs: ``(value float32, argmax)`` [k, Cc, PH, PW],
    in ``value`` and ``argmax`` where given (float32 and int64 arrays of that shape), else in
    ``buffers``.

    ``args`` is ``(b, hs, he, ws, we)`` of the group; ``keys`` and ``found`` come from
    :func:`_keys`.
    """
    b, hs, he, ws, we = args
    stage = buffers("stage", shape, numpy.int64)
    _pool(keys, b, hs, he, ws, we, stage)
    if value is None:
        value = buffers("value", shape, numpy.float32)
    if argmax is None:
        argmax = buffers("argmax", shape, numpy.int64)
    _decode(stage, value.view(numpy.int32), argmax, found[0])
    _clear_empty(hs, he, ws, we, value, argmax)
    if found[1]:
        # Keys hold -0.0 as 0.0; the kernels store the value they read.
        zero = numpy.nonzero(value == 0)
        picked = argmax[zero]
        if (picked >= 0).any():
            kk, ch, p, q = (z[picked >= 0] for z in zero)
            picked = picked[picked >= 0]
            w = input.shape[3]
            value[kk, ch, p, q] = input[b[kk], c0 + ch, picked // w, picked % w]
    return value, argmax


def _stage_float64(values, keys, args, w, shape):
    """float64 bins of one group of RoIs: ``(value, argmax)`` [k, Cc, PH, PW].

    ``keys`` (None for planes too large for them) find each bin's first maximum up to ties in
    the low 32 bits of the values; ``values`` (cleaned, [N, H, W, Cc]) give the exact maxima,
    against which every pick is checked. Bins with a wrong pick are scanned directly.
    """
    b, hs, he, ws, we = args
    cc = shape[1]
    value = numpy.empty(shape, dtype=numpy.float64)
    argmax = numpy.full(shape, -1, dtype=numpy.int64)
    full = (he > hs)[:, :, None] & (we > ws)[:, None, :]  # [k, PH, PW]
    if keys is None:
        _pool_direct(values, b, hs, he, ws, we, w, numpy.argwhere(full), value, argmax)
    else:
        stage = numpy.empty(shape, dtype=numpy.int64)
        _pool(keys, b, hs, he, ws, we, stage)
        _pool(values, b, hs, he, ws, we, value)
        halves = stage.view(numpy.int32).reshape(shape + (2,))
        picked = numpy.subtract(_LOW, halves[..., 1 - _HIGH].view(numpy.uint32), dtype=numpy.int64)
        # Empty bins hold garbage: read pixel 0 there, then discard.
        good = full[:, None] & (value > -_common.FLT_MAX)
        picked = numpy.where(good, picked, 0)
        plane = values.shape[1] * w
        flat = (b[:, None, None, None] * plane + picked) * cc + numpy.arange(cc)[:, None, None]
        read = values.reshape(-1).take(flat)
        numpy.copyto(argmax, picked, where=good)
        wrong = good & (read != value)
        numpy.copyto(value, read, where=good)  # the value read keeps the sign of a -0.0
        if wrong.any():
            bins = numpy.argwhere(wrong.any(axis=1))
            _pool_direct(values, b, hs, he, ws, we, w, bins, value, argmax)
    _clear_empty(hs, he, ws, we, value, argmax)
    return value, argmax


def _clear_empty(hs, he, ws, we, value, argmax) -> None:
    """Value 0 and argmax -1 in the empty bins of ``value`` and ``argmax`` [k, Cc, PH, PW]."""
    i, p, q = numpy.nonzero((he <= hs)[:, :, None] | (we <= ws)[:, None, :])
    if i.size:
        value[i, :, p, q] = 0
        argmax[i, :, p, q] = -1


def roi_pool_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    indices: bool = True,
) -> tuple[numpy.ndarray, numpy.ndarray | None]:
    """RoI Pool forward.

    Args:
        input (ndarray[N, C, H, W]): features (float16, bfloat16, float32 or float64),
            C-contiguous.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows in the compute dtype;
            invalid rows give zeros and argmax -1.
        pooled_h (int): PH.
        pooled_w (int): PW.
        spatial_scale (float): box-to-feature coordinate scale.
        indices (bool): whether the argmax is wanted; without it none is kept beyond a chunk.
            Default: True.

    Returns:
        (ndarray[K, C, PH, PW], ndarray[K, C, PH, PW] int64 or None): the maxima in the input's
        dtype and their flat indices ``h * W + w`` in the H x W plane (-1 for an empty bin, or
        where no value exceeded ``-FLT_MAX``); None for the indices when not wanted.
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = numpy.zeros((k, c, pooled_h, pooled_w), dtype=input.dtype)
    if out.size == 0 or h == 0 or w == 0:
        return out, numpy.full(out.shape, -1, dtype=numpy.int64) if indices else None
    ct = _common.compute_dtype(input.dtype)
    b, valid, hs, he, ws, we = _bins(rois, n, h, w, pooled_h, pooled_w, spatial_scale, ct)
    argmax = None
    if indices:
        argmax = numpy.empty(out.shape, dtype=numpy.int64)
        argmax[~valid] = -1
    live = numpy.flatnonzero(valid)
    y0, y1, x0, x1 = hs[:, 0], he[:, -1], ws[:, 0], we[:, -1]
    area = numpy.maximum(y1 - y0, 0) * numpy.maximum(x1 - x0, 0)
    touched = int(area[live].sum())
    if touched * c + live.size * _ROI_COST >= n * h * w * c:
        _forward(input, b, hs, he, ws, we, live, out, argmax, ct)
        return out, argmax
    # The RoIs cover less than the plane: each is pooled from its own window, so that the
    # working copies are as large as what the RoIs read, not as the plane.
    for i in live[area[live] > 0].tolist():
        one = slice(i, i + 1)
        index = None if argmax is None else argmax[one]
        window = input[b[i] : b[i] + 1, :, y0[i] : y1[i], x0[i] : x1[i]]
        bins = (hs[one] - y0[i], he[one] - y0[i], ws[one] - x0[i], we[one] - x0[i])
        _forward(window, _ZERO, *bins, _ZERO, out[one], index, ct)
        if index is not None:  # window positions to plane positions
            width = int(x1[i] - x0[i])
            plane = (index // width + y0[i]) * w + index % width + x0[i]
            numpy.copyto(index, plane, where=index >= 0)
    if argmax is not None:
        argmax[live[area[live] == 0]] = -1
    return out, argmax


def _forward(input, b, hs, he, ws, we, live, out, argmax, ct) -> None:
    """Pool the RoIs ``live`` (their batch indices ``b`` and bins, all indexed by RoI) from
    ``input`` [N, C, H, W] into ``out`` and ``argmax`` (or None) [K, C, PH, PW], working on a
    channels-last copy of a chunk of channels of the whole of ``input`` at a time."""
    n, c, h, w = input.shape
    pooled_h, pooled_w = hs.shape[1], ws.shape[1]
    keyed = h * w < _KEYED_PLANE
    cc = _common.channel_chunk(c, n * h * w, 8 if ct == numpy.float32 else 16)
    # Whether the copy holds NaN, values <= -FLT_MAX or -0.0 is worth finding out when it is
    # smaller than the bins: without them, the bins need no look for them.
    # (The float64 path checks every pick anyway.)
    rare = ct == numpy.float32 and n * h * w < live.size * pooled_h * pooled_w
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        keys, found = _keys(input, c0, c1, ct, rare) if keyed else (None, None)
        values = None
        if ct == numpy.float64 or not keyed:
            values = _values(input, c0, c1, numpy.dtype(numpy.float64))
        step = max(1, _STAGE_ELEMENTS // ((c1 - c0) * pooled_h * pooled_w))
        buffers = _Buffers()
        for s in range(0, live.size, step):
            sel = live[s : s + step]
            # A run of consecutive RoIs is stored through a slice, cheaper than an index array,
            # and its bins are decoded straight into the outputs.
            rows = slice(sel[0], sel[-1] + 1) if sel[-1] - sel[0] == sel.size - 1 else sel
            args = (b[sel], hs[sel], he[sel], ws[sel], we[sel])
            shape = (sel.size, c1 - c0, pooled_h, pooled_w)
            if values is None:
                direct = isinstance(rows, slice)
                into = out[rows, c0:c1] if direct and out.dtype == numpy.float32 else None
                index = argmax[rows, c0:c1] if direct and argmax is not None else None
                value, index = _stage_float32(input, c0, keys, args, shape, buffers, found,
                                              into, index)
                if value is into:
                    if argmax is not None and not direct:
                        argmax[rows, c0:c1] = index
                    continue
            else:
                value, index = _stage_float64(values, keys, args, w, shape)
            with numpy.errstate(over="ignore"):  # -FLT_MAX is -inf in float16
                out[rows, c0:c1] = value
            if argmax is not None:
                argmax[rows, c0:c1] = index


def _image_runs(b, valid, n):
    """``(image, RoIs)`` for each image with valid RoIs, in increasing order: a slice where
    they are consecutive (no copy of their gradients), else an index array."""
    order = numpy.flatnonzero(valid)
    order = order[numpy.argsort(b[order], kind="stable")]
    bounds = numpy.searchsorted(b[order], numpy.arange(n + 1)).tolist()
    runs = []
    for image in range(n):
        ks = order[bounds[image] : bounds[image + 1]]
        if ks.size:
            consecutive = ks[-1] - ks[0] == ks.size - 1
            runs.append((image, slice(int(ks[0]), int(ks[-1]) + 1) if consecutive else ks))
    return runs


def _groups(ks, step):
    """``ks`` (a slice or an index array) in pieces of at most ``step`` RoIs."""
    if isinstance(ks, slice):
        return [slice(s, min(s + step, ks.stop)) for s in range(ks.start, ks.stop, step)]
    return [ks[s : s + step] for s in range(0, ks.size, step)]


class _Scatter:
    """Adds gradients of groups of RoIs into an accumulator, through reused buffers."""

    def __init__(self, grad_output, argmax, plane, in_range):
        self.grad, self.argmax, self.plane = grad_output, argmax, plane
        # Indices known to lie in [-1, H * W) are offset with one addition, without clipping;
        # uint64 ones are clipped anyway (uint64 + int64 would add in float64).
        self.in_range = in_range and argmax.dtype != numpy.uint64
        self.ct = _common.compute_dtype(grad_output.dtype)
        self.bins = grad_output.shape[2] * grad_output.shape[3]
        self.index = numpy.empty(0, dtype=numpy.int64)
        self.values = numpy.empty(0, dtype=self.ct)
        self.offset_key = self.offset = None

    def step(self, channels: int) -> int:
        """RoIs per group, for ``channels`` channels of each."""
        return max(1, _BACKWARD_CHUNK // (channels * self.bins))

    def __call__(self, acc, sel, c0, c1, lo, hi) -> None:
        """Add gradients of RoIs ``sel``, channels ``c0:c1``, whose index lies in ``[lo, hi)``
        into ``acc``: ``[c1 - c0, hi - lo + 2]`` flat, a slot on either side of each range
        taking the indices that fall outside it (-1 included)."""
        a = self.argmax[sel, c0:c1]
        size = a.size
        if size > self.index.size:  # at most a group's worth, or one RoI's channels
            self.index = numpy.empty(size, dtype=numpy.int64)
            self.values = numpy.empty(size, dtype=self.ct)
        ix = self.index[:size].reshape(a.shape)
        values = self.values[:size].reshape(a.shape)
        offset = self._offsets(c1 - c0, hi - lo + 2, 1 - lo)
        if self.in_range and lo == 0 and hi == self.plane:
            numpy.add(a, offset, out=ix)
        else:
            numpy.clip(a, lo - 1, hi, out=ix)
            ix += offset
        values[...] = self.grad[sel, c0:c1]
        # add.at adds in the order of the indices: deterministic.
        numpy.add.at(acc, self.index[:size], self.values[:size])

    def direct(self, planes, sel, c0, c1) -> None:
        """Add gradients of RoIs ``sel``, channels ``c0:c1``, whose indices are in range,
        straight into ``planes``: their ``[c1 - c0, H * W]`` flat part of grad_input (in the
        compute dtype, still zeros). An index -1 adds +0.0 to its channel's first pixel
        instead, which changes no sum: adding +0.0 leaves every value but -0.0 as it is, and a
        sum that starts at +0.0 is never -0.0."""
        a = self.argmax[sel, c0:c1]
        size = a.size
        if size > self.index.size:
            self.index = numpy.empty(size, dtype=numpy.int64)
            self.values = numpy.empty(size, dtype=self.ct)
        ix = self.index[:size].reshape(a.shape)
        values = self.values[:size].reshape(a.shape)
        numpy.add(a, self._offsets(c1 - c0, self.plane, 0), out=ix)
        values[...] = self.grad[sel, c0:c1]
        empty = a < 0
        if empty.any():
            numpy.add(ix, 1, out=ix, where=empty)
            numpy.copyto(values, 0, where=empty)
        numpy.add.at(planes, self.index[:size], self.values[:size])

    def _offsets(self, channels, stride, shift):
        """``[channels, PH, PW]``: ``c * stride + shift`` for channel ``c``. As large as one
        RoI's indices (not broadcast along PH and PW), so that adding it to them runs over whole
        rows of channels x bins."""
        key = (channels, stride, shift)
        if self.offset_key != key:
            self.offset_key = key
            start = numpy.arange(channels) * stride + shift
            self.offset = numpy.repeat(start, self.bins).reshape(channels, *self.grad.shape[2:])
        return self.offset

    def spans(self, ks):
        """The smallest and largest index in ``[0, H * W)`` of each RoI of ``ks`` (over all
        channels), -1 for the largest where there is none."""
        plane = self.plane
        lo, hi = [], []
        for sel in _groups(ks, self.step(self.grad.shape[1])):
            a = self.argmax[sel]
            a = a.reshape(a.shape[0], -1)
            inside = (a >= 0) & (a < plane)
            lo.append(numpy.where(inside, a, plane).min(axis=1).astype(numpy.int64))
            top = numpy.where(inside, a, 0).max(axis=1).astype(numpy.int64)
            hi.append(numpy.where(inside.any(axis=1), top, -1))
        return numpy.concatenate(lo), numpy.concatenate(hi)


def _backward_planes(add, runs, grad_input) -> None:
    """Sum each image's gradients channel chunk by channel chunk, whole planes at a time.

    With fewer gradients than ``_DIRECT`` per pixel, in range, and grad_input in the compute
    dtype, the sums run in grad_input itself; else in an accumulator with a slot on either side
    of each plane, copied out once complete (cheaper than finding the indices -1 when they are
    many)."""
    c, h, w = grad_input.shape[1:]
    plane, row = h * w, h * w + 2
    cc = max(1, min(c, _SEGMENT // row))
    step = add.step(cc)
    rois = sum(ks.stop - ks.start if isinstance(ks, slice) else ks.size for _, ks in runs)
    gradients = rois * c * add.bins
    if add.in_range and add.ct == grad_input.dtype and gradients < _DIRECT * grad_input.size:
        for c0 in range(0, c, cc):
            c1 = min(c, c0 + cc)
            for image, ks in runs:
                planes = grad_input[image, c0:c1].reshape(-1)
                for sel in _groups(ks, step):
                    add.direct(planes, sel, c0, c1)
        return
    acc = numpy.empty(cc * row, dtype=add.ct)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        seg = acc[: (c1 - c0) * row]
        for image, ks in runs:
            seg.fill(0)
            for sel in _groups(ks, step):
                add(seg, sel, c0, c1, 0, plane)
            grad_input[image, c0:c1].reshape(c1 - c0, plane)[...] = seg.reshape(c1 - c0, row)[
                :, 1 : plane + 1
            ]


def _backward_images(add, runs, grad_input, check) -> bool:
    """Sum each image's gradients, all its channels at a time, in an accumulator with a slot on
    either side of each plane (small enough to stay in cache): every group of RoIs then reads
    its indices and gradients (C-contiguous, the gradients in the compute dtype) in one block,
    no copy of the gradients, and checks the indices while they are in cache (a block inside
    ``[-1, H * W)`` needs no clipping). Returns whether an index outside ``[-1, H * W)`` was
    met; with ``check`` the sums stop there (the caller raises)."""
    c, h, w = grad_input.shape[1:]
    plane, row = h * w, h * w + 2
    step = add.step(c)
    acc = numpy.empty(c * row, dtype=add.ct)
    offset = add._offsets(c, row, 1)
    indices = numpy.empty(step * offset.size, dtype=numpy.int64)
    wrong = False
    for image, ks in runs:
        acc.fill(0)
        for sel in _groups(ks, step):
            a = add.argmax[sel]
            index = indices[: a.size].reshape(a.shape)
            if int(a.min()) < -1 or int(a.max()) >= plane:
                wrong = True
                if check:
                    return True
                numpy.clip(a, -1, plane, out=index)
                index += offset
            else:
                numpy.add(a, offset, out=index)
            numpy.add.at(acc, index.reshape(-1), add.grad[sel].reshape(-1))
        grad_input[image].reshape(c, plane)[...] = acc.reshape(c, row)[:, 1 : plane + 1]
    return wrong


def _backward_ranges(add, runs, grad_input) -> None:
    """Sum each image's gradients channel by channel, over ranges of at most
    ``_SEGMENT_PLANE`` pixels that cover the indices of its RoIs and skip the gaps between."""
    c = grad_input.shape[1]
    flat = grad_input.reshape(grad_input.shape[0], c, -1)
    for image, ks in runs:
        lo, hi = add.spans(ks)
        ids = numpy.arange(ks.start, ks.stop) if isinstance(ks, slice) else ks
        keep = hi >= 0
        ids, lo, hi = ids[keep], lo[keep], hi[keep]
        for ch in range(c):
            pos = 0
            while True:
                active = hi >= pos
                if not active.any():
                    break
                s = max(pos, int(lo[active].min()))
                e = min(s + _SEGMENT_PLANE, int(hi[active].max()) + 1)
                sel = ids[active & (lo < e)]
                acc = numpy.zeros(e - s + 2, dtype=add.ct)
                for group in _groups(sel, add.step(1)):
                    add(acc, group, ch, ch + 1, s, e)
                flat[image, ch, s:e] = acc[1:-1]
                pos = e


def _backward_once(grad_output, b, valid, argmax, grad_input, check) -> bool:
    """Add all the gradients of a small call straight into ``grad_input`` (grad_output's dtype
    being the compute dtype), with one ``numpy.add.at`` in the order of ``(k, c, ph, pw)``,
    the order of the sums. Indices outside ``[0, H * W)`` and invalid RoIs add +0.0 to their
    channel's first pixel instead (see :meth:`_Scatter.direct`). Returns whether an index lies
    outside ``[-1, H * W)``; with ``check`` nothing is added then."""
    c, h, w = grad_input.shape[1:]
    plane = h * w
    lo, hi = int(argmax.min()), int(argmax.max())
    wrong = lo < -1 or hi >= plane
    if wrong and check:
        return True
    base = ((b[:, None] * c + numpy.arange(c)) * plane)[:, :, None, None]
    index = argmax + base
    values = grad_output
    if lo < 0 or hi >= plane or not valid.all():
        outside = (argmax < 0) | (argmax >= plane) | ~valid[:, None, None, None]
        index = numpy.where(outside, base, index)
        values = numpy.where(outside, 0, values)
    numpy.add.at(grad_input.reshape(-1), index.reshape(-1), values.reshape(-1))
    return wrong


def roi_pool_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    argmax: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    check_indices: bool = False,
    deterministic: bool = False,
) -> numpy.ndarray:
    """Gradient of RoI Pool with respect to its input; deterministic.

    Each gradient goes to the pixel its bin's argmax names. Every pixel's gradients are summed in
    the compute dtype (float32, float64 for float64), in the order of RoI ``k`` and then of the
    bin ``(ph, pw)`` in row-major order, and rounded once to grad_output's dtype: the same bits
    on every run. Invalid RoIs and argmax values outside ``[0, H * W)`` contribute nothing.

    The sums run in accumulators of a bounded size (one image's channels of a small plane at a
    time, or, on a plane above ``_SEGMENT_PLANE`` pixels, one channel's range of pixels where
    indices fall), or for a call of at most ``_ONCE`` gradients straight in grad_input, so the
    memory beyond grad_input does not grow with the plane.

    Args:
        grad_output (ndarray[K, C, PH, PW]): gradient of the output, any strides.
        rois (ndarray[K, 5]): as for :func:`roi_pool_forward`.
        argmax (ndarray[K, C, PH, PW]): the forward pass's argmax, any integer dtype and strides.
        input_shape ((int, int, int, int)): ``(N, C, H, W)`` of the forward input.
        check_indices (bool): raise for an index of ``argmax`` outside ``[-1, H * W)``. The
            indices are read once for that in blocks, in their own order, whether or not it is
            asked: when all lie in range they need no clipping later. Default: False.
        deterministic (bool): accepted for the backend contract; this path always is.
            Default: False.

    Returns:
        ndarray[N, C, H, W]: in grad_output's dtype.

    Raises:
        roi_cupy._backend.IndexOutOfRange: with ``check_indices``, for the first index out of
            range (its flat position).
    """
    n, c, h, w = input_shape
    plane = h * w
    if n * c * plane == 0 or grad_output.size == 0:
        return numpy.zeros(input_shape, dtype=grad_output.dtype)
    # The result first: an input_shape too large for memory fails on an array of that shape.
    grad_input = numpy.zeros(input_shape, dtype=grad_output.dtype)
    b, valid = _common.batch_index(rois, n)
    # (uint64 + int64 would add in float64.)
    own_dtype = grad_output.dtype == _common.compute_dtype(grad_output.dtype)
    if grad_output.size <= _ONCE and own_dtype and argmax.dtype != numpy.uint64:
        with numpy.errstate(invalid="ignore", over="ignore"):
            if _backward_once(grad_output, b, valid, argmax, grad_input, check_indices):
                if check_indices:
                    raise _backend.IndexOutOfRange(roi_check.first_out_of_range(argmax, plane))
        return grad_input
    runs = _image_runs(b, valid, n)
    contiguous = argmax.flags.c_contiguous and grad_output.flags.c_contiguous
    if (
        (plane + 2) * c <= _IMAGE_SEGMENT
        and contiguous
        and argmax.dtype != numpy.uint64
        and own_dtype
        and (valid.all() or not check_indices)
        and grad_output.size >= _DIRECT * grad_input.size
    ):
        # The indices of the RoIs summed are checked as they are read; with check_indices
        # every RoI is (invalid ones are refused before).
        add = _Scatter(grad_output, argmax, plane, False)
        with numpy.errstate(invalid="ignore", over="ignore"):
            if _backward_images(add, runs, grad_input, check_indices) and check_indices:
                raise _backend.IndexOutOfRange(roi_check.first_out_of_range(argmax, plane))
        return grad_input
    # One pass over the indices in their own order, block by block: the first one out of range
    # is an error, or else (unchecked) means clipping them all.
    wrong = roi_check.first_out_of_range(argmax, plane)
    if wrong >= 0 and check_indices:
        raise _backend.IndexOutOfRange(wrong)
    add = _Scatter(grad_output, argmax, plane, wrong < 0)
    # +inf and -inf gradients meeting give NaN; float16 rounds to inf past its range.
    with numpy.errstate(invalid="ignore", over="ignore"):
        if plane <= _SEGMENT_PLANE:
            _backward_planes(add, runs, grad_input)
        else:
            _backward_ranges(add, runs, grad_input)
    return grad_input
