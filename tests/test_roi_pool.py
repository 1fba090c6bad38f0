"""roi_pool on every backend against the float64 reference, and each edge fact of docs/semantics.md.

Box coordinates here are multiples of 1/4 (and spatial scales powers of two), exact in every
float width, so that rounding a scaled corner cannot depend on the dtype; output sizes stay
<= 6, for which float32 and float64 bin bounds agree (with 7 they can differ by a pixel).
"""
from __future__ import annotations

import functools
import importlib

import numpy
import pytest
from conftest import (
    DTYPES,
    SPATIAL_SCALES,
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
from reference import FLT_MAX, c_round, roi_pool_ref, roi_pool_window

import roi_cupy
from roi_cupy import _backend, _interop


def run(backend, x, boxes, output_size, contiguous=True, **kwargs):
    """``(out, argmax)`` of roi_pool on ``backend`` with NumPy ``x`` and boxes."""
    if isinstance(boxes, list):
        boxes = [backend.asarray(b) for b in boxes]
    else:
        boxes = backend.asarray(boxes)
    with backend.active():
        result = roi_cupy.roi_pool(
            backend.features(x, contiguous), boxes, output_size, return_indices=True, **kwargs
        )
    return backend.to_numpy(result)


def check(result, expected, dtype, scale=None):
    """Values within the dtype's tolerance (a maximum is exact anyway), indices identical."""
    (out, argmax), (ref_out, ref_argmax) = result, expected
    assert_matches(out, ref_out, dtype, scale=scale)
    assert argmax.dtype == numpy.int64, f"indices dtype {argmax.dtype}"
    numpy.testing.assert_array_equal(argmax, ref_argmax)


def plane(h=4, w=6, dtype=numpy.float64):
    """N = 1, channel 0 is ``10 * h + w``, channel 1 its negative."""
    base = 10.0 * numpy.arange(h)[:, None] + numpy.arange(w)[None, :]
    return numpy.stack([base, -base])[None].astype(dtype)


# ----------------------------------------------------------------------------- the oracle itself
def test_reference_rounds_half_away_from_zero():
    assert [c_round(v) for v in (0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999999999999994, -0.0)] == [
        1, 2, 3, -1, -2, -3, 0, 0,
    ]
    # x = 0.5 .. 2.5 covers pixels 1..3, so three one-pixel bins
    row = numpy.array([0, 0.5, 0, 2.5, 0])
    assert [roi_pool_window(row, 0, pw, (1, 3), 1.0, (4, 6))[2:] for pw in range(3)] == [
        (1, 2), (2, 3), (3, 4),
    ]


def test_reference_hand_values():
    x = plane()
    x[0, 0, 1, 2] = x[0, 0, 2, 0] = 99.0  # a tie: row-major first is (1, 2)
    out, argmax = roi_pool_ref(x, numpy.array([[0, 0, 0, 3, 3]]), 1)
    assert out[0, 0, 0, 0] == 99.0 and argmax[0, 0, 0, 0] == 1 * 6 + 2
    assert out[0, 1, 0, 0] == 0.0 and argmax[0, 1, 0, 0] == 0


# ----------------------------------------------------------------------------- the parameter grid
@functools.cache
def grid_case(dtype_name, spatial_scale, output_size):
    dtype = numpy.dtype(dtype_name)
    rng = make_rng("pool grid", dtype_name, spatial_scale, output_size)
    n, c, h, w = 2, 3, 10, 12
    x = random_features(rng, (n, c, h, w), dtype)
    rois = random_boxes(rng, n, 8, h, w, spatial_scale, quantum=0.25, dtype=compute_dtype(dtype))
    return x, rois, roi_pool_ref(x, rois, output_size, spatial_scale)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("output_size", [(3, 4), 2, (1, 6)], ids=str)
@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_matches_reference(backend, dtype, spatial_scale, output_size, contiguous):
    x, rois, expected = grid_case(numpy.dtype(dtype).name, spatial_scale, output_size)
    result = run(backend, x, rois, output_size, contiguous, spatial_scale=spatial_scale)
    check(result, expected, dtype)
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    assert result[0].shape == (8, 3, ph, pw)


def test_without_indices_returns_the_output(backend):
    x, rois, (expected, _) = grid_case("float32", 1.0, 2)
    with backend.active():
        out = roi_cupy.roi_pool(backend.asarray(x), backend.asarray(rois), 2)
    assert_matches(backend.to_numpy(out), expected, numpy.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_boxes_as_per_image_list(backend, dtype):
    rng = make_rng("pool list", numpy.dtype(dtype).name)
    x = random_features(rng, (3, 2, 8, 9), dtype)
    rois = random_boxes(rng, 3, 8, 8, 9, quantum=0.25, dtype=compute_dtype(dtype))
    rois[:, 0] = [2, 0, 0, 2, 2, 0, 2, 0]
    boxes = per_image(rois, 3)
    assert boxes[1].shape == (0, 4)
    check(run(backend, x, boxes, (2, 3)), roi_pool_ref(x, image_major(rois), (2, 3)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize(
    "case", ["no rois", "no channels", "empty lists", "zero height", "zero width"]
)
def test_empty_inputs(backend, case, dtype):
    rng = make_rng("pool empty", case)
    shape = {"no channels": (2, 0, 5, 5), "zero height": (2, 3, 0, 5), "zero width": (2, 3, 5, 0)}
    x = random_features(rng, shape.get(case, (2, 3, 5, 5)), dtype)
    rois = random_boxes(rng, 2, 3, 5, 5, quantum=0.25, dtype=compute_dtype(dtype))
    if case == "no rois":
        rois = rois[:0]
    boxes = [rois[:0, 1:], rois[:0, 1:]] if case == "empty lists" else rois
    out, argmax = run(backend, x, boxes, (2, 3))
    k = 0 if case in ("no rois", "empty lists") else 3
    # an empty plane makes every bin empty: 0 and -1
    assert_matches(out, numpy.zeros((k, x.shape[1], 2, 3)), dtype)
    numpy.testing.assert_array_equal(argmax, numpy.full((k, x.shape[1], 2, 3), -1))
    assert argmax.dtype == numpy.int64


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_box_dtypes_and_strides(backend, dtype):
    """Integer boxes (the usual pixel boxes), float16/float64 boxes and strided boxes."""
    rng = make_rng("pool box dtypes", numpy.dtype(dtype).name)
    x = random_features(rng, (2, 2, 7, 8), dtype)
    rois = random_boxes(rng, 2, 7, 7, 8, quantum=0.5, dtype=compute_dtype(dtype))
    expected = roi_pool_ref(x, rois, (2, 3), 0.5)
    for boxes in (rois.astype(numpy.float64), rois.astype(numpy.float16),
                  numpy.asfortranarray(rois), numpy.repeat(rois, 2, axis=0)[::2]):
        check(run(backend, x, boxes, (2, 3), spatial_scale=0.5), expected, dtype)
    whole = numpy.round(rois).astype(numpy.int64)
    expected = roi_pool_ref(x, whole, (2, 3), 0.5)
    check(run(backend, x, whole, (2, 3), spatial_scale=0.5), expected, dtype)


# ----------------------------------------------------------------------------- edge facts by hand
@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_round_half_away_from_zero(backend, dtype, spatial_scale):
    """Scaled corners at x.5 round away from zero (half-to-even would shift every window)."""
    x = plane(dtype=dtype)
    rows = numpy.array([
        [0, 0.5, 0.0, 2.5, 0.0],     # x 0.5..2.5 -> pixels 1..3 (even rounding: 0..2)
        [0, -0.5, 1.5, 1.5, 1.5],    # x -0.5 -> -1: pixels -1..2, y 1.5 -> row 2
        [0, 1.0, -1.5, 1.0, -0.5],   # y -1.5..-0.5 -> rows -2..-1: all bins empty
    ])
    rows[:, 1:] /= spatial_scale
    rois = rows.astype(compute_dtype(dtype))
    out, argmax = run(backend, x, rois, (1, 4), spatial_scale=spatial_scale)
    # row 0: 3 pixels in 4 bins of 0.75: [1,2) [1,3) [2,4) [3,4)
    expected_index = numpy.array([[1, 2, 3, 3], [-1, 12, 13, 14], [-1, -1, -1, -1]])
    expected_value = numpy.array([[1, 2, 3, 3], [0, 20, 21, 22], [0, 0, 0, 0]], dtype=float)
    numpy.testing.assert_array_equal(argmax[:, 0, 0], expected_index)
    assert_matches(out[:, 0, 0], expected_value, dtype)
    # channel 1 (-plane): the first pixel of each window wins
    numpy.testing.assert_array_equal(argmax[:, 1, 0], [[1, 1, 2, 3], [-1, 12, 13, 14], [-1] * 4])
    check((out, argmax), roi_pool_ref(x, rois, (1, 4), spatial_scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_ties_first_maximum_wins(backend, dtype):
    x = plane(dtype=dtype)
    x[0, 0, 1, 2] = x[0, 0, 2, 0] = 99.0  # tie: row-major first is (1, 2)
    x[0, 1] = 5.0  # channel 1 constant: the window's first pixel
    rois = numpy.array([[0, 0, 0, 3, 3], [0, 1, 1, 3, 3]], dtype=compute_dtype(dtype))
    out, argmax = run(backend, x, rois, 1)
    numpy.testing.assert_array_equal(argmax[:, :, 0, 0], [[1 * 6 + 2, 0], [1 * 6 + 2, 1 * 6 + 1]])
    assert_matches(out[:, :, 0, 0], numpy.array([[99.0, 5.0], [99.0, 5.0]]), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_nan_is_never_the_maximum(backend, dtype):
    x = plane(dtype=dtype)
    x[0, 0, 0, 0] = x[0, 0, 1, 1] = numpy.nan  # the window's first pixel and its largest
    x[0, 1, :2, :2] = numpy.nan  # a whole window of NaN
    rois = numpy.array([[0, 0, 0, 1, 1]], dtype=compute_dtype(dtype))
    out, argmax = run(backend, x, rois, 1)
    assert argmax[0, 0, 0, 0] == 6 and out[0, 0, 0, 0] == 10.0  # (1, 0), the largest non-NaN
    check((out, argmax), roi_pool_ref(x, rois, 1), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_window_without_a_value_above_minus_flt_max(backend, dtype):
    """All -inf (or, where the dtype holds it, all <= -FLT_MAX) keeps -FLT_MAX and index -1."""
    x = plane(dtype=dtype)
    x[0, 0, :2, :2] = -numpy.inf
    # float16 and bfloat16 round -FLT_MAX to -inf.
    low = {numpy.float64: -1e300, numpy.float32: -FLT_MAX}.get(numpy.dtype(dtype).type, -numpy.inf)
    x[0, 1, :2, :2] = low
    rois = numpy.array([[0, 0, 0, 1, 1], [0, 0, 0, 2, 0]], dtype=compute_dtype(dtype))
    out, argmax = run(backend, x, rois, 1)
    numpy.testing.assert_array_equal(argmax[:, :, 0, 0], [[-1, -1], [2, 2]])
    with numpy.errstate(over="ignore"):
        minus_flt_max = numpy.array(-FLT_MAX).astype(dtype)  # -inf in float16 and bfloat16
    assert out[0, 0, 0, 0] == minus_flt_max and out[0, 1, 0, 0] == minus_flt_max
    assert out[1, 0, 0, 0] == 2 and out[1, 1, 0, 0] == -2
    check((out, argmax), roi_pool_ref(x, rois, 1), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_empty_bins(backend, dtype):
    x = plane(dtype=dtype)
    rois = numpy.array([
        [0, 30, 1, 40, 3],    # right of the map: every bin empty
        [0, -5, 0, 2, 0],     # x -5..2 in 4 bins of 2: [-5,-3) [-3,-1) empty, [0,1) [1,3)
        [0, 1, 10, 2, 12],    # below the map
    ], dtype=compute_dtype(dtype))
    out, argmax = run(backend, x, rois, (1, 4))
    numpy.testing.assert_array_equal(argmax[:, 0, 0], [[-1] * 4, [-1, -1, 0, 2], [-1] * 4])
    assert_matches(out[:, 0, 0], numpy.array([[0.0] * 4, [0, 0, 0, 2], [0.0] * 4]), dtype)
    check((out, argmax), roi_pool_ref(x, rois, (1, 4)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_overlapping_bins(backend, dtype):
    """Width 5 in 3 bins of 5/3: [0,2) [1,4) [3,5); pixel 1 is in two bins and wins both."""
    x = plane(dtype=dtype)
    x[0, 0, 0, :5] = [0, 9, 1, 8, 2]
    rois = numpy.array([[0, 0, 0, 4, 0]], dtype=compute_dtype(dtype))
    out, argmax = run(backend, x, rois, (1, 3))
    numpy.testing.assert_array_equal(argmax[0, 0, 0], [1, 1, 3])
    assert_matches(out[0, 0, 0], numpy.array([9.0, 9.0, 8.0]), dtype)
    numpy.testing.assert_array_equal(argmax[0, 1, 0], [0, 1, 3])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_invalid_rois_give_zeros_and_no_index(backend, dtype):
    rng = make_rng("pool invalid", numpy.dtype(dtype).name)
    x = random_features(rng, (2, 2, 6, 6), dtype)
    valid = numpy.array([[0, 0.25, 0.75, 4.25, 5], [1.9, 1, 0.25, 5.5, 3.25], [-0.5, 2, 2, 3, 3]])
    invalid = [
        [-1, 1, 1, 4, 4], [2, 1, 1, 4, 4], [1e9, 1, 1, 4, 4], [1e20, 1, 1, 4, 4],
        [-1e20, 1, 1, 4, 4], [-1.5, 1, 1, 4, 4], [0, numpy.nan, 1, 4, 4],
        [1, 1, 1, numpy.inf, 4], [0, 1, -numpy.inf, 4, 4], [numpy.nan, 1, 1, 4, 4],
    ]
    rois = numpy.concatenate([valid, invalid]).astype(compute_dtype(dtype))
    out, argmax = run(backend, x, rois, 2, validate=False)
    expected = roi_pool_ref(x, rois, 2)
    assert not expected[0][len(valid):].any() and (expected[1][len(valid):] == -1).all()
    truncated = rois[: len(valid)].copy()
    truncated[:, 0] = [0, 1, 0]  # 1.9 and -0.5 truncate toward zero
    numpy.testing.assert_array_equal(expected[1][: len(valid)], roi_pool_ref(x, truncated, 2)[1])
    check((out, argmax), expected, dtype)


# ----------------------------------------------------------------------------- many RoIs
def test_many_rois_numpy():
    """K = 5000 on a small map: the whole batch equals the same RoIs one call each."""
    rng = make_rng("pool many")
    x = random_features(rng, (2, 3, 16, 16), numpy.float32)
    rois = random_boxes(rng, 2, 5000, 16, 16, quantum=0.25, dtype=numpy.float32)
    rng.shuffle(rois)
    out, argmax = roi_cupy.roi_pool(x, rois, 6, 0.5, return_indices=True)
    assert out.shape == argmax.shape == (5000, 3, 6, 6)
    picks = rng.choice(5000, size=150, replace=False)
    for k in picks:
        single, index = roi_cupy.roi_pool(x, rois[k : k + 1], 6, 0.5, return_indices=True)
        numpy.testing.assert_array_equal(out[k : k + 1], single)
        numpy.testing.assert_array_equal(argmax[k : k + 1], index)
    few = picks[:8]
    check((out[few], argmax[few]), roi_pool_ref(x, rois[few], 6, 0.5), numpy.float32)


# ----------------------------------------------------------------------------- properties
@st.composite
def pool_cases(draw):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    k = draw(st.integers(0, 4))
    quarters = st.integers(-4 * 12, 4 * 20)
    rows = [
        [draw(st.integers(0, n - 1))] + [draw(quarters) / 4 for _ in range(4)] for _ in range(k)
    ]
    return dict(
        shape=(n, c, h, w),
        rois=numpy.array(rows, dtype=numpy.float64).reshape(k, 5),
        output_size=(draw(st.integers(1, 6)), draw(st.integers(1, 6))),
        spatial_scale=draw(st.sampled_from(SPATIAL_SCALES)),
        dtype=draw(st.sampled_from([numpy.float32, numpy.float64])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=pool_cases())
def test_property_matches_reference(backend, case):
    rng = numpy.random.default_rng(case["seed"])
    # few distinct values, so that ties are common
    x = rng.integers(-3, 4, size=case["shape"]).astype(case["dtype"])
    rois = case["rois"].astype(compute_dtype(case["dtype"]))
    result = run(backend, x, rois, case["output_size"], spatial_scale=case["spatial_scale"])
    check(result, roi_pool_ref(x, rois, case["output_size"], case["spatial_scale"]), case["dtype"])


# ----------------------------------------------------------------------------- NumPy work layouts
def sprinkled(rng, shape, dtype):
    """Few distinct values (ties), with NaN, +inf and -inf sprinkled in."""
    x = rng.integers(-3, 4, size=shape).astype(numpy.float64)
    special = rng.random(shape)
    x[special < 0.03] = numpy.nan
    x[(special >= 0.03) & (special < 0.05)] = numpy.inf
    x[(special >= 0.05) & (special < 0.08)] = -numpy.inf
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_numpy_windows_and_planes_give_the_same_numbers(monkeypatch, dtype):
    """The NumPy backend pools RoIs that read less than the plane from their own windows, and
    others from copies of the whole plane: both give the same bits and indices."""
    from roi_cupy._numpy import roi_pool as numpy_pool

    rng = make_rng("pool windows", numpy.dtype(dtype).name)
    x = sprinkled(rng, (2, 3, 17, 23), dtype)
    rois = random_boxes(rng, 2, 40, 17, 23, quantum=0.25, dtype=compute_dtype(dtype))
    results = []
    for cost in (-(2**40), 2**40):  # every RoI on its window; every RoI on the plane
        monkeypatch.setattr(numpy_pool, "_ROI_COST", cost)
        results.append(roi_cupy.roi_pool(x, rois, (3, 5), 0.5, return_indices=True))
    (out_w, index_w), (out_p, index_p) = results
    numpy.testing.assert_array_equal(out_w.view(numpy.uint8), out_p.view(numpy.uint8))
    numpy.testing.assert_array_equal(index_w, index_p)
    check(results[0], roi_pool_ref(x, rois, (3, 5), 0.5), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_numpy_channel_chunks_give_the_same_numbers(monkeypatch, dtype):
    """The NumPy forward pools a chunk of channels at a time and decodes the bins of a run of
    RoIs straight into the outputs: with one channel per chunk (the outputs' slices strided),
    RoIs out of order (no runs), -0.0, NaN and infinities, the same bits and indices."""
    from roi_cupy._numpy import _common

    rng = make_rng("pool channel chunks", numpy.dtype(dtype).name)
    x = sprinkled(rng, (2, 3, 9, 11), dtype)
    x[rng.random(x.shape) < 0.1] = -0.0
    rois = random_boxes(rng, 2, 60, 9, 11, quantum=0.25, dtype=compute_dtype(dtype))
    for boxes in (rois, rois[rng.permutation(60)]):
        whole = roi_cupy.roi_pool(x, boxes, (3, 2), return_indices=True)
        monkeypatch.setattr(_common, "PLANE_BUDGET", 1)
        chunked = roi_cupy.roi_pool(x, boxes, (3, 2), return_indices=True)
        monkeypatch.undo()
        numpy.testing.assert_array_equal(chunked[0].view(numpy.uint8), whole[0].view(numpy.uint8))
        numpy.testing.assert_array_equal(chunked[1], whole[1])
        check(whole, roi_pool_ref(x, boxes, (3, 2)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("layout", ["images", "planes", "ranges"])
def test_numpy_backward_accumulators_match_reference(monkeypatch, dtype, layout):
    """The NumPy backward sums in small accumulators (all channels of an image, channel chunks
    of whole planes, or ranges of a plane where indices fall): forced small, with indices out
    of range ignored, it gives the reference's numbers, and the same bits as one call."""
    from reference import roi_pool_backward_ref

    from roi_cupy._numpy import roi_pool as numpy_pool

    rng = make_rng("pool accumulators", numpy.dtype(dtype).name, layout)
    shape = (2, 5, 9, 11)
    x = sprinkled(rng, shape, dtype)
    rois = random_boxes(rng, 2, 30, 9, 11, quantum=0.25, dtype=compute_dtype(dtype))
    rois[3, 0] = 7  # invalid: ignored
    _, indices = roi_cupy.roi_pool(x, rois, (3, 2), validate=False, return_indices=True)
    indices[0, 1, 0, 0] = 10**6  # out of range: ignored without validation
    indices[5, 0, 2, 1] = -9
    g = random_features(rng, indices.shape, dtype)
    g[1, 2, 1, 1] = numpy.inf
    expected = roi_pool_backward_ref(g, rois, indices, shape)
    whole = roi_cupy.roi_pool_backward(g, rois, indices, shape, validate=False)  # in one call
    monkeypatch.setattr(numpy_pool, "_ONCE", 0)
    monkeypatch.setattr(numpy_pool, "_DIRECT", 0.0)
    monkeypatch.setattr(numpy_pool, "_BACKWARD_CHUNK", 7)
    monkeypatch.setattr(numpy_pool, "_SEGMENT", 30)
    if layout != "images":
        monkeypatch.setattr(numpy_pool, "_IMAGE_SEGMENT", 0)
    if layout == "ranges":
        monkeypatch.setattr(numpy_pool, "_SEGMENT_PLANE", 13)
    for a in (indices, indices.astype(numpy.int32), numpy.repeat(indices, 2, axis=1)[:, ::2]):
        grad = roi_cupy.roi_pool_backward(g, rois, a, shape, validate=False)
        assert_matches(grad, expected, dtype)
        numpy.testing.assert_array_equal(grad.view(numpy.uint8), whole.view(numpy.uint8))


@pytest.mark.parametrize("layout", ["once", "images", "planes"])
def test_numpy_backward_reports_the_first_index_out_of_range(monkeypatch, layout):
    """Each way of summing checks the indices its own way (all at once, block by block as
    they are read, or in one pass first): each reports the first index out of range."""
    from roi_cupy._numpy import roi_pool as numpy_pool

    rng = make_rng("pool first index out of range")
    shape = (2, 3, 6, 7)
    rois = random_boxes(rng, 2, 40, 6, 7, quantum=0.25, dtype=numpy.float32)
    _, indices = roi_cupy.roi_pool(random_features(rng, shape, numpy.float32), rois, 2,
                                   return_indices=True)
    indices[31, 2, 1, 0] = 42
    indices[17, 0, 0, 1] = -2  # the first in C order
    g = random_features(rng, indices.shape, numpy.float32)
    if layout != "once":
        monkeypatch.setattr(numpy_pool, "_ONCE", 0)
        monkeypatch.setattr(numpy_pool, "_DIRECT", 0.0)
        monkeypatch.setattr(numpy_pool, "_BACKWARD_CHUNK", 13)
    if layout == "planes":
        monkeypatch.setattr(numpy_pool, "_IMAGE_SEGMENT", 0)
    with pytest.raises(ValueError, match=r"got -2 at \(17, 0, 0, 1\)"):
        roi_cupy.roi_pool_backward(g, rois, indices, shape)


def test_numpy_backward_float32_sums_stay_accurate():
    """Thousands of gradients on the same pixels, summed in float32 in a fixed order: within
    float32's tolerance of the float64 sums, and the same bits on every run."""
    from reference import roi_pool_backward_ref

    rng = make_rng("pool float32 sums")
    shape = (1, 2, 6, 6)
    x = numpy.zeros(shape, dtype=numpy.float32)
    x[0, :, 2, 3] = 1.0  # every box picks this pixel in every bin that covers it
    rois = numpy.tile(numpy.array([[0, 0, 0, 5, 5]], dtype=numpy.float32), (3000, 1))
    rois[:, 1:] += rng.integers(-1, 2, (3000, 4))
    _, indices = roi_cupy.roi_pool(x, rois, 2, return_indices=True)
    g = rng.uniform(-1, 1, indices.shape).astype(numpy.float32)
    grad = roi_cupy.roi_pool_backward(g, rois, indices, shape)
    expected = roi_pool_backward_ref(g.astype(numpy.float64), rois, indices, shape)
    assert_matches(grad, expected, numpy.float32)
    again = roi_cupy.roi_pool_backward(g, rois, indices, shape)
    numpy.testing.assert_array_equal(grad.view(numpy.uint32), again.view(numpy.uint32))


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=str)
def test_numpy_backward_in_place_gives_the_same_bits(monkeypatch, dtype):
    """Few gradients per pixel are summed straight into grad_input (an index -1 adding +0.0 to
    its plane's first pixel), many in padded accumulators, a small call's all at once: the same
    bits every way, -0.0 and non-finite gradients included."""
    from reference import roi_pool_backward_ref

    from roi_cupy._numpy import roi_pool as numpy_pool

    rng = make_rng("pool in place", numpy.dtype(dtype).name)
    shape = (2, 4, 8, 10)
    x = sprinkled(rng, shape, dtype)
    x[:, :, 0, 0] = 5.0  # picked where covered: the pixel an index -1 adds +0.0 to
    rois = random_boxes(rng, 2, 12, 8, 10, quantum=0.25, dtype=compute_dtype(dtype))
    _, indices = roi_cupy.roi_pool(x, rois, (2, 3), return_indices=True)
    assert (indices == -1).any() and (indices == 0).any(), "a vacuous case"
    g = random_features(rng, indices.shape, dtype)
    g[rng.random(g.shape) < 0.1] = -0.0
    g[0, 0, 1, 1] = numpy.nan
    results = [roi_cupy.roi_pool_backward(g, rois, indices, shape)]
    monkeypatch.setattr(numpy_pool, "_ONCE", 0)
    for direct in (2.0**40, 0.0):
        monkeypatch.setattr(numpy_pool, "_DIRECT", direct)
        results.append(roi_cupy.roi_pool_backward(g, rois, indices, shape))
    for other in results[1:]:
        numpy.testing.assert_array_equal(results[0].view(numpy.uint8), other.view(numpy.uint8))
    assert_matches(results[0], roi_pool_backward_ref(g, rois, indices, shape), dtype)


@pytest.mark.parametrize("axis", ["height", "width"])
def test_window_never_passes_an_extent_beyond_float32s_integers(backend, axis):
    """A plane side of 2**24 + 3 is 2**24 + 4 in float32: the clip at the plane's edge must still
    stop at the last pixel. The plane is a view whose next element holds 1e30, so a read one past
    the end shows in the maximum and its index."""
    side = 2**24 + 3
    shape = (1, 1, side, 1) if axis == "height" else (1, 1, 1, side)
    flat = numpy.zeros(side + 1, numpy.float32)
    flat[:side] = numpy.arange(side, dtype=numpy.float32) % 7
    flat[side] = 1e30
    array = backend.asarray(flat)
    plane = array[:side].reshape(shape)
    box = [0, side - 9, 0, side, 0] if axis == "width" else [0, 0, side - 9, 0, side]
    with backend.active():
        out, idx = roi_cupy.roi_pool(plane, backend.asarray(numpy.array([box], numpy.float64)),
                                     1, return_indices=True)
    out, idx = backend.to_numpy((out, idx))
    assert out.ravel()[0] == 6.0 and side - 9 <= idx.ravel()[0] < side, (out, idx)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_without_indices_no_argmax_is_made(backend, dtype):
    """The backend computes the output alone when the indices are not wanted (on a GPU the kernel
    gets a null argmax pointer and writes no int64 array), with the same numbers."""
    rng = make_rng("pool without indices", numpy.dtype(dtype).name)
    x = random_features(rng, (2, 3, 9, 8), dtype)
    rois = random_boxes(rng, 2, 6, 9, 8, dtype=compute_dtype(dtype))
    x_b, rois_b = backend.asarray(x), backend.asarray(rois)
    with backend.active():
        module = _backend.backend_for(_interop.array_module(x_b))
        out, argmax = module.roi_pool_forward(x_b, rois_b, 3, 2, 1.0, indices=False)
        full, full_argmax = module.roi_pool_forward(x_b, rois_b, 3, 2, 1.0, indices=True)
        public = roi_cupy.roi_pool(x_b, rois_b, (3, 2))
    assert argmax is None and full_argmax is not None
    numpy.testing.assert_array_equal(backend.to_numpy(out), backend.to_numpy(full))
    numpy.testing.assert_array_equal(backend.to_numpy(public), backend.to_numpy(full))


# ----------------------------------------------------------------------------- channels-last
def channels_last(x):
    """``x`` [N, C, H, W] as a transposed view of a C-contiguous [N, H, W, C] copy."""
    return numpy.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def bits(array):
    return numpy.ascontiguousarray(array).view(numpy.uint8)


def pool_inputs(rng, dtype, channels):
    """Features [2, channels, 9, 12] with NaN, ties and a window of -inf in them, and 30 RoIs of
    every shape conftest.random_boxes makes (outside the map, empty bins, reversed) plus boxes
    outside the map and rows with invalid batch indices."""
    x = random_features(rng, (2, channels, 9, 12), dtype)
    x[0, ::2, 3, 4] = numpy.nan
    x[1, :, 5, 2] = x[1, :, 5, 7] = 2.0  # a tie in every channel: the first one wins
    x[0, : channels // 2 + 1, :2, :2] = -numpy.inf
    rois = random_boxes(rng, 2, 30, 9, 12, quantum=0.25, dtype=compute_dtype(dtype))
    extra = numpy.array([
        [0, 0, 0, 1, 1],         # the -inf window
        [1, 0, 4, 11, 6],        # both tied pixels
        [0, 30, 1, 40, 3],       # right of the map
        [1, -20, -9, -3, -1],    # above and left of it
        [0, -5, 0, 2, 0],        # half its bins empty
        [2, 1, 1, 4, 4],         # batch index N: invalid
        [-1, 1, 1, 4, 4],        # batch index -1: invalid
    ], dtype=compute_dtype(dtype))
    return x, numpy.concatenate([rois, extra])


def spy_kernel_inputs(backend, monkeypatch):
    """``(instantiation, features)`` of every roi_pool_forward launch on the emulator."""
    received = []
    if backend.name != "emulator":
        return received
    emulated = importlib.import_module("roi_cupy._emulator.runtime")
    original = emulated.Runtime.function

    def function(self, name_expression):
        kernel = original(self, name_expression)
        if not name_expression.startswith("roi_pool_forward<"):
            return kernel

        def launch(grid, block, args):
            received.append((name_expression, args[0]))
            return kernel(grid, block, args)

        return launch

    monkeypatch.setattr(emulated.Runtime, "function", function)
    return received


def assert_read_in_place(received, nhwc, index="int"):
    """The second launch read ``nhwc``'s own memory as [N, H, W, C], the first an NCHW array;
    both on the ``index`` path."""
    assert [name.rsplit(", ", 1)[1] for name, _ in received] == [f"{index}>"] * 2
    (_, nchw), (_, features) = received
    assert not numpy.shares_memory(nchw, nhwc)
    assert features.shape == nhwc.shape and features.flags.c_contiguous
    assert features.__array_interface__["data"][0] == nhwc.__array_interface__["data"][0]


@pytest.mark.parametrize("index64", (False, True), ids=("int32", "int64"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_channels_last_features_give_the_same_bits(backend, monkeypatch, dtype, index64):
    """Channels-last features (a transposed view of [N, H, W, C]) give the output and indices of
    the same features in NCHW order, bit for bit; the kernels read them in place, no copy to
    [N, C, H, W] (on the emulator the launch's features are checked)."""
    from roi_cupy._cuda import launch

    if index64:
        monkeypatch.setattr(launch, "INDEX32_LIMIT", 20)  # smaller than every array here
    rng = make_rng("pool channels last", numpy.dtype(dtype).name)
    x, rois = pool_inputs(rng, dtype, 37)
    received = spy_kernel_inputs(backend, monkeypatch)
    nhwc = channels_last(x)
    nchw_out, nchw_argmax = run(backend, x, rois, (3, 4), validate=False)
    out, argmax = run(backend, nhwc, rois, (3, 4), validate=False)
    numpy.testing.assert_array_equal(bits(out), bits(nchw_out))
    numpy.testing.assert_array_equal(argmax, nchw_argmax)
    check((out, argmax), roi_pool_ref(x, rois, (3, 4)), dtype)
    if backend.name == "emulator":
        assert_read_in_place(received, nhwc.base, "long long" if index64 else "int")


LAUNCH_SHAPES = [(256, 4096), (32, 3), (64, 1), (1024, 5), (96, 7)]


@pytest.mark.parametrize("block, grid", LAUNCH_SHAPES, ids=str)
@pytest.mark.parametrize("channels, output_size", [(37, (3, 4)), (3, (1, 6)), (64, 1)], ids=str)
def test_channels_last_launch_shapes(backend, monkeypatch, block, grid, channels, output_size):
    """Channel counts that do not fill a warp or a block, blocks of 32 to 1024 threads and grids
    smaller than the work: every element is written (the emulator poisons outputs with NaN and
    indices with 0x5A bytes) with the NCHW path's bits."""
    if backend.name != "emulator":
        pytest.skip("a launch-shape test of the CUDA kernels: it runs on the emulator "
                    "backend, which takes any launch shape")
    from roi_cupy._cuda import launch

    monkeypatch.setattr(launch, "BLOCK", block)
    monkeypatch.setattr(launch, "MAX_GRID", grid)
    rng = make_rng("pool channels last launch", block, grid, channels, str(output_size))
    x, rois = pool_inputs(rng, numpy.float32, channels)
    received = spy_kernel_inputs(backend, monkeypatch)
    nhwc = channels_last(x)
    expected = run(backend, x, rois, output_size, validate=False)
    out, argmax = run(backend, nhwc, rois, output_size, validate=False)
    numpy.testing.assert_array_equal(bits(out), bits(expected[0]))
    numpy.testing.assert_array_equal(argmax, expected[1])
    check((out, argmax), roi_pool_ref(x, rois, output_size), numpy.float32)
    assert_read_in_place(received, nhwc.base)


def test_channels_last_torch_tensor(backend, monkeypatch):
    """A torch ``channels_last`` tensor pools as the NCHW one does, bit for bit, read in place."""
    torch = pytest.importorskip("torch")
    if backend.name == "cuda":
        pytest.skip("a CPU tensor")
    rng = make_rng("pool torch channels last")
    x, rois = pool_inputs(rng, numpy.float32, 19)
    t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    assert not t.is_contiguous()
    received = spy_kernel_inputs(backend, monkeypatch)
    with backend.active():
        a = roi_cupy.roi_pool(torch.from_numpy(x), torch.from_numpy(rois), (3, 2), 1.0,
                              return_indices=True, validate=False)
        b = roi_cupy.roi_pool(t, torch.from_numpy(rois), (3, 2), 1.0, return_indices=True,
                              validate=False)
    numpy.testing.assert_array_equal(bits(b[0].numpy()), bits(a[0].numpy()))
    numpy.testing.assert_array_equal(b[1].numpy(), a[1].numpy())
    if backend.name == "emulator":
        assert_read_in_place(received, t.permute(0, 2, 3, 1).numpy())
