"""RoI Align's max mode against its avg mode on the CPU (the NumPy backend), per call.

Run from the repository root:

    python benchmarks/align_max.py [--repeat 15] [--backend numpy|emulator]

Workload: features [2, 64, 64, 64] float32, 256 boxes (4-36 px, seeded), 7x7,
sampling_ratio 2, aligned=True. The four calls (avg forward, max forward, avg backward, max
backward, where max mode's backward takes the forward's features) take turns call by call after
two warm-up rounds, so that a slow spell of a shared machine falls on all alike. Printed: the
median process CPU time and wall time per call in ms, with quartiles of the CPU time, and max
mode's median CPU time over avg mode's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy

import roi_cupy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--backend", default="numpy", choices=("numpy", "emulator"))
    args = parser.parse_args()
    rng = numpy.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 64, 64, 64)).astype(numpy.float32)
    xy = rng.uniform(0, 48, (256, 2))
    boxes = numpy.concatenate(
        [rng.integers(0, 2, (256, 1)), xy, xy + rng.uniform(4, 32, (256, 2))], 1
    ).astype(numpy.float32)
    g = rng.uniform(-1, 1, (256, 64, 7, 7)).astype(numpy.float32)
    calls = {
        ("forward", "avg"): lambda: roi_cupy.roi_align(x, boxes, 7, 1.0, 2, True),
        ("forward", "max"): lambda: roi_cupy.roi_align(x, boxes, 7, 1.0, 2, True, mode="max"),
        ("backward", "avg"): lambda: roi_cupy.roi_align_backward(
            g, boxes, x.shape, 7, 1.0, 2, True
        ),
        ("backward", "max"): lambda: roi_cupy.roi_align_backward(
            g, boxes, x.shape, 7, 1.0, 2, True, mode="max", input=x
        ),
    }
    cpu = {key: [] for key in calls}
    wall = {key: [] for key in calls}
    with roi_cupy.use_backend(args.backend):
        for round in range(args.repeat + 2):
            for key, call in calls.items():
                w0, c0 = time.perf_counter(), time.process_time()
                call()
                if round >= 2:
                    wall[key].append((time.perf_counter() - w0) * 1e3)
                    cpu[key].append((time.process_time() - c0) * 1e3)
    print(f"backend {args.backend}, {args.repeat} calls each; ms per call")
    for key in calls:
        q1, median, q3 = statistics.quantiles(cpu[key], n=4)
        print(f"{key[0]:8} {key[1]}: cpu {median:7.1f} [{q1:.1f}, {q3:.1f}]   "
              f"wall {statistics.median(wall[key]):7.1f}")
    for name in ("forward", "backward"):
        ratio = statistics.median(cpu[name, "max"]) / statistics.median(cpu[name, "avg"])
        print(f"{name}: max / avg cpu time {ratio:.2f}x")


if __name__ == "__main__":
    main()
