"""The test oracle: RoI Align and RoI Pool as plain float64 loops, straight from docs/semantics.md.

Clarity over speed: one loop per RoI, bin and sample point (channels are handled together, since
no decision depends on the channel except the running maximum, which is kept per channel). Every
function computes in float64 whatever the input dtype; callers round the result to the dtype
under test. Keep inputs small: this is slow Python.

Boxes are ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, exactly as the backends receive them.
"""
from __future__ import annotations

import math

import numpy

FLT_MAX = float(numpy.finfo(numpy.float32).max)


def pair(output_size: int | tuple[int, int]) -> tuple[int, int]:
    """``(PH, PW)`` from an int or a pair."""
    if isinstance(output_size, int):
        return output_size, output_size
    return int(output_size[0]), int(output_size[1])


def batch_index(row: numpy.ndarray, n: int) -> int | None:
    """The image a RoI row reads, or None for an invalid row.

    A row is invalid when any of its five values is not finite or when its batch index, read by
    truncation toward zero, lies outside ``[0, n)``.
    """
    if not all(math.isfinite(float(v)) for v in row):
        return None
    b = int(float(row[0]))  # int() truncates toward zero, like a C cast
    return b if 0 <= b < n else None


def c_round(v: float) -> int:
    """Round half away from zero (C ``round``), exactly; ``numpy.round`` rounds half to even."""
    magnitude = abs(v)
    whole = math.floor(magnitude)
    # magnitude - whole is exact for a float, unlike floor(magnitude + 0.5)
    rounded = whole + (1 if magnitude - whole >= 0.5 else 0)
    return int(rounded) if v >= 0 else -int(rounded)


# ----------------------------------------------------------------------------- RoI Align
def bilinear_corners(y: float, x: float, height: int, width: int) -> list[tuple[int, int, float]]:
    """The pixels a sample at ``(y, x)`` reads and their weights, ``[(h, w, weight)]``.

    Empty for a sample outside ``[-1, height] x [-1, width]`` (NaN included) and for an empty
    plane. Samples in ``[-1, 0)`` snap to row/column 0, samples in ``(size - 1, size]`` to the
    last one.
    """
    if height <= 0 or width <= 0:
        return []
    if not (y >= -1 and y <= height and x >= -1 and x <= width):
        return []
    y, x = max(y, 0.0), max(x, 0.0)
    yl = int(y)
    if yl >= height - 1:
        yl = yh = height - 1
        y = float(yl)
    else:
        yh = yl + 1
    xl = int(x)
    if xl >= width - 1:
        xl = xh = width - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    hy, hx = 1.0 - ly, 1.0 - lx
    return [(yl, xl, hy * hx), (yl, xh, hy * lx), (yh, xl, ly * hx), (yh, xh, ly * lx)]


def roi_align_geometry(
    row: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int | tuple[int, int],
    aligned: bool,
) -> tuple[float, float, float, float, int, int]:
    """``(y0, x0, bin_h, bin_w, grid_h, grid_w)`` of one RoI row (grid sizes may be <= 0)."""
    offset = 0.5 if aligned else 0.0
    x0 = float(row[1]) * spatial_scale - offset
    y0 = float(row[2]) * spatial_scale - offset
    x1 = float(row[3]) * spatial_scale - offset
    y1 = float(row[4]) * spatial_scale - offset
    roi_w, roi_h = x1 - x0, y1 - y0
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    sampling_h, sampling_w = (
        (sampling_ratio, sampling_ratio) if isinstance(sampling_ratio, int) else sampling_ratio
    )
    grid_h = sampling_h if sampling_h > 0 else math.ceil(roi_h / pooled_h)
    grid_w = sampling_w if sampling_w > 0 else math.ceil(roi_w / pooled_w)
    return y0, x0, bin_h, bin_w, grid_h, grid_w


def sample_points(start: float, bin_size: float, grid: int, p: int) -> list[float]:
    """The sample coordinates of bin ``p`` along one axis (none for ``grid <= 0``)."""
    return [start + p * bin_size + (i + 0.5) * bin_size / grid for i in range(grid)]


def roi_align_ref(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> numpy.ndarray:
    """RoI Align forward.

    Args:
        input (ndarray[N, C, H, W]): features, any float dtype.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows.
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): Default: 1.0.
        sampling_ratio (int or (int, int)): per axis or both, ``<= 0`` adaptive. Default: -1.
        aligned (bool): Default: False.

    Returns:
        ndarray[K, C, PH, PW]: float64. Invalid RoIs give zeros.
    """
    x = numpy.asarray(input, dtype=numpy.float64)
    n, c, height, width = x.shape
    pooled_h, pooled_w = pair(output_size)
    out = numpy.zeros((len(rois), c, pooled_h, pooled_w))
    for k, row in enumerate(rois):
        b = batch_index(row, n)
        if b is None:
            continue
        y0, x0, bin_h, bin_w, grid_h, grid_w = roi_align_geometry(
            row, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
        )
        count = max(grid_h * grid_w, 1)  # outside samples are counted too
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                total = numpy.zeros(c)
                for y in sample_points(y0, bin_h, grid_h, ph):
                    for xs in sample_points(x0, bin_w, grid_w, pw):
                        for h, w, weight in bilinear_corners(y, xs, height, width):
                            total += weight * x[b, :, h, w]
                out[k, :, ph, pw] = total / count
    return out


def roi_align_backward_ref(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> numpy.ndarray:
    """RoI Align backward: the gradient with respect to the input.

    Args:
        grad_output (ndarray[K, C, PH, PW]): any float dtype.
        rois (ndarray[K, 5]): as for :func:`roi_align_ref`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)``.
        spatial_scale, sampling_ratio, aligned: as for :func:`roi_align_ref`.

    Returns:
        ndarray[N, C, H, W]: float64. Invalid RoIs contribute nothing.
    """
    g = numpy.asarray(grad_output, dtype=numpy.float64)
    n, c, height, width = input_shape
    pooled_h, pooled_w = g.shape[2], g.shape[3]
    grad = numpy.zeros((n, c, height, width))
    for k, row in enumerate(rois):
        b = batch_index(row, n)
        if b is None:
            continue
        y0, x0, bin_h, bin_w, grid_h, grid_w = roi_align_geometry(
            row, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
        )
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                for y in sample_points(y0, bin_h, grid_h, ph):
                    for xs in sample_points(x0, bin_w, grid_w, pw):
                        # no max(., 1): a bin without samples has no loop iterations at all
                        for h, w, weight in bilinear_corners(y, xs, height, width):
                            grad[b, :, h, w] += g[k, :, ph, pw] * weight / (grid_h * grid_w)
    return grad


def linear_corners(t: float, length: int) -> list[tuple[int, float]]:
    """1-D interpolation weights ``[(index, weight)]`` of a sample at ``t`` on ``length`` cells."""
    if length <= 0 or not (t >= -1 and t <= length):
        return []
    t = max(t, 0.0)
    lo = int(t)
    if lo >= length - 1:
        return [(length - 1, 1.0)]
    return [(lo, 1.0 - (t - lo)), (lo + 1, t - lo)]


def axis_weights(
    start: float, bin_size: float, grid: int, pooled: int, length: int
) -> numpy.ndarray:
    """``[pooled, length]``: row p is the mean over bin p's samples of their 1-D weights."""
    a = numpy.zeros((pooled, length))
    for p in range(pooled):
        for t in sample_points(start, bin_size, grid, p):
            for index, weight in linear_corners(t, length):
                a[p, index] += weight / grid
    return a


def roi_align_separable(
    row: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> tuple[int | None, numpy.ndarray, numpy.ndarray]:
    """``(b, Ay [PH, H], Ax [PW, W])`` with ``roi_align(X)[k, c] == Ay @ X[b, c] @ Ax.T``.

    ``b`` is None (and both matrices zero) for an invalid row.
    """
    n, _, height, width = input_shape
    pooled_h, pooled_w = pair(output_size)
    b = batch_index(row, n)
    if b is None:
        return None, numpy.zeros((pooled_h, height)), numpy.zeros((pooled_w, width))
    y0, x0, bin_h, bin_w, grid_h, grid_w = roi_align_geometry(
        row, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
    )
    if grid_h * grid_w <= 0:  # no sample in the bin at all
        return b, numpy.zeros((pooled_h, height)), numpy.zeros((pooled_w, width))
    return (
        b,
        axis_weights(y0, bin_h, grid_h, pooled_h, height),
        axis_weights(x0, bin_w, grid_w, pooled_w, width),
    )


# ----------------------------------------------------------------------------- RoI Pool
def roi_pool_window(
    row: numpy.ndarray, ph: int, pw: int, pooled: tuple[int, int], scale: float, hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``(hstart, hend, wstart, wend)`` of bin ``(ph, pw)``, clipped to the plane."""
    pooled_h, pooled_w = pooled
    height, width = hw
    xs, ys = c_round(float(row[1]) * scale), c_round(float(row[2]) * scale)
    xe, ye = c_round(float(row[3]) * scale), c_round(float(row[4]) * scale)
    roi_w, roi_h = max(xe - xs + 1, 1), max(ye - ys + 1, 1)  # the end pixel is inclusive
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    hstart = min(max(math.floor(ph * bin_h) + ys, 0), height)
    hend = min(max(math.ceil((ph + 1) * bin_h) + ys, 0), height)
    wstart = min(max(math.floor(pw * bin_w) + xs, 0), width)
    wend = min(max(math.ceil((pw + 1) * bin_w) + xs, 0), width)
    return hstart, hend, wstart, wend


def roi_pool_ref(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> tuple[numpy.ndarray, numpy.ndarray]:
    """RoI Pool forward.

    Args:
        input (ndarray[N, C, H, W]): features, any float dtype.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows.
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): Default: 1.0.

    Returns:
        (ndarray[K, C, PH, PW] float64, ndarray[K, C, PH, PW] int64): the maxima and their flat
        indices ``h * W + w`` (-1 for an empty bin, an invalid RoI, or a window with nothing
        above -FLT_MAX, which then keeps -FLT_MAX).
    """
    x = numpy.asarray(input, dtype=numpy.float64)
    n, c, height, width = x.shape
    pooled_h, pooled_w = pair(output_size)
    out = numpy.zeros((len(rois), c, pooled_h, pooled_w))
    argmax = numpy.full((len(rois), c, pooled_h, pooled_w), -1, dtype=numpy.int64)
    for k, row in enumerate(rois):
        b = batch_index(row, n)
        if b is None:
            continue
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                hstart, hend, wstart, wend = roi_pool_window(
                    row, ph, pw, (pooled_h, pooled_w), spatial_scale, (height, width)
                )
                if hend <= hstart or wend <= wstart:
                    continue  # empty bin: 0 and -1
                best = numpy.full(c, -FLT_MAX)
                where = numpy.full(c, -1, dtype=numpy.int64)
                for h in range(hstart, hend):  # row-major scan
                    for w in range(wstart, wend):
                        value = x[b, :, h, w]
                        better = value > best  # strict: the first maximum wins, NaN never does
                        best = numpy.where(better, value, best)
                        where = numpy.where(better, h * width + w, where)
                out[k, :, ph, pw] = best
                argmax[k, :, ph, pw] = where
    return out, argmax


def roi_pool_backward_ref(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    argmax: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
) -> numpy.ndarray:
    """RoI Pool backward: each output's gradient goes to the pixel its index names.

    Args:
        grad_output (ndarray[K, C, PH, PW]): any float dtype.
        rois (ndarray[K, 5]): as for :func:`roi_pool_ref`.
        argmax (ndarray[K, C, PH, PW]): flat indices into the H x W plane; -1 (or anything else
            outside ``[0, H * W)``) contributes nothing.
        input_shape ((int, int, int, int)): ``(N, C, H, W)``.

    Returns:
        ndarray[N, C, H, W]: float64. Invalid RoIs contribute nothing.
    """
    g = numpy.asarray(grad_output, dtype=numpy.float64)
    n, c, height, width = input_shape
    grad = numpy.zeros((n, c, height * width))
    for k, row in enumerate(rois):
        b = batch_index(row, n)
        if b is None:
            continue
        for ch in range(c):
            for index, value in zip(argmax[k, ch].ravel(), g[k, ch].ravel()):
                if 0 <= index < height * width:
                    grad[b, ch, index] += value
    return grad.reshape(n, c, height, width)


# ----------------------------------------------------------------------------- position-sensitive
def ps_channel(c: int, ph: int, pw: int, pooled_h: int, pooled_w: int) -> int:
    """The input channel that bin ``(ph, pw)`` of output channel ``c`` reads."""
    return (c * pooled_h + ph) * pooled_w + pw


def ps_channels(groups: int, ph: int, pw: int, pooled_h: int, pooled_w: int) -> list[int]:
    """The input channels bin ``(ph, pw)`` reads, one per output channel ``0 .. groups - 1``."""
    return [ps_channel(c, ph, pw, pooled_h, pooled_w) for c in range(groups)]


def ps_roi_align_ref(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
) -> numpy.ndarray:
    """PS RoI Align forward: RoI Align with ``aligned=True``, each bin on its own channel.

    Args:
        input (ndarray[N, C, H, W]): features, any float dtype; C a multiple of ``PH * PW``.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows.
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): Default: 1.0.
        sampling_ratio (int or (int, int)): per axis or both, ``<= 0`` adaptive. Default: -1.

    Returns:
        ndarray[K, C / (PH * PW), PH, PW]: float64. Invalid RoIs give zeros.
    """
    x = numpy.asarray(input, dtype=numpy.float64)
    n, c, height, width = x.shape
    pooled_h, pooled_w = pair(output_size)
    groups = c // (pooled_h * pooled_w)
    out = numpy.zeros((len(rois), groups, pooled_h, pooled_w))
    for k, row in enumerate(rois):
        b = batch_index(row, n)
        if b is None:
            continue
        y0, x0, bin_h, bin_w, grid_h, grid_w = roi_align_geometry(
            row, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned=True
        )
        count = max(grid_h * grid_w, 1)  # no sample at all: 0
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                channels = ps_channels(groups, ph, pw, pooled_h, pooled_w)
                total = numpy.zeros(groups)
                for y in sample_points(y0, bin_h, grid_h, ph):
                    for xs in sample_points(x0, bin_w, grid_w, pw):
                        for h, w, weight in bilinear_corners(y, xs, height, width):
                            total += weight * x[b, channels, h, w]
                out[k, :, ph, pw] = total / count
    return out


def ps_roi_align_backward_ref(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
) -> numpy.ndarray:
    """PS RoI Align backward: the gradient with respect to the input.

    Args:
        grad_output (ndarray[K, C / (PH * PW), PH, PW]): any float dtype.
        rois (ndarray[K, 5]): as for :func:`ps_roi_align_ref`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)``.
        spatial_scale, sampling_ratio: as for :func:`ps_roi_align_ref`.

    Returns:
        ndarray[N, C, H, W]: float64. Invalid RoIs contribute nothing.
    """
    g = numpy.asarray(grad_output, dtype=numpy.float64)
    n, c, height, width = input_shape
    groups, pooled_h, pooled_w = g.shape[1:]
    grad = numpy.zeros((n, c, height, width))
    for k, row in enumerate(rois):
        b = batch_index(row, n)
        if b is None:
            continue
        y0, x0, bin_h, bin_w, grid_h, grid_w = roi_align_geometry(
            row, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned=True
        )
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                channels = ps_channels(groups, ph, pw, pooled_h, pooled_w)
                for y in sample_points(y0, bin_h, grid_h, ph):
                    for xs in sample_points(x0, bin_w, grid_w, pw):
                        for h, w, weight in bilinear_corners(y, xs, height, width):
                            grad[b, channels, h, w] += g[k, :, ph, pw] * weight / (grid_h * grid_w)
    return grad


def ps_roi_pool_window(
    row: numpy.ndarray, ph: int, pw: int, pooled: tuple[int, int], scale: float, hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``(hstart, hend, wstart, wend)`` of PS RoI Pool's bin ``(ph, pw)``, clipped to
    ``[0, H - 1] x [0, W - 1]``."""
    pooled_h, pooled_w = pooled
    height, width = hw
    xs, ys = c_round(float(row[1]) * scale), c_round(float(row[2]) * scale)
    xe, ye = c_round(float(row[3]) * scale), c_round(float(row[4]) * scale)
    roi_w, roi_h = max(xe - xs, 1), max(ye - ys, 1)  # the end pixel is not part of the box
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    hstart = min(max(math.floor(ph * bin_h) + ys, 0), height - 1)
    hend = min(max(math.ceil((ph + 1) * bin_h) + ys, 0), height - 1)
    wstart = min(max(math.floor(pw * bin_w) + xs, 0), width - 1)
    wend = min(max(math.ceil((pw + 1) * bin_w) + xs, 0), width - 1)
    return hstart, hend, wstart, wend


def ps_roi_pool_ref(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> numpy.ndarray:
    """PS RoI Pool forward: each bin's window mean on its own channel.

    Args:
        input (ndarray[N, C, H, W]): features, any float dtype; C a multiple of ``PH * PW``.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows.
        output_size (int or (int, int)): ``PH, PW``.
        spatial_scale (float): Default: 1.0.

    Returns:
        ndarray[K, C / (PH * PW), PH, PW]: float64; 0 for an empty window or an invalid RoI.
    """
    x = numpy.asarray(input, dtype=numpy.float64)
    n, c, height, width = x.shape
    pooled_h, pooled_w = pair(output_size)
    groups = c // (pooled_h * pooled_w)
    out = numpy.zeros((len(rois), groups, pooled_h, pooled_w))
    for k, row in enumerate(rois):
        b = batch_index(row, n)
        if b is None:
            continue
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                hstart, hend, wstart, wend = ps_roi_pool_window(
                    row, ph, pw, (pooled_h, pooled_w), spatial_scale, (height, width)
                )
                if hend <= hstart or wend <= wstart:
                    continue  # empty window: 0
                channels = ps_channels(groups, ph, pw, pooled_h, pooled_w)
                total = numpy.zeros(groups)
                for h in range(hstart, hend):
                    for w in range(wstart, wend):
                        total += x[b, channels, h, w]
                out[k, :, ph, pw] = total / ((hend - hstart) * (wend - wstart))
    return out


def ps_roi_pool_backward_ref(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float = 1.0,
) -> numpy.ndarray:
    """PS RoI Pool backward: each pixel of a bin's window gets the bin's gradient over its area.

    Args:
        grad_output (ndarray[K, C / (PH * PW), PH, PW]): any float dtype.
        rois (ndarray[K, 5]): as for :func:`ps_roi_pool_ref`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)``.
        spatial_scale (float): Default: 1.0.

    Returns:
        ndarray[N, C, H, W]: float64. Invalid RoIs contribute nothing.
    """
    g = numpy.asarray(grad_output, dtype=numpy.float64)
    n, c, height, width = input_shape
    groups, pooled_h, pooled_w = g.shape[1:]
    grad = numpy.zeros((n, c, height, width))
    for k, row in enumerate(rois):
        b = batch_index(row, n)
        if b is None:
            continue
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                hstart, hend, wstart, wend = ps_roi_pool_window(
                    row, ph, pw, (pooled_h, pooled_w), spatial_scale, (height, width)
                )
                if hend <= hstart or wend <= wstart:
                    continue
                channels = ps_channels(groups, ph, pw, pooled_h, pooled_w)
                area = (hend - hstart) * (wend - wstart)
                for h in range(hstart, hend):
                    for w in range(wstart, wend):
                        grad[b, channels, h, w] += g[k, :, ph, pw] / area
    return grad


# ----------------------------------------------------------------------------- RoI Align, max mode
def roi_align_max_picks(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = False,
) -> tuple[numpy.ndarray, dict]:
    """RoI Align in max mode, and each bin's pick.

    Every sample of a bin is visited in row-major ``(iy, ix)`` order; its value is the bilinear
    interpolation, 0 for a sample outside the map. A sample replaces the bin's pick when the bin
    has none yet, when it is strictly greater, or when it is NaN and the pick is not. A bin
    without samples (and an invalid RoI) holds 0.

    Returns:
        (ndarray[K, C, PH, PW] float64, dict): the output, and for each ``(k, c, ph, pw)`` whose
        pick lies inside the map, the pick's corners ``[(h, w, weight)]`` (``b`` is the RoI's).
    """
    x = numpy.asarray(input, dtype=numpy.float64)
    n, c, height, width = x.shape
    pooled_h, pooled_w = pair(output_size)
    out = numpy.zeros((len(rois), c, pooled_h, pooled_w))
    picks = {}
    for k, row in enumerate(rois):
        b = batch_index(row, n)
        if b is None:
            continue
        y0, x0, bin_h, bin_w, grid_h, grid_w = roi_align_geometry(
            row, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
        )
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                for ch in range(c):
                    best, corners = None, None
                    for y in sample_points(y0, bin_h, grid_h, ph):
                        for xs in sample_points(x0, bin_w, grid_w, pw):
                            here = bilinear_corners(y, xs, height, width)
                            with numpy.errstate(invalid="ignore"):  # 0 * inf is NaN
                                value = sum(wt * x[b, ch, h, w] for h, w, wt in here)
                            if (
                                best is None
                                or value > best
                                or (math.isnan(value) and not math.isnan(best))
                            ):
                                best, corners = value, here
                    if best is None:  # no sample at all
                        continue
                    out[k, ch, ph, pw] = best
                    if corners:
                        picks[k, ch, ph, pw] = corners
    return out, picks


def roi_align_max_ref(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = False,
) -> numpy.ndarray:
    """RoI Align forward in max mode (see :func:`roi_align_max_picks`): ``[K, C, PH, PW]``
    float64."""
    return roi_align_max_picks(input, rois, output_size, spatial_scale, sampling_ratio, aligned)[0]


def roi_align_max_backward_ref(
    grad_output: numpy.ndarray,
    input: numpy.ndarray,
    rois: numpy.ndarray,
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = False,
) -> numpy.ndarray:
    """RoI Align backward in max mode: each bin's gradient times each of its pick's four corner
    weights goes to that corner; nothing for an outside pick or a bin without samples.

    Returns:
        ndarray[N, C, H, W]: float64.
    """
    g = numpy.asarray(grad_output, dtype=numpy.float64)
    n = input.shape[0]
    _, picks = roi_align_max_picks(input, rois, g.shape[2:], spatial_scale, sampling_ratio, aligned)
    grad = numpy.zeros(input.shape)
    for (k, ch, ph, pw), corners in picks.items():
        b = batch_index(rois[k], n)
        for h, w, weight in corners:
            with numpy.errstate(invalid="ignore"):  # inf * 0 is NaN
                grad[b, ch, h, w] += g[k, ch, ph, pw] * weight
    return grad


# ----------------------------------------------------------------------------- multi-scale RoI Align
LEVEL_EPS = 1e-6  # torchvision's LevelMapper eps


def pyramid_level(scale: float) -> int:
    """A map's pyramid level ``k = int(-log2(scale))``, the scale and its log2 in float32."""
    return int(-float(numpy.float32(math.log2(float(numpy.float32(scale))))))


def level_of_q(
    q: float,
    spatial_scales: list[float],
    canonical_level: int,
    compute: numpy.dtype,
) -> int | None:
    """The level index of a box with ``q = sqrt(area) / canonical_scale`` (a value of the compute
    dtype), None for no map: ``clamp(floor(canonical_level + log2(q) + eps), k_min, k_max) -
    k_min``, each step rounded to the compute dtype, log2 rounded to nearest."""
    t = numpy.dtype(compute).type
    q = t(q)
    if math.isnan(q):
        return None
    log2 = t(math.log2(q)) if q > 0 else t(-math.inf)
    with numpy.errstate(over="ignore"):
        v = t(t(t(canonical_level) + log2) + t(LEVEL_EPS))
    raw = math.floor(v) if math.isfinite(v) else float(v)
    k_min, k_max = pyramid_level(spatial_scales[0]), pyramid_level(spatial_scales[-1])
    level = int(min(max(raw, k_min), k_max)) - k_min  # torch.clamp: max wins over min
    return level if 0 <= level < len(spatial_scales) else None


def box_level(
    row: numpy.ndarray,
    spatial_scales: list[float],
    canonical_scale: int,
    canonical_level: int,
    compute: numpy.dtype,
) -> int | None:
    """The level index of RoI row ``(b, x1, y1, x2, y2)``, None for no map. With one level every
    box is pooled from it. The area, its square root and the division are in the compute dtype
    (the row is first converted to it)."""
    if len(spatial_scales) == 1:
        return 0
    t = numpy.dtype(compute).type
    x1, y1, x2, y2 = (t(v) for v in row[1:5])
    with numpy.errstate(invalid="ignore", over="ignore"):  # negative area: NaN
        q = numpy.sqrt(t(t(x2 - x1) * t(y2 - y1))) / t(canonical_scale)
    return level_of_q(q, spatial_scales, canonical_level, compute)


def multi_scale_roi_align_ref(
    inputs: list[numpy.ndarray],
    rois: numpy.ndarray,
    output_size: int | tuple[int, int],
    spatial_scales: list[float],
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = False,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    compute: numpy.dtype = numpy.dtype(numpy.float64),
) -> numpy.ndarray:
    """Multi-scale RoI Align forward: each RoI through :func:`roi_align_ref` on its level.

    Returns:
        ndarray[K, C, PH, PW]: float64; zeros for a RoI without a level (and invalid RoIs).
    """
    pooled_h, pooled_w = pair(output_size)
    out = numpy.zeros((len(rois), inputs[0].shape[1], pooled_h, pooled_w))
    for k, row in enumerate(rois):
        level = box_level(row, spatial_scales, canonical_scale, canonical_level, compute)
        if level is not None:
            out[k] = roi_align_ref(
                inputs[level], rois[k : k + 1], output_size, spatial_scales[level],
                sampling_ratio, aligned,
            )[0]
    return out


def multi_scale_roi_align_backward_ref(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shapes: list[tuple[int, int, int, int]],
    spatial_scales: list[float],
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = False,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    compute: numpy.dtype = numpy.dtype(numpy.float64),
) -> list[numpy.ndarray]:
    """Multi-scale RoI Align backward: each RoI's gradient through :func:`roi_align_backward_ref`
    into its level's map.

    Returns:
        list of ndarray[N, C, H_l, W_l]: float64.
    """
    grads = [numpy.zeros(shape) for shape in input_shapes]
    for k, row in enumerate(rois):
        level = box_level(row, spatial_scales, canonical_scale, canonical_level, compute)
        if level is not None:
            grads[level] += roi_align_backward_ref(
                grad_output[k : k + 1], rois[k : k + 1], input_shapes[level],
                spatial_scales[level], sampling_ratio, aligned,
            )
    return grads


# ----------------------------------------------------------------------------- RoI Align Rotated
def rotation(degrees: float) -> tuple[float, float]:
    """``(cos, sin)`` of a turn in degrees: reduced exactly to ``a = fmod(angle, 360)`` moved
    into ``[-180, 180]``, then to ``r = a - 90 q`` with ``q = trunc(a / 90)``; cos and sin of
    ``pi * (r / 180)``, then q quarter turns."""
    a = math.fmod(degrees, 360.0)
    a = a - 360.0 if a > 180.0 else a + 360.0 if a < -180.0 else a
    q = math.trunc(a / 90.0)
    t = math.pi * ((a - 90.0 * q) / 180.0)
    c, s = math.cos(t), math.sin(t)
    return [(c, s), (-s, c), (-c, -s), (s, -c)][q % 4]


def roi_align_rotated_geometry(
    row: numpy.ndarray,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int | tuple[int, int],
    aligned: bool,
    clockwise: bool,
) -> tuple[float, float, float, float, float, float, float, float, int, int]:
    """``(cy, cx, cos, sin, start_y, start_x, bin_h, bin_w, grid_h, grid_w)`` of a rotated RoI
    row ``(batch_index, cx, cy, w, h, angle)``: the centre on the map, the turn, and the box's
    own axes measured from its centre (grid sizes may be <= 0)."""
    offset = 0.5 if aligned else 0.0
    cx = float(row[1]) * spatial_scale - offset
    cy = float(row[2]) * spatial_scale - offset
    roi_w = float(row[3]) * spatial_scale
    roi_h = float(row[4]) * spatial_scale
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    cos, sin = rotation(-float(row[5]) if clockwise else float(row[5]))
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    sampling_h, sampling_w = (
        (sampling_ratio, sampling_ratio) if isinstance(sampling_ratio, int) else sampling_ratio
    )
    grid_h = sampling_h if sampling_h > 0 else math.ceil(roi_h / pooled_h)
    grid_w = sampling_w if sampling_w > 0 else math.ceil(roi_w / pooled_w)
    return cy, cx, cos, sin, -roi_h / 2, -roi_w / 2, bin_h, bin_w, grid_h, grid_w


def rotated_samples(ph, pw, geometry) -> list[tuple[float, float]]:
    """The map positions ``(y, x)`` of bin ``(ph, pw)``'s samples, row by row."""
    cy, cx, cos, sin, start_y, start_x, bin_h, bin_w, grid_h, grid_w = geometry
    points = []
    for yy in sample_points(start_y, bin_h, grid_h, ph):
        for xx in sample_points(start_x, bin_w, grid_w, pw):
            points.append((yy * cos - xx * sin + cy, yy * sin + xx * cos + cx))
    return points


def roi_align_rotated_ref(
    input: numpy.ndarray,
    rois: numpy.ndarray,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = True,
    clockwise: bool = False,
) -> numpy.ndarray:
    """RoI Align Rotated forward.

    Args:
        input (ndarray[N, C, H, W]): features, any float dtype.
        rois (ndarray[K, 6]): ``(batch_index, cx, cy, w, h, angle)`` rows, angles in degrees.
        output_size, spatial_scale, sampling_ratio: as for :func:`roi_align_ref`.
        aligned (bool): Default: True.
        clockwise (bool): Default: False.

    Returns:
        ndarray[K, C, PH, PW]: float64. Invalid RoIs give zeros.
    """
    x = numpy.asarray(input, dtype=numpy.float64)
    n, c, height, width = x.shape
    pooled_h, pooled_w = pair(output_size)
    out = numpy.zeros((len(rois), c, pooled_h, pooled_w))
    for k, row in enumerate(rois):
        b = batch_index(row, n)
        if b is None:
            continue
        geometry = roi_align_rotated_geometry(
            row, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, clockwise
        )
        count = max(geometry[8] * geometry[9], 1)  # outside samples are counted too
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                total = numpy.zeros(c)
                for y, xs in rotated_samples(ph, pw, geometry):
                    for h, w, weight in bilinear_corners(y, xs, height, width):
                        total += weight * x[b, :, h, w]
                out[k, :, ph, pw] = total / count
    return out


def roi_align_rotated_backward_ref(
    grad_output: numpy.ndarray,
    rois: numpy.ndarray,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int | tuple[int, int] = -1,
    aligned: bool = True,
    clockwise: bool = False,
) -> numpy.ndarray:
    """RoI Align Rotated backward: the gradient with respect to the input.

    Args:
        grad_output (ndarray[K, C, PH, PW]): any float dtype.
        rois (ndarray[K, 6]): as for :func:`roi_align_rotated_ref`.
        input_shape ((int, int, int, int)): ``(N, C, H, W)``.
        spatial_scale, sampling_ratio, aligned, clockwise: as for :func:`roi_align_rotated_ref`.

    Returns:
        ndarray[N, C, H, W]: float64. Invalid RoIs contribute nothing.
    """
    g = numpy.asarray(grad_output, dtype=numpy.float64)
    n, c, height, width = input_shape
    pooled_h, pooled_w = g.shape[2], g.shape[3]
    grad = numpy.zeros((n, c, height, width))
    for k, row in enumerate(rois):
        b = batch_index(row, n)
        if b is None:
            continue
        geometry = roi_align_rotated_geometry(
            row, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, clockwise
        )
        count = geometry[8] * geometry[9]  # no max(., 1): no sample, no loop iteration
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                for y, xs in rotated_samples(ph, pw, geometry):
                    for h, w, weight in bilinear_corners(y, xs, height, width):
                        grad[b, :, h, w] += g[k, :, ph, pw] * weight / count
    return grad


# ----------------------------------------------------------------------------- RoI Align, vectorised
def axis_weights_capped(start, bin_size, grid, pooled, length):
    """``[pooled, length]`` 1-D weights as reference.axis_weights, vectorised, with the grid
    capped at 2**20 (docs/semantics.md)."""
    grid = min(grid, 2**20)
    a = numpy.zeros((pooled, length))
    for p in range(pooled):
        t = start + p * bin_size + (numpy.arange(grid) + 0.5) * bin_size / grid
        t = t[(t >= -1) & (t <= length)]
        v = numpy.maximum(t, 0)
        lo = numpy.floor(v).astype(numpy.int64)
        snapped = lo >= length - 1
        lo = numpy.where(snapped, length - 1, lo)
        frac = numpy.where(snapped, 0.0, v - lo)
        numpy.add.at(a[p], lo, (1 - frac) / grid)
        numpy.add.at(a[p], numpy.minimum(lo + 1, length - 1), frac / grid)
    return a


def separable(row, shape, output_size, spatial_scale, sampling_ratio, aligned):
    """``(b, Ay, Ax)`` of one RoI as reference.roi_align_separable, for sample counts beyond
    its loops."""
    pooled_h, pooled_w = numpy.broadcast_to(output_size, 2)
    n, _, h, w = shape
    b = int(row[0])
    if not (numpy.isfinite(row).all() and 0 <= b < n):
        return None, None, None
    y0, x0, bin_h, bin_w, gh, gw = roi_align_geometry(
        row, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
    )
    if gh <= 0 or gw <= 0:
        return b, numpy.zeros((pooled_h, h)), numpy.zeros((pooled_w, w))
    return (b, axis_weights_capped(y0, bin_h, gh, pooled_h, h),
            axis_weights_capped(x0, bin_w, gw, pooled_w, w))


def separable_expected(x, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """The float64 forward through the separable form."""
    out = numpy.zeros((len(rois), x.shape[1]) + tuple(numpy.broadcast_to(output_size, 2)))
    for k, row in enumerate(numpy.asarray(rois, numpy.float64)):
        b, ay, ax = separable(row, x.shape, output_size, spatial_scale, sampling_ratio, aligned)
        if b is not None:
            out[k] = ay @ x[b].astype(numpy.float64) @ ax.T
    return out


def separable_backward_expected(g, rois, shape, output_size, spatial_scale, sampling_ratio,
                                aligned):
    """The float64 input gradient through the separable form: ``Ay.T @ g[k] @ Ax`` per RoI."""
    grad = numpy.zeros(shape)
    for k, row in enumerate(numpy.asarray(rois, numpy.float64)):
        b, ay, ax = separable(row, shape, output_size, spatial_scale, sampling_ratio, aligned)
        if b is not None:
            grad[b] += ay.T @ numpy.asarray(g[k], numpy.float64) @ ax
    return grad
