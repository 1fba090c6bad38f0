"""The measurement loop: for each workload, each backend, each pass, check then time."""
from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from roi_cupy._bench import check, timing
from roi_cupy._bench.backends import Backend, load_torchvision, peer_of
from roi_cupy._bench.record import ERROR, INVALID, OK, UNCHECKED, Record, Row
from roi_cupy._bench.workloads import Workload, floor_bytes


@dataclass
class Plan:
    """What to run.

    Attributes:
        workloads (list of Workload): already shrunk for ``quick``.
        backends (list of Backend): those that can run here.
        unavailable (dict): backend name -> why it cannot run here.
        passes (list of str): among :data:`PASSES`.
        quick (bool): the quick variant.
        forced (bool): backends were named on the command line, so every workload runs on each.
        repeat, warmup (int): timed and untimed calls per measurement.
    """

    workloads: list[Workload]
    backends: list[Backend]
    unavailable: dict[str, str]
    passes: list[str]
    quick: bool
    forced: bool
    repeat: int
    warmup: int

    def applies(self, workload: Workload, backend: Backend) -> bool:
        """Full-size workloads run on their own device only, unless the backend was named."""
        return self.quick or self.forced or workload.device == backend.device

    def measurements(self) -> list[tuple[Workload, Backend]]:
        return [(w, b) for w in self.workloads for b in self.backends if self.applies(w, b)]


def run(plan: Plan, command: list[str], progress: TextIO = sys.stderr) -> Record:
    """Check and time every applicable (workload, backend, pass); returns the whole record."""
    now = datetime.datetime.now(datetime.timezone.utc)
    devices = sorted({b.device for _, b in plan.measurements()})
    record = Record(
        variant="quick" if plan.quick else "full",
        date=now.date().isoformat(),
        timestamp=now.isoformat(timespec="seconds"),
        command=list(command),
        environment=environment(devices),
        bandwidth={d: measure_bandwidth(d, plan.quick) for d in devices},
        workloads={w.name: w.as_dict() for w in plan.workloads},
        repeat=plan.repeat,
        warmup=plan.warmup,
    )
    for name, reason in plan.unavailable.items():
        record.skipped.append({"backend": name, "reason": reason, "workloads": "all"})
    for b in plan.backends:
        left_out = [w.name for w in plan.workloads if not plan.applies(w, b)]
        if left_out:
            record.skipped.append({
                "backend": b.name, "workloads": left_out,
                "reason": f"full-size workloads of another device (name the backend in "
                          f"--backends to time them on {b.device})",
            })

    total = len(plan.measurements()) * len(plan.passes)
    count = 0
    for workload in plan.workloads:
        backends = [b for b in plan.backends if plan.applies(workload, b)]
        if not backends:
            continue
        inputs = workload.inputs()
        references: dict[str, Any] = {}
        by_name = {b.name: b for b in backends}
        runners: dict[str, Any] = {}
        for backend in backends:
            try:
                runners[backend.name] = backend.prepare(workload, inputs)
            except Exception as exc:
                runners[backend.name] = f"setting up raised {type(exc).__name__}: {exc}"
        for pass_ in plan.passes:
            first, count = count + 1, count + len(backends)
            print(f"[{first}-{count}/{total}] {workload.name} {pass_}: checking, then timing "
                  f"{len(backends)} backend(s) call by call in turn ...", file=progress, flush=True)
            rows = [_checked(workload, inputs, b, runners[b.name], pass_, references)
                    for b in backends]
            timed = [row for row in rows if row.status != ERROR]
            outcome = timing.measure(
                [(by_name[r.backend].clock(), runners[r.backend].call(pass_)) for r in timed],
                plan.repeat, plan.warmup)
            for row, result in zip(timed, outcome):
                if isinstance(result, Exception):
                    row.status = ERROR
                    row.detail = f"timing raised {type(result).__name__}: {result}"
                else:
                    row.stats = result
            for k, row in enumerate(rows):
                print(f"[{first + k}/{total}] {workload.name} {pass_} {row.backend} ... "
                      f"{_progress_tail(row)}", file=progress, flush=True)
            record.rows.extend(rows)
        del runners
        gc.collect()
        for backend in backends:
            backend.release()
    fill_derived(record)
    return record


def _row(workload: Workload, pass_: str, backend: Backend, status: str, detail: str) -> Row:
    return Row(workload.name, pass_, backend.name, backend.device, backend.validate, status,
               detail, floor_bytes=floor_bytes(workload, pass_))


def _checked(workload: Workload, inputs: Any, backend: Backend, runner: Any, pass_: str,
             references: dict) -> Row:
    """A row for the pass on ``backend``, its output checked (``runner`` is the text of the
    error when setting up failed)."""
    if isinstance(runner, str):
        return _row(workload, pass_, backend, ERROR, runner)
    row = _row(workload, pass_, backend, OK, "")
    try:
        got = runner.results(pass_)
    except Exception as exc:
        row.status, row.detail = ERROR, f"{type(exc).__name__}: {exc}"
        return row
    if backend.library == "roi_cupy" and backend.device == "cpu":
        row.extra_mib = extra_memory(runner.call(pass_))
    want = _reference(workload, inputs, pass_, references)
    if isinstance(want, ImportError):
        row.status, row.detail = UNCHECKED, f"no reference to check against: {want}"
        return row
    verdict = check.compare(got, want, workload.dtype, check.tolerance(workload, inputs))
    # JSON has no infinity: a non-finite error is said in the detail instead.
    row.max_error = verdict.max_error if math.isfinite(verdict.max_error) else None
    row.tolerance, row.detail = verdict.tolerance, verdict.detail
    if not verdict.ok:
        row.status = INVALID  # still timed: the status column says not to trust it
    return row


def extra_memory(call: Any) -> float:
    """The peak memory (MiB) that ``call(0)`` allocates beyond the arrays it returns, as
    tracemalloc sees it (NumPy reports its allocations to it)."""
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        result = call(0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    results = result if isinstance(result, tuple) else (result,)
    kept = sum(getattr(r, "nbytes", 0) for r in results)
    return max(0.0, (peak - kept) / (1 << 20))


def _reference(workload: Workload, inputs: Any, pass_: str, cache: dict) -> Any:
    """The pass's float64 reference (fwd+bwd reuses forward's and backward's), or the
    ImportError that prevents one."""
    parts = ["forward", "backward"] if pass_ == "fwd+bwd" else [pass_]
    want: dict[str, Any] = {}
    for part in parts:
        if part not in cache:
            try:
                cache[part] = check.reference(workload, inputs, part)
            except ImportError as exc:
                cache[part] = exc
        if isinstance(cache[part], ImportError):
            return cache[part]
        want.update(cache[part])
    return want


def _progress_tail(row: Row) -> str:
    if row.stats is None:
        return f"{row.status}: {row.detail}"
    s = row.stats
    text = f"{s.median_ms:.3f} ms (q1 {s.q1_ms:.3f}, q3 {s.q3_ms:.3f})"
    return text if row.status == OK else f"{text} {row.status}: {row.detail}"


def fill_derived(record: Record) -> None:
    """Fill each timed row's GB/s, fraction of the floor and speed-up over torchvision."""
    medians = {(r.workload, r.pass_, r.backend): r.stats.median_ms
               for r in record.rows if r.stats is not None}
    for r in record.rows:
        if r.stats is None:
            continue
        seconds = r.stats.median_ms * 1e-3
        r.gbps = r.floor_bytes / seconds / 1e9 if seconds > 0 else None
        bw = record.bandwidth.get(r.device, {}).get("gbps")
        r.floor_fraction = r.gbps / bw if (bw and r.gbps is not None) else None
        peer = medians.get((r.workload, r.pass_, peer_of_name(r.backend, r.device)))
        r.speedup = peer / r.stats.median_ms if peer else None


def peer_of_name(backend: str, device: str) -> str:
    return peer_of(Backend(backend, "", device, None))


# ----------------------------------------------------------------------------- environment
def measure_bandwidth(device: str, quick: bool) -> dict:
    """Copy bandwidth of ``device`` (64 MiB host / 256 MiB device copies in quick runs, else
    256 MiB / 1 GiB)."""
    if device == "cpu":
        return timing.copy_bandwidth_cpu((64 if quick else 256) << 20)
    nbytes = (256 if quick else 1024) << 20
    try:
        return timing.copy_bandwidth_cupy(nbytes)
    except ImportError:
        return timing.copy_bandwidth_torch(nbytes)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed, or installed without metadata
        return None


def environment(devices: list[str]) -> dict:
    """Host, CPU, GPU, driver, CUDA and library versions (None where unknown)."""
    import numpy

    import roi_cupy

    env: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy": numpy.__version__,
        "roi_cupy": getattr(roi_cupy, "__version__", None),
        "cupy": None, "torch": None, "torchvision": None, "torch_threads": None,
        "gpu": None, "driver": None, "cuda_runtime": None, "cuda_driver_api": None,
        "torch_cuda": None,
    }
    try:
        torch, _ = load_torchvision()
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        env["torch_cuda"] = torch.version.cuda
        import torchvision

        env["torchvision"] = torchvision.__version__
    except Exception:  # torchvision absent: its backends are listed as skipped
        env["torchvision"] = env["torchvision"] or _version("torchvision")
    try:
        import cupy

        env["cupy"] = cupy.__version__
    except Exception:  # CuPy absent, or present without a usable CUDA installation
        pass
    if "cuda" in devices:
        env.update(_gpu_environment())
    return env


def _gpu_environment() -> dict:
    out: dict[str, Any] = {}
    try:
        import cupy

        runtime = cupy.cuda.runtime
        out["gpu"] = runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
        out["cuda_runtime"] = runtime.runtimeGetVersion()
        out["cuda_driver_api"] = runtime.driverGetVersion()
    except Exception:  # no CuPy: ask torch
        try:
            torch, _ = load_torchvision()
            out["gpu"] = torch.cuda.get_device_name()
        except Exception:
            pass
    out["driver"] = _nvidia_driver()
    return out


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except Exception:  # no nvidia-smi on PATH
        return None
    return text.strip().splitlines()[0] if text.strip() else None


def device_label(record: Record) -> str:
    """``cpu``, or the GPU's name as a file-name slug, for naming the result files."""
    gpu = record.environment.get("gpu")
    if gpu and any(r.device == "cuda" for r in record.rows):
        return "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    return "cpu"
