"""roi_cupy.torch: torch operators with autograd, torch.compile, modules, and the babilim layers
training through them. The numbers are those of roi_cupy's functional ops (pinned against the
float64 reference elsewhere); here every dtype and device path is compared with them."""
from __future__ import annotations

import math
import os

import numpy
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: roi_cupy.torch is not tested")

import roi_cupy  # noqa: E402
import roi_cupy.torch as rt  # noqa: E402
from conftest import BFLOAT16, TOLERANCE  # noqa: E402

RNG = numpy.random.default_rng(11)
N, C, H, W = 2, 3, 12, 14
DTYPES = [torch.float16, torch.float32, torch.float64] + ([torch.bfloat16] if BFLOAT16 else [])


def _features(dtype=torch.float64, shape=(N, C, H, W)):
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


ALIGN_CASES = [
    dict(output_size=(3, 2), spatial_scale=0.5, sampling_ratio=2, aligned=True),
    dict(output_size=4, spatial_scale=1.0, sampling_ratio=-1, aligned=False),
    dict(output_size=(2, 5), spatial_scale=0.75, sampling_ratio=0, aligned=True),
]


# ----------------------------------------------------------------------------- numbers and gradients
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(ALIGN_CASES)))
def test_roi_align_forward_and_gradient_are_roi_cupys(dtype, case):
    kwargs = ALIGN_CASES[case]
    x, boxes = _features(dtype).requires_grad_(), _boxes(dtype=torch.float32)
    out = rt.roi_align(x, boxes, **kwargs)
    assert out.dtype == dtype and out.requires_grad
    expected = roi_cupy.roi_align(_numpy(x), boxes.numpy(), **kwargs)
    numpy.testing.assert_array_equal(_numpy(out), expected)
    g = torch.from_numpy(RNG.uniform(-1, 1, tuple(out.shape))).to(dtype)
    (grad,) = torch.autograd.grad(out, x, g)
    size = kwargs["output_size"]
    rest = {k: v for k, v in kwargs.items() if k != "output_size"}
    expected = roi_cupy.roi_align_backward(_numpy(g), boxes.numpy(), x.shape, size, **rest)
    assert grad.dtype == dtype
    numpy.testing.assert_array_equal(_numpy(grad), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roi_pool_forward_and_gradient_are_roi_cupys(dtype):
    x, boxes = _features(dtype).requires_grad_(), _boxes(dtype=torch.float32)
    out = rt.roi_pool(x, boxes, (3, 2), 0.5)
    expected, indices = roi_cupy.roi_pool(_numpy(x), boxes.numpy(), (3, 2), 0.5, return_indices=True)
    numpy.testing.assert_array_equal(_numpy(out), expected)
    g = torch.from_numpy(RNG.uniform(-1, 1, tuple(out.shape))).to(dtype)
    (grad,) = torch.autograd.grad(out, x, g)
    expected = roi_cupy.roi_pool_backward(_numpy(g), boxes.numpy(), indices, x.shape)
    numpy.testing.assert_array_equal(_numpy(grad), expected)


def test_per_image_boxes_equal_the_index_column():
    x = _features().requires_grad_()
    per_image = [_boxes(4)[:, 1:], _boxes(2)[:, 1:]]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1)
                      for i, b in enumerate(per_image)])
    for op in (lambda b: rt.roi_align(x, b, 3, 0.5, 2, True), lambda b: rt.roi_pool(x, b, 3, 0.5)):
        listed, stacked = op(per_image), op(rois)
        assert torch.equal(listed, stacked)
        g = torch.randn_like(listed)
        assert torch.equal(torch.autograd.grad(listed, x, g)[0], torch.autograd.grad(stacked, x, g)[0])


def test_boxes_get_no_gradient():
    x, boxes = _features().requires_grad_(), _boxes().requires_grad_()
    rt.roi_align(x, boxes, 2).sum().backward()
    assert x.grad is not None and boxes.grad is None


def test_channels_last_and_strided_inputs_give_the_same_numbers():
    x, boxes = _features(torch.float32), _boxes(dtype=torch.float32)
    expected = rt.roi_align(x, boxes, 3, 0.5, 2, True)
    assert torch.equal(rt.roi_align(x.to(memory_format=torch.channels_last), boxes, 3, 0.5, 2, True),
                       expected)
    wide = torch.full((N, C, H, 2 * W), float("nan"))
    wide[..., ::2] = x
    assert torch.equal(rt.roi_align(wide[..., ::2], boxes, 3, 0.5, 2, True), expected)


@pytest.mark.parametrize("backend", ["numpy", "emulator"])
def test_roi_pool_of_channels_last_features_and_its_gradient(backend):
    """A channels_last tensor pools to the bits of the contiguous one, with the same gradient,
    on the NumPy backend and on the CUDA kernels (emulated), which read it in place."""
    if backend == "emulator":
        from roi_cupy import _emulator

        ok, why = _emulator.available()
        if not ok:
            pytest.skip(f"the emulator is not available: {why}")
    x, boxes = _features(torch.float32), _boxes(dtype=torch.float32)
    g = torch.from_numpy(RNG.uniform(-1, 1, (len(boxes), C, 3, 2))).to(torch.float32)
    results = []
    with roi_cupy.use_backend(backend):
        for features in (x, x.to(memory_format=torch.channels_last)):
            features = features.detach().requires_grad_()
            out = rt.roi_pool(features, boxes, (3, 2), 0.5)
            results.append((out, *torch.autograd.grad(out, features, g)))
    (out, grad), (nhwc_out, nhwc_grad) = results
    assert torch.equal(nhwc_out, out) and torch.equal(nhwc_grad, grad)


def test_expanded_gradients_are_read_through_their_strides():
    x, boxes = _features().requires_grad_(), _boxes()
    out = rt.roi_align(x, boxes, 3, 1.0, 2, False)
    (from_sum,) = torch.autograd.grad(out.sum(), x, retain_graph=True)  # a stride-0 grad_output
    (from_ones,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(from_sum, from_ones)


# ----------------------------------------------------------------------------- torch's own checks
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 2, (1, 3)], ids=str)
def test_gradcheck_roi_align(aligned, sampling_ratio):
    x, boxes = _features(shape=(N, 2, 8, 9)).requires_grad_(), _boxes(4)
    fn = lambda x: rt.roi_align(x, boxes, (3, 2), 0.5, sampling_ratio, aligned)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


def test_gradgradcheck_roi_align():
    x, boxes = _features(shape=(1, 2, 7, 8)).requires_grad_(), _boxes(3, n=1)
    assert torch.autograd.gradgradcheck(lambda x: rt.roi_align(x, boxes, 2, 1.0, 2, True), (x,))


def test_gradcheck_roi_pool():
    x, boxes = _features(shape=(N, 2, 8, 9)).requires_grad_(), _boxes(4)
    assert torch.autograd.gradcheck(lambda x: rt.roi_pool(x, boxes, (3, 2), 0.5), (x,))


def test_opcheck_every_operator():
    x, boxes, per_image = _features().requires_grad_(), _boxes(), [_boxes(3)[:, 1:], _boxes(1)[:, 1:]]
    ops = torch.ops.roi_cupy
    g = torch.randn(5, C, 3, 2, dtype=torch.float64)
    _, indices = ops.roi_pool(x.detach(), [boxes], False, 3, 2, 0.5, True)
    cases = [
        (ops.roi_align, (x, [boxes], False, 3, 2, 0.5, [2, 2], True, True)),
        (ops.roi_align, (x, per_image, True, 2, 2, 1.0, [-1, 3], False, False)),
        (ops.roi_align_backward,
         (g.requires_grad_(), [boxes], False, [N, C, H, W], 0.5, [2, 1], True)),
        (ops.roi_pool, (x, [boxes], False, 3, 2, 0.5, True)),
        (ops.roi_pool_backward, (g.detach(), [boxes], False, indices, [N, C, H, W])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_forward_and_backward():
    x, boxes = _features().requires_grad_(), _boxes()

    def loss(x, boxes):
        return (rt.roi_align(x, boxes, 3, 0.5, 2, True) ** 2).sum() + rt.roi_pool(x, boxes, 2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager = loss(x, boxes)
    got = compiled(x, boxes)
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(eager, x)[0],
                               rtol=1e-12, atol=1e-15)


def test_compile_with_dynamic_shapes_and_a_scale_from_them():
    """A symbolic spatial_scale (dynamic=True, or one computed from shapes) is traced too."""
    boxes = _boxes(dtype=torch.float32)
    for module in (rt.RoIAlign(2, 0.5, 2), rt.RoIPool(2, 0.5)):
        x = _features(torch.float32)
        assert torch.equal(torch.compile(module, fullgraph=True, dynamic=True)(x, boxes),
                           module(x, boxes))
    scaled = torch.compile(
        lambda x, image: rt.roi_align(x, boxes, 2, x.shape[-1] / image.shape[-1], 2, True),
        fullgraph=True,
    )
    image = torch.zeros(1, 1, 1, 56)
    for width in (14, 20, 28):  # the second call recompiles with the width as a symbol
        x = _features(torch.float32, (N, C, H, width))
        assert torch.equal(scaled(x, image), rt.roi_align(x, boxes, 2, width / 56, 2, True))


# ----------------------------------------------------------------------------- arguments
def test_bad_arguments_are_named():
    x, boxes = _features(), _boxes()
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got numpy.ndarray"):
        rt.roi_align(x.numpy(), boxes, 2)
    with pytest.raises(TypeError, match=r"boxes must be a torch.Tensor\[K, 5\] or a list"):
        rt.roi_pool(x, boxes.numpy(), 2)
    with pytest.raises(TypeError, match=r"or a list .* got a list holding builtins.list"):
        rt.roi_align(x, boxes.tolist(), 2)
    with pytest.raises(ValueError, match="output_size must be positive"):
        rt.roi_align(x, boxes, 0)
    with pytest.raises(TypeError, match="aligned must be a bool"):
        rt.roi_align(x, boxes, 2, aligned="False")
    with pytest.raises(ValueError, match=r"boxes' batch index must be an integer in \[0, 2\)"):
        rt.roi_align(x, torch.tensor([[2.0, 0, 0, 4, 4]], dtype=torch.float64), 2)
    invalid = torch.tensor([[5.0, 0, 0, 4, 4]], dtype=torch.float64)
    assert torch.equal(rt.roi_pool(x, invalid, 2, validate=False), torch.zeros(1, C, 2, 2,
                                                                             dtype=x.dtype))


# ----------------------------------------------------------------------------- modules
def test_modules_and_their_repr():
    x, boxes = _features(), _boxes()
    align = rt.RoIAlign((3, 2), 0.5, 2, aligned=True)
    assert torch.equal(align(x, boxes), rt.roi_align(x, boxes, (3, 2), 0.5, 2, True))
    assert repr(align) == "RoIAlign(output_size=(3, 2), spatial_scale=0.5, sampling_ratio=2, aligned=True)"
    pool = rt.RoIPool(2, 0.25)
    assert torch.equal(pool(x, boxes), rt.roi_pool(x, boxes, 2, 0.25))
    assert repr(pool) == "RoIPool(output_size=2, spatial_scale=0.25)"
    invalid = torch.tensor([[7.0, 0, 0, 4, 4]], dtype=torch.float64)
    with pytest.raises(ValueError, match="batch index"):
        align(x, invalid)
    quiet = (rt.RoIAlign(2, 1.0, 2, validate=False), rt.RoIPool(2, 1.0, validate=False),
             rt.MultiScaleRoIAlign(["p"], 2, 2, validate=False))
    assert torch.equal(quiet[0](x, invalid), torch.zeros(1, C, 2, 2, dtype=x.dtype))
    assert torch.equal(quiet[1](x, invalid), torch.zeros(1, C, 2, 2, dtype=x.dtype))
    far = [torch.tensor([[0.0, 0, 4, 4]], dtype=torch.float64)] * (N - 1) + [
        torch.tensor([[float("nan"), 0, 4, 4]], dtype=torch.float64)]
    assert quiet[2]({"p": x}, far, [(H, W)])[-1].abs().sum() == 0


def _pyramid():
    """Three FPN levels of an 64 x 96 image (strides 4, 8, 16) and one map that is not pooled."""
    shapes = {"p2": (16, 24), "skipped": (11, 13), "p3": (8, 12), "p4": (4, 6)}
    return {name: _features(torch.float32, (2, C) + hw).requires_grad_() for name, hw in shapes.items()}


def _level_boxes(sizes, image=(64, 96)):
    """Square boxes of the given sides inside the image."""
    rows = []
    for side in sizes:
        x1 = RNG.uniform(0, image[1] - side)
        y1 = RNG.uniform(0, image[0] - side)
        rows.append([x1, y1, x1 + side, y1 + side])
    return torch.tensor(rows, dtype=torch.float32)


def test_multi_scale_roi_align_pools_each_box_from_its_level():
    x = _pyramid()
    # level = floor(4 + log2(side / 28)), clamped to 2..4: sides 8 and 10 land on 2, 15 and 20
    # on 3, 30, 45 and 60 on 4, so every level is used.
    boxes = [_level_boxes([10, 60, 30, 15]), _level_boxes([45, 8, 20])]
    pooler = rt.MultiScaleRoIAlign(["p2", "p3", "p4"], (3, 2), 2, canonical_scale=28)
    out = pooler(x, boxes, [(64, 96), (60, 90)])
    assert pooler.scales == [0.25, 0.125, 0.0625]
    assert out.shape == (7, C, 3, 2)
    maps = [x["p2"], x["p3"], x["p4"]]
    for image, per_image in enumerate(boxes):
        for j, box in enumerate(per_image):
            side = math.sqrt(float((box[2] - box[0]) * (box[3] - box[1])))
            level = min(max(math.floor(4 + math.log2(side / 28) + 1e-6), 2), 4) - 2
            row = torch.cat([torch.tensor([float(image)]), box])[None]
            expected = rt.roi_align(maps[level], row, (3, 2), 0.25 / 2**level, 2)
            k = j + (len(boxes[0]) if image else 0)
            assert torch.equal(out[k : k + 1], expected), (image, j, level)
    out.sum().backward()
    assert all(x[name].grad is not None and x[name].grad.abs().sum() > 0 for name in ("p2", "p3", "p4"))
    assert x["skipped"].grad is None
    assert repr(pooler) == "MultiScaleRoIAlign(featmap_names=['p2', 'p3', 'p4'], output_size=(3, 2), sampling_ratio=2)"


def test_multi_scale_roi_align_with_one_level_and_canonical_arguments():
    x = _pyramid()
    boxes = [_level_boxes([10, 40]), _level_boxes([20])]
    single = rt.MultiScaleRoIAlign(["p3"], 2, -1)(x, boxes, [(64, 96)])
    assert torch.equal(single, rt.roi_align(x["p3"], boxes, 2, 0.125, -1))
    # canonical_scale 20 at level 2: a side of 20 lands on level 2, 40 on 3, 100 on 4 (clamped).
    pooler = rt.MultiScaleRoIAlign(["p2", "p3", "p4"], 2, 2, canonical_scale=20, canonical_level=2)
    sized = [_level_boxes([20, 40]), torch.tensor([[-2.0, -20.0, 98.0, 80.0]])]
    out = pooler(x, sized, [(64, 96), (64, 96)])
    assert torch.equal(out[1:2], rt.roi_align(x["p3"], torch.cat([torch.zeros(1, 1), sized[0][1:]], 1),
                                              2, 0.125, 2))
    assert torch.equal(out[2:3], rt.roi_align(x["p4"], torch.cat([torch.ones(1, 1), sized[1]], 1),
                                              2, 0.0625, 2))
    with pytest.raises(ValueError, match="image_shapes must hold"):
        rt.MultiScaleRoIAlign(["p2"], 2, 2)(x, boxes, [])


# ----------------------------------------------------------------------------- babilim layers
def test_babilim_layer_gradients_are_the_functional_ones():
    x = _features(torch.float32).requires_grad_()
    rois = torch.stack([_boxes(3, torch.float32)[:, 1:], _boxes(3, torch.float32)[:, 1:]])
    out = roi_cupy.RoiAlign((3, 2), 0.5, 2)(roi_cupy.Tensor(data=x, trainable=True),
                                            roi_cupy.Tensor(data=rois))
    assert isinstance(out, roi_cupy.Tensor) and out.native.shape == (2, 3, C, 3, 2)
    g = torch.randn_like(out.native)
    (grad,) = torch.autograd.grad(out.native, x, g)
    flat = rt.roi_align(x, list(rois), (3, 2), 0.5, 2, True)
    (expected,) = torch.autograd.grad(flat, x, g.reshape(flat.shape))
    assert torch.equal(grad, expected)
    pooled = roi_cupy.RoiPool(2)(x, rois)
    assert pooled.shape == (2, 3, C, 2, 2) and pooled.requires_grad


def test_a_tiny_model_trains_through_the_babilim_layer():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16)
    rois = torch.tensor([[[1.0, 1.0, 9.0, 9.0], [6.0, 4.0, 15.0, 12.0]]]).repeat(4, 1, 1)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    backbone = torch.nn.Conv2d(3, 8, 3, padding=1)
    head = torch.nn.Linear(8 * 2 * 2, 2)
    roi = roi_cupy.RoiAlign(output_size=2, sampling_ratio=2)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.5,
                                momentum=0.9)
    losses = []
    for _ in range(15):
        crops = roi(roi_cupy.Tensor(data=backbone(images)), roi_cupy.Tensor(data=rois)).native
        loss = torch.nn.functional.cross_entropy(head(crops.reshape(8, -1)), labels)
        optimizer.zero_grad()
        loss.backward()
        assert backbone.weight.grad.abs().sum() > 0  # the gradient crossed the RoI layer
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_babilim_layer_refuses_mixed_array_kinds():
    x, rois = _features(torch.float32), torch.stack([_boxes(2, torch.float32)[:, 1:]] * N)
    with pytest.raises(TypeError, match="argument 1 must be a torch array like the first array "
                                        "argument, got numpy.ndarray"):
        roi_cupy.RoiAlign(2)(x, roi_cupy.Tensor(data=rois.numpy()))


def test_multi_scale_roi_align_traces_with_fx():
    x = {name: t.detach() for name, t in _pyramid().items()}
    boxes = [_level_boxes([10, 60, 30]), _level_boxes([45, 8])]
    names = ("p2", "p3", "p4")  # kept as given, as torchvision keeps them
    pooler = rt.MultiScaleRoIAlign(names, (3, 2), 2, canonical_scale=28)
    assert repr(pooler).startswith("MultiScaleRoIAlign(featmap_names=('p2', 'p3', 'p4')")
    traced = torch.fx.symbolic_trace(rt.MultiScaleRoIAlign(names, (3, 2), 2, canonical_scale=28))
    shapes = [(64, 96), (60, 90)]
    assert torch.equal(traced(x, boxes, shapes), pooler(x, boxes, shapes))


# ----------------------------------------------------------------------------- multi-scale ops
MS_SCALES = [0.25, 0.125, 0.0625]
MS_ARGS = dict(canonical_scale=28, canonical_level=4)  # sides < 14: p2, [14, 28): p3, >= 28: p4


def _ms_features(dtype=torch.float64, c=C, shapes=((16, 24), (8, 12), (4, 6))):
    return [_features(dtype, (2, c) + hw).requires_grad_() for hw in shapes]


def _ms_boxes(dtype=torch.float64):
    """Per-image boxes of every level, and one reversed along x (no level)."""
    return [torch.cat([_level_boxes([10, 60, 30, 15]), torch.tensor([[9.0, 1, 3, 8]])]).to(dtype),
            _level_boxes([45, 8, 20]).to(dtype)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_scale_forward_and_gradients_are_roi_cupys(dtype):
    features, boxes = _ms_features(dtype), _ms_boxes(torch.float32)
    out = rt.multi_scale_roi_align(features, boxes, (3, 2), MS_SCALES, 2, True, **MS_ARGS)
    assert out.dtype == dtype and out.shape == (8, C, 3, 2) and out.requires_grad
    arrays, given = [_numpy(x) for x in features], [b.numpy() for b in boxes]
    expected = roi_cupy.multi_scale_roi_align(arrays, given, (3, 2), MS_SCALES, 2, True, **MS_ARGS)
    numpy.testing.assert_array_equal(_numpy(out), expected)
    assert not expected[4].any() and expected[:4].all()
    g = torch.from_numpy(RNG.uniform(-1, 1, tuple(out.shape))).to(dtype)
    grads = torch.autograd.grad(out, features, g)
    expected = roi_cupy.multi_scale_roi_align_backward(
        _numpy(g), given, [x.shape for x in features], (3, 2), MS_SCALES, 2, True, **MS_ARGS
    )
    for grad, want in zip(grads, expected):
        assert grad.dtype == dtype and grad.abs().sum() > 0
        numpy.testing.assert_array_equal(_numpy(grad), want)


def test_multi_scale_boxes_as_index_column_and_errors():
    features, boxes = _ms_features(), _ms_boxes()
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1)
                      for i, b in enumerate(boxes)])
    listed = rt.multi_scale_roi_align(features, boxes, 2, MS_SCALES, -1, **MS_ARGS)
    assert torch.equal(listed, rt.multi_scale_roi_align(features, rois, 2, MS_SCALES, -1, **MS_ARGS))
    with pytest.raises(TypeError, match="features must be a list of torch.Tensor"):
        rt.multi_scale_roi_align(features[0], boxes, 2, MS_SCALES)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got numpy.ndarray"):
        rt.multi_scale_roi_align([features[0].detach().numpy()], boxes, 2, MS_SCALES[:1])
    with pytest.raises(ValueError, match=r"spatial_scales must hold one scale per level \(3\)"):
        rt.multi_scale_roi_align(features, boxes, 2, MS_SCALES[:2])
    with pytest.raises(TypeError, match="canonical_level must be an int"):
        rt.multi_scale_roi_align(features, boxes, 2, MS_SCALES, canonical_level=4.5)
    with pytest.raises(ValueError, match="features must hold 1 to 8 levels, got 9"):
        rt.multi_scale_roi_align([features[0]] * 9, boxes, 2, [0.25] * 9)


@pytest.mark.parametrize("sampling_ratio", [-1, (2, 1)], ids=str)
def test_gradcheck_multi_scale_roi_align(sampling_ratio):
    # small maps, to keep it quick, and a box of each level on them
    features = _ms_features(c=1, shapes=((8, 12), (4, 6), (2, 3)))
    boxes = [torch.tensor([[1.0, 2, 9, 11], [3, 1, 20, 19]], dtype=torch.float64),
             torch.tensor([[0.5, 1.5, 30, 31], [9, 1, 3, 8]], dtype=torch.float64)]

    def fn(*features):
        return rt.multi_scale_roi_align(list(features), boxes, (2, 3), MS_SCALES, sampling_ratio,
                                        True, **MS_ARGS)

    grads = torch.autograd.grad(fn(*features).sum(), features)
    assert all(grad.abs().sum() > 0 for grad in grads)
    assert torch.autograd.gradcheck(fn, tuple(features))
    assert torch.autograd.gradgradcheck(fn, tuple(features), fast_mode=True)


def test_opcheck_multi_scale_operators():
    features, boxes = _ms_features(), _ms_boxes()
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1)
                      for i, b in enumerate(boxes)])
    ops = torch.ops.roi_cupy
    shapes = [v for x in features for v in x.shape]
    g = torch.randn(8, C, 3, 2, dtype=torch.float64)
    cases = [
        (ops.multi_scale_roi_align,
         (features, boxes, True, 3, 2, MS_SCALES, [2, 2], True, 28, 4, True)),
        (ops.multi_scale_roi_align,
         (features, [rois], False, 2, 2, MS_SCALES, [-1, 3], False, 224, 4, False)),
        (ops.multi_scale_roi_align,
         (features[:1], boxes, True, 2, 2, MS_SCALES[:1], [2, 2], False, 224, 4, True)),
        (ops.multi_scale_roi_align_backward,
         (g.requires_grad_(), boxes, True, shapes, MS_SCALES, [2, 1], True, 28, 4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_multi_scale_fullgraph_forward_and_backward():
    features, boxes = _ms_features(torch.float32), _ms_boxes(torch.float32)

    def loss(features, boxes):
        out = rt.multi_scale_roi_align([torch.tanh(x) for x in features], boxes, (3, 2),
                                       MS_SCALES, 2, False, **MS_ARGS)
        return (out**2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    eager, got = loss(features, boxes), compiled(features, boxes)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(got, features), torch.autograd.grad(eager, features)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_multi_scale_module_casts_levels_to_the_first_maps_dtype():
    """Levels of other dtypes (autocast can give them) are cast to the first map's, as
    torchvision casts each level's crops."""
    x = _pyramid()
    boxes = [_level_boxes([10, 60, 30, 15]), _level_boxes([45, 8, 20])]
    pooler = rt.MultiScaleRoIAlign(["p2", "p3", "p4"], (3, 2), 2, canonical_scale=28)
    mixed = dict(x, p3=x["p3"].double())
    out = pooler(mixed, boxes, [(64, 96), (60, 90)])
    assert out.dtype == torch.float32
    assert torch.equal(out, pooler(dict(x, p3=x["p3"].double().float()), boxes,
                                   [(64, 96), (60, 90)]))
    out.sum().backward()
    assert x["p3"].grad is not None and x["p3"].grad.abs().sum() > 0


# ----------------------------------------------------------------------------- CUDA tensors
def _cuda():
    from roi_cupy import _cuda

    ok, why = _cuda.available()
    if not (ok and torch.cuda.is_available()):
        pytest.skip(f"needs a CUDA device visible to torch and CuPy: {why or 'torch sees none'}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_tensors_match_the_cpu(dtype):
    _cuda()
    x, boxes = _features(dtype).requires_grad_(), _boxes(dtype=torch.float32)
    xc = x.detach().cuda().requires_grad_()
    out, outc = rt.roi_align(x, boxes, 3, 0.5, 2, True), rt.roi_align(xc, boxes.cuda(), 3, 0.5, 2, True)
    assert outc.device == xc.device and outc.dtype == dtype
    tol = TOLERANCE[BFLOAT16 if dtype == torch.bfloat16 else numpy.dtype(str(dtype)[6:])]
    torch.testing.assert_close(outc.cpu(), out, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(outc, xc, g.cuda())[0].cpu(),
                               torch.autograd.grad(out, x, g)[0], rtol=tol, atol=tol)


def test_cuda_launches_on_torchs_current_stream_and_allocates_from_torch(monkeypatch):
    _cuda()
    import cupy

    from roi_cupy._cuda import launch

    x, boxes = _features(torch.float32).cuda(), _boxes(dtype=torch.float32).cuda()
    expected = rt.roi_align(x, boxes, 3, 0.5, 2, True)
    launched_on = []
    real = launch.CupyRuntime.function

    def spying(self, name):
        kernel = real(self, name)

        def run(*args):
            launched_on.append(cupy.cuda.get_current_stream().ptr)
            return kernel(*args)

        return run

    monkeypatch.setattr(launch.CupyRuntime, "function", spying)
    pool_before = cupy.get_default_memory_pool().used_bytes()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = rt.roi_align(x, boxes, 3, 0.5, 2, True)
        pooled = rt.roi_pool(x, [boxes[:2, 1:], boxes[2:, 1:]] + [boxes[:0, 1:]] * (N - 2), 2)
    torch.cuda.current_stream().wait_stream(side)
    assert launched_on and set(launched_on) == {side.cuda_stream}
    assert cupy.get_default_memory_pool().used_bytes() == pool_before  # torch's allocator only
    assert torch.equal(got, expected)
    assert torch.equal(pooled.cpu(), rt.roi_pool(x.cpu(), [boxes[:2, 1:].cpu(), boxes[2:, 1:].cpu()], 2))


@pytest.mark.skipif(os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1",
                    reason="without torch's caching allocator a capture cannot allocate")
def test_cuda_graph_capture_with_validate_false_replays_on_new_data():
    _cuda()
    x, boxes = _features(torch.float32).cuda(), _boxes(dtype=torch.float32).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: compile the kernels outside the capture
        rt.roi_align(x, boxes, 3, 0.5, 2, True, validate=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = rt.roi_align(x, boxes, 3, 0.5, 2, True, validate=False)
        with pytest.raises(RuntimeError, match="validate=True reads the boxes' check back"):
            rt.roi_align(x, boxes, 3, 0.5, 2, True)
    fresh = _features(torch.float32).cuda()
    x.copy_(fresh)  # a replay must read the new data: the launch was captured, not run eagerly
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, rt.roi_align(fresh, boxes, 3, 0.5, 2, True))


def test_cuda_double_backward_and_a_second_device():
    _cuda()
    x = _features().cuda().requires_grad_()
    boxes = _boxes().cuda()
    assert torch.autograd.gradgradcheck(lambda x: rt.roi_align(x, boxes, 2, 1.0, 2, True), (x,))
    if torch.cuda.device_count() < 2:
        pytest.skip("one CUDA device: the second-device case needs two")
    x1, b1 = x.detach().to("cuda:1"), boxes.to("cuda:1")
    out = rt.roi_align(x1, b1, 2, 1.0, 2, True)
    assert out.device == x1.device
    torch.testing.assert_close(out.cpu(), rt.roi_align(x.detach(), boxes, 2, 1.0, 2, True).cpu())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_cuda_multi_scale_matches_the_cpu_in_one_launch(monkeypatch, dtype):
    _cuda()
    from roi_cupy._cuda import launch

    names = []
    original = launch.kernel_name
    monkeypatch.setattr(launch, "kernel_name", lambda *a: names.append(original(*a)) or names[-1])
    features, boxes = _ms_features(dtype), _ms_boxes(torch.float32)
    on_gpu = [x.detach().cuda().requires_grad_() for x in features]
    args = ((3, 2), MS_SCALES, 2, True)
    out = rt.multi_scale_roi_align(features, boxes, *args, **MS_ARGS)
    outc = rt.multi_scale_roi_align(on_gpu, [b.cuda() for b in boxes], *args, **MS_ARGS,
                                    validate=False)
    g = torch.randn_like(out)
    gradsc = torch.autograd.grad(outc, on_gpu, g.cuda())
    assert [n.split("<")[0] for n in names] == ["multi_scale_roi_align_forward",
                                                "multi_scale_roi_align_backward"]
    tol = TOLERANCE[numpy.dtype(str(dtype)[6:])]
    torch.testing.assert_close(outc.cpu(), out, rtol=tol, atol=tol)
    for a, b in zip(gradsc, torch.autograd.grad(out, features, g)):
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- determinism
@pytest.fixture
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("op", ["roi_align", "roi_align_max", "roi_pool"])
@pytest.mark.parametrize("switch", [False, True], ids=["default", "deterministic"])
def test_backward_follows_torch_use_deterministic_algorithms(monkeypatch, request, op, switch):
    """The backward passes ask the functional ops for deterministic sums exactly when torch's
    own switch is on."""
    if switch:
        request.getfixturevalue("deterministic_algorithms")
    name = "roi_pool_backward" if op == "roi_pool" else "roi_align_backward"
    seen = []
    original = getattr(rt.ops, name)

    def recording(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return original(*args, **kwargs)

    monkeypatch.setattr(rt.ops, name, recording)
    x, boxes = _features().requires_grad_(), _boxes()
    if op == "roi_pool":
        out = rt.roi_pool(x, boxes, 3)
    else:
        out = rt.roi_align(x, boxes, 3, 1.0, 2, True, mode="max" if op == "roi_align_max" else "avg")
    out.sum().backward()
    assert seen == [switch]


def test_deterministic_backward_operators_pass_opcheck():
    x, boxes = _features(), _boxes()
    g = torch.rand(len(boxes), C, 3, 2, dtype=torch.float64)
    _, indices = torch.ops.roi_cupy.roi_pool(x, [boxes], False, 3, 2, 0.5, True)
    torch.library.opcheck(
        torch.ops.roi_cupy.roi_align_backward,
        (g, [boxes], False, [N, C, H, W], 0.5, [2, 2], True, "avg", None, True),
    )
    torch.library.opcheck(
        torch.ops.roi_cupy.roi_pool_backward, (g, [boxes], False, indices, [N, C, H, W], True)
    )


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_cuda_deterministic_backward_repeats_bit_for_bit(deterministic_algorithms, op):
    """Many RoIs on one region, so that every pixel there takes many terms: atomics could order
    them differently from run to run, the fixed-point sums cannot."""
    _cuda()
    torch.manual_seed(0)
    x = torch.rand(2, 16, 32, 32, device="cuda", requires_grad=True)
    boxes = torch.rand(400, 4, device="cuda") * 8
    boxes[:, 2:] += boxes[:, :2] + 8
    rois = torch.cat([torch.randint(0, 2, (400, 1), device="cuda").float(), boxes], dim=1)
    run = (lambda: rt.roi_align(x, rois, 7, 1.0, 2, True)) if op == "roi_align" else (
        lambda: rt.roi_pool(x, rois, 7))
    g = torch.randn_like(run())
    first = torch.autograd.grad(run(), x, g)[0]
    for _ in range(3):
        assert torch.equal(torch.autograd.grad(run(), x, g)[0], first)
    # and it is the gradient: against float64 sums of the same terms
    x64 = x.detach().double().requires_grad_()
    out64 = (rt.roi_align(x64, rois.double(), 7, 1.0, 2, True) if op == "roi_align"
             else rt.roi_pool(x64, rois.double(), 7))
    reference = torch.autograd.grad(out64, x64, g.double())[0]
    assert first.abs().sum() > 0
    torch.testing.assert_close(first.double(), reference, rtol=1e-5, atol=1e-5)


def test_multi_scale_backward_follows_torch_use_deterministic_algorithms(
    monkeypatch, deterministic_algorithms
):
    seen = []
    original = rt.ops.multi_scale_roi_align_backward

    def recording(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return original(*args, **kwargs)

    monkeypatch.setattr(rt.ops, "multi_scale_roi_align_backward", recording)
    maps = [_features().requires_grad_(), _features(shape=(N, C, 6, 7)).requires_grad_()]
    out = rt.multi_scale_roi_align(maps, _boxes(), 2, [1.0, 0.5], 2, True, 8, 1)
    out.sum().backward()
    assert seen == [True]


@pytest.mark.parametrize("op", ["ps_roi_align", "ps_roi_pool", "roi_align_rotated"])
def test_every_backward_follows_torch_use_deterministic_algorithms(
    monkeypatch, deterministic_algorithms, op
):
    seen = []
    original = getattr(rt.ops, f"{op}_backward")

    def recording(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return original(*args, **kwargs)

    monkeypatch.setattr(rt.ops, f"{op}_backward", recording)
    if op == "roi_align_rotated":
        x = _features().requires_grad_()
        rois = torch.tensor([[0, 6.0, 5.0, 6.0, 4.0, 30.0], [1, 7.0, 6.0, 5.0, 5.0, -60.0]],
                            dtype=torch.float64)
        out = rt.roi_align_rotated(x, rois, 2, 1.0, 2)
    else:
        x = _features(shape=(N, 8, H, W)).requires_grad_()
        out = getattr(rt, op)(x, _boxes(), 2)
    out.sum().backward()
    assert seen == [True]


@pytest.mark.parametrize("names", [[], [str(i) for i in range(9)]], ids=len)
def test_multi_scale_module_refuses_a_level_count_it_cannot_pool(names):
    with pytest.raises(ValueError, match=f"featmap_names must name 1 to 8 maps .*got {len(names)}"):
        rt.MultiScaleRoIAlign(names, 3, 2)
