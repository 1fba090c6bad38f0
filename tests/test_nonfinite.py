"""NaN and infinite features and gradients, and boxes whose size overflows.

A bin reads only the four bilinear corners of its samples (RoI Align) or its own window (RoI
Pool), so a non-finite value must reach exactly the outputs that read it: in RoI Align a corner of
weight 0 is still read (``0 * inf`` and ``0 * NaN`` are NaN), in RoI Pool NaN is never the
maximum and +inf is. Every backend is checked against the float64 reference, whose plain loops do
the same arithmetic; boxes and bin counts are chosen so that every sample coordinate is exact in
float32 as well, so no corner can differ between the two precisions.
"""
from __future__ import annotations

import warnings

import numpy
import pytest
from conftest import DTYPES, assert_matches, availability, compute_dtype, make_rng, random_boxes
import reference
from reference import FLT_MAX

import roi_cupy

NONFINITE = (numpy.nan, numpy.inf, -numpy.inf)
VALUE_IDS = ("nan", "+inf", "-inf")


def align(backend, x, rois, output_size, **kwargs):
    with backend.active():
        out = roi_cupy.roi_align(backend.asarray(x), backend.asarray(rois), output_size, **kwargs)
    return backend.to_numpy(out)


def align_backward(backend, g, rois, shape, output_size, **kwargs):
    with backend.active():
        grad = roi_cupy.roi_align_backward(
            backend.asarray(g), backend.asarray(rois), shape, output_size, **kwargs
        )
    return backend.to_numpy(grad)


def pool(backend, x, rois, output_size, **kwargs):
    with backend.active():
        result = roi_cupy.roi_pool(
            backend.asarray(x), backend.asarray(rois), output_size, return_indices=True, **kwargs
        )
    return backend.to_numpy(result)


def pool_backward(backend, g, rois, indices, shape, **kwargs):
    with backend.active():
        grad = roi_cupy.roi_pool_backward(
            backend.asarray(g), backend.asarray(rois), backend.asarray(indices), shape, **kwargs
        )
    return backend.to_numpy(grad)


def oracle(name, *args, **kwargs):
    """``reference.<name>(...)``; its loops compute inf - inf and 0 * inf, NaN on purpose."""
    with numpy.errstate(invalid="ignore"):
        return getattr(reference, name)(*args, **kwargs)


def sprinkle(rng, array, fraction):
    """``array`` with about ``fraction`` of its entries replaced by NaN, +inf or -inf."""
    out = array.copy()
    hit = rng.random(out.shape) < fraction
    out[hit] = rng.choice(NONFINITE, int(hit.sum()))
    return out


def kind(values):
    """Each entry as "nan", "+inf", "-inf" or "finite"."""
    v = numpy.asarray(values, dtype=numpy.float64)
    named = numpy.where(v == numpy.inf, "+inf", numpy.where(v == -numpy.inf, "-inf", "finite"))
    return numpy.where(numpy.isnan(v), "nan", named)


# ----------------------------------------------------------------------------- RoI Align
# A 6 x 8 plane. RoI 0 spans rows 2..3 and columns 0..8 with one sample per bin and four bins in a
# row: its samples sit at y = 2.5 and x = 1, 3, 5, 7 (aligned=False). An integer x reads columns
# x and x + 1 with weights 1 and 0; x = 7 = W - 1 snaps and reads column 7 twice (weights 1, 0).
# RoI 1 samples y = -0.5, which snaps to row 0 and reads row 1 with weight 0.
ALIGN_ROIS = numpy.array([[0, 0, 2, 8, 3], [0, 0, -1, 8, 0]], dtype=numpy.float64)
ALIGN_KW = dict(spatial_scale=1.0, sampling_ratio=1, aligned=False)
# (pixel, what RoI 0's four bins become for a value v there: "v" = v itself, "nan", "finite")
ALIGN_CASES = [
    ((2, 5), ["finite", "finite", "v", "finite"]),  # in the window, sampled by bin 2 only
    ((3, 4), ["finite", "nan", "finite", "finite"]),  # only a weight-0 corner of bin 1
    ((2, 7), ["finite", "finite", "finite", "nan"]),  # the snapped edge: weights 1/2 and 0
    ((0, 3), ["finite"] * 4),  # outside RoI 0's rows (RoI 1 reads it)
]


@pytest.mark.parametrize("case", range(len(ALIGN_CASES)), ids=str)
@pytest.mark.parametrize("value", NONFINITE, ids=VALUE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_align_forward_reads_only_sampled_pixels(backend, dtype, value, case):
    pixel, expected = ALIGN_CASES[case]
    x = make_rng("align-nonfinite", case).uniform(-1, 1, (1, 2, 6, 8)).astype(dtype)
    x[0, 0][pixel] = value
    rois = ALIGN_ROIS.astype(compute_dtype(dtype))
    out = align(backend, x, rois, (1, 4), **ALIGN_KW)
    v = kind([value])[0]
    assert kind(out[0, 0, 0]).tolist() == [v if e == "v" else e for e in expected]
    assert numpy.isfinite(out[:, 1]).all(), "another channel was touched"
    assert_matches(out, oracle("roi_align_ref", x, rois, (1, 4), **ALIGN_KW), dtype)


@pytest.mark.parametrize("value", NONFINITE, ids=VALUE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_align_forward_snapped_low_edge(backend, dtype, value):
    x = make_rng("align-low-edge").uniform(-1, 1, (1, 1, 6, 8)).astype(dtype)
    x[0, 0, 1, 5] = value  # RoI 1's bin 2 reads row 1 with weight 0 only
    rois = ALIGN_ROIS.astype(compute_dtype(dtype))
    out = align(backend, x, rois, (1, 4), **ALIGN_KW)
    assert kind(out[1, 0, 0]).tolist() == ["finite", "finite", "nan", "finite"]
    assert numpy.isfinite(out[0]).all()
    assert_matches(out, oracle("roi_align_ref", x, rois, (1, 4), **ALIGN_KW), dtype)


@pytest.mark.parametrize("value", NONFINITE, ids=VALUE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_align_backward_reaches_only_the_bins_corners(backend, dtype, value):
    g = make_rng("align-grad-nonfinite").uniform(-1, 1, (2, 1, 1, 4)).astype(dtype)
    g[0, 0, 0, 0] = value  # RoI 0, bin 0: sample (2.5, 1) reads (2|3, 1) at 1/2 and (2|3, 2) at 0
    rois = ALIGN_ROIS.astype(compute_dtype(dtype))
    shape = (1, 1, 6, 8)
    grad = align_backward(backend, g, rois, shape, (1, 4), **ALIGN_KW)
    expected = numpy.full((6, 8), "finite", dtype=object)
    positive = "nan" if numpy.isnan(value) else kind([value])[0]
    expected[2, 1] = expected[3, 1] = positive
    expected[2, 2] = expected[3, 2] = "nan"  # g * 0
    assert kind(grad[0, 0]).tolist() == expected.tolist()
    assert_matches(grad, oracle("roi_align_backward_ref", g, rois, shape, **ALIGN_KW), dtype)


@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 4], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_align_sprinkled_nonfinite_matches_reference(backend, dtype, sampling_ratio, aligned):
    rng = make_rng("align-sprinkled", dtype, sampling_ratio, aligned)
    shape = (2, 3, 9, 11)
    x = sprinkle(rng, rng.uniform(-1, 1, shape), 0.04).astype(dtype)
    # Corners on a 1/4 grid, 2 x 4 bins and 1, 2 or 4 samples: every sample is exact in float32.
    rois = random_boxes(rng, 2, 7, 9, 11, quantum=0.25, dtype=compute_dtype(dtype))
    kw = dict(spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=aligned)
    out = align(backend, x, rois, (2, 4), **kw)
    assert_matches(out, oracle("roi_align_ref", x, rois, (2, 4), **kw), dtype)
    assert numpy.isfinite(out).any() and not numpy.isfinite(out).all(), "a vacuous case"
    g = sprinkle(rng, rng.uniform(-1, 1, out.shape), 0.05).astype(dtype)
    grad = align_backward(backend, g, rois, shape, (2, 4), **kw)
    assert_matches(grad, oracle("roi_align_backward_ref", g, rois, shape, **kw), dtype)


@pytest.mark.parametrize("seed", range(4), ids=str)
def test_align_nonfinite_numpy_matches_emulator(seed):
    """Any geometry (adaptive grids, odd bin counts, scales): NumPy and the kernels agree."""
    ok, why = availability("emulator")
    if not ok:
        pytest.skip(f"the emulator is not available: {why}")
    rng = make_rng("align-vs-emulator", seed)
    dtype = DTYPES[seed % len(DTYPES)]
    shape = (2, 3, int(rng.integers(4, 14)), int(rng.integers(4, 14)))
    x = sprinkle(rng, rng.uniform(-1, 1, shape), 0.03).astype(dtype)
    rois = random_boxes(rng, 2, 7, shape[2], shape[3], 0.5, dtype=compute_dtype(dtype))
    kw = dict(spatial_scale=0.5, sampling_ratio=int(rng.choice([-1, 0, 3])), aligned=seed % 2 == 0)
    size = (3, 5)
    results = {}
    for name in ("numpy", "emulator"):
        with roi_cupy.use_backend(name):
            out = roi_cupy.roi_align(x, rois, size, **kw)
            g = sprinkle(make_rng("g", seed), numpy.ones(out.shape), 0.05).astype(dtype)
            results[name] = out, roi_cupy.roi_align_backward(g, rois, shape, size, **kw)
    for got, expected in zip(results["numpy"], results["emulator"]):
        assert_matches(got, expected.astype(numpy.float64), dtype)


# ----------------------------------------------------------------------------- RoI Pool
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_pool_nan_is_skipped_and_inf_is_picked(backend, dtype):
    x = make_rng("pool-nonfinite").uniform(-1, 1, (1, 3, 4, 6)).astype(dtype)
    x[0, 0, 0, 0] = numpy.nan  # first in the window, never picked
    x[0, 0, 1, 1] = numpy.inf  # picked, and the later +inf is not
    x[0, 0, 2, 2] = numpy.inf
    x[0, 1] = -numpy.inf  # nothing above -FLT_MAX: -FLT_MAX (-inf in float16), argmax -1
    x[0, 1, 3, 5] = numpy.nan
    x[0, 2, :2] = numpy.nan  # the rows that are left decide
    rois = numpy.array([[0, 0, 0, 5, 3]], dtype=compute_dtype(dtype))
    out, argmax = pool(backend, x, rois, 1)
    assert argmax[0, :, 0, 0].tolist() == [1 * 6 + 1, -1, int(numpy.nanargmax(x[0, 2, 2:])) + 12]
    assert out[0, 0, 0, 0] == numpy.inf
    with numpy.errstate(over="ignore"):
        assert out[0, 1, 0, 0] == numpy.asarray(-FLT_MAX).astype(dtype)
    expected_out, expected_argmax = oracle("roi_pool_ref", x, rois, 1)
    numpy.testing.assert_array_equal(argmax, expected_argmax)
    assert_matches(out, expected_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_pool_sprinkled_nonfinite_matches_reference(backend, dtype):
    rng = make_rng("pool-sprinkled", dtype)
    shape = (2, 3, 9, 11)
    x = sprinkle(rng, rng.uniform(-1, 1, shape), 0.15).astype(dtype)
    rois = random_boxes(rng, 2, 8, 9, 11, quantum=0.5, dtype=compute_dtype(dtype))
    out, argmax = pool(backend, x, rois, (3, 2))
    expected_out, expected_argmax = oracle("roi_pool_ref", x, rois, (3, 2))
    numpy.testing.assert_array_equal(argmax, expected_argmax)
    assert_matches(out, expected_out, dtype)
    assert (out == numpy.inf).any() and (argmax == -1).any(), "a vacuous case"
    g = sprinkle(rng, rng.uniform(-1, 1, out.shape), 0.1).astype(dtype)
    grad = pool_backward(backend, g, rois, argmax, shape)
    assert_matches(grad, oracle("roi_pool_backward_ref", g, rois, argmax, shape), dtype)
    # Only the picked pixels can receive a non-finite gradient.
    picked = numpy.zeros(shape, dtype=bool)
    for k, row in enumerate(rois):
        for c in range(shape[1]):
            a = argmax[k, c][argmax[k, c] >= 0]
            picked[int(row[0]), c].flat[a] = True
    assert numpy.isfinite(grad[~picked]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_pool_keeps_the_sign_of_a_picked_zero(backend, dtype):
    x = numpy.full((1, 2, 3, 3), -1.0, dtype=dtype)
    x[0, 0, 1, 1] = -0.0  # picked; the later +0.0 ties and loses
    x[0, 0, 2, 2] = 0.0
    x[0, 1, 0, 1] = 0.0
    x[0, 1, 2, 0] = -0.0
    rois = numpy.array([[0, 0, 0, 2, 2]], dtype=compute_dtype(dtype))
    out, argmax = pool(backend, x, rois, 1)
    assert argmax[0, :, 0, 0].tolist() == [4, 1]
    assert numpy.signbit(out[0, :, 0, 0]).tolist() == [True, False]


# ----------------------------------------------------------------------------- huge boxes
HUGE_ROIS = numpy.array(
    [
        [0, -3e38, -3e38, 3e38, 3e38],  # width and height overflow float32
        [1, 3e38, -3e38, -3e38, 3e38],
        [0, -1e30, 2, 1e30, 5],
        [1, -1e20, -1e20, 1e20, 1e20],
        [0, 2, 3, 1e7, 5],
    ]
)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_huge_boxes_run_quietly_and_match_the_kernels(dtype):
    """Overflowing box sizes are the intended arithmetic: no warning, and the kernels' numbers
    (adaptive grids are capped at 2**20 samples per bin and axis, as in the kernels)."""
    rng = make_rng("huge", dtype)
    shape = (2, 2, 7, 9)
    x = rng.uniform(-1, 1, shape).astype(dtype)
    rois = HUGE_ROIS.astype(compute_dtype(dtype))
    backends = ["numpy"] + (["emulator"] if availability("emulator")[0] else [])
    results = {}
    for name in backends:
        with roi_cupy.use_backend(name), warnings.catch_warnings():
            warnings.simplefilter("error")
            out = roi_cupy.roi_align(x, rois, (2, 3), sampling_ratio=-1, aligned=True)
            grad = roi_cupy.roi_align_backward(
                numpy.ones(out.shape, dtype=dtype), rois, shape, (2, 3), aligned=True
            )
            pooled, argmax = roi_cupy.roi_pool(x, rois, (2, 3), return_indices=True)
            pool_grad = roi_cupy.roi_pool_backward(
                numpy.ones(pooled.shape, dtype=dtype), rois, argmax, shape
            )
        results[name] = out, grad, pooled, argmax, pool_grad
        assert all(numpy.isfinite(r).all() for r in results[name])
    if "emulator" not in results:
        pytest.skip("the emulator is not available to compare with; the NumPy results ran quietly")
    for got, expected in zip(results["numpy"], results["emulator"]):
        if got.dtype == numpy.int64:
            numpy.testing.assert_array_equal(got, expected)
        else:
            assert_matches(got, expected.astype(numpy.float64), dtype)
