"""roi_cupy's position-sensitive ops next to torchvision's on the CPU: largest error, time per
call and memory.

Run in an environment with torch and torchvision (directly importable, or through a ``tvref``
module whose ``load()`` returns ``(torch, torchvision.ops)``)::

    python benchmarks/cpu_ps_roi.py [--repeat 40] [--workloads rfcn21,rfcn10,one-box]

Workloads (float32, 7 x 7 bins, ``spatial_scale=1/16``, proposal-like boxes in image pixels:
log-uniform size 32 to 768, aspect 0.5 to 2, clipped to ``[0, 16 * (H - 2)]`` so that no
window reaches the map's last row or column, where torchvision's ps_roi_pool gradient is not
its forward's):

- ``rfcn21``: R-FCN on 21 classes, features ``[2, 7 * 7 * 21, 64, 64]``, 256 boxes per image;
- ``rfcn10``: ``[2, 7 * 7 * 10, 64, 64]``, 128 boxes per image;
- ``one-box``: per-call overhead, ``[1, 7 * 7 * 2, 14, 14]`` and one box.

Each is run through ps_roi_align with ``sampling_ratio=2`` and adaptive (``-1``) and through
ps_roi_pool.

Errors: the largest absolute difference from torchvision's CPU op, forward and input gradient
(torchvision's through autograd, roi_cupy's ``*_backward``), in float32 and float64.

Times: forward, roi_cupy's functional op on NumPy arrays against torchvision under
``torch.no_grad``; backward, roi_cupy's ``*_backward`` against ``torch.autograd.grad`` on a
retained graph with a fixed ``grad_output``. roi_cupy runs with its default ``validate=True`` and
with ``validate=False``. The three contenders take turns call by call, each call timed alone with
``time.perf_counter`` after a few untimed ones, with the garbage collector paused; the table gives
the median and quartiles and torchvision's median over roi_cupy's (above 1, roi_cupy is faster).
``peak`` is the largest memory tracemalloc sees allocated during one roi_cupy call (validate=True),
the result included (its size in brackets). Nothing is written to disk.
"""
from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
import tracemalloc

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

THREADS = 2
SIZE = 7
SCALE = 1.0 / 16
# name -> (features shape, boxes per image)
WORKLOADS = {
    "rfcn21": ((2, SIZE * SIZE * 21, 64, 64), 256),
    "rfcn10": ((2, SIZE * SIZE * 10, 64, 64), 128),
    "one-box": ((1, SIZE * SIZE * 2, 14, 14), 1),
}
MIB = 1 << 20


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


def inputs(workload, dtype, seed):
    """Features and boxes of ``workload``."""
    shape, per_image = WORKLOADS[workload]
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    side = 16 * (min(shape[2:]) - 2)
    rois = proposals(rng, shape[0], per_image, side, 32, min(768, side), dtype)
    return rng, x, rois


def ops():
    """``name -> (torchvision op, roi_cupy op, roi_cupy backward)``; the roi_cupy ones take
    ``validate``."""
    table = {}
    for ratio in (2, -1):
        table[f"ps_roi_align sr={ratio}"] = (
            lambda x, r, ratio=ratio: tv_ops.ps_roi_align(x, r, SIZE, SCALE, ratio),
            lambda x, r, v, ratio=ratio: roi_cupy.ps_roi_align(
                x, r, SIZE, SCALE, ratio, validate=v),
            lambda g, r, shape, v, ratio=ratio: roi_cupy.ps_roi_align_backward(
                g, r, shape, SIZE, SCALE, ratio, validate=v),
        )
    table["ps_roi_pool"] = (
        lambda x, r: tv_ops.ps_roi_pool(x, r, SIZE, SCALE),
        lambda x, r, v: roi_cupy.ps_roi_pool(x, r, SIZE, SCALE, validate=v),
        lambda g, r, shape, v: roi_cupy.ps_roi_pool_backward(g, r, shape, SIZE, SCALE,
                                                              validate=v),
    )
    return table


def errors(workloads):
    """Largest |roi_cupy - torchvision| per workload, op, dtype and pass."""
    print("| workload | op | dtype | forward max abs error | gradient max abs error |")
    print("|---|---|---|---|---|")
    for workload in workloads:
        for dtype in (numpy.float32, numpy.float64):
            rng, x, rois = inputs(workload, dtype, 2027)
            for name, (tv, ours, ours_backward) in ops().items():
                leaf = torch.from_numpy(x.copy()).requires_grad_()
                expected = tv(leaf, torch.from_numpy(rois))
                g = rng.standard_normal(tuple(expected.shape)).astype(dtype)
                expected.backward(torch.from_numpy(g))
                forward = numpy.abs(ours(x, rois, True) - expected.detach().numpy()).max()
                grad = numpy.abs(ours_backward(g, rois, x.shape, True) - leaf.grad.numpy()).max()
                print(f"| {workload} | {name} | {numpy.dtype(dtype).name} | {forward:.3g} | "
                      f"{grad:.3g} |")


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


def peak(call):
    """Largest memory (MiB) tracemalloc sees allocated during ``call()``, and the result's size."""
    gc.collect()
    tracemalloc.start()
    try:
        result = call()
        _, top = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return top / MIB, result.nbytes / MIB


def cell(q):
    q1, median, q3 = q
    return f"{median:.3g} [{q1:.3g}, {q3:.3g}]"


def timings(workloads, repeat):
    print("| workload | op | pass | torchvision ms | roi_cupy ms | ratio | roi_cupy validate=False "
          "ms | ratio | peak MiB [result] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workload in workloads:
        rng, x, rois = inputs(workload, numpy.float32, 2028)
        xt, rt_rois = torch.from_numpy(x), torch.from_numpy(rois)
        for name, (tv, ours, ours_backward) in ops().items():
            with torch.no_grad():
                shape = tuple(tv(xt, rt_rois).shape)
            g = rng.standard_normal(shape).astype(numpy.float32)
            leaf = xt.clone().requires_grad_()
            out = tv(leaf, rt_rois)
            gt = torch.from_numpy(g)

            def tv_forward():
                with torch.no_grad():
                    return tv(xt, rt_rois)

            calls = {
                "forward": {
                    "torchvision": tv_forward,
                    "roi_cupy": lambda: ours(x, rois, True),
                    "validate=False": lambda: ours(x, rois, False),
                },
                "backward": {
                    "torchvision": lambda: torch.autograd.grad(out, leaf, gt, retain_graph=True),
                    "roi_cupy": lambda: ours_backward(g, rois, x.shape, True),
                    "validate=False": lambda: ours_backward(g, rois, x.shape, False),
                },
            }
            for pass_name, group in calls.items():
                stats = measure(group, repeat)
                tv_median = stats["torchvision"][1]
                top, size = peak(group["roi_cupy"])
                print(f"| {workload} | {name} | {pass_name} | {cell(stats['torchvision'])} | "
                      f"{cell(stats['roi_cupy'])} | {tv_median / stats['roi_cupy'][1]:.2f} | "
                      f"{cell(stats['validate=False'])} | "
                      f"{tv_median / stats['validate=False'][1]:.2f} | "
                      f"{top:.1f} [{size:.1f}] |", flush=True)
    print("\nmedian [quartiles] per call; ratio = torchvision median / roi_cupy median "
          "(above 1, roi_cupy is faster)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=40, help="timed calls per contender")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--no-errors", action="store_true", help="skip the error table")
    args = parser.parse_args()
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}")
    torch.set_num_threads(THREADS)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"numpy {numpy.__version__}, {THREADS} torch threads; "
          + "; ".join(f"{w} {list(WORKLOADS[w][0])} {WORKLOADS[w][0][0] * WORKLOADS[w][1]} boxes"
                      for w in workloads)
          + f"; {SIZE}x{SIZE}, spatial_scale 1/16\n")
    if not args.no_errors:
        errors(workloads)
        print()
    timings(workloads, args.repeat)


if __name__ == "__main__":
    main()
