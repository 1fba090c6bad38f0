"""roi_cupy.jax: the same numbers as roi_cupy's NumPy ops eagerly and under jit, grad, vmap and
their nestings; one host call per vmapped call; padding under jit; argument errors. float64 runs
inside ``jax.enable_x64`` only, so the other tests keep JAX's default."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import numpy
import pytest
from conftest import BFLOAT16, BFLOAT16_MISSING, compute_dtype, make_rng, per_image, random_boxes, random_features

jax = pytest.importorskip("jax", reason="jax is not installed: roi_cupy.jax is not tested")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import roi_cupy  # noqa: E402
import roi_cupy.jax as rj  # noqa: E402
from roi_cupy import ops  # noqa: E402

N, C, H, W = 2, 3, 11, 13
K = 8
FEATURE_DTYPES = [numpy.dtype(d) for d in (numpy.float16, BFLOAT16, numpy.float32, numpy.float64)
                  if d is not None]


def dtype_context(dtype):
    """float64 needs JAX's x64 mode; the other dtypes run without it."""
    return jax.enable_x64(True) if numpy.dtype(dtype) == numpy.float64 else contextlib.nullcontext()


def inputs(key, dtype, n=N, k=K, shape=(C, H, W), scale=1.0):
    """Random features [n, *shape] of ``dtype`` and valid boxes [k, 5] of its compute dtype."""
    rng = make_rng("jax", key, numpy.dtype(dtype).name)
    x = random_features(rng, (n,) + shape, dtype)
    boxes = random_boxes(rng, n, k, shape[1], shape[2], scale, dtype=compute_dtype(dtype))
    return x, boxes


def assert_same(actual, expected):
    """Bit for bit: the adapter runs roi_cupy's own ops on the same values."""
    actual = numpy.asarray(actual)
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"shape {actual.shape}, expected {expected.shape}"
    assert numpy.array_equal(actual, expected, equal_nan=True), (
        f"max abs difference {numpy.nanmax(numpy.abs(actual.astype(float) - expected)):.3g}"
    )


def test_import_roi_cupy_leaves_jax_alone():
    code = "import roi_cupy, sys; assert 'jax' not in sys.modules, 'roi_cupy imported jax'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2], ids=str)
@pytest.mark.parametrize("output_size", [(3, 2), 5], ids=str)
def test_align_forward(dtype, aligned, sampling_ratio, output_size):
    x, boxes = inputs(("align", aligned, sampling_ratio, output_size), dtype, scale=0.5)
    args = (output_size, 0.5, sampling_ratio, aligned)
    expected = ops.roi_align(x, boxes, *args)
    with dtype_context(dtype):
        actual = rj.roi_align(jnp.asarray(x), jnp.asarray(boxes), *args)
        assert isinstance(actual, jax.Array)
        assert_same(actual, expected)


@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
@pytest.mark.parametrize("output_size", [(3, 2), 5], ids=str)
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5], ids=str)
def test_pool_forward(dtype, output_size, spatial_scale):
    x, boxes = inputs(("pool", output_size, spatial_scale), dtype, scale=spatial_scale)
    expected = ops.roi_pool(x, boxes, output_size, spatial_scale)
    with dtype_context(dtype):
        actual = rj.roi_pool(jnp.asarray(x), jnp.asarray(boxes), output_size, spatial_scale)
        assert_same(actual, expected)


@pytest.mark.parametrize("op", ["align", "pool"])
def test_per_image_box_list(op):
    """A list of N [L_i, 4] arrays reads as torchvision reads it, eagerly and under jit."""
    x, boxes = inputs(("list", op), numpy.float32)
    function = rj.roi_align if op == "align" else rj.roi_pool
    reference = roi_cupy.roi_align if op == "align" else roi_cupy.roi_pool
    expected = reference(x, per_image(boxes, N), 3)
    listed = [jnp.asarray(b) for b in per_image(boxes, N)]
    assert_same(function(jnp.asarray(x), listed, 3), expected)
    assert_same(jax.jit(lambda x, b: function(x, b, 3))(jnp.asarray(x), listed), expected)


def test_integer_boxes_differentiate():
    """Integer boxes have no tangent space; the features' gradient still flows."""
    x, boxes = inputs("int boxes", numpy.float32)
    boxes = numpy.round(boxes).astype(numpy.int32)
    g = jax.grad(lambda x: rj.roi_align(x, jnp.asarray(boxes), 2).sum())(jnp.asarray(x))
    expected = ops.roi_align_backward(
        numpy.ones((K, C, 2, 2), numpy.float32), boxes.astype(numpy.float32), x.shape, 2
    )
    assert_same(g, expected)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2, (3, -1)], ids=str)
def test_align_vjp(dtype, aligned, sampling_ratio):
    x, boxes = inputs(("align vjp", aligned, sampling_ratio), dtype)
    g = random_features(make_rng("g", aligned, sampling_ratio), (K, C, 3, 2), dtype)
    args = ((3, 2), 1.0, sampling_ratio, aligned)
    expected = ops.roi_align_backward(g, boxes, x.shape, *args)
    with dtype_context(dtype):
        out, vjp = jax.vjp(lambda x, b: rj.roi_align(x, b, *args), jnp.asarray(x),
                           jnp.asarray(boxes))
        grad_x, grad_boxes = vjp(jnp.asarray(g))
        assert_same(grad_x, expected)
        assert_same(grad_boxes, numpy.zeros_like(boxes))


@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
def test_pool_vjp(dtype):
    x, boxes = inputs("pool vjp", dtype)
    g = random_features(make_rng("pool g"), (K, C, 3, 2), dtype)
    _, indices = ops.roi_pool(x, boxes, (3, 2), return_indices=True)
    expected = ops.roi_pool_backward(g, boxes, indices, x.shape)
    with dtype_context(dtype):
        out, vjp = jax.vjp(lambda x, b: rj.roi_pool(x, b, (3, 2)), jnp.asarray(x),
                           jnp.asarray(boxes))
        grad_x, grad_boxes = vjp(jnp.asarray(g))
        assert_same(grad_x, expected)
        assert_same(grad_boxes, numpy.zeros_like(boxes))


@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2], ids=str)
def test_align_check_grads(aligned, sampling_ratio):
    """Finite differences in float64 (continuous boxes keep samples off pixel boundaries)."""
    x, boxes = inputs(("check grads", aligned, sampling_ratio), numpy.float64, shape=(2, 5, 6))
    with jax.enable_x64(True):
        boxes = jnp.asarray(boxes)
        f = lambda x: rj.roi_align(x, boxes, (2, 3), 1.0, sampling_ratio, aligned)  # noqa: E731
        check_grads(f, (jnp.asarray(x),), order=1, modes=["rev"])


# ----------------------------------------------------------------------------- jit
def test_jit_and_jit_grad():
    x, boxes = inputs("jit", numpy.float32)
    g = random_features(make_rng("jit g"), (K, C, 4, 4), numpy.float32)
    args = (4, 1.0, 2, True)
    align = jax.jit(lambda x, b: rj.roi_align(x, b, *args))
    assert_same(align(x, boxes), ops.roi_align(x, boxes, *args))
    grad = jax.jit(jax.grad(lambda x, b: jnp.vdot(rj.roi_align(x, b, *args), g)))
    assert_same(grad(x, boxes), ops.roi_align_backward(g, boxes, x.shape, *args))

    pooled, indices = ops.roi_pool(x, boxes, 4, return_indices=True)
    assert_same(jax.jit(lambda x, b: rj.roi_pool(x, b, 4))(x, boxes), pooled)
    grad = jax.jit(jax.grad(lambda x, b: jnp.vdot(rj.roi_pool(x, b, 4), g)))
    assert_same(grad(x, boxes), ops.roi_pool_backward(g, boxes, indices, x.shape))


def test_padding_under_jit():
    """Rows with batch index -1 and validate=False pad K to a fixed size: zeros, no gradient."""
    x, boxes = inputs("padding", numpy.float32)
    padded = numpy.concatenate([boxes, numpy.tile([[-1.0, 0, 0, 4, 4]], (5, 1))]).astype(
        numpy.float32
    )
    g = random_features(make_rng("padding g"), (K + 5, C, 2, 2), numpy.float32)
    for function, reference in [(rj.roi_align, ops.roi_align), (rj.roi_pool, ops.roi_pool)]:

        def loss(x, b, function=function):
            return jnp.vdot(function(x, b, 2, validate=False), g)

        out = jax.jit(lambda x, b, function=function: function(x, b, 2, validate=False))(
            x, padded
        )
        out = numpy.asarray(out)
        assert_same(out[:K], reference(x, boxes, 2))
        assert not out[K:].any()
        unpadded = jax.grad(lambda x, f=function: jnp.vdot(f(x, boxes, 2), g[:K]))(x)
        assert_same(jax.jit(jax.grad(loss))(x, padded), numpy.asarray(unpadded))
        with pytest.raises(ValueError, match=r"batch index must be an integer in \[0, 2\)"):
            function(jnp.asarray(x), jnp.asarray(padded), 2)  # eagerly, validate=True


def test_invalid_boxes_under_jit_give_zeros():
    """Traced boxes cannot be checked: a bad RoI gives zeros, as with validate=False."""
    x, boxes = inputs("jit invalid", numpy.float32)
    boxes[1, 0] = N
    boxes[3, 2] = numpy.nan
    out = numpy.asarray(jax.jit(lambda x, b: rj.roi_align(x, b, 2))(x, boxes))
    assert_same(out, ops.roi_align(x, boxes, 2, validate=False))
    assert not out[[1, 3]].any() and out.any()


# ----------------------------------------------------------------------------- vmap
B = 3


def batched(key, n=N):
    rng = make_rng("vmap", key)
    xs = random_features(rng, (B, n, C, H, W), numpy.float32)
    boxes = numpy.stack([random_boxes(rng, n, K, H, W, dtype=numpy.float32) for _ in range(B)])
    return xs, boxes


@pytest.fixture
def host_calls(monkeypatch):
    """How many times each of roi_cupy's ops ran."""
    calls = {}
    for name in ("roi_align", "roi_align_backward", "roi_pool", "roi_pool_backward"):
        original = getattr(ops, name)

        def counting(*args, original=original, name=name, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(ops, name, counting)
    return calls


@pytest.mark.parametrize("in_axes", [(0, 0), (None, 0), (0, None)], ids=str)
@pytest.mark.parametrize("op", ["align", "pool"])
def test_vmap_is_one_call_equal_to_a_loop(op, in_axes, host_calls):
    xs, boxes = batched((op, in_axes))
    x_at = (lambda b: xs[b]) if in_axes[0] == 0 else (lambda b: xs[0])
    boxes_at = (lambda b: boxes[b]) if in_axes[1] == 0 else (lambda b: boxes[0])
    function = rj.roi_align if op == "align" else rj.roi_pool
    name = "roi_align" if op == "align" else "roi_pool"
    expected = numpy.stack(
        [numpy.asarray(function(jnp.asarray(x_at(b)), jnp.asarray(boxes_at(b)), 3))
         for b in range(B)]
    )
    host_calls.clear()
    x_arg = xs if in_axes[0] == 0 else xs[0]
    boxes_arg = boxes if in_axes[1] == 0 else boxes[0]
    actual = jax.vmap(lambda x, b: function(x, b, 3), in_axes=in_axes)(x_arg, boxes_arg)
    assert_same(actual, expected)
    assert host_calls == {name: 1}


def test_nested_vmap():
    rng = make_rng("nested vmap")
    xs = random_features(rng, (2, N, C, H, W), numpy.float32)
    boxes = random_boxes(rng, N, 2 * B * K, H, W, dtype=numpy.float32).reshape(2, B, K, 5)
    f = jax.vmap(jax.vmap(lambda x, b: rj.roi_align(x, b, 2, 1.0, 2), in_axes=(None, 0)))
    expected = numpy.stack(
        [numpy.stack([ops.roi_align(xs[i], boxes[i, j], 2, 1.0, 2) for j in range(B)])
         for i in range(2)]
    )
    assert_same(f(xs, boxes), expected)


@pytest.mark.parametrize("op", ["align", "pool"])
def test_vmap_keeps_invalid_boxes_invalid(op):
    """A batch index outside [0, N) in one element must not read another element's features."""
    xs, boxes = batched(("invalid", op))
    boxes[0, 0, 0] = N  # would be element 1's image 0 once folded
    boxes[1, 1, 0] = -1  # would be element 0's image N - 1
    boxes[2, 2, 0] = 1.75  # truncated to 1: valid
    boxes[2, 3, 0] = -0.5  # truncated to 0: valid
    boxes[1, 4, 3] = numpy.inf
    function = rj.roi_align if op == "align" else rj.roi_pool
    reference = ops.roi_align if op == "align" else ops.roi_pool
    expected = numpy.stack([reference(xs[b], boxes[b], 3, validate=False) for b in range(B)])
    actual = jax.jit(jax.vmap(lambda x, b: function(x, b, 3, validate=False)))(xs, boxes)
    assert_same(actual, expected)
    assert not expected[0, 0].any() and not expected[1, 1].any() and expected[2, 2:4].any()


@pytest.mark.parametrize("in_axes", [(0, 0), (None, 0)], ids=str)
@pytest.mark.parametrize("op", ["align", "pool"])
def test_vmap_of_grad(op, in_axes, host_calls):
    xs, boxes = batched(("grad", op, in_axes))
    g = random_features(make_rng("vmap g", op), (K, C, 3, 3), numpy.float32)
    function = rj.roi_align if op == "align" else rj.roi_pool

    def grad(x, b):
        return jax.grad(lambda x: jnp.vdot(function(x, b, 3, 1.0), g))(x)

    x_arg = xs if in_axes[0] == 0 else xs[0]
    expected = numpy.stack(
        [numpy.asarray(grad(jnp.asarray(xs[b] if in_axes[0] == 0 else xs[0]),
                            jnp.asarray(boxes[b]))) for b in range(B)]
    )
    host_calls.clear()
    actual = jax.jit(jax.vmap(grad, in_axes=in_axes))(x_arg, boxes)
    assert_same(actual, expected)
    # RoI Align's gradient needs no forward pass (XLA drops the unused pure callback); RoI
    # Pool's needs the forward's indices.
    expected_calls = {"align": {"roi_align_backward": 1},
                      "pool": {"roi_pool": 1, "roi_pool_backward": 1}}[op]
    assert host_calls == expected_calls


# ----------------------------------------------------------------------------- errors
X = random_features(make_rng("errors"), (N, C, H, W), numpy.float32)
BOXES = numpy.array([[0, 1, 1, 5, 5], [1, 0, 0, 3, 3]], numpy.float32)


@pytest.mark.parametrize("function", [rj.roi_align, rj.roi_pool], ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(output_size=0), ValueError, "output_size must be positive"),
        (dict(output_size=(2,)), TypeError, "output_size must be an int or a pair"),
        (dict(spatial_scale=-1.0), ValueError, "spatial_scale must be positive"),
        (dict(spatial_scale="1"), TypeError, "spatial_scale must be a real number"),
        (dict(input=X[0]), ValueError, r"input must have shape \[N, C, H, W\]"),
        (dict(input=X.astype(numpy.int32)), TypeError, "input must have a floating dtype"),
        (dict(input="x"), TypeError, "input must be a JAX array"),
        (dict(boxes=BOXES[:, 1:]), ValueError, r"boxes must have shape \[K, 5\]"),
        (dict(boxes=BOXES > 0), TypeError, "boxes must have a real dtype"),
        (dict(boxes=[BOXES[:, 1:]]), ValueError, "boxes must hold one array per image"),
        (dict(boxes=[BOXES, BOXES]), ValueError, r"boxes\[0\] must have shape \[L, 4\]"),
        (dict(validate="no"), TypeError, "validate must be a bool, got 'no'"),
        (dict(validate=0), TypeError, "validate must be a bool, got 0"),
        (dict(spatial_scale=1e300), ValueError, "spatial_scale must lie within float32's range"),
    ],
    ids=str,
)
def test_argument_errors(function, change, error, message):
    """Raised when the call is traced: eagerly and under jit alike."""
    arguments = dict(input=X, boxes=BOXES, output_size=2, spatial_scale=1.0) | change
    input, boxes = arguments.pop("input"), arguments.pop("boxes")
    with pytest.raises(error, match=message):
        function(input, boxes, **arguments)
    if isinstance(input, str):
        return
    boxes = [jnp.asarray(b) for b in boxes] if isinstance(boxes, list) else jnp.asarray(boxes)
    with pytest.raises(error, match=message):
        jax.jit(lambda x, b: function(x, b, **arguments))(jnp.asarray(input), boxes)


@pytest.mark.parametrize("sampling_ratio", [1.5, True, None], ids=str)
def test_sampling_ratio_type(sampling_ratio):
    with pytest.raises(TypeError, match="sampling_ratio must be an int"):
        rj.roi_align(X, BOXES, 2, 1.0, sampling_ratio)


@pytest.mark.parametrize("function", [rj.roi_align, rj.roi_pool], ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "row, message",
    [
        ([2, 0, 0, 1, 1], r"batch index must be an integer in \[0, 2\), got 2.0 in row 1"),
        ([0.5, 0, 0, 1, 1], r"batch index must be an integer in \[0, 2\), got 0.5 in row 1"),
        ([0, 0, numpy.nan, 1, 1], r"boxes must be finite, got row 1"),
    ],
    ids=["index", "fraction", "nan"],
)
def test_eager_box_errors(function, row, message):
    boxes = numpy.array([BOXES[0], row], numpy.float32)
    with pytest.raises(ValueError, match=message):
        function(jnp.asarray(X), jnp.asarray(boxes), 2)
    with pytest.raises(ValueError, match=message):  # eager grad: the boxes are concrete
        jax.grad(lambda x: function(x, jnp.asarray(boxes), 2).sum())(jnp.asarray(X))
    reference = ops.roi_align if function is rj.roi_align else ops.roi_pool
    unchecked = function(jnp.asarray(X), jnp.asarray(boxes), 2, validate=False)
    assert_same(unchecked, reference(X, boxes, 2, validate=False))


def test_pool_plane_too_large_for_int32_indices():
    huge = jax.ShapeDtypeStruct((1, 1, 1 << 16, 1 << 15), jnp.float32)
    with pytest.raises(ValueError, match="too large for RoI Pool's int32 indices"):
        jax.eval_shape(lambda x: rj.roi_pool(x, jnp.asarray(BOXES[:1] * 0), 2), huge)
    assert rj._index_dtype(1 << 16, (1 << 15) - 1) == numpy.int32
    with jax.enable_x64(True):
        assert rj._index_dtype(1 << 16, 1 << 15) == numpy.int64


# ----------------------------------------------------------------------------- pure_callback
@pytest.fixture
def round_trip(monkeypatch):
    """The path platforms other than the CPU take (jax.pure_callback), forced on the CPU."""
    monkeypatch.setattr(rj, "buffer_callback", None)
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.mark.parametrize("op", ["align", "pool"])
def test_pure_callback_path(op, round_trip, host_calls):
    xs, boxes = batched(("round trip", op))
    g = random_features(make_rng("round trip g", op), (K, C, 3, 3), numpy.float32)
    function = rj.roi_align if op == "align" else rj.roi_pool
    reference = ops.roi_align if op == "align" else ops.roi_pool
    backward = ops.roi_align_backward if op == "align" else ops.roi_pool_backward

    def grad(x, b):
        return jax.grad(lambda x: jnp.vdot(function(x, b, 3), g))(x)

    def expected_grad(b):
        if op == "align":
            return backward(g, boxes[b], xs[b].shape, 3)
        _, indices = reference(xs[b], boxes[b], 3, return_indices=True)
        return backward(g, boxes[b], indices, xs[b].shape)

    expected = reference(xs[0], boxes[0], 3)
    assert_same(function(jnp.asarray(xs[0]), jnp.asarray(boxes[0]), 3), expected)
    assert_same(jax.jit(grad)(xs[0], boxes[0]), expected_grad(0))
    host_calls.clear()
    vmapped = jax.jit(jax.vmap(lambda x, b: function(x, b, 3)))(xs, boxes).block_until_ready()
    assert host_calls == {f"roi_{op}": 1}
    assert_same(vmapped, numpy.stack([reference(xs[b], boxes[b], 3) for b in range(B)]))
    assert_same(jax.vmap(grad)(xs, boxes), numpy.stack([expected_grad(b) for b in range(B)]))


# ----------------------------------------------------------------------------- babilim layers
@pytest.mark.parametrize("layer", ["RoiAlign", "RoiPool"])
def test_babilim_layers_differentiate_through_the_adapter(layer):
    rng = make_rng("jax", "babilim", layer)
    x = jnp.asarray(random_features(rng, (N, C, H, W), numpy.float32))
    rois = numpy.stack([random_boxes(rng, 1, 3, H, W, 1.0, dtype=numpy.float32)[:, 1:]
                        for _ in range(N)])                      # [N, 3, 4]
    module = getattr(roi_cupy, layer)((3, 2), 0.5)
    flat = [jnp.asarray(r) for r in rois]
    if layer == "RoiAlign":
        direct = lambda x: rj.roi_align(x, flat, (3, 2), 0.5, -1, True)  # noqa: E731
    else:
        direct = lambda x: rj.roi_pool(x, flat, (3, 2), 0.5)  # noqa: E731
    out = module(roi_cupy.Tensor(data=x), roi_cupy.Tensor(data=rois))
    assert isinstance(out, roi_cupy.Tensor) and out.shape == (N, 3, C, 3, 2)
    assert_same(out.native.reshape(N * 3, C, 3, 2), numpy.asarray(direct(x)))
    weights = jnp.asarray(random_features(rng, (N * 3, C, 3, 2), numpy.float32))
    through_layer = jax.jit(jax.grad(lambda x: jnp.sum(module(x, jnp.asarray(rois)).reshape(
        weights.shape) * weights)))(x)
    through_adapter = jax.grad(lambda x: jnp.sum(direct(x) * weights))(x)
    assert_same(numpy.asarray(through_layer), numpy.asarray(through_adapter))
    assert numpy.abs(numpy.asarray(through_layer)).sum() > 0


@pytest.mark.parametrize("aligned", ["False", 1, None], ids=repr)
def test_aligned_must_be_a_bool(aligned):
    with pytest.raises(TypeError, match=f"aligned must be a bool, got {aligned!r}"):
        rj.roi_align(X, BOXES, 2, aligned=aligned)


def test_per_image_index_column_holds_every_image_in_bfloat16():
    """bfloat16 has 8 significant bits: an index column in the boxes' dtype would turn image
    257 into 256."""
    if BFLOAT16 is None:
        pytest.skip(BFLOAT16_MISSING)
    n = 258
    x = numpy.zeros((n, 1, 4, 4), numpy.float32)
    x[257] = 1.0
    boxes = [jnp.zeros((0, 4), BFLOAT16)] * 257 + [jnp.asarray([[0, 0, 3, 3]], BFLOAT16)]
    out = rj.roi_align(jnp.asarray(x), boxes, 1, 1.0, 2, True)
    assert float(out[0, 0, 0, 0]) == 1.0


# ----------------------------------------------------------------------------- multi-scale
MS_SCALES = [0.5, 0.25, 0.125]
MS_ARGS = dict(canonical_scale=16, canonical_level=2)  # sqrt(area) < 16: map 0, < 32: 1, else 2


def pyramid(key, dtype, n=N, lead=()):
    """Maps of a 24 x 28 image at MS_SCALES and boxes of every level [k, 5] (compute dtype)."""
    rng = make_rng("jax multiscale", key, numpy.dtype(dtype).name)
    maps = [random_features(rng, lead + (n, C, 24 // s, 28 // s), dtype) for s in (2, 4, 8)]
    side = numpy.exp(rng.uniform(numpy.log(4), numpy.log(60), (K, 2)))
    corner = rng.uniform(-2, 20, (K, 2))
    rows = numpy.concatenate([rng.integers(0, n, (K, 1)), corner, corner + side], axis=1)
    sized = [[i % n, 1, 2, 1 + s, 2 + s] for i, s in enumerate((6, 20, 40))]
    boxes = numpy.concatenate([rows, sized]).astype(compute_dtype(dtype))
    return maps, boxes


@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
@pytest.mark.parametrize("sampling_ratio", [-1, (2, 1)], ids=str)
def test_multi_scale_forward_and_vjp(dtype, sampling_ratio):
    maps, boxes = pyramid(("vjp", sampling_ratio), dtype)
    args = ((3, 2), MS_SCALES, sampling_ratio, True)
    with dtype_context(dtype):
        expected = ops.multi_scale_roi_align(maps, boxes, *args, **MS_ARGS)
        out, vjp = jax.vjp(lambda *m: rj.multi_scale_roi_align(list(m), jnp.asarray(boxes), *args,
                                                               **MS_ARGS),
                           *[jnp.asarray(x) for x in maps])
        assert_same(out, expected)
        g = random_features(make_rng("jax ms g", str(dtype)), expected.shape, dtype)
        grads = vjp(jnp.asarray(g))
        wanted = ops.multi_scale_roi_align_backward(g, boxes, [x.shape for x in maps], *args,
                                                    **MS_ARGS)
        assert len(grads) == 3
        for grad, want in zip(grads, wanted):
            assert_same(grad, want)
            assert numpy.abs(want.astype(numpy.float64)).max() > 0
        listed = rj.multi_scale_roi_align([jnp.asarray(x) for x in maps],
                                          [jnp.asarray(b) for b in per_image(boxes, N)], *args,
                                          **MS_ARGS)
        assert listed.shape == expected.shape


def test_multi_scale_jit_grad_and_check_grads():
    with jax.enable_x64(True):
        maps, boxes = pyramid("check grads", numpy.float64)

        def f(*m):
            return rj.multi_scale_roi_align(list(m), boxes, 2, MS_SCALES, 2, False, **MS_ARGS)

        maps = [jnp.asarray(x) for x in maps]
        check_grads(f, maps, order=1, modes=["rev"])
        loss = jax.jit(jax.grad(lambda m: jnp.sum(f(*m) ** 2)))
        grads = loss(maps)
        eager = jax.grad(lambda m: jnp.sum(f(*m) ** 2))(maps)
        for a, b in zip(grads, eager):
            assert_same(a, numpy.asarray(b))


@pytest.mark.parametrize("in_axes", [(0, 0), (None, 0)], ids=str)
def test_multi_scale_vmap_is_one_call(in_axes, monkeypatch):
    calls = []
    for name in ("multi_scale_roi_align", "multi_scale_roi_align_backward"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name,
                            lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    maps, _ = pyramid("vmap", numpy.float32, lead=(B,))
    boxes = numpy.stack([pyramid(("vmap", b), numpy.float32)[1] for b in range(B)])
    boxes[1, 0, 0] = N  # invalid in its own element: must stay invalid once folded
    g = random_features(make_rng("jax ms vmap g"), (len(boxes[0]), C, 2, 2), numpy.float32)

    def grad(m, b):
        return jax.grad(lambda m: jnp.vdot(
            rj.multi_scale_roi_align(m, b, 2, MS_SCALES, 2, validate=False, **MS_ARGS), g))(m)

    def at(b):
        return [x[b] if in_axes[0] == 0 else x[0] for x in maps]

    expected = [ops.multi_scale_roi_align(at(b), boxes[b], 2, MS_SCALES, 2, validate=False,
                                          **MS_ARGS) for b in range(B)]
    m_arg = maps if in_axes[0] == 0 else [x[0] for x in maps]
    calls.clear()
    actual = jax.jit(jax.vmap(
        lambda m, b: rj.multi_scale_roi_align(m, b, 2, MS_SCALES, 2, validate=False, **MS_ARGS),
        in_axes=in_axes))(m_arg, boxes)
    assert_same(actual, numpy.stack(expected))
    assert not expected[1][0].any()
    assert calls == ["multi_scale_roi_align"]
    calls.clear()
    grads = jax.jit(jax.vmap(grad, in_axes=in_axes))(m_arg, boxes)
    assert calls == ["multi_scale_roi_align_backward"]
    for b in range(B):
        want = ops.multi_scale_roi_align_backward(g, boxes[b], [x.shape for x in at(b)], 2,
                                                  MS_SCALES, 2, validate=False, **MS_ARGS)
        for level in range(3):
            assert_same(grads[level][b], want[level])


def test_multi_scale_argument_and_box_errors():
    maps, boxes = pyramid("errors", numpy.float32)
    maps = [jnp.asarray(x) for x in maps]
    with pytest.raises(ValueError, match=r"spatial_scales must hold one scale per level \(3\)"):
        rj.multi_scale_roi_align(maps, boxes, 2, MS_SCALES[:2])
    with pytest.raises(ValueError, match=r"features\[1\] must have the N and C"):
        rj.multi_scale_roi_align([maps[0], maps[1][:, :2], maps[2]], boxes, 2, MS_SCALES)
    with pytest.raises(TypeError, match="features must be a list of JAX arrays"):
        rj.multi_scale_roi_align(maps[0], boxes, 2, MS_SCALES)
    bad = boxes.copy()
    bad[0, 0] = N
    with pytest.raises(ValueError, match="batch index must be an integer"):
        rj.multi_scale_roi_align(maps, bad, 2, MS_SCALES)
    out = jax.jit(lambda m, b: rj.multi_scale_roi_align(m, b, 2, MS_SCALES, 2, **MS_ARGS))(
        maps, bad)
    assert not numpy.asarray(out[0]).any()


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_reaches_the_backward_pass(monkeypatch, op, deterministic):
    name = f"{op}_backward"
    seen = []
    original = getattr(ops, name)

    def recording(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, name, recording)
    x, boxes = inputs(("deterministic", op), numpy.float32)
    call = getattr(rj, op)
    args = ((2, 2), 1.0, 2, True) if op == "roi_align" else ((2, 2), 1.0)
    grad = jax.grad(lambda x: call(x, boxes, *args, deterministic=deterministic).sum())(
        jnp.asarray(x)
    )
    assert seen == [deterministic] and bool(jnp.any(grad != 0))


def test_deterministic_must_be_a_bool():
    x, boxes = inputs("deterministic flag", numpy.float32)
    with pytest.raises(TypeError, match="deterministic must be a bool, got 'yes'"):
        rj.roi_align(jnp.asarray(x), boxes, 2, deterministic="yes")
