"""roi_cupy.torch's roi_align_rotated: the torch operators roi_cupy::roi_align_rotated and
roi_cupy::roi_align_rotated_backward, autograd, opcheck, gradcheck, torch.compile and the module.
The numbers are those of roi_cupy.roi_align_rotated (pinned against the float64 reference in
test_roi_align_rotated.py); here every dtype is compared with them bit for bit."""
from __future__ import annotations

import numpy
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: roi_cupy.torch is not tested")

import roi_cupy  # noqa: E402
import roi_cupy.torch as rt  # noqa: E402
from conftest import BFLOAT16, make_rng, random_rotated_boxes  # noqa: E402

RNG = make_rng("torch rotated")
N, C, H, W = 2, 3, 10, 12
DTYPES = [torch.float16, torch.float32, torch.float64] + ([torch.bfloat16] if BFLOAT16 else [])
CASES = [
    dict(output_size=(3, 2), spatial_scale=0.5, sampling_ratio=2, aligned=True, clockwise=False),
    dict(output_size=4, spatial_scale=1.0, sampling_ratio=-1, aligned=False, clockwise=True),
    dict(output_size=(2, 3), spatial_scale=0.75, sampling_ratio=(0, 2), aligned=True,
         clockwise=True),
]


def _features(dtype=torch.float64, shape=(N, C, H, W)):
    return torch.from_numpy(RNG.uniform(-1, 1, shape)).to(dtype)


def _boxes(k=6, dtype=torch.float64, n=N, scale=1.0):
    return torch.from_numpy(random_rotated_boxes(RNG, n, k, H, W, scale)).to(dtype)


def _numpy(t):
    """A torch tensor as NumPy (bfloat16 through ml_dtypes, bit for bit)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BFLOAT16)
    return t.numpy()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_gradient_are_roi_cupys(dtype, case):
    kwargs = CASES[case]
    x = _features(dtype).requires_grad_()
    boxes = _boxes(dtype=torch.float32, scale=kwargs["spatial_scale"])
    out = rt.roi_align_rotated(x, boxes, **kwargs)
    assert out.dtype == dtype and out.requires_grad
    expected = roi_cupy.roi_align_rotated(_numpy(x), boxes.numpy(), **kwargs)
    assert numpy.abs(expected.astype(numpy.float64)).max() > 0.1
    numpy.testing.assert_array_equal(_numpy(out), expected)
    g = torch.from_numpy(RNG.uniform(-1, 1, tuple(out.shape))).to(dtype)
    (grad,) = torch.autograd.grad(out, x, g)
    rest = {k: v for k, v in kwargs.items() if k != "output_size"}
    expected = roi_cupy.roi_align_rotated_backward(
        _numpy(g), boxes.numpy(), x.shape, kwargs["output_size"], **rest
    )
    assert grad.dtype == dtype
    numpy.testing.assert_array_equal(_numpy(grad), expected)


def test_per_image_boxes_equal_the_index_column():
    x = _features().requires_grad_()
    per_image = [_boxes(4)[:, 1:], _boxes(2)[:, 1:]]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1)
                      for i, b in enumerate(per_image)])
    listed = rt.roi_align_rotated(x, per_image, 3, 0.5, 2)
    stacked = rt.roi_align_rotated(x, rois, 3, 0.5, 2)
    assert torch.equal(listed, stacked)
    g = torch.randn_like(listed)
    assert torch.equal(torch.autograd.grad(listed, x, g)[0], torch.autograd.grad(stacked, x, g)[0])


def test_boxes_get_no_gradient_and_strides_do_not_matter():
    x, boxes = _features().requires_grad_(), _boxes().requires_grad_()
    out = rt.roi_align_rotated(x, boxes, 2, sampling_ratio=2)
    out.sum().backward()
    assert x.grad is not None and boxes.grad is None
    channels_last = x.detach().to(memory_format=torch.channels_last)
    assert torch.equal(rt.roi_align_rotated(channels_last, boxes.detach(), 2, sampling_ratio=2),
                       out.detach())


@pytest.mark.parametrize("aligned, clockwise", [(True, False), (False, True)])
@pytest.mark.parametrize("sampling_ratio", [-1, 2, (1, 3)], ids=str)
def test_gradcheck(aligned, clockwise, sampling_ratio):
    x, boxes = _features(shape=(N, 2, 8, 9)).requires_grad_(), _boxes(5)

    def fn(x):
        return rt.roi_align_rotated(x, boxes, (3, 2), 0.5, sampling_ratio, aligned, clockwise)

    assert torch.autograd.gradcheck(fn, (x,))


def test_gradgradcheck():
    x, boxes = _features(shape=(1, 2, 7, 8)).requires_grad_(), _boxes(3, n=1)
    assert torch.autograd.gradgradcheck(
        lambda x: rt.roi_align_rotated(x, boxes, 2, 1.0, 2, True, True), (x,)
    )


def test_opcheck_both_operators():
    x, boxes = _features().requires_grad_(), _boxes()
    per_image = [_boxes(3)[:, 1:], _boxes(1)[:, 1:]]
    ops = torch.ops.roi_cupy
    g = torch.randn(6, C, 3, 2, dtype=torch.float64)
    cases = [
        (ops.roi_align_rotated, (x, [boxes], False, 3, 2, 0.5, [2, 2], True, False, True)),
        (ops.roi_align_rotated, (x, per_image, True, 2, 2, 1.0, [-1, 3], False, True, False)),
        (ops.roi_align_rotated_backward,
         (g.requires_grad_(), [boxes], False, [N, C, H, W], 0.5, [2, 1], True, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_forward_and_backward():
    x, boxes = _features().requires_grad_(), _boxes()

    def loss(x, boxes):
        return (rt.roi_align_rotated(x, boxes, 3, 0.5, 2, True, True) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager = loss(x, boxes)
    got = compiled(x, boxes)
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(eager, x)[0],
                               rtol=1e-12, atol=1e-15)


def test_module_arguments_and_repr():
    x, boxes = _features(), _boxes()
    module = rt.RoIAlignRotated((3, 2), 0.5, 2, clockwise=True)
    assert torch.equal(module(x, boxes), rt.roi_align_rotated(x, boxes, (3, 2), 0.5, 2, True, True))
    assert repr(module) == ("RoIAlignRotated(output_size=(3, 2), spatial_scale=0.5, "
                            "sampling_ratio=2, aligned=True, clockwise=True)")
    invalid = torch.tensor([[0.0, 2, 2, 4, 4, float("nan")]], dtype=torch.float64)
    with pytest.raises(ValueError, match="boxes must be finite"):
        module(x, invalid)
    quiet = rt.RoIAlignRotated(2, 1.0, 2, validate=False)
    assert torch.equal(quiet(x, invalid), torch.zeros(1, C, 2, 2, dtype=x.dtype))
    with pytest.raises(TypeError, match=r"boxes must be a torch.Tensor\[K, 6\] or a list of "
                                        r"torch.Tensor\[L, 5\]"):
        rt.roi_align_rotated(x, boxes.numpy(), 2)
    with pytest.raises(ValueError, match=r"boxes must have shape \[K, 6\]"):
        rt.roi_align_rotated(x, boxes[:, :5], 2)
    with pytest.raises(TypeError, match="clockwise must be a bool"):
        rt.roi_align_rotated(x, boxes, 2, clockwise="yes")
