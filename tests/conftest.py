"""Shared test machinery: the backends, the tolerance table and its one helper, random inputs.

Every case that runs on every backend stays small (N <= 2, C <= 4, H, W <= 20, K <= 8, output
<= 7 x 7): the emulator runs the CUDA kernels on the CPU with one fiber per CUDA thread.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import zlib
from collections.abc import Iterator
from typing import Any

import numpy
import pytest

import roi_cupy

BACKENDS = ("numpy", "emulator", "cuda")
BFLOAT16_MISSING = ""
try:  # NumPy's bfloat16 comes from ml_dtypes (the `test` extra); without it, bfloat16 is not run
    import ml_dtypes

    BFLOAT16: Any = numpy.dtype(ml_dtypes.bfloat16)
except ImportError as exc:
    BFLOAT16 = None
    BFLOAT16_MISSING = f"ml_dtypes is not importable ({exc})"
DTYPES = (numpy.float16, numpy.float32, numpy.float64) + ((BFLOAT16,) if BFLOAT16 else ())
# Two bytes, rounded once from the float32 compute type.
NARROW = tuple(d for d in (numpy.dtype(numpy.float16), BFLOAT16) if d is not None)
# Pairs are (sampling_h, sampling_w): one axis fixed and the other adaptive, or both fixed apart.
SAMPLING_RATIOS = (-1, 0, 1, 2, 3, (1, 3), (0, 2), (4, -1))
SPATIAL_SCALES = (1.0, 0.5, 0.25)

# Max abs error against the float64 reference, relative to the data scale (docs/semantics.md). The
# float16 (bfloat16) reference is rounded to float16 (bfloat16) once before the comparison.
TOLERANCE = {
    numpy.dtype(numpy.float64): 1e-12,
    numpy.dtype(numpy.float32): 1e-5,
    numpy.dtype(numpy.float16): 2e-3,
}
if BFLOAT16 is not None:
    TOLERANCE[BFLOAT16] = 1.6e-2  # two units of bfloat16's 8-bit significand, as for float16

_MODULES = {"emulator": "roi_cupy._emulator", "cuda": "roi_cupy._cuda"}


def pytest_configure(config: pytest.Config) -> None:
    """``ROI_CUPY_TEST_NO_POOL=1`` turns CuPy's memory pool off, so that every array is its own
    allocation and compute-sanitizer sees an access past its end (torch's caching allocator is
    turned off by ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``, read by torch itself)."""
    import os

    if os.environ.get("ROI_CUPY_TEST_NO_POOL") == "1":
        import cupy

        cupy.cuda.set_allocator(None)
        cupy.cuda.set_pinned_memory_allocator(None)


@functools.cache
def availability(name: str) -> tuple[bool, str]:
    """``(True, "")`` when the backend can run here, else ``(False, why)``."""
    if name == "numpy":
        return True, ""
    module_name = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return False, f"{module_name} cannot be imported: {exc}"
    available = getattr(module, "available", None)
    if available is None:
        return False, f"{module_name} has no available()"
    ok, why = available()
    return bool(ok), str(why)


class Backend:
    """One way of running the ops: NumPy arrays on the NumPy backend or the emulator, or CuPy."""

    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return self.name

    def asarray(self, array: numpy.ndarray) -> Any:
        """``array`` as the backend's array kind (CuPy for "cuda", NumPy otherwise)."""
        if self.name == "cuda":
            import cupy

            return cupy.asarray(array)
        return numpy.asarray(array)

    def to_numpy(self, result: Any) -> Any:
        """A result (or a tuple of results) as NumPy arrays."""
        if isinstance(result, tuple):
            return tuple(self.to_numpy(r) for r in result)
        if self.name == "cuda":
            import cupy

            return cupy.asnumpy(result)
        return numpy.asarray(result)

    def features(self, array: numpy.ndarray, contiguous: bool = True) -> Any:
        """``array`` on the backend, as a contiguous array or as a strided view.

        The view skips every other column of a wider array whose skipped columns hold NaN, so a
        backend that ignores strides shows it.
        """
        if contiguous:
            return self.asarray(array)
        wide = numpy.full(array.shape[:-1] + (2 * array.shape[-1],), numpy.nan, dtype=array.dtype)
        wide[..., ::2] = array
        view = self.asarray(wide)[..., ::2]
        assert not view.flags.c_contiguous or array.shape[-1] <= 1
        return view

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Route NumPy inputs to this backend (CuPy inputs always go to CUDA)."""
        with roi_cupy.use_backend("emulator" if self.name == "emulator" else "numpy"):
            yield


@pytest.fixture(params=BACKENDS, ids=str)
def backend(request: pytest.FixtureRequest) -> Backend:
    ok, why = availability(request.param)
    if not ok:
        pytest.skip(f"backend {request.param!r} is not available: {why}")
    return Backend(request.param)


@pytest.fixture(params=("numpy", "numpy-tiled", "numpy-in-place") + BACKENDS[1:], ids=str)
def align_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Backend:
    """The backends, with RoI Align's NumPy code run three times: as it chooses (small calls,
    as most here are, take its dense road), with every call on its tiled road, its windows
    gathered ("numpy-tiled"), and on its tiled road with every window it may read in place read
    so ("numpy-in-place")."""
    if request.param in ("numpy-tiled", "numpy-in-place"):
        from roi_cupy._numpy import roi_align

        monkeypatch.setattr(roi_align, "_SMALL_ROIS", -1)
        if request.param == "numpy-in-place":
            monkeypatch.setattr(roi_align, "_IN_PLACE_BYTES", 0)
        return Backend("numpy")
    ok, why = availability(request.param)
    if not ok:
        pytest.skip(f"backend {request.param!r} is not available: {why}")
    return Backend(request.param)


def assert_matches(
    actual: Any,
    expected: numpy.ndarray,
    dtype: Any,
    shape: tuple[int, ...] | None = None,
    scale: float | None = None,
) -> None:
    """Check a result against the float64 reference with the dtype's tolerance.

    Args:
        actual (ndarray): the result, as NumPy.
        expected (ndarray): the float64 reference.
        dtype: the dtype ``actual`` must have.
        shape (tuple): the shape ``actual`` must have. Default: ``expected.shape``.
        scale (float): the data scale the tolerance is relative to. Default: the largest finite
            magnitude of the (rounded) reference, so an all-zero reference demands exact zeros.

    Non-finite reference values (-FLT_MAX rounded to float16, NaN) must be matched exactly.
    """
    dtype = numpy.dtype(dtype)
    shape = expected.shape if shape is None else tuple(shape)
    assert isinstance(actual, numpy.ndarray), f"expected a NumPy array, got {type(actual)}"
    assert actual.dtype == dtype, f"dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == shape, f"shape {actual.shape}, expected {shape}"
    assert expected.shape == shape, f"reference shape {expected.shape}, expected {shape}"
    ref = numpy.asarray(expected, dtype=numpy.float64)
    if dtype in NARROW:
        with numpy.errstate(over="ignore"):
            ref = ref.astype(numpy.float32).astype(dtype).astype(numpy.float64)
    got = actual.astype(numpy.float64)
    finite = numpy.isfinite(ref)
    mismatch = numpy.isfinite(got) != finite
    mismatch |= ~finite & ~((got == ref) | (numpy.isnan(got) & numpy.isnan(ref)))
    assert not mismatch.any(), (
        f"non-finite values differ at {numpy.argwhere(mismatch)[:5].tolist()}: "
        f"got {got[mismatch][:5]}, expected {ref[mismatch][:5]}"
    )
    if not finite.any():
        return
    if scale is None:
        scale = float(numpy.abs(ref[finite]).max())
    error = numpy.zeros(ref.shape)
    error[finite] = numpy.abs(got[finite] - ref[finite])
    worst = numpy.unravel_index(numpy.argmax(error), error.shape)
    bound = TOLERANCE[dtype] * scale
    assert error[worst] <= bound, (
        f"max abs error {error[worst]:.3g} > {bound:.3g} ({TOLERANCE[dtype]} x scale {scale:.3g}) "
        f"at {tuple(int(i) for i in worst)}: got {got[worst]!r}, expected {ref[worst]!r}"
    )


# ----------------------------------------------------------------------------- random inputs
def make_rng(*key: Any) -> numpy.random.Generator:
    """A Generator seeded from ``key`` (stable across runs and processes)."""
    return numpy.random.default_rng(zlib.crc32(repr(key).encode()))


def compute_dtype(dtype: Any) -> numpy.dtype:
    """The box dtype the backends compute in: float64 for float64 features, float32 otherwise."""
    return numpy.dtype(numpy.float64 if numpy.dtype(dtype) == numpy.float64 else numpy.float32)


def random_features(
    rng: numpy.random.Generator, shape: tuple[int, ...], dtype: Any
) -> numpy.ndarray:
    """Uniform values in [-1, 1) of ``dtype`` (never all zeros)."""
    return rng.uniform(-1.0, 1.0, size=shape).astype(dtype)


def random_boxes(
    rng: numpy.random.Generator,
    n: int,
    k: int,
    height: int,
    width: int,
    spatial_scale: float = 1.0,
    quantum: float | None = None,
    dtype: Any = numpy.float64,
) -> numpy.ndarray:
    """``[k, 5]`` valid RoI rows of many shapes, in input-image coordinates.

    The shapes cycle through: inside the map, partly outside, fully outside, tiny (under a
    pixel), reversed in one or both axes, much larger than the map, and zero-size. Batch indices
    are integers in ``[0, n)``.

    Args:
        quantum (float): round every coordinate to a multiple of it (e.g. 0.25, exact in binary,
            so that rounding decisions cannot depend on the float width). Default: continuous
            coordinates, which almost surely avoid every sampling boundary.
        dtype: the dtype of the result. Default: float64.
    """
    size = numpy.array([width, height], dtype=numpy.float64)
    rows = numpy.empty((k, 5))
    for i in range(k):
        kind = i % 7
        if kind == 0:  # inside
            lo = rng.uniform(0, 0.6, 2) * size
            hi = lo + rng.uniform(0.1, 0.4, 2) * size
        elif kind == 1:  # partly outside
            lo = rng.uniform(-0.4, 0.8, 2) * size
            hi = lo + rng.uniform(0.3, 0.8, 2) * size
        elif kind == 2:  # fully outside, on a random side
            lo = rng.uniform(1.1, 1.5, 2) * size * rng.choice([-1, 1], 2)
            hi = lo + rng.uniform(0.1, 0.3, 2) * size
        elif kind == 3:  # tiny
            lo = rng.uniform(0, 0.9, 2) * size
            hi = lo + rng.uniform(0.05, 0.9, 2)
        elif kind == 4:  # reversed in one or both axes
            hi = rng.uniform(0, 0.6, 2) * size
            lo = hi + rng.uniform(0.5, 3.0, 2) * numpy.array([1, rng.choice([-1, 1])])
        elif kind == 5:  # much larger than the map
            lo = rng.uniform(-1.0, -0.3, 2) * size
            hi = rng.uniform(1.3, 2.0, 2) * size
        else:  # zero-size in one axis
            lo = rng.uniform(0, 1, 2) * size
            hi = lo + numpy.array([0.0, rng.uniform(0.5, 2.0)])
        rows[i, 0] = rng.integers(0, n)
        rows[i, 1:3], rows[i, 3:5] = lo, hi
    rows[:, 1:] /= spatial_scale
    if quantum is not None:
        rows[:, 1:] = numpy.round(rows[:, 1:] / quantum) * quantum
    return rows.astype(dtype)


def per_image(rois: numpy.ndarray, n: int) -> list[numpy.ndarray]:
    """``[K, 5]`` rows -> a list of n ``[L_i, 4]`` arrays (rows grouped by batch index)."""
    return [numpy.ascontiguousarray(rois[rois[:, 0] == i, 1:]) for i in range(n)]


def image_major(rois: numpy.ndarray) -> numpy.ndarray:
    """The rows stably sorted by batch index: the order a per-image list expands to."""
    return rois[numpy.argsort(rois[:, 0], kind="stable")]


# ----------------------------------------------------------------------------- rotated boxes
# Angles (degrees) the rotated boxes cycle through: exact quarter turns, beyond a full turn, and
# a continuous one drawn per box.
ROTATED_ANGLES = (0.0, 90.0, -45.0, 180.0, 370.0, 270.0, -90.0, None)


def random_rotated_boxes(
    rng: numpy.random.Generator,
    n: int,
    k: int,
    height: int,
    width: int,
    spatial_scale: float = 1.0,
    dtype: Any = numpy.float64,
) -> numpy.ndarray:
    """``[k, 6]`` valid rotated RoI rows ``(batch_index, cx, cy, w, h, angle)`` of many shapes,
    in input-image coordinates, angles in degrees.

    The shapes cycle through: inside the map, partly outside, fully outside, tiny (under a
    pixel), much larger than the map, zero width, negative height (mmcv lets it through); the
    angles cycle through :data:`ROTATED_ANGLES` independently. Batch indices are integers in
    ``[0, n)``; coordinates are continuous, so no sample lands on a pixel boundary.
    """
    size = numpy.array([width, height], dtype=numpy.float64)
    rows = numpy.empty((k, 6))
    for i in range(k):
        kind = i % 7
        if kind == 0:  # inside
            centre = rng.uniform(0.3, 0.7, 2) * size
            extent = rng.uniform(0.15, 0.4, 2) * size
        elif kind == 1:  # partly outside
            centre = rng.uniform(-0.1, 1.1, 2) * size
            extent = rng.uniform(0.3, 0.8, 2) * size
        elif kind == 2:  # fully outside, on a random side
            centre = rng.uniform(1.6, 2.0, 2) * size * rng.choice([-1, 1], 2)
            extent = rng.uniform(0.1, 0.3, 2) * size
        elif kind == 3:  # tiny
            centre = rng.uniform(0, 1, 2) * size
            extent = rng.uniform(0.05, 0.9, 2)
        elif kind == 4:  # much larger than the map
            centre = rng.uniform(0.3, 0.7, 2) * size
            extent = rng.uniform(1.3, 2.0, 2) * size
        elif kind == 5:  # zero width
            centre = rng.uniform(0.2, 0.8, 2) * size
            extent = numpy.array([0.0, rng.uniform(1.0, 4.0)])
        else:  # negative height
            centre = rng.uniform(0.2, 0.8, 2) * size
            extent = numpy.array([rng.uniform(1.0, 4.0), -rng.uniform(1.0, 4.0)])
        angle = ROTATED_ANGLES[i % len(ROTATED_ANGLES)]
        rows[i, 0] = rng.integers(0, n)
        rows[i, 1:3], rows[i, 3:5] = centre, extent
        rows[i, 5] = rng.uniform(-720.0, 720.0) if angle is None else angle
    rows[:, 1:5] /= spatial_scale
    return rows.astype(dtype)


def assert_work_split_keeps_numbers(
    monkeypatch: pytest.MonkeyPatch, dtype: Any, label: str, forward: Any, backward: Any
) -> None:
    """A position-sensitive op's NumPy blocks, pieces, runs and summation paths (a float64 sum
    per touched pixel or over the whole key space, prepared once or per pass) give the same
    numbers, forward and backward, non-finite values included (to float64 rounding: the order
    of a sum follows the grouping). ``forward(x, rois)`` and ``backward(g, rois, shape)`` call
    the op with 7x7 bins over two output channels."""
    from roi_cupy._numpy import _separable

    rng = make_rng(label, numpy.dtype(dtype).name)
    shape = (2, 2 * 49, 12, 13)
    x = random_features(rng, shape, dtype)
    x[1, 60, 5, 6] = numpy.inf
    rois = random_boxes(rng, 2, 90, 12, 13, dtype=dtype)
    g = random_features(rng, (90, 2, 7, 7), dtype)
    g[3, 1, 2, 2] = numpy.nan
    # float64 rounding of the sums, or one float32 rounding of those.
    atol = 1e-13 if dtype == numpy.float64 else 1e-6
    with numpy.errstate(invalid="ignore"):
        out, grad = forward(x, rois), backward(g, rois, shape)
        for setting in [dict(_DENSE=0), dict(_DENSE=0, _MAP=0), dict(_BLOCK=16, _SCATTER=64),
                        dict(_BLOCK=16, _SCATTER=64, _DENSE=0, _ACCUMULATOR=64),
                        dict(_PAIRS=8, _RUN=64, _MERGE=0, _CACHE=100)]:
            with monkeypatch.context() as patch:
                for key, value in setting.items():
                    patch.setattr(_separable, key, value)
                numpy.testing.assert_allclose(
                    forward(x, rois), out, rtol=0, atol=atol, err_msg=str(setting)
                )
                numpy.testing.assert_allclose(
                    backward(g, rois, shape), grad, rtol=0, atol=atol, err_msg=str(setting)
                )
