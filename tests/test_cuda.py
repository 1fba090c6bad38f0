"""What only the kernel launch path has: the 64-bit index path, invalid RoIs reaching the kernels
(validate=False), and CUDA specifics (devices, streams, graphs, no host synchronisation, DLPack).

Tests that the CPU emulator can run too are parametrised over both kernel runtimes; the shared
operator tests (test_roi_align.py, test_roi_pool.py) cover the numbers on every backend.
"""
from __future__ import annotations

import numpy
import pytest
from conftest import (
    DTYPES,
    Backend,
    assert_matches,
    availability,
    make_rng,
    random_boxes,
    random_features,
)
from reference import roi_align_backward_ref, roi_align_ref, roi_pool_backward_ref, roi_pool_ref

import roi_cupy
from roi_cupy._cuda import launch

SHAPE = (2, 3, 9, 11)  # N, C, H, W


@pytest.fixture(params=("emulator", "cuda"), ids=str)
def kernels_on(request: pytest.FixtureRequest) -> Backend:
    """A backend that runs the CUDA kernels: the CPU emulator or a GPU."""
    ok, why = availability(request.param)
    if not ok:
        pytest.skip(f"backend {request.param!r} is not available: {why}")
    return Backend(request.param)


@pytest.fixture
def cupy():
    ok, why = availability("cuda")
    if not ok:
        pytest.skip(f"needs a CUDA device: {why}")
    import cupy

    return cupy


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kernel instantiations launched during the test, in order."""
    launched: list[str] = []
    original = launch.kernel_name

    def record(kernel, dtype, index64):
        launched.append(original(kernel, dtype, index64))
        return launched[-1]

    monkeypatch.setattr(launch, "kernel_name", record)
    return launched


def _all_four(be: Backend, x: numpy.ndarray, rois: numpy.ndarray, validate: bool = True):
    """roi_align and roi_pool forward and backward on ``be``, as NumPy results."""
    rng = make_rng("grads", x.shape, rois.shape)
    n, c, _, _ = x.shape
    g_align = random_features(rng, (len(rois), c, 3, 4), x.dtype)
    g_pool = random_features(rng, (len(rois), c, 2, 3), x.dtype)
    with be.active():
        xa, ra = be.asarray(x), be.asarray(rois)
        align = roi_cupy.roi_align(xa, ra, (3, 4), 0.5, -1, True, validate=validate)
        align_grad = roi_cupy.roi_align_backward(
            be.asarray(g_align), ra, x.shape, (3, 4), 0.5, -1, True, validate=validate
        )
        pool, argmax = roi_cupy.roi_pool(xa, ra, (2, 3), 0.5, return_indices=True,
                                         validate=validate)
        pool_grad = roi_cupy.roi_pool_backward(
            be.asarray(g_pool), ra, argmax, x.shape, validate=validate
        )
    got = be.to_numpy((align, align_grad, pool, argmax, pool_grad))
    return got, (g_align, g_pool)


def _check_all_four(got, grads, x, rois):
    align, align_grad, pool, argmax, pool_grad = got
    g_align, g_pool = grads
    assert_matches(align, roi_align_ref(x, rois, (3, 4), 0.5, -1, True), x.dtype)
    assert_matches(
        align_grad, roi_align_backward_ref(g_align, rois, x.shape, 0.5, -1, True), x.dtype
    )
    ref_pool, ref_argmax = roi_pool_ref(x, rois, (2, 3), 0.5)
    assert_matches(pool, ref_pool, x.dtype)
    assert argmax.dtype == numpy.int64
    numpy.testing.assert_array_equal(argmax, ref_argmax)
    assert_matches(pool_grad, roi_pool_backward_ref(g_pool, rois, argmax, x.shape), x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_kernels_agree_with_the_numpy_backend(kernels_on, dtype):
    """Each kernel backend against the NumPy backend directly (both also meet the float64
    reference elsewhere): random boxes of every shape, both ops, forward and backward."""
    rng = make_rng("kernels vs numpy", numpy.dtype(dtype).name)
    x = random_features(rng, SHAPE, dtype)
    rois = random_boxes(rng, SHAPE[0], 14, SHAPE[2], SHAPE[3], 0.5)
    got, _ = _all_four(kernels_on, x, rois)
    expected, _ = _all_four(Backend("numpy"), x, rois)
    for name, a, b in zip(("align", "align_grad", "pool", "argmax", "pool_grad"), got, expected):
        if name == "argmax":
            numpy.testing.assert_array_equal(a, b)
        else:
            assert_matches(a, b.astype(numpy.float64), dtype)


# ----------------------------------------------------------------------------- index width
@pytest.mark.parametrize("validate", (False, True), ids=("unvalidated", "validated"))
def test_one_kernel_launch_per_call(monkeypatch, validate):
    """Every op is one kernel launch with validate=False, and validation adds one (roi_check):
    no copies, fills or casts run as kernels (the emulator's launches, by name)."""
    ok, why = availability("emulator")
    if not ok:
        pytest.skip(f"the emulator is not available: {why}")
    from roi_cupy._emulator.runtime import Kernel

    launched = []
    original = Kernel.__call__

    def record(self, grid, block, args):
        launched.append(self.name.split("<")[0])
        return original(self, grid, block, args)

    monkeypatch.setattr(Kernel, "__call__", record)
    rng = make_rng("one launch")
    x = random_features(rng, (2, 8, 10, 12), numpy.float32)
    rois = numpy.array([[0, 1, 1, 8, 7], [1, 2, 0, 9, 9]], numpy.float32)
    turned = numpy.array([[0, 5, 5, 4, 3, 30], [1, 4, 4, 5, 2, -10]], numpy.float32)
    g = random_features(rng, (2, 8, 2, 2), numpy.float32)
    calls = {
        "roi_align_forward": lambda: roi_cupy.roi_align(x, rois, 2, validate=validate),
        "roi_align_max_forward": lambda: roi_cupy.roi_align(x, rois, 2, mode="max",
                                                            validate=validate),
        "roi_align_backward": lambda: roi_cupy.roi_align_backward(g, rois, x.shape, 2,
                                                                  validate=validate),
        "roi_pool_forward": lambda: roi_cupy.roi_pool(x, rois, 2, return_indices=True,
                                                      validate=validate),
        "ps_roi_align_forward": lambda: roi_cupy.ps_roi_align(x, rois, 2, validate=validate),
        "ps_roi_pool_forward": lambda: roi_cupy.ps_roi_pool(x, rois, 2, validate=validate),
        "roi_align_rotated_forward": lambda: roi_cupy.roi_align_rotated(x, turned, 2,
                                                                        validate=validate),
    }
    with roi_cupy.use_backend("emulator"):
        for kernel, call in calls.items():
            launched.clear()
            call()
            assert launched == (["roi_check"] if validate else []) + [kernel]


def test_index_width_switches_above_the_int32_limit():
    assert not launch.use_index64(0, 2**31 - 1)
    assert launch.use_index64(2**31 - 1, 2**31)
    assert launch.index_scalar(False) is numpy.int32
    assert launch.index_scalar(True) is numpy.int64


def test_grid_is_capped_and_covers_small_outputs():
    assert launch.grid(1) == ((1, 1, 1), (launch.BLOCK, 1, 1))
    assert launch.grid(launch.BLOCK + 1)[0] == (2, 1, 1)
    assert launch.grid(2**40)[0] == (launch.MAX_GRID, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("index64", (False, True), ids=("int32", "int64"))
def test_both_index_paths_match_the_reference(kernels_on, names, monkeypatch, dtype, index64):
    if index64:
        monkeypatch.setattr(launch, "INDEX32_LIMIT", 20)  # smaller than every array here
    rng = make_rng("index", dtype)
    x = random_features(rng, SHAPE, dtype)
    rois = random_boxes(rng, SHAPE[0], 7, SHAPE[2], SHAPE[3], 0.5, dtype=x.dtype)
    got, grads = _all_four(kernels_on, x, rois)
    _check_all_four(got, grads, x, rois)
    # Four ops, each after one validation launch (and RoI Pool's backward a second one for its
    # indices, read back together).
    assert [name.split("<")[0] for name in names] == [
        "roi_check", "roi_align_forward", "roi_check", "roi_align_backward",
        "roi_check", "roi_pool_forward", "roi_check", "roi_check_indices", "roi_pool_backward",
    ]
    assert all(name.endswith("long long>" if index64 else "int>") for name in names), names


# ----------------------------------------------------------------------------- invalid RoIs
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_invalid_rois_give_zeros_without_validation(kernels_on, dtype):
    rng = make_rng("invalid", dtype)
    x = random_features(rng, SHAPE, dtype)
    valid = random_boxes(rng, SHAPE[0], 4, SHAPE[2], SHAPE[3], 0.5)
    inf, nan = numpy.inf, numpy.nan
    invalid = numpy.array(
        [
            [-1, 1, 1, 8, 8],       # batch index below 0
            [2, 1, 1, 8, 8],        # batch index N
            [2.5, 1, 1, 8, 8],      # N after truncation
            [-1e30, 1, 1, 8, 8],
            [nan, 1, 1, 8, 8],
            [0, nan, 1, 8, 8],
            [1, 1, inf, 8, 8],
            [0, 1, 1, -inf, 8],
            [1, 1, 1, 8, inf],
        ]
    )
    rois = numpy.concatenate([valid[:2], invalid, valid[2:]]).astype(numpy.float64)
    rows = rois.astype(dtype if dtype == numpy.float64 else numpy.float32)
    got, grads = _all_four(kernels_on, x, rows, validate=False)
    align, align_grad, pool, argmax, pool_grad = got
    bad = slice(2, 2 + len(invalid))
    assert not align[bad].any() and not pool[bad].any()
    assert (argmax[bad] == -1).all()
    keep = numpy.r_[0:2, 2 + len(invalid):len(rois)]
    kept = (align[keep], align_grad, pool[keep], argmax[keep], pool_grad)
    grads_kept = (grads[0][keep], grads[1][keep])
    _check_all_four(kept, grads_kept, x, rows[keep])


def test_huge_finite_boxes_stay_in_bounds(kernels_on):
    """Coordinates far beyond int range: clamped in floating point, never a bad index."""
    rng = make_rng("huge")
    x = random_features(rng, SHAPE, numpy.float32)
    rois = numpy.array(
        [
            [0, -1e30, -1e30, 1e30, 1e30],
            [1, -3e38, 2, 3e38, 5],
            [1, 4, -1e20, 6, -1e19],
            [0, 1e9, 1e9, 1e9 + 3, 1e9 + 3],
        ],
        dtype=numpy.float32,
    )
    with kernels_on.active():
        xa, ra = kernels_on.asarray(x), kernels_on.asarray(rois)
        align = roi_cupy.roi_align(xa, ra, 2, 1.0, -1, False)
        fixed = roi_cupy.roi_align(xa, ra, 2, 1.0, 1000, True)
        pool, argmax = roi_cupy.roi_pool(xa, ra, 2, 1.0, return_indices=True)
    align, fixed, pool, argmax = kernels_on.to_numpy((align, fixed, pool, argmax))
    for out in (align, fixed):
        assert numpy.isfinite(out).all() and numpy.abs(out).max() <= 1
    # Every maximum is a pixel of the RoI's own plane (or an empty bin's 0 with -1).
    assert ((argmax >= -1) & (argmax < SHAPE[2] * SHAPE[3])).all()
    b = rois[:, 0].astype(int)[:, None, None, None]
    c = numpy.arange(SHAPE[1])[None, :, None, None]
    picked = x.reshape(SHAPE[0], SHAPE[1], -1)[b, c, numpy.maximum(argmax, 0)]
    numpy.testing.assert_array_equal(pool, numpy.where(argmax >= 0, picked, 0))
    # Exact where the float32 box arithmetic does not overflow (rows 0 and 2 reach far outside
    # the map; row 1's width, 6e38, overflows float32, which only the float64 path represents).
    ref_pool, ref_argmax = roi_pool_ref(x, rois[[0, 2, 3]], 2, 1.0)
    numpy.testing.assert_array_equal(argmax[[0, 2, 3]], ref_argmax)
    assert_matches(pool[[0, 2, 3]], ref_pool, numpy.float32)


def test_roi_pool_backward_skips_out_of_range_indices(kernels_on):
    rng = make_rng("argmax")
    n, c, h, w = SHAPE
    rois = random_boxes(rng, n, 3, h, w, dtype=numpy.float32)
    grad = random_features(rng, (3, c, 2, 2), numpy.float32)
    argmax = rng.integers(0, h * w, size=grad.shape)
    argmax.flat[::3] = numpy.array([-5, h * w, 2**40, -(2**40)])[
        numpy.arange(argmax.size)[::3] % 4
    ]
    with kernels_on.active():
        got = roi_cupy.roi_pool_backward(
            kernels_on.asarray(grad), kernels_on.asarray(rois), kernels_on.asarray(argmax),
            SHAPE, validate=False,
        )
    assert_matches(
        kernels_on.to_numpy(got), roi_pool_backward_ref(grad, rois, argmax, SHAPE), numpy.float32
    )


# ----------------------------------------------------------------------------- CUDA only
def _inputs(dtype=numpy.float32, k=6):
    rng = make_rng("cuda", numpy.dtype(dtype).name, k)
    x = random_features(rng, SHAPE, dtype)
    rois = random_boxes(rng, SHAPE[0], k, SHAPE[2], SHAPE[3], dtype=numpy.float32)
    return x, rois


def test_second_device(cupy):
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs a second CUDA device")
    x, rois = _inputs()
    with cupy.cuda.Device(1):
        xa, ra = cupy.asarray(x), cupy.asarray(rois)
    with cupy.cuda.Device(0):  # ops follow the input's device, not the current one
        out = roi_cupy.roi_align(xa, ra, 3)
        pool, argmax = roi_cupy.roi_pool(xa, ra, 3, return_indices=True)
    assert out.device.id == 1 and pool.device.id == 1 and argmax.device.id == 1
    assert_matches(cupy.asnumpy(out), roi_align_ref(x, rois, 3), numpy.float32)
    assert_matches(cupy.asnumpy(pool), roi_pool_ref(x, rois, 3)[0], numpy.float32)


def test_arrays_on_different_devices_are_refused(cupy):
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs a second CUDA device")
    x, rois = _inputs()
    with cupy.cuda.Device(1):
        xa = cupy.asarray(x)
    with cupy.cuda.Device(0):
        ra = cupy.asarray(rois)
    with pytest.raises(ValueError, match=r"boxes.*cuda:0.*cuda:1|boxes.*cuda:1.*cuda:0"):
        roi_cupy.roi_align(xa, ra, 3)
    with pytest.raises(ValueError, match=r"cuda:0.*cuda:1|cuda:1.*cuda:0"):
        roi_cupy.roi_pool(xa, [ra[:2, 1:], ra[2:, 1:]], 3)


def test_non_default_stream(cupy):
    x, rois = _inputs()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out = roi_cupy.roi_align(cupy.asarray(x), cupy.asarray(rois), 3, validate=False)
        grad = roi_cupy.roi_align_backward(out, cupy.asarray(rois), SHAPE, 3, validate=False)
    stream.synchronize()
    assert_matches(cupy.asnumpy(out), roi_align_ref(x, rois, 3), numpy.float32)
    expected = roi_align_backward_ref(roi_align_ref(x, rois, 3), rois, SHAPE)
    assert_matches(cupy.asnumpy(grad), expected, numpy.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_non_contiguous_input(cupy, dtype):
    x, rois = _inputs(dtype)
    wide = cupy.full(SHAPE[:3] + (2 * SHAPE[3],), cupy.nan, dtype=dtype)
    wide[..., ::2] = cupy.asarray(x)
    view = wide[..., ::2]
    assert not view.flags.c_contiguous
    rows = cupy.asarray(numpy.asfortranarray(rois))
    out = roi_cupy.roi_align(view, rows, 3, 1.0, 2, True)
    pool = roi_cupy.roi_pool(view, rows, 3)
    assert_matches(cupy.asnumpy(out), roi_align_ref(x, rois, 3, 1.0, 2, True), dtype)
    assert_matches(cupy.asnumpy(pool), roi_pool_ref(x, rois, 3)[0], dtype)


def test_no_rois(cupy):
    x, _ = _inputs()
    xa, none = cupy.asarray(x), cupy.empty((0, 5), dtype=cupy.float32)
    assert roi_cupy.roi_align(xa, none, (2, 3)).shape == (0, 3, 2, 3)
    pool, argmax = roi_cupy.roi_pool(xa, none, 2, return_indices=True)
    assert pool.shape == argmax.shape == (0, 3, 2, 2) and argmax.dtype == cupy.int64
    grad = roi_cupy.roi_align_backward(cupy.empty((0, 3, 2, 3), cupy.float32), none, SHAPE, (2, 3))
    assert grad.shape == SHAPE and not grad.any()
    grad = roi_cupy.roi_pool_backward(cupy.empty((0, 3, 2, 2), cupy.float32), none, argmax, SHAPE)
    assert grad.shape == SHAPE and not grad.any()


def test_no_host_synchronisation_without_validation(cupy):
    import cupyx

    x, rois = _inputs(numpy.float16)
    xa, ra = cupy.asarray(x), cupy.asarray(rois)
    roi_cupy.roi_align(xa, ra, 3, validate=False)  # compile outside the check
    with cupyx.allow_synchronize(False):
        out = roi_cupy.roi_align(xa, ra, 3, validate=False)
        grad = roi_cupy.roi_align_backward(out, ra, SHAPE, 3, validate=False)
        pool, argmax = roi_cupy.roi_pool(xa, ra, 3, return_indices=True, validate=False)
        roi_cupy.roi_pool_backward(pool, ra, argmax, SHAPE, validate=False)
    assert grad.dtype == cupy.float16


def test_cuda_graph_capture(cupy):
    """validate=False makes no host synchronisation and no host-to-device copy, so every op can
    be captured in a CUDA graph and replayed; per-image box lists too."""
    x, rois = _inputs()
    rois[1, 0] = 7  # invalid: zeros, and no check that would synchronise during capture
    xa, ra = cupy.asarray(x), cupy.asarray(rois)
    listed = [ra[ra[:, 0] == i, 1:] for i in range(SHAPE[0])]
    stream = cupy.cuda.Stream(non_blocking=True)

    def calls():
        out = roi_cupy.roi_align(xa, ra, 3, validate=False)
        grad = roi_cupy.roi_align_backward(out, ra, SHAPE, 3, validate=False)
        pool, argmax = roi_cupy.roi_pool(xa, ra, 3, return_indices=True, validate=False)
        pool_grad = roi_cupy.roi_pool_backward(pool, ra, argmax, SHAPE, validate=False)
        per_image = roi_cupy.roi_align(xa, listed, 3, validate=False)
        return out, grad, pool, argmax, pool_grad, per_image

    with stream:
        # The eager results go to the host, so that the capture finds their blocks free in
        # CuPy's pool and allocates nothing (no cudaMalloc while capturing).
        eager = [cupy.asnumpy(a) for a in calls()]
        stream.begin_capture()
        captured = calls()
        graph = stream.end_capture()
        for array in captured:
            array[...] = -7 if array.dtype == cupy.int64 else cupy.nan
        graph.launch()
    stream.synchronize()
    for got, want in zip(captured, eager):
        numpy.testing.assert_array_equal(cupy.asnumpy(got), want)
    assert not captured[0][1].any()


def test_torch_tensors_through_dlpack(cupy):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    x, rois = _inputs()
    xt = torch.as_tensor(x, device="cuda")
    rt = torch.as_tensor(rois, device="cuda")
    out = roi_cupy.roi_align(xt, rt, 3, aligned=True)
    pool, argmax = roi_cupy.roi_pool(xt, rt, 3, return_indices=True)
    assert isinstance(out, torch.Tensor) and out.device == xt.device
    assert argmax.dtype == torch.int64
    assert_matches(out.cpu().numpy(), roi_align_ref(x, rois, 3, aligned=True), numpy.float32)
    assert_matches(pool.cpu().numpy(), roi_pool_ref(x, rois, 3)[0], numpy.float32)
    half = roi_cupy.roi_align(xt.to(torch.bfloat16), rt, 3, aligned=True)
    assert isinstance(half, torch.Tensor) and half.dtype == torch.bfloat16
