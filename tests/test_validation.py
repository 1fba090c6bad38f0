"""Bad arguments give a ValueError or TypeError that names the argument and shows what it got.

Validation runs on the host before any backend work, so NumPy inputs on the default backend
cover it.
"""
from __future__ import annotations

import re
import warnings

import numpy
import pytest

import roi_cupy
from conftest import BFLOAT16

N, C, H, W = 2, 3, 6, 7


def features(shape=(N, C, H, W), dtype=numpy.float32):
    return numpy.random.default_rng(0).uniform(-1, 1, shape).astype(dtype)


def rois(rows=None, dtype=numpy.float32):
    if rows is None:
        rows = [[0, 0.5, 1.0, 4.0, 5.0], [1, 1.0, 0.0, 6.0, 3.5], [1, 2.0, 2.0, 3.0, 3.0]]
    return numpy.array(rows, dtype=dtype)


def grad(shape=(3, C, 2, 2), dtype=numpy.float32):
    return numpy.random.default_rng(1).uniform(-1, 1, shape).astype(dtype)


OPS = ["roi_align", "roi_pool"]


def forward(op, input=None, boxes=None, output_size=2, **kwargs):
    input = features() if input is None else input
    boxes = rois() if boxes is None else boxes
    return getattr(roi_cupy, op)(input, boxes, output_size, **kwargs)


def got(text):
    """A regex matching ``text`` literally (the echo of what the caller passed)."""
    return re.escape(text)


# ----------------------------------------------------------------------------- input
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(C, H, W), (1, N, C, H, W), (H,)], ids=str)
def test_input_rank(op, shape):
    message = r"input must have shape \[N, C, H, W\], got " + got(str(shape))
    with pytest.raises(ValueError, match=message):
        forward(op, input=features(shape))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "dtype",
    [numpy.int32, numpy.int64, numpy.uint8, numpy.complex64, numpy.bool_],
    ids=lambda d: numpy.dtype(d).name,
)
def test_input_dtype(op, dtype):
    x = numpy.ones((N, C, H, W), dtype=dtype)
    message = r"input must have a floating dtype .*got " + numpy.dtype(dtype).name
    with pytest.raises(TypeError, match=message):
        forward(op, input=x)


@pytest.mark.parametrize("op", OPS)
def test_input_not_an_array(op):
    message = r"input must be a NumPy or CuPy array.*got builtins\.list"
    with pytest.raises(TypeError, match=message):
        forward(op, input=features().tolist())


# ----------------------------------------------------------------------------- boxes
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(3, 4), (3, 6), (5,), (1, 3, 5)], ids=str)
def test_boxes_shape(op, shape):
    boxes = numpy.zeros(shape, dtype=numpy.float32)
    message = r"boxes must have shape \[K, 5\].*got " + got(str(shape))
    with pytest.raises(ValueError, match=message):
        forward(op, boxes=boxes)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [numpy.complex64, numpy.bool_], ids=lambda d: numpy.dtype(d).name)
def test_boxes_dtype(op, dtype):
    message = r"boxes must have a real dtype, got " + numpy.dtype(dtype).name
    with pytest.raises(TypeError, match=message):
        forward(op, boxes=rois().astype(dtype))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("length", [1, 3])
def test_box_list_length(op, length):
    boxes = [numpy.zeros((1, 4), numpy.float32)] * length
    message = rf"boxes must hold one array per image: got a list of {length} for N = {N}"
    with pytest.raises(ValueError, match=message):
        forward(op, boxes=boxes)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(2, 5), (4,), (1, 2, 4)], ids=str)
def test_box_list_element_shape(op, shape):
    boxes = [numpy.zeros((1, 4), numpy.float32), numpy.zeros(shape, numpy.float32)]
    message = r"boxes\[1\] must have shape \[L, 4\].*got " + got(str(shape))
    with pytest.raises(ValueError, match=message):
        forward(op, boxes=boxes)


@pytest.mark.parametrize("op", OPS)
def test_box_list_mixed_dtypes(op):
    boxes = [numpy.zeros((1, 4), numpy.float32), numpy.zeros((1, 4), numpy.float64)]
    with pytest.raises(TypeError, match=r"boxes\[1\] has dtype float64 but boxes\[0\] has float32"):
        forward(op, boxes=boxes)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("index", [-1.0, 2.0, 1e9, 0.5, -0.5, 1.25], ids=str)
def test_batch_index(op, index):
    boxes = rois()
    boxes[1, 0] = index
    value = repr(float(numpy.float32(index)))
    message = rf"boxes' batch index must be an integer in \[0, {N}\), got {got(value)} in row 1"
    with pytest.raises(ValueError, match=message):
        forward(op, boxes=boxes)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("column", [0, 1, 4])
@pytest.mark.parametrize("value", [numpy.nan, numpy.inf, -numpy.inf], ids=str)
def test_non_finite_box(op, column, value):
    boxes = rois()
    boxes[2, column] = value
    message = r"boxes must be finite, got row 2: \[.*" + got(str(float(value)))
    with pytest.raises(ValueError, match=message):
        forward(op, boxes=boxes)


@pytest.mark.parametrize("op", OPS)
def test_invalid_rois_in_a_box_list(op):
    boxes = [rois()[:1, 1:].copy(), rois()[1:, 1:].copy()]
    boxes[1][0, 2] = numpy.nan
    with pytest.raises(ValueError, match=r"boxes must be finite, got row 1"):
        forward(op, boxes=boxes)


@pytest.mark.parametrize("op", OPS)
def test_batch_index_for_an_empty_batch(op):
    with pytest.raises(ValueError, match=r"batch index must be an integer in \[0, 0\), got 0.0"):
        forward(op, input=features((0, C, H, W)))


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float64], ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize(
    "bad, first",
    [({517: (0, 2.0)}, 517), ({3: (3, numpy.inf), 517: (0, -0.5)}, 3), ({599: (0, 2.0)}, 599)],
    ids=["one-late", "two", "last"],
)
def test_the_backend_finds_the_first_invalid_roi(backend, dtype, bad, first):
    """Validation runs where the data is (one kernel on a GPU or the emulator): over several
    blocks of RoIs it must name the first bad row, and accept -0.0 as image 0."""
    rng = numpy.random.default_rng(5)
    boxes = numpy.zeros((600, 5))
    boxes[:, 0] = rng.integers(0, N, 600)
    boxes[0, 0] = -0.0
    boxes[:, 1:3] = rng.uniform(0, 3, (600, 2))
    boxes[:, 3:] = boxes[:, 1:3] + rng.uniform(0.5, 3, (600, 2))
    for row, (column, value) in bad.items():
        boxes[row, column] = value
    x = backend.asarray(features(dtype=dtype))
    with backend.active(), pytest.raises(ValueError, match=rf"\b{first}\b"):
        roi_cupy.roi_align(x, backend.asarray(boxes.astype(dtype)), 2)
    fine = numpy.delete(boxes, list(bad), axis=0).astype(dtype)
    with backend.active():
        out = roi_cupy.roi_align(x, backend.asarray(fine), 2)
    assert out.shape == (600 - len(bad), C, 2, 2)


@pytest.mark.parametrize("op", OPS)
def test_float64_boxes_are_checked_before_they_are_narrowed(backend, op):
    """float32 features compute in float32: float64 boxes are validated as given, so a value
    beyond float32's range is named as it was passed (no overflow warning escapes) and a batch
    index that float32 would round to an integer is still rejected."""
    x = backend.asarray(features())
    far = rois(dtype=numpy.float64)
    far[1, 3] = 1e300
    near = rois(dtype=numpy.float64)
    near[2, 0] = 1.00000001
    with backend.active(), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"float32's range .* row 1: \[1.0, 1.0, 0.0, 1e\+300"):
            getattr(roi_cupy, op)(x, backend.asarray(far), 2)
        with pytest.raises(ValueError, match=r"batch index must be an integer .*1.00000001 in row"):
            getattr(roi_cupy, op)(x, backend.asarray(near), 2)
        out = backend.to_numpy(getattr(roi_cupy, op)(x, backend.asarray(far), 2, validate=False))
    assert (out[1] == 0).all() and (out[0] != 0).any()  # an invalid RoI gives zeros
    wide = backend.asarray(features(dtype=numpy.float64))
    with backend.active():  # float64 features: 1e300 is an ordinary finite coordinate
        assert getattr(roi_cupy, op)(wide, backend.asarray(far), 2).shape == (3, C, 2, 2)


# ----------------------------------------------------------------------------- scalars
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("size", [0, -1, (0, 2), (2, -3)], ids=str)
def test_output_size_not_positive(op, size):
    with pytest.raises(ValueError, match=r"output_size must be positive, got " + got(repr(size))):
        forward(op, output_size=size)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "size", [2.0, True, (2, 2, 2), (2.0, 2), (2,), "2", None, (True, 2)], ids=repr
)
def test_output_size_type(op, size):
    message = r"output_size must be an int or a pair of ints, got " + got(repr(size))
    with pytest.raises(TypeError, match=message):
        forward(op, output_size=size)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "scale", [0, 0.0, -0.5, float("inf"), float("nan"), -float("inf")], ids=repr
)
def test_spatial_scale_value(op, scale):
    message = r"spatial_scale must be positive and finite, got " + got(repr(scale))
    with pytest.raises(ValueError, match=message):
        forward(op, spatial_scale=scale)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32], ids=lambda d: numpy.dtype(d).name)
def test_spatial_scale_beyond_the_compute_range(op, dtype):
    """1e300 overflows float32, the compute type of these features: a clear error, not a warning
    from inside a backend; float64 features take it (and give finite, correct zeros)."""
    message = r"spatial_scale must lie within float32's range, .* got 1e\+300"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=message):
            forward(op, input=features(dtype=dtype), spatial_scale=1e300)
        if op == "roi_align":
            with pytest.raises(ValueError, match=message):
                align_backward(g=grad(dtype=dtype), spatial_scale=1e300)
        out = forward(op, input=features(dtype=numpy.float64), spatial_scale=1e300)
    assert numpy.isfinite(out).all()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("size", [10**30, (2, 2**31), 2**40], ids=repr)
def test_output_size_beyond_int32(op, size):
    with pytest.raises(ValueError, match=r"output_size must be at most 2147483647 per side, got "
                                         + got(repr(size))):
        forward(op, output_size=size)


def test_huge_input_shape_fails_on_an_array_of_that_shape():
    """A gradient too large for memory is reported with input_shape, not an internal shape."""
    g, boxes, indices = grad((3, C, 2, 2)), rois(), numpy.zeros((3, C, 2, 2), numpy.int64)
    with pytest.raises(MemoryError, match=r"shape \(2, 3, 1000000, 1000000\)"):
        roi_cupy.roi_pool_backward(g, boxes, indices, (N, C, 10**6, 10**6))
    with pytest.raises(MemoryError, match=r"shape \(2, 3, 1000000, 1000000\)"):
        align_backward(g=g, input_shape=(N, C, 10**6, 10**6))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("scale", ["1", None, True, 1j], ids=repr)
def test_spatial_scale_type(op, scale):
    message = r"spatial_scale must be a real number, got " + got(repr(scale))
    with pytest.raises(TypeError, match=message):
        forward(op, spatial_scale=scale)


@pytest.mark.parametrize(
    "ratio", [1.5, "2", 2.0, None, True, (2,), (1, 2, 3), (1, 2.0), (True, 1), "22"], ids=repr
)
def test_sampling_ratio_type(ratio):
    with pytest.raises(TypeError, match=r"sampling_ratio must be an int .*got " + got(repr(ratio))):
        forward("roi_align", sampling_ratio=ratio)


@pytest.mark.parametrize("op", OPS)
def test_numpy_scalars_are_accepted(op):
    kwargs = dict(spatial_scale=numpy.float32(0.5))
    if op == "roi_align":
        kwargs["sampling_ratio"] = numpy.int64(2)
    out = forward(op, output_size=(numpy.int32(2), numpy.int64(3)), **kwargs)
    assert out.shape == (3, C, 2, 3) and out.dtype == numpy.float32


def test_sampling_ratio_pair_of_equal_values_is_the_int():
    same = forward("roi_align", sampling_ratio=(numpy.int32(3), 3))
    numpy.testing.assert_array_equal(same, forward("roi_align", sampling_ratio=3))
    assert not numpy.array_equal(same, forward("roi_align", sampling_ratio=(3, 1)))


@pytest.mark.parametrize(
    "name, value",
    [("aligned", "False"), ("aligned", 1), ("aligned", numpy.array([True, False])),
     ("aligned", None), ("validate", "yes"), ("return_indices", 0)],
    ids=str,
)
def test_flags_must_be_bools(name, value):
    """``bool("False")`` is True: a flag that is not a bool is refused, not converted."""
    op = "roi_pool" if name == "return_indices" else "roi_align"
    with pytest.raises(TypeError, match=f"{name} must be a bool, got "):
        forward(op, **{name: value})


def test_numpy_bools_are_flags():
    shifted = forward("roi_align", aligned=numpy.bool_(True), validate=numpy.bool_(False))
    numpy.testing.assert_array_equal(shifted, forward("roi_align", aligned=True))
    assert not numpy.array_equal(shifted, forward("roi_align", aligned=False))


def test_backward_flags_must_be_bools():
    with pytest.raises(TypeError, match="aligned must be a bool, got 'False'"):
        align_backward(aligned="False")
    with pytest.raises(TypeError, match="validate must be a bool, got 1"):
        pool_backward(validate=1)


# ----------------------------------------------------------------------------- backward
def align_backward(g=None, boxes=None, input_shape=(N, C, H, W), output_size=2, **kwargs):
    g = grad() if g is None else g
    boxes = rois() if boxes is None else boxes
    return roi_cupy.roi_align_backward(g, boxes, input_shape, output_size, **kwargs)


def pool_backward(g=None, boxes=None, indices=None, input_shape=(N, C, H, W), **kwargs):
    g = grad() if g is None else g
    boxes = rois() if boxes is None else boxes
    indices = numpy.zeros(g.shape, dtype=numpy.int64) if indices is None else indices
    return roi_cupy.roi_pool_backward(g, boxes, indices, input_shape, **kwargs)


BACKWARDS = {"roi_align_backward": align_backward, "roi_pool_backward": pool_backward}


@pytest.mark.parametrize("name", BACKWARDS)
@pytest.mark.parametrize("shape", [(4, C, 2, 2), (3, C + 1, 2, 2), (3, C, 2)], ids=str)
def test_grad_output_shape(name, shape):
    g = grad(shape)
    kwargs = {"indices": numpy.zeros(shape, numpy.int64)} if name == "roi_pool_backward" else {}
    message = r"grad_output must have shape .*got " + got(str(shape))
    with pytest.raises(ValueError, match=message):
        BACKWARDS[name](g=g, **kwargs)


def test_align_grad_output_does_not_fit_output_size():
    message = r"grad_output must have shape \[K, C, PH, PW\] = \[3, 3, 3, 2\].*got \(3, 3, 2, 2\)"
    with pytest.raises(ValueError, match=message):
        align_backward(output_size=(3, 2))


@pytest.mark.parametrize("name", BACKWARDS)
@pytest.mark.parametrize(
    "dtype", [numpy.int32, numpy.complex128], ids=lambda d: numpy.dtype(d).name
)
def test_grad_output_dtype(name, dtype):
    message = r"grad_output must have a floating dtype .*got " + numpy.dtype(dtype).name
    with pytest.raises(TypeError, match=message):
        BACKWARDS[name](g=numpy.ones((3, C, 2, 2), dtype=dtype))


@pytest.mark.parametrize("name", BACKWARDS)
@pytest.mark.parametrize(
    "shape", [(N, C, H), (N, C, H, -1), (N, C, H, 7.0), (N, C, H, True), 5], ids=repr
)
def test_input_shape(name, shape):
    message = r"input_shape must be four non-negative ints .*got " + got(repr(shape))
    with pytest.raises(ValueError, match=message):
        BACKWARDS[name](input_shape=shape)


@pytest.mark.parametrize("name", BACKWARDS)
def test_backward_validates_boxes(name):
    boxes = rois()
    boxes[0, 0] = N
    message = rf"batch index must be an integer in \[0, {N}\), got {float(N)!r} in row 0"
    with pytest.raises(ValueError, match=message):
        BACKWARDS[name](boxes=boxes)
    boxes[0, 0] = 0
    boxes[2, 3] = numpy.nan
    with pytest.raises(ValueError, match=r"boxes must be finite, got row 2"):
        BACKWARDS[name](boxes=boxes)


@pytest.mark.parametrize("shape", [(3, C, 2, 3), (3, C, 2), (2, C, 2, 2)], ids=str)
def test_indices_shape(shape):
    message = r"indices must have grad_output's shape \(3, 3, 2, 2\), got " + got(str(shape))
    with pytest.raises(ValueError, match=message):
        pool_backward(indices=numpy.zeros(shape, numpy.int64))


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.bool_], ids=lambda d: numpy.dtype(d).name)
def test_indices_dtype(dtype):
    message = r"indices must have an integer dtype, got " + numpy.dtype(dtype).name
    with pytest.raises(TypeError, match=message):
        pool_backward(indices=numpy.zeros((3, C, 2, 2), dtype))


@pytest.mark.parametrize("bad", [-2, H * W, 10**10], ids=str)
def test_indices_out_of_range(backend, bad):
    """The first index out of range is named with its position, on every backend (one check
    kernel on a GPU and on the emulator), for contiguous and strided int64 and int32 indices."""
    indices = numpy.zeros((3, C, 2, 2), numpy.int64)
    indices[2, 0, 0, 1] = -5  # a later bad one: the first is named
    indices[1, 2, 1, 0] = bad
    message = (
        rf"indices must lie in \[-1, {H * W}\) for an H x W = {H} x {W} plane, "
        rf"got {bad} at \(1, 2, 1, 0\)"
    )
    strided = numpy.repeat(indices, 2, axis=-1)[..., ::2]
    cases = [indices, strided] + ([indices.astype(numpy.int32)] if bad < 2**31 else [])
    with backend.active():
        for case in cases:
            with pytest.raises(ValueError, match=message):
                roi_cupy.roi_pool_backward(
                    backend.asarray(grad()), backend.asarray(rois()), backend.asarray(case),
                    (N, C, H, W),
                )


@pytest.mark.parametrize("bad", [2**63, 2**64 - 1, 2**64 - 5], ids=str)
def test_unsigned_indices_beyond_int64_are_refused_as_given(backend, bad):
    """uint64 indices that int64 cannot hold are named with their own value; 2**64 - 1 must not
    wrap to -1, the index of an empty bin."""
    indices = numpy.zeros((3, C, 2, 2), numpy.uint64)
    indices[0, 1, 1, 1] = bad
    message = rf"indices must lie in \[-1, {H * W}\) .*, got {bad} at \(0, 1, 1, 1\)"
    with backend.active():
        with pytest.raises(ValueError, match=message):
            roi_cupy.roi_pool_backward(
                backend.asarray(grad()), backend.asarray(rois()), backend.asarray(indices),
                (N, C, H, W),
            )
        quiet = roi_cupy.roi_pool_backward(  # validate=False: ignored, like any index out of range
            backend.asarray(grad()), backend.asarray(rois()), backend.asarray(indices),
            (N, C, H, W), validate=False,
        )
        clean = indices.copy()
        clean[0, 1, 1, 1] = H * W + 1
        expected = roi_cupy.roi_pool_backward(
            backend.asarray(grad()), backend.asarray(rois()), backend.asarray(clean.astype(numpy.int64)),
            (N, C, H, W), validate=False,
        )
        numpy.testing.assert_array_equal(backend.to_numpy(quiet), backend.to_numpy(expected))


@pytest.mark.parametrize("name", BACKWARDS)
def test_backward_boxes_shape(name):
    with pytest.raises(ValueError, match=r"boxes must have shape \[K, 5\].*got \(3, 4\)"):
        BACKWARDS[name](boxes=numpy.zeros((3, 4), numpy.float32))


# ----------------------------------------------------------------------------- validate=False
INVALID = [[-1, 0, 0, 3, 3], [N, 0, 0, 3, 3], [0.5, 0, 0, 3, 3], [0, numpy.nan, 0, 3, 3],
           [1, 0, 0, numpy.inf, 3], [numpy.inf, 0, 0, 3, 3]]


@pytest.mark.parametrize("op", OPS)
def test_validate_false_does_not_raise(op):
    out = forward(op, boxes=rois(INVALID), validate=False)
    assert out.shape == (len(INVALID), C, 2, 2)


def test_validate_false_backward_does_not_raise():
    g = grad((len(INVALID), C, 2, 2))
    assert align_backward(g=g, boxes=rois(INVALID), validate=False).shape == (N, C, H, W)
    indices = numpy.full(g.shape, H * W + 3, dtype=numpy.int64)  # out of range: ignored
    grad_input = pool_backward(g=g, boxes=rois(INVALID), indices=indices, validate=False)
    assert grad_input.shape == (N, C, H, W)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("boxes", [[[0, 1, 1, 4, 4]], [[0, 1, 1, 4, 4], [1, 0, 0, 2, 2], [1, 0, 0, 3, 3]],
                                   [0, 1, 1, 4, 4]], ids=["one-row", "three-rows", "flat"])
def test_boxes_written_as_python_lists_say_how_to_pass_them(op, boxes):
    """A [K, 5] table written as Python lists must not read as 'one array per image'."""
    message = (r"boxes must be an array \[K, 5\] or a list of one array \[L_i, 4\] per image, "
               r"got a list of builtins\.(list|int): pass numpy\.asarray\(boxes, dtype=numpy\.float32\)")
    with pytest.raises(TypeError, match=message):
        forward(op, boxes=boxes)


@pytest.mark.parametrize("dtype", [numpy.float16] + ([BFLOAT16] if BFLOAT16 else []), ids=str)
def test_per_image_boxes_of_a_narrow_dtype_keep_every_image_index(dtype):
    """bfloat16 holds integers exactly only to 256, float16 to 2048: the index column is built
    in the compute dtype, so box lists of many images still read the right image."""
    n = 2100 if numpy.dtype(dtype) == numpy.float16 else 300
    x = numpy.zeros((n, 1, 4, 4), numpy.float32)
    x[n - 1] = 1.0
    per_image = [numpy.zeros((0, 4), dtype)] * (n - 1) + [numpy.array([[0, 0, 3, 3]], dtype)]
    assert roi_cupy.roi_align(x, per_image, 1, 1.0, 2, True)[0, 0, 0, 0] == 1.0
    assert roi_cupy.roi_pool(x, per_image, 1)[0, 0, 0, 0] == 1.0
    with pytest.raises(ValueError, match=f"boxes of dtype {numpy.dtype(dtype).name} cannot hold "
                                         f"image index {n - 1} exactly: convert them to float32"):
        roi_cupy.convert_boxes_to_roi_format(per_image)
