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
