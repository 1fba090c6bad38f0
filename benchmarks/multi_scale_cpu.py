"""Multi-scale RoI Align on the CPU next to torchvision's MultiScaleRoIAlign: largest errors and
time per call.

Run in an environment with torch and torchvision (directly importable, or through a ``tvref``
module whose ``load()`` returns ``(torch, torchvision.ops)``)::

    python benchmarks/multi_scale_cpu.py              # errors, then the timing table
    python benchmarks/multi_scale_cpu.py --repeat 10  # a quick run

Workload: an FPN of 4 levels ``[2, 256, 64 / 2**l, 64 / 2**l]`` (strides 4 to 32 of 256 x 256
images), 512 proposal-like boxes (256 per image, sides log-uniform in 8 to 256 px, aspect 0.5 to
2), 7x7, sampling ratio 2, canonical_scale 56 at level 4 so that every level gets boxes.

Errors: the largest absolute difference from torchvision's module, over its largest magnitude,
of the forward and of each level's gradient, float32 and float64, for roi_cupy's functional op
(NumPy backend, and the emulator when it builds) and roi_cupy.torch.MultiScaleRoIAlign.

Timing (float32): torchvision's module, roi_cupy.torch's module, roi_cupy.torch's module as it
was before (one roi_cupy.torch.roi_align per level, written out here), and the functional op on
NumPy arrays; forward alone and forward + backward. The contenders take turns call by call in a
rotating order, each call timed alone with ``time.perf_counter`` after untimed warm-up calls,
with the garbage collector paused; the table gives median and quartiles and torchvision's
median over each one's (above 1, faster than torchvision).
"""
from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from collections import OrderedDict

import numpy


def load_torchvision():
    """``(torch, torchvision.ops)``, through ``tvref`` where a plain import fails."""
    try:
        import torch
        import torchvision.ops as ops

        return torch, ops
    except Exception as exc:  # a broken install: try the shim
        direct = exc
    try:
        import tvref
    except ImportError:
        sys.exit(f"torchvision is not importable ({direct}) and there is no tvref")
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    return tvref.load()


torch, tv_ops = load_torchvision()
import roi_cupy  # noqa: E402
import roi_cupy.torch as rt  # noqa: E402

THREADS = 2
IMAGE = (256, 256)
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
NAMES = ["p2", "p3", "p4", "p5"]
CANONICAL = dict(canonical_scale=56, canonical_level=4)
SIZE, RATIO = 7, 2


def workload(dtype, seed=2026):
    """``(maps, boxes, grad_output)``: the FPN as an OrderedDict of tensors, per-image boxes."""
    rng = numpy.random.default_rng(seed)
    maps = OrderedDict(
        (name, torch.from_numpy(rng.standard_normal((2, 256, 64 >> l, 64 >> l)).astype(dtype)))
        for l, name in enumerate(NAMES)
    )
    boxes = []
    for _ in range(2):
        size = numpy.exp(rng.uniform(numpy.log(8), numpy.log(256), 256))
        aspect = numpy.exp(rng.uniform(numpy.log(0.5), numpy.log(2.0), 256))
        w, h = size * numpy.sqrt(aspect), size / numpy.sqrt(aspect)
        cx, cy = rng.uniform(0, IMAGE[1], 256), rng.uniform(0, IMAGE[0], 256)
        rows = numpy.stack([
            numpy.clip(cx - w / 2, 0, IMAGE[1]), numpy.clip(cy - h / 2, 0, IMAGE[0]),
            numpy.clip(cx + w / 2, 0, IMAGE[1]), numpy.clip(cy + h / 2, 0, IMAGE[0]),
        ], axis=1)
        boxes.append(torch.from_numpy(rows.astype(dtype)))
    g = torch.from_numpy(rng.standard_normal((512, 256, SIZE, SIZE)).astype(dtype))
    return maps, boxes, g


def old_module_forward(maps, boxes):
    """roi_cupy.torch.MultiScaleRoIAlign before the multi-scale operator: torchvision's
    LevelMapper, then one roi_cupy.torch.roi_align per level and a scatter into the result."""
    features = list(maps.values())
    lowest = int(-torch.log2(torch.tensor(SCALES[0], dtype=torch.float32)).item())
    highest = int(-torch.log2(torch.tensor(SCALES[-1], dtype=torch.float32)).item())
    size = torch.sqrt(torch.cat([(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for b in boxes]))
    eps = torch.tensor(1e-6, dtype=size.dtype)
    level = torch.floor(CANONICAL["canonical_level"]
                        + torch.log2(size / CANONICAL["canonical_scale"]) + eps)
    levels = torch.clamp(level, min=lowest, max=highest).to(torch.int64) - lowest
    result = features[0].new_zeros((levels.shape[0], features[0].shape[1], SIZE, SIZE))
    rois = torch.cat(
        [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
    )
    for l, (feature, scale) in enumerate(zip(features, SCALES)):
        chosen = torch.where(levels == l)[0]
        result[chosen] = rt.roi_align(feature, rois[chosen], SIZE, scale, RATIO).to(result.dtype)
    return result


def relative_error(ours, theirs):
    ours, theirs = numpy.asarray(ours, dtype=numpy.float64), theirs.detach().double().numpy()
    return float(numpy.abs(ours - theirs).max() / max(1.0, numpy.abs(theirs).max()))


def errors():
    """Largest relative errors against torchvision's module (forward, worst level's gradient)."""
    backends = ["numpy"] + (["emulator"] if _emulator_ok() else [])
    print("| dtype | contender | forward | gradient (worst level) |")
    print("|---|---|---|---|")
    for dtype in (numpy.float32, numpy.float64):
        maps, boxes, g = workload(dtype, seed=7)
        theirs = tv_ops.MultiScaleRoIAlign(NAMES, SIZE, RATIO, **CANONICAL)
        leaves = OrderedDict((k, v.clone().requires_grad_()) for k, v in maps.items())
        expected = theirs(leaves, boxes, [IMAGE, IMAGE])
        assert theirs.scales == SCALES
        expected_grads = torch.autograd.grad(expected, list(leaves.values()), g)
        arrays = [v.numpy() for v in maps.values()]
        given = [b.numpy() for b in boxes]
        for backend in backends:
            with roi_cupy.use_backend(backend):
                out = roi_cupy.multi_scale_roi_align(arrays, given, SIZE, SCALES, RATIO,
                                                     **CANONICAL)
                grads = roi_cupy.multi_scale_roi_align_backward(
                    g.numpy(), given, [a.shape for a in arrays], SIZE, SCALES, RATIO, **CANONICAL)
            worst = max(relative_error(a, b) for a, b in zip(grads, expected_grads))
            print(f"| {numpy.dtype(dtype).name} | roi_cupy.multi_scale_roi_align ({backend}) | "
                  f"{relative_error(out, expected):.2e} | {worst:.2e} |")
        ours = rt.MultiScaleRoIAlign(NAMES, SIZE, RATIO, **CANONICAL)
        leaves = OrderedDict((k, v.clone().requires_grad_()) for k, v in maps.items())
        out = ours(leaves, boxes, [IMAGE, IMAGE])
        grads = torch.autograd.grad(out, list(leaves.values()), g)
        worst = max(relative_error(a.numpy(), b) for a, b in zip(grads, expected_grads))
        print(f"| {numpy.dtype(dtype).name} | roi_cupy.torch.MultiScaleRoIAlign | "
              f"{relative_error(out.detach().numpy(), expected):.2e} | {worst:.2e} |")
    print("\nlargest |ours - torchvision's| / max(1, largest |torchvision's|)")


def _emulator_ok():
    from roi_cupy import _emulator

    return _emulator.available()[0]


def measure(calls, repeat, warmup=3):
    """Median and quartiles (ms) of each callable, timed call by call in a rotating order."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for i in range(repeat):
            for name in names[i % len(names):] + names[:i % len(names)]:
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {name: numpy.percentile(numpy.array(t) * 1e3, [25, 50, 75]) for name, t in times.items()}


def timing(repeat):
    maps, boxes, g = workload(numpy.float32)
    theirs = tv_ops.MultiScaleRoIAlign(NAMES, SIZE, RATIO, **CANONICAL)
    ours = rt.MultiScaleRoIAlign(NAMES, SIZE, RATIO, **CANONICAL)
    shapes = [IMAGE, IMAGE]
    arrays = [v.numpy() for v in maps.values()]
    given = [b.numpy() for b in boxes]
    leaves = OrderedDict((k, v.clone().requires_grad_()) for k, v in maps.items())
    theirs(maps, boxes, shapes)  # infers the scales and the level mapper
    levels = torch.bincount(theirs.map_levels(boxes), minlength=4).tolist()

    def fwd_bwd(module):
        return lambda: torch.autograd.grad(module(leaves, boxes, shapes), list(leaves.values()), g)

    def functional_fwd_bwd():
        roi_cupy.multi_scale_roi_align(arrays, given, SIZE, SCALES, RATIO, **CANONICAL)
        roi_cupy.multi_scale_roi_align_backward(g.numpy(), given, [a.shape for a in arrays],
                                                SIZE, SCALES, RATIO, **CANONICAL)

    def old(maps, boxes, shapes):
        return old_module_forward(maps, boxes)

    passes = {
        "forward": {
            "torchvision module": lambda: theirs(maps, boxes, shapes),
            "roi_cupy.torch module": lambda: ours(maps, boxes, shapes),
            "roi_cupy.torch, one roi_align per level (before)": lambda: old(maps, boxes, shapes),
            "roi_cupy functional (NumPy)": lambda: roi_cupy.multi_scale_roi_align(
                arrays, given, SIZE, SCALES, RATIO, **CANONICAL),
        },
        "fwd+bwd": {
            "torchvision module": fwd_bwd(theirs),
            "roi_cupy.torch module": fwd_bwd(ours),
            "roi_cupy.torch, one roi_align per level (before)": fwd_bwd(old),
            "roi_cupy functional (NumPy)": functional_fwd_bwd,
        },
    }
    print(f"\nboxes per level: {levels}; torch threads {torch.get_num_threads()}; "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}, NumPy {numpy.__version__}")
    print("| pass | contender | median ms [quartiles] | torchvision / this |")
    print("|---|---|---|---|")
    for pass_name, calls in passes.items():
        stats = measure(calls, repeat)
        tv = stats["torchvision module"][1]
        for name, (q1, median, q3) in stats.items():
            print(f"| {pass_name} | {name} | {median:.1f} [{q1:.1f}, {q3:.1f}] | "
                  f"{tv / median:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed calls per contender")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    errors()
    timing(args.repeat)


if __name__ == "__main__":
    main()
