"""Per-call cost of roi_cupy.torch.roi_align next to torchvision.ops.roi_align on the CPU.

Run in an environment with torch and torchvision (directly importable, or through a ``tvref``
module whose ``load()`` returns ``(torch, torchvision.ops)``)::

    python benchmarks/torch_overhead.py            # the table
    python benchmarks/torch_overhead.py --profile  # and where roi_cupy's time goes (one box)

Three workloads, float32, 7x7 unless stated: one box on ``[1, 16, 14, 14]`` (the fixed cost of a
call), two boxes on ``[1, 4, 8, 8]`` at 2x2, and ``[2, 256, 64, 64]`` with 256 proposal-like boxes,
sampling ratio 2, aligned (a box head's work). Each is timed forward alone (no graph) and
forward + backward (``torch.autograd.grad`` of the output with a fixed ``grad_output``), for
torchvision and for roi_cupy with ``validate=True`` (its default) and ``validate=False``. The
three take turns call by call, in a rotating order, so that a slow spell of a shared machine
falls on all of them alike; each call is timed alone with ``time.perf_counter`` after a few
untimed ones, with the garbage collector paused. The table gives the median and quartiles and
torchvision's median over roi_cupy's (above 1, roi_cupy is faster). Nothing is written to disk.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import platform
import pstats
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
    # the failed import leaves half-initialised torchvision modules behind
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    return tvref.load()


torch, tv_ops = load_torchvision()
import roi_cupy  # noqa: E402
import roi_cupy.torch as rt  # noqa: E402

THREADS = 2


def proposals(rng, batch, count, height, width, smallest, largest):
    """``[batch * count, 5]`` float32 rows: log-uniform size, aspect 0.5 to 2, clipped."""
    size = numpy.exp(rng.uniform(numpy.log(smallest), numpy.log(largest), batch * count))
    aspect = numpy.exp(rng.uniform(numpy.log(0.5), numpy.log(2.0), batch * count))
    w, h = size * numpy.sqrt(aspect), size / numpy.sqrt(aspect)
    cx, cy = rng.uniform(0, width, batch * count), rng.uniform(0, height, batch * count)
    rows = numpy.stack([
        numpy.repeat(numpy.arange(batch), count),
        numpy.clip(cx - w / 2, 0, width), numpy.clip(cy - h / 2, 0, height),
        numpy.clip(cx + w / 2, 0, width), numpy.clip(cy + h / 2, 0, height),
    ], axis=1)
    return torch.from_numpy(rows.astype(numpy.float32))


def workloads(rng):
    """``(name, features, rois, kwargs, repeat)`` for each workload."""
    one = torch.from_numpy(rng.standard_normal((1, 16, 14, 14)).astype(numpy.float32))
    two = torch.from_numpy(rng.standard_normal((1, 4, 8, 8)).astype(numpy.float32))
    big = torch.from_numpy(rng.standard_normal((2, 256, 64, 64)).astype(numpy.float32))
    return [
        ("one box [1,16,14,14] 7x7", one, torch.tensor([[0, 1.5, 2.25, 11.0, 9.5]]),
         dict(output_size=7, spatial_scale=1.0, sampling_ratio=2, aligned=True), 2000),
        ("two boxes [1,4,8,8] 2x2", two, torch.tensor([[0, 0.5, 1.0, 6.0, 7.5], [0, 2, 2, 4, 5]]),
         dict(output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=True), 2000),
        ("[2,256,64,64] 256 boxes 7x7 sr2 aligned", big,
         proposals(rng, 2, 128, 256, 256, 8, 160),
         dict(output_size=7, spatial_scale=0.25, sampling_ratio=2, aligned=True), 40),
    ]


def contenders(kwargs):
    return {
        "torchvision": lambda x, r: tv_ops.roi_align(x, r, **kwargs),
        "roi_cupy": lambda x, r: rt.roi_align(x, r, **kwargs),
        "roi_cupy validate=False": lambda x, r: rt.roi_align(x, r, **kwargs, validate=False),
    }


def passes(fn, x, rois, grad_output):
    """``{pass name: callable of no arguments}`` for one contender."""
    leaf = x.detach().clone().requires_grad_()

    def forward():
        return fn(x, rois)

    def forward_backward():
        return torch.autograd.grad(fn(leaf, rois), leaf, grad_output)

    return {"forward": forward, "fwd+bwd": forward_backward}


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
    """``median [q1, q3]`` in µs below 1 ms, else in ms."""
    q1, median, q3 = q
    if median < 1:
        return f"{median * 1e3:.1f} µs [{q1 * 1e3:.1f}, {q3 * 1e3:.1f}]"
    return f"{median:.2f} ms [{q1:.2f}, {q3:.2f}]"


def check(name, calls, x, rois, grad_output):
    """Every contender's output and input gradient agree with torchvision's (float32 parity)."""
    reference = None
    for fn in calls.values():
        leaf = x.detach().clone().requires_grad_()
        out = fn(leaf, rois)
        (grad,) = torch.autograd.grad(out, leaf, grad_output)
        if reference is None:
            reference = out.detach(), grad
            continue
        for ours, theirs in zip((out.detach(), grad), reference):
            error = float((ours - theirs).abs().max())
            if error > 1e-5 * max(1.0, float(theirs.abs().max())):
                sys.exit(f"{name}: roi_cupy differs from torchvision by {error:.3g}")


def table(repeat_scale):
    rng = numpy.random.default_rng(2026)
    rows = []
    for name, x, rois, kwargs, repeat in workloads(rng):
        fns = contenders(kwargs)
        grad_output = torch.from_numpy(
            rng.standard_normal((rois.shape[0], x.shape[1], kwargs["output_size"],
                                 kwargs["output_size"])).astype(numpy.float32)
        )
        check(name, fns, x, rois, grad_output)
        by_pass = {who: passes(fn, x, rois, grad_output) for who, fn in fns.items()}
        for pass_name in ("forward", "fwd+bwd"):
            calls = {who: by_pass[who][pass_name] for who in fns}
            stats = measure(calls, max(5, int(repeat * repeat_scale)))
            rows.append((name, pass_name, stats))
    heads = list(contenders({}))
    print(f"| workload | pass | {heads[0]} | {heads[1]} | ratio | {heads[2]} | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, pass_name, stats in rows:
        tv = stats[heads[0]][1]
        print(
            f"| {name} | {pass_name} | {cell(stats[heads[0]])} | {cell(stats[heads[1]])} | "
            f"{tv / stats[heads[1]][1]:.2f} | {cell(stats[heads[2]])} | "
            f"{tv / stats[heads[2]][1]:.2f} |"
        )
    print("\nmedian [quartiles] per call; ratio = torchvision median / roi_cupy median "
          "(above 1, roi_cupy is faster)")


def profile(calls=2000, top=15):
    """cProfile of roi_cupy's one-box call, forward alone and forward + backward: the top
    entries by cumulative time (the layers a call goes through) and by own time (hot spots)."""
    rng = numpy.random.default_rng(7)
    name, x, rois, kwargs, _ = workloads(rng)[0]
    grad_output = torch.from_numpy(rng.standard_normal((1, 16, 7, 7)).astype(numpy.float32))
    run = passes(contenders(kwargs)["roi_cupy"], x, rois, grad_output)
    for pass_name, fn in run.items():
        for _ in range(20):
            fn()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            fn()
        profiler.disable()
        for order in ("cumulative", "tottime"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(order).print_stats(top)
            print(f"\n## cProfile: roi_cupy {name}, {pass_name}, {calls} calls, by {order}")
            print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="store_true", help="also profile the one-box call")
    parser.add_argument("--repeat-scale", type=float, default=1.0,
                        help="multiply every workload's repeat count (default 1.0)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    import torchvision

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, numpy "
          f"{numpy.__version__}, roi_cupy {getattr(roi_cupy, '__version__', '?')}, Python "
          f"{platform.python_version()}, {platform.machine()}, torch threads "
          f"{torch.get_num_threads()}\n")
    table(args.repeat_scale)
    if args.profile:
        profile()


if __name__ == "__main__":
    main()
