"""roi_cupy's position-sensitive ops next to torchvision's on the CPU: largest error and time per
call.

Run in an environment with torch and torchvision (directly importable, or through a ``tvref``
module whose ``load()`` returns ``(torch, torchvision.ops)``)::

    python benchmarks/cpu_ps_roi.py [--repeat 40]

One workload: features ``[2, 7 * 7 * 8, 32, 32]`` (8 output channels of 7 x 7 bins), 128
proposal-like boxes (log-uniform size 4 to 28 pixels, aspect 0.5 to 2, clipped to
``[0, 29]`` so that no window reaches the last row or column, where torchvision's ps_roi_pool
gradient is not its forward's), ``spatial_scale=1``, 7 x 7.

Errors: the largest absolute difference from torchvision's CPU op, forward and input gradient
(torchvision's through autograd, roi_cupy's ``*_backward``), in float32 and float64.

Times (float32): forward alone, roi_cupy's functional op on NumPy arrays against torchvision
under ``torch.no_grad``; and forward + backward, ``roi_cupy.torch`` against torchvision, both
through ``torch.autograd.grad`` with a fixed ``grad_output``. The contenders take turns call by
call, each call timed alone with ``time.perf_counter`` after a few untimed ones, with the garbage
collector paused; the table gives the median and quartiles and torchvision's median over
roi_cupy's (above 1, roi_cupy is faster). Nothing is written to disk.
"""
from __future__ import annotations

import argparse
import gc
import platform
import sys
import time

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
SHAPE = (2, 7 * 7 * 8, 32, 32)
BOXES = 128
SIZE = 7


def proposals(rng, batch, count, side, smallest, largest, dtype):
    """``[batch * count, 5]`` rows: log-uniform size, aspect 0.5 to 2, clipped to [0, side]."""
    size = numpy.exp(rng.uniform(numpy.log(smallest), numpy.log(largest), batch * count))
    aspect = numpy.exp(rng.uniform(numpy.log(0.5), numpy.log(2.0), batch * count))
    w, h = size * numpy.sqrt(aspect), size / numpy.sqrt(aspect)
    cx, cy = rng.uniform(0, side, batch * count), rng.uniform(0, side, batch * count)
    rows = numpy.stack([
        numpy.repeat(numpy.arange(batch), count),
        numpy.clip(cx - w / 2, 0, side), numpy.clip(cy - h / 2, 0, side),
        numpy.clip(cx + w / 2, 0, side), numpy.clip(cy + h / 2, 0, side),
    ], axis=1)
    return rows.astype(dtype)


def ops(sampling_ratio):
    """``name -> (torchvision op, roi_cupy functional op, its backward, roi_cupy.torch op)``."""
    return {
        f"ps_roi_align sr={sampling_ratio}": (
            lambda x, r: tv_ops.ps_roi_align(x, r, SIZE, 1.0, sampling_ratio),
            lambda x, r: roi_cupy.ps_roi_align(x, r, SIZE, 1.0, sampling_ratio),
            lambda g, r, shape: roi_cupy.ps_roi_align_backward(g, r, shape, SIZE, 1.0,
                                                               sampling_ratio),
            lambda x, r: rt.ps_roi_align(x, r, SIZE, 1.0, sampling_ratio),
        ),
    }


def all_ops():
    table = {**ops(-1), **ops(2)}
    table["ps_roi_pool"] = (
        lambda x, r: tv_ops.ps_roi_pool(x, r, SIZE, 1.0),
        lambda x, r: roi_cupy.ps_roi_pool(x, r, SIZE, 1.0),
        lambda g, r, shape: roi_cupy.ps_roi_pool_backward(g, r, shape, SIZE, 1.0),
        lambda x, r: rt.ps_roi_pool(x, r, SIZE, 1.0),
    )
    return table


def errors():
    """Largest |roi_cupy - torchvision| per op, dtype and pass."""
    print("| op | dtype | forward max abs error | gradient max abs error |")
    print("|---|---|---|---|")
    for dtype in (numpy.float32, numpy.float64):
        rng = numpy.random.default_rng(2027)
        x = rng.standard_normal(SHAPE).astype(dtype)
        rois = proposals(rng, SHAPE[0], BOXES // SHAPE[0], 29, 4, 28, dtype)
        for name, (tv, ours, ours_backward, _) in all_ops().items():
            leaf = torch.from_numpy(x.copy()).requires_grad_()
            expected = tv(leaf, torch.from_numpy(rois))
            g = rng.standard_normal(tuple(expected.shape)).astype(dtype)
            expected.backward(torch.from_numpy(g))
            forward = numpy.abs(ours(x, rois) - expected.detach().numpy()).max()
            gradient = numpy.abs(ours_backward(g, rois, x.shape) - leaf.grad.numpy()).max()
            print(f"| {name} | {numpy.dtype(dtype).name} | {forward:.3g} | {gradient:.3g} |")


def measure(calls, repeat, warmup=5):
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


def cell(q):
    q1, median, q3 = q
    return f"{median:.2f} ms [{q1:.2f}, {q3:.2f}]"


def timings(repeat=40):
    rng = numpy.random.default_rng(2028)
    x = rng.standard_normal(SHAPE).astype(numpy.float32)
    rois = proposals(rng, SHAPE[0], BOXES // SHAPE[0], 29, 4, 28, numpy.float32)
    xt, rt_rois = torch.from_numpy(x), torch.from_numpy(rois)
    print("| op | pass | torchvision | roi_cupy | ratio |")
    print("|---|---|---|---|---|")
    for name, (tv, ours, _, adapter) in all_ops().items():
        with torch.no_grad():
            g = torch.from_numpy(rng.standard_normal(tuple(tv(xt, rt_rois).shape))
                                 .astype(numpy.float32))

        def tv_forward():
            with torch.no_grad():
                return tv(xt, rt_rois)

        leaf = xt.clone().requires_grad_()
        calls = {
            "forward": {"torchvision": tv_forward, "roi_cupy": lambda: ours(x, rois)},
            "fwd+bwd": {
                "torchvision": lambda: torch.autograd.grad(tv(leaf, rt_rois), leaf, g),
                "roi_cupy": lambda: torch.autograd.grad(adapter(leaf, rt_rois), leaf, g),
            },
        }
        for pass_name, pair in calls.items():
            stats = measure(pair, repeat)
            ratio = stats["torchvision"][1] / stats["roi_cupy"][1]
            print(f"| {name} | {pass_name} | {cell(stats['torchvision'])} | "
                  f"{cell(stats['roi_cupy'])} | {ratio:.2f} |")
    print("\nmedian [quartiles] per call; ratio = torchvision median / roi_cupy median "
          "(above 1, roi_cupy is faster)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=40, help="timed calls per contender")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"numpy {numpy.__version__}, {THREADS} torch threads; workload {list(SHAPE)} float, "
          f"{BOXES} boxes, {SIZE}x{SIZE}\n")
    errors()
    print()
    timings(args.repeat)


if __name__ == "__main__":
    main()
