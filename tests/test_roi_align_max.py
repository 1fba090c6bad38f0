"""roi_align(mode="max") and its backward: every backend against the float64 reference, the edge
facts of docs/semantics.md ("RoI Align, max mode") by hand, mmcv's cases, the argument checks,
the NumPy backend's slicing, and the adapters (torch, JAX, dask, the babilim layer)."""
from __future__ import annotations

import functools
import time

import numpy
import pytest
from conftest import (
    DTYPES,
    Backend,
    SAMPLING_RATIOS,
    TOLERANCE,
    assert_matches,
    availability,
    compute_dtype,
    image_major,
    make_rng,
    per_image,
    random_boxes,
    random_features,
)
from reference import (
    roi_align_max_backward_ref,
    roi_align_max_ref,
    roi_align_ref,
)

import roi_cupy

DTYPE_IDS = lambda d: numpy.dtype(d).name  # noqa: E731


def run(backend, x, boxes, output_size, contiguous=True, **kwargs):
    """roi_align(mode="max") on ``backend`` with NumPy ``x`` and boxes ([K, 5] or a list)."""
    if isinstance(boxes, list):
        boxes = [backend.asarray(b) for b in boxes]
    else:
        boxes = backend.asarray(boxes)
    with backend.active():
        out = roi_cupy.roi_align(
            backend.features(x, contiguous), boxes, output_size, mode="max", **kwargs
        )
    return backend.to_numpy(out)


def run_backward(backend, g, x, rois, output_size, contiguous=True, **kwargs):
    """roi_align_backward(mode="max") on ``backend``; ``x`` is the forward's input."""
    with backend.active():
        grad = roi_cupy.roi_align_backward(
            backend.features(g, contiguous), backend.asarray(rois), x.shape, output_size,
            mode="max", input=backend.features(x, contiguous), **kwargs,
        )
    return backend.to_numpy(grad)


def plane(h=4, w=4, dtype=numpy.float64):
    """One image, two channels: ``10 * row + col`` and its negative minus one."""
    base = 10.0 * numpy.arange(h)[:, None] + numpy.arange(w)[None, :]
    return numpy.stack([base, -base - 1.0])[None].astype(dtype)


# ----------------------------------------------------------------------------- the oracle itself
def test_reference_hand_values():
    """Box x in [0, 12], y in [0, 2] on the 4 x 4 plane, one bin, 2 x 2 samples (unaligned):
    y in {0.5, 1.5}, x in {3 (snapped to column 3), 9 (outside)}. Channel 0 reads 8 and 18 and
    two outside zeros: 18. Channel 1 reads -9 and -19: the outside sample's 0 is the maximum,
    and it passes no gradient."""
    x = plane()
    rois = numpy.array([[0, 0, 0, 12, 2]], dtype=numpy.float64)
    assert roi_align_max_ref(x, rois, 1, sampling_ratio=2).ravel().tolist() == [18.0, 0.0]
    grad = roi_align_max_backward_ref(numpy.ones((1, 2, 1, 1)), x, rois, sampling_ratio=2)
    expected = numpy.zeros((1, 2, 4, 4))
    expected[0, 0, 1, 3] = expected[0, 0, 2, 3] = 0.5  # y = 1.5 between rows 1 and 2
    numpy.testing.assert_array_equal(grad, expected)


# ----------------------------------------------------------------------------- the parameter grid
@functools.cache
def grid_case(dtype_name, aligned, sampling_ratio):
    dtype = numpy.dtype(dtype_name)
    rng = make_rng("align max grid", dtype_name, aligned, sampling_ratio)
    n, c, h, w = 2, 3, 10, 12
    x = random_features(rng, (n, c, h, w), dtype)
    rois = random_boxes(rng, n, 7, h, w, 0.5, dtype=compute_dtype(dtype))
    g = random_features(rng, (7, c, 3, 4), dtype)
    expected = roi_align_max_ref(x, rois, (3, 4), 0.5, sampling_ratio, aligned)
    grad = roi_align_max_backward_ref(g, x, rois, 0.5, sampling_ratio, aligned)
    return x, rois, g, expected, grad


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS, ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_matches_reference(backend, dtype, aligned, sampling_ratio, contiguous):
    x, rois, _, expected, _ = grid_case(numpy.dtype(dtype).name, aligned, sampling_ratio)
    out = run(backend, x, rois, (3, 4), contiguous, spatial_scale=0.5,
              sampling_ratio=sampling_ratio, aligned=aligned)
    assert_matches(out, expected, dtype, (7, 3, 3, 4))


@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS, ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_matches_reference(backend, dtype, aligned, sampling_ratio):
    x, rois, g, _, expected = grid_case(numpy.dtype(dtype).name, aligned, sampling_ratio)
    grad = run_backward(backend, g, x, rois, (3, 4), spatial_scale=0.5,
                        sampling_ratio=sampling_ratio, aligned=aligned)
    assert_matches(grad, expected, dtype, x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_reads_strided_arrays(backend, dtype):
    """grad_output and input as strided views (whose skipped columns hold NaN)."""
    x, rois, g, _, expected = grid_case(numpy.dtype(dtype).name, True, 2)
    grad = run_backward(backend, g, x, rois, (3, 4), contiguous=False, spatial_scale=0.5,
                        sampling_ratio=2, aligned=True)
    assert_matches(grad, expected, dtype, x.shape)


@pytest.mark.parametrize("sampling_ratio", [-1, 2, (1, 3)], ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=DTYPE_IDS)
def test_adjoint_with_the_picks_held(backend, dtype, aligned, sampling_ratio):
    """With each bin's pick fixed the output is linear in the input, a weighted sum of the
    pick's corners: <roi_align(x), g> == <x, roi_align_backward(g)>."""
    x, rois, g, _, _ = grid_case(numpy.dtype(dtype).name, aligned, sampling_ratio)
    kwargs = dict(spatial_scale=0.5, sampling_ratio=sampling_ratio, aligned=aligned)
    out = run(backend, x, rois, (3, 4), **kwargs).astype(numpy.float64)
    grad = run_backward(backend, g, x, rois, (3, 4), **kwargs).astype(numpy.float64)
    lhs = float((out * g.astype(numpy.float64)).sum())
    terms = x.astype(numpy.float64) * grad
    assert numpy.abs(terms).sum() > 0
    assert abs(lhs - terms.sum()) <= TOLERANCE[numpy.dtype(dtype)] * numpy.abs(terms).sum()


@pytest.mark.parametrize("sampling_ratio", [-1, 2, (1, 3)], ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
def test_finite_differences(backend, aligned, sampling_ratio):
    """Central differences of <roi_align(x), g> match the backward. The output is piecewise
    linear in x; random features keep every pick clear of a tie by far more than eps, so the
    differences are exact up to rounding."""
    rng = make_rng("align max fd", aligned, sampling_ratio)
    shape = (2, 2, 5, 6)
    x = random_features(rng, shape, numpy.float64)
    rois = random_boxes(rng, 2, 4, 5, 6)
    g = random_features(rng, (4, 2, 2, 3), numpy.float64)
    kwargs = dict(sampling_ratio=sampling_ratio, aligned=aligned)
    grad = run_backward(backend, g, x, rois, (2, 3), **kwargs)
    eps = 1e-6
    numeric = numpy.empty(shape)
    for i in numpy.ndindex(shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += eps
        minus[i] -= eps
        up = (run(backend, plus, rois, (2, 3), **kwargs) * g).sum()
        down = (run(backend, minus, rois, (2, 3), **kwargs) * g).sum()
        numeric[i] = (up - down) / (2 * eps)
    assert numpy.abs(numeric).max() > 0
    numpy.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_boxes_as_per_image_list(backend, dtype):
    rng = make_rng("align max list", numpy.dtype(dtype).name)
    x = random_features(rng, (3, 2, 8, 9), dtype)
    rois = random_boxes(rng, 3, 8, 8, 9, dtype=compute_dtype(dtype))
    rois[:, 0] = [0, 2, 0, 2, 2, 0, 0, 2]
    out = run(backend, x, per_image(rois, 3), 2, sampling_ratio=2)
    assert_matches(out, roi_align_max_ref(x, image_major(rois), 2, sampling_ratio=2), dtype)


# ----------------------------------------------------------------------------- avg is untouched
def test_avg_mode_is_the_default_bit_for_bit(backend):
    """mode="avg" is today's roi_align: the same bits as no mode, and the backward ignores an
    input it is given."""
    x, rois, g, _, _ = grid_case("float32", True, -1)
    with backend.active():
        xs, rs, gs = backend.asarray(x), backend.asarray(rois), backend.asarray(g)
        plain = roi_cupy.roi_align(xs, rs, (3, 4), 0.5, -1, True)
        avg = roi_cupy.roi_align(xs, rs, (3, 4), 0.5, -1, True, mode="avg")
        back = roi_cupy.roi_align_backward(gs, rs, x.shape, (3, 4), 0.5, -1, True)
        back_avg = roi_cupy.roi_align_backward(
            gs, rs, x.shape, (3, 4), 0.5, -1, True, mode="avg", input=xs
        )
    assert backend.to_numpy(plain).tobytes() == backend.to_numpy(avg).tobytes()
    assert backend.to_numpy(back).tobytes() == backend.to_numpy(back_avg).tobytes()
    assert_matches(backend.to_numpy(avg), roi_align_ref(x, rois, (3, 4), 0.5, -1, True),
                   numpy.float32)


# ----------------------------------------------------------------------------- edge facts by hand
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_outside_samples_read_zero(backend, dtype):
    """test_reference_hand_values on the backends: 18 for channel 0, and for channel 1 the
    outside sample's 0, which passes no gradient."""
    x = plane(dtype=dtype)
    rois = numpy.array([[0, 0, 0, 12, 2]], dtype=compute_dtype(dtype))
    out = run(backend, x, rois, 1, sampling_ratio=2)
    assert_matches(out, numpy.array([18.0, 0.0]).reshape(1, 2, 1, 1), dtype)
    grad = run_backward(backend, numpy.ones((1, 2, 1, 1), dtype), x, rois, 1, sampling_ratio=2)
    expected = numpy.zeros((1, 2, 4, 4))
    expected[0, 0, 1:3, 3] = 0.5
    assert_matches(grad, expected, dtype)


# (box, plane values by (row, col), output, gradient by (row, col)) on a 4 x 4 plane of -5,
# aligned, one bin of 2 x 2 samples, gradient 1. Each box puts some samples outside the map;
# an inside sample of value 0 and the first outside sample tie, and the first in row-major order
# is the pick.
TIES_WITH_OUTSIDE = [
    # x in {3.5 -> column 3, 7.5 outside}, y in {0, 1}: samples (0,3), out, (1,3), out
    ((2, 0, 10, 2), {(0, 3): 0.0, (1, 3): -1.0}, 0.0, {(0, 3): 1.0}),    # inside (0, 0) first
    ((2, 0, 10, 2), {(0, 3): -1.0, (1, 3): 0.0}, 0.0, {}),               # outside (0, 1) first
    ((2, 0, 10, 2), {(0, 3): -1.0, (1, 3): 2.0}, 2.0, {(1, 3): 1.0}),    # inside, greater
    # y in {3.5 -> row 3, 7.5 outside}, x in {0, 1}: samples (3,0), (3,1), out, out
    ((0, 2, 2, 10), {(3, 0): -1.0, (3, 1): 0.0}, 0.0, {(3, 1): 1.0}),    # inside (0, 1) first
    # x in {-4.5 outside, -0.5 -> column 0}, y in {0, 1}: samples out, (0,0), out, (1,0)
    ((-6, 0, 2, 2), {(0, 0): 0.0, (1, 0): 0.0}, 0.0, {}),                # outside (0, 0) first
    ((-6, 0, 2, 2), {(0, 0): -1.0, (1, 0): 3.0}, 3.0, {(1, 0): 1.0}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", range(len(TIES_WITH_OUTSIDE)), ids=str)
def test_ties_with_outside_samples(backend, dtype, case):
    box, values, value, gradient = TIES_WITH_OUTSIDE[case]
    x = numpy.full((1, 1, 4, 4), -5.0)
    for (h, w), v in values.items():
        x[0, 0, h, w] = v
    x = x.astype(dtype)
    rois = numpy.array([[0, *box]], dtype=compute_dtype(dtype))
    out = run(backend, x, rois, 1, sampling_ratio=2, aligned=True)
    assert_matches(out, numpy.full((1, 1, 1, 1), value), dtype)
    grad = run_backward(backend, numpy.ones((1, 1, 1, 1), dtype), x, rois, 1, sampling_ratio=2,
                        aligned=True)
    expected = numpy.zeros((1, 1, 4, 4))
    for (h, w), v in gradient.items():
        expected[0, 0, h, w] = v
    assert_matches(grad, expected, dtype, scale=1.0)
    assert_matches(out, roi_align_max_ref(x, rois, 1, 1.0, 2, True), dtype)
    expected_ref = roi_align_max_backward_ref(numpy.ones((1, 1, 1, 1)), x, rois, 1.0, 2, True)
    numpy.testing.assert_array_equal(expected_ref, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_go_to_the_first_sample(backend, dtype):
    """A constant plane: every sample of the bin reads 2. The first, at (0.5, 0.5) for the box
    (0, 0, 4, 4) aligned with 2 x 2 samples, takes the whole gradient: a quarter to each of
    pixels (0, 0), (0, 1), (1, 0), (1, 1)."""
    x = numpy.full((1, 1, 4, 4), 2.0, dtype=dtype)
    rois = numpy.array([[0, 0, 0, 4, 4]], dtype=compute_dtype(dtype))
    assert_matches(run(backend, x, rois, 1, sampling_ratio=2, aligned=True),
                   numpy.full((1, 1, 1, 1), 2.0), dtype)
    grad = run_backward(backend, numpy.ones((1, 1, 1, 1), dtype), x, rois, 1, sampling_ratio=2,
                        aligned=True)
    expected = numpy.zeros((1, 1, 4, 4))
    expected[0, 0, :2, :2] = 0.25
    assert_matches(grad, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_finite_features(backend, dtype):
    """NaN is the largest value and +inf beats every number; a non-finite pixel read at weight 0
    makes its sample NaN (0 * inf). On the 6 x 6 plane 10 h + w, box (0, 0, 6, 6) unaligned,
    2 x 2 bins of 2 x 2 samples at 0.75, 2.25 | 3.75, 5.25 (snapped to 5):
    -inf at (1, 1) makes sample (0.75, 0.75) -inf, and bin (0, 0) keeps a finite maximum;
    +inf at (1, 4) makes bin (0, 1) +inf; +inf at (5, 0), read at weight 0 by the snapped row
    5.25, makes bin (1, 0) NaN; NaN at (4, 4) makes bin (1, 1) NaN. Each bin's gradient goes to
    its pick's corners."""
    x = plane(6, 6)[:, :1]
    x[0, 0, 1, 1], x[0, 0, 1, 4], x[0, 0, 5, 0] = -numpy.inf, numpy.inf, numpy.inf
    x[0, 0, 4, 4] = numpy.nan
    x = x.astype(dtype)
    rois = numpy.array([[0, 0, 0, 6, 6]], dtype=compute_dtype(dtype))
    out = run(backend, x, rois, 2, sampling_ratio=2)
    expected = roi_align_max_ref(x, rois, 2, 1.0, 2, False)
    assert numpy.isfinite(expected[0, 0, 0, 0]) and expected[0, 0, 0, 1] == numpy.inf
    assert numpy.isnan(expected[0, 0, 1]).all()
    assert_matches(out, expected, dtype)
    g = numpy.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2).astype(dtype)
    grad = run_backward(backend, g, x, rois, 2, sampling_ratio=2)
    expected = roi_align_max_backward_ref(g, x, rois, 1.0, 2, False)
    # 4 corners for each of the 4 picks, pixel (3, 3) shared by bins (0, 0) and (1, 1)
    assert numpy.isfinite(expected).all() and numpy.count_nonzero(expected) == 13
    assert_matches(grad, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_finite_gradient_reaches_the_picks_corners(backend, dtype):
    x, rois, g, _, _ = grid_case(numpy.dtype(dtype).name, False, 2)
    g = g.copy()
    g[0, 0, 0, 0], g[1, 1, 1, 1] = numpy.nan, numpy.inf
    grad = run_backward(backend, g, x, rois, (3, 4), spatial_scale=0.5, sampling_ratio=2)
    assert_matches(grad, roi_align_max_backward_ref(g, x, rois, 0.5, 2, False), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bins_outside_the_map_and_without_samples(backend, dtype):
    """A box wholly outside the map reads only outside samples: 0, and no gradient, on a
    plane of negative and of positive values. An aligned box of zero size with adaptive
    sampling has no sample at all: 0 as well."""
    x = numpy.stack([numpy.full((4, 4), -3.0), numpy.full((4, 4), 3.0)])[None].astype(dtype)
    rois = numpy.array([
        [0, 6, 6, 9, 9], [0, -9, 1, -3, 3],  # outside, below/right and left
        [0, 2, 1, 2, 1], [0, 1, 3, 3, 1],    # zero size and reversed in y: no sample
    ], dtype=compute_dtype(dtype))
    out = run(backend, x, rois, 2, aligned=True)
    assert_matches(out, numpy.zeros((4, 2, 2, 2)), dtype)
    assert_matches(out, roi_align_max_ref(x, rois, 2, aligned=True), dtype)
    grad = run_backward(backend, numpy.ones((4, 2, 2, 2), dtype), x, rois, 2, aligned=True)
    assert_matches(grad, numpy.zeros(x.shape), dtype)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=DTYPE_IDS)
def test_huge_adaptive_grid(backend, dtype):
    """A 10^4-pixel box on a 4 x 4 map, adaptive: 10^4 x 10^4 samples at i + 0.5, of which only
    those at 0.5 ... 3.5 are inside. On ones the maximum is 1, first reached at (0.5, 0.5),
    whose corners take a quarter each; on -1 it is an outside sample's 0."""
    rois = numpy.array([[0, 0, 0, 1e4, 1e4]], dtype)
    ones = numpy.ones((1, 1, 4, 4), dtype)
    assert_matches(run(backend, ones, rois, 1), numpy.ones((1, 1, 1, 1)), dtype)
    assert_matches(run(backend, -ones, rois, 1), numpy.zeros((1, 1, 1, 1)), dtype)
    grad = run_backward(backend, numpy.ones((1, 1, 1, 1), dtype), ones, rois, 1)
    expected = numpy.zeros((1, 1, 4, 4))
    expected[0, 0, :2, :2] = 0.25
    assert_matches(grad, expected, dtype)
    assert_matches(run_backward(backend, numpy.ones((1, 1, 1, 1), dtype), -ones, rois, 1),
                   numpy.zeros((1, 1, 4, 4)), dtype)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=DTYPE_IDS)
def test_hundreds_of_samples_per_bin(backend, dtype):
    """16 x 20 samples in each of 2 x 1 bins, one of them NaN in channel 1 (the NumPy backend
    searches bins of 256 samples or more with argmax, and shorter ones by comparison)."""
    rng = make_rng("align max many samples", numpy.dtype(dtype).name)
    x = random_features(rng, (1, 2, 12, 14), dtype)
    x[0, 1, 7, 5] = numpy.nan
    rois = numpy.array([[0, 0.3, 0.6, 13.2, 11.1], [0, 2.1, 1.7, 9.4, 10.9]], dtype)
    out = run(backend, x, rois, (2, 1), sampling_ratio=(16, 20), aligned=True)
    expected = roi_align_max_ref(x, rois, (2, 1), 1.0, (16, 20), True)
    assert numpy.isnan(expected[:, 1]).any()
    assert_matches(out, expected, dtype)
    g = random_features(rng, out.shape, dtype)
    grad = run_backward(backend, g, x, rois, (2, 1), sampling_ratio=(16, 20), aligned=True)
    assert_matches(grad, roi_align_max_backward_ref(g, x, rois, 1.0, (16, 20), True), dtype)


def dense_bin_max(plane, y0, y1, x0, x1):
    """The largest value of the bilinear interpolant of ``plane`` [H, W] over the rectangle
    ``[y0, y1] x [x0, x1]`` (integer edges), 0 included where it reaches past ``[-1, H] x
    [-1, W]``, and the pixel holding it (None for 0): bilinear interpolation is a convex
    combination of the pixels around a point, so its maximum over such a rectangle is a pixel
    inside it (or the edge pixel a point in [-1, 0) or (H - 1, H] snaps to)."""
    h, w = plane.shape
    rows = slice(max(0, min(h - 1, y0)), min(h - 1, max(0, y1)) + 1)
    cols = slice(max(0, min(w - 1, x0)), min(w - 1, max(0, x1)) + 1)
    window = plane[rows, cols].astype(numpy.float64)
    best = numpy.unravel_index(numpy.argmax(window), window.shape)
    value, at = window[best], (rows.start + best[0], cols.start + best[1])
    if (y0 < -1 or y1 > h or x0 < -1 or x1 > w) and value < 0:
        return 0.0, None
    return value, at


@pytest.mark.parametrize("sampling_ratio", [10**9, (2**20, 2**19)], ids=str)
def test_any_sampling_ratio_is_bounded_work(backend, sampling_ratio):
    """sampling_ratio=10**9 (capped at 2**20 per axis: 2**40 samples a bin, days one by one):
    a bin's candidates follow the pixels it covers, so a call takes a fraction of a second.
    Samples this dense come within 1e-5 of every point of a bin, so each bin holds its
    rectangle's largest value (a pixel, or an outside sample's 0) and passes its gradient
    (nearly) whole to that pixel."""
    rng = make_rng("align max bounded work", str(sampling_ratio))
    x = random_features(rng, (1, 2, 11, 13), numpy.float32)
    x[0, 1] = -numpy.abs(x[0, 1]) - 0.125  # where a bin has outside samples, they win
    # aligned=True: bins with integer edges, y in [0, 10] and x in [0, 12] for the first box;
    # the second reaches past the left and right edges of the map (outside samples, snapping).
    rois = numpy.array([[0, 0.5, 0.5, 12.5, 10.5], [0, -3.5, 1.5, 20.5, 9.5]], numpy.float32)
    start = time.monotonic()
    out = run(backend, x, rois, (2, 3), sampling_ratio=sampling_ratio, aligned=True)
    g = random_features(rng, out.shape, numpy.float32)
    grad = run_backward(backend, g, x, rois, (2, 3), sampling_ratio=sampling_ratio, aligned=True)
    assert time.monotonic() - start < 60
    expected, expected_grad = numpy.zeros(out.shape), numpy.zeros(x.shape)
    for k, (y0, x0, hb, wb) in enumerate([(0, 0, 5, 4), (1, -4, 4, 8)]):
        for c, ph, pw in numpy.ndindex(2, 2, 3):
            top, left = y0 + ph * hb, x0 + pw * wb
            value, at = dense_bin_max(x[0, c], top, top + hb, left, left + wb)
            expected[k, c, ph, pw] = value
            if at is not None:
                expected_grad[0, c][at] += g[k, c, ph, pw]
    assert (expected == 0).any() and (expected != 0).any()
    numpy.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)
    numpy.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_numpy_and_the_kernels_pick_the_same_samples(dtype):
    """The NumPy backend and the kernels find the same candidates and picks, bit for bit, on
    features full of ties (values in steps of 1/4) and NaN and infinities, boxes of every kind
    and up to 2**20 samples per axis; the gradients (random) agree to rounding, so the picks'
    corners are the same."""
    ok, why = availability("emulator")
    if not ok:
        pytest.skip(f"the emulator is not available: {why}")
    rng = make_rng("align max numpy and kernels", numpy.dtype(dtype).name)
    x = (numpy.round(random_features(rng, (2, 3, 9, 11), numpy.float64) * 4) / 4).astype(dtype)
    x[1, 2, 4, 5], x[0, 1, 8, 0], x[1, 0, 3, 3] = numpy.nan, numpy.inf, -numpy.inf
    rois = random_boxes(rng, 2, 21, 9, 11, dtype=compute_dtype(dtype))
    for sampling_ratio in [(37, 3), (-1, 11), (5, -1), 10**9, (2**20, 3)]:
        args = dict(sampling_ratio=sampling_ratio, aligned=True, spatial_scale=0.75)
        out = {}
        g = random_features(rng, (len(rois), 3, 3, 2), dtype)
        for name in ("numpy", "emulator"):
            backend = Backend(name)
            out[name] = run(backend, x, rois, (3, 2), **args)
            out[name + " grad"] = run_backward(backend, g, x, rois, (3, 2), **args)
        numpy.testing.assert_array_equal(out["numpy"], out["emulator"])
        numpy.testing.assert_allclose(out["numpy grad"].astype(numpy.float64),
                                      out["emulator grad"].astype(numpy.float64),
                                      rtol=0, atol=TOLERANCE[numpy.dtype(dtype)] * 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_invalid_rois_give_zeros_and_no_gradient(backend, dtype):
    rng = make_rng("align max invalid", numpy.dtype(dtype).name)
    x = random_features(rng, (2, 2, 6, 6), dtype)
    valid = numpy.array([[0, 0.3, 0.7, 4.2, 5.1], [1.9, 1.1, 0.2, 5.5, 3.3]])
    invalid = numpy.array([
        [-1, 1, 1, 4, 4], [2, 1, 1, 4, 4], [1e20, 1, 1, 4, 4], [-1.5, 1, 1, 4, 4],
        [0, numpy.nan, 1, 4, 4], [1, 1, 1, numpy.inf, 4], [numpy.nan, 1, 1, 4, 4],
    ])
    rois = numpy.concatenate([valid, invalid]).astype(compute_dtype(dtype))
    out = run(backend, x, rois, 2, sampling_ratio=2, validate=False)
    expected = roi_align_max_ref(x, rois, 2, 1.0, 2, False)
    assert not expected[2:].any() and expected[:2].any()
    assert_matches(out, expected, dtype)
    g = random_features(rng, out.shape, dtype)
    grad = run_backward(backend, g, x, rois, 2, sampling_ratio=2, validate=False)
    expected = roi_align_max_backward_ref(g[:2], x, rois[:2], 1.0, 2, False)
    assert_matches(grad, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "case", ["no rois", "no channels", "empty lists", "zero height", "zero width", "no images"]
)
def test_empty_inputs(backend, case, dtype):
    rng = make_rng("align max empty", case)
    shape = {"no channels": (2, 0, 5, 5), "zero height": (2, 3, 0, 5), "zero width": (2, 3, 5, 0),
             "no images": (0, 3, 5, 5)}.get(case, (2, 3, 5, 5))
    x = random_features(rng, shape, dtype)
    rois = random_boxes(rng, 2, 3, 5, 5, dtype=compute_dtype(dtype))
    if case in ("no rois", "no images"):
        rois = rois[:0]
    boxes = [rois[:0, 1:], rois[:0, 1:]] if case == "empty lists" else rois
    out = run(backend, x, boxes, (2, 3), sampling_ratio=2)
    k = 0 if case in ("no rois", "empty lists", "no images") else 3
    assert_matches(out, numpy.zeros((k, x.shape[1], 2, 3)), dtype)
    grad = run_backward(backend, numpy.ones(out.shape, dtype), x, image_major(rois)[:k], (2, 3),
                        sampling_ratio=2)
    assert_matches(grad, numpy.zeros(x.shape), dtype)


# ----------------------------------------------------------------------------- mmcv's cases
# mmcv's tests/test_ops/test_roi_align.py: three inputs, boxes (0, 0, 0, 1, 1) and (0, 0, 0, 3,
# 3), output 2 x 2, sampling_ratio 2, aligned=True, gradient ones. mmcv pins avg mode only
# (MMCV_AVG below are its numbers); the max-mode numbers are worked out here by hand with
# mmcv's rule (samples at -0.375, -0.125, 0.125, 0.375 for the 2 x 2 plane, -0.125, 0.625,
# 1.375, 2.125 for the 4 x 4 one; negative coordinates snap to 0).
MMCV_INPUTS = [
    ([[[[1.0, 2.0], [3.0, 4.0]]]], [[0.0, 0.0, 0.0, 1.0, 1.0]]),
    ([[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 3.0], [2.0, 1.0]]]], [[0.0, 0.0, 0.0, 1.0, 1.0]]),
    ([[[[1.0, 2.0, 5.0, 6.0], [3.0, 4.0, 7.0, 8.0], [9.0, 10.0, 13.0, 14.0],
        [11.0, 12.0, 15.0, 16.0]]]], [[0.0, 0.0, 0.0, 3.0, 3.0]]),
]
MMCV_AVG = [
    ([[[[1.0, 1.25], [1.5, 1.75]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1.0, 1.25], [1.5, 1.75]], [[4.0, 3.75], [3.5, 3.25]]]],
     [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1.9375, 4.75], [7.5625, 10.375]]]],
     [[[[0.47265625, 0.42968750, 0.42968750, 0.04296875],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.04296875, 0.03906250, 0.03906250, 0.00390625]]]]),
]
# Plane 1 is 1 + 2y + x on [0, 1]^2: each bin's largest sample is its last, (0.375, 0.375) in
# bin (1, 1) giving 2.125; bins (0, 0) and (0, 1) have both sample rows snapped to y = 0, so
# equal rows, and the first row is picked (pixel (0, 0) takes 1 from bin (0, 0), 0.625 from bins
# (0, 1) and (1, 0), 0.625^2 from bin (1, 1)). Plane 2 is 4 - 2y - x: each bin's first sample
# wins. Plane 3 rises along both axes: each bin's last sample, (0.625, 0.625) -> 2.875 etc.
MMCV_MAX = [
    ([[[[1.0, 1.375], [1.75, 2.125]]]],
     [[[[2.640625, 0.609375], [0.609375, 0.140625]]]]),
    ([[[[1.0, 1.375], [1.75, 2.125]], [[4.0, 3.875], [3.75, 3.625]]]],
     [[[[2.640625, 0.609375], [0.609375, 0.140625]],
       [[3.515625, 0.234375], [0.234375, 0.015625]]]]),
    ([[[[2.875, 6.375], [9.875, 13.375]]]],
     [[[[0.140625, 0.234375, 0.328125, 0.046875],
        [0.234375, 0.390625, 0.546875, 0.078125],
        [0.328125, 0.546875, 0.765625, 0.109375],
        [0.046875, 0.078125, 0.109375, 0.015625]]]]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", range(3), ids=str)
def test_mmcv_cases(backend, dtype, case):
    x = numpy.array(MMCV_INPUTS[case][0]).astype(dtype)
    rois = numpy.array(MMCV_INPUTS[case][1], dtype=compute_dtype(dtype))
    for mode, table in (("avg", MMCV_AVG), ("max", MMCV_MAX)):
        out_expected, grad_expected = (numpy.array(a) for a in table[case])
        with backend.active():
            xs, rs = backend.asarray(x), backend.asarray(rois)
            out = roi_cupy.roi_align(xs, rs, 2, 1.0, 2, True, mode=mode)
            grad = roi_cupy.roi_align_backward(
                backend.asarray(numpy.ones(out.shape, dtype)), rs, x.shape, 2, 1.0, 2, True,
                mode=mode, input=xs,
            )
        assert_matches(backend.to_numpy(out), out_expected, dtype)
        assert_matches(backend.to_numpy(grad), grad_expected, dtype)
    assert_matches(roi_align_max_ref(x, rois, 2, 1.0, 2, True), numpy.array(MMCV_MAX[case][0]),
                   numpy.float64)


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "mode, error, message",
    [
        (1, TypeError, "mode must be a str, 'avg' or 'max', got 1"),
        (None, TypeError, "mode must be a str, 'avg' or 'max', got None"),
        (b"max", TypeError, "mode must be a str, 'avg' or 'max', got b'max'"),
        ("mean", ValueError, "mode must be 'avg' or 'max', got 'mean'"),
        ("MAX", ValueError, "mode must be 'avg' or 'max', got 'MAX'"),
    ],
    ids=str,
)
def test_bad_modes_are_named(mode, error, message):
    x = numpy.zeros((1, 1, 4, 4), numpy.float32)
    rois = numpy.array([[0, 0, 0, 2, 2]], numpy.float32)
    with pytest.raises(error, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        roi_cupy.roi_align(x, rois, 2, mode=mode)
    with pytest.raises(error, match="^mode must be"):
        roi_cupy.roi_align_backward(numpy.zeros((1, 1, 2, 2), numpy.float32), rois, x.shape, 2,
                                    mode=mode, input=x)


def test_backward_needs_the_forward_input():
    x = numpy.zeros((1, 2, 4, 4), numpy.float32)
    rois = numpy.array([[0, 0, 0, 2, 2]], numpy.float32)
    g = numpy.zeros((1, 2, 2, 2), numpy.float32)
    with pytest.raises(TypeError, match=r"roi_align_backward\(mode='max'\) needs input"):
        roi_cupy.roi_align_backward(g, rois, x.shape, 2, mode="max")
    with pytest.raises(ValueError, match=r"input must have shape input_shape = \(1, 2, 4, 4\), "
                                         r"got \(1, 2, 4, 5\)"):
        roi_cupy.roi_align_backward(g, rois, x.shape, 2, mode="max",
                                    input=numpy.zeros((1, 2, 4, 5), numpy.float32))
    with pytest.raises(TypeError, match="input must have grad_output's dtype float32, got float64"):
        roi_cupy.roi_align_backward(g, rois, x.shape, 2, mode="max", input=x.astype(numpy.float64))
    with pytest.raises(ValueError, match=r"input must have shape \[N, C, H, W\]"):
        roi_cupy.roi_align_backward(g, rois, x.shape, 2, mode="max", input=x[0])
    with pytest.raises(TypeError, match="input must be a NumPy or CuPy array"):
        roi_cupy.roi_align_backward(g, rois, x.shape, 2, mode="max", input=x.tolist())


# ----------------------------------------------------------------------------- the NumPy slices
def test_numpy_slices_and_runs_do_not_show(monkeypatch):
    """Pairs evaluated a few at a time (so that bins span slices) and picks kept for one RoI at a
    time give the same bits as the defaults, forward and backward, and the reference."""
    from roi_cupy._numpy import roi_align as numpy_align

    rng = make_rng("align max slices")
    x = random_features(rng, (2, 3, 12, 13), numpy.float64)
    x[0, 1, 4, 4] = numpy.nan
    rois = random_boxes(rng, 2, 40, 12, 13)
    g = random_features(rng, (40, 3, 3, 2), numpy.float64)
    args = ((3, 2), 1.0, -1, True)

    def both():
        out = roi_cupy.roi_align(x, rois, *args, mode="max")
        grad = roi_cupy.roi_align_backward(g, rois, x.shape, *args, mode="max", input=x)
        return out, grad

    out, grad = both()
    monkeypatch.setattr(numpy_align, "_PAIR_BUDGET", 3 * numpy_align._PAIR_BYTES * 3)
    monkeypatch.setattr(numpy_align, "_PICK_BUDGET", 1)
    monkeypatch.setattr(numpy_align, "_TAPS", 5)
    small_out, small_grad = both()
    assert out.tobytes() == small_out.tobytes()
    assert grad.tobytes() == small_grad.tobytes()
    few = slice(0, 8)
    assert_matches(out[few], roi_align_max_ref(x, rois[few], *args), numpy.float64)
    assert_matches(grad, roi_align_max_backward_ref(g, x, rois, *args[1:]), numpy.float64)


def test_numpy_backward_is_deterministic():
    rng = make_rng("align max determinism")
    x = random_features(rng, (2, 3, 16, 16), numpy.float32)
    rois = random_boxes(rng, 2, 300, 16, 16)
    g = random_features(rng, (300, 3, 7, 7), numpy.float32)
    first = roi_cupy.roi_align_backward(g, rois, x.shape, 7, 0.5, -1, True, mode="max", input=x)
    second = roi_cupy.roi_align_backward(g, rois, x.shape, 7, 0.5, -1, True, mode="max", input=x)
    assert first.tobytes() == second.tobytes()


# ----------------------------------------------------------------------------- adapters
def _torch_inputs(dtype_name, shape=(2, 3, 9, 11), k=5, key="torch"):
    """Features (requiring grad) and in-map boxes [k, 5] as torch tensors, the same as NumPy."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    rng = make_rng("align max", key, dtype_name)
    x = rng.uniform(-1, 1, shape)
    xy = rng.uniform(-1, 7, size=(k, 2))
    boxes = numpy.concatenate(
        [rng.integers(0, shape[0], size=(k, 1)), xy, xy + rng.uniform(0.5, 6, size=(k, 2))], 1
    )
    dtype = getattr(torch, dtype_name)
    return torch.from_numpy(x).to(dtype).requires_grad_(), torch.from_numpy(boxes).float()


def _as_numpy(t):
    """A torch tensor as NumPy, bfloat16 reinterpreted bit for bit."""
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_torch_forward_and_gradient_are_roi_cupys(dtype):

    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="NumPy's bfloat16 needs ml_dtypes")
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import roi_cupy.torch as rt
    x, boxes = _torch_inputs(dtype)
    out = rt.roi_align(x, boxes, (3, 2), 0.5, 2, True, mode="max")
    assert out.dtype == x.dtype and out.requires_grad
    expected = roi_cupy.roi_align(_as_numpy(x), boxes.numpy(), (3, 2), 0.5, 2, True, mode="max")
    assert _as_numpy(out).tobytes() == expected.tobytes()
    g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(x.dtype)
    (grad,) = torch.autograd.grad(out, x, g)
    expected = roi_cupy.roi_align_backward(
        _as_numpy(g), boxes.numpy(), x.shape, (3, 2), 0.5, 2, True, mode="max", input=_as_numpy(x)
    )
    assert grad.dtype == x.dtype
    assert _as_numpy(grad).tobytes() == expected.tobytes()


@pytest.mark.parametrize("sampling_ratio", [-1, 2, (1, 3)], ids=str)
@pytest.mark.parametrize("aligned", [True, False])
def test_torch_gradcheck(aligned, sampling_ratio):
    """float64 gradcheck: random features keep each bin's pick clear of a tie."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import roi_cupy.torch as rt
    x, boxes = _torch_inputs("float64", (2, 2, 8, 9), 4, ("gradcheck", aligned, sampling_ratio))
    boxes = boxes.double()

    def fn(x):
        return rt.roi_align(x, boxes, (3, 2), 0.5, sampling_ratio, aligned, mode="max")

    assert torch.autograd.gradcheck(fn, (x,))


def test_torch_opcheck_and_no_second_derivative():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import roi_cupy.torch as rt
    x, boxes = _torch_inputs("float64")
    per_image = [boxes[:3, 1:].double(), boxes[3:, 1:].double()]
    ops = torch.ops.roi_cupy
    g = torch.linspace(-1, 1, 5 * 3 * 3 * 2, dtype=torch.float64).reshape(5, 3, 3, 2)
    cases = [
        (ops.roi_align, (x, [boxes], False, 3, 2, 0.5, [2, 2], True, True, "max")),
        (ops.roi_align, (x, per_image, True, 2, 2, 1.0, [-1, 3], False, False, "max")),
        (ops.roi_align_backward,
         (g, [boxes], False, list(x.shape), 0.5, [2, 1], True, "max", x.detach())),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    out = rt.roi_align(x, boxes, (3, 2), 0.5, 2, True, mode="max")
    (grad,) = torch.autograd.grad(out, x, g.requires_grad_(), create_graph=True)
    with pytest.raises(RuntimeError, match=r"roi_align\(mode='max'\) has no second derivative"):
        grad.sum().backward()


def test_torch_compile_fullgraph_and_the_module():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import roi_cupy.torch as rt
    x, boxes = _torch_inputs("float64")
    align = rt.RoIAlign((3, 2), 0.5, 2, aligned=True, mode="max")
    assert repr(align) == (
        "RoIAlign(output_size=(3, 2), spatial_scale=0.5, sampling_ratio=2, aligned=True, "
        "mode='max')"
    )

    def loss(x, boxes):
        return (align(x, boxes) ** 2).sum() + rt.roi_align(x, boxes, 2, mode="max").sum()

    eager = loss(x, boxes)
    got = torch.compile(loss, fullgraph=True)(x, boxes)
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(eager, x)[0],
                               rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="mode must be 'avg' or 'max', got 'min'"):
        rt.roi_align(x, boxes, 2, mode="min")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_jax_forward_and_vjp_are_roi_cupys(dtype):
    jax = pytest.importorskip("jax", reason="jax is not installed")
    import jax.numpy as jnp

    import roi_cupy.jax as rj

    rng = make_rng("align max jax", dtype)
    x = random_features(rng, (2, 3, 9, 11), dtype)
    boxes = random_boxes(rng, 2, 6, 9, 11, dtype=compute_dtype(dtype))
    g = random_features(rng, (6, 3, 3, 2), dtype)
    args = ((3, 2), 1.0, 2, True)
    expected = roi_cupy.roi_align(x, boxes, *args, mode="max")
    expected_grad = roi_cupy.roi_align_backward(g, boxes, x.shape, *args, mode="max", input=x)
    with jax.enable_x64(dtype == "float64"):
        def f(x):
            return rj.roi_align(x, jnp.asarray(boxes), *args, mode="max")

        for function in (f, jax.jit(f)):
            out, vjp = jax.vjp(function, jnp.asarray(x))
            assert numpy.asarray(out).tobytes() == expected.tobytes()
            assert numpy.asarray(vjp(jnp.asarray(g))[0]).tobytes() == expected_grad.tobytes()


def test_jax_vmap_over_box_sets():
    jax = pytest.importorskip("jax", reason="jax is not installed")
    import jax.numpy as jnp

    import roi_cupy.jax as rj

    rng = make_rng("align max vmap")
    x = random_features(rng, (2, 3, 9, 11), numpy.float32)
    sets = numpy.stack([random_boxes(rng, 2, 5, 9, 11, dtype=numpy.float32) for _ in range(3)])
    g = random_features(rng, (3, 5, 3, 2, 2), numpy.float32)

    def loss(x, boxes, g):
        return jnp.vdot(rj.roi_align(x, boxes, 2, 1.0, 2, mode="max"), g)

    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(jnp.asarray(x), sets, g)
    for i in range(3):
        expected = roi_cupy.roi_align_backward(g[i], sets[i], x.shape, 2, 1.0, 2, mode="max",
                                               input=x)
        assert numpy.asarray(grads[i]).tobytes() == expected.tobytes()


def test_dask_and_the_babilim_layer():
    pytest.importorskip("dask", reason="dask is not installed")
    import dask.array as da

    import roi_cupy.dask as rd

    rng = make_rng("align max dask")
    x = random_features(rng, (3, 2, 9, 11), numpy.float32)
    boxes = random_boxes(rng, 3, 8, 9, 11, dtype=numpy.float32)
    expected = roi_cupy.roi_align(x, boxes, (3, 2), 1.0, 2, True, mode="max")
    got = rd.roi_align(da.from_array(x, chunks=(2, -1, -1, -1)), boxes, (3, 2), 1.0, 2, True,
                       mode="max").compute()
    assert got.tobytes() == expected.tobytes()

    layer = roi_cupy.RoiAlign((3, 2), sampling_ratio=2, mode="max")
    rois = numpy.stack([b[:, 1:] for b in numpy.split(boxes[:6], 3)])
    flat = roi_cupy.convert_boxes_to_roi_format(rois)
    numpy.testing.assert_array_equal(
        layer(x, rois), roi_cupy.roi_align(x, flat, (3, 2), 1.0, 2, True, mode="max")
        .reshape(3, 2, 2, 3, 2)
    )
    with pytest.raises(ValueError, match="mode must be 'avg' or 'max', got 'maximum'"):
        roi_cupy.RoiAlign(2, mode="maximum")


# ----------------------------------------------------------------------------- ONNX's max mode
# ONNX's backend test "test_roialign_mode_max" (onnx/backend/test/case/node/roialign.py):
# X [1, 1, 10, 10], boxes (x1, y1, x2, y2) of image 0, output 5 x 5, sampling_ratio 2,
# spatial_scale 1, coordinate_transformation_mode "output_half_pixel" (aligned=False).
ONNX_X = [
    [0.2764, 0.715, 0.1958, 0.3416, 0.4638, 0.0259, 0.2963, 0.6518, 0.4856, 0.725],
    [0.9637, 0.0895, 0.2919, 0.6753, 0.0234, 0.6132, 0.8085, 0.5324, 0.8992, 0.4467],
    [0.3265, 0.8479, 0.9698, 0.2471, 0.9336, 0.1878, 0.4766, 0.4308, 0.34, 0.2162],
    [0.0206, 0.172, 0.2155, 0.4394, 0.0653, 0.3406, 0.7724, 0.3921, 0.2541, 0.5799],
    [0.4062, 0.2194, 0.4473, 0.4687, 0.7109, 0.9327, 0.9815, 0.632, 0.1728, 0.6119],
    [0.3097, 0.1283, 0.4984, 0.5068, 0.4279, 0.0173, 0.4388, 0.043, 0.4671, 0.7119],
    [0.1011, 0.8477, 0.4726, 0.1777, 0.9923, 0.4042, 0.1869, 0.7795, 0.9946, 0.9689],
    [0.1366, 0.3671, 0.7011, 0.6234, 0.9867, 0.5585, 0.6985, 0.5609, 0.8788, 0.9928],
    [0.5697, 0.8511, 0.6711, 0.9406, 0.8751, 0.7496, 0.165, 0.1049, 0.1559, 0.2514],
    [0.7012, 0.4056, 0.7879, 0.3461, 0.0415, 0.2998, 0.5094, 0.3727, 0.5482, 0.0502],
]
ONNX_BOXES = [[0.0, 0.0, 9.0, 9.0], [0.0, 5.0, 4.0, 9.0], [5.0, 5.0, 9.0, 9.0]]
ONNX_MAX = [
    [[0.3445228, 0.37310338, 0.37865096, 0.446696, 0.37991184],
     [0.4133513, 0.5455125, 0.6651902, 0.55805874, 0.27110294],
     [0.21223956, 0.40924096, 0.8417618, 0.792561, 0.37196714],
     [0.46835402, 0.39741728, 0.8012819, 0.4969306, 0.5495158],
     [0.3595896, 0.5196813, 0.5403741, 0.23814403, 0.19992709]],
    [[0.30517197, 0.5086199, 0.3189761, 0.4054401, 0.47630402],
     [0.50862, 0.8477, 0.37808004, 0.24936005, 0.79384017],
     [0.17620805, 0.29368007, 0.44870415, 0.4987201, 0.63148826],
     [0.51066005, 0.8511, 0.5368801, 0.9406, 0.70008016],
     [0.4487681, 0.51066035, 0.5042561, 0.5643603, 0.42004836]],
    [[0.21062402, 0.3510401, 0.37416005, 0.5967599, 0.46507207],
     [0.32336006, 0.31180006, 0.6236001, 0.9946, 0.7751202],
     [0.35744014, 0.5588001, 0.35897616, 0.7030401, 0.6353923],
     [0.5996801, 0.27940005, 0.17948808, 0.35152006, 0.31769615],
     [0.3598083, 0.40752012, 0.2385281, 0.43856013, 0.26313624]],
]


def corner_max(x, rois, output_size, sampling_ratio):
    """ONNX Runtime's max mode in float64: per sample the largest weighted corner term
    ``weight * pixel`` (not their sum), per bin the largest sample; unaligned geometry."""
    from reference import bilinear_corners, roi_align_geometry, sample_points

    out = numpy.zeros((len(rois), x.shape[1], output_size, output_size))
    for k, row in enumerate(rois):
        y0, x0, bh, bw, gh, gw = roi_align_geometry(row, output_size, output_size, 1.0,
                                                    sampling_ratio, False)
        for ph in range(output_size):
            for pw in range(output_size):
                out[k, :, ph, pw] = max(
                    max(wt * x[0, :, h, w] for h, w, wt in bilinear_corners(y, xs, *x.shape[2:]))
                    for y in sample_points(y0, bh, gh, ph) for xs in sample_points(x0, bw, gw, pw)
                )
    return out


def test_onnx_max_mode_is_another_operator():
    """ONNX's expected numbers are the largest weighted corner of each sample (docs/semantics.md
    says so); roi_cupy's max mode, the largest bilinear sample (mmcv's), is not that operator."""
    x = numpy.array(ONNX_X, dtype=numpy.float32)[None, None]
    rois = numpy.array([[0.0, *b] for b in ONNX_BOXES], dtype=numpy.float32)
    expected = numpy.array(ONNX_MAX)[:, None]
    assert_matches(corner_max(x, rois, 5, 2).astype(numpy.float32), expected, numpy.float32)
    ours = roi_cupy.roi_align(x, rois, 5, 1.0, 2, False, mode="max")
    assert_matches(ours, roi_align_max_ref(x, rois, 5, 1.0, 2, False), numpy.float32)
    assert numpy.abs(ours - expected).max() > 0.1
