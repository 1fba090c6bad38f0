"""Switching from torchvision.ops to roi_cupy.torch: same numbers through autograd, same detector.

Three parts, each against torchvision on the CPU: the functions and modules side by side (forward
and the input gradients, through torch autograd); a real torchvision detector (Faster R-CNN and
Mask R-CNN, random weights, a tiny backbone) trained one step and run in eval mode with
torchvision's ``MultiScaleRoIAlign`` and again, with the same weights and the same random draws,
with ``roi_cupy.torch.MultiScaleRoIAlign``; and ``torch.compile(fullgraph=True)``.

Skipped unless torchvision loads, as in test_torchvision_parity.py (directly or through ``tvref``).
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import numpy
import pytest
from conftest import SPATIAL_SCALES, make_rng, per_image, random_boxes, random_features
from test_torchvision_parity import PARITY, load_torchvision, tv_safe

torch, tv_ops, WHY = load_torchvision()
if tv_ops is None:
    pytest.skip(WHY, allow_module_level=True)

import roi_cupy.torch as rt  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models.detection import FasterRCNN, MaskRCNN  # noqa: E402 (after tvref.load)
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor  # noqa: E402

DTYPES = [torch.float32, torch.float64]
NUMPY = {torch.float32: numpy.float32, torch.float64: numpy.float64}
# max abs error relative to max(1, largest magnitude): the ops' bound against torchvision, and
# a whole detector's outputs after either pooler (see test_detector_switch_over)
OPS = {dtype: PARITY[numpy.dtype(NUMPY[dtype])] for dtype in DTYPES}
DETECTOR = {torch.float32: 1e-6, torch.float64: 1e-12}


def assert_parity(ours, theirs, what="", table=OPS):
    """Same dtype and shape, max abs error <= table[dtype] x max(1, largest magnitude)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (
        f"{what}: {ours.dtype} {tuple(ours.shape)} vs {theirs.dtype} {tuple(theirs.shape)}"
    )
    ours, theirs = ours.detach(), theirs.detach()
    tolerance = table[theirs.dtype]
    bound = tolerance * max(1.0, float(theirs.abs().max()) if theirs.numel() else 0.0)
    error = float((ours.double() - theirs.double()).abs().max()) if theirs.numel() else 0.0
    assert error <= bound, f"{what}: max abs error {error:.3g} > {bound:.3g}"
    return error


def tensor(array):
    return torch.from_numpy(numpy.ascontiguousarray(array))


def forward_and_gradients(fn, inputs, rng):
    """``fn(*inputs)`` and the gradient of ``<fn(*inputs), g>`` in every input, g random."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    g = tensor(random_features(rng, tuple(out.shape), numpy.float64)).to(out.dtype)
    grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
    return out, [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, grads)]


def assert_same_numbers(ours_fn, theirs_fn, inputs, key, what):
    ours, ours_grads = forward_and_gradients(ours_fn, inputs, make_rng(*key))
    theirs, theirs_grads = forward_and_gradients(theirs_fn, inputs, make_rng(*key))
    assert_parity(ours, theirs, f"{what} forward")
    for i, (a, b) in enumerate(zip(ours_grads, theirs_grads)):
        assert_parity(a, b, f"{what} gradient of input {i}")


# ----------------------------------------------------------------------------- functions, modules
@pytest.mark.parametrize("boxes_as", ["tensor", "list"])
@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2], ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roi_align(dtype, aligned, sampling_ratio, spatial_scale, boxes_as):
    key = ("switch align", str(dtype), aligned, sampling_ratio, spatial_scale, boxes_as)
    rng = make_rng(*key)
    np_dtype = NUMPY[dtype]
    # three images, the last without boxes: an empty [0, 4] tensor in the per-image list
    x = tensor(random_features(rng, (3, 4, 10, 12), np_dtype))
    rois = tv_safe(random_boxes(rng, 2, 14, 10, 12, spatial_scale, dtype=np_dtype), aligned,
                   sampling_ratio)
    boxes = [tensor(b) for b in per_image(rois, 3)] if boxes_as == "list" else tensor(rois)
    args = ((3, 4), spatial_scale, sampling_ratio, aligned)
    assert_same_numbers(lambda x: rt.roi_align(x, boxes, *args),
                        lambda x: tv_ops.roi_align(x, boxes, *args), [x], key, "roi_align")


@pytest.mark.parametrize("boxes_as", ["tensor", "list"])
@pytest.mark.parametrize("output_size", [(3, 4), 7], ids=str)
@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roi_pool(dtype, spatial_scale, output_size, boxes_as):
    key = ("switch pool", str(dtype), spatial_scale, output_size, boxes_as)
    rng = make_rng(*key)
    np_dtype = NUMPY[dtype]
    x = tensor(random_features(rng, (3, 4, 10, 12), np_dtype))
    rois = random_boxes(rng, 2, 14, 10, 12, spatial_scale, dtype=np_dtype)
    boxes = [tensor(b) for b in per_image(rois, 3)] if boxes_as == "list" else tensor(rois)
    assert_same_numbers(lambda x: rt.roi_pool(x, boxes, output_size, spatial_scale),
                        lambda x: tv_ops.roi_pool(x, boxes, output_size, spatial_scale), [x], key,
                        "roi_pool")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roi_align_and_roi_pool_modules(dtype):
    key = ("switch modules", str(dtype))
    rng = make_rng(*key)
    np_dtype = NUMPY[dtype]
    x = tensor(random_features(rng, (2, 3, 12, 9), np_dtype))
    rois = tensor(tv_safe(random_boxes(rng, 2, 10, 12, 9, 0.5, dtype=np_dtype), True, 2))
    pairs = [
        (rt.RoIAlign((3, 2), 0.5, 2, aligned=True), tv_ops.RoIAlign((3, 2), 0.5, 2, aligned=True)),
        (rt.RoIAlign(4, 0.5, -1), tv_ops.RoIAlign(4, 0.5, -1)),
        (rt.RoIPool((2, 3), 0.5), tv_ops.RoIPool((2, 3), 0.5)),
        (rt.RoIPool(5, 0.5), tv_ops.RoIPool(5, 0.5)),
    ]
    for ours, theirs in pairs:
        assert repr(ours) == repr(theirs)
        assert_same_numbers(lambda x: ours(x, rois), lambda x: theirs(x, rois), [x], key, repr(ours))


def pyramid(rng, strides, channels, batch, dtype, skipped=None):
    """FPN-like maps of a batch padded to 128 x 160 (finest first), and a map not to pool."""
    maps = OrderedDict()
    for i, stride in enumerate(strides):
        if skipped == i:
            maps["skipped"] = tensor(random_features(rng, (batch, channels, 11, 13), dtype))
        maps[f"p{i}"] = tensor(random_features(rng, (batch, channels, 128 // stride, 160 // stride),
                                               dtype))
    return maps


def boxes_of_many_sizes(rng, image_shapes, count, smallest, largest, dtype):
    """Per image ``count`` boxes inside the image, sides log-uniform in [smallest, largest]."""
    boxes = []
    for height, width in image_shapes:
        size = numpy.exp(rng.uniform(numpy.log(smallest), numpy.log(largest), (count, 2)))
        size = numpy.minimum(size, [width - 1, height - 1])
        corner = rng.uniform(0, 1, (count, 2)) * ([width, height] - size)
        boxes.append(tensor(numpy.concatenate([corner, corner + size], axis=1).astype(dtype)))
    return boxes


MULTI_SCALE_CASES = {
    # four levels (strides 4..32), a map in the dict that is not pooled, canonical level 4 at 32
    # px: sides < 16 go to p0, >= 64 to p3
    "four levels": dict(strides=(4, 8, 16, 32), skipped=2, output_size=7, sampling_ratio=2,
                        canonical=dict(canonical_scale=32, canonical_level=4), sides=(4, 140)),
    # torchvision's defaults (224, 4) on strides 1, 2, 4 (levels 0, 1, 2, the lowest -0.0):
    # sides < 28 go to p0, >= 56 to p2
    "default canonical": dict(strides=(1, 2, 4), skipped=None, output_size=(3, 5),
                              sampling_ratio=-1, canonical={}, sides=(5, 150)),
    "single level": dict(strides=(8,), skipped=None, output_size=[4, 3], sampling_ratio=0,
                         canonical={}, sides=(2, 159)),
}


@pytest.mark.parametrize("case", list(MULTI_SCALE_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_scale_roi_align(dtype, case):
    spec = MULTI_SCALE_CASES[case]
    key = ("switch multiscale", str(dtype), case)
    rng = make_rng(*key)
    np_dtype = NUMPY[dtype]
    # three images of different shapes padded into one batch (as GeneralizedRCNNTransform does)
    image_shapes = [(120, 150), (96, 160), (128, 100)]
    maps = pyramid(rng, spec["strides"], 3, 3, np_dtype, spec["skipped"])
    names = [name for name in maps if name != "skipped"]
    args = (names, spec["output_size"], spec["sampling_ratio"])
    ours = rt.MultiScaleRoIAlign(*args, **spec["canonical"])
    theirs = tv_ops.MultiScaleRoIAlign(*args, **spec["canonical"])
    assert repr(ours) == repr(theirs)

    # two calls, the second with other boxes and the shapes reordered: both keep the first scales
    for call, shapes in enumerate([image_shapes, image_shapes[::-1]]):
        boxes = boxes_of_many_sizes(rng, shapes, 12, *spec["sides"], np_dtype)
        keys = list(maps)

        def run(module):
            return lambda *tensors: module(OrderedDict(zip(keys, tensors)), boxes, shapes)

        assert_same_numbers(run(ours), run(theirs), list(maps.values()), key + (call,),
                            f"{case}, call {call}")
        assert ours.scales == theirs.scales
        if len(names) > 1:
            used = torch.unique(theirs.map_levels(boxes)).tolist()
            assert used == list(range(len(names))), f"levels used: {used}"


# ----------------------------------------------------------------------------- detection models
class TinyBackbone(nn.Module):
    """Three FPN-like maps (strides 4, 8, 16) from four convolutions."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.out_channels = channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, 2, 1), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2, 1),
            nn.ReLU(),
        )
        self.down = nn.ModuleList([nn.Conv2d(channels, channels, 3, 2, 1) for _ in range(2)])

    def forward(self, x):
        x = self.stem(x)
        maps = OrderedDict(p2=x)
        for i, down in enumerate(self.down):
            x = torch.relu(down(x))
            maps[f"p{i + 3}"] = x
        return maps


LEVELS = ["p2", "p3", "p4"]
# canonical_scale 24: the sampled proposals (sides ~2-60 px) reach all three levels
POOLER = dict(sampling_ratio=2, canonical_scale=24, canonical_level=4)


def detector(kind, dtype):
    """A Faster or Mask R-CNN with random weights (seeded) and torchvision's poolers."""
    torch.manual_seed(0)
    channels, classes = 8, 3
    common = dict(
        num_classes=None, min_size=96, max_size=128,
        rpn_anchor_generator=AnchorGenerator(((8,), (16,), (32,)), ((0.5, 1.0, 2.0),) * 3),
        box_roi_pool=tv_ops.MultiScaleRoIAlign(LEVELS, 7, **POOLER),
        box_head=TwoMLPHead(channels * 7 * 7, 32), box_predictor=FastRCNNPredictor(32, classes),
        rpn_batch_size_per_image=64, box_batch_size_per_image=64,
    )
    if kind == "mask_rcnn":
        model = MaskRCNN(
            TinyBackbone(channels), mask_roi_pool=tv_ops.MultiScaleRoIAlign(LEVELS, 14, **POOLER),
            mask_head=MaskRCNNHeads(channels, (8, 8), 1),
            mask_predictor=MaskRCNNPredictor(8, 8, classes), **common,
        )
    else:
        model = FasterRCNN(TinyBackbone(channels), **common)
    return model.to(dtype)


def switched(model):
    """A copy of ``model`` (same weights) whose poolers are roi_cupy's, with the same arguments."""
    model = copy.deepcopy(model)
    for name in ("box_roi_pool", "mask_roi_pool"):
        theirs = getattr(model.roi_heads, name)
        if theirs is not None:
            ours = rt.MultiScaleRoIAlign(
                theirs.featmap_names, theirs.output_size, theirs.sampling_ratio,
                canonical_scale=theirs.canonical_scale, canonical_level=theirs.canonical_level,
            )
            assert repr(ours) == repr(theirs)
            setattr(model.roi_heads, name, ours)
    return model


def images_and_targets(dtype):
    """Two images of different shapes, four boxes each, with labels and box-shaped masks."""
    rng = make_rng("switch detector data", str(dtype))
    np_dtype = NUMPY[dtype]
    images, targets = [], []
    for height, width in [(80, 112), (96, 72)]:
        images.append(tensor(rng.uniform(0, 1, (3, height, width)).astype(np_dtype)))
        boxes = boxes_of_many_sizes(rng, [(height, width)], 4, 6, 60, np_dtype)[0]
        masks = torch.zeros(4, height, width, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.round().int().tolist()):
            mask[y1:y2, x1:x2] = 1
        labels = tensor(rng.integers(1, 3, 4))
        targets.append(dict(boxes=boxes, labels=labels, masks=masks))
    return images, targets


def train_step(model, images, targets):
    """The loss dict and every parameter's gradient after one step, RPN sampling seeded."""
    model.train()
    model.zero_grad()
    torch.manual_seed(1)  # the proposal samplers draw from torch's global generator
    losses = model(images, targets)
    sum(losses.values()).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return {name: loss.detach() for name, loss in losses.items()}, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn"])
def test_detector_switch_over(kind, dtype):
    """Same losses, gradients and detections with either pooler.

    Bounds (DETECTOR, relative to max(1, magnitude)): the pooled features differ from
    torchvision's by an ulp or two, and everything after the pooler is the same code on the same
    weights and the same sampled proposals, so the outputs differ by a few ulps too. Measured:
    float32 <= 1.2e-7 (one ulp of a mask probability near 1), float64 <= 4e-17. The float32
    bound, 1e-6, leaves 8x room and still fails a pooler off by 1e-4 relative (gradients move
    ~1e-5 then); the float64 bound is the ops' own.
    """
    theirs = detector(kind, dtype)
    ours = switched(theirs)
    images, targets = images_and_targets(dtype)

    pooled = []
    hook = theirs.roi_heads.box_roi_pool.register_forward_pre_hook(
        lambda module, args: pooled.append(args[1])
    )
    their_losses, their_grads = train_step(theirs, images, targets)
    hook.remove()
    our_losses, our_grads = train_step(ours, images, targets)

    levels = theirs.roi_heads.box_roi_pool.map_levels(pooled[0])
    assert torch.unique(levels).tolist() == [0, 1, 2], "a level of the pyramid went unused"
    assert sorted(our_losses) == sorted(their_losses)
    for name, loss in their_losses.items():
        assert_parity(our_losses[name], loss, name, DETECTOR)
    assert sorted(our_grads) == sorted(their_grads) == sorted(n for n, _ in ours.named_parameters())
    for name, grad in their_grads.items():
        assert_parity(our_grads[name], grad, f"gradient of {name}", DETECTOR)

    theirs.eval()
    ours.eval()
    with torch.no_grad():
        their_detections, our_detections = theirs(images), ours(images)
    for their, our in zip(their_detections, our_detections, strict=True):
        assert sorted(our) == sorted(their)
        assert len(their["boxes"]) > 0
        assert torch.equal(our["labels"], their["labels"])
        for name in set(their) - {"labels"}:
            assert_parity(our[name], their[name], f"detections' {name}", DETECTOR)


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_roi_align_matches_torchvision_eager(dtype):
    key = ("switch compile", str(dtype))
    rng = make_rng(*key)
    np_dtype = NUMPY[dtype]
    x = tensor(random_features(rng, (2, 4, 12, 10), np_dtype))
    rois = tv_safe(random_boxes(rng, 2, 9, 24, 20, 0.5, dtype=np_dtype), True, -1)
    rois, boxes = tensor(rois), [tensor(b) for b in per_image(rois, 2)]

    def head(x, roi_align):
        # torch ops around the operator, both forms of boxes, one adaptive and one fixed grid
        a = roi_align(torch.tanh(x), rois, (3, 4), 0.5, 2, True)
        b = roi_align(x * 2, boxes, 5, 0.5, -1, False)
        return a.flatten(1) @ b.flatten(1)[:, :48].T

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: head(x, rt.roi_align), fullgraph=True)
    assert_same_numbers(compiled, lambda x: head(x, tv_ops.roi_align), [x], key,
                        "compiled roi_align")
