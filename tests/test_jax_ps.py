"""roi_cupy.jax's position-sensitive ps_roi_align and ps_roi_pool: the same numbers as roi_cupy's
NumPy ops eagerly and under jit, grad and vmap; one host call per vmapped call; argument errors.
float64 runs inside ``jax.enable_x64`` only."""
from __future__ import annotations

import contextlib

import numpy
import pytest
from conftest import BFLOAT16, compute_dtype, make_rng, per_image, random_boxes, random_features

jax = pytest.importorskip("jax", reason="jax is not installed: roi_cupy.jax is not tested")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import roi_cupy.jax as rj  # noqa: E402
from roi_cupy import ops  # noqa: E402

N, C, H, W = 2, 12, 11, 13  # C = 2 output channels of 3 x 2 bins
K = 8
SIZE = (3, 2)
FEATURE_DTYPES = [numpy.dtype(d) for d in (numpy.float16, BFLOAT16, numpy.float32, numpy.float64)
                  if d is not None]
OPS = {
    "align": (rj.ps_roi_align, ops.ps_roi_align, ops.ps_roi_align_backward),
    "pool": (rj.ps_roi_pool, ops.ps_roi_pool, ops.ps_roi_pool_backward),
}


def dtype_context(dtype):
    return jax.enable_x64(True) if numpy.dtype(dtype) == numpy.float64 else contextlib.nullcontext()


def inputs(key, dtype, n=N, k=K, shape=(C, H, W), scale=1.0):
    rng = make_rng("jax ps", key, numpy.dtype(dtype).name)
    x = random_features(rng, (n,) + shape, dtype)
    boxes = random_boxes(rng, n, k, shape[1], shape[2], scale, dtype=compute_dtype(dtype))
    return x, boxes


def assert_same(actual, expected):
    """Bit for bit: the adapter runs roi_cupy's own ops on the same values."""
    actual = numpy.asarray(actual)
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"shape {actual.shape}, expected {expected.shape}"
    assert numpy.array_equal(actual, expected, equal_nan=True)


# ----------------------------------------------------------------------------- forward and vjp
@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
@pytest.mark.parametrize("op", sorted(OPS))
def test_forward_and_vjp(op, dtype):
    function, forward, backward = OPS[op]
    extra = (2,) if op == "align" else ()
    x, boxes = inputs(("vjp", op), dtype, scale=0.5)
    g = random_features(make_rng("jax ps g", op), (K, 2) + SIZE, dtype)
    with dtype_context(dtype):
        out, vjp = jax.vjp(lambda x, b: function(x, b, SIZE, 0.5, *extra), jnp.asarray(x),
                           jnp.asarray(boxes))
        assert_same(out, forward(x, boxes, SIZE, 0.5, *extra))
        grad_x, grad_boxes = vjp(jnp.asarray(g))
        assert_same(grad_x, backward(g, boxes, x.shape, SIZE, 0.5, *extra))
        assert_same(grad_boxes, numpy.zeros_like(boxes))


@pytest.mark.parametrize("op", sorted(OPS))
def test_per_image_box_list(op):
    function, forward, _ = OPS[op]
    x, boxes = inputs(("list", op), numpy.float32)
    listed = per_image(boxes, N)
    assert_same(function(jnp.asarray(x), [jnp.asarray(b) for b in listed], SIZE),
                forward(x, listed, SIZE))


@pytest.mark.parametrize("sampling_ratio", [-1, 2, (1, 3)], ids=str)
def test_ps_roi_align_check_grads(sampling_ratio):
    """Finite differences in float64 (continuous boxes keep samples off pixel boundaries)."""
    x, boxes = inputs(("check grads", sampling_ratio), numpy.float64, shape=(6, 5, 6))
    with jax.enable_x64(True):
        boxes = jnp.asarray(boxes)
        f = lambda x: rj.ps_roi_align(x, boxes, SIZE, 1.0, sampling_ratio)  # noqa: E731
        check_grads(f, (jnp.asarray(x),), order=1, modes=["rev"])


def test_ps_roi_pool_check_grads():
    x, boxes = inputs("pool check grads", numpy.float64, shape=(6, 5, 6))
    with jax.enable_x64(True):
        boxes = jnp.asarray(boxes)
        check_grads(lambda x: rj.ps_roi_pool(x, boxes, SIZE), (jnp.asarray(x),), order=1,
                    modes=["rev"])


# ----------------------------------------------------------------------------- jit
@pytest.mark.parametrize("op", sorted(OPS))
def test_jit_and_jit_grad(op):
    function, forward, backward = OPS[op]
    x, boxes = inputs(("jit", op), numpy.float32)
    g = random_features(make_rng("jit ps g", op), (K, 2) + SIZE, numpy.float32)
    assert_same(jax.jit(lambda x, b: function(x, b, SIZE))(x, boxes), forward(x, boxes, SIZE))
    grad = jax.jit(jax.grad(lambda x, b: jnp.vdot(function(x, b, SIZE), g)))
    assert_same(grad(x, boxes), backward(g, boxes, x.shape, SIZE))


@pytest.mark.parametrize("op", sorted(OPS))
def test_invalid_boxes_under_jit_give_zeros_and_eager_ones_raise(op):
    function, forward, _ = OPS[op]
    x, boxes = inputs(("jit invalid", op), numpy.float32)
    boxes[1, 0] = N
    boxes[3, 2] = numpy.nan
    out = numpy.asarray(jax.jit(lambda x, b: function(x, b, SIZE))(x, boxes))
    assert_same(out, forward(x, boxes, SIZE, validate=False))
    assert not out[[1, 3]].any() and out.any()
    with pytest.raises(ValueError, match=r"batch index must be an integer in \[0, 2\), got 2.0 "
                                         r"in row 1"):
        function(jnp.asarray(x), jnp.asarray(boxes), SIZE)


@pytest.mark.parametrize("op", sorted(OPS))
def test_channel_count_is_checked_eagerly_and_when_traced(op):
    function = OPS[op][0]
    x, boxes = inputs(("channels", op), numpy.float32)
    message = r"input must have a channel count C that is a multiple of PH \* PW = 8 for " \
              r"output_size \(2, 4\) .* got C = 12"
    with pytest.raises(ValueError, match=message):
        function(jnp.asarray(x), jnp.asarray(boxes), (2, 4))
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda x, b: function(x, b, (2, 4)))(x, boxes)


# ----------------------------------------------------------------------------- vmap
B = 3


@pytest.fixture
def host_calls(monkeypatch):
    """How many times each of roi_cupy's PS ops ran."""
    calls = {}
    for name in ("ps_roi_align", "ps_roi_align_backward", "ps_roi_pool", "ps_roi_pool_backward"):
        original = getattr(ops, name)

        def counting(*args, original=original, name=name, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(ops, name, counting)
    return calls


@pytest.mark.parametrize("in_axes", [(0, 0), (None, 0), (0, None)], ids=str)
@pytest.mark.parametrize("op", sorted(OPS))
def test_vmap_is_one_call_equal_to_a_loop(op, in_axes, host_calls):
    function, forward, backward = OPS[op]
    rng = make_rng("jax ps vmap", op, in_axes)
    xs = random_features(rng, (B, N, C, H, W), numpy.float32)
    boxes = numpy.stack([random_boxes(rng, N, K, H, W, dtype=numpy.float32) for _ in range(B)])
    boxes[1, 2, 0] = N  # invalid in its element: must not read the next element's image 0
    x_at = (lambda b: xs[b]) if in_axes[0] == 0 else (lambda b: xs[0])
    boxes_at = (lambda b: boxes[b]) if in_axes[1] == 0 else (lambda b: boxes[0])
    x_arg = xs if in_axes[0] == 0 else xs[0]
    boxes_arg = boxes if in_axes[1] == 0 else boxes[0]
    expected = numpy.stack([forward(x_at(b), boxes_at(b), SIZE, validate=False)
                            for b in range(B)])
    host_calls.clear()
    actual = jax.jit(jax.vmap(lambda x, b: function(x, b, SIZE, validate=False),
                              in_axes=in_axes))(x_arg, boxes_arg)
    assert_same(actual, expected)
    assert host_calls == {f"ps_roi_{op}": 1}

    g = random_features(rng, (K, 2) + SIZE, numpy.float32)

    def grad(x, b):
        return jax.grad(lambda x: jnp.vdot(function(x, b, SIZE, validate=False), g))(x)

    if in_axes[0] is None:
        return  # the gradient of unmapped features is summed over the batch
    expected = numpy.stack([backward(g, boxes_at(b), xs[b].shape, SIZE, validate=False)
                            for b in range(B)])
    host_calls.clear()
    assert_same(jax.jit(jax.vmap(grad, in_axes=in_axes))(x_arg, boxes_arg), expected)
    # linear in the features: the gradient needs no forward pass
    assert host_calls == {f"ps_roi_{op}_backward": 1}


@pytest.mark.parametrize("op", sorted(OPS))
def test_pure_callback_path(op, monkeypatch):
    """The path platforms other than the CPU take (jax.pure_callback), forced on the CPU."""
    monkeypatch.setattr(rj, "buffer_callback", None)
    jax.clear_caches()
    try:
        function, forward, backward = OPS[op]
        x, boxes = inputs(("round trip", op), numpy.float32)
        g = random_features(make_rng("round trip ps g", op), (K, 2) + SIZE, numpy.float32)
        assert_same(jax.jit(lambda x, b: function(x, b, SIZE))(x, boxes), forward(x, boxes, SIZE))
        grad = jax.jit(jax.grad(lambda x, b: jnp.vdot(function(x, b, SIZE), g)))
        assert_same(grad(x, boxes), backward(g, boxes, x.shape, SIZE))
    finally:
        jax.clear_caches()
