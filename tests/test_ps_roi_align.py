"""ps_roi_align and ps_roi_align_backward on every backend against the float64 reference, and the
facts docs/semantics.md states about them."""
from __future__ import annotations

import functools
import time

import numpy
import pytest
from conftest import (
    assert_work_split_keeps_numbers,
    DTYPES,
    Backend,
    availability,
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
from reference import (
    ps_channel,
    ps_roi_align_backward_ref,
    ps_roi_align_ref,
    roi_align_backward_ref,
    roi_align_ref,
    separable_backward_expected,
    separable_expected,
)

import roi_cupy
from roi_cupy._cuda import launch

SIZE = (3, 4)  # PH, PW of the grid cases: 12 channels per output channel
GROUPS = 2


def on(backend, boxes):
    """Boxes ([K, 5] or a per-image list) as the backend's arrays."""
    if isinstance(boxes, list):
        return [backend.asarray(b) for b in boxes]
    return backend.asarray(boxes)


def forward(backend, x, boxes, output_size, contiguous=True, **kwargs):
    """ps_roi_align on ``backend`` with NumPy ``x`` and boxes ([K, 5] or a per-image list)."""
    with backend.active():
        out = roi_cupy.ps_roi_align(
            backend.features(x, contiguous), on(backend, boxes), output_size, **kwargs
        )
    return backend.to_numpy(out)


def backward(backend, g, boxes, shape, output_size, contiguous=True, **kwargs):
    with backend.active():
        grad = roi_cupy.ps_roi_align_backward(
            backend.features(g, contiguous), on(backend, boxes), shape, output_size, **kwargs
        )
    return backend.to_numpy(grad)


def channel_planes(n, groups, pooled, h, w, dtype=numpy.float64):
    """Features whose channel ``ch`` is the constant ``ch + 1``."""
    c = groups * pooled[0] * pooled[1]
    x = numpy.broadcast_to((numpy.arange(c) + 1.0)[None, :, None, None], (n, c, h, w))
    return numpy.ascontiguousarray(x, dtype=dtype)


# ----------------------------------------------------------------------------- the oracle itself
def test_reference_is_roi_align_on_each_bins_channel():
    """Two independent encodings: the PS loop reference, and RoI Align (aligned=True) of every
    channel with each bin picked from its own channel."""
    rng = make_rng("ps align reference")
    x = random_features(rng, (2, GROUPS * 6, 9, 11), numpy.float64)
    for ratio in SAMPLING_RATIOS:
        rois = random_boxes(rng, 2, 7, 9, 11)
        full = roi_align_ref(x, rois, (2, 3), 0.5, ratio, True)
        out = ps_roi_align_ref(x, rois, (2, 3), 0.5, ratio)
        for c in range(GROUPS):
            for ph in range(2):
                for pw in range(3):
                    channel = ps_channel(c, ph, pw, 2, 3)
                    numpy.testing.assert_array_equal(out[:, c, ph, pw], full[:, channel, ph, pw])


def test_reference_backward_is_roi_align_backward_on_each_bins_channel():
    rng = make_rng("ps align reference backward")
    shape = (2, GROUPS * 6, 9, 11)
    rois = random_boxes(rng, 2, 7, 9, 11)
    g = random_features(rng, (7, GROUPS, 2, 3), numpy.float64)
    full_g = numpy.zeros((7, shape[1], 2, 3))
    for c in range(GROUPS):
        for ph in range(2):
            for pw in range(3):
                full_g[:, ps_channel(c, ph, pw, 2, 3), ph, pw] = g[:, c, ph, pw]
    numpy.testing.assert_allclose(
        ps_roi_align_backward_ref(g, rois, shape, 1.0, 2),
        roi_align_backward_ref(full_g, rois, shape, 1.0, 2, True),
        rtol=0, atol=1e-15,
    )


# ----------------------------------------------------------------------------- hand values
def test_each_bin_reads_its_own_channel(backend):
    """Constant planes (channel ch holds ch + 1) and boxes inside the map: every sample reads its
    plane's constant, so bin (ph, pw) of output channel c is (c * PH + ph) * PW + pw + 1."""
    pooled = (2, 3)
    x = channel_planes(2, 3, pooled, 8, 9)
    rois = numpy.array([[0, 1.0, 1.0, 7.0, 6.0], [1, 2.5, 0.5, 5.0, 7.5]])
    out = forward(backend, x, rois, pooled, sampling_ratio=2)
    expected = numpy.arange(3 * 6, dtype=numpy.float64).reshape(1, 3, 2, 3) + 1
    assert_matches(out, numpy.repeat(expected, 2, axis=0), numpy.float64)


def test_half_pixel_shift_and_no_minimum_size(backend):
    """Box (0, 0, 4, 4), one bin per pixel and one sample each: aligned samples sit on pixel
    centres (roi_align with aligned=False would sit half a pixel off). Plane 10 h + w."""
    base = 10.0 * numpy.arange(4)[:, None] + numpy.arange(4)[None, :]
    x = numpy.repeat(base[None, None], 16, axis=1)  # 16 channels: one group of 4 x 4 bins
    rois = numpy.array([[0, 0.0, 0.0, 4.0, 4.0]])
    out = forward(backend, x, rois, 4, sampling_ratio=1)
    assert_matches(out, base.reshape(1, 1, 4, 4), numpy.float64)


# box (x1, y1, x2, y2), sampling_ratio, value on a plane of ones (every channel)
DEGENERATE = [
    ((2, 1, 2, 1), -1, 0.0),  # zero size, adaptive: no samples (torchvision: NaN)
    ((2, 1, 2, 3), 0, 0.0),   # zero width only
    ((3, 1, 1, 3), -1, 0.0),  # reversed in x, adaptive (torchvision: -0.0)
    ((3, 3, 1, 1), -1, 0.0),  # reversed in both
    ((2, 1, 2, 1), 2, 1.0),   # zero size, fixed ratio: every sample on one inside point
    ((3, 2, 1, 0), 2, 1.0),   # reversed, fixed ratio: samples walk backwards, all inside
    ((0.1, 0.1, 0.3, 0.2), -1, 1.0),  # tiny: one sample per bin
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("box, sampling_ratio, value", DEGENERATE, ids=str)
def test_degenerate_boxes(backend, dtype, box, sampling_ratio, value):
    x = numpy.ones((1, 4, 4, 4), dtype=dtype)
    rois = numpy.array([[0, *box]], dtype=compute_dtype(dtype))
    out = forward(backend, x, rois, 2, sampling_ratio=sampling_ratio)
    assert_matches(out, numpy.full((1, 1, 2, 2), value), dtype)
    assert_matches(out, ps_roi_align_ref(x, rois, 2, 1.0, sampling_ratio), dtype)


# ----------------------------------------------------------------------------- the parameter grid
@functools.cache
def grid_case(dtype_name, sampling_ratio, spatial_scale):
    dtype = numpy.dtype(dtype_name)
    rng = make_rng("ps align grid", dtype_name, sampling_ratio, spatial_scale)
    n, h, w = 2, 10, 12
    x = random_features(rng, (n, GROUPS * SIZE[0] * SIZE[1], h, w), dtype)
    rois = random_boxes(rng, n, 7, h, w, spatial_scale, dtype=compute_dtype(dtype))
    g = random_features(rng, (7, GROUPS) + SIZE, dtype)
    expected = ps_roi_align_ref(x, rois, SIZE, spatial_scale, sampling_ratio)
    grad = ps_roi_align_backward_ref(g, rois, x.shape, spatial_scale, sampling_ratio)
    return x, rois, expected, g, grad


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_matches_reference(backend, dtype, sampling_ratio, spatial_scale, contiguous):
    x, rois, expected, _, _ = grid_case(numpy.dtype(dtype).name, sampling_ratio, spatial_scale)
    out = forward(backend, x, rois, SIZE, contiguous, spatial_scale=spatial_scale,
                  sampling_ratio=sampling_ratio)
    assert_matches(out, expected, dtype, (len(rois), GROUPS) + SIZE)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_backward_matches_reference(backend, dtype, sampling_ratio, spatial_scale, contiguous):
    x, rois, _, g, expected = grid_case(numpy.dtype(dtype).name, sampling_ratio, spatial_scale)
    grad = backward(backend, g, rois, x.shape, SIZE, contiguous, spatial_scale=spatial_scale,
                    sampling_ratio=sampling_ratio)
    assert_matches(grad, expected, dtype, x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_boxes_as_per_image_list(backend, dtype):
    """A list of [L_i, 4] (one image without boxes) equals the image-major [K, 5] rows."""
    rng = make_rng("ps align list", numpy.dtype(dtype).name)
    x = random_features(rng, (3, 8, 8, 9), dtype)
    rois = random_boxes(rng, 3, 8, 8, 9, dtype=compute_dtype(dtype))
    rois[:, 0] = [0, 2, 0, 2, 2, 0, 0, 2]
    boxes = per_image(rois, 3)
    assert boxes[1].shape == (0, 4)
    out = forward(backend, x, boxes, 2, sampling_ratio=2)
    assert_matches(out, ps_roi_align_ref(x, image_major(rois), 2, sampling_ratio=2), dtype,
                   (8, 2, 2, 2))
    g = random_features(rng, (8, 2, 2, 2), dtype)
    grad = backward(backend, g, boxes, x.shape, 2, sampling_ratio=2)
    assert_matches(grad, ps_roi_align_backward_ref(g, image_major(rois), x.shape, 1.0, 2), dtype)


@pytest.mark.parametrize("output_size", [1, 3, (1, 5), (4, 2), (7, 7)], ids=str)
def test_output_size_int_or_pair(backend, output_size):
    rng = make_rng("ps align size", output_size)
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    x = random_features(rng, (1, 2 * ph * pw, 9, 9), numpy.float64)
    rois = random_boxes(rng, 1, 4, 9, 9)
    out = forward(backend, x, rois, output_size)
    assert_matches(out, ps_roi_align_ref(x, rois, output_size), numpy.float64, (4, 2, ph, pw))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize(
    "case", ["no rois", "no channels", "empty lists", "zero height", "zero width", "no images"]
)
def test_empty_inputs(backend, case, dtype):
    rng = make_rng("ps align empty", case)
    shape = {"no channels": (2, 0, 5, 5), "zero height": (2, 12, 0, 5),
             "zero width": (2, 12, 5, 0), "no images": (0, 12, 5, 5)}.get(case, (2, 12, 5, 5))
    x = random_features(rng, shape, dtype)
    rois = random_boxes(rng, 2, 3, 5, 5, dtype=compute_dtype(dtype))
    if case in ("no rois", "no images"):
        rois = rois[:0]
    boxes = [rois[:0, 1:], rois[:0, 1:]] if case == "empty lists" else rois
    out = forward(backend, x, boxes, (2, 3), sampling_ratio=2)
    k = 0 if case in ("no rois", "empty lists", "no images") else 3
    # an empty plane has no pixel to read: every sample contributes 0
    assert_matches(out, numpy.zeros((k, shape[1] // 6, 2, 3)), dtype)
    g = random_features(rng, out.shape, dtype)
    grad = backward(backend, g, boxes, shape, (2, 3), sampling_ratio=2)
    assert_matches(grad, numpy.zeros(shape), dtype)


# ----------------------------------------------------------------------------- invalid input
INVALID_ROWS = [
    [-1, 1, 1, 4, 4],
    [2, 1, 1, 4, 4],          # N = 2
    [1e20, 1, 1, 4, 4],
    [-1.5, 1, 1, 4, 4],       # truncates to -1
    [0, numpy.nan, 1, 4, 4],
    [1, 1, 1, numpy.inf, 4],
    [numpy.nan, 1, 1, 4, 4],
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_invalid_rois_give_zeros_and_no_gradient(backend, dtype):
    rng = make_rng("ps align invalid", numpy.dtype(dtype).name)
    x = random_features(rng, (2, 8, 6, 6), dtype)
    valid = numpy.array([[0, 0.3, 0.7, 4.2, 5.1], [1.9, 1.1, 0.2, 5.5, 3.3], [-0.5, 2, 2, 3, 4]])
    rois = numpy.concatenate([valid, INVALID_ROWS]).astype(compute_dtype(dtype))
    out = forward(backend, x, rois, 2, sampling_ratio=2, validate=False)
    expected = ps_roi_align_ref(x, rois, 2, 1.0, 2)
    assert not expected[len(valid):].any() and expected[: len(valid)].all()
    assert_matches(out, expected, dtype)
    g = random_features(rng, out.shape, dtype)
    grad = backward(backend, g, rois, x.shape, 2, sampling_ratio=2, validate=False)
    expected = ps_roi_align_backward_ref(g[: len(valid)], rois[: len(valid)], x.shape, 1.0, 2)
    assert_matches(grad, expected, dtype)


@pytest.mark.parametrize("row", INVALID_ROWS, ids=str)
def test_validate_names_the_row(backend, row):
    x = random_features(make_rng("ps align validate"), (2, 4, 6, 6), numpy.float32)
    rois = numpy.array([[0, 1, 1, 4, 4], row], dtype=numpy.float32)
    with pytest.raises(ValueError, match="row 1"):
        forward(backend, x, rois, 2)
    g = numpy.ones((2, 1, 2, 2), numpy.float32)
    with pytest.raises(ValueError, match="row 1"):
        backward(backend, g, rois, x.shape, 2)


def test_channels_must_be_a_multiple_of_the_bins():
    x = numpy.ones((1, 10, 5, 5), numpy.float32)
    rois = numpy.array([[0, 0, 0, 3, 3]], numpy.float32)
    with pytest.raises(ValueError, match=r"input must have a channel count C that is a multiple "
                                         r"of PH \* PW = 4 for output_size 2 .* got C = 10"):
        roi_cupy.ps_roi_align(x, rois, 2)
    with pytest.raises(ValueError, match=r"input_shape must have .* PH \* PW = 6 for output_size "
                                         r"\(2, 3\) .* got C = 10"):
        roi_cupy.ps_roi_align_backward(numpy.ones((1, 1, 2, 3), numpy.float32), rois,
                                       (1, 10, 5, 5), (2, 3))
    with pytest.raises(ValueError, match=r"grad_output must have shape \[K, C / \(PH \* PW\), "
                                         r"PH, PW\] = \[1, 3, 2, 2\] .* got \(1, 12, 2, 2\)"):
        roi_cupy.ps_roi_align_backward(numpy.ones((1, 12, 2, 2), numpy.float32), rois,
                                       (1, 12, 5, 5), 2)
    with pytest.raises(TypeError, match="validate must be a bool"):
        roi_cupy.ps_roi_align(numpy.ones((1, 4, 5, 5)), rois, 2, validate=1)
    with pytest.raises(TypeError, match="sampling_ratio must be an int or a pair"):
        roi_cupy.ps_roi_align(numpy.ones((1, 4, 5, 5)), rois, 2, sampling_ratio=1.5)


# ----------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_non_finite_features_reach_exactly_the_bins_that_sample_them(backend, dtype):
    """inf and NaN in a few pixels of a few channels: the bins that sample them (at any weight,
    0 included: 0 * inf is NaN) become non-finite, as the reference's arithmetic gives, and no
    other bin, not even one of another channel at the same place."""
    rng = make_rng("ps align non-finite", numpy.dtype(dtype).name)
    x = random_features(rng, (1, 8, 6, 6), dtype)
    x[0, 0, 2, 3] = numpy.inf
    x[0, 5, 0, 0] = -numpy.inf
    x[0, 6, 4, 1] = numpy.nan
    x[0, 3, 5, 5] = numpy.inf  # on the edge: snapped samples read it at weight 1 and 0
    rois = numpy.array([[0, 0.5, 0.5, 5.5, 5.5], [0, 1.5, 1.0, 3.5, 3.0], [0, 2, 2, 6, 6],
                        [0, -1, -1, 7, 7]], dtype=dtype)
    for ratio in (-1, 1, 2):
        out = forward(backend, x, rois, 2, sampling_ratio=ratio)
        with numpy.errstate(invalid="ignore"):  # 0 * inf and inf - inf are NaN
            expected = ps_roi_align_ref(x, rois, 2, 1.0, ratio)
        assert not numpy.isfinite(expected).all() and numpy.isfinite(expected).any()
        assert_matches(out, expected, dtype)
    g = random_features(rng, (4, 2, 2, 2), dtype)
    g[1, 0, 1, 0] = numpy.inf
    grad = backward(backend, g, rois, x.shape, 2, sampling_ratio=2)
    with numpy.errstate(invalid="ignore"):
        expected = ps_roi_align_backward_ref(g, rois, x.shape, 1.0, 2)
    assert not numpy.isfinite(expected).all()
    assert_matches(grad, expected, dtype)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("sampling_ratio", [-1, 2, (1, 3)], ids=str)
def test_finite_differences(backend, sampling_ratio):
    """Central differences of <ps_roi_align(x), g> in every input element match the backward.
    Continuous random box coordinates keep every sample off pixel boundaries."""
    rng = make_rng("ps align fd", sampling_ratio)
    shape = (2, 12, 5, 6)
    x = random_features(rng, shape, numpy.float64)
    rois = random_boxes(rng, 2, 4, 5, 6)
    g = random_features(rng, (4, 2, 2, 3), numpy.float64)
    kwargs = dict(spatial_scale=1.0, sampling_ratio=sampling_ratio)
    grad = backward(backend, g, rois, shape, (2, 3), **kwargs)
    eps = 1e-3
    numeric = numpy.empty(shape)
    for i in numpy.ndindex(shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += eps
        minus[i] -= eps
        up = (forward(backend, plus, rois, (2, 3), **kwargs) * g).sum()
        down = (forward(backend, minus, rois, (2, 3), **kwargs) * g).sum()
        numeric[i] = (up - down) / (2 * eps)
    assert numpy.abs(numeric).max() > 0
    numpy.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-9)


@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS, ids=str)
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_adjoint(backend, dtype, sampling_ratio, spatial_scale):
    """<ps_roi_align(x), g> == <x, ps_roi_align_backward(g)>."""
    x, rois, _, g, _ = grid_case(numpy.dtype(dtype).name, sampling_ratio, spatial_scale)
    kwargs = dict(spatial_scale=spatial_scale, sampling_ratio=sampling_ratio)
    out = forward(backend, x, rois, SIZE, **kwargs)
    grad = backward(backend, g, rois, x.shape, SIZE, **kwargs)
    lhs = float((out.astype(numpy.float64) * g.astype(numpy.float64)).sum())
    terms = x.astype(numpy.float64) * grad.astype(numpy.float64)
    scale = float(numpy.abs(terms).sum())
    assert scale > 0, "a vacuous case: no input pixel receives gradient"
    assert abs(lhs - terms.sum()) <= TOLERANCE[numpy.dtype(dtype)] * scale


def test_backward_deterministic_numpy():
    """Many overlapping RoIs: two runs are bit-identical."""
    rng = make_rng("ps align determinism")
    shape = (2, 3 * 49, 16, 16)
    rois = random_boxes(rng, 2, 300, 16, 16)
    g = random_features(rng, (300, 3, 7, 7), numpy.float32)
    first = roi_cupy.ps_roi_align_backward(g, rois, shape, 7, 0.5, -1)
    second = roi_cupy.ps_roi_align_backward(g, rois, shape, 7, 0.5, -1)
    assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_numpy_work_split_does_not_change_the_numbers(monkeypatch, dtype):
    assert_work_split_keeps_numbers(
        monkeypatch, dtype, "ps_roi_align work split",
        lambda x, rois: roi_cupy.ps_roi_align(x, rois, 7, 0.5, -1),
        lambda g, rois, shape: roi_cupy.ps_roi_align_backward(g, rois, shape, 7, 0.5, -1),
    )


# ----------------------------------------------------------------------------- many and large
def test_many_rois_numpy():
    """K = 3000 on a small map (any blocking inside the backend must not show): the whole batch
    equals the same RoIs one call each, and the reference on a sample of them."""
    rng = make_rng("ps align many")
    x = random_features(rng, (2, 2 * 49, 16, 16), numpy.float64)
    rois = random_boxes(rng, 2, 3000, 16, 16)
    out = roi_cupy.ps_roi_align(x, rois, 7, 0.5, -1)
    assert out.shape == (3000, 2, 7, 7) and out.dtype == numpy.float64
    picks = rng.choice(3000, size=60, replace=False)
    for k in picks:
        single = roi_cupy.ps_roi_align(x, rois[k : k + 1], 7, 0.5, -1)
        numpy.testing.assert_allclose(out[k : k + 1], single, rtol=0, atol=1e-12)
    few = picks[:6]
    assert_matches(out[few], ps_roi_align_ref(x, rois[few], 7, 0.5, -1), numpy.float64)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_huge_adaptive_grid(backend, dtype):
    """A 10^4-pixel box on a 4 x 4 map of ones, adaptive: 10^4 x 10^4 samples at i + 0.5 - 0.5,
    of which 5 x 5 (0 to 4) lie inside [-1, 4]. The mean is 25 / 10^8."""
    x = numpy.ones((1, 1, 4, 4), dtype)
    rois = numpy.array([[0, 0, 0, 1e4, 1e4]], dtype)
    out = forward(backend, x, rois, 1)
    assert_matches(out, numpy.full((1, 1, 1, 1), 25 / 1e8), dtype, scale=1.0)


@pytest.mark.parametrize("sampling_ratio", [10**9, (2**20, 3)], ids=str)
def test_any_sampling_ratio_is_bounded_work(backend, sampling_ratio):
    """sampling_ratio=10**9 (capped at 2**20 per axis: 2**40 samples a bin, hours one by one on
    the kernels): a bin whose samples outnumber its pixels' weights is summed by those weights,
    so a call takes a fraction of a second; the numbers are RoI Align's (aligned) on each
    bin's channel, in float64 through the separable form."""
    rng = make_rng("ps align bounded work", str(sampling_ratio))
    x = random_features(rng, (1, GROUPS * 4, 12, 10), numpy.float32)
    # The last box is reversed along x: its samples walk right to left.
    rois = numpy.array([[0, -2.0, -1.0, 11.0, 14.0], [0, 3.0, 2.0, 7.5, 8.0],
                        [0, 9.0, 1.0, 2.5, 11.0]], numpy.float32)
    start = time.monotonic()
    out = forward(backend, x, rois, 2, sampling_ratio=sampling_ratio)
    g = random_features(rng, out.shape, numpy.float32)
    grad = backward(backend, g, rois, x.shape, 2, sampling_ratio=sampling_ratio)
    assert time.monotonic() - start < 60
    full = separable_expected(x, rois, 2, 1.0, sampling_ratio, True)
    full_g = numpy.zeros(full.shape)
    expected = numpy.zeros(out.shape)
    for c, ph, pw in numpy.ndindex(GROUPS, 2, 2):
        expected[:, c, ph, pw] = full[:, ps_channel(c, ph, pw, 2, 2), ph, pw]
        full_g[:, ps_channel(c, ph, pw, 2, 2), ph, pw] = g[:, c, ph, pw]
    assert_matches(out, expected, numpy.float32)
    assert_matches(grad, separable_backward_expected(full_g, rois, x.shape, 2, 1.0,
                                                     sampling_ratio, True), numpy.float32)


# ----------------------------------------------------------------------------- kernels only
@pytest.fixture(params=("emulator", "cuda"), ids=str)
def kernels_on(request: pytest.FixtureRequest) -> Backend:
    """A backend that runs the CUDA kernels: the CPU emulator or a GPU."""
    ok, why = availability(request.param)
    if not ok:
        pytest.skip(f"backend {request.param!r} is not available: {why}")
    return Backend(request.param)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("index64", (False, True), ids=("int32", "int64"))
def test_both_index_paths_match_the_reference(kernels_on, monkeypatch, dtype, index64):
    if index64:
        monkeypatch.setattr(launch, "INDEX32_LIMIT", 20)  # smaller than every array here
    launched = []
    original = launch.kernel_name

    def record(kernel, dtype, index64):
        launched.append(original(kernel, dtype, index64))
        return launched[-1]

    monkeypatch.setattr(launch, "kernel_name", record)
    x, rois, expected, g, expected_grad = grid_case(numpy.dtype(dtype).name, 2, 0.5)
    out = forward(kernels_on, x, rois, SIZE, spatial_scale=0.5, sampling_ratio=2, validate=False)
    grad = backward(kernels_on, g, rois, x.shape, SIZE, spatial_scale=0.5, sampling_ratio=2,
                    validate=False)
    assert_matches(out, expected, dtype)
    assert_matches(grad, expected_grad, dtype)
    assert [name.split("<")[0] for name in launched] == [
        "ps_roi_align_forward", "ps_roi_align_backward"
    ]
    assert all(name.endswith("long long>" if index64 else "int>") for name in launched)
