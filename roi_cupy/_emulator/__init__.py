"""CPU emulator: the real CUDA kernels of ``cuda/`` compiled for the CPU and run thread by thread.

Every CUDA thread runs as a fiber on the calling OS thread, blocks one after another, so a
launch is deterministic and every kernel can be tested without a GPU (see ``runtime``).
"""
from __future__ import annotations

import os
import threading

from roi_cupy._emulator import runtime as _runtime

_lock = threading.Lock()
_runtimes: dict[tuple[str, ...], _runtime.Runtime | Exception] = {}


def _settings() -> tuple[str, ...]:
    """The environment a build depends on: a change builds (or looks up) another library."""
    names = ("CXX", "ROI_CUPY_EMULATOR_SANITIZE", "ROI_CUPY_EMULATOR_CACHE", "XDG_CACHE_HOME")
    return tuple(os.environ.get(name, "") for name in names)


def runtime() -> _runtime.Runtime:
    """The emulator runtime for the roi_cupy kernels, built on first use (memoized).

    Raises:
        RuntimeError: when there is no usable C++ compiler or the kernels do not compile (the
            same error again on every call, without another attempt).
    """
    key = _settings()
    with _lock:
        if key not in _runtimes:
            try:
                from roi_cupy._cuda import kernels

                path = _runtime.build(
                    kernels.source(), kernels.NAME_EXPRESSIONS, sanitize=_runtime.sanitizer()
                )
                library = _runtime.load(path, kernels.NAME_EXPRESSIONS)
                _runtimes[key] = _runtime.Runtime(library)
            except (ImportError, OSError, RuntimeError, ValueError) as exc:
                _runtimes[key] = exc
        result = _runtimes[key]
    if isinstance(result, Exception):
        raise RuntimeError(f"the CPU emulator is not available: {result}") from result
    return result


def available() -> tuple[bool, str]:
    """``(True, "")`` when the emulator can run the kernels here, else ``(False, why)``."""
    try:
        runtime()
    except RuntimeError as exc:
        return False, str(exc.__cause__ or exc)
    return True, ""
