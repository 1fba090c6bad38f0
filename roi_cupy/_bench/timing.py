"""Clocks and statistics: CUDA events on a GPU, ``time.perf_counter`` on the CPU.

A measurement runs each callable a few times untimed (so compilation and first-touch allocation
stay out), then times each of ``repeat`` calls separately, interleaving the callables compared
with each other, and summarises them by the median and quartiles, which a stray slow call does
not move.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in milliseconds (quartiles by linear interpolation)."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    repeat: int
    times_ms: tuple[float, ...]

    @classmethod
    def of(cls, times_ms: Any) -> Stats:
        """Summarise a non-empty sequence of per-call times in milliseconds."""
        t = numpy.asarray(times_ms, dtype=numpy.float64)
        if t.ndim != 1 or t.size == 0:
            raise ValueError(f"times_ms must be a non-empty 1-D sequence, got shape {t.shape}")
        q1, median, q3 = numpy.percentile(t, [25, 50, 75])
        return cls(float(median), float(q1), float(q3), float(t.min()), float(t.max()),
                   float(t.mean()), int(t.size), tuple(float(v) for v in t))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["times_ms"] = list(self.times_ms)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        return cls(**{**d, "times_ms": tuple(d["times_ms"])})


class CpuClock:
    """Wall-clock timing of host work: everything has finished when the call returns."""

    def __init__(self) -> None:
        self._times: list[float] = []

    def synchronize(self) -> None:
        """Nothing to wait for on the host."""

    def time(self, fn: Callable[[int], Any], i: int) -> None:
        start = time.perf_counter()
        fn(i)
        self._times.append((time.perf_counter() - start) * 1e3)

    def results(self) -> list[float]:
        """The times recorded so far, in milliseconds; the clock starts afresh."""
        times, self._times = self._times, []
        return times

    def __call__(self, fn: Callable[[int], Any], repeat: int, warmup: int) -> Stats:
        return _only(measure([(self, fn)], repeat, warmup))


class CudaClock:
    """Device timing with CUDA events recorded on the current stream around each call.

    Args:
        event (callable): makes an event with ``record()``.
        elapsed (callable): ``elapsed(start, end)`` in milliseconds.
        synchronize (callable): waits for all work on the device.
    """

    def __init__(self, event: Callable[[], Any], elapsed: Callable[[Any, Any], float],
                 synchronize: Callable[[], None]):
        self.event, self.elapsed, self.synchronize = event, elapsed, synchronize
        self._pairs: list[tuple[Any, Any]] = []

    def time(self, fn: Callable[[int], Any], i: int) -> None:
        start, end = self.event(), self.event()
        start.record()
        fn(i)
        end.record()
        self._pairs.append((start, end))

    def results(self) -> list[float]:
        """Wait for the device, then the times recorded so far; the clock starts afresh."""
        self.synchronize()
        pairs, self._pairs = self._pairs, []
        return [self.elapsed(s, e) for s, e in pairs]

    def __call__(self, fn: Callable[[int], Any], repeat: int, warmup: int) -> Stats:
        return _only(measure([(self, fn)], repeat, warmup))


def measure(entries: list[tuple[Any, Callable[[int], Any]]], repeat: int,
            warmup: int) -> list[Stats | Exception]:
    """Time several callables with their clocks, interleaved call by call.

    Each callable first runs ``warmup`` times untimed; then repetition ``i`` times every callable
    once, in turn, so that a slow spell of the machine falls on all of them alike.

    Args:
        entries: ``(clock, fn)`` pairs; ``fn(i)`` makes one call on input copy ``i``.
        repeat (int): timed calls of each callable.
        warmup (int): untimed calls of each callable first.

    Returns:
        list: per entry, its :class:`Stats`, or the exception it raised (it is then left out of
        the remaining repetitions).
    """
    outcome: list[Stats | Exception | None] = [None] * len(entries)
    for k, (clock, fn) in enumerate(entries):
        try:
            for i in range(warmup):
                fn(i)
            clock.synchronize()
        except Exception as exc:  # reported in the entry's row, the others go on
            outcome[k] = exc
    for i in range(repeat):
        for k, (clock, fn) in enumerate(entries):
            if outcome[k] is None:
                try:
                    clock.time(fn, i)
                except Exception as exc:
                    outcome[k] = exc
    for k, (clock, _) in enumerate(entries):
        if outcome[k] is None:
            outcome[k] = Stats.of(clock.results())
    return outcome  # type: ignore[return-value]


def _only(outcome: list[Stats | Exception]) -> Stats:
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def cupy_clock() -> CudaClock:
    import cupy

    return CudaClock(
        lambda: cupy.cuda.Event(),
        lambda s, e: float(cupy.cuda.get_elapsed_time(s, e)),
        lambda: cupy.cuda.Device().synchronize(),
    )


def torch_clock() -> CudaClock:
    import torch

    return CudaClock(
        lambda: torch.cuda.Event(enable_timing=True),
        lambda s, e: float(s.elapsed_time(e)),
        torch.cuda.synchronize,
    )


# ----------------------------------------------------------------------------- bandwidth
def copy_bandwidth_cpu(nbytes: int, repeat: int = 5) -> dict:
    """Host copy bandwidth: ``numpy.copyto`` of ``nbytes``, counted as read + write.

    Returns:
        dict: ``{"method", "bytes", "median_ms", "gbps"}`` (GB = 1e9 bytes).
    """
    src = numpy.random.default_rng(0).integers(0, 255, nbytes, dtype=numpy.uint8)
    dst = numpy.empty_like(src)
    stats = CpuClock()(lambda i: numpy.copyto(dst, src), repeat, warmup=1)
    return _bandwidth("numpy.copyto host to host", nbytes, stats)


def copy_bandwidth_cupy(nbytes: int, repeat: int = 10) -> dict:
    """Device copy bandwidth: a device-to-device copy of ``nbytes``, counted as read + write."""
    import cupy

    src = cupy.ones(nbytes, dtype=cupy.uint8)
    dst = cupy.empty_like(src)
    stats = cupy_clock()(lambda i: cupy.copyto(dst, src), repeat, 2)
    return _bandwidth("cupy.copyto device to device", nbytes, stats)


def copy_bandwidth_torch(nbytes: int, repeat: int = 10) -> dict:
    """As :func:`copy_bandwidth_cupy`, through torch (when CuPy is absent)."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    stats = torch_clock()(lambda i: dst.copy_(src), repeat, 2)
    return _bandwidth("torch copy_ device to device", nbytes, stats)


def _bandwidth(method: str, nbytes: int, stats: Stats) -> dict:
    return {
        "method": method,
        "bytes": nbytes,
        "median_ms": stats.median_ms,
        "gbps": 2 * nbytes / (stats.median_ms * 1e-3) / 1e9,
    }


def cpu_cache_bytes() -> int:
    """The largest CPU cache, from sysfs; 32 MiB where it cannot be read."""
    import glob

    largest = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * unit)
    return largest or 32 << 20


def rotation_copies(nbytes: int, cache_bytes: int, budget_bytes: int = 1 << 30) -> int:
    """How many copies of an input of ``nbytes`` to cycle through so that it is not cache-hot.

    Enough copies to span twice the cache, at most 256 and at most ``budget_bytes`` in all.
    """
    if nbytes <= 0 or nbytes >= 2 * cache_bytes:
        return 1
    wanted = -(-2 * cache_bytes // nbytes)
    return int(max(1, min(wanted, 256, budget_bytes // nbytes)))
