"""RoI Pool on NumPy arrays.

The maximum over a rectangle is the maximum over its rows of the maximum over its columns, so each
RoI costs two passes of contiguous reductions over its window of a channels-last copy of the
features (one per bin row, then one per bin column), every reduction vectorised over channels.

For float16 and float32 the reduction runs on int64 keys that order like the scan the operator
is defined by: the high 32 bits map the float32 value to an order-preserving integer (NaN and
values ``<= -FLT_MAX`` become ``-FLT_MAX``, ``-0.0`` becomes ``0.0``) and the low 32 bits hold
``2**32 - 1 - (h * W + w)``, so the largest key is the largest value at its first position in
row-major order and a plain ``max`` yields both the maximum and its argmax. float64 values do not
fit such a key; float64 takes the maximum of each bin directly with ``argmax`` (first occurrence).
"""
from __future__ import annotations

import numpy

from roi_cupy._numpy import _common

_EMPTY = numpy.iinfo(numpy.int64).min  # below every key: marks an empty bin
_LOW = numpy.int64(0xFFFFFFFF)
# RoIs whose results are staged together (bounds the staging buffers with C * PH * PW).
_STAGE_ELEMENTS = 1 << 21


def _round(v: numpy.ndarray) -> numpy.ndarray:
    """Round half away from zero (C ``round``), exactly: ``v - trunc(v)`` is exact."""
    t = numpy.trunc(v)
    return t + numpy.where(numpy.abs(v - t) >= 0.5, numpy.sign(v), 0)


def _bins(rois, n, h, w, pooled_h, pooled_w, spatial_scale, ct):
    """Batch index, validity and clipped bin edges ``(hs, he, ws, we)`` ([K, PH] / [K, PW])."""
    b, valid = _common.batch_index(rois, n)
    r = numpy.where(valid[:, None], rois, 0).astype(ct)
    scale = ct.type(spatial_scale)
    with numpy.errstate(all="ignore"):
        xs, ys, xe, ye = (_round(r[:, i] * scale).astype(numpy.float64) for i in (1, 2, 3, 4))
        rw = numpy.maximum(xe - xs + 1, 1).astype(ct)
        rh = numpy.maximum(ye - ys + 1, 1).astype(ct)
        bw = rw / ct.type(pooled_w)
        bh = rh / ct.type(pooled_h)

    def edges(pooled, size, start, bin_size):
        p = numpy.arange(pooled, dtype=ct)
        with numpy.errstate(all="ignore"):
            lo = numpy.floor(p * bin_size[:, None]).astype(numpy.float64) + start[:, None]
            hi = numpy.ceil((p + 1) * bin_size[:, None]).astype(numpy.float64) + start[:, None]
        return (numpy.clip(lo, 0, size).astype(numpy.int64),
                numpy.clip(hi, 0, size).astype(numpy.int64))

    hs, he = edges(pooled_h, h, ys, bh)
    ws, we = edges(pooled_w, w, xs, bw)
    return b, valid, hs, he, ws, we


def _keys(input, c0, c1) -> numpy.ndarray:
    """Channels ``c0:c1`` as int64 keys ``[N, H, W, Cc]`` (see the module docstring)."""
    n, _, h, w = input.shape
    v = _common.channels_last(input, c0, c1, numpy.dtype(numpy.float32))
    v = numpy.where(v > -_common.FLT_MAX, v, numpy.float32(-_common.FLT_MAX)) + numpy.float32(0)
    bits = v.view(numpy.int32)
    order = numpy.where(bits < 0, bits ^ numpy.int32(0x7FFFFFFF), bits).astype(numpy.int64)
    position = _LOW - numpy.arange(h * w, dtype=numpy.int64)
    keys = (order << 32).reshape(n, h * w, c1 - c0)
    keys |= position[None, :, None]
    return keys.reshape(n, h, w, c1 - c0)


def _decode(keys: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Keys -> (float32 value, int64 argmax); empty bins give (0, -1), unpicked (-FLT_MAX, -1)."""
    order = (keys >> 32).astype(numpy.int32)
    value = (order ^ ((order >> 31) & numpy.int32(0x7FFFFFFF))).view(numpy.float32)
    argmax = _LOW - (keys & _LOW)
    empty = keys == _EMPTY
    argmax[empty | (value == numpy.float32(-_common.FLT_MAX))] = -1
    value[empty] = 0
    return value, argmax


def _pool_keys(keys, b, hs, he, ws, we, stage):
    """Fill ``stage`` [k, PH, PW, Cc] with each bin's largest key (``_EMPTY`` when empty)."""
    pooled_h, pooled_w = hs.shape[1], ws.shape[1]
    stage.fill(_EMPTY)
    for i in range(b.size):
        y0, y1, x0, x1 = hs[i, 0], he[i, -1], ws[i, 0], we[i, -1]
        if y1 <= y0 or x1 <= x0:
            continue
        window = keys[b[i], y0:y1, x0:x1]
        rowmax = numpy.full((pooled_h,) + window.shape[1:], _EMPTY, dtype=numpy.int64)
        for p in range(pooled_h):
            if he[i, p] > hs[i, p]:
                numpy.max(window[hs[i, p] - y0 : he[i, p] - y0], axis=0, out=rowmax[p])
        for q in range(pooled_w):
            if we[i, q] > ws[i, q]:
                numpy.max(rowmax[:, ws[i, q] - x0 : we[i, q] - x0], axis=1, out=stage[i, :, q])
        # A bin whose rows are empty keeps _EMPTY from rowmax.


def _pool_direct(values, b, hs, he, ws, we, w, out_v, out_i):
    """float64: each bin's first maximum straight from the cleaned values [N, H, W, Cc]."""
    cc = values.shape[-1]
    lanes = numpy.arange(cc)
    for i in range(b.size):
        for p in range(hs.shape[1]):
            for q in range(ws.shape[1]):
                h0, h1, w0, w1 = hs[i, p], he[i, p], ws[i, q], we[i, q]
                if h1 <= h0 or w1 <= w0:
                    continue
                window = values[b[i], h0:h1, w0:w1].reshape(-1, cc)
                a = window.argmax(axis=0)
                v = window[a, lanes]
                out_v[i, :, p, q] = v
                out_i[i, :, p, q] = numpy.where(
                    v > -_common.FLT_MAX, (h0 + a // (w1 - w0)) * w + w0 + a % (w1 - w0), -1
                )


def roi_pool_forward(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
) -> tuple[numpy.ndarray, numpy.ndarray]:
    """RoI Pool forward.

    Args:
        input (ndarray[N, C, H, W]): features (float16, float32 or float64), C-contiguous.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows in the compute dtype;
            invalid rows give zeros and argmax -1.
        pooled_h (int): PH.
        pooled_w (int): PW.
        spatial_scale (float): box-to-feature coordinate scale.

    Returns:
        (ndarray[K, C, PH, PW], ndarray[K, C, PH, PW] int64): the maxima in the input's dtype and
        their flat indices ``h * W + w`` in the H x W plane (-1 for an empty bin, or where no
        value exceeded ``-FLT_MAX``).
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = numpy.zeros((k, c, pooled_h, pooled_w), dtype=input.dtype)
    argmax = numpy.full((k, c, pooled_h, pooled_w), -1, dtype=numpy.int64)
    if out.size == 0 or h == 0 or w == 0:
        return out, argmax
    ct = _common.compute_dtype(input.dtype)
    b, valid, hs, he, ws, we = _bins(rois, n, h, w, pooled_h, pooled_w, spatial_scale, ct)
    live = numpy.flatnonzero(valid)
    # Keys carry the position in 32 bits; larger planes and float64 take the direct path.
    keyed = ct == numpy.float32 and h * w < 2**32
    cc = _common.channel_chunk(c, n * h * w, 8 if keyed else ct.itemsize)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        if keyed:
            data = _keys(input, c0, c1)
        else:
            v = _common.channels_last(input, c0, c1, ct).reshape(n, h, w, c1 - c0)
            data = numpy.where(v > -_common.FLT_MAX, v, ct.type(-_common.FLT_MAX))
        step = max(1, _STAGE_ELEMENTS // ((c1 - c0) * pooled_h * pooled_w))
        for s in range(0, live.size, step):
            sel = live[s : s + step]
            args = (b[sel], hs[sel], he[sel], ws[sel], we[sel])
            if keyed:
                stage = numpy.empty((sel.size, pooled_h, pooled_w, c1 - c0), dtype=numpy.int64)
                _pool_keys(data, *args, stage)
                value, index = _decode(stage)
                with numpy.errstate(over="ignore"):  # -FLT_MAX is -inf in float16
                    out[sel, c0:c1] = value.transpose(0, 3, 1, 2)
                argmax[sel, c0:c1] = index.transpose(0, 3, 1, 2)
            else:
                value = numpy.zeros((sel.size, c1 - c0, pooled_h, pooled_w), dtype=ct)
                index = numpy.full(value.shape, -1, dtype=numpy.int64)
                _pool_direct(data, *args, w, value, index)
                out[sel, c0:c1] = value
                argmax[sel, c0:c1] = index
    return out, argmax


def roi_pool_backward(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    argmax: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
) -> numpy.ndarray:
    """Gradient of RoI Pool with respect to its input; deterministic.

    Each gradient goes to the pixel its bin's argmax names, summed in a fixed order in float32
    (float64 for float64). Invalid RoIs and argmax values outside ``[0, H * W)`` contribute
    nothing.

    Args:
        grad_output (ndarray[K, C, PH, PW]): gradient of the output, C-contiguous.
        rois (ndarray[K, 5]): as for :func:`roi_pool_forward`.
        argmax (ndarray[K, C, PH, PW] int64): the forward pass's argmax.
        input_shape ((int, int, int, int)): ``(N, C, H, W)`` of the forward input.

    Returns:
        ndarray[N, C, H, W]: in grad_output's dtype.
    """
    n, c, h, w = input_shape
    k = grad_output.shape[0]
    grad_input = numpy.zeros((n, c, h, w), dtype=grad_output.dtype)
    if grad_input.size == 0 or k == 0 or grad_output.size == 0:
        return grad_input
    ct = _common.compute_dtype(grad_output.dtype)
    plane = h * w
    # One slot past the end takes what must be dropped, so no masked copy is needed.
    acc = numpy.zeros(n * c * plane + 1, dtype=ct)
    b, valid = _common.batch_index(rois, n)
    base = numpy.where(valid[:, None], (b[:, None] * c + numpy.arange(c)) * plane, -1)
    step = max(1, _STAGE_ELEMENTS // grad_output[0].size)
    for s in range(0, k, step):
        a = argmax[s : s + step]
        index = a + base[s : s + step, :, None, None]
        drop = a.view(numpy.uint64) >= plane  # negative indices wrap to huge values
        if not valid[s : s + step].all():
            drop |= ~valid[s : s + step, None, None, None]
        if drop.any():
            index[drop] = n * c * plane
        numpy.add.at(acc, index.ravel(), grad_output[s : s + step].astype(ct, copy=False).ravel())
    grad_input[...] = acc[:-1].reshape(n, c, h, w)
    return grad_input
