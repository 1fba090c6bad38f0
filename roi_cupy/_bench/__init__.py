"""``python -m roi_cupy bench``: roi_cupy against torchvision, on the GPU and on the CPU.

The workloads are defined in :mod:`roi_cupy._bench.workloads`; every backend's output is checked
against a float64 reference before it is timed (:mod:`roi_cupy._bench.check`); the record is
printed as a table and written as JSON, markdown and (with matplotlib) a PNG plot.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from roi_cupy._bench import backends as _backends
from roi_cupy._bench import report, runner, workloads
from roi_cupy._cuda import NO_GPU

_REPEAT_FULL, _REPEAT_QUICK = 25, 20  # medians and quartiles of at least 20 calls
_WARMUP_FULL, _WARMUP_QUICK = 3, 1
# Where results go without --out, wherever the command runs: the committed results in
# benchmarks/results change only when asked for by name (.gitignore ignores this folder).
DEFAULT_OUT = Path("bench-results")


def _epilog() -> str:
    lines = ["workloads (--workloads takes names or the families W7, sweep and cpu):"]
    lines += [f"  {w.name:<14} {w.description}" for w in workloads.WORKLOADS.values()]
    lines += ["", "backends: " + ", ".join(_backends.NAMES),
              "  (roi_cupy-* without a suffix run with validate=True, the default)",
              "", "passes: " + ", ".join(workloads.PASSES),
              "", "Exit status: 0, or 1 when a roi_cupy measurement is INVALID or raised (unless "
              "--allow-invalid), 2 for bad options."]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m roi_cupy bench",
        description="Check, then time roi_cupy's RoI Align and RoI Pool against torchvision on "
                    "named workloads; print a table and write JSON, markdown and a PNG plot.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="shrunk workloads and few repetitions, under a minute anywhere "
                           "(the default on a machine without a GPU, unless only CPU "
                           "workloads are chosen)")
    size.add_argument("--full", action="store_true",
                      help="the real sizes (the default where a GPU is present)")
    p.add_argument("--workloads", metavar="W1,W4,...",
                   help="comma-separated workloads or families (default: all)")
    p.add_argument("--backends", metavar="NAME,...",
                   help="comma-separated backends (default: every one that can run here; "
                        "full-size workloads then run on backends of their own device only)")
    p.add_argument("--passes", metavar="forward,...",
                   help="comma-separated passes among forward, backward, fwd+bwd (default: all)")
    p.add_argument("--repeat", type=int, metavar="N",
                   help=f"timed calls per measurement (default: {_REPEAT_FULL}, quick "
                        f"{_REPEAT_QUICK})")
    p.add_argument("--cpu-threads", type=int, metavar="N",
                   help="threads torch may use on the CPU (default: torch's own choice); the "
                        "NumPy backend computes on one core apart from its BLAS calls")
    p.add_argument("--out", metavar="DIR", type=Path, default=DEFAULT_OUT,
                   help="where the result files go (default: ./%(default)s, which git ignores "
                        "in the repository root; the committed results change only with --out "
                        "benchmarks/results)")
    p.add_argument("--allow-invalid", action="store_true",
                   help="exit 0 even when a roi_cupy measurement is INVALID or raised")
    return p


def _passes(text: str | None) -> list[str]:
    if not text:
        return list(workloads.PASSES)
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    for t in chosen:
        if t not in workloads.PASSES:
            raise ValueError(f"passes must be among {', '.join(workloads.PASSES)}; got {t!r}")
    return list(dict.fromkeys(chosen))


def default_quick(chosen: list[workloads.Workload], gpu_present: Callable[[], bool]) -> bool:
    """Without a GPU, GPU workloads shrink by default; CPU workloads are CPU-sized already."""
    return any(w.device == "cuda" for w in chosen) and not gpu_present()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (see ``--help``)."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        chosen_workloads = workloads.select(args.workloads)
        chosen_backends = _backends.select(args.backends)
        passes = _passes(args.passes)
    except ValueError as exc:
        print(f"python -m roi_cupy bench: {exc}", file=sys.stderr)
        return 2
    for option, value in (("--repeat", args.repeat), ("--cpu-threads", args.cpu_threads)):
        if value is not None and value < 1:
            print(f"python -m roi_cupy bench: {option} must be >= 1, got {value}",
                  file=sys.stderr)
            return 2
    if args.cpu_threads is not None:
        _backends.set_torch_threads(args.cpu_threads)

    defaulted = not args.quick and not args.full and default_quick(chosen_workloads,
                                                                   _backends.gpu_present)
    quick = args.quick or defaulted
    unavailable = {}
    ready = []
    for b in chosen_backends:
        reason = b.probe()
        if reason is None:
            ready.append(b)
        else:
            unavailable[b.name] = reason
    plan = runner.Plan(
        workloads=[w.shrunk() if quick else w for w in chosen_workloads],
        backends=ready,
        unavailable=unavailable,
        passes=passes,
        quick=quick,
        forced=args.backends is not None,
        repeat=args.repeat or (_REPEAT_QUICK if quick else _REPEAT_FULL),
        warmup=_WARMUP_QUICK if quick else _WARMUP_FULL,
    )
    for name, reason in unavailable.items():
        print(f"skipping {name}: {reason}", file=sys.stderr)
    if not plan.measurements():
        print("python -m roi_cupy bench: nothing to measure (no selected backend can run the "
              "selected workloads here)", file=sys.stderr)
        return 1
    why = f" (the default here: {NO_GPU}; --full runs the real sizes)" if defaulted else ""
    print(f"{'QUICK' if quick else 'full'} variant{why}: "
          f"{len(plan.measurements()) * len(passes)} measurements", file=sys.stderr)

    record = runner.run(plan, argv if argv is not None else sys.argv[1:])
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{record.date}-{runner.device_label(record)}" + ("-quick" if quick else "")
    record.plot = report.write_plot(record, out / f"{stem}.png")
    report.write_json(record, out / f"{stem}.json")
    (out / f"{stem}.md").write_text(report.markdown(record))
    print(report.table(record))
    print(f"\nwrote {out / stem}.json, .md" + (", .png" if "path" in record.plot else ""))
    ours = [r for r in record.failed if r.backend.startswith("roi_cupy")]
    peers = [r for r in record.failed if r not in ours]
    if peers:
        print(f"python -m roi_cupy bench: {len(peers)} torchvision measurement(s) INVALID or in "
              "ERROR: their own numbers are off (see the status column)", file=sys.stderr)
    if ours and not args.allow_invalid:
        print(f"python -m roi_cupy bench: {len(ours)} roi_cupy measurement(s) INVALID or in "
              "ERROR (see the status column)", file=sys.stderr)
        return 1
    return 0
