"""The emulator backend: the functions of ``roi_cupy._backend`` on NumPy arrays, computed by the
CUDA kernels compiled for the CPU and driven by the same launchers as on a GPU
(``roi_cupy._cuda.kernel_backend``)."""
from __future__ import annotations

from typing import Any

import roi_cupy._emulator as emulator
from roi_cupy._backend import Capabilities
from roi_cupy._cuda import kernel_backend

# C-contiguous arrays in, but for RoI Align's and RoI Pool's channels-last features; RoI Pool's indices checked
# by first_invalid's kernel.
CAPABILITIES = Capabilities(channels_last=True)

_FUNCTIONS = kernel_backend.functions(lambda array: emulator.runtime())


def __getattr__(name: str) -> Any:
    try:
        return _FUNCTIONS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
