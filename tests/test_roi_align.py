"""roi_align on every backend against the float64 reference, and docs/semantics.md's edge facts."""
from __future__ import annotations

import functools
import math
import time

import numpy
import pytest
from conftest import (
    BFLOAT16,
    BFLOAT16_MISSING,
    DTYPES,
    NARROW,
    SAMPLING_RATIOS,
    SPATIAL_SCALES,
    TOLERANCE,
    assert_matches,
    compute_dtype,
    image_major,
    make_rng,
    per_image,
    random_boxes,
    random_features,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import (
    bilinear_corners,
    roi_align_backward_ref,
    roi_align_geometry,
    roi_align_ref,
    roi_align_separable,
    sample_points,
    separable,
    separable_expected,
)

import roi_cupy


@pytest.fixture
def backend(align_backend):
    """Every test here runs on both paths of the NumPy code (conftest.align_backend)."""
    return align_backend


def run(backend, x, boxes, output_size, contiguous=True, **kwargs):
    """roi_align on ``backend`` with NumPy ``x`` and boxes ([K, 5] or a per-image list)."""
    if isinstance(boxes, list):
        boxes = [backend.asarray(b) for b in boxes]
    else:
        boxes = backend.asarray(boxes)
    with backend.active():
        out = roi_cupy.roi_align(backend.features(x, contiguous), boxes, output_size, **kwargs)
    return backend.to_numpy(out)


def plane(n=1, c=2, h=4, w=4, dtype=numpy.float64):
    """Features whose channel 0 is ``10 * h + w`` (easy to interpolate by hand), channel 1 its
    negative minus one."""
    base = 10.0 * numpy.arange(h)[:, None] + numpy.arange(w)[None, :]
    x = numpy.empty((n, c, h, w))
    x[:, 0::2] = base
    x[:, 1::2] = -base - 1.0
    return x.astype(dtype)


def point_box(y, x):
    """A unit box whose one sample (sampling_ratio=1, output 1, aligned=False) lies at (y, x)."""
    return [0.0, x - 0.5, y - 0.5, x + 0.5, y + 0.5]


# ----------------------------------------------------------------------------- the oracle itself
def test_reference_forward_is_separable():
    """The literal loop reference and the 1-D weight matrices agree (two independent encodings)."""
    rng = make_rng("reference separable")
    x = random_features(rng, (2, 2, 9, 11), numpy.float64)
    for aligned in (False, True):
        for ratio in SAMPLING_RATIOS:
            rois = random_boxes(rng, 2, 7, 9, 11)
            out = roi_align_ref(x, rois, (3, 2), 1.0, ratio, aligned)
            for k, row in enumerate(rois):
                b, ay, ax = roi_align_separable(row, x.shape, (3, 2), 1.0, ratio, aligned)
                numpy.testing.assert_allclose(out[k], ay @ x[b] @ ax.T, rtol=0, atol=1e-13)


def test_reference_hand_values():
    """Numbers worked out on paper for the plane 10 h + w (H = W = 4)."""
    x = plane(c=1)
    corners = [(0, 0, 1.0), (0, 1, 0.0), (1, 0, 0.0), (1, 1, 0.0)]
    assert bilinear_corners(-1.0, -1.0, 4, 4) == corners
    assert bilinear_corners(4.0001, 1.0, 4, 4) == []
    assert bilinear_corners(float("nan"), 1.0, 4, 4) == []
    rois = numpy.array([[0, 0, 0, 12, 2]], dtype=numpy.float64)
    assert roi_align_ref(x, rois, 1, sampling_ratio=2)[0, 0, 0, 0] == 6.5
    assert roi_align_geometry(rois[0], 1, 1, 1.0, -1, False)[4:] == (2, 12)
    assert sample_points(-1.5, 1.0, 1, 0) == [-1.0]


# ----------------------------------------------------------------------------- the parameter grid
@functools.cache
def grid_case(dtype_name, aligned, sampling_ratio, spatial_scale):
    dtype = numpy.dtype(dtype_name)
    rng = make_rng("align grid", dtype_name, aligned, sampling_ratio, spatial_scale)
    n, c, h, w = 2, 3, 10, 12
    x = random_features(rng, (n, c, h, w), dtype)
    rois = random_boxes(rng, n, 7, h, w, spatial_scale, dtype=compute_dtype(dtype))
    expected = roi_align_ref(x, rois, (3, 4), spatial_scale, sampling_ratio, aligned)
    return x, rois, expected


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS, ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_matches_reference(backend, dtype, aligned, sampling_ratio, spatial_scale, contiguous):
    x, rois, expected = grid_case(numpy.dtype(dtype).name, aligned, sampling_ratio, spatial_scale)
    out = run(
        backend, x, rois, (3, 4), contiguous,
        spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned,
    )
    assert_matches(out, expected, dtype, (len(rois), 3, 3, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_boxes_as_per_image_list(backend, dtype):
    """A list of [L_i, 4] (one image without boxes) equals the image-major [K, 5] rows."""
    rng = make_rng("align list", numpy.dtype(dtype).name)
    x = random_features(rng, (3, 2, 8, 9), dtype)
    rois = random_boxes(rng, 3, 8, 8, 9, dtype=compute_dtype(dtype))
    rois[:, 0] = [0, 2, 0, 2, 2, 0, 0, 2]
    boxes = per_image(rois, 3)
    assert boxes[1].shape == (0, 4)
    out = run(backend, x, boxes, 2, sampling_ratio=2)
    expected = roi_align_ref(x, image_major(rois), 2, sampling_ratio=2)
    assert_matches(out, expected, dtype, (8, 2, 2, 2))


@pytest.mark.parametrize("output_size", [1, 3, (1, 5), (4, 2), (7, 7)], ids=str)
def test_output_size_int_or_pair(backend, output_size):
    rng = make_rng("align size", output_size)
    x = random_features(rng, (1, 2, 9, 9), numpy.float64)
    rois = random_boxes(rng, 1, 4, 9, 9)
    out = run(backend, x, rois, output_size)
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    assert_matches(out, roi_align_ref(x, rois, output_size), numpy.float64, (4, 2, ph, pw))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize(
    "case", ["no rois", "no channels", "empty lists", "zero height", "zero width"]
)
def test_empty_inputs(backend, case, dtype):
    rng = make_rng("align empty", case)
    shape = {"no channels": (2, 0, 5, 5), "zero height": (2, 3, 0, 5), "zero width": (2, 3, 5, 0)}
    x = random_features(rng, shape.get(case, (2, 3, 5, 5)), dtype)
    rois = random_boxes(rng, 2, 3, 5, 5, dtype=compute_dtype(dtype))
    if case == "no rois":
        rois = rois[:0]
    boxes = [rois[:0, 1:], rois[:0, 1:]] if case == "empty lists" else rois
    out = run(backend, x, boxes, (2, 3), sampling_ratio=2)
    k = 0 if case in ("no rois", "empty lists") else 3
    # an empty plane has no pixel to read: every sample contributes 0
    assert_matches(out, numpy.zeros((k, x.shape[1], 2, 3)), dtype)


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32], ids=lambda d: numpy.dtype(d).name)
def test_box_dtypes_and_strides(backend, dtype):
    """Boxes of any real dtype (here integer-valued, so exact in each) and strided boxes give the
    same numbers as the compute-dtype boxes."""
    rng = make_rng("align box dtypes", numpy.dtype(dtype).name)
    x = random_features(rng, (2, 2, 7, 8), dtype)
    rois = numpy.round(random_boxes(rng, 2, 7, 7, 8)).astype(numpy.float32)
    expected = roi_align_ref(x, rois, 2, 0.5, 2, True)
    for boxes in (rois.astype(numpy.float64), rois.astype(numpy.float16), rois.astype(numpy.int32),
                  numpy.asfortranarray(rois), numpy.repeat(rois, 2, axis=0)[::2]):
        assert_matches(run(backend, x, boxes, 2, spatial_scale=0.5, sampling_ratio=2, aligned=True),
                       expected, dtype)


def test_no_images(backend):
    x = random_features(make_rng("align no images"), (0, 3, 5, 5), numpy.float32)
    out = run(backend, x, numpy.zeros((0, 5), numpy.float32), 2)
    assert_matches(out, numpy.zeros((0, 3, 2, 2)), numpy.float32)
    assert run(backend, x, [], 2).shape == (0, 3, 2, 2)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_huge_adaptive_grid(backend, dtype):
    """A 10^4-pixel box on a 4 x 4 map of ones, adaptive: 10^4 x 10^4 samples at i + 0.5, of
    which 4 x 4 lie inside [-1, 4]. The mean is 16 / 10^8 (too many samples for the reference)."""
    x = numpy.ones((1, 1, 4, 4), dtype)
    rois = numpy.array([[0, 0, 0, 1e4, 1e4]], dtype)
    out = run(backend, x, rois, 1)
    assert_matches(out, numpy.full((1, 1, 1, 1), 16 / 1e8), dtype, scale=1.0)


# ----------------------------------------------------------------------------- edge facts by hand
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_outside_samples_are_counted(backend, dtype):
    """Box x in [0, 12] on a 4-wide map, 2 x 2 samples: x = 3 (snapped, inside) and x = 9
    (outside, 0). (8 + 18 + 0 + 0) / 4 = 6.5, not 13; channel 1: (-9 - 19) / 4 = -7."""
    x = plane(dtype=dtype)
    rois = numpy.array([[0, 0, 0, 12, 2]], dtype=compute_dtype(dtype))
    out = run(backend, x, rois, 1, sampling_ratio=2)
    assert_matches(out, numpy.array([6.5, -7.0]).reshape(1, 2, 1, 1), dtype)


# (y, x) of one sample and the value of plane 10 h + w there (H = W = 4)
SNAP_POINTS = [
    ((-1.0, -1.0), 0.0),    # the corner of the range: inside, snaps to (0, 0)
    ((-0.5, 2.0), 2.0),     # y in [-1, 0) snaps to row 0
    ((2.0, -1.0), 20.0),    # x = -1 exactly is inside
    ((3.5, 1.25), 31.25),   # y in (H - 1, H] snaps to row 3
    ((0.75, 3.75), 10.5),   # x in (W - 1, W] snaps to column 3
    ((4.0, 4.0), 33.0),     # y = H and x = W are inside
    ((4.25, 1.0), 0.0),     # beyond H
    ((-1.25, 1.0), 0.0),    # below -1
    ((1.5, 2.5), 17.5),     # interior
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_edge_snapping(backend, dtype):
    x = plane(dtype=dtype)
    rois = numpy.array([point_box(*p) for p, _ in SNAP_POINTS], dtype=compute_dtype(dtype))
    out = run(backend, x, rois, 1, sampling_ratio=1)
    value = numpy.array([v for _, v in SNAP_POINTS])
    inside = numpy.array([v != 0 or p == (-1.0, -1.0) for p, v in SNAP_POINTS])
    expected = numpy.stack([value, numpy.where(inside, -value - 1, 0.0)], axis=1)
    expected = expected.reshape(-1, 2, 1, 1)
    assert_matches(out, expected, dtype)
    assert_matches(out, roi_align_ref(x, rois, 1, sampling_ratio=1), dtype)


# box (x1, y1, x2, y2), aligned, sampling_ratio, value on plane 10 h + w (channel 0)
DEGENERATE = [
    ((2, 1, 2, 1), True, -1, 0.0),   # aligned, zero size, adaptive: no samples
    ((2, 1, 2, 1), True, 0, 0.0),
    ((3, 1, 1, 3), True, -1, 0.0),   # reversed in x only, adaptive
    ((1, 3, 3, 1), True, -1, 0.0),   # reversed in y only, adaptive
    ((3, 3, 1, 1), True, -1, 0.0),   # reversed in both (grid -1 x -1): still no samples
    ((2, 1, 2, 1), True, 2, 6.5),    # zero size, fixed ratio: all samples at (0.5, 1.5)
    ((2, 1, 2, 1), False, -1, 17.5), # unaligned sizes clamp to 1: sample at (1.5, 2.5)
    ((3, 2, 1, 0), False, 1, 28.0),  # reversed, unaligned: size 1, sample at (2.5, 3.5 -> 3)
    ((3, 2, 1, 0), True, 1, 6.5),    # reversed, aligned, fixed: negative bins, sample (0.5, 1.5)
    ((3, 2, 1, 0), True, 2, 6.5),    # samples at y in {1, 0}, x in {2, 1}
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("box, aligned, sampling_ratio, value", DEGENERATE, ids=str)
def test_degenerate_boxes(backend, dtype, box, aligned, sampling_ratio, value):
    x = plane(dtype=dtype)
    rois = numpy.array([[0, *box]], dtype=compute_dtype(dtype))
    out = run(backend, x, rois, 1, sampling_ratio=sampling_ratio, aligned=aligned)
    expected = numpy.array([value, -value - 1 if value else 0.0]).reshape(1, 2, 1, 1)
    assert_matches(out, expected, dtype)
    assert_matches(out, roi_align_ref(x, rois, 1, 1.0, sampling_ratio, aligned), dtype)


@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS, ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
def test_separable(backend, aligned, sampling_ratio):
    """out[k, c] == Ay @ X[b, c] @ Ax.T with the reference's 1-D weights."""
    rng = make_rng("align separable", aligned, sampling_ratio)
    x = random_features(rng, (2, 3, 11, 13), numpy.float64)
    rois = random_boxes(rng, 2, 7, 11, 13, spatial_scale=0.5)
    out = run(backend, x, rois, (4, 3), spatial_scale=0.5, sampling_ratio=sampling_ratio,
              aligned=aligned)
    expected = numpy.empty(out.shape)
    for k, row in enumerate(rois):
        b, ay, ax = roi_align_separable(row, x.shape, (4, 3), 0.5, sampling_ratio, aligned)
        expected[k] = ay @ x[b] @ ax.T
    assert_matches(out, expected, numpy.float64, scale=1.0)


# Rows a backend must give zeros without reading anything (validate=False lets them through).
INVALID_ROWS = [
    [-1, 1, 1, 4, 4],
    [2, 1, 1, 4, 4],          # N = 2
    [1e9, 1, 1, 4, 4],
    [1e20, 1, 1, 4, 4],
    [-1e20, 1, 1, 4, 4],
    [-1.5, 1, 1, 4, 4],       # truncates to -1
    [0, numpy.nan, 1, 4, 4],
    [1, 1, 1, numpy.inf, 4],
    [0, 1, -numpy.inf, 4, 4],
    [numpy.nan, 1, 1, 4, 4],
    [numpy.inf, 1, 1, 4, 4],
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_invalid_rois_give_zeros(backend, dtype):
    rng = make_rng("align invalid", numpy.dtype(dtype).name)
    x = random_features(rng, (2, 2, 6, 6), dtype)
    valid = numpy.array([[0, 0.3, 0.7, 4.2, 5.1], [1.9, 1.1, 0.2, 5.5, 3.3], [-0.5, 2, 2, 3, 3]])
    rois = numpy.concatenate([valid, INVALID_ROWS]).astype(compute_dtype(dtype))
    for aligned, ratio in [(False, -1), (True, 2)]:
        out = run(backend, x, rois, 2, sampling_ratio=ratio, aligned=aligned, validate=False)
        expected = roi_align_ref(x, rois, 2, 1.0, ratio, aligned)
        assert not expected[len(valid):].any() and expected[: len(valid)].all()
        # batch indices 1.9 and -0.5 truncate to images 1 and 0
        truncated = rois[: len(valid)].copy()
        truncated[:, 0] = [0, 1, 0]
        numpy.testing.assert_array_equal(
            expected[: len(valid)], roi_align_ref(x, truncated, 2, 1.0, ratio, aligned)
        )
        assert_matches(out, expected, dtype)


@pytest.mark.parametrize("dtype", NARROW, ids=lambda d: numpy.dtype(d).name)
def test_narrow_dtypes_accumulate_in_float32(backend, dtype):
    """400 samples near 1 averaged into one bin: a running sum in the storage type (float16:
    spacing 0.25 above 256; bfloat16: spacing 2 above 256) misses by far more than the dtype's
    tolerance; float32 accumulation does not."""
    rng = make_rng("align half accumulation")
    x = rng.uniform(0.95, 1.0, size=(1, 2, 20, 20)).astype(dtype)
    rois = numpy.array([[0, 0, 0, 19, 19]], dtype=numpy.float32)
    expected = roi_align_ref(x, rois, 1, sampling_ratio=20)

    y0, x0, bh, bw, gh, gw = roi_align_geometry(rois[0], 1, 1, 1.0, 20, False)
    narrow_sum = numpy.zeros(2, dtype=dtype)
    for y in sample_points(y0, bh, gh, 0):
        for xs in sample_points(x0, bw, gw, 0):
            value = sum(wt * x[0, :, h, w].astype(numpy.float64)
                        for h, w, wt in bilinear_corners(y, xs, 20, 20))
            narrow_sum = (narrow_sum + value.astype(dtype)).astype(dtype)  # rounds every step
    narrow_mean = (narrow_sum.astype(numpy.float64) / (gh * gw)).astype(dtype)
    narrow_error = numpy.abs(narrow_mean.astype(numpy.float64) - expected.ravel()).max()
    bound = TOLERANCE[numpy.dtype(dtype)]
    assert narrow_error > 5 * bound, f"the case does not discriminate (error {narrow_error})"

    out = run(backend, x, rois, 1, sampling_ratio=20)
    assert_matches(out, expected, dtype)


def test_bfloat16_is_covered():
    """bfloat16 joins every dtype-parametrised test where ml_dtypes provides it to NumPy."""
    if BFLOAT16 is None:
        pytest.skip(f"bfloat16 cases are not collected: {BFLOAT16_MISSING}")
    assert BFLOAT16 in [numpy.dtype(d) for d in DTYPES]
    x = make_rng("bf16").uniform(-1, 1, (1, 2, 6, 6)).astype(BFLOAT16)
    out = roi_cupy.roi_align(x, numpy.array([[0, 0, 0, 5, 5]], numpy.float32), 2)
    assert out.dtype == BFLOAT16


# ----------------------------------------------------------------------------- many RoIs
def test_many_rois_numpy():
    """K = 5000 on a small map (any chunking inside the backend must not show): the whole batch
    equals the same RoIs one call each, and the reference on a sample of them."""
    rng = make_rng("align many")
    x = random_features(rng, (2, 3, 16, 16), numpy.float64)
    rois = random_boxes(rng, 2, 5000, 16, 16)
    rng.shuffle(rois)
    out = roi_cupy.roi_align(x, rois, 7, 0.5, -1, True)
    assert out.shape == (5000, 3, 7, 7) and out.dtype == numpy.float64
    picks = rng.choice(5000, size=150, replace=False)
    for k in picks:
        single = roi_cupy.roi_align(x, rois[k : k + 1], 7, 0.5, -1, True)
        numpy.testing.assert_allclose(out[k : k + 1], single, rtol=0, atol=1e-12)
    few = picks[:8]
    assert_matches(out[few], roi_align_ref(x, rois[few], 7, 0.5, -1, True), numpy.float64)


# ----------------------------------------------------------------------------- small calls
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_small_calls_take_the_dense_path_with_the_tiled_numbers(monkeypatch, dtype):
    """A small call builds dense weight matrices (few NumPy calls) where a large one builds
    compressed windows: both give the same numbers, forward and backward, in every dtype, for
    boxes inside, across and outside the map, zero-size and reversed ones, invalid rows
    (validate=False), sampling pairs and adaptive grids."""
    from roi_cupy._numpy import roi_align as numpy_align

    dense_calls = []
    dense = numpy_align._dense
    monkeypatch.setattr(numpy_align, "_dense", lambda *a: dense_calls.append(1) or dense(*a))
    dtype = numpy.dtype(dtype)
    rng = make_rng("align small", dtype.name)
    for case in range(24):
        n, c, h, w = 2, int(rng.integers(1, 4)), int(rng.integers(1, 11)), int(rng.integers(1, 11))
        x = random_features(rng, (n, c, h, w), dtype)
        rois = random_boxes(rng, n, 6, h, w, 1.0, dtype=compute_dtype(dtype))
        rois[0, 3] = rois[0, 1]  # zero width
        rois[1, 1:] = rois[1, [3, 4, 1, 2]]  # reversed
        rois[2, 1:] += 3 * max(h, w)  # outside the map
        rois[3, 0] = n  # invalid
        sampling = [(2, 2), (-1, -1), (0, 3), (1, 1)][case % 4]
        kw = dict(spatial_scale=1.0, sampling_ratio=sampling, aligned=bool(case % 2))
        size = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
        out = roi_cupy.roi_align(x, rois, size, validate=False, **kw)
        grad = random_features(rng, out.shape, dtype)
        back = roi_cupy.roi_align_backward(grad, rois, x.shape, size, validate=False, **kw)
        assert len(dense_calls) == 2 * (case + 1)
        with monkeypatch.context() as tiled:
            tiled.setattr(numpy_align, "_SMALL_ROIS", -1)
            out_tiled = roi_cupy.roi_align(x, rois, size, validate=False, **kw)
            back_tiled = roi_cupy.roi_align_backward(
                grad, rois, x.shape, size, validate=False, **kw
            )
        assert len(dense_calls) == 2 * (case + 1)
        assert out.dtype == out_tiled.dtype == dtype and back.dtype == dtype
        assert not out[3].any()  # the invalid row
        assert_matches(out, out_tiled.astype(numpy.float64), dtype, out_tiled.shape)
        assert_matches(back, back_tiled.astype(numpy.float64), dtype, back_tiled.shape)
        expected = roi_align_ref(x, numpy.delete(rois, 3, 0), size, **kw)
        assert_matches(numpy.delete(out, 3, 0), expected, dtype)


def test_small_call_limits(monkeypatch):
    """Past any of the small-call limits (RoIs, plane values, samples per axis) a call takes the
    tiled path; non-finite features or gradients too (they must stay in their own bins)."""
    from roi_cupy._numpy import roi_align as numpy_align

    answers = []
    for name in ("_small_forward", "_small_backward"):
        def record(*a, _f=getattr(numpy_align, name)):
            answers.append(_f(*a) is not None)
            return answers[-1] and _f(*a)

        monkeypatch.setattr(numpy_align, name, record)
    rng = make_rng("align small limits")
    x = random_features(rng, (1, 2, 8, 8), numpy.float32)
    rois = random_boxes(rng, 1, 4, 8, 8)

    def dense_taken(x, rois, sampling_ratio=2):
        roi_cupy.roi_align(x, rois, 3, sampling_ratio=sampling_ratio)
        return answers[-1]

    assert dense_taken(x, rois)
    assert not dense_taken(x, numpy.repeat(rois, numpy_align._SMALL_ROIS, axis=0))
    wide = random_features(rng, (1, 2, 8, numpy_align._SMALL_VALUES // 8), numpy.float32)
    assert not dense_taken(wide, rois)
    assert not dense_taken(x, rois, sampling_ratio=numpy_align._SMALL_SAMPLES)
    nan = x.copy()
    nan[0, 0, 0, 0] = numpy.nan
    assert not dense_taken(nan, rois)
    grad = random_features(rng, (4, 2, 3, 3), numpy.float32)
    roi_cupy.roi_align_backward(grad, rois, x.shape, 3, sampling_ratio=2)
    assert answers[-1]
    grad[0, 0, 0, 0] = numpy.inf
    roi_cupy.roi_align_backward(grad, rois, x.shape, 3, sampling_ratio=2)
    assert not answers[-1]


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_small_call_weights_are_the_tiled_weights_bit_for_bit(dtype):
    """The dense weight matrices hold, bit for bit, the tiled path's compressed weights at their
    pixels and zeros elsewhere: boxes inside, across and outside the map, zero-width, snapped
    to half and whole pixels, huge, and a NaN row."""
    from roi_cupy._numpy import roi_align as numpy_align

    ct = numpy.dtype(dtype)
    rng = make_rng("align small weights", ct.name)
    checked = 0
    for case in range(300):
        h, w = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        k, ph, pw = int(rng.integers(1, 6)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
        rois = numpy.zeros((k, 5))
        rois[:, 1:] = rng.uniform(-2, 14, (k, 4))
        variant = case % 6
        if variant == 1:
            rois[:, 3] = rois[:, 1]
        elif variant == 2:
            rois[:, 1:] = numpy.round(rois[:, 1:] * 2) / 2
        elif variant == 3:
            rois[:, 1:] *= 1e3
        elif variant == 4:
            rois[0, 1:] = [numpy.nan, 0, 1, 1]
        rois = rois.astype(ct)
        scale = [1.0, 0.5, 1 / 16][case % 3]
        ratio = [(2, 2), (-1, -1), (0, 3), (1, 1), (5, 5)][case % 5]
        aligned = case % 4 == 0
        small = numpy_align._small(rois, (1, 1, h, w), ph, pw, scale, ratio, aligned, ct)
        if small is None:
            continue
        _, valid, dense_y, dense_x = small
        safe = numpy.where(valid[:, None], rois, 0).astype(ct)
        axes = numpy_align._axes(safe, (1, 1, h, w), ph, pw, scale, ratio, aligned, ct)
        for axis, dense, size in zip(axes, (dense_y, dense_x), (h, w)):
            weights, pixels, used = axis.weights(numpy.arange(k))
            expected = numpy.zeros((k, dense.shape[1], size), dtype=ct)
            for i in range(k):
                expected[i][:, pixels[i, : used[i]]] = weights[i, :, : used[i]]
            assert expected.tobytes() == dense.tobytes(), (case, rois.tolist())
        checked += 1
    assert checked > 200


def test_small_call_edge_cases_take_the_tiled_path_or_match_it(monkeypatch):
    """Cases the dense road must not take or must get right: outputs whose dense sums would
    hold a huge [2K, P, max(H, W)] (one 8192-bin axis against a 1-bin one; zero-height bins,
    which sample nothing, against 4096 of them), and a column at float32's maximum that no
    bin reads (a dense product would meet its overflow with a zero weight: NaN)."""
    import tracemalloc

    from roi_cupy._numpy import roi_align as numpy_align

    def both(x, rois, size, **kw):
        out = roi_cupy.roi_align(x, rois, size, **kw)
        with monkeypatch.context() as tiled:
            tiled.setattr(numpy_align, "_SMALL_ROIS", -1)
            return out, roi_cupy.roi_align(x, rois, size, **kw)

    rng = make_rng("align small edges")
    wide = random_features(rng, (1, 1, 1, 4096), numpy.float32)
    flat = random_features(rng, (1, 1, 16, 16), numpy.float32)
    for x, rois, size, kw in (
        (wide, [[0, 0, 0, 4095, 0.5]], (8192, 1), dict(sampling_ratio=1)),
        (flat, [[0, 0, 4, 1024, 4]], (4096, 1), dict(sampling_ratio=-1, aligned=True)),
    ):
        rois = numpy.array(rois, numpy.float32)
        tracemalloc.start()
        try:
            out, tiled = both(x, rois, size, **kw)
            peak = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
        assert peak < 32, peak
        numpy.testing.assert_array_equal(out, tiled)
    top = numpy.ones((1, 1, 12, 16), numpy.float32)
    top[..., 15] = numpy.finfo(numpy.float32).max
    rois = numpy.array([[0, 0.5, 4.535, 4.5, 5.063]], numpy.float32)
    with numpy.errstate(all="raise"):  # no warning escapes either
        out, tiled = both(top, rois, (3, 2), sampling_ratio=3)
    assert numpy.isfinite(out).all()
    numpy.testing.assert_allclose(out, tiled, rtol=1e-6)


def test_small_call_reads_only_the_images_its_boxes_name():
    """A NaN in an image that no valid box reads changes no bit (the dense road checks and
    copies only the images it reads), nor does a NaN gradient of an invalid RoI."""
    rng = make_rng("align small images")
    for _ in range(20):
        c, h, w = int(rng.integers(1, 5)), int(rng.integers(4, 12)), int(rng.integers(4, 12))
        x = random_features(rng, (4, c, h, w), numpy.float32)
        rois = random_boxes(rng, 2, 6, h, w)  # images 0 and 1 only
        rois[0, 0] = 7  # invalid (validate=False): reads nothing
        grad = random_features(rng, (6, c, 3, 2), numpy.float32)
        kw = dict(sampling_ratio=-1, aligned=True, validate=False)
        before = roi_cupy.roi_align(x, rois, (3, 2), **kw)
        back = roi_cupy.roi_align_backward(grad, rois, x.shape, (3, 2), **kw)
        x[3, 0, 2, 2] = numpy.nan
        grad[0, 0, 0, 0] = numpy.nan
        after = roi_cupy.roi_align(x, rois, (3, 2), **kw)
        back_after = roi_cupy.roi_align_backward(grad, rois, x.shape, (3, 2), **kw)
        assert before.tobytes() == after.tobytes() and back.tobytes() == back_after.tobytes()
        assert not after[0].any() and not back_after[2:].any()


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_windows_read_in_place_or_gathered_agree(monkeypatch, dtype):
    """The tiled road reads large windows in place (views of the channels-last copy) and small
    or sparse ones gathered: both agree with each other and the reference, whichever it takes,
    and a window spread over more than _IN_PLACE_SPREAD times its used pixels is gathered."""
    from roi_cupy._numpy import roi_align as numpy_align

    calls = []
    in_place = numpy_align._forward_in_place
    monkeypatch.setattr(numpy_align, "_forward_in_place",
                        lambda x, group, *a: calls.append(group.kidx.size) or in_place(x, group, *a))
    rng = make_rng("align in place", numpy.dtype(dtype).name)
    x = random_features(rng, (2, 6, 30, 34), dtype)
    rois = random_boxes(rng, 2, 80, 30, 34, dtype=compute_dtype(dtype))
    kw = dict(spatial_scale=1.0, sampling_ratio=(2, 1), aligned=True)
    gathered = roi_cupy.roi_align(x, rois, (5, 4), **kw)
    assert not calls  # 6 channels: every window is under _IN_PLACE_BYTES
    monkeypatch.setattr(numpy_align, "_IN_PLACE_BYTES", 0)
    read = roi_cupy.roi_align(x, rois, (5, 4), **kw)
    assert 0 < sum(calls) <= 80
    assert_matches(read, gathered.astype(numpy.float64), dtype)
    assert_matches(read, roi_align_ref(x, rois, (5, 4), **kw), dtype)
    calls.clear()
    sparse = numpy.array([[0, 0, 0, 33, 29]], rois.dtype).repeat(70, axis=0)
    roi_cupy.roi_align(x, sparse, 2, sampling_ratio=1)  # 2 of 30 rows, 2 of 34 columns used
    assert not calls


# ----------------------------------------------------------------------------- properties
JITTER = (math.sqrt(5) - 1) / 2 * 1e-3  # keeps samples off exact pixel and range boundaries


@st.composite
def align_cases(draw):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    k = draw(st.integers(0, 4))
    quarters = st.integers(-4 * 12, 4 * 20)
    rows = []
    for i in range(k):
        corners = [draw(quarters) / 4 + JITTER * (i + 1) for _ in range(4)]
        rows.append([draw(st.integers(0, n - 1)), *corners])
    return dict(
        shape=(n, c, h, w),
        rois=numpy.array(rows, dtype=numpy.float64).reshape(k, 5),
        output_size=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
        spatial_scale=draw(st.sampled_from(SPATIAL_SCALES)),
        sampling_ratio=draw(st.integers(-1, 3)),
        aligned=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=align_cases())
def test_property_matches_reference(backend, case):
    x = random_features(numpy.random.default_rng(case["seed"]), case["shape"], numpy.float64)
    params = {k: case[k] for k in ("spatial_scale", "sampling_ratio", "aligned")}
    out = run(backend, x, case["rois"], case["output_size"], **params)
    expected = roi_align_ref(x, case["rois"], case["output_size"], **params)
    assert_matches(out, expected, numpy.float64, scale=1.0)


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32], ids=lambda d: numpy.dtype(d).name)
def test_the_mean_of_millions_of_samples_keeps_float32_precision(backend, dtype):
    """A full-map box on an 8192 x 8192 map, one bin, adaptive, aligned: 2**26 samples, each
    exactly a pixel. A plain float32 sum stops taking in samples of about 0.5 once it reaches
    2**24 and gives 0.25 for a mean of 0.5; the bin's sum must stay within float32's tolerance
    of the exact mean."""
    side = 8192
    rng = make_rng("millions", numpy.dtype(dtype).name)
    x = rng.uniform(0, 1, (1, 1, side, side)).astype(dtype)
    exact = x.mean(dtype=numpy.float64)
    boxes = numpy.array([[0, 0, 0, side, side]], numpy.float32)
    with backend.active():
        out = backend.to_numpy(roi_cupy.roi_align(backend.asarray(x), backend.asarray(boxes), 1,
                                                  1.0, -1, True))
    assert abs(float(out.ravel()[0]) - exact) <= TOLERANCE[numpy.dtype(dtype)], (out, exact)


def test_many_images_of_boxes_are_placed_without_concatenate(monkeypatch):
    """Each image's boxes are copied into place on the array's own device: no concatenate, which
    CuPy does for more than a few arrays by sending a pointer table from the host (a CUDA graph
    capture allows no such copy)."""
    rng = make_rng("twelve images")
    x = random_features(rng, (12, 2, 9, 10), numpy.float32)
    rois = image_major(random_boxes(rng, 12, 30, 9, 10))
    expected = roi_cupy.roi_align(x, rois, 2, 1.0, 2, True)
    boxes = per_image(rois, 12)
    assert sum(len(b) == 0 for b in boxes) < 12

    class NoConcatenate:
        """NumPy for the boxes' normalisation, minus concatenate."""

        def __getattr__(self, name):
            if name == "concatenate":
                raise AssertionError("concatenate was called")
            return getattr(numpy, name)

    from roi_cupy import _interop

    real = _interop.array_module
    monkeypatch.setattr(
        _interop, "array_module", lambda a: NoConcatenate() if real(a) is numpy else real(a)
    )
    numpy.testing.assert_array_equal(roi_cupy.roi_align(x, boxes, 2, 1.0, 2, True), expected)


# ----------------------------------------------------------------------------- the block kernels
# The kernels pool a block per (RoI, channel tile) from per-axis tables of (pixel, weight)
# entries (cuda/README.md): any sample count costs the pixels a bin covers, in any launch shape.
# reference.separable_expected gives the float64 numbers for sample counts beyond the loops.
def emulator_only(backend):
    if backend.name != "emulator":
        pytest.skip("a launch-shape test of the CUDA kernels: it runs on the emulator "
                    "backend, which takes any launch shape")


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_sampling_128_keeps_the_dtype_tolerance(backend, dtype):
    """128 x 128 samples per bin on a 16 x 16 map: a bin is a sum of per-row sums of per-pixel
    weights, not of 16384 samples, and stays within the dtype's tolerance."""
    rng = make_rng("sampling 128", numpy.dtype(dtype).name)
    x = random_features(rng, (1, 3, 16, 16), dtype)
    rois = numpy.array([[0, 0, 0, 16, 16], [0, -3.3, 1.7, 12.2, 19.5]], compute_dtype(dtype))
    out = run(backend, x, rois, (2, 3), spatial_scale=1.0, sampling_ratio=128, aligned=True)
    assert_matches(out, separable_expected(x, rois, (2, 3), 1.0, 128, True), dtype)


@pytest.mark.parametrize("sampling_ratio", [10**9, (2**20, 3), (1, 10**9)], ids=str)
def test_any_sampling_ratio_is_bounded_work(backend, sampling_ratio):
    """sampling_ratio=10**9 (capped at 2**20 per axis: 2**40 samples per bin, hours sample by
    sample) on a box over the whole map: the kernels' work follows the pixels, a second or so."""
    emulator_only(backend)
    rng = make_rng("bounded work", str(sampling_ratio))
    x = random_features(rng, (1, 2, 24, 20), numpy.float32)
    rois = numpy.array([[0, -2.0, -1.0, 21.0, 26.0], [0, 3.0, 2.0, 9.0, 8.0]], numpy.float32)
    start = time.monotonic()
    out = run(backend, x, rois, 3, spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=True)
    assert time.monotonic() - start < 60
    expected = separable_expected(x, rois, 3, 1.0, sampling_ratio, True)
    assert_matches(out, expected, numpy.float32)
    g = random_features(rng, out.shape, numpy.float32)
    with backend.active():
        grad = roi_cupy.roi_align_backward(g, rois, x.shape, 3, 1.0, sampling_ratio, True)
    assert time.monotonic() - start < 120
    expected_grad = numpy.zeros(x.shape)
    for k, row in enumerate(rois.astype(numpy.float64)):
        b, ay, ax = separable(row, x.shape, 3, 1.0, sampling_ratio, True)
        expected_grad[b] += ay.T @ g[k].astype(numpy.float64) @ ax
    assert_matches(grad, expected_grad, numpy.float32)


@pytest.mark.parametrize("op", ["roi_align", "ps_roi_align"])
def test_numpy_sampling_10_9_is_bounded_memory(op):
    """sampling_ratio=10**9 (2**20 samples per bin and axis) on one box with a 7 x 7 output:
    the NumPy backend's weights follow the pixels a bin covers, not its samples (sample by
    sample this took 5 s and 1.4 GiB), and keep the float32 tolerance."""
    import tracemalloc

    rng = make_rng("numpy bounded memory", op)
    pooled = 7 if op == "roi_align" else 2
    x = random_features(rng, (1, 2 * pooled * pooled, 16, 16), numpy.float32)
    rois = numpy.array([[0, 1.3, 2.1, 14.2, 13.7]], numpy.float32)
    with roi_cupy.use_backend("numpy"):
        tracemalloc.start()
        try:
            start = time.monotonic()
            if op == "roi_align":
                out = roi_cupy.roi_align(x, rois, pooled, 1.0, 10**9, True)
                grad = roi_cupy.roi_align_backward(out, rois, x.shape, pooled, 1.0, 10**9, True)
            else:
                out = roi_cupy.ps_roi_align(x, rois, pooled, 1.0, 10**9)
                grad = roi_cupy.ps_roi_align_backward(out, rois, x.shape, pooled, 1.0, 10**9)
            elapsed = time.monotonic() - start
            peak = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
    assert peak < 32, peak
    assert elapsed < 4, elapsed
    assert grad.shape == x.shape and numpy.isfinite(grad).all()
    if op == "roi_align":
        assert_matches(out, separable_expected(x, rois, pooled, 1.0, 10**9, True), numpy.float32)


def _axis_weights(numpy_align, axis, k):
    """``[K, P, size]`` float64 weights and flags of zero-weight reads of an axis's RoIs."""
    pooled, size = axis.n.shape[1], axis.size
    weight = numpy.zeros((k, pooled, size))
    zero = numpy.zeros((k, pooled, size), bool)
    kp, low, high, frac = axis.taps(numpy.arange(k))
    for pixel, part in ((low, axis.ct.type(1) - frac), (high, frac)):
        numpy.add.at(weight, (kp // pooled, kp % pooled, pixel),
                     part.astype(numpy.float64) * axis.factor[kp // pooled])
        at = part == 0
        zero[kp[at] // pooled, kp[at] % pooled, pixel[at]] = True
    kp, pixel, part, flag = axis.closed_entries(numpy.arange(k))
    weight[kp // pooled, kp % pooled, pixel] += part
    zero[kp // pooled, kp % pooled, pixel] |= flag
    return weight, zero


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_closed_form_weights_are_the_sample_sums(monkeypatch, dtype):
    """The closed-form weights of a bin (one per pixel, from counts and offset sums of its
    samples) are the per-sample sums within float64 rounding of the sample positions, and flag
    the same zero-weight reads: with the threshold lowered so that grids of 2 to 70 samples,
    down to one per pixel, take the closed form. Boxes inside, across and outside the map,
    reversed, zero-size, on half and whole pixels, maps of one pixel."""
    from roi_cupy._numpy import roi_align as numpy_align

    ct = numpy.dtype(dtype)
    rng = make_rng("closed form weights", ct.name)
    closed = 0
    for case in range(150):
        h, w = int(rng.integers(1, 14)), int(rng.integers(1, 14))
        k, ph, pw = int(rng.integers(1, 5)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
        rois = numpy.zeros((k, 5))
        rois[:, 1:] = rng.uniform(-4, 18, (k, 4))
        variant = case % 5
        if variant == 1:
            rois[:, 3:] = rois[:, 1:3] - rng.uniform(0, 4, (k, 2))
        elif variant == 2:
            rois[:, 3] = rois[:, 1]
        elif variant == 3:
            rois[:, 1:] = numpy.round(rois[:, 1:] * 2) / 2
        rois = rois.astype(ct)
        ratio = (int(rng.integers(2, 71)), int(rng.integers(2, 71)))
        aligned = case % 2 == 0
        results = []
        for grid, density in ((1, 1), (math.inf, 1)):
            monkeypatch.setattr(numpy_align, "_CLOSED_GRID", grid)
            monkeypatch.setattr(numpy_align, "_CLOSED_DENSITY", density)
            axes = numpy_align._axes(rois, (1, 1, h, w), ph, pw, 1.0, ratio, aligned, ct)
            results.append([_axis_weights(numpy_align, axis, k) for axis in axes])
            if grid == 1:
                closed += int(sum(axis.closed.sum() for axis in axes))
        for (weight, zero), (expected, expected_zero) in zip(*results):
            # The positions are rounded in the compute dtype; float64 sums of up to 70 terms.
            tol = 1e-13 if ct == numpy.float64 else 4 * numpy.finfo(numpy.float32).eps
            numpy.testing.assert_allclose(weight, expected, rtol=0, atol=tol, err_msg=str(case))
            assert (zero == expected_zero).all(), case
    assert closed > 1000


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_closed_form_exact_path_keeps_non_finite_values_to_their_bins(monkeypatch, dtype):
    """NaN and inf in the features or gradients with closed-form bins (the exact path weighs
    each pixel by its dense weights): the same bins and pixels come out NaN, inf or finite as
    sample by sample, pixels read at weight 0 included (boxes on half pixels), and the finite
    bins match the reference. Small and tiled calls."""
    from roi_cupy._numpy import roi_align as numpy_align

    rng = make_rng("closed form non-finite", numpy.dtype(dtype).name)
    for case in range(16):
        h, w = int(rng.integers(1, 10)), int(rng.integers(1, 10))
        x = random_features(rng, (2, 3, h, w), dtype)
        for _ in range(3):
            where = (rng.integers(2), rng.integers(3), rng.integers(h), rng.integers(w))
            x[where] = rng.choice([numpy.nan, numpy.inf, -numpy.inf])
        k = 70 if case % 2 else 3
        rois = numpy.zeros((k, 5))
        rois[:, 0] = rng.integers(0, 2, k)
        rois[:, 1:] = rng.uniform(-3, 12, (k, 4))
        if case % 4 < 2:
            rois[:, 1:] = numpy.round(rois[:, 1:] * 2) / 2
        rois = rois.astype(dtype)
        ratio = [40, 64, (64, 2), 100][case % 4]
        g = random_features(rng, (k, 3, 2, 3), dtype)
        g[rng.integers(k), rng.integers(3), rng.integers(2), rng.integers(3)] = numpy.inf
        results = []
        for grid in (32, math.inf):
            monkeypatch.setattr(numpy_align, "_CLOSED_GRID", grid)
            with roi_cupy.use_backend("numpy"):
                out = roi_cupy.roi_align(x, rois, (2, 3), 1.0, ratio, True)
                grad = roi_cupy.roi_align_backward(g, rois, x.shape, (2, 3), 1.0, ratio, True)
            results.append((out, grad))
        for got, expected in zip(*results):
            for kind in (numpy.isnan, numpy.isposinf, numpy.isneginf):
                assert (kind(got) == kind(expected)).all(), case
        # The finite bins read finite values only: the reference on the features without the
        # non-finite ones (sample by sample, float32 sums of 4096 samples drift further).
        finite = numpy.isfinite(results[1][0])
        clean = numpy.where(numpy.isfinite(x), x, 0)
        reference = separable_expected(clean, rois, (2, 3), 1.0, ratio, True)
        assert_matches(results[0][0][finite], reference[finite], dtype)


def test_closed_form_threshold_keeps_common_grids_per_sample():
    """Grids of up to 32 samples and sparse grids expand their samples (the numbers stay bit
    for bit those of before the closed form); dense grids past 32 take the closed form."""
    from roi_cupy._numpy import roi_align as numpy_align

    bins = numpy.array([0.1, 0.5, 2.0, 10.0, 100.0], numpy.float32)
    for grid, expected in ((2.0, [0] * 5), (32.0, [0] * 5), (33.0, [1, 1, 1, 0, 0]),
                           (2.0**20, [1] * 5)):
        got = numpy_align._is_closed(bins, numpy.full(5, grid))
        assert got.tolist() == [bool(e) for e in expected], grid


LAUNCH_SHAPES = [(256, 4096), (32, 3), (64, 1), (1024, 5), (96, 7)]


@pytest.mark.parametrize("block, grid", LAUNCH_SHAPES, ids=str)
@pytest.mark.parametrize(
    "channels, output_size", [(1, 7), (5, (3, 20)), (37, 7), (3, (1, 200)), (2, (150, 2))], ids=str
)
def test_launch_shapes_and_channel_tiles(backend, monkeypatch, block, grid, channels, output_size):
    """Channel tiles that do not divide C, bins that do not fill a block or take several rounds
    of it, blocks of 32 to 1024 threads and grids smaller than the work, many RoIs (invalid ones
    among them): every output element is written (the emulator poisons outputs with NaN) and
    matches the reference, forward and backward."""
    emulator_only(backend)
    from roi_cupy._cuda import launch

    monkeypatch.setattr(launch, "BLOCK", block)
    monkeypatch.setattr(launch, "MAX_GRID", grid)
    rng = make_rng("launch shapes", block, grid, channels, str(output_size))
    x = random_features(rng, (2, channels, 11, 13), numpy.float32)
    rois = random_boxes(rng, 2, 40, 11, 13, dtype=numpy.float32)
    rois[5, 0] = 7  # invalid: zeros
    kwargs = dict(spatial_scale=1.0, sampling_ratio=(2, -1), aligned=True)
    out = run(backend, x, rois, output_size, validate=False, **kwargs)
    assert_matches(out, separable_expected(x, rois, output_size, 1.0, (2, -1), True), numpy.float32)
    g = random_features(rng, out.shape, numpy.float32)
    with backend.active():
        grad = roi_cupy.roi_align_backward(
            g, rois, x.shape, output_size, 1.0, (2, -1), True, validate=False
        )
    ref = roi_align_backward_ref(g.astype(numpy.float64), rois, x.shape, 1.0, (2, -1), True)
    assert_matches(grad, ref, numpy.float32)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_bins_wider_than_a_table_chunk(backend, dtype):
    """Bins of 35 x 40 pixels, 120 of them at a time: a bin's entries take several chunks of the
    block's tables along x, its rows summed a chunk at a time. (The error is relative to the
    features' scale, 1: a bin's mean of 1400 pixels of either sign is far smaller.)"""
    rng = make_rng("wide bins")
    x = random_features(rng, (1, 2, 70, 2400), dtype)
    rois = numpy.array([[0, 0, 0, 2400, 70], [0, -100.5, 3.25, 2300.75, 60.5]], dtype)
    out = run(backend, x, rois, (2, 60), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    expected = separable_expected(x, rois, (2, 60), 1.0, -1, True)
    assert_matches(out, expected, dtype, scale=1.0)
    # Channels-last features take other chunks (8 bins at a time): the same numbers, rounded
    # in another order.
    out = run(backend, channels_last(x), rois, (2, 60), spatial_scale=1.0, sampling_ratio=-1,
              aligned=True)
    assert_matches(out, expected, dtype, scale=1.0)


def channels_last(x):
    """``x`` [N, C, H, W] as a transposed view of a C-contiguous [N, H, W, C] copy."""
    return numpy.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("channels, output_size", [(37, 7), (3, (2, 5)), (64, 1)], ids=str)
def test_channels_last_features_are_read_in_place(backend, monkeypatch, dtype, channels,
                                                  output_size):
    """Channels-last features (a transposed view of [N, H, W, C]) go to the kernel as they are,
    no copy to [N, C, H, W], and give the same bits as the same features in NCHW order."""
    emulator_only(backend)
    from roi_cupy._cuda import launch

    rng = make_rng("channels last", numpy.dtype(dtype).name, channels, str(output_size))
    x = random_features(rng, (2, channels, 9, 12), dtype)
    rois = random_boxes(rng, 2, 21, 9, 12, dtype=compute_dtype(dtype))
    layouts = []
    real = launch.pooled_forward

    def spy(*args, **kwargs):
        layouts.append(kwargs.get("data") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "pooled_forward", spy)
    kwargs = dict(spatial_scale=0.5, sampling_ratio=(3, -1), aligned=False)
    nchw = run(backend, x, rois, output_size, **kwargs)
    nhwc = run(backend, channels_last(x), rois, output_size, **kwargs)
    assert layouts == [False, True]
    numpy.testing.assert_array_equal(bits(nhwc), bits(nchw))
    assert_matches(nchw, roi_align_ref(x, rois, output_size, **kwargs), dtype)


def test_channels_last_torch_tensor(backend):
    """A torch ``channels_last`` tensor (through DLPack) pools as the NCHW one does, bit for
    bit."""
    emulator_only(backend)
    torch = pytest.importorskip("torch")
    rng = make_rng("torch channels last")
    x = random_features(rng, (2, 19, 10, 11), numpy.float32)
    rois = random_boxes(rng, 2, 14, 10, 11, dtype=numpy.float32)
    t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    assert not t.is_contiguous()
    with backend.active():
        a = roi_cupy.roi_align(t, torch.from_numpy(rois), 7, 1.0, 2, True)
        b = roi_cupy.roi_align(torch.from_numpy(x), torch.from_numpy(rois), 7, 1.0, 2, True)
    numpy.testing.assert_array_equal(bits(a.numpy()), bits(b.numpy()))


def bits(array):
    return numpy.ascontiguousarray(array).view(numpy.uint8)
