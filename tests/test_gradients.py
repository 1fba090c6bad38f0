"""Backward passes: finite differences, the adjoint identity, the reference, determinism."""
from __future__ import annotations

import functools

import numpy
import pytest
from conftest import (
    DTYPES,
    SAMPLING_RATIOS,
    SPATIAL_SCALES,
    TOLERANCE,
    assert_matches,
    compute_dtype,
    make_rng,
    random_boxes,
    random_features,
)
from reference import roi_align_backward_ref, roi_pool_backward_ref, roi_pool_ref

import roi_cupy


def align_forward(backend, x, rois, output_size, **kwargs):
    with backend.active():
        out = roi_cupy.roi_align(backend.asarray(x), backend.asarray(rois), output_size, **kwargs)
    return backend.to_numpy(out)


def align_backward(backend, g, rois, shape, output_size, contiguous=True, **kwargs):
    with backend.active():
        grad = roi_cupy.roi_align_backward(
            backend.features(g, contiguous), backend.asarray(rois), shape, output_size, **kwargs
        )
    return backend.to_numpy(grad)


def pool_backward(backend, g, rois, indices, shape, contiguous=True, **kwargs):
    with backend.active():
        grad = roi_cupy.roi_pool_backward(
            backend.features(g, contiguous), backend.asarray(rois), backend.asarray(indices),
            shape, **kwargs,
        )
    return backend.to_numpy(grad)


def assert_adjoint(lhs, x, grad, dtype):
    """``lhs == <x, grad>`` within the dtype's tolerance of the sum of |terms|."""
    terms = x.astype(numpy.float64) * grad.astype(numpy.float64)
    scale = float(numpy.abs(terms).sum())
    assert scale > 0, "a vacuous case: no input pixel receives gradient"
    assert abs(lhs - terms.sum()) <= TOLERANCE[numpy.dtype(dtype)] * scale, (
        f"<f(x), g> = {lhs!r} but <x, f*(g)> = {terms.sum()!r} (scale {scale:.3g})"
    )


# ----------------------------------------------------------------------------- RoI Align
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2], ids=str)
def test_align_finite_differences(align_backend, aligned, sampling_ratio):
    """Central differences of <roi_align(x), g> in every input element match the backward.

    Continuous random box coordinates keep every sample off pixel boundaries."""
    rng = make_rng("align fd", aligned, sampling_ratio)
    shape = (2, 2, 5, 6)
    x = random_features(rng, shape, numpy.float64)
    rois = random_boxes(rng, 2, 4, 5, 6)
    g = random_features(rng, (4, 2, 2, 3), numpy.float64)
    kwargs = dict(spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=aligned)
    grad = align_backward(align_backend, g, rois, shape, (2, 3), **kwargs)
    eps = 1e-3
    numeric = numpy.empty(shape)
    for i in numpy.ndindex(shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += eps
        minus[i] -= eps
        up = (align_forward(align_backend, plus, rois, (2, 3), **kwargs) * g).sum()
        down = (align_forward(align_backend, minus, rois, (2, 3), **kwargs) * g).sum()
        numeric[i] = (up - down) / (2 * eps)
    assert numpy.abs(numeric).max() > 0
    numpy.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-9)


@functools.cache
def align_case(dtype_name, aligned, sampling_ratio, spatial_scale):
    dtype = numpy.dtype(dtype_name)
    rng = make_rng("align backward", dtype_name, aligned, sampling_ratio, spatial_scale)
    shape = (2, 3, 9, 10)
    x = random_features(rng, shape, dtype)
    rois = random_boxes(rng, 2, 7, 9, 10, spatial_scale, dtype=compute_dtype(dtype))
    g = random_features(rng, (7, 3, 3, 2), dtype)
    expected = roi_align_backward_ref(g, rois, shape, spatial_scale, sampling_ratio, aligned)
    return x, rois, g, expected


@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS, ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_align_backward_matches_reference(align_backend, dtype, aligned, sampling_ratio, spatial_scale):
    case = (numpy.dtype(dtype).name, aligned, sampling_ratio, spatial_scale)
    x, rois, g, expected = align_case(*case)
    kwargs = dict(spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned)
    grad = align_backward(align_backend, g, rois, x.shape, (3, 2), **kwargs)
    assert_matches(grad, expected, dtype, x.shape)


@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS, ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_align_adjoint(align_backend, dtype, aligned, sampling_ratio, spatial_scale):
    """<roi_align(x), g> == <x, roi_align_backward(g)>."""
    x, rois, g, _ = align_case(numpy.dtype(dtype).name, aligned, sampling_ratio, spatial_scale)
    kwargs = dict(spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned)
    out = align_forward(align_backend, x, rois, (3, 2), **kwargs)
    grad = align_backward(align_backend, g, rois, x.shape, (3, 2), **kwargs)
    lhs = float((out.astype(numpy.float64) * g.astype(numpy.float64)).sum())
    assert_adjoint(lhs, x, grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_align_backward_strided_grad_output(align_backend, dtype):
    x, rois, g, expected = align_case(numpy.dtype(dtype).name, True, 2, 0.5)
    grad = align_backward(align_backend, g, rois, x.shape, (3, 2), contiguous=False,
                          spatial_scale=0.5, sampling_ratio=2, aligned=True)
    assert_matches(grad, expected, dtype, x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_align_backward_empty(align_backend, dtype):
    g = numpy.ones((0, 3, 2, 2), dtype=dtype)
    grad = align_backward(align_backend, g, numpy.zeros((0, 5), compute_dtype(dtype)), (2, 3, 4, 5), 2)
    assert_matches(grad, numpy.zeros((2, 3, 4, 5)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_align_backward_invalid_rois_give_no_gradient(align_backend, dtype):
    rng = make_rng("align backward invalid", numpy.dtype(dtype).name)
    shape = (2, 2, 6, 6)
    valid = random_boxes(rng, 2, 3, 6, 6)
    invalid = numpy.array([
        [-1, 1, 1, 4, 4], [2, 1, 1, 4, 4], [1e9, 1, 1, 4, 4], [-1e20, 1, 1, 4, 4],
        [0, numpy.nan, 1, 4, 4], [1, 1, 1, numpy.inf, 4], [numpy.nan, 1, 1, 4, 4],
    ])
    rois = numpy.concatenate([valid, invalid]).astype(compute_dtype(dtype))
    g = random_features(rng, (len(rois), 2, 2, 2), dtype)
    grad = align_backward(align_backend, g, rois, shape, 2, sampling_ratio=2, validate=False)
    expected = roi_align_backward_ref(g[:3], rois[:3], shape, 1.0, 2, False)
    numpy.testing.assert_array_equal(
        expected, roi_align_backward_ref(g, rois, shape, 1.0, 2, False)
    )
    assert_matches(grad, expected, dtype)


def test_align_backward_deterministic_numpy():
    """Many overlapping RoIs: two runs are bit-identical."""
    rng = make_rng("align determinism")
    shape = (2, 3, 16, 16)
    rois = random_boxes(rng, 2, 300, 16, 16)
    g = random_features(rng, (300, 3, 7, 7), numpy.float32)
    first = roi_cupy.roi_align_backward(g, rois, shape, 7, 0.5, -1, True)
    second = roi_cupy.roi_align_backward(g, rois, shape, 7, 0.5, -1, True)
    assert first.tobytes() == second.tobytes()


# ----------------------------------------------------------------------------- RoI Pool
@functools.cache
def pool_case(dtype_name):
    dtype = numpy.dtype(dtype_name)
    rng = make_rng("pool backward", dtype_name)
    shape = (2, 3, 9, 10)
    x = random_features(rng, shape, dtype)
    rois = random_boxes(rng, 2, 8, 9, 10, quantum=0.25, dtype=compute_dtype(dtype))
    _, indices = roi_pool_ref(x, rois, (3, 2))
    g = random_features(rng, (8, 3, 3, 2), dtype)
    return x, rois, indices, g, roi_pool_backward_ref(g, rois, indices, shape)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_pool_backward_matches_reference(backend, dtype, contiguous):
    x, rois, indices, g, expected = pool_case(numpy.dtype(dtype).name)
    grad = pool_backward(backend, g, rois, indices, x.shape, contiguous)
    assert_matches(grad, expected, dtype, x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_pool_backward_with_forward_indices(backend, dtype):
    """The indices the backend's own forward returns, fed back."""
    x, rois, _, g, _ = pool_case(numpy.dtype(dtype).name)
    with backend.active():
        _, indices = roi_cupy.roi_pool(
            backend.asarray(x), backend.asarray(rois), (3, 2), return_indices=True
        )
    indices = backend.to_numpy(indices)
    grad = pool_backward(backend, g, rois, indices, x.shape)
    assert_matches(grad, roi_pool_backward_ref(g, rois, indices, x.shape), dtype)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
def test_pool_adjoint(backend, dtype):
    """With the indices fixed, roi_pool is a gather; its adjoint is roi_pool_backward."""
    x, rois, indices, g, _ = pool_case(numpy.dtype(dtype).name)
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w).astype(numpy.float64)
    batch = rois[:, 0].astype(numpy.int64)[:, None, None, None]
    channel = numpy.arange(c)[None, :, None, None]
    gathered = numpy.where(indices >= 0, flat[batch, channel, numpy.maximum(indices, 0)], 0.0)
    assert (indices >= 0).any()
    grad = pool_backward(backend, g, rois, indices, x.shape)
    assert_adjoint(float((gathered * g).sum()), x, grad, dtype)


def test_pool_backward_overlapping_bins_accumulate(backend):
    """Pixel 1 is the maximum of two overlapping bins: it receives both gradients."""
    x = numpy.zeros((1, 1, 1, 5)) + numpy.array([0, 9, 1, 8, 2])
    rois = numpy.array([[0, 0, 0, 4, 0]])
    _, indices = roi_pool_ref(x, rois, (1, 3))
    g = numpy.array([0.25, 0.5, 2.0]).reshape(1, 1, 1, 3)
    grad = pool_backward(backend, g, rois, indices, x.shape)
    assert_matches(grad, numpy.array([0, 0.75, 0, 2.0, 0]).reshape(1, 1, 1, 5), numpy.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_pool_backward_ignores_invalid_rois_and_indices(backend, dtype):
    """validate=False: invalid RoIs and indices outside [-1, H*W) contribute nothing."""
    rng = make_rng("pool backward invalid", numpy.dtype(dtype).name)
    shape = (2, 2, 4, 5)
    rois = numpy.array([
        [0, 0, 0, 3, 3], [1, 1, 0, 4, 3],                       # valid
        [-1, 0, 0, 3, 3], [2, 0, 0, 3, 3], [1e20, 0, 0, 3, 3],   # bad batch index
        [0, numpy.nan, 0, 3, 3], [1, 0, 0, numpy.inf, 3],        # non-finite
    ]).astype(compute_dtype(dtype))
    indices = rng.integers(0, 20, size=(7, 2, 2, 2))
    indices[1, 0, 0] = [-7, 20]  # outside the plane: ignored
    indices[1, 1, 1] = [-1, 10**12]
    g = random_features(rng, (7, 2, 2, 2), dtype)
    grad = pool_backward(backend, g, rois, indices, shape, validate=False)
    expected = roi_pool_backward_ref(g, rois, indices, shape)
    kept = numpy.where((indices[:2] >= 0) & (indices[:2] < 20), indices[:2], -1)
    numpy.testing.assert_array_equal(expected, roi_pool_backward_ref(g[:2], rois[:2], kept, shape))
    assert_matches(grad, expected, dtype)


def test_pool_backward_deterministic_numpy():
    rng = make_rng("pool determinism")
    shape = (2, 3, 16, 16)
    x = random_features(rng, shape, numpy.float32)
    rois = random_boxes(rng, 2, 300, 16, 16, quantum=0.25, dtype=numpy.float32)
    _, indices = roi_cupy.roi_pool(x, rois, 7, return_indices=True)
    g = random_features(rng, (300, 3, 7, 7), numpy.float32)
    first = roi_cupy.roi_pool_backward(g, rois, indices, shape)
    second = roi_cupy.roi_pool_backward(g, rois, indices, shape)
    assert first.tobytes() == second.tobytes()
