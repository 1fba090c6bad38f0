"""roi_align_rotated and its backward on every backend: against the float64 reference, against
roi_align where a rotated box is an upright one, and against detectron2's and mmcv's own test
cases (their expected numbers, worked out by hand there, carried over as facts)."""
from __future__ import annotations

import functools
import math
import time

import numpy
import pytest
from conftest import (
    DTYPES,
    SAMPLING_RATIOS,
    SPATIAL_SCALES,
    TOLERANCE,
    assert_matches,
    compute_dtype,
    image_major,
    make_rng,
    per_image,
    random_features,
    random_rotated_boxes,
)
from reference import (
    roi_align_rotated_backward_ref,
    roi_align_rotated_geometry,
    roi_align_rotated_ref,
    rotated_samples,
    rotation,
)

import roi_cupy

# (aligned, clockwise): detectron2's default, mmcv's legacy rule, and each with clockwise angles.
FLAGS = [(True, False), (False, False), (True, True), (False, True)]
FLAG_IDS = ["aligned", "unaligned", "aligned-cw", "unaligned-cw"]


def run(backend, x, boxes, output_size, contiguous=True, **kwargs):
    """roi_align_rotated on ``backend`` with NumPy ``x`` and boxes ([K, 6] or a per-image list)."""
    if isinstance(boxes, list):
        boxes = [backend.asarray(b) for b in boxes]
    else:
        boxes = backend.asarray(boxes)
    with backend.active():
        out = roi_cupy.roi_align_rotated(
            backend.features(x, contiguous), boxes, output_size, **kwargs
        )
    return backend.to_numpy(out)


def run_backward(backend, g, boxes, shape, output_size, contiguous=True, **kwargs):
    with backend.active():
        grad = roi_cupy.roi_align_rotated_backward(
            backend.features(g, contiguous), backend.asarray(boxes), shape, output_size, **kwargs
        )
    return backend.to_numpy(grad)


def upright(rois):
    """Rotated rows (angle ignored) as roi_align's corner rows (cx -+ w/2, cy -+ h/2)."""
    b, cx, cy, w, h = (rois[:, i] for i in range(5))
    return numpy.stack([b, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def dyadic_boxes(rng, n, k, height, width):
    """Rotated rows whose centres are multiples of 1/8 and sizes of 1/4 (angle 0): with a
    power-of-two output size and sampling ratio every sample position is exact in binary."""
    centre = numpy.round(rng.uniform(-2, max(height, width) + 2, (k, 2)) * 8) / 8
    size = numpy.round(rng.uniform(0.5, max(height, width) * 1.3, (k, 2)) * 4) / 4
    index = rng.integers(0, n, (k, 1)).astype(numpy.float64)
    return numpy.concatenate([index, centre, size, numpy.zeros((k, 1))], axis=1)


# ----------------------------------------------------------------------------- the oracle itself
def test_reference_rotation():
    """Quarter turns are exact, angles reduce modulo 360, and the turn is counter-clockwise as
    an image is shown: the box's x axis (xx > 0) turns towards smaller y (up) for 90 degrees."""
    assert rotation(0.0) == (1.0, 0.0)
    assert rotation(90.0) == (0.0, 1.0)
    assert rotation(180.0) == (-1.0, -0.0)
    assert rotation(-90.0) == rotation(270.0) == (-0.0, -1.0)
    assert rotation(370.0) == rotation(10.0) == rotation(-350.0) == rotation(-710.0)
    assert rotation(190.0) == rotation(-170.0) and rotation(180.0) == rotation(-180.0)
    c, s = rotation(30.0)
    assert abs(c - math.sqrt(3) / 2) <= 2e-16 and abs(s - 0.5) <= 2e-16
    geometry = roi_align_rotated_geometry(
        numpy.array([0, 5.5, 5.5, 2, 2, 90]), 1, 2, 1.0, 1, True, False
    )
    # bin (0, 1) has xx = 0.5: at 90 degrees it lands at y = cy - 0.5, x = cx
    assert rotated_samples(0, 1, geometry) == [(4.5, 5.0)]


def test_reference_is_roi_align_at_angle_zero():
    from reference import roi_align_ref

    rng = make_rng("rotated reference upright")
    x = random_features(rng, (2, 2, 9, 11), numpy.float64)
    rois = dyadic_boxes(rng, 2, 7, 9, 11)
    for ratio in (1, 2, (2, 4)):
        numpy.testing.assert_array_equal(
            roi_align_rotated_ref(x, rois, (4, 2), 1.0, ratio, True),
            roi_align_ref(x, upright(rois), (4, 2), 1.0, ratio, True),
        )


# ----------------------------------------------------------------------------- the parameter grid
@functools.cache
def grid_case(dtype_name, aligned, clockwise, sampling_ratio, spatial_scale):
    dtype = numpy.dtype(dtype_name)
    rng = make_rng("rotated grid", dtype_name, aligned, clockwise, sampling_ratio, spatial_scale)
    n, c, h, w = 2, 3, 10, 12
    x = random_features(rng, (n, c, h, w), dtype)
    rois = random_rotated_boxes(rng, n, 8, h, w, spatial_scale, dtype=compute_dtype(dtype))
    kwargs = dict(
        spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned,
        clockwise=clockwise,
    )
    expected = roi_align_rotated_ref(x, rois, (3, 4), **kwargs)
    return x, rois, kwargs, expected


@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS, ids=str)
@pytest.mark.parametrize("aligned, clockwise", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_matches_reference(backend, dtype, aligned, clockwise, sampling_ratio):
    x, rois, kwargs, expected = grid_case(
        numpy.dtype(dtype).name, aligned, clockwise, sampling_ratio, 1.0
    )
    assert numpy.abs(expected).max() > 0.1
    out = run(backend, x, rois, (3, 4), **kwargs)
    assert_matches(out, expected, dtype, (len(rois), 3, 3, 4))


@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_strided_input_and_scales(backend, dtype, spatial_scale):
    x, rois, kwargs, expected = grid_case(numpy.dtype(dtype).name, True, False, 2, spatial_scale)
    out = run(backend, x, rois, (3, 4), contiguous=False, **kwargs)
    assert_matches(out, expected, dtype, (len(rois), 3, 3, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_boxes_as_per_image_list(backend, dtype):
    """A list of [L_i, 5] (one image without boxes) equals the image-major [K, 6] rows."""
    rng = make_rng("rotated list", numpy.dtype(dtype).name)
    x = random_features(rng, (3, 2, 8, 9), dtype)
    rois = random_rotated_boxes(rng, 3, 8, 8, 9, dtype=compute_dtype(dtype))
    rois[:, 0] = [0, 2, 0, 2, 2, 0, 0, 2]
    boxes = per_image(rois, 3)
    assert boxes[1].shape == (0, 5)
    out = run(backend, x, boxes, 2, sampling_ratio=2)
    assert_matches(out, roi_align_rotated_ref(x, image_major(rois), 2, sampling_ratio=2), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize(
    "case", ["no rois", "no channels", "empty lists", "zero height", "zero width", "no images"]
)
def test_empty_inputs(backend, case, dtype):
    rng = make_rng("rotated empty", case)
    shapes = {
        "no channels": (2, 0, 5, 5), "zero height": (2, 3, 0, 5), "zero width": (2, 3, 5, 0),
        "no images": (0, 3, 5, 5),
    }
    x = random_features(rng, shapes.get(case, (2, 3, 5, 5)), dtype)
    rois = random_rotated_boxes(rng, 2, 3, 5, 5, dtype=compute_dtype(dtype))
    if case in ("no rois", "no images"):
        rois = rois[:0]
    boxes = [rois[:0, 1:], rois[:0, 1:]] if case == "empty lists" else rois
    out = run(backend, x, boxes, (2, 3), sampling_ratio=2)
    k = 0 if case in ("no rois", "empty lists", "no images") else 3
    # an empty plane has no pixel to read: every sample contributes 0
    assert_matches(out, numpy.zeros((k, x.shape[1], 2, 3)), dtype)
    grad = run_backward(
        backend, random_features(rng, (k, x.shape[1], 2, 3), dtype), rois[:k], x.shape, (2, 3)
    )
    assert_matches(grad, numpy.zeros(x.shape), dtype)


# ----------------------------------------------------------------------------- angles
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_equal_turns_give_equal_numbers(backend, dtype):
    """The angle is reduced exactly in degrees: 370 is 10 is -350, -90 is 270, 720.5 is 0.5,
    190 is -170, bit for bit; clockwise is the negated angle."""
    rng = make_rng("rotated turns", numpy.dtype(dtype).name)
    x = random_features(rng, (1, 2, 9, 9), dtype)
    rois = random_rotated_boxes(rng, 1, 7, 9, 9, dtype=dtype)
    for a, b in [(370.0, 10.0), (-350.0, 10.0), (-90.0, 270.0), (720.5, 0.5), (190.0, -170.0),
                 (-1e6 - 30.0, -310.0), (180.0, -180.0)]:
        ra, rb = rois.copy(), rois.copy()
        ra[:, 5], rb[:, 5] = a, b
        numpy.testing.assert_array_equal(run(backend, x, ra, 3), run(backend, x, rb, 3))
    flipped = rois.copy()
    flipped[:, 5] = -rois[:, 5]
    numpy.testing.assert_array_equal(
        run(backend, x, rois, 3, clockwise=True), run(backend, x, flipped, 3)
    )


@pytest.mark.parametrize("ratio", [1, 2, (2, 4), 8], ids=str)
def test_angle_zero_is_roi_align(backend, ratio):
    """At angle 0 a rotated box is the upright box (cx -+ w/2, cy -+ h/2) of roi_align
    (aligned=True). With exact sample positions (dyadic boxes, power-of-two bins and sampling)
    both take the same samples, but add them up in different ways (roi_align per-pixel weights,
    on every backend; the rotated op sample by sample in its kernels): float64's tolerance."""
    rng = make_rng("rotated upright", ratio)
    x = random_features(rng, (2, 3, 10, 12), numpy.float64)
    rois = dyadic_boxes(rng, 2, 16, 10, 12)
    for scale in (1.0, 0.5):
        out = run(backend, x, rois, (4, 2), spatial_scale=scale, sampling_ratio=ratio)
        with backend.active():
            upright_out = backend.to_numpy(roi_cupy.roi_align(
                backend.asarray(x), backend.asarray(upright(rois)), (4, 2), scale, ratio, True
            ))
        assert_matches(out, upright_out, numpy.float64)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_angle_zero_matches_roi_align_for_any_box(backend, dtype, aligned):
    """Continuous boxes: the sample positions round differently (the rotated op adds the
    centre to an offset from it, roi_align walks from a corner), so the two agree within the
    dtype's tolerance, not bit for bit. Unaligned, both clamp sizes to 1 but grow a smaller box
    differently (roi_align from its corner): boxes of at least 1 x 1 only."""
    rng = make_rng("rotated upright continuous", numpy.dtype(dtype).name, aligned)
    x = random_features(rng, (2, 3, 10, 12), dtype)
    rois = random_rotated_boxes(rng, 2, 16, 10, 12)
    rois[:, 5] = 0.0
    if not aligned:
        rois = rois[(rois[:, 3] >= 1) & (rois[:, 4] >= 1)]
    kwargs = dict(sampling_ratio=2, aligned=aligned)
    out = run(backend, x, rois.astype(compute_dtype(dtype)), (3, 4), **kwargs)
    with backend.active():
        boxes = backend.asarray(upright(rois).astype(compute_dtype(dtype)))
        expected = roi_cupy.roi_align(backend.asarray(x), boxes, (3, 4), 1.0, 2, aligned)
    expected = backend.to_numpy(expected).astype(numpy.float64)
    assert_matches(out, expected, dtype, scale=1.0)


def quarter_turned(x, rois, turns):
    """``(map, boxes)`` on which roi_align (aligned=True) takes the samples that
    roi_align_rotated takes on ``x`` with ``rois`` turned by ``turns`` quarter turns: the map
    transposed and flipped, the box's centre moved with it (H x W map, box coordinates)."""
    _, _, h, w = x.shape
    b, cx, cy, bw, bh = (rois[:, i] for i in range(5))
    if turns == 1:  # y = cy - xx, x = cx + yy: rows of the new map run along x
        m, rows, cols = x.transpose(0, 1, 3, 2)[:, :, :, ::-1], cx, h - cy
    elif turns == 2:  # y = cy - yy, x = cx - xx
        m, rows, cols = x[:, :, ::-1, ::-1], h - cy, w - cx
    else:  # y = cy + xx, x = cx - yy
        m, rows, cols = x.transpose(0, 1, 3, 2)[:, :, ::-1, :], w - cx, cy
    boxes = numpy.stack([b, cols - bw / 2, rows - bh / 2, cols + bw / 2, rows + bh / 2], axis=1)
    return numpy.ascontiguousarray(m), boxes


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("angle", [90.0, 180.0, 270.0, -90.0, 450.0], ids=str)
def test_quarter_turns_are_roi_align_on_a_turned_map(backend, dtype, angle):
    """A quarter turn is exact (cos and sin are 0 and +-1), so with dyadic boxes the samples are
    roi_align's on the transposed and flipped map, at exactly the same positions; one axis is
    walked backwards, so the sums differ by rounding only."""
    rng = make_rng("rotated quarter", angle, numpy.dtype(dtype).name)
    x = random_features(rng, (2, 3, 10, 12), dtype)
    rois = dyadic_boxes(rng, 2, 16, 10, 12)
    rois[:, 5] = angle
    out = run(backend, x, rois.astype(dtype), (4, 2), sampling_ratio=(2, 4))
    turned, boxes = quarter_turned(x, rois, int(angle // 90) % 4)
    with backend.active():
        expected = roi_cupy.roi_align(
            backend.asarray(turned), backend.asarray(boxes.astype(dtype)), (4, 2), 1.0, (2, 4),
            True,
        )
    assert_matches(out, backend.to_numpy(expected).astype(numpy.float64), dtype, scale=1.0)


# ----------------------------------------------------------------------------- peers' cases
D2_UPRIGHT = numpy.array([
    [4.5, 5.0, 5.5, 6.0],
    [7.0, 7.5, 8.0, 8.5],
    [9.5, 10.0, 10.5, 11.0],
    [12.0, 12.5, 13.0, 13.5],
])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("quarter", [0, 1, 2, 3])
def test_detectron2_quarter_turns(backend, dtype, quarter):
    """detectron2 tests/layers/test_roi_align_rotated.py, test_forward_output_0_90_180_270: the
    box (1, 1, 3, 3) of arange(25).reshape(5, 5) at 4 x 4, adaptive; turning the box by 90
    degrees counter-clockwise turns the crop by 90 degrees clockwise."""
    img = numpy.arange(25, dtype=dtype).reshape(1, 1, 5, 5)
    rois = numpy.array([[0, 2, 2, 2, 2, 90 * quarter]], dtype=compute_dtype(dtype))
    out = run(backend, img, rois, 4, sampling_ratio=0)
    expected = numpy.rot90(D2_UPRIGHT, -quarter).reshape(1, 1, 4, 4)
    assert_matches(out, expected, dtype)
    numpy.testing.assert_array_equal(out.astype(numpy.float64), expected)  # exact numbers


def test_detectron2_empty_box(backend):
    """detectron2 test_empty_box: a box of size 0 x 0 gives zeros at 7 x 7, adaptive."""
    img = random_features(make_rng("rotated d2 empty"), (1, 1, 5, 5), numpy.float32)
    rois = numpy.array([[0, 2, 3, 0, 0, 0]], dtype=numpy.float32)
    assert_matches(run(backend, img, rois, 7, sampling_ratio=0), numpy.zeros((1, 1, 7, 7)),
                   numpy.float32)


def test_detectron2_gradient_equals_roi_align(backend):
    """detectron2 test_roi_align_rotated_gradient_cuda: the gradient of sum(output) for the
    rotated boxes (4.5, 4.5, 9, 9, 0), (2, 7, 4, 4, 0), (7, 7, 4, 4, 0) equals roi_align's
    (aligned) for (0, 0, 9, 9), (0, 5, 4, 9), (5, 5, 9, 9); 5 x 5 bins, sampling 2."""
    rotated = numpy.array([[0, 4.5, 4.5, 9, 9, 0], [0, 2, 7, 4, 4, 0], [0, 7, 7, 4, 4, 0]])
    boxes = numpy.array([[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9]], dtype=numpy.float64)
    g = numpy.ones((3, 1, 5, 5))
    grad = run_backward(backend, g, rotated, (1, 1, 10, 10), 5, sampling_ratio=2)
    with backend.active():
        expected = roi_cupy.roi_align_backward(
            backend.asarray(g), backend.asarray(boxes), (1, 1, 10, 10), 5, 1.0, 2, True
        )
    assert grad.any()
    assert_matches(grad, backend.to_numpy(expected), numpy.float64)


# mmcv tests/test_ops/test_roi_align_rotated.py: (input, roi, output, input gradient for an
# all-ones output gradient) at 2 x 2 bins, spatial_scale 1, sampling_ratio 2, aligned=True.
# mmcv takes the angle in radians: its pi / 2 is 90 here.
MMCV_CASES = [
    ([[[[1., 2.], [3., 4.]]]], [0., 0.5, 0.5, 1., 1., 0],
     [[[[1.0, 1.25], [1.5, 1.75]]]],
     [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2.], [3., 4.]]]], [0., 0.5, 0.5, 1., 1., 90],
     [[[[1.5, 1], [1.75, 1.25]]]],
     [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2.], [3., 4.]], [[4., 3.], [2., 1.]]]], [0., 0.5, 0.5, 1., 1., 0],
     [[[[1.0, 1.25], [1.5, 1.75]], [[4.0, 3.75], [3.5, 3.25]]]],
     [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]],
     [0., 1.5, 1.5, 3., 3., 0],
     [[[[1.9375, 4.75], [7.5625, 10.375]]]],
     [[[[0.47265625, 0.42968750, 0.42968750, 0.04296875],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.04296875, 0.03906250, 0.03906250, 0.00390625]]]]),
    ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]],
     [0., 1.5, 1.5, 3., 3., 90],
     [[[[7.5625, 1.9375], [10.375, 4.75]]]],
     [[[[0.47265625, 0.42968750, 0.42968750, 0.04296875],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.04296875, 0.03906250, 0.03906250, 0.00390625]]]]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("case", range(len(MMCV_CASES)))
def test_mmcv_cases(backend, dtype, case):
    """Every number of these cases is a short dyadic fraction: exact in every dtype."""
    x, roi, output, grad = (numpy.array(v) for v in MMCV_CASES[case])
    rois = roi[None].astype(compute_dtype(dtype))
    kwargs = dict(spatial_scale=1.0, sampling_ratio=2, aligned=True)
    out = run(backend, x.astype(dtype), rois, (2, 2), **kwargs)
    numpy.testing.assert_array_equal(out.astype(numpy.float64), output)
    g = numpy.ones(output.shape, dtype=dtype)
    got = run_backward(backend, g, rois, x.shape, (2, 2), **kwargs)
    numpy.testing.assert_array_equal(got.astype(numpy.float64), grad)


@pytest.mark.parametrize("clockwise", [False, True], ids=["ccw", "cw"])
def test_unaligned_by_hand(backend, clockwise):
    """mmcv's aligned=False: no half-pixel shift, sizes clamped to 1. On the plane 10 h + w
    (4 x 4) the box (cx, cy) = (1.25, 2), 0.5 x 0.25 (clamped to 1 x 1), 1 bin, 2 x 2 samples:
    offsets +-0.25 from the centre, so at angle 0 the samples' mean is the centre, 20 + 1.25.
    At 90 degrees (counter-clockwise) the offsets turn but their mean stays: 21.25 again; at 30
    degrees too. With the shift (aligned=True) the centre moves to (0.75, 1.5): 15.75."""
    x = (10.0 * numpy.arange(4)[:, None] + numpy.arange(4)[None, :]).reshape(1, 1, 4, 4)
    for angle in (0.0, 90.0, 30.0):
        rois = numpy.array([[0, 1.25, 2.0, 0.5, 0.25, angle]])
        out = run(backend, x, rois, 1, sampling_ratio=2, aligned=False, clockwise=clockwise)
        numpy.testing.assert_allclose(out.ravel(), [21.25], rtol=0, atol=1e-13)
        out = run(backend, x, rois, 1, sampling_ratio=2, aligned=True, clockwise=clockwise)
        numpy.testing.assert_allclose(out.ravel(), [15.75], rtol=0, atol=1e-13)


def test_clockwise_by_hand(backend):
    """A 2 x 1 box (2 wide) at (cx, cy) = (1.5, 1.5) on the plane 10 h + w, 1 x 2 bins, one
    sample each, aligned=False: the bins' samples are 0.5 left and right of the centre. At 90
    degrees counter-clockwise the right-hand bin moves up (y - 0.5): 10 * 1 + 1.5 = 11.5 and
    the left one down: 21.5; clockwise the reverse."""
    x = (10.0 * numpy.arange(4)[:, None] + numpy.arange(4)[None, :]).reshape(1, 1, 4, 4)
    rois = numpy.array([[0, 1.5, 1.5, 2.0, 1.0, 90.0]])
    out = run(backend, x, rois, (1, 2), sampling_ratio=1, aligned=False)
    numpy.testing.assert_allclose(out.ravel(), [21.5, 11.5], rtol=0, atol=1e-13)
    out = run(backend, x, rois, (1, 2), sampling_ratio=1, aligned=False, clockwise=True)
    numpy.testing.assert_allclose(out.ravel(), [11.5, 21.5], rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------- robustness
# Rows a backend must give zeros without reading anything (validate=False lets them through).
INVALID_ROWS = [
    [-1, 1, 1, 4, 4, 10],
    [2, 1, 1, 4, 4, 10],          # N = 2
    [1e20, 1, 1, 4, 4, 10],
    [-1.5, 1, 1, 4, 4, 10],       # truncates to -1
    [0, numpy.nan, 1, 4, 4, 10],
    [1, 1, 1, numpy.inf, 4, 10],
    [0, 1, 1, 4, 4, numpy.nan],   # the angle too
    [1, 1, 1, 4, 4, -numpy.inf],
    [numpy.nan, 1, 1, 4, 4, 10],
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_invalid_rois_give_zeros(backend, dtype):
    rng = make_rng("rotated invalid", numpy.dtype(dtype).name)
    x = random_features(rng, (2, 2, 6, 6), dtype)
    valid = numpy.array([[0, 2.3, 2.7, 4.2, 5.1, 33], [1.9, 3.1, 2.2, 5.5, 3.3, -70]])
    rois = numpy.concatenate([valid, INVALID_ROWS]).astype(compute_dtype(dtype))
    for aligned, ratio in [(False, -1), (True, 2)]:
        kwargs = dict(sampling_ratio=ratio, aligned=aligned, validate=False)
        out = run(backend, x, rois, 2, **kwargs)
        expected = roi_align_rotated_ref(x, rois, 2, 1.0, ratio, aligned)
        assert not expected[len(valid):].any() and expected[: len(valid)].all()
        assert_matches(out, expected, dtype)
        g = random_features(rng, out.shape, dtype)
        grad = run_backward(backend, g, rois, x.shape, 2, **kwargs)
        expected = roi_align_rotated_backward_ref(g[: len(valid)], rois[: len(valid)], x.shape,
                                                  1.0, ratio, aligned)
        assert_matches(grad, expected, dtype)


@pytest.mark.parametrize("row, message", [
    ([0, 1, 1, 4, 4, numpy.nan], "boxes must be finite, got row 1"),
    ([0, 1, 1, 4, 4, numpy.inf], "boxes must be finite, got row 1"),
    ([2, 1, 1, 4, 4, 0], r"batch index must be an integer in \[0, 2\), got 2.0 in row 1"),
    ([0.5, 1, 1, 4, 4, 0], "got 0.5 in row 1"),
    ([0, 1, 1, 4, 4, 1e39], "boxes must lie within float32's range"),
], ids=["nan angle", "inf angle", "index", "fractional", "beyond float32"])
def test_validation_rejects(backend, row, message):
    x = random_features(make_rng("rotated validate"), (2, 1, 5, 5), numpy.float32)
    rois = numpy.array([[1, 2, 2, 2, 2, 45], row], dtype=numpy.float64)
    with pytest.raises(ValueError, match=message):
        run(backend, x, rois, 2)
    with pytest.raises(ValueError, match=message):
        run_backward(backend, numpy.ones((2, 1, 2, 2), numpy.float32), rois, x.shape, 2)


@pytest.mark.parametrize("sampling_ratio", [1025, (2, 10**9), (10**9, -1)], ids=str)
def test_a_fixed_sampling_ratio_is_at_most_1024(sampling_ratio):
    """A turned grid's samples are visited one by one: a fixed ratio past 1024 per axis (a
    million samples a bin) is refused, forward and backward, before any work."""
    x = numpy.ones((1, 1, 4, 4), numpy.float32)
    rois = numpy.array([[0, 2.0, 2.0, 3.0, 3.0, 30.0]], numpy.float32)
    message = r"sampling_ratio must be at most 1024 along each axis for this op"
    with pytest.raises(ValueError, match=message):
        roi_cupy.roi_align_rotated(x, rois, 2, sampling_ratio=sampling_ratio)
    with pytest.raises(ValueError, match=message):
        roi_cupy.roi_align_rotated_backward(numpy.ones((1, 1, 2, 2), numpy.float32), rois,
                                            x.shape, 2, sampling_ratio=sampling_ratio)


@pytest.mark.parametrize("adapter", ["torch", "jax"])
def test_the_adapters_refuse_a_fixed_ratio_past_1024_at_the_call(adapter):
    """The framework adapters check the ratio where they check their other arguments: at the
    call, not inside a custom op or a host callback."""
    framework = pytest.importorskip(adapter, reason=f"{adapter} is an optional extra")
    if adapter == "torch":
        import roi_cupy.torch as module

        x, rois = framework.ones(1, 1, 4, 4), framework.tensor([[0, 2.0, 2.0, 3.0, 3.0, 30.0]])
    else:
        import roi_cupy.jax as module

        x = framework.numpy.ones((1, 1, 4, 4))
        rois = framework.numpy.array([[0, 2.0, 2.0, 3.0, 3.0, 30.0]])
    with pytest.raises(ValueError, match="sampling_ratio must be at most 1024"):
        module.roi_align_rotated(x, rois, 2, sampling_ratio=(2, 2000))


def test_the_largest_fixed_sampling_ratio_is_bounded_work(backend):
    """1024 x 1024 samples in each of a box's 2 x 2 bins, a third of them on the map: a second
    or so, and on ones the mean is the share of samples inside the map."""
    x = numpy.ones((1, 1, 6, 6), numpy.float32)
    # Upright, 12 x 12 centred on the map's corner pixel (0, 0): only samples in [-1, 6] count.
    rois = numpy.array([[0, 0.0, 0.0, 12.0, 12.0, 0.0]], numpy.float32)
    start = time.monotonic()
    out = run(backend, x, rois, 2, sampling_ratio=1024, aligned=False)
    assert time.monotonic() - start < 60
    # Bin (ph, pw) spans [-6 + 6 ph, 6 ph] along each axis: the samples in [-1, 6] of it.
    share = [numpy.mean((t >= -1) & (t <= 6)) for t in
             (-6 + 6 * p + (numpy.arange(1024) + 0.5) * 6 / 1024 for p in range(2))]
    expected = numpy.array([[share[ph] * share[pw] for pw in range(2)] for ph in range(2)])
    assert_matches(out, expected[None, None], numpy.float32, scale=1.0)


def test_argument_errors():
    x = numpy.zeros((1, 1, 4, 4), numpy.float32)
    with pytest.raises(ValueError, match=r"boxes must have shape \[K, 6\] or be a list of "
                                         r"\[L, 5\] per image, got \(1, 5\)"):
        roi_cupy.roi_align_rotated(x, numpy.zeros((1, 5), numpy.float32), 2)
    with pytest.raises(ValueError, match=r"boxes\[0\] must have shape \[L, 5\]"):
        roi_cupy.roi_align_rotated(x, [numpy.zeros((1, 4), numpy.float32)], 2)
    with pytest.raises(TypeError, match=r"boxes must be an array \[K, 6\] or a list of one "
                                        r"array \[L_i, 5\]"):
        roi_cupy.roi_align_rotated(x, [[0, 1, 1, 2, 2, 0]], 2)
    with pytest.raises(TypeError, match="clockwise must be a bool"):
        roi_cupy.roi_align_rotated(x, numpy.zeros((0, 6), numpy.float32), 2, clockwise=1)
    with pytest.raises(TypeError, match="sampling_ratio must be an int or a pair"):
        roi_cupy.roi_align_rotated(x, numpy.zeros((0, 6), numpy.float32), 2, sampling_ratio=1.5)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        roi_cupy.roi_align_rotated_backward(
            numpy.zeros((1, 1, 2, 3), numpy.float32), numpy.zeros((1, 6), numpy.float32),
            (1, 1, 4, 4), 2,
        )


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("angle", [0.0, 90.0, 30.0])
def test_huge_adaptive_grid(backend, dtype, angle):
    """A 10^4-pixel box centred on a 4 x 4 map of ones, adaptive: 10^4 x 10^4 samples in its one
    bin, of which only those near the map are visited. Upright or a quarter turn, the samples
    lie at 2 - 5000 + i + 0.5 along each axis, 5 of them inside [-1, 4] (-0.5 .. 3.5): 25 / 10^8.
    At 30 degrees the unit-spaced grid holds about as many points in the 5 x 5 square
    [-1, 4]^2: between 16 and 36."""
    x = numpy.ones((1, 1, 4, 4), dtype)
    rois = numpy.array([[0, 2.5, 2.5, 1e4, 1e4, angle]], dtype)
    out = run(backend, x, rois, 1)
    if angle == 30.0:
        assert 16 / 1e8 <= float(out.ravel()[0]) <= 36 / 1e8
    else:
        assert_matches(out, numpy.full((1, 1, 1, 1), 25 / 1e8), dtype, scale=1.0)
    grad = run_backward(backend, numpy.ones((1, 1, 1, 1), dtype), rois, x.shape, 1)
    numpy.testing.assert_allclose(float(grad.sum()), float(out.ravel()[0]), rtol=1e-5)


def test_numpy_and_emulator_agree_on_many_boxes():
    """Many boxes of every kind and angle, a fixed sampling pair and adaptive: the NumPy backend
    and the kernels (emulated) agree within float32's tolerance."""
    from conftest import availability

    ok, why = availability("emulator")
    if not ok:
        pytest.skip(why)
    rng = make_rng("rotated many")
    x = random_features(rng, (2, 4, 16, 20), numpy.float32)
    rois = random_rotated_boxes(rng, 2, 64, 16, 20, dtype=numpy.float32)
    for ratio in (-1, (3, 1)):
        ours = roi_cupy.roi_align_rotated(x, rois, (5, 3), 0.75, ratio)
        with roi_cupy.use_backend("emulator"):
            kernels = roi_cupy.roi_align_rotated(x, rois, (5, 3), 0.75, ratio)
        assert_matches(ours, kernels.astype(numpy.float64), numpy.float32, scale=1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_nonfinite_features_reach_only_their_bins(backend, dtype):
    """A NaN and an inf pixel reach exactly the bins whose samples read them (a corner of
    weight 0 included, as in the kernels: 0 * inf is NaN), the other bins keep their numbers."""
    rng = make_rng("rotated nonfinite", numpy.dtype(dtype).name)
    x = random_features(rng, (1, 2, 8, 8), dtype)
    x[0, 0, 3, 4] = numpy.nan
    x[0, 1, 5, 2] = numpy.inf
    rois = numpy.array([[0, 4, 4, 6, 5, 30], [0, 3.5, 4.5, 3, 3, -60]], compute_dtype(dtype))
    out = run(backend, x, rois, 3, sampling_ratio=2)
    clean = x.astype(numpy.float64)
    reads = {}
    for channel, pixel in ((0, (3, 4)), (1, (5, 2))):
        probe = numpy.zeros(x.shape)
        probe[0, channel][pixel] = 1.0
        # a bin reads the pixel iff the reference with a 1 there (0 elsewhere) weighs it
        reads[channel] = roi_align_rotated_ref(probe, rois, 3, sampling_ratio=2)[:, channel] != 0
        clean[0, channel][pixel] = 0.0
    expected = roi_align_rotated_ref(clean, rois, 3, sampling_ratio=2)
    assert reads[0].any() and reads[1].any() and not reads[0].all()
    got = out.astype(numpy.float64)
    assert numpy.isnan(got[:, 0][reads[0]]).all()
    assert not numpy.isfinite(got[:, 1][reads[1]]).any()
    finite = numpy.stack([~reads[0], ~reads[1]], axis=1)
    assert numpy.isfinite(got[finite]).all()
    assert_matches(
        numpy.where(finite, out, 0).astype(dtype), numpy.where(finite, expected, 0), dtype
    )


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("aligned, clockwise", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("sampling_ratio", [-1, (2, 1)], ids=str)
def test_finite_differences(backend, aligned, clockwise, sampling_ratio):
    """Central differences of <roi_align_rotated(x), g> in every input element match the
    backward (float64; continuous boxes keep every sample off pixel boundaries)."""
    rng = make_rng("rotated fd", aligned, clockwise, sampling_ratio)
    shape = (2, 2, 5, 6)
    x = random_features(rng, shape, numpy.float64)
    rois = random_rotated_boxes(rng, 2, 5, 5, 6)
    g = random_features(rng, (5, 2, 2, 3), numpy.float64)
    kwargs = dict(sampling_ratio=sampling_ratio, aligned=aligned, clockwise=clockwise)
    grad = run_backward(backend, g, rois, shape, (2, 3), **kwargs)
    eps = 1e-3
    numeric = numpy.empty(shape)
    for i in numpy.ndindex(shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += eps
        minus[i] -= eps
        up = (run(backend, plus, rois, (2, 3), **kwargs) * g).sum()
        down = (run(backend, minus, rois, (2, 3), **kwargs) * g).sum()
        numeric[i] = (up - down) / (2 * eps)
    assert numpy.abs(numeric).max() > 0
    numpy.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-9)


@functools.cache
def backward_case(dtype_name, aligned, clockwise, sampling_ratio):
    dtype = numpy.dtype(dtype_name)
    rng = make_rng("rotated backward", dtype_name, aligned, clockwise, sampling_ratio)
    shape = (2, 3, 9, 10)
    x = random_features(rng, shape, dtype)
    rois = random_rotated_boxes(rng, 2, 8, 9, 10, 0.5, dtype=compute_dtype(dtype))
    g = random_features(rng, (8, 3, 3, 2), dtype)
    kwargs = dict(
        spatial_scale=0.5, sampling_ratio=sampling_ratio, aligned=aligned, clockwise=clockwise
    )
    expected = roi_align_rotated_backward_ref(g, rois, shape, **kwargs)
    return x, rois, g, kwargs, expected


@pytest.mark.parametrize("sampling_ratio", [-1, 2, (1, 3), (0, 2)], ids=str)
@pytest.mark.parametrize("aligned, clockwise", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_backward_matches_reference(backend, dtype, aligned, clockwise, sampling_ratio):
    x, rois, g, kwargs, expected = backward_case(
        numpy.dtype(dtype).name, aligned, clockwise, sampling_ratio
    )
    grad = run_backward(backend, g, rois, x.shape, (3, 2), contiguous=False, **kwargs)
    assert_matches(grad, expected, dtype, x.shape)


@pytest.mark.parametrize("sampling_ratio", [-1, 2, (1, 3), (0, 2)], ids=str)
@pytest.mark.parametrize("aligned, clockwise", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_adjoint(backend, dtype, aligned, clockwise, sampling_ratio):
    """<roi_align_rotated(x), g> == <x, roi_align_rotated_backward(g)>."""
    x, rois, g, kwargs, _ = backward_case(numpy.dtype(dtype).name, aligned, clockwise,
                                          sampling_ratio)
    out = run(backend, x, rois, (3, 2), **kwargs)
    grad = run_backward(backend, g, rois, x.shape, (3, 2), **kwargs)
    lhs = float((out.astype(numpy.float64) * g.astype(numpy.float64)).sum())
    terms = x.astype(numpy.float64) * grad.astype(numpy.float64)
    scale = float(numpy.abs(terms).sum())
    assert scale > 0
    assert abs(lhs - terms.sum()) <= TOLERANCE[numpy.dtype(dtype)] * scale


def test_backward_is_deterministic(backend):
    x, rois, g, kwargs, _ = backward_case("float32", True, False, -1)
    first = run_backward(backend, g, rois, x.shape, (3, 2), **kwargs)
    if backend.name == "cuda":
        pytest.skip("the CUDA backward adds with atomics: bits may vary from run to run")
    numpy.testing.assert_array_equal(first, run_backward(backend, g, rois, x.shape, (3, 2),
                                                         **kwargs))


def test_numpy_chunks_do_not_change_results(monkeypatch):
    """The NumPy backend's bounded chunks (of bins, rows, samples and gathered features), made
    tiny so that RoIs, bins and rows are split across chunks, give the same numbers."""
    from roi_cupy._numpy import roi_align_rotated as module

    x, rois, g, kwargs, _ = backward_case("float64", True, False, (0, 2))
    out = roi_cupy.roi_align_rotated(x, rois, (3, 2), **kwargs)
    grad = roi_cupy.roi_align_rotated_backward(g, rois, x.shape, (3, 2), **kwargs)
    for name, value in (("_BINS", 4), ("_ROWS", 3), ("_SAMPLES", 5), ("_GATHER", 64)):
        monkeypatch.setattr(module, name, value)
    assert_matches(roi_cupy.roi_align_rotated(x, rois, (3, 2), **kwargs), out, numpy.float64)
    assert_matches(roi_cupy.roi_align_rotated_backward(g, rois, x.shape, (3, 2), **kwargs), grad,
                   numpy.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_64_bit_index_path(backend, dtype, monkeypatch):
    """With the 32-bit limit lowered below every array's size, the kernels' long long
    instantiations run, with the numbers of the reference."""
    if backend.name == "numpy":
        pytest.skip("the NumPy backend has no index width")
    from roi_cupy._cuda import launch

    names = []
    original = launch.kernel_name
    monkeypatch.setattr(launch, "INDEX32_LIMIT", 20)
    monkeypatch.setattr(
        launch, "kernel_name", lambda *a: names.append(original(*a)) or original(*a)
    )
    x, rois, g, kwargs, expected = backward_case(numpy.dtype(dtype).name, True, True, (1, 3))
    grad = run_backward(backend, g, rois, x.shape, (3, 2), **kwargs)
    assert_matches(grad, expected, dtype, x.shape)
    out = run(backend, x, rois, (3, 2), **kwargs)
    assert_matches(out, roi_align_rotated_ref(x, rois, (3, 2), **kwargs), dtype)
    assert names and all(name.endswith("long long>") for name in names), names
    assert any(name.startswith("roi_align_rotated_forward<") for name in names)
