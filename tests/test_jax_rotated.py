"""roi_cupy.jax's roi_align_rotated: roi_cupy's numbers bit for bit eagerly, under jit, grad and
vmap (one host call per vmapped call); padding and invalid boxes; argument errors. float64 runs
inside ``jax.enable_x64`` only."""
from __future__ import annotations

import contextlib

import numpy
import pytest
from conftest import (
    BFLOAT16,
    compute_dtype,
    make_rng,
    per_image,
    random_features,
    random_rotated_boxes,
)

jax = pytest.importorskip("jax", reason="jax is not installed: roi_cupy.jax is not tested")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import roi_cupy.jax as rj  # noqa: E402
from roi_cupy import ops  # noqa: E402

N, C, H, W = 2, 3, 11, 13
K = 8
B = 3
FEATURE_DTYPES = [numpy.dtype(d) for d in (numpy.float16, BFLOAT16, numpy.float32, numpy.float64)
                  if d is not None]


def dtype_context(dtype):
    """float64 needs JAX's x64 mode; the other dtypes run without it."""
    return jax.enable_x64(True) if numpy.dtype(dtype) == numpy.float64 else contextlib.nullcontext()


def inputs(key, dtype, n=N, k=K, shape=(C, H, W), scale=1.0):
    """Random features [n, *shape] of ``dtype`` and valid rotated boxes [k, 6]."""
    rng = make_rng("jax rotated", key, numpy.dtype(dtype).name)
    x = random_features(rng, (n,) + shape, dtype)
    boxes = random_rotated_boxes(rng, n, k, shape[1], shape[2], scale, compute_dtype(dtype))
    return x, boxes


def assert_same(actual, expected):
    """Bit for bit: the adapter runs roi_cupy's own ops on the same values."""
    actual = numpy.asarray(actual)
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"shape {actual.shape}, expected {expected.shape}"
    assert numpy.array_equal(actual, expected, equal_nan=True), (
        f"max abs difference {numpy.nanmax(numpy.abs(actual.astype(float) - expected)):.3g}"
    )


@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
@pytest.mark.parametrize("aligned, clockwise", [(True, False), (False, True)])
@pytest.mark.parametrize("sampling_ratio", [-1, 2, (3, -1)], ids=str)
def test_forward_and_vjp(dtype, aligned, clockwise, sampling_ratio):
    x, boxes = inputs(("vjp", aligned, clockwise, sampling_ratio), dtype, scale=0.5)
    args = ((3, 2), 0.5, sampling_ratio, aligned, clockwise)
    g = random_features(make_rng("rotated g", sampling_ratio), (K, C, 3, 2), dtype)
    expected = ops.roi_align_rotated(x, boxes, *args)
    assert numpy.abs(expected.astype(numpy.float64)).max() > 0.1
    with dtype_context(dtype):
        out, vjp = jax.vjp(lambda x, b: rj.roi_align_rotated(x, b, *args), jnp.asarray(x),
                           jnp.asarray(boxes))
        assert isinstance(out, jax.Array)
        assert_same(out, expected)
        grad_x, grad_boxes = vjp(jnp.asarray(g))
        assert_same(grad_x, ops.roi_align_rotated_backward(g, boxes, x.shape, *args))
        assert_same(grad_boxes, numpy.zeros_like(boxes))


def test_per_image_box_list():
    x, boxes = inputs("list", numpy.float32)
    boxes[:, 0] = [0, 1, 1, 0, 1, 1, 0, 0]
    listed = per_image(boxes, N)
    stacked = numpy.concatenate([numpy.insert(b, 0, i, axis=1) for i, b in enumerate(listed)])
    out = rj.roi_align_rotated(jnp.asarray(x), [jnp.asarray(b) for b in listed], 2)
    assert_same(out, ops.roi_align_rotated(x, stacked.astype(numpy.float32), 2))


@pytest.mark.parametrize("sampling_ratio", [-1, 2], ids=str)
def test_check_grads(sampling_ratio):
    """Finite differences in float64 (continuous boxes keep samples off pixel boundaries)."""
    x, boxes = inputs(("check grads", sampling_ratio), numpy.float64, shape=(2, 5, 6))
    with jax.enable_x64(True):
        boxes = jnp.asarray(boxes)

        def f(x):
            return rj.roi_align_rotated(x, boxes, (2, 3), 1.0, sampling_ratio, True, True)

        check_grads(f, (jnp.asarray(x),), order=1, modes=["rev"])


def test_jit_grad_and_padding():
    """Under jit, with rows of batch index -1 padding K (validate=False): the numbers of the
    unpadded boxes, zeros for the padding, the same gradient."""
    x, boxes = inputs("jit", numpy.float32)
    padded = numpy.concatenate([boxes, numpy.tile([[-1.0, 2, 2, 4, 4, 30]], (5, 1))])
    padded = padded.astype(numpy.float32)
    g = random_features(make_rng("jit g"), (K + 5, C, 4, 4), numpy.float32)
    args = (4, 1.0, 2, True, False)
    f = jax.jit(lambda x, b: rj.roi_align_rotated(x, b, *args, validate=False))
    out = numpy.asarray(f(x, padded))
    assert_same(out[:K], ops.roi_align_rotated(x, boxes, *args))
    assert not out[K:].any()
    grad = jax.jit(jax.grad(lambda x, b: jnp.vdot(rj.roi_align_rotated(x, b, *args,
                                                                        validate=False), g)))
    assert_same(grad(x, padded), ops.roi_align_rotated_backward(g[:K], boxes, x.shape, *args))
    with pytest.raises(ValueError, match=r"batch index must be an integer in \[0, 2\)"):
        rj.roi_align_rotated(jnp.asarray(x), jnp.asarray(padded), 4)  # eagerly, validate=True


@pytest.mark.parametrize("in_axes", [(0, 0), (None, 0), (0, None)], ids=str)
def test_vmap_is_one_call_equal_to_a_loop(in_axes, monkeypatch):
    rng = make_rng("rotated vmap", in_axes)
    xs = random_features(rng, (B, N, C, H, W), numpy.float32)
    boxes = numpy.stack([random_rotated_boxes(rng, N, K, H, W, dtype=numpy.float32)
                         for _ in range(B)])
    boxes[1, 2, 0] = N  # invalid in its own element: must not read element 2's image 0
    x_at = (lambda b: xs[b]) if in_axes[0] == 0 else (lambda b: xs[0])
    boxes_at = (lambda b: boxes[b]) if in_axes[1] == 0 else (lambda b: boxes[0])
    expected = numpy.stack(
        [ops.roi_align_rotated(x_at(b), boxes_at(b), 3, validate=False) for b in range(B)]
    )
    calls = []
    original = ops.roi_align_rotated
    monkeypatch.setattr(
        ops, "roi_align_rotated", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    x_arg = xs if in_axes[0] == 0 else xs[0]
    boxes_arg = boxes if in_axes[1] == 0 else boxes[0]
    f = jax.vmap(lambda x, b: rj.roi_align_rotated(x, b, 3, validate=False), in_axes=in_axes)
    assert_same(f(x_arg, boxes_arg), expected)
    assert len(calls) == 1


def test_vmap_of_grad():
    rng = make_rng("rotated vmap grad")
    xs = random_features(rng, (B, N, C, H, W), numpy.float32)
    boxes = numpy.stack([random_rotated_boxes(rng, N, K, H, W, dtype=numpy.float32)
                         for _ in range(B)])
    g = random_features(rng, (K, C, 3, 3), numpy.float32)

    def grad(x, b):
        return jax.grad(lambda x: jnp.vdot(rj.roi_align_rotated(x, b, 3, 1.0, 2), g))(x)

    expected = numpy.stack([ops.roi_align_rotated_backward(g, boxes[b], xs[b].shape, 3, 1.0, 2)
                            for b in range(B)])
    assert_same(jax.jit(jax.vmap(grad))(xs, boxes), expected)


def test_argument_errors():
    x, boxes = inputs("errors", numpy.float32)
    with pytest.raises(ValueError, match=r"boxes must have shape \[K, 6\]"):
        rj.roi_align_rotated(jnp.asarray(x), jnp.asarray(boxes[:, :5]), 2)
    with pytest.raises(ValueError, match=r"boxes\[0\] must have shape \[L, 5\]"):
        rj.roi_align_rotated(jnp.asarray(x), [jnp.asarray(boxes[:2, 1:5])] * N, 2)
    with pytest.raises(TypeError, match="clockwise must be a bool"):
        rj.roi_align_rotated(jnp.asarray(x), jnp.asarray(boxes), 2, clockwise=0)
    bad = boxes.copy()
    bad[3, 5] = numpy.nan
    with pytest.raises(ValueError, match="boxes must be finite, got row 3"):
        rj.roi_align_rotated(jnp.asarray(x), jnp.asarray(bad), 2)
    out = numpy.asarray(jax.jit(lambda x, b: rj.roi_align_rotated(x, b, 2))(x, bad))
    assert not out[3].any() and out.any()
