"""RoI Align Rotated on the CPU: how close roi_cupy's numbers are to each peer it was compared with,
and what a call costs on roi_cupy's NumPy backend.

Run from the repository root (tests/ must be importable for the float64 reference):

    python benchmarks/cpu_roi_align_rotated.py [--repeat 21]

No peer op runs on the CPU here (detectron2 and mmcv are not installed, torchvision has no rotated
op), so the errors are measured against: the float64 loop reference of docs/semantics.md
(tests/reference.py), roi_cupy.roi_align on the upright box at angle 0, and the expected numbers
of detectron2's and mmcv's own tests. The timing rows are roi_cupy's NumPy backend alone, with
roi_align (same boxes, upright) beside it as a yardstick; the median and quartiles in ms over
``--repeat`` calls, the calls of the rows taking turns.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]  # this checkout's roi_cupy and its tests

import roi_cupy  # noqa: E402
from conftest import random_rotated_boxes  # noqa: E402
from reference import roi_align_rotated_backward_ref, roi_align_rotated_ref  # noqa: E402
from test_roi_align_rotated import D2_UPRIGHT, MMCV_CASES, upright  # noqa: E402


def relative_error(got, expected) -> float:
    expected = numpy.asarray(expected, dtype=numpy.float64)
    scale = max(float(numpy.abs(expected).max()), 1e-300)
    return float(numpy.abs(numpy.asarray(got, dtype=numpy.float64) - expected).max()) / scale


def accuracy(backends) -> None:
    rng = numpy.random.default_rng(5)
    print("largest error relative to the largest reference magnitude")
    print(f"{'peer':<44}" + "".join(f"{b + ' ' + d:>22}" for b in backends for d in ("f32", "f64")))
    rows = {}
    for dtype in (numpy.float32, numpy.float64):
        x = rng.uniform(-1, 1, (2, 3, 16, 20)).astype(dtype)
        rois = random_rotated_boxes(rng, 2, 48, 16, 20, dtype=dtype)
        g = rng.uniform(-1, 1, (48, 3, 3, 4)).astype(dtype)
        ref = roi_align_rotated_ref(x, rois, (3, 4), 1.0, 2, True)
        ref_b = roi_align_rotated_backward_ref(g, rois, x.shape, 1.0, 2, True)
        flat = rois.copy()
        flat[:, 5] = 0
        for backend in backends:
            with roi_cupy.use_backend(backend):
                out = roi_cupy.roi_align_rotated(x, rois, (3, 4), 1.0, 2, True)
                grad = roi_cupy.roi_align_rotated_backward(g, rois, x.shape, (3, 4), 1.0, 2, True)
                at0 = roi_cupy.roi_align_rotated(x, flat, (3, 4), 1.0, 2, True)
                up = roi_cupy.roi_align(x, upright(flat), (3, 4), 1.0, 2, True)
                d2 = max(
                    relative_error(roi_cupy.roi_align_rotated(
                        numpy.arange(25, dtype=dtype).reshape(1, 1, 5, 5),
                        numpy.array([[0, 2, 2, 2, 2, 90 * q]], dtype), 4, sampling_ratio=0,
                    )[0, 0], numpy.rot90(D2_UPRIGHT, -q))
                    for q in range(4)
                )
                mm = 0.0
                for xs, roi, output, grad_in in MMCV_CASES:
                    xs = numpy.array(xs, dtype)
                    r = numpy.array([roi], dtype)
                    o = roi_cupy.roi_align_rotated(xs, r, 2, 1.0, 2, True)
                    gi = roi_cupy.roi_align_rotated_backward(numpy.ones_like(o), r, xs.shape, 2,
                                                             1.0, 2, True)
                    mm = max(mm, relative_error(o, output), relative_error(gi, grad_in))
            for name, value in (
                ("float64 reference loop, forward", relative_error(out, ref)),
                ("float64 reference loop, backward", relative_error(grad, ref_b)),
                ("roi_align (aligned) at angle 0", relative_error(at0, up)),
                ("detectron2 test cases (0/90/180/270)", d2),
                ("mmcv test cases (forward and gradient)", mm),
            ):
                rows.setdefault(name, {})[(backend, numpy.dtype(dtype).name)] = value
    for name, values in rows.items():
        print(f"{name:<44}" + "".join(
            f"{values[(b, d)]:>22.2e}" for b in backends for d in ("float32", "float64")
        ))


def timing(repeat: int) -> None:
    rng = numpy.random.default_rng(8)
    n, c, h, w, k = 2, 256, 64, 64, 256
    x = rng.uniform(-1, 1, (n, c, h, w)).astype(numpy.float32)
    side = numpy.exp(rng.uniform(numpy.log(4), numpy.log(64), (k, 2)))
    centre = rng.uniform(0, 64, (k, 2))
    rois = numpy.concatenate(
        [rng.integers(0, n, (k, 1)), centre, side, rng.uniform(-180, 180, (k, 1))], axis=1
    ).astype(numpy.float32)
    g = rng.uniform(-1, 1, (k, c, 7, 7)).astype(numpy.float32)
    calls = {
        "roi_align_rotated forward": lambda: roi_cupy.roi_align_rotated(x, rois, 7, 1.0, 2),
        "roi_align_rotated backward": lambda: roi_cupy.roi_align_rotated_backward(
            g, rois, x.shape, 7, 1.0, 2),
        "roi_align forward (upright boxes)": lambda: roi_cupy.roi_align(
            x, upright(rois), 7, 1.0, 2, True),
        "roi_align backward (upright boxes)": lambda: roi_cupy.roi_align_backward(
            g, upright(rois), x.shape, 7, 1.0, 2, True),
    }
    times = {name: [] for name in calls}
    for f in calls.values():
        f()  # warm up
    names = list(calls)
    for r in range(repeat):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(1e3 * (time.perf_counter() - start))
    print(f"\nNumPy backend, [2, 256, 64, 64] float32, 256 boxes (4-64 px, any angle), 7x7, "
          f"sampling 2, aligned, validate=True; ms over {repeat} calls")
    print(f"{'call':<38}{'median':>9}{'q1':>9}{'q3':>9}")
    for name, t in times.items():
        q1, _, q3 = statistics.quantiles(t, n=4)
        print(f"{name:<38}{statistics.median(t):>9.1f}{q1:>9.1f}{q3:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--no-emulator", action="store_true", help="NumPy backend only")
    args = parser.parse_args()
    accuracy(("numpy",) if args.no_emulator else ("numpy", "emulator"))
    timing(args.repeat)


if __name__ == "__main__":
    main()
