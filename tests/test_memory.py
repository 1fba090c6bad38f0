"""The NumPy backend's working memory does not grow with the number of RoIs (issue: at most
256 MiB beyond inputs and outputs, whatever K is): measured with tracemalloc, which NumPy reports
its allocations to."""
from __future__ import annotations

import tracemalloc

import numpy
import pytest
from conftest import make_rng

import roi_cupy

MIB = 1 << 20


def boxes(rng: numpy.random.Generator, k: int, size: int) -> numpy.ndarray:
    lo = rng.uniform(0, 0.7 * size, (k, 2))
    hi = lo + rng.uniform(2, 0.3 * size, (k, 2))
    return numpy.concatenate([rng.integers(0, 2, (k, 1)), lo, hi], axis=1).astype(numpy.float32)


def extra_memory(call, *outputs_of) -> float:
    """Peak bytes a call allocates beyond what it returns, in MiB."""
    tracemalloc.start()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    results = result if isinstance(result, tuple) else (result,)
    return (peak - sum(r.nbytes for r in results)) / MIB


@pytest.mark.parametrize("sampling_ratio", [2, 0, 96], ids=str)
def test_align_memory_does_not_grow_with_k(sampling_ratio):
    rng = make_rng("memory align", sampling_ratio)
    x = rng.uniform(-1, 1, (2, 16, 48, 48)).astype(numpy.float32)
    few, many = boxes(rng, 300, 48), boxes(rng, 4800, 48)
    kw = dict(output_size=7, sampling_ratio=sampling_ratio)
    small = extra_memory(lambda: roi_cupy.roi_align(x, few, **kw))
    large = extra_memory(lambda: roi_cupy.roi_align(x, many, **kw))
    assert large <= 1.5 * small + 4, (small, large)
    g = rng.uniform(-1, 1, (many.shape[0], 16, 7, 7)).astype(numpy.float32)
    grad = extra_memory(lambda: roi_cupy.roi_align_backward(g, many, x.shape, **kw))
    assert grad <= 1.5 * small + 4, (small, grad)


def test_pool_keeps_no_indices_unless_asked_and_reads_them_in_place():
    rng = make_rng("memory pool")
    x = rng.uniform(-1, 1, (2, 16, 48, 48)).astype(numpy.float32)
    few, rois = boxes(rng, 300, 48), boxes(rng, 4800, 48)
    index_mib = rois.shape[0] * 16 * 49 * 8 / MIB  # 29 MiB of int64 indices
    small = extra_memory(lambda: roi_cupy.roi_pool(x, few, 7))
    large = extra_memory(lambda: roi_cupy.roi_pool(x, rois, 7))
    assert large <= 1.5 * small + 4 and large < index_mib / 2, (small, large)
    _, indices = roi_cupy.roi_pool(x, rois, 7, return_indices=True)
    g = rng.uniform(-1, 1, indices.shape).astype(numpy.float32)
    # Validation and int32 indices need no full-size copy or mask of the indices.
    narrow = indices.astype(numpy.int32)
    used = extra_memory(lambda: roi_cupy.roi_pool_backward(g, rois, narrow, x.shape))
    assert used < index_mib / 4, used


def test_strided_gradients_are_not_copied_whole():
    rng = make_rng("memory strided")
    rois = boxes(rng, 4800, 48)
    wide = rng.uniform(-1, 1, (4800, 16, 7, 14)).astype(numpy.float32)
    g = wide[..., ::2]  # 14 MiB as a view: a contiguous copy would be counted here
    assert not g.flags.c_contiguous
    shape = (2, 16, 48, 48)
    used = extra_memory(lambda: roi_cupy.roi_align_backward(g, rois, shape, 7, sampling_ratio=2))
    assert used < g.nbytes / MIB / 2, used
    numpy.testing.assert_array_equal(
        roi_cupy.roi_align_backward(g, rois, shape, 7, sampling_ratio=2),
        roi_cupy.roi_align_backward(numpy.ascontiguousarray(g), rois, shape, 7, sampling_ratio=2),
    )


def test_samples_expanded_in_runs_give_the_same_numbers(monkeypatch):
    """The run-by-run expansion of samples (a large sampling_ratio, many RoIs) changes only how
    the work is split: forced down to a few RoIs per run, the results stay those of one run."""
    from roi_cupy._numpy import roi_align as numpy_align

    rng = make_rng("memory runs")
    x = rng.uniform(-1, 1, (2, 3, 20, 24)).astype(numpy.float64)
    rois = boxes(rng, 40, 20).astype(numpy.float64)
    g = rng.uniform(-1, 1, (40, 3, 5, 4))
    kw = dict(output_size=(5, 4), sampling_ratio=7, aligned=True)
    whole = roi_cupy.roi_align(x, rois, **kw), roi_cupy.roi_align_backward(g, rois, x.shape, **kw)
    monkeypatch.setattr(numpy_align, "_TAPS", 100)  # a few RoIs' 5 x 7 samples per run
    split = roi_cupy.roi_align(x, rois, **kw), roi_cupy.roi_align_backward(g, rois, x.shape, **kw)
    for a, b in zip(split, whole):
        numpy.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32, numpy.float64], ids=str)
def test_pool_memory_follows_the_boxes_not_the_plane(dtype, monkeypatch):
    """One 10 x 10 box on a 2048 x 2048 plane: forward and backward work on what the box reads
    (with a fixed working set), not on copies of the plane, and give the numbers of the same
    box on a crop around it. The backward is measured both ways: all its gradients added in
    one call (as few as these are) and by ranges of the plane (as many gradients would be)."""
    from roi_cupy._numpy import roi_pool as numpy_pool

    rng = make_rng("memory pool plane", numpy.dtype(dtype).name)
    x = rng.standard_normal((1, 4, 2048, 2048), dtype=numpy.float32).astype(dtype)
    compute = numpy.float64 if dtype == numpy.float64 else numpy.float32
    rois = numpy.array([[0, 100, 200, 109, 209]], dtype=compute)  # pixels 100..109, 200..209
    touched = 10 * 10 * 4 * x.itemsize / MIB
    used = extra_memory(lambda: roi_cupy.roi_pool(x, rois, 7, return_indices=True))
    assert used < 8 * touched + 1, used  # before: 208-224 MiB
    out, indices = roi_cupy.roi_pool(x, rois, 7, return_indices=True)
    g = rng.uniform(-1, 1, out.shape).astype(dtype)
    used = extra_memory(lambda: roi_cupy.roi_pool_backward(g, rois, indices, x.shape))
    assert used < 8 * touched + 1, used  # before: 80-160 MiB
    grad = roi_cupy.roi_pool_backward(g, rois, indices, x.shape)
    monkeypatch.setattr(numpy_pool, "_ONCE", 0)
    used = extra_memory(lambda: roi_cupy.roi_pool_backward(g, rois, indices, x.shape))
    assert used < 8 * touched + 1, used
    ranges = roi_cupy.roi_pool_backward(g, rois, indices, x.shape)
    numpy.testing.assert_array_equal(ranges.view(numpy.uint8), grad.view(numpy.uint8))

    crop = numpy.ascontiguousarray(x[:, :, 190:230, 80:120])
    shifted = rois - numpy.array([0, 80, 190, 80, 190], dtype=compute)
    out_crop, indices_crop = roi_cupy.roi_pool(crop, shifted, 7, return_indices=True)
    numpy.testing.assert_array_equal(out, out_crop)
    rows, cols = numpy.divmod(indices_crop, 40)
    numpy.testing.assert_array_equal(indices, (rows + 190) * 2048 + cols + 80)
    grad_crop = roi_cupy.roi_pool_backward(g, shifted, indices_crop, crop.shape)
    numpy.testing.assert_array_equal(grad[:, :, 190:230, 80:120], grad_crop)
    grad[:, :, 190:230, 80:120] = 0
    assert not grad.any()


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32, numpy.float64], ids=str)
def test_pool_backward_accumulator_does_not_grow_with_the_plane(dtype):
    """Many boxes over the whole plane: the backward sums in a bounded accumulator, not in one
    of the compute dtype as large as the gradient (before: 18-35 MiB here beyond grad_input)."""
    rng = make_rng("memory pool accumulator", numpy.dtype(dtype).name)
    shape = (2, 8, 512, 512)
    rois = boxes(rng, 300, 512)
    _, indices = roi_cupy.roi_pool(rng.uniform(-1, 1, shape).astype(dtype), rois, 7,
                                   return_indices=True)
    g = rng.uniform(-1, 1, indices.shape).astype(dtype)
    used = extra_memory(lambda: roi_cupy.roi_pool_backward(g, rois, indices, shape))
    assert used < 4, used


# ----------------------------------------------------------------------------- position-sensitive
@pytest.mark.parametrize("op", ["ps_roi_align", "ps_roi_pool"])
def test_position_sensitive_memory_does_not_grow_with_k(op):
    rng = make_rng("memory", op)
    x = rng.uniform(-1, 1, (2, 2 * 49, 48, 48)).astype(numpy.float32)
    few, many = boxes(rng, 300, 48), boxes(rng, 4800, 48)
    forward, backward = getattr(roi_cupy, op), getattr(roi_cupy, f"{op}_backward")
    small = extra_memory(lambda: forward(x, few, 7))
    large = extra_memory(lambda: forward(x, many, 7))
    assert large <= 1.5 * small + 4, (small, large)
    g = rng.uniform(-1, 1, (many.shape[0], 2, 7, 7)).astype(numpy.float32)
    grad = extra_memory(lambda: backward(g, many, x.shape, 7))
    # the backward's float64 accumulator is twice the features' size
    assert grad <= 1.5 * small + 2 * x.nbytes / MIB + 4, (small, grad)


@pytest.mark.parametrize("op", ["ps_roi_align", "ps_roi_pool"])
def test_position_sensitive_memory_does_not_grow_with_a_bin(op):
    """One bin over a 1536 x 1536 map (2.4 million pixels) is summed in chunks: beyond the
    features' rearranged copy, the working memory stays a few MiB."""
    rng = make_rng("memory bin", op)
    x = rng.uniform(-1, 1, (1, 1, 1536, 1536)).astype(numpy.float32)
    rois = numpy.array([[0, 0, 0, 1536, 1536]], numpy.float32)
    used = extra_memory(lambda: getattr(roi_cupy, op)(x, rois, 1))
    assert used <= x.nbytes / MIB + 48, used
