"""The CUDA backend: the functions of ``roi_cupy._backend`` for CuPy arrays.

``roi_cupy.ops`` has made the input's device current; kernels launch on its current stream and
nothing here synchronises with the host, but for ``first_invalid`` (``validate=True``), which
reads its one result back. The functions are ``roi_cupy._cuda.kernel_backend``'s launchers on the
runtime of the arrays' GPU.
"""
from __future__ import annotations

import functools
from typing import Any

from roi_cupy._backend import Capabilities
from roi_cupy._cuda import kernel_backend, launch

# C-contiguous arrays in, but for RoI Align's and RoI Pool's channels-last features; RoI Pool's indices checked
# by first_invalid's kernel.
CAPABILITIES = Capabilities(channels_last=True)


@functools.cache
def _runtime_of(device_id: int) -> launch.CupyRuntime:
    return launch.CupyRuntime(device_id)


def _runtime(array: Any) -> launch.CupyRuntime:
    return _runtime_of(array.device.id)


_FUNCTIONS = kernel_backend.functions(_runtime)


def __getattr__(name: str) -> Any:
    try:
        return _FUNCTIONS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
