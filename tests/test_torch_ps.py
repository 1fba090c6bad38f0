"""roi_cupy.torch's position-sensitive operators: ps_roi_align, ps_roi_pool, PSRoIAlign, PSRoIPool
with autograd, torch.compile and torch's own operator checks. The numbers are those of roi_cupy's
functional ops (pinned against the float64 reference in test_ps_roi_align.py and
test_ps_roi_pool.py); here every dtype and path is compared with them."""
from __future__ import annotations

import numpy
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: roi_cupy.torch is not tested")

import roi_cupy  # noqa: E402
import roi_cupy.torch as rt  # noqa: E402
from conftest import BFLOAT16, TOLERANCE  # noqa: E402

RNG = numpy.random.default_rng(29)
N, H, W = 2, 11, 13
DTYPES = [torch.float16, torch.float32, torch.float64] + ([torch.bfloat16] if BFLOAT16 else [])


def _features(dtype=torch.float64, shape=(N, 2 * 6, H, W)):
    return torch.from_numpy(RNG.uniform(-1, 1, shape)).to(dtype)


def _boxes(k=5, dtype=torch.float64, n=N):
    xy = RNG.uniform(-1, 9, size=(k, 2))
    wh = RNG.uniform(0.5, 7, size=(k, 2))
    index = RNG.integers(0, n, size=(k, 1))
    return torch.from_numpy(numpy.concatenate([index, xy, xy + wh], axis=1)).to(dtype)


def _numpy(t):
    """A torch tensor as NumPy (bfloat16 through ml_dtypes, bit for bit)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BFLOAT16)
    return t.numpy()


# ----------------------------------------------------------------------------- numbers and gradients
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sampling_ratio", [-1, 2, (1, 3)], ids=str)
def test_ps_roi_align_forward_and_gradient_are_roi_cupys(dtype, sampling_ratio):
    x, boxes = _features(dtype).requires_grad_(), _boxes(dtype=torch.float32)
    out = rt.ps_roi_align(x, boxes, (3, 2), 0.5, sampling_ratio)
    assert out.dtype == dtype and out.shape == (5, 2, 3, 2) and out.requires_grad
    expected = roi_cupy.ps_roi_align(_numpy(x), boxes.numpy(), (3, 2), 0.5, sampling_ratio)
    numpy.testing.assert_array_equal(_numpy(out), expected)
    g = torch.from_numpy(RNG.uniform(-1, 1, tuple(out.shape))).to(dtype)
    (grad,) = torch.autograd.grad(out, x, g)
    expected = roi_cupy.ps_roi_align_backward(_numpy(g), boxes.numpy(), x.shape, (3, 2), 0.5,
                                              sampling_ratio)
    assert grad.dtype == dtype
    numpy.testing.assert_array_equal(_numpy(grad), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ps_roi_pool_forward_and_gradient_are_roi_cupys(dtype):
    x, boxes = _features(dtype).requires_grad_(), _boxes(dtype=torch.float32)
    out = rt.ps_roi_pool(x, boxes, (2, 3), 0.5)
    assert out.dtype == dtype and out.shape == (5, 2, 2, 3)
    numpy.testing.assert_array_equal(
        _numpy(out), roi_cupy.ps_roi_pool(_numpy(x), boxes.numpy(), (2, 3), 0.5)
    )
    g = torch.from_numpy(RNG.uniform(-1, 1, tuple(out.shape))).to(dtype)
    (grad,) = torch.autograd.grad(out, x, g)
    expected = roi_cupy.ps_roi_pool_backward(_numpy(g), boxes.numpy(), x.shape, (2, 3), 0.5)
    numpy.testing.assert_array_equal(_numpy(grad), expected)


def test_per_image_boxes_equal_the_index_column_and_boxes_get_no_gradient():
    x = _features().requires_grad_()
    per_image = [_boxes(4)[:, 1:], _boxes(2)[:, 1:]]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1)
                      for i, b in enumerate(per_image)]).requires_grad_()
    for op in (lambda b: rt.ps_roi_align(x, b, (2, 3), 0.5, 2),
               lambda b: rt.ps_roi_pool(x, b, (3, 2), 0.5)):
        listed, stacked = op(per_image), op(rois)
        assert torch.equal(listed, stacked)
        g = torch.randn_like(listed)
        assert torch.equal(torch.autograd.grad(listed, x, g)[0],
                           torch.autograd.grad(stacked, x, g)[0])
    rt.ps_roi_pool(x, rois, 2).sum().backward()
    assert x.grad is not None and rois.grad is None


def test_strided_and_channels_last_inputs_give_the_same_numbers():
    x, boxes = _features(torch.float32), _boxes(dtype=torch.float32)
    for op in (lambda x: rt.ps_roi_align(x, boxes, 2, 0.5, 2),
               lambda x: rt.ps_roi_pool(x, boxes, (1, 3), 0.5)):
        expected = op(x)
        assert torch.equal(op(x.to(memory_format=torch.channels_last)), expected)
        wide = torch.full((N, x.shape[1], H, 2 * W), float("nan"))
        wide[..., ::2] = x
        assert torch.equal(op(wide[..., ::2]), expected)


# ----------------------------------------------------------------------------- torch's own checks
@pytest.mark.parametrize("sampling_ratio", [-1, 2, (1, 3)], ids=str)
def test_gradcheck_ps_roi_align(sampling_ratio):
    x, boxes = _features(shape=(N, 6, 8, 9)).requires_grad_(), _boxes(4)
    fn = lambda x: rt.ps_roi_align(x, boxes, (3, 2), 0.5, sampling_ratio)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


def test_gradcheck_ps_roi_pool_with_boxes_past_the_map():
    """Boxes past the bottom right included: the gradient is that of the forward pass (where
    torchvision's own ps_roi_pool fails this check)."""
    x = _features(shape=(N, 6, 8, 9)).requires_grad_()
    boxes = torch.cat([_boxes(4), torch.tensor([[1.0, 3.0, 2.0, 14.0, 12.0]],
                                               dtype=torch.float64)])
    assert torch.autograd.gradcheck(lambda x: rt.ps_roi_pool(x, boxes, (3, 2), 1.0), (x,))


def test_gradgradcheck_both():
    x, boxes = _features(shape=(1, 4, 7, 8)).requires_grad_(), _boxes(3, n=1)
    assert torch.autograd.gradgradcheck(lambda x: rt.ps_roi_align(x, boxes, 2, 1.0, 2), (x,))
    assert torch.autograd.gradgradcheck(lambda x: rt.ps_roi_pool(x, boxes, 2, 1.0), (x,))


def test_opcheck_every_operator():
    x, boxes = _features().requires_grad_(), _boxes()
    per_image = [_boxes(3)[:, 1:], _boxes(1)[:, 1:]]
    ops = torch.ops.roi_cupy
    g = torch.randn(5, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    shape = list(x.shape)
    cases = [
        (ops.ps_roi_align, (x, [boxes], False, 3, 2, 0.5, [2, 2], True)),
        (ops.ps_roi_align, (x, per_image, True, 2, 3, 1.0, [-1, 3], False)),
        (ops.ps_roi_align_backward, (g, [boxes], False, shape, 0.5, [2, 1])),
        (ops.ps_roi_pool, (x, [boxes], False, 3, 2, 0.5, True)),
        (ops.ps_roi_pool, (x, per_image, True, 1, 6, 1.0, False)),
        (ops.ps_roi_pool_backward, (g, [boxes], False, shape, 0.5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_forward_and_backward():
    x, boxes = _features().requires_grad_(), _boxes()

    def loss(x, boxes):
        return ((rt.ps_roi_align(x, boxes, (3, 2), 0.5, 2) ** 2).sum()
                + rt.ps_roi_pool(x, boxes, (2, 3), 0.5).sum())

    compiled = torch.compile(loss, fullgraph=True)
    eager = loss(x, boxes)
    got = compiled(x, boxes)
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(eager, x)[0],
                               rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- arguments, modules
def test_bad_arguments_are_named():
    x, boxes = _features(), _boxes()
    with pytest.raises(ValueError, match=r"input must have a channel count C that is a multiple "
                                         r"of PH \* PW = 9 for output_size 3 .* got C = 12"):
        rt.ps_roi_align(x, boxes, 3)
    with pytest.raises(ValueError, match=r"PH \* PW = 8 for output_size \(2, 4\)"):
        rt.ps_roi_pool(x, boxes, (2, 4))
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got numpy.ndarray"):
        rt.ps_roi_pool(x.numpy(), boxes, 2)
    with pytest.raises(TypeError, match=r"boxes must be a torch.Tensor\[K, 5\] or a list"):
        rt.ps_roi_align(x, boxes.numpy(), 2)
    with pytest.raises(ValueError, match=r"boxes' batch index must be an integer in \[0, 2\)"):
        rt.ps_roi_align(x, torch.tensor([[2.0, 0, 0, 4, 4]], dtype=torch.float64), 2)
    invalid = torch.tensor([[5.0, 0, 0, 4, 4]], dtype=torch.float64)
    assert torch.equal(rt.ps_roi_pool(x, invalid, 2, validate=False),
                       torch.zeros(1, 3, 2, 2, dtype=x.dtype))


def test_modules_and_their_repr():
    x, boxes = _features(), _boxes()
    align = rt.PSRoIAlign((3, 2), 0.5, 2)
    assert torch.equal(align(x, boxes), rt.ps_roi_align(x, boxes, (3, 2), 0.5, 2))
    assert repr(align) == "PSRoIAlign(output_size=(3, 2), spatial_scale=0.5, sampling_ratio=2)"
    pool = rt.PSRoIPool(2, 0.25)
    assert torch.equal(pool(x, boxes), rt.ps_roi_pool(x, boxes, 2, 0.25))
    assert repr(pool) == "PSRoIPool(output_size=2, spatial_scale=0.25)"
    invalid = torch.tensor([[7.0, 0, 0, 4, 4]], dtype=torch.float64)
    with pytest.raises(ValueError, match="batch index"):
        pool(x, invalid)
    quiet = (rt.PSRoIAlign(2, 1.0, 2, validate=False), rt.PSRoIPool(2, 1.0, validate=False))
    for module in quiet:
        assert torch.equal(module(x, invalid), torch.zeros(1, 3, 2, 2, dtype=x.dtype))


# ----------------------------------------------------------------------------- CUDA tensors
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_tensors_match_the_cpu(dtype):
    from roi_cupy import _cuda

    ok, why = _cuda.available()
    if not (ok and torch.cuda.is_available()):
        pytest.skip(f"needs a CUDA device visible to torch and CuPy: {why or 'torch sees none'}")
    x, boxes = _features(dtype).requires_grad_(), _boxes(dtype=torch.float32)
    xc = x.detach().cuda().requires_grad_()
    tol = TOLERANCE[BFLOAT16 if dtype == torch.bfloat16 else numpy.dtype(str(dtype)[6:])]
    for op in (lambda x, b: rt.ps_roi_align(x, b, (3, 2), 0.5, 2),
               lambda x, b: rt.ps_roi_pool(x, b, (2, 3), 0.5)):
        out, outc = op(x, boxes), op(xc, boxes.cuda())
        assert outc.device == xc.device and outc.dtype == dtype
        torch.testing.assert_close(outc.cpu(), out, rtol=tol, atol=tol)
        g = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(outc, xc, g.cuda())[0].cpu(),
                                   torch.autograd.grad(out, x, g)[0], rtol=tol, atol=tol)
