"""multi_scale_roi_align and its backward on every backend against the float64 reference: the level
rule (boundaries included), every dtype, empty levels and inputs, invalid RoIs, one level, one
kernel launch, and the gradients (finite differences, the adjoint identity)."""
from __future__ import annotations

import time

import functools
import math

import numpy
import pytest
from conftest import (
    DTYPES,
    Backend,
    SAMPLING_RATIOS,
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
    box_level,
    level_of_q,
    multi_scale_roi_align_backward_ref,
    multi_scale_roi_align_ref,
    pyramid_level,
    separable_backward_expected,
    separable_expected,
)

import roi_cupy
from roi_cupy._cuda import launch
from roi_cupy._numpy import multi_scale_roi_align as numpy_multi_scale
from roi_cupy._ops.multi_scale_roi_align import level_bounds

# Strides 2, 4, 8 (pyramid levels 1 to 3) of a 40 x 48 image. With canonical_scale 16 at level 2,
# sqrt(area) < 16 goes to map 0, [16, 32) to map 1, >= 32 to map 2.
SCALES = (0.5, 0.25, 0.125)
IMAGE = (40, 48)
CANONICAL = dict(canonical_scale=16, canonical_level=2)
SIZE = (2, 3)


def pyramid(rng, dtype, scales=SCALES, n=2, c=3, image=IMAGE):
    """Random maps ``[n, c, ceil(H * s), ceil(W * s)]``, finest first."""
    return [
        random_features(rng, (n, c, math.ceil(image[0] * s), math.ceil(image[1] * s)), dtype)
        for s in scales
    ]


def pyramid_boxes(rng, n, k, dtype, image=IMAGE, smallest=3.0, largest=70.0):
    """``[2 k + 1, 5]`` rows: k boxes with sides log-uniform in [smallest, largest] (every
    level), k of random_boxes' many shapes (outside, zero-size, huge, ...), and a box reversed
    along x only (a negative area: no level)."""
    side = numpy.exp(rng.uniform(math.log(smallest), math.log(largest), (k, 2)))
    corner = rng.uniform(-0.1, 0.9, (k, 2)) * [image[1], image[0]]
    sized = numpy.concatenate([rng.integers(0, n, (k, 1)), corner, corner + side], axis=1)
    shaped = random_boxes(rng, n, k, image[0], image[1])
    reversed_x = [[n - 1, 0.6 * image[1], 0.2 * image[0], 0.3 * image[1], 0.5 * image[0]]]
    return numpy.concatenate([sized, shaped, reversed_x]).astype(dtype)


def square(side, b=0.0, x=0.0, y=0.0):
    """A box whose q = sqrt(area) / canonical_scale is exactly ``side / canonical_scale``
    (sqrt(s * s) == s in IEEE arithmetic) for a power-of-two canonical scale."""
    return [b, x, y, x + side, y + side]


def levels(rois, scales=SCALES, canonical=CANONICAL, compute=numpy.float64):
    return [box_level(row, list(scales), compute=numpy.dtype(compute), **canonical)
            for row in rois]


def run(backend, features, boxes, output_size=SIZE, contiguous=True, **kwargs):
    """multi_scale_roi_align on ``backend`` with NumPy inputs, as NumPy."""
    if isinstance(boxes, list):
        boxes = [backend.asarray(b) for b in boxes]
    else:
        boxes = backend.asarray(boxes)
    kwargs = {"spatial_scales": SCALES, **CANONICAL, **kwargs}
    with backend.active():
        out = roi_cupy.multi_scale_roi_align(
            [backend.features(x, contiguous) for x in features], boxes, output_size, **kwargs
        )
    return backend.to_numpy(out)


def run_backward(backend, g, boxes, shapes, output_size=SIZE, contiguous=True, **kwargs):
    kwargs = {"spatial_scales": SCALES, **CANONICAL, **kwargs}
    with backend.active():
        grads = roi_cupy.multi_scale_roi_align_backward(
            backend.features(g, contiguous), backend.asarray(boxes), shapes, output_size,
            **kwargs,
        )
    assert isinstance(grads, list)
    return [backend.to_numpy(grad) for grad in grads]


# ----------------------------------------------------------------------------- the level rule
def test_reference_levels_by_hand():
    """floor(2 + log2(side / 16) + 1e-6) clamped to 1..3, minus 1; torchvision's k_min and k_max
    truncate -log2 of the float32 scale."""
    assert [pyramid_level(s) for s in (1.0, 0.5, 0.25, 0.3, 2.0)] == [0, 1, 2, 1, -1]
    sides = [1, 8, 15.9, 16, 31.99, 32, 64, 1000]
    assert levels([square(s) for s in sides]) == [0, 0, 0, 1, 1, 2, 2, 2]
    rect = [[0, 0, 0, 64, 4], [0, 0, 0, 4, 64], [0, 0, 0, 0, 50], [0, 5, 5, 1, 9]]
    assert levels(rect) == [1, 1, 0, None]  # sqrt(256) = 16; zero area: level 0; negative: none
    # sqrt(area) just below 16 stays on map 1 within eps (2^-20 below: 2 - 1.4e-6 + 1e-6 < 2)
    assert levels([square(16 * (1 - 2**-24)), square(16 * (1 - 2**-20))]) == [1, 0]
    # two maps of levels 2 and 4: a box of level 4 has no map; rising scales: none has one
    assert levels([square(64)], (0.25, 0.0625)) == [None]
    assert levels([square(8), square(64)], (0.125, 0.5)) == [None, None]
    assert levels([square(64)], (0.25,)) == [0]


CONFIGS = [  # (spatial scales, canonical_level): level rules of every shape
    ((0.25, 0.125, 0.0625, 0.03125), 4),
    ((1.0, 0.5, 0.25), 4),  # k_min is -0.0 truncated
    ((0.5, 0.25, 0.125), -3),
    ((0.25, 0.0625), 4),  # the clamp allows level 3, which has no map
    ((0.125, 0.5), 4),  # rising: every box below level 0
    ((0.3, 0.1), 4),  # not powers of two: k = 1 and 3
    (tuple(2.0**-k for k in range(1, 9)), 6),  # eight levels
    ((2.0, 1.0), 100),  # every finite box on the last level
]


@pytest.mark.parametrize("config", range(len(CONFIGS)))
@pytest.mark.parametrize("compute", [numpy.float32, numpy.float64], ids=lambda d: d.__name__)
def test_level_bounds_follow_the_rule_everywhere(compute, config):
    """The bounds the backends compare q with give the reference's level for every q: dense
    sweeps of 200 values of the compute dtype around each bound and each power of two, and
    values from 0 to infinity."""
    scales, canonical_level = CONFIGS[config]
    bounds = numpy.array(level_bounds(scales, canonical_level, compute), dtype=compute)
    assert len(bounds) <= len(scales) and numpy.all(numpy.diff(bounds) >= 0)
    bits = numpy.dtype(f"u{numpy.dtype(compute).itemsize}")
    centres = numpy.concatenate([bounds, 2.0 ** numpy.arange(-6, 7)]).astype(compute)
    centres = centres[numpy.isfinite(centres) & (centres > 0)]
    near = (centres.view(bits)[:, None].astype(numpy.int64) + numpy.arange(-100, 100)).ravel()
    rng = make_rng("bounds sweep", config, compute.__name__)
    with numpy.errstate(over="ignore"):  # 1e300 is inf in float32
        qs = numpy.concatenate([
            near.astype(bits).view(compute),
            numpy.exp(rng.uniform(-30, 30, 500)),
            numpy.array([0, 1e-40, 1e-300, 1e30, 1e300, numpy.inf, numpy.nan]),
        ]).astype(compute)
    expected = [level_of_q(q, list(scales), canonical_level, numpy.dtype(compute)) for q in qs]
    count = (qs[:, None] >= bounds[None, :]).sum(axis=1)
    got = [None if math.isnan(q) or c >= len(scales) else int(c) for q, c in zip(qs, count)]
    assert got == expected
    used = {level for level in expected if level is not None}
    assert used or config == 4


@pytest.mark.parametrize("compute", [numpy.float32, numpy.float64], ids=lambda d: d.__name__)
def test_numpy_levels_of_boxes_follow_the_rule(compute):
    """levels_of on squares whose q is a bound, the value just below one, and random boxes."""
    bounds = level_bounds(SCALES, CANONICAL["canonical_level"], compute)
    below = [numpy.nextafter(compute(b), compute(0)) for b in bounds]
    rows = [square(16 * float(q)) for q in list(bounds) + below]
    rng = make_rng("levels of", compute.__name__)
    rois = numpy.concatenate([numpy.array(rows), pyramid_boxes(rng, 2, 50, numpy.float64)])
    rois = rois.astype(compute)
    got = numpy_multi_scale.levels_of(rois, 16, bounds, len(SCALES))
    expected = levels(rois, compute=compute)
    assert [None if v < 0 else v for v in got.tolist()] == expected
    assert expected[: 2 * len(bounds)] == [1, 2, 0, 1]


# ----------------------------------------------------------------------------- the reference
@functools.cache
def grid_case(dtype_name, aligned, sampling_ratio):
    dtype = numpy.dtype(dtype_name)
    rng = make_rng("multiscale grid", dtype_name, aligned, sampling_ratio)
    features = pyramid(rng, dtype)
    rois = pyramid_boxes(rng, 2, 7, compute_dtype(dtype))
    g = random_features(rng, (len(rois), 3) + SIZE, dtype)
    kwargs = dict(spatial_scales=list(SCALES), sampling_ratio=sampling_ratio, aligned=aligned,
                  compute=compute_dtype(dtype), **CANONICAL)
    expected = multi_scale_roi_align_ref(features, rois, SIZE, **kwargs)
    grads = multi_scale_roi_align_backward_ref(g, rois, [x.shape for x in features], **kwargs)
    used = levels(rois, compute=compute_dtype(dtype))
    assert {0, 1, 2, None} <= set(used), used  # every map, and a box without a level
    return features, rois, g, expected, grads


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS, ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_matches_reference(backend, dtype, aligned, sampling_ratio, contiguous):
    features, rois, g, expected, grads = grid_case(numpy.dtype(dtype).name, aligned,
                                                   sampling_ratio)
    kwargs = dict(sampling_ratio=sampling_ratio, aligned=aligned)
    out = run(backend, features, rois, contiguous=contiguous, **kwargs)
    assert_matches(out, expected, dtype, (len(rois), 3) + SIZE)
    got = run_backward(backend, g, rois, [x.shape for x in features], contiguous=contiguous,
                       **kwargs)
    assert len(got) == len(features)
    for grad, ref, x in zip(got, grads, features):
        assert_matches(grad, ref, dtype, x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_level_boundaries(backend, dtype):
    """Squares whose q is exactly a bound, just below one, and exactly a power of two (the FPN
    boundaries sqrt(area) = 8, 16, 32, 64, rectangles too) land where the reference puts them."""
    compute = compute_dtype(dtype)
    bounds = level_bounds(SCALES, CANONICAL["canonical_level"], compute)
    below = [float(numpy.nextafter(compute.type(b), compute.type(0))) for b in bounds]
    rows = [square(16 * q, b=i % 2) for i, q in enumerate(list(bounds) + below)]
    rows += [square(s, b=1) for s in (8, 16, 32, 64)]
    rows += [[0, 3, 1, 35, 9], [1, 2, 2, 10, 34], [0, 1, 1, 129, 9]]  # areas 16^2, 16^2, 32^2
    rois = numpy.array(rows, dtype=compute)
    assert levels(rois, compute=compute) == [1, 2, 0, 1, 0, 1, 2, 2, 1, 1, 2]
    rng = make_rng("multiscale boundaries", numpy.dtype(dtype).name)
    features = pyramid(rng, dtype, image=(160, 160))
    kwargs = dict(spatial_scales=list(SCALES), sampling_ratio=2, compute=compute, **CANONICAL)
    out = run(backend, features, rois, sampling_ratio=2)
    assert_matches(out, multi_scale_roi_align_ref(features, rois, SIZE, **kwargs), dtype)
    g = random_features(rng, out.shape, dtype)
    grads = run_backward(backend, g, rois, [x.shape for x in features], sampling_ratio=2)
    refs = multi_scale_roi_align_backward_ref(g, rois, [x.shape for x in features], **kwargs)
    for grad, ref in zip(grads, refs):
        assert_matches(grad, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_boxes_as_per_image_list(backend, dtype):
    """A list of [L_i, 4] (one image without boxes) equals the image-major [K, 5] rows."""
    rng = make_rng("multiscale list", numpy.dtype(dtype).name)
    features = pyramid(rng, dtype, n=3)
    rois = pyramid_boxes(rng, 3, 5, compute_dtype(dtype))
    rois[:, 0] = numpy.arange(len(rois)) % 2 * 2  # images 0 and 2
    boxes = per_image(rois, 3)
    assert boxes[1].shape == (0, 4)
    out = run(backend, features, boxes, sampling_ratio=2)
    expected = multi_scale_roi_align_ref(
        features, image_major(rois), SIZE, list(SCALES), 2, compute=compute_dtype(dtype),
        **CANONICAL,
    )
    assert_matches(out, expected, dtype, (len(rois), 3) + SIZE)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: d.__name__)
def test_defaults_and_many_levels(backend, dtype):
    """torchvision's canonical 224 at level 4 on 5 maps of strides 4 to 64, adaptive sampling;
    and 8 maps, the most one call takes."""
    rng = make_rng("multiscale defaults", numpy.dtype(dtype).name)
    scales = [2.0**-k for k in range(2, 7)]
    features = pyramid(rng, dtype, scales, image=(256, 192))
    rois = pyramid_boxes(rng, 2, 12, dtype, (256, 192), 20, 700)
    rois = numpy.concatenate([rois, [square(s, b=1) for s in (80, 150, 300, 600)]]).astype(dtype)
    out = run(backend, features, rois, 3, spatial_scales=scales, canonical_scale=224,
              canonical_level=4)
    expected = multi_scale_roi_align_ref(features, rois, 3, scales, compute=numpy.dtype(dtype))
    assert_matches(out, expected, dtype)
    assert {0, 1, 2, 3} <= set(levels(rois, scales, dict(canonical_scale=224, canonical_level=4),
                                      dtype))
    scales = [2.0**-k for k in range(8)]
    features = pyramid(rng, dtype, scales, n=1, c=2, image=(128, 128))
    rois = pyramid_boxes(rng, 1, 12, dtype, (128, 128), 1, 200)
    rois = numpy.concatenate([rois, [square(2.0**k) for k in range(8)]]).astype(dtype)
    canonical = dict(canonical_scale=8, canonical_level=3)
    out = run(backend, features, rois, 2, spatial_scales=scales, sampling_ratio=2, **canonical)
    expected = multi_scale_roi_align_ref(features, rois, 2, scales, 2,
                                         compute=numpy.dtype(dtype), **canonical)
    assert_matches(out, expected, dtype)
    assert set(levels(rois, scales, canonical, dtype)) >= set(range(8))


# ----------------------------------------------------------------------------- special cases
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_one_level_is_roi_align(backend, dtype):
    """With one map every box is pooled from it (a reversed box too): roi_align, bit for bit."""
    rng = make_rng("multiscale one level", numpy.dtype(dtype).name)
    (x,) = pyramid(rng, dtype, (0.25,))
    rois = pyramid_boxes(rng, 2, 6, compute_dtype(dtype))
    kwargs = dict(spatial_scale=0.25, sampling_ratio=(2, 1), aligned=True)
    out = run(backend, [x], rois, spatial_scales=[0.25], sampling_ratio=(2, 1), aligned=True)
    with backend.active():
        expected = backend.to_numpy(roi_cupy.roi_align(backend.asarray(x),
                                                       backend.asarray(rois), SIZE, **kwargs))
    numpy.testing.assert_array_equal(out, expected)
    assert numpy.abs(expected).max() > 0
    g = random_features(rng, out.shape, dtype)
    (grad,) = run_backward(backend, g, rois, [x.shape], spatial_scales=[0.25],
                           sampling_ratio=(2, 1), aligned=True)
    with backend.active():
        expected = backend.to_numpy(roi_cupy.roi_align_backward(
            backend.asarray(g), backend.asarray(rois), x.shape, SIZE, **kwargs))
    numpy.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("sampling_ratio", [10**9, (3, 2**20)], ids=str)
def test_any_sampling_ratio_is_bounded_work(backend, sampling_ratio):
    """sampling_ratio=10**9 (2**40 samples a bin, hours one by one on the kernels): a bin whose
    samples outnumber its pixels' weights is summed by those weights; the numbers are RoI
    Align's, in float64 through the separable form."""
    rng = make_rng("multiscale bounded work", str(sampling_ratio))
    x = random_features(rng, (1, 3, 12, 10), numpy.float32)
    # The last box is reversed along y: its samples walk upwards.
    rois = numpy.array([[0, -8.0, -4.0, 44.0, 56.0], [0, 12.0, 8.0, 30.0, 32.0],
                        [0, 4.0, 40.0, 36.0, 6.0]], numpy.float32)
    kwargs = dict(spatial_scales=[0.25], sampling_ratio=sampling_ratio, aligned=True)
    start = time.monotonic()
    out = run(backend, [x], rois, **kwargs)
    g = random_features(rng, out.shape, numpy.float32)
    (grad,) = run_backward(backend, g, rois, [x.shape], **kwargs)
    assert time.monotonic() - start < 60
    assert_matches(out, separable_expected(x, rois, SIZE, 0.25, sampling_ratio, True),
                   numpy.float32)
    assert_matches(grad, separable_backward_expected(g, rois, x.shape, SIZE, 0.25,
                                                     sampling_ratio, True), numpy.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_numpy_is_each_levels_roi_align_bit_for_bit(dtype):
    rng = make_rng("multiscale per level", numpy.dtype(dtype).name)
    features = pyramid(rng, dtype)
    rois = pyramid_boxes(rng, 2, 9, compute_dtype(dtype))
    out = run(Backend("numpy"), features, rois, sampling_ratio=-1, aligned=True)
    g = random_features(rng, out.shape, dtype)
    grads = run_backward(Backend("numpy"), g, rois, [x.shape for x in features], aligned=True)
    chosen = numpy.array([-1 if v is None else v for v in levels(rois, compute=rois.dtype)])
    assert numpy.all(out[chosen < 0] == 0)
    for level, (x, scale) in enumerate(zip(features, SCALES)):
        mine = chosen == level
        expected = roi_cupy.roi_align(x, rois[mine], SIZE, scale, -1, True)
        numpy.testing.assert_array_equal(out[mine], expected)
        expected = roi_cupy.roi_align_backward(g[mine], rois[mine], x.shape, SIZE, scale, -1, True)
        numpy.testing.assert_array_equal(grads[level], expected)


def test_numpy_skips_empty_levels(monkeypatch):
    """Every box on the middle map: RoI Align runs once, the other maps get zero gradient."""
    calls = []
    for name in ("roi_align_forward", "roi_align_backward"):
        original = getattr(numpy_multi_scale, name)
        monkeypatch.setattr(numpy_multi_scale, name,
                            lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    rng = make_rng("multiscale empty levels")
    features = pyramid(rng, numpy.float32)
    rois = numpy.array([square(s, b=i % 2) for i, s in enumerate((16, 20, 31))], numpy.float32)
    out = run(Backend("numpy"), features, rois, sampling_ratio=2)
    g = random_features(rng, out.shape, numpy.float32)
    grads = run_backward(Backend("numpy"), g, rois, [x.shape for x in features],
                         sampling_ratio=2)
    assert calls == ["roi_align_forward", "roi_align_backward"]
    assert not grads[0].any() and not grads[2].any() and grads[1].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_boxes_without_a_map_give_zeros(backend, dtype):
    """Negative area, a level the clamp allows but no map has, and rising scales: zeros and no
    gradient, as torchvision gives."""
    rng = make_rng("multiscale no map", numpy.dtype(dtype).name)
    features = pyramid(rng, dtype, (0.5, 0.125))  # levels 1 and 3: a box of level 2 has no map
    rois = numpy.array([[0, 5, 5, 1, 9], square(40), square(4), square(16, b=1)],
                       dtype=compute_dtype(dtype))
    assert levels(rois, (0.5, 0.125)) == [None, None, 0, 1]
    out = run(backend, features, rois, spatial_scales=[0.5, 0.125], sampling_ratio=2)
    assert numpy.all(out[:2] == 0) and numpy.all(out[2:] != 0)
    g = random_features(rng, out.shape, dtype)
    g[2:] = 0
    grads = run_backward(backend, g, rois, [x.shape for x in features],
                         spatial_scales=[0.5, 0.125], sampling_ratio=2)
    assert not any(grad.any() for grad in grads)
    out = run(backend, features[::-1], rois, spatial_scales=[0.125, 0.5], sampling_ratio=2)
    assert not out.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize(
    "case", ["no rois", "no channels", "empty lists", "zero height", "no images"]
)
def test_empty_inputs(backend, case, dtype):
    rng = make_rng("multiscale empty", case)
    n = 0 if case == "no images" else 2
    features = pyramid(rng, dtype, n=n, c=0 if case == "no channels" else 3)
    if case == "zero height":  # the middle map has no rows: its boxes read nothing
        features[1] = features[1][:, :, :0]
    rois = numpy.array([square(4), square(20, b=1), square(50)], dtype=compute_dtype(dtype))
    if case in ("no rois", "no images"):
        rois = rois[:0]
    boxes = [rois[:0, 1:]] * n if case == "empty lists" else rois
    out = run(backend, features, boxes, sampling_ratio=2)
    k = len(rois) if case not in ("empty lists",) else 0
    assert out.shape == (k, features[0].shape[1]) + SIZE and out.dtype == dtype
    if case == "zero height":
        assert numpy.all(out[1] == 0) and numpy.all(out[0] != 0)
    else:
        assert not out.any()
    g = random_features(rng, out.shape, dtype)
    grads = run_backward(backend, g, rois[:k], [x.shape for x in features], sampling_ratio=2)
    assert [grad.shape for grad in grads] == [x.shape for x in features]
    if case == "zero height":
        assert grads[0].any() and grads[1].size == 0 and grads[2].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_invalid_rois(backend, dtype):
    """validate=True rejects them with roi_align's messages; validate=False gives zeros and no
    gradient (AddressSanitizer checks the kernels read nothing out of bounds)."""
    rng = make_rng("multiscale invalid", numpy.dtype(dtype).name)
    features = pyramid(rng, dtype)
    invalid = numpy.array([
        [-1, 1, 1, 9, 9], [2, 1, 1, 40, 40], [1e9, 1, 1, 20, 20], [numpy.nan, 1, 1, 9, 9],
        [0, numpy.nan, 1, 4, 4], [1, 1, 1, numpy.inf, 80], [0, -numpy.inf, 1, 4, 80],
    ])
    valid = pyramid_boxes(rng, 2, 3, numpy.float64)
    rois = numpy.concatenate([valid, invalid]).astype(compute_dtype(dtype))
    with pytest.raises(ValueError, match=r"boxes' batch index must be an integer in \[0, 2\)"):
        run(backend, features, rois[[0, len(valid)]])
    with pytest.raises(ValueError, match="boxes must be finite"):
        run(backend, features, rois[[0, len(valid) + 4]])
    out = run(backend, features, rois, validate=False, sampling_ratio=2)
    expected = multi_scale_roi_align_ref(features, rois, SIZE, list(SCALES), 2,
                                         compute=compute_dtype(dtype), **CANONICAL)
    assert_matches(out, expected, dtype)
    assert not out[len(valid):].any()
    g = random_features(rng, out.shape, dtype)
    g[: len(valid)] = 0
    grads = run_backward(backend, g, rois, [x.shape for x in features], validate=False,
                         sampling_ratio=2)
    assert not any(grad.any() for grad in grads)
    with pytest.raises(ValueError, match="boxes' batch index must be an integer"):
        run_backward(backend, g, rois, [x.shape for x in features])


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2], ids=str)
def test_finite_differences(backend, aligned, sampling_ratio):
    """Central differences of <multi_scale_roi_align(x), g> in every element of every map."""
    rng = make_rng("multiscale fd", aligned, sampling_ratio)
    features = pyramid(rng, numpy.float64, n=2, c=1, image=(20, 24))
    rois = pyramid_boxes(rng, 2, 3, numpy.float64, (20, 24), 6, 40)
    every_level = [square(10.3, 0, 2.5, 3.5), square(20.7, 1, 1.5, 0.5), square(36, 0, -3.3, -5.1)]
    rois = numpy.concatenate([rois, every_level])
    kwargs = dict(sampling_ratio=sampling_ratio, aligned=aligned)
    g = random_features(rng, (len(rois), 1) + SIZE, numpy.float64)
    grads = run_backward(backend, g, rois, [x.shape for x in features], **kwargs)
    eps = 1e-3
    for level, x in enumerate(features):
        numeric = numpy.empty(x.shape)
        for i in numpy.ndindex(x.shape):
            sums = []
            for step in (eps, -eps):
                moved = [y.copy() for y in features]
                moved[level][i] += step
                sums.append((run(backend, moved, rois, **kwargs) * g).sum())
            numeric[i] = (sums[0] - sums[1]) / (2 * eps)
        numpy.testing.assert_allclose(grads[level], numeric, rtol=0, atol=1e-9)
    assert all(numpy.abs(grad).max() > 0 for grad in grads)


@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS, ids=str)
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: d.__name__)
def test_adjoint(backend, dtype, sampling_ratio):
    """<multi_scale_roi_align(x), g> == sum over levels of <x_l, backward(g)_l>."""
    features, rois, g, _, _ = grid_case(numpy.dtype(dtype).name, True, sampling_ratio)
    out = run(backend, features, rois, sampling_ratio=sampling_ratio, aligned=True)
    grads = run_backward(backend, g, rois, [x.shape for x in features],
                         sampling_ratio=sampling_ratio, aligned=True)
    lhs = float((out.astype(numpy.float64) * g).sum())
    terms = numpy.concatenate([(x.astype(numpy.float64) * grad).ravel()
                               for x, grad in zip(features, grads)])
    scale = float(numpy.abs(terms).sum())
    assert scale > 0
    assert abs(lhs - terms.sum()) <= {numpy.float32: 1e-5, numpy.float64: 1e-12}[dtype] * scale


# ----------------------------------------------------------------------------- the kernels
@pytest.fixture
def launches(monkeypatch):
    """The emulated kernel launches during the test, by name."""
    from roi_cupy._emulator.runtime import Kernel

    names = []
    original = Kernel.__call__

    def record(self, grid, block, args):
        names.append(self.name)
        return original(self, grid, block, args)

    monkeypatch.setattr(Kernel, "__call__", record)
    return names


@pytest.mark.parametrize("index64", (False, True), ids=("int32", "int64"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_emulator_runs_every_level_in_one_launch(launches, monkeypatch, dtype, index64):
    """On the emulator the forward and the backward are one kernel launch each, whatever the
    number of levels (and validation one more), on both index widths."""
    ok, why = availability("emulator")
    if not ok:
        pytest.skip(why)
    if index64:
        monkeypatch.setattr(launch, "INDEX32_LIMIT", 20)  # smaller than every array here
    emulator = Backend("emulator")
    features, rois, g, expected, grads = grid_case(numpy.dtype(dtype).name, False, 2)
    out = run(emulator, features, rois, sampling_ratio=2, validate=False)
    got = run_backward(emulator, g, rois, [x.shape for x in features], sampling_ratio=2,
                       validate=False)
    width = "long long" if index64 else "int"
    kind = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float",
            "float64": "double"}[numpy.dtype(dtype).name]
    assert launches == [f"multi_scale_roi_align_forward<{kind}, {width}>",
                        f"multi_scale_roi_align_backward<{kind}, {width}>"]
    assert_matches(out, expected, dtype)
    for grad, ref in zip(got, grads):
        assert_matches(grad, ref, dtype)
    launches.clear()
    run(emulator, features, rois, sampling_ratio=2)
    assert [name.split("<")[0] for name in launches] == ["roi_check",
                                                         "multi_scale_roi_align_forward"]


# ----------------------------------------------------------------------------- arguments
def test_bad_arguments_are_named():
    rng = make_rng("multiscale arguments")
    features = pyramid(rng, numpy.float32)
    rois = numpy.array([square(10)], numpy.float32)
    shapes = [x.shape for x in features]
    g = numpy.ones((1, 3) + SIZE, numpy.float32)

    def call(features=features, **kwargs):
        kwargs = {"spatial_scales": SCALES, **kwargs}
        return roi_cupy.multi_scale_roi_align(features, rois, SIZE, **kwargs)

    def call_backward(shapes=shapes, g=g, **kwargs):
        kwargs = {"spatial_scales": SCALES, **kwargs}
        return roi_cupy.multi_scale_roi_align_backward(g, rois, shapes, SIZE, **kwargs)

    with pytest.raises(ValueError, match="features must hold 1 to 8 levels, got 9"):
        call([features[0]] * 9, spatial_scales=[0.5] * 9)
    with pytest.raises(ValueError, match="features must hold 1 to 8 levels, got 0"):
        call([], spatial_scales=[])
    with pytest.raises(TypeError, match="features must be a list of arrays"):
        call(features[0])
    with pytest.raises(TypeError, match=r"features\[1\] has dtype float64 but features\[0\]"):
        call([features[0], features[1].astype(numpy.float64), features[2]])
    with pytest.raises(ValueError, match=r"features\[2\] must have the N and C of features\[0\]"):
        call(features[:2] + [features[2][:, :2]])
    with pytest.raises(ValueError, match=r"features\[1\] must have shape \[N, C, H, W\]"):
        call([features[0], features[1][0], features[2]])
    with pytest.raises(ValueError, match=r"spatial_scales must hold one scale per level \(3\)"):
        call(spatial_scales=[0.5, 0.25])
    with pytest.raises(ValueError, match=r"spatial_scales\[1\]: spatial_scale must be positive"):
        call(spatial_scales=[0.5, 0.0, 0.125])
    with pytest.raises(TypeError, match=r"spatial_scales\[2\]: spatial_scale must be a real"):
        call(spatial_scales=[0.5, 0.25, "0.125"])
    with pytest.raises(ValueError, match=r"spatial_scales\[0\] must lie within float32's range"):
        call([x.astype(numpy.float64) for x in features], spatial_scales=[1e-60, 0.25, 0.125])
    with pytest.raises(TypeError, match="canonical_scale must be an int, got True"):
        call(canonical_scale=True)
    with pytest.raises(ValueError, match=r"canonical_scale must be an int in \[1, 16777216\]"):
        call(canonical_scale=0)
    with pytest.raises(TypeError, match="canonical_level must be an int, got 4.0"):
        call(canonical_level=4.0)
    with pytest.raises(TypeError, match="aligned must be a bool"):
        call(aligned=1)
    with pytest.raises(ValueError, match=r"input_shapes\[1\] must have the N and C"):
        call_backward([shapes[0], (2, 4, 5, 6), shapes[2]])
    with pytest.raises(ValueError, match="input_shapes must hold 1 to 8 levels, got 9"):
        call_backward([shapes[0]] * 9, spatial_scales=[0.5] * 9)
    with pytest.raises(ValueError, match=r"grad_output must have shape \[K, C, PH, PW\]"):
        call_backward(g=numpy.ones((2, 3) + SIZE, numpy.float32))
    with pytest.raises(ValueError, match="input_shape must be four non-negative ints"):
        call_backward([shapes[0], (2, 3, 5), shapes[2]])
