"""RoI Pool on the CPU: roi_cupy's NumPy backend side by side with torchvision.ops.roi_pool.

Run from the repository root in an environment with torch and torchvision (CPU):

    python benchmarks/cpu_roi_pool.py [--repeat 41] [--workloads pool-core,pool-many,pool-large,...]

Each workload's calls take turns call by call (torchvision forward, roi_cupy forward,
torchvision backward, roi_cupy backward, ...; 50 calls of a kind at a time for the per-call
overhead workloads ``pool-one`` and ``pool-two``), the round starting one call later every time,
so that a slow spell of a shared machine, or caches left cold by the previous call, fall on all
alike. torchvision runs with ``torch.set_num_threads(2)``; its backward is
``torch.autograd.grad`` on a retained graph with a fixed ``grad_output``. roi_cupy runs with its
defaults (``validate=True``), forward with ``return_indices=True`` (the indices the backward
needs, as torchvision always computes them), and again with ``validate=False``. The table gives
the median and quartiles in ms, ``tv/rc`` = torchvision's median over roi_cupy's (above 1:
roi_cupy is faster), and roi_cupy's extra memory peak: what tracemalloc sees allocated during one
call beyond the arrays it returns.
"""
from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy

import roi_cupy
from roi_cupy._bench.workloads import Workload

WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "pool-core", "[2, 256, 64, 64] f32, 256 boxes (4-64 px), 7x7", op="roi_pool",
            channels=256, height=64, width=64, boxes_per_image=128, spatial_scale=1.0,
            box_min=4.0, box_max=64.0, device="cpu", seed=8,
        ),
        Workload(
            "pool-many", "[2, 64, 64, 64] f32, 2048 boxes (4-64 px), 7x7", op="roi_pool",
            channels=64, height=64, width=64, boxes_per_image=1024, spatial_scale=1.0,
            box_min=4.0, box_max=64.0, device="cpu", seed=8,
        ),
        Workload(
            "pool-large", "[1, 64, 200, 304] f32, 256 large boxes (256-1024 px, scale 1/4), 7x7",
            op="roi_pool", batch=1, channels=64, height=200, width=304, boxes_per_image=256,
            spatial_scale=0.25, box_min=256.0, box_max=1024.0, device="cpu", seed=7,
        ),
        # Per-call overhead: next to nothing to compute.
        Workload(
            "pool-one", "[1, 16, 14, 14] f32, one box (4-14 px), 7x7 (per-call overhead)",
            op="roi_pool", batch=1, channels=16, height=14, width=14, boxes_per_image=1,
            spatial_scale=1.0, box_min=4.0, box_max=14.0, device="cpu", seed=9,
        ),
        Workload(
            "pool-two", "[1, 4, 8, 8] f32, two boxes (2-8 px), 2x2 (per-call overhead)",
            op="roi_pool", batch=1, channels=4, height=8, width=8, boxes_per_image=2,
            output_size=2, spatial_scale=1.0, box_min=2.0, box_max=8.0, device="cpu", seed=9,
        ),
    )
}
# Workloads of calls so short that one timing holds this many calls (the median of the rest
# would measure the clock and the machine's hiccups).
BATCHED = {"pool-one": 50, "pool-two": 50}


def quartiles(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=4)
    return q[0] * 1e3, statistics.median(times) * 1e3, q[2] * 1e3


def peak_mib(call) -> float:
    """Peak MiB allocated during ``call()`` beyond the arrays it returns."""
    tracemalloc.start()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    results = result if isinstance(result, tuple) else (result,)
    return (peak - sum(r.nbytes for r in results)) / (1 << 20)


def run(workload: Workload, repeat: int, torch, ops) -> list[tuple]:
    inputs = workload.inputs()
    x, rois, g = inputs.features, inputs.rois, inputs.grad_output
    ph = workload.output_size
    scale = workload.spatial_scale
    xt = torch.from_numpy(x).requires_grad_(True)
    rt = torch.from_numpy(rois)
    gt = torch.from_numpy(g)
    out_t = ops.roi_pool(xt, rt, ph, scale)
    out, idx = roi_cupy.roi_pool(x, rois, ph, scale, return_indices=True)
    numpy.testing.assert_array_equal(out, out_t.detach().numpy())

    def tv_forward():
        with torch.no_grad():
            return ops.roi_pool(xt, rt, ph, scale)

    calls = {
        ("forward", "torchvision"): tv_forward,
        ("forward", "roi_cupy"): lambda: roi_cupy.roi_pool(x, rois, ph, scale, return_indices=True),
        ("forward", "roi_cupy(validate=False)"): lambda: roi_cupy.roi_pool(
            x, rois, ph, scale, return_indices=True, validate=False),
        ("backward", "torchvision"): lambda: torch.autograd.grad(out_t, xt, gt, retain_graph=True),
        ("backward", "roi_cupy"): lambda: roi_cupy.roi_pool_backward(g, rois, idx, x.shape),
        ("backward", "roi_cupy(validate=False)"): lambda: roi_cupy.roi_pool_backward(
            g, rois, idx, x.shape, validate=False),
    }
    grad_t = calls[("backward", "torchvision")]()[0].numpy()
    grad = calls[("backward", "roi_cupy")]()
    error = float(numpy.abs(grad - grad_t).max() / max(1e-30, float(numpy.abs(grad_t).max())))
    times = {key: [] for key in calls}
    for _ in range(3):
        for call in calls.values():
            call()
    order = list(calls.items())
    batch = BATCHED.get(workload.name, 1)
    for i in range(repeat):
        # Each call's place in the round moves by one every round: no backend always runs
        # right after the other's (with its caches cold).
        for key, call in order[i % len(order) :] + order[: i % len(order)]:
            t0 = time.perf_counter()
            for _ in range(batch):
                call()
            times[key].append((time.perf_counter() - t0) / batch)
    rows = []
    for (pass_, name), ts in times.items():
        q1, med, q3 = quartiles(ts)
        peer = statistics.median(times[(pass_, "torchvision")]) * 1e3
        mem = "" if name == "torchvision" else f"{peak_mib(calls[(pass_, name)]):.2f}"
        rows.append((workload.name, pass_, name, med, q1, q3, peer / med, mem))
    print(f"# {workload.name}: {workload.description}; backward max error vs torchvision "
          f"{error:.1e} (relative to the largest gradient)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=41)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    try:
        import tvref

        torch, ops = tvref.load()
    except ImportError:
        import torch
        from torchvision import ops
    torch.set_num_threads(2)
    rows = []
    for name in args.workloads.split(","):
        rows += run(WORKLOADS[name], args.repeat, torch, ops)
    print(f"\n{args.repeat} timed calls each, interleaved; torch threads {torch.get_num_threads()}")
    print("| workload | pass | backend | median ms | q1-q3 ms | tv/rc | extra peak MiB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for w, p, name, med, q1, q3, ratio, mem in rows:
        print(f"| {w} | {p} | {name} | {med:.3f} | {q1:.3f}-{q3:.3f} | {ratio:.2f}x | {mem} |")


if __name__ == "__main__":
    main()
