"""``deterministic=True`` backward passes: the same bits on every run, whatever the launch
configuration and the order in which blocks run, with errors no larger than atomicAdd's.

The emulator runs the CUDA kernels; blocks of 32 to 1024 threads, grids of 1 to 4096 blocks and
shuffled block orders stand in for the scheduling freedom of a GPU. The floating-point atomic path
is run the same way to show that the configurations do reorder the sums (else these tests could
not fail).
"""
from __future__ import annotations

import numpy
import pytest
from conftest import DTYPES, availability, compute_dtype, make_rng, random_features

import roi_cupy
from roi_cupy._cuda import launch

# (threads per block, most blocks, block order seed; 0 = in order)
CONFIGS = [(256, 4096, 0), (32, 3, 0), (64, 1, 0), (1024, 5, 7), (128, 2, 11), (256, 4096, 3)]


@pytest.fixture
def emulator():
    ok, why = availability("emulator")
    if not ok:
        pytest.skip(f"the emulator is not available: {why}")
    import roi_cupy._emulator as emulator

    return emulator.runtime()


def overlapping_rois(rng, n, count, h, w, dtype):
    """RoIs crowded on one region of each image, so that every pixel there takes many terms."""
    rois = numpy.empty((count, 5))
    rois[:, 0] = rng.integers(0, n, count)
    rois[:, 1] = rng.uniform(0, w / 4, count)
    rois[:, 2] = rng.uniform(0, h / 4, count)
    rois[:, 3] = rois[:, 1] + rng.uniform(w / 4, w / 2, count)
    rois[:, 4] = rois[:, 2] + rng.uniform(h / 4, h / 2, count)
    return rois.astype(dtype)


def each_config(monkeypatch, emulator, run):
    """``run()`` under every configuration of CONFIGS."""
    results = []
    for block, grid, seed in CONFIGS:
        monkeypatch.setattr(launch, "BLOCK", block)
        monkeypatch.setattr(launch, "MAX_GRID", grid)
        with emulator.library.block_order(seed):
            results.append(run())
    return results


def bits(array):
    return numpy.ascontiguousarray(array).view(numpy.uint8)


def pool_case(dtype, nonfinite=False):
    rng = make_rng("deterministic pool", numpy.dtype(dtype).name, nonfinite)
    n, c, h, w = 2, 3, 12, 14
    x = random_features(rng, (n, c, h, w), dtype)
    rois = overlapping_rois(rng, n, 40, h, w, compute_dtype(dtype))
    _, indices = roi_cupy.roi_pool(x, rois, (3, 4), return_indices=True)
    g = random_features(rng, (len(rois), c, 3, 4), dtype) * 1000  # wide range of magnitudes
    g = (g * rng.uniform(0, 1, g.shape) ** 8).astype(dtype)
    if nonfinite:
        flat = g.reshape(-1)
        flat[[3, 50, 51, 400]] = [numpy.nan, numpy.inf, -numpy.inf, numpy.inf]
    return g, rois, indices, (n, c, h, w)


def align_case(dtype, sampling_ratio=2, nonfinite=False):
    rng = make_rng("deterministic align", numpy.dtype(dtype).name, sampling_ratio, nonfinite)
    n, c, h, w = 2, 3, 12, 14
    rois = overlapping_rois(rng, n, 40, h, w, compute_dtype(dtype))
    g = random_features(rng, (len(rois), c, 3, 4), numpy.float64) * 1000
    g = (g * rng.uniform(0, 1, g.shape) ** 8).astype(dtype)
    if nonfinite:
        flat = g.reshape(-1)
        flat[[3, 50, 51, 400]] = [numpy.nan, numpy.inf, -numpy.inf, numpy.inf]
    return g, rois, (n, c, h, w)


def align_backward(case, sampling_ratio=2, **kwargs):
    g, rois, shape = case
    return roi_cupy.roi_align_backward(g, rois, shape, (3, 4), 1.0, sampling_ratio, True, **kwargs)


def max_case(dtype, nonfinite=False):
    g, rois, shape = align_case(dtype, nonfinite=nonfinite)
    rng = make_rng("deterministic max features", numpy.dtype(dtype).name)
    return g, rois, shape, random_features(rng, shape, dtype)


def max_backward(case, **kwargs):
    g, rois, shape, x = case
    if g.dtype == numpy.float64 and x.dtype != numpy.float64:  # the float64 sums of the check
        x = x.astype(numpy.float64)
    return roi_cupy.roi_align_backward(
        g, rois, shape, (3, 4), 1.0, 2, True, mode="max", input=x, **kwargs
    )


def pool_backward(case, **kwargs):
    return roi_cupy.roi_pool_backward(*case, **kwargs)


def pyramid_case(dtype, nonfinite=False):
    g, rois, shape = align_case(dtype, nonfinite=nonfinite)
    shapes = [shape, shape[:2] + (shape[2] // 2, shape[3] // 2)]
    # spatial scales 1 and 1/2 with canonical_scale 4: the crowded boxes use both levels
    return g, rois, shapes


def pyramid_backward(case, **kwargs):
    g, rois, shapes = case
    grads = roi_cupy.multi_scale_roi_align_backward(
        g, rois, shapes, (3, 4), [1.0, 0.5], 2, True, 4, 1, **kwargs
    )
    return numpy.concatenate([grad.ravel() for grad in grads])


def ps_case(dtype, nonfinite=False):
    g, rois, shape = align_case(dtype, nonfinite=nonfinite)
    return g, rois, shape[:1] + (3 * 12,) + shape[2:]  # C = 3 output channels x 3 x 4 bins


def ps_align_backward(case, **kwargs):
    g, rois, shape = case
    return roi_cupy.ps_roi_align_backward(g, rois, shape, (3, 4), 1.0, 2, **kwargs)


def ps_pool_backward(case, **kwargs):
    g, rois, shape = case
    return roi_cupy.ps_roi_pool_backward(g, rois, shape, (3, 4), 1.0, **kwargs)


def rotated_case(dtype, nonfinite=False):
    g, rois, shape = align_case(dtype, nonfinite=nonfinite)
    rng = make_rng("deterministic rotated", numpy.dtype(dtype).name)
    centre = (rois[:, 1:3] + rois[:, 3:5]) / 2
    size = rois[:, 3:5] - rois[:, 1:3]
    angle = rng.uniform(-180, 180, (len(rois), 1))
    rotated = numpy.concatenate([rois[:, :1], centre, size, angle], axis=1)
    return g, rotated.astype(rois.dtype), shape


def rotated_backward(case, **kwargs):
    g, rois, shape = case
    return roi_cupy.roi_align_rotated_backward(g, rois, shape, (3, 4), 1.0, 2, **kwargs)


OPS = {
    "roi_align": (align_case, align_backward),
    "ps_roi_align": (ps_case, ps_align_backward),
    "ps_roi_pool": (ps_case, ps_pool_backward),
    "roi_align_rotated": (rotated_case, rotated_backward),
    "multi_scale_roi_align": (pyramid_case, pyramid_backward),
    "roi_align_max": (max_case, max_backward),
    "roi_pool": (pool_case, pool_backward),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("op", OPS)
def test_backward_has_the_same_bits_in_every_configuration(monkeypatch, emulator, op, dtype):
    make, backward = OPS[op]
    case = make(dtype)

    def run(deterministic):
        with roi_cupy.use_backend("emulator"):
            return backward(case, deterministic=deterministic)

    fixed = each_config(monkeypatch, emulator, lambda: run(True))
    atomic = each_config(monkeypatch, emulator, lambda: run(False))
    assert all(numpy.array_equal(bits(r), bits(fixed[0])) for r in fixed[1:])
    if numpy.dtype(dtype).itemsize >= 4:  # narrow dtypes may round the differences away
        assert any(not numpy.array_equal(bits(r), bits(atomic[0])) for r in atomic[1:])
    # No less exact than the atomic sums, against float64 sums of the same terms.
    wide = (case[0].astype(numpy.float64),) + tuple(case[1:])
    exact = backward(wide)
    fixed_error = numpy.abs(fixed[0].astype(numpy.float64) - exact).max()
    atomic_error = max(numpy.abs(r.astype(numpy.float64) - exact).max() for r in atomic)
    assert fixed[0].dtype == numpy.dtype(dtype) and fixed[0].shape == exact.shape
    assert fixed_error <= atomic_error


@pytest.mark.parametrize("sampling_ratio", [0, 1, (7, 3), (-1, 64)], ids=str)
def test_roi_align_fixed_point_holds_every_sampling(emulator, sampling_ratio):
    case = align_case(numpy.float64, sampling_ratio)
    with roi_cupy.use_backend("emulator"):
        fixed = align_backward(case, sampling_ratio, deterministic=True)
    exact = align_backward(case, sampling_ratio)  # NumPy, float64
    numpy.testing.assert_allclose(fixed, exact, rtol=0, atol=1e-12 * numpy.abs(exact).max())


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("op", OPS)
def test_non_finite_gradients_reach_the_same_pixels(emulator, op, dtype):
    make, backward = OPS[op]
    case = make(dtype, nonfinite=True)
    with roi_cupy.use_backend("emulator"):
        fixed = backward(case, deterministic=True)
        atomic = backward(case)
    assert numpy.isnan(fixed).any() and numpy.isinf(fixed).any()
    numpy.testing.assert_array_equal(numpy.isnan(fixed), numpy.isnan(atomic))
    numpy.testing.assert_array_equal(numpy.isposinf(fixed), numpy.isposinf(atomic))
    numpy.testing.assert_array_equal(numpy.isneginf(fixed), numpy.isneginf(atomic))
    finite = numpy.isfinite(atomic)
    numpy.testing.assert_allclose(fixed[finite], atomic[finite], rtol=1e-5, atol=1e-3)


def test_all_zero_and_empty_gradients(emulator):
    g, rois, indices, shape = pool_case(numpy.float32)
    with roi_cupy.use_backend("emulator"):
        zero = roi_cupy.roi_pool_backward(
            numpy.zeros_like(g), rois, indices, shape, deterministic=True
        )
        empty = roi_cupy.roi_pool_backward(
            g[:0], rois[:0], indices[:0], shape, deterministic=True
        )
    assert not zero.any() and zero.shape == shape
    assert not empty.any() and empty.shape == shape


@pytest.mark.parametrize("op", OPS)
def test_numpy_is_deterministic_with_or_without_the_flag(op):
    make, backward = OPS[op]
    case = make(numpy.float32)
    numpy.testing.assert_array_equal(
        bits(backward(case)), bits(backward(case, deterministic=True))
    )


@pytest.mark.parametrize("value", ["yes", 1, None], ids=repr)
@pytest.mark.parametrize("op", OPS)
def test_the_flag_must_be_a_bool(op, value):
    make, backward = OPS[op]
    with pytest.raises(TypeError, match=f"deterministic must be a bool, got {value!r}"):
        backward(make(numpy.float32), deterministic=value)


@pytest.mark.parametrize("op", OPS)
def test_the_64_bit_index_path_gives_the_same_bits(monkeypatch, emulator, op):
    make, backward = OPS[op]
    case = make(numpy.float32)
    with roi_cupy.use_backend("emulator"):
        narrow = backward(case, deterministic=True)
        monkeypatch.setattr(launch, "INDEX32_LIMIT", 16)
        wide = backward(case, deterministic=True)
    numpy.testing.assert_array_equal(bits(narrow), bits(wide))
