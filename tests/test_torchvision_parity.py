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


# ----------------------------------------------------------------------------- position-sensitive
def tv_ps_align_safe(rois, sampling_ratio, spatial_scale, pooled):
    """Drop boxes whose adaptive sample grid is empty along an axis (a zero or reversed size):
    torchvision divides by a zero count there (NaN) or a negative one (-0.0); roi_cupy gives 0
    (docs/semantics.md, PS RoI Align forward)."""
    if sampling_ratio > 0:
        return rois
    scale = rois.dtype.type(spatial_scale)
    half = rois.dtype.type(0.5)
    width = (rois[:, 3] * scale - half) - (rois[:, 1] * scale - half)
    height = (rois[:, 4] * scale - half) - (rois[:, 2] * scale - half)
    keep = (numpy.ceil(width / pooled[1]) > 0) & (numpy.ceil(height / pooled[0]) > 0)
    return rois[keep]


def tv_ps_pool_grad_safe(rois, spatial_scale, h, w):
    """Keep boxes whose windows end well before the last row and column: torchvision's backward
    clips windows to H and W where its forward clips to H - 1 and W - 1, so elsewhere its
    gradient is not its forward's (docs/semantics.md, PS RoI Pool backward)."""
    scaled = numpy.abs(rois[:, 1:].astype(numpy.float64) * spatial_scale) + 0.5
    corner = numpy.floor(scaled) * numpy.sign(rois[:, 1:])  # rounded half away from zero
    keep = (corner[:, [0, 2]].max(axis=1) <= w - 3) & (corner[:, [1, 3]].max(axis=1) <= h - 3)
    return rois[keep]


@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_ps_roi_align(backend, dtype, sampling_ratio, spatial_scale):
    rng = make_rng("tv ps align", numpy.dtype(dtype).name, sampling_ratio, spatial_scale)
    x = random_features(rng, (2, 2 * 12, 10, 12), dtype)
    rois = random_boxes(rng, 2, 21, 10, 12, spatial_scale, dtype=dtype)
    rois = tv_ps_align_safe(rois, sampling_ratio, spatial_scale, (3, 4))
    assert len(rois) >= 14
    g = random_features(rng, (len(rois), 2, 3, 4), dtype)

    xt = torch_input(x)
    expected = tv_ops.ps_roi_align(xt, torch.from_numpy(rois), (3, 4), spatial_scale,
                                   sampling_ratio)
    expected.backward(torch.from_numpy(g))

    xb, rb = backend.asarray(x), backend.asarray(rois)
    with backend.active():
        out = roi_cupy.ps_roi_align(xb, rb, (3, 4), spatial_scale, sampling_ratio)
        grad = roi_cupy.ps_roi_align_backward(backend.asarray(g), rb, x.shape, (3, 4),
                                              spatial_scale, sampling_ratio)
    assert_parity(backend.to_numpy(out), expected, dtype)
    assert_parity(backend.to_numpy(grad), xt.grad, dtype)


@pytest.mark.parametrize("output_size", [(3, 2), 7], ids=str)
@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_ps_roi_pool(backend, dtype, spatial_scale, output_size):
    """The forward pass for every kind of box (past the last row and column too, where
    torchvision never reads them); the gradient for boxes clear of them."""
    rng = make_rng("tv ps pool", numpy.dtype(dtype).name, spatial_scale, output_size)
    bins = 6 if output_size == (3, 2) else 49
    h, w = 14, 16
    x = random_features(rng, (2, 2 * bins, h, w), dtype)
    # continuous coordinates: rounding in the compute dtype must match too
    rois = random_boxes(rng, 2, 28, h, w, spatial_scale, dtype=dtype)
    xb = backend.asarray(x)
    with backend.active():
        out = roi_cupy.ps_roi_pool(xb, backend.asarray(rois), output_size, spatial_scale)
    assert_parity(backend.to_numpy(out),
                  tv_ops.ps_roi_pool(torch.from_numpy(x), torch.from_numpy(rois), output_size,
                                     spatial_scale), dtype)

    rois = tv_ps_pool_grad_safe(rois, spatial_scale, h, w)
    assert len(rois) >= 8
    xt = torch_input(x)
    expected = tv_ops.ps_roi_pool(xt, torch.from_numpy(rois), output_size, spatial_scale)
    g = random_features(rng, tuple(expected.shape), dtype)
    expected.backward(torch.from_numpy(g))
    with backend.active():
        grad = roi_cupy.ps_roi_pool_backward(backend.asarray(g), backend.asarray(rois), x.shape,
                                             output_size, spatial_scale)
    assert_parity(backend.to_numpy(grad), xt.grad, dtype)


# ----------------------------------------------------------------------------- multi-scale RoI Align
MULTI_SCALE = {
    # strides 4 to 32 (levels 2 to 5) of images up to 128 x 160; canonical 32 at level 4:
    # sqrt(area) < 16 goes to map 0, [16, 32) to 1, [32, 64) to 2, >= 64 to 3
    "four levels": dict(strides=(4, 8, 16, 32), canonical_scale=32, canonical_level=4,
                        output_size=(3, 4), sampling_ratio=2),
    # torchvision's defaults (224 at level 4) on strides 1, 2, 4 (levels 0 to 2, the first
    # -0.0): sqrt(area) < 56 to map 0, [56, 112) to 1, >= 112 to 2; adaptive sampling
    "default canonical": dict(strides=(1, 2, 4), canonical_scale=224, canonical_level=4,
                              output_size=7, sampling_ratio=-1),
}
IMAGES = [(120, 150), (96, 160), (128, 100)]  # padded to 128 x 160, as a detector batches them


def multi_scale_boxes(rng, spec, dtype):
    """Per image: boxes of sides 3 to 300 (every level), squares whose sqrt(area) is exactly a
    level boundary, just inside and just outside torchvision's 1e-6 margin, and a box reversed
    along x (a negative area, which torchvision pools from no map)."""
    s0 = spec["canonical_scale"]
    edges = [s0 / 4, s0 / 2, s0, 2 * s0]
    exact = edges + [e * (1 - 2**-22) for e in edges] + [e * (1 - 2**-19) for e in edges]
    boxes = []
    for i, (height, width) in enumerate(IMAGES):
        side = numpy.exp(rng.uniform(numpy.log(3), numpy.log(300), (6, 2)))
        corner = rng.uniform(-0.1, 0.9, (6, 2)) * [width, height]
        rows = numpy.concatenate([corner, corner + side], axis=1)
        squares = [[1.0, 2.0, 1.0 + s, 2.0 + s] for s in exact[i::3]]
        reversed_x = [[0.6 * width, 0.2 * height, 0.3 * width, 0.5 * height]]
        boxes.append(numpy.concatenate([rows, squares, reversed_x]).astype(dtype))
    return boxes


@pytest.mark.parametrize("case", list(MULTI_SCALE))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_multi_scale_roi_align(backend, dtype, case):
    """The functional op against torchvision's MultiScaleRoIAlign module: the same levels for
    every box (boundaries included), forward and each map's gradient."""
    from collections import OrderedDict

    spec = MULTI_SCALE[case]
    rng = make_rng("tv multiscale", numpy.dtype(dtype).name, case)
    scales = [1.0 / s for s in spec["strides"]]
    features = [random_features(rng, (3, 2, 128 // s, 160 // s), dtype) for s in spec["strides"]]
    boxes = multi_scale_boxes(rng, spec, dtype)
    canonical = dict(canonical_scale=spec["canonical_scale"],
                     canonical_level=spec["canonical_level"])
    size, ratio = spec["output_size"], spec["sampling_ratio"]

    maps = OrderedDict((f"p{i}", torch_input(x)) for i, x in enumerate(features))
    pooler = tv_ops.MultiScaleRoIAlign(list(maps), size, ratio, **canonical)
    tv_boxes = [torch.from_numpy(b) for b in boxes]
    expected = pooler(maps, tv_boxes, IMAGES)
    assert pooler.scales == scales
    tv_levels = pooler.map_levels(tv_boxes).tolist()
    assert set(range(len(scales))) <= set(tv_levels)
    g = random_features(rng, tuple(expected.shape), dtype)
    expected.backward(torch.from_numpy(g))

    rois = numpy.concatenate(boxes).astype(numpy.float64)
    rois = numpy.concatenate([numpy.zeros((len(rois), 1)), rois], axis=1)
    from reference import box_level

    ours_levels = [box_level(r, scales, compute=numpy.dtype(dtype), **canonical) for r in rois]
    assert [-1 if v is None else v for v in ours_levels] == [
        v if 0 <= v < len(scales) else -1 for v in tv_levels
    ]
    with backend.active():
        out = roi_cupy.multi_scale_roi_align(
            [backend.asarray(x) for x in features], [backend.asarray(b) for b in boxes], size,
            scales, ratio, **canonical,
        )
        grads = roi_cupy.multi_scale_roi_align_backward(
            backend.asarray(g), [backend.asarray(b) for b in boxes], [x.shape for x in features],
            size, scales, ratio, **canonical,
        )
    assert_parity(backend.to_numpy(out), expected, dtype)
    for grad, x in zip(grads, maps.values()):
        assert_parity(backend.to_numpy(grad), x.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_multi_scale_levels_near_every_bound(dtype):
    """Squares within 300 ulps of each level's lower bound (torchvision's defaults on 4 maps):
    roi_cupy's level is torchvision's LevelMapper's wherever torch's log2 is rounded to
    nearest, and that is every one of them here."""
    from torchvision.ops.poolers import LevelMapper

    from roi_cupy._numpy.multi_scale_roi_align import levels_of
    from roi_cupy._ops.multi_scale_roi_align import level_bounds

    scales = [0.25, 0.125, 0.0625, 0.03125]
    bounds = level_bounds(scales, 4, dtype)
    bits = numpy.dtype(f"u{numpy.dtype(dtype).itemsize}")
    sides = []
    for bound in bounds:
        side = numpy.array(224 * bound, dtype=dtype).view(bits).astype(numpy.int64)
        sides.append((side + numpy.arange(-300, 300)).astype(bits).view(dtype))
    side = numpy.concatenate(sides)
    zeros = numpy.zeros_like(side)
    boxes = numpy.stack([zeros, zeros, side, side], axis=1)
    theirs = LevelMapper(2, 5)([torch.from_numpy(boxes)]).numpy()
    rois = numpy.concatenate([zeros[:, None], boxes], axis=1)
    ours = levels_of(rois, 224, bounds, len(scales))
    assert len(set(ours.tolist())) == len(scales)
    numpy.testing.assert_array_equal(ours, theirs)
