"""ps_roi_pool and ps_roi_pool_backward on every backend against the float64 reference, and the
facts docs/semantics.md states about them."""
from __future__ import annotations

import functools

import numpy
import pytest
from conftest import (
    assert_work_split_keeps_numbers,
    DTYPES,
    Backend,
    availability,
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
from reference import ps_roi_pool_backward_ref, ps_roi_pool_ref

import roi_cupy
from roi_cupy._cuda import launch

SIZE = (3, 2)  # PH, PW of the grid cases: 6 channels per output channel
GROUPS = 2


def on(backend, boxes):
    """Boxes ([K, 5] or a per-image list) as the backend's arrays."""
    if isinstance(boxes, list):
        return [backend.asarray(b) for b in boxes]
    return backend.asarray(boxes)


def forward(backend, x, boxes, output_size, contiguous=True, **kwargs):
    """ps_roi_pool on ``backend`` with NumPy ``x`` and boxes ([K, 5] or a per-image list)."""
    with backend.active():
        out = roi_cupy.ps_roi_pool(
            backend.features(x, contiguous), on(backend, boxes), output_size, **kwargs
        )
    return backend.to_numpy(out)


def backward(backend, g, boxes, shape, output_size, contiguous=True, **kwargs):
    with backend.active():
        grad = roi_cupy.ps_roi_pool_backward(
            backend.features(g, contiguous), on(backend, boxes), shape, output_size, **kwargs
        )
    return backend.to_numpy(grad)


def plane(h, w, c=1, dtype=numpy.float64):
    """``c`` channels holding ``10 * h + w`` (easy to average by hand)."""
    base = 10.0 * numpy.arange(h)[:, None] + numpy.arange(w)[None, :]
    return numpy.ascontiguousarray(numpy.broadcast_to(base, (1, c, h, w)), dtype=dtype)


# ----------------------------------------------------------------------------- hand values
# box (x1, y1, x2, y2), spatial_scale, the mean of 10 h + w on a 5 x 6 map (H = 5, W = 6), 1 bin
HAND = [
    ((0, 0, 3, 3), 1.0, 11.0),       # the end pixel is exclusive: rows and columns 0 to 2
    ((1, 2, 2, 3), 1.0, 21.0),       # one pixel
    ((1, 2, 1.2, 2.2), 1.0, 21.0),   # under a pixel: still one pixel, (2, 1)
    ((0.5, 0.5, 3.5, 3.5), 1.0, 22.0),   # 0.5 and 3.5 round away from zero: 1 to 3
    ((1, 1, 7, 7), 0.5, 22.0),       # the same after scaling
    ((-2.5, -2.5, 2, 2), 1.0, 5.5),  # -2.5 rounds to -3; clipped to 0 and 1
    ((0, 0, 9, 9), 1.0, 17.0),       # past the map: clipped to row H - 1 = 4 and column 5,
                                     # which stay out (rows 0 to 3, columns 0 to 4)
    ((5, 4, 9, 9), 1.0, 0.0),        # starts on the last row: its window is empty
    ((-9, -9, -3, -3), 1.0, 0.0),    # wholly outside
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("box, spatial_scale, value", HAND, ids=str)
def test_hand_values(backend, dtype, box, spatial_scale, value):
    x = plane(5, 6, dtype=dtype)
    rois = numpy.array([[0, *box]], dtype=compute_dtype(dtype))
    out = forward(backend, x, rois, 1, spatial_scale=spatial_scale)
    assert_matches(out, numpy.full((1, 1, 1, 1), value), dtype, scale=max(value, 1.0))
    assert_matches(out, ps_roi_pool_ref(x, rois, 1, spatial_scale), dtype, scale=max(value, 1.0))


def test_each_bin_reads_its_own_channel_and_bins_overlap(backend):
    """Box (0, 0, 5, 5) in 2 x 2 bins of 2.5 pixels: windows [0, 3) and [2, 5) overlap on row and
    column 2. Bin (ph, pw) of output channel c reads channel (c * 2 + ph) * 2 + pw, here holding
    100 * channel + 10 h + w."""
    x = plane(6, 6, c=8) + 100.0 * numpy.arange(8)[None, :, None, None]
    rois = numpy.array([[0, 0.0, 0.0, 5.0, 5.0]])
    out = forward(backend, x, rois, 2)
    window_mean = numpy.array([[11.0, 13.0], [31.0, 33.0]])  # 10 h + w over each window
    channel = numpy.arange(8).reshape(1, 2, 2, 2)
    assert_matches(out, 100.0 * channel + window_mean, numpy.float64)


def test_a_map_one_pixel_tall_gives_zeros(backend):
    x = random_features(make_rng("ps pool H=1"), (1, 4, 1, 7), numpy.float32)
    rois = numpy.array([[0, 0, 0, 6, 1], [0, 1, -2, 5, 3]], numpy.float32)
    assert_matches(forward(backend, x, rois, (1, 4)), numpy.zeros((2, 1, 1, 4)), numpy.float32)


def test_backward_leaves_the_last_row_and_column_alone(backend):
    """A box past the bottom right: the forward never reads row H - 1 nor column W - 1, so they
    get no gradient (torchvision's backward gives them some)."""
    rois = numpy.array([[0, 1.0, 1.0, 9.0, 9.0]])
    g = numpy.ones((1, 1, 1, 1))
    grad = backward(backend, g, rois, (1, 1, 5, 6), 1)
    expected = numpy.zeros((1, 1, 5, 6))
    expected[0, 0, 1:4, 1:5] = 1 / 12
    assert_matches(grad, expected, numpy.float64)


# ----------------------------------------------------------------------------- the parameter grid
@functools.cache
def grid_case(dtype_name, spatial_scale):
    dtype = numpy.dtype(dtype_name)
    rng = make_rng("ps pool grid", dtype_name, spatial_scale)
    n, h, w = 2, 10, 12
    x = random_features(rng, (n, GROUPS * SIZE[0] * SIZE[1], h, w), dtype)
    rois = random_boxes(rng, n, 14, h, w, spatial_scale, dtype=compute_dtype(dtype))
    g = random_features(rng, (14, GROUPS) + SIZE, dtype)
    expected = ps_roi_pool_ref(x, rois, SIZE, spatial_scale)
    grad = ps_roi_pool_backward_ref(g, rois, x.shape, spatial_scale)
    return x, rois, expected, g, grad


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_matches_reference(backend, dtype, spatial_scale, contiguous):
    x, rois, expected, _, _ = grid_case(numpy.dtype(dtype).name, spatial_scale)
    out = forward(backend, x, rois, SIZE, contiguous, spatial_scale=spatial_scale)
    assert_matches(out, expected, dtype, (len(rois), GROUPS) + SIZE)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_backward_matches_reference(backend, dtype, spatial_scale, contiguous):
    x, rois, _, g, expected = grid_case(numpy.dtype(dtype).name, spatial_scale)
    grad = backward(backend, g, rois, x.shape, SIZE, contiguous, spatial_scale=spatial_scale)
    assert_matches(grad, expected, dtype, x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_boxes_as_per_image_list(backend, dtype):
    rng = make_rng("ps pool list", numpy.dtype(dtype).name)
    x = random_features(rng, (3, 8, 8, 9), dtype)
    rois = random_boxes(rng, 3, 8, 8, 9, quantum=0.25, dtype=compute_dtype(dtype))
    rois[:, 0] = [0, 2, 0, 2, 2, 0, 0, 2]
    boxes = per_image(rois, 3)
    out = forward(backend, x, boxes, 2)
    assert_matches(out, ps_roi_pool_ref(x, image_major(rois), 2), dtype, (8, 2, 2, 2))
    g = random_features(rng, (8, 2, 2, 2), dtype)
    grad = backward(backend, g, boxes, x.shape, 2)
    assert_matches(grad, ps_roi_pool_backward_ref(g, image_major(rois), x.shape), dtype)


@pytest.mark.parametrize("output_size", [1, 3, (1, 5), (4, 2), (7, 7)], ids=str)
def test_output_size_int_or_pair(backend, output_size):
    rng = make_rng("ps pool size", output_size)
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    x = random_features(rng, (1, 2 * ph * pw, 9, 9), numpy.float64)
    rois = random_boxes(rng, 1, 7, 9, 9)
    out = forward(backend, x, rois, output_size)
    assert_matches(out, ps_roi_pool_ref(x, rois, output_size), numpy.float64, (7, 2, ph, pw))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize(
    "case", ["no rois", "no channels", "empty lists", "zero height", "zero width", "no images"]
)
def test_empty_inputs(backend, case, dtype):
    rng = make_rng("ps pool empty", case)
    shape = {"no channels": (2, 0, 5, 5), "zero height": (2, 12, 0, 5),
             "zero width": (2, 12, 5, 0), "no images": (0, 12, 5, 5)}.get(case, (2, 12, 5, 5))
    x = random_features(rng, shape, dtype)
    rois = random_boxes(rng, 2, 3, 5, 5, dtype=compute_dtype(dtype))
    if case in ("no rois", "no images"):
        rois = rois[:0]
    boxes = [rois[:0, 1:], rois[:0, 1:]] if case == "empty lists" else rois
    out = forward(backend, x, boxes, (2, 3))
    k = 0 if case in ("no rois", "empty lists", "no images") else 3
    assert_matches(out, numpy.zeros((k, shape[1] // 6, 2, 3)), dtype)
    g = random_features(rng, out.shape, dtype)
    assert_matches(backward(backend, g, boxes, shape, (2, 3)), numpy.zeros(shape), dtype)


# ----------------------------------------------------------------------------- invalid input
INVALID_ROWS = [
    [-1, 1, 1, 4, 4],
    [2, 1, 1, 4, 4],          # N = 2
    [1e20, 1, 1, 4, 4],
    [-1.5, 1, 1, 4, 4],
    [0, numpy.nan, 1, 4, 4],
    [1, 1, 1, numpy.inf, 4],
    [numpy.nan, 1, 1, 4, 4],
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_invalid_rois_give_zeros_and_no_gradient(backend, dtype):
    rng = make_rng("ps pool invalid", numpy.dtype(dtype).name)
    x = random_features(rng, (2, 8, 6, 6), dtype)
    valid = numpy.array([[0, 0.3, 0.7, 4.2, 5.1], [1.9, 1.1, 0.2, 5.5, 3.3], [-0.5, 2, 2, 4, 4]])
    rois = numpy.concatenate([valid, INVALID_ROWS]).astype(compute_dtype(dtype))
    out = forward(backend, x, rois, 2, validate=False)
    expected = ps_roi_pool_ref(x, rois, 2)
    assert not expected[len(valid):].any() and expected[: len(valid)].all()
    assert_matches(out, expected, dtype)
    g = random_features(rng, out.shape, dtype)
    grad = backward(backend, g, rois, x.shape, 2, validate=False)
    expected = ps_roi_pool_backward_ref(g[: len(valid)], rois[: len(valid)], x.shape)
    assert_matches(grad, expected, dtype)


@pytest.mark.parametrize("row", INVALID_ROWS, ids=str)
def test_validate_names_the_row(backend, row):
    x = random_features(make_rng("ps pool validate"), (2, 4, 6, 6), numpy.float32)
    rois = numpy.array([[0, 1, 1, 4, 4], row], dtype=numpy.float32)
    with pytest.raises(ValueError, match="row 1"):
        forward(backend, x, rois, 2)
    g = numpy.ones((2, 1, 2, 2), numpy.float32)
    with pytest.raises(ValueError, match="row 1"):
        backward(backend, g, rois, x.shape, 2)


def test_channels_must_be_a_multiple_of_the_bins():
    rois = numpy.array([[0, 0, 0, 3, 3]], numpy.float32)
    with pytest.raises(ValueError, match=r"input must have a channel count C that is a multiple "
                                         r"of PH \* PW = 6 for output_size \(3, 2\) .* got C = 9"):
        roi_cupy.ps_roi_pool(numpy.ones((1, 9, 5, 5), numpy.float32), rois, (3, 2))
    with pytest.raises(ValueError, match=r"input_shape must have .* PH \* PW = 4 .* got C = 6"):
        roi_cupy.ps_roi_pool_backward(numpy.ones((1, 1, 2, 2), numpy.float32), rois,
                                      (1, 6, 5, 5), 2)
    with pytest.raises(ValueError, match=r"grad_output must have shape .* = \[1, 2, 2, 2\]"):
        roi_cupy.ps_roi_pool_backward(numpy.ones((1, 8, 2, 2), numpy.float32), rois,
                                      (1, 8, 5, 5), 2)


# ----------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_non_finite_values_reach_every_bin_whose_window_holds_them(backend, dtype):
    rng = make_rng("ps pool non-finite", numpy.dtype(dtype).name)
    x = random_features(rng, (1, 8, 6, 6), dtype)
    x[0, 0, 1, 1] = numpy.inf
    x[0, 0, 2, 2] = -numpy.inf  # meets +inf in a larger window: NaN
    x[0, 5, 3, 4] = numpy.nan
    rois = numpy.array([[0, 0, 0, 5, 5], [0, 1, 1, 3, 3], [0, 0, 0, 2, 2], [0, 2, 2, 6, 6]],
                       dtype=dtype)
    out = forward(backend, x, rois, 2)
    with numpy.errstate(invalid="ignore"):
        expected = ps_roi_pool_ref(x, rois, 2)
    assert numpy.isnan(expected).any() and numpy.isinf(expected).any()
    assert_matches(out, expected, dtype)
    g = random_features(rng, (4, 2, 2, 2), dtype)
    g[1, 1, 0, 1] = -numpy.inf
    grad = backward(backend, g, rois, x.shape, 2)
    expected = ps_roi_pool_backward_ref(g, rois, x.shape)
    assert numpy.isinf(expected).any()
    assert_matches(grad, expected, dtype)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5], ids=str)
def test_finite_differences(backend, spatial_scale):
    """Central differences of <ps_roi_pool(x), g> match the backward, boxes past every edge of
    the map included (where torchvision's backward is not the forward's gradient)."""
    rng = make_rng("ps pool fd", spatial_scale)
    shape = (2, 12, 5, 6)
    x = random_features(rng, shape, numpy.float64)
    rois = random_boxes(rng, 2, 7, 5, 6, spatial_scale)
    g = random_features(rng, (7, 2, 2, 3), numpy.float64)
    grad = backward(backend, g, rois, shape, (2, 3), spatial_scale=spatial_scale)
    eps = 1e-3
    numeric = numpy.empty(shape)
    for i in numpy.ndindex(shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += eps
        minus[i] -= eps
        up = (forward(backend, plus, rois, (2, 3), spatial_scale=spatial_scale) * g).sum()
        down = (forward(backend, minus, rois, (2, 3), spatial_scale=spatial_scale) * g).sum()
        numeric[i] = (up - down) / (2 * eps)
    assert numpy.abs(numeric).max() > 0
    numpy.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-9)


@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_adjoint(backend, dtype, spatial_scale):
    """<ps_roi_pool(x), g> == <x, ps_roi_pool_backward(g)>."""
    x, rois, _, g, _ = grid_case(numpy.dtype(dtype).name, spatial_scale)
    out = forward(backend, x, rois, SIZE, spatial_scale=spatial_scale)
    grad = backward(backend, g, rois, x.shape, SIZE, spatial_scale=spatial_scale)
    lhs = float((out.astype(numpy.float64) * g.astype(numpy.float64)).sum())
    terms = x.astype(numpy.float64) * grad.astype(numpy.float64)
    scale = float(numpy.abs(terms).sum())
    assert scale > 0, "a vacuous case: no input pixel receives gradient"
    assert abs(lhs - terms.sum()) <= TOLERANCE[numpy.dtype(dtype)] * scale


def test_backward_deterministic_numpy():
    rng = make_rng("ps pool determinism")
    shape = (2, 3 * 49, 16, 16)
    rois = random_boxes(rng, 2, 300, 16, 16)
    g = random_features(rng, (300, 3, 7, 7), numpy.float32)
    first = roi_cupy.ps_roi_pool_backward(g, rois, shape, 7, 0.5)
    second = roi_cupy.ps_roi_pool_backward(g, rois, shape, 7, 0.5)
    assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_numpy_work_split_does_not_change_the_numbers(monkeypatch, dtype):
    assert_work_split_keeps_numbers(
        monkeypatch, dtype, "ps_roi_pool work split",
        lambda x, rois: roi_cupy.ps_roi_pool(x, rois, 7, 0.5),
        lambda g, rois, shape: roi_cupy.ps_roi_pool_backward(g, rois, shape, 7, 0.5),
    )


# ----------------------------------------------------------------------------- many and large
def test_many_rois_numpy():
    rng = make_rng("ps pool many")
    x = random_features(rng, (2, 2 * 49, 16, 16), numpy.float64)
    rois = random_boxes(rng, 2, 3000, 16, 16)
    out = roi_cupy.ps_roi_pool(x, rois, 7, 0.5)
    assert out.shape == (3000, 2, 7, 7) and out.dtype == numpy.float64
    picks = rng.choice(3000, size=60, replace=False)
    for k in picks:
        single = roi_cupy.ps_roi_pool(x, rois[k : k + 1], 7, 0.5)
        numpy.testing.assert_allclose(out[k : k + 1], single, rtol=0, atol=1e-12)
    few = picks[:6]
    assert_matches(out[few], ps_roi_pool_ref(x, rois[few], 7, 0.5), numpy.float64)


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32], ids=lambda d: numpy.dtype(d).name)
def test_a_large_window_keeps_float32_precision(backend, dtype):
    """One bin over a 4096 x 4096 map (the last row and column left out): 2**24 - 2**13 + 1
    pixels near 0.5. A plain float32 running sum drifts far from the mean; the result must stay
    within float32's (or float16's) tolerance of the exact mean."""
    side = 4096
    rng = make_rng("ps pool large", numpy.dtype(dtype).name)
    x = rng.uniform(0, 1, (1, 1, side, side)).astype(dtype)
    exact = x[0, 0, : side - 1, : side - 1].mean(dtype=numpy.float64)
    boxes = numpy.array([[0, 0, 0, side, side]], numpy.float32)
    out = forward(backend, x, boxes, 1)
    assert abs(float(out.ravel()[0]) - exact) <= TOLERANCE[numpy.dtype(dtype)], (out, exact)


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
    x, rois, expected, g, expected_grad = grid_case(numpy.dtype(dtype).name, 0.5)
    out = forward(kernels_on, x, rois, SIZE, spatial_scale=0.5, validate=False)
    grad = backward(kernels_on, g, rois, x.shape, SIZE, spatial_scale=0.5,
                    validate=False)
    assert_matches(out, expected, dtype)
    assert_matches(grad, expected_grad, dtype)
    assert [name.split("<")[0] for name in launched] == [
        "ps_roi_pool_forward", "ps_roi_pool_backward"
    ]
    assert all(name.endswith("long long>" if index64 else "int>") for name in launched)
