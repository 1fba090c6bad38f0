"""Side by side with torchvision.ops (forward, and the input gradient through torch autograd).

Skipped unless torchvision imports (directly, or through a ``tvref`` module whose ``load()``
returns ``(torch, torchvision.ops)``). Runs on every available backend; torchvision computes
float16 in half precision, so only float32 and float64 are compared.
"""
from __future__ import annotations

import sys

import numpy
import pytest
from conftest import SPATIAL_SCALES, make_rng, random_boxes, random_features

import roi_cupy


def load_torchvision():
    """``(torch, torchvision.ops, "")``, or ``(None, None, why)``."""
    try:
        import torch
        import torchvision.ops as ops

        return torch, ops, ""
    except Exception as exc:  # a broken install says why below
        direct = f"{type(exc).__name__}: {exc}"
    try:
        import tvref
    except ImportError:
        return None, None, (
            f"torchvision is not importable ({direct}), nor a tvref shim that loads it on a "
            "CPU-only torch (CI builds one; see .ci/run)"
        )
    # the failed import leaves half-initialised torchvision modules behind
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    torch, ops = tvref.load()
    return torch, ops, ""


torch, tv_ops, WHY = load_torchvision()
pytestmark = pytest.mark.skipif(tv_ops is None, reason=WHY)

# max abs error, relative to max(1, largest magnitude) for gradients (sums of many terms)
PARITY = {numpy.dtype(numpy.float32): 1e-5, numpy.dtype(numpy.float64): 1e-12}
DTYPES = [numpy.float32, numpy.float64]


def assert_parity(ours, theirs, dtype):
    theirs = theirs.detach().numpy()
    assert ours.dtype == theirs.dtype == numpy.dtype(dtype)
    assert ours.shape == theirs.shape
    bound = PARITY[numpy.dtype(dtype)] * max(1.0, float(numpy.abs(theirs).max(initial=0)))
    error = float(numpy.abs(ours.astype(numpy.float64) - theirs).max(initial=0))
    assert error <= bound, f"max abs error {error:.3g} > {bound:.3g}"


def torch_input(x):
    return torch.from_numpy(x.copy()).requires_grad_(True)


def tv_safe(rois, aligned, sampling_ratio):
    """Drop boxes torchvision's CPU kernel cannot run: aligned, adaptive, reversed in one axis
    only (it raises "cannot create std::vector larger than max_size()"; roi_cupy gives 0)."""
    if not aligned or sampling_ratio > 0:
        return rois
    one_axis = (rois[:, 3] < rois[:, 1]) != (rois[:, 4] < rois[:, 2])
    return rois[~one_axis]


@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3], ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_roi_align(backend, dtype, aligned, sampling_ratio, spatial_scale):
    rng = make_rng("tv align", numpy.dtype(dtype).name, aligned, sampling_ratio, spatial_scale)
    x = random_features(rng, (2, 3, 10, 12), dtype)
    rois = random_boxes(rng, 2, 14, 10, 12, spatial_scale, dtype=dtype)
    rois = tv_safe(rois, aligned, sampling_ratio)
    g = random_features(rng, (len(rois), 3, 3, 4), dtype)
    kwargs = dict(spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned)

    xt = torch_input(x)
    expected = tv_ops.roi_align(xt, torch.from_numpy(rois), (3, 4), **kwargs)
    expected.backward(torch.from_numpy(g))

    xb, rb = backend.asarray(x), backend.asarray(rois)
    with backend.active():
        out = roi_cupy.roi_align(xb, rb, (3, 4), **kwargs)
        grad = roi_cupy.roi_align_backward(backend.asarray(g), rb, x.shape, (3, 4), **kwargs)
    assert_parity(backend.to_numpy(out), expected, dtype)
    assert_parity(backend.to_numpy(grad), xt.grad, dtype)


def pool_parity(backend, x, rois, output_size, spatial_scale, dtype, rng):
    xt = torch_input(x)
    expected = tv_ops.roi_pool(xt, torch.from_numpy(rois), output_size, spatial_scale)
    g = random_features(rng, tuple(expected.shape), dtype)
    expected.backward(torch.from_numpy(g))
    xb, rb = backend.asarray(x), backend.asarray(rois)
    with backend.active():
        out, indices = roi_cupy.roi_pool(xb, rb, output_size, spatial_scale, return_indices=True)
        grad = roi_cupy.roi_pool_backward(backend.asarray(g), rb, indices, x.shape)
    assert_parity(backend.to_numpy(out), expected, dtype)
    assert_parity(backend.to_numpy(grad), xt.grad, dtype)


@pytest.mark.parametrize("output_size", [(3, 4), 7], ids=str)
@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_roi_pool(backend, dtype, spatial_scale, output_size):
    rng = make_rng("tv pool", numpy.dtype(dtype).name, spatial_scale, output_size)
    x = random_features(rng, (2, 3, 10, 12), dtype)
    # continuous coordinates: rounding in the compute dtype must match too
    rois = random_boxes(rng, 2, 14, 10, 12, spatial_scale, dtype=dtype)
    pool_parity(backend, x, rois, output_size, spatial_scale, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_roi_pool_bin_bounds_in_the_compute_dtype(backend, dtype):
    """Height 29 in 7 bins: 7 * (29 / 7) is 29.000000000000004 in float64 (the last bin takes
    one more row) but exactly 29 in float32. Both widths follow torchvision."""
    rng = make_rng("tv pool 29", numpy.dtype(dtype).name)
    x = random_features(rng, (1, 2, 32, 8), dtype)
    x[0, :, 29] = 5.0  # the row only float64 reaches
    rois = numpy.array([[0, 0, 0, 7, 28], [0, 1, 0.5, 6, 28.25]], dtype=dtype)
    pool_parity(backend, x, rois, 7, 1.0, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_roi_pool_ties_and_half_coordinates(backend, dtype):
    """Few distinct values (many ties) and x.5 corners."""
    rng = make_rng("tv pool ties", numpy.dtype(dtype).name)
    x = rng.integers(-2, 3, size=(2, 2, 9, 9)).astype(dtype)
    rois = random_boxes(rng, 2, 14, 9, 9, quantum=0.5, dtype=dtype)
    pool_parity(backend, x, rois, (2, 3), 1.0, dtype, rng)
