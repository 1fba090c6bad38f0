"""The backend functions of ``roi_cupy._backend`` over the CUDA kernels, for any runtime.

Every function of the contract is a launcher of ``roi_cupy._cuda.<op>`` called with the runtime
that owns its first array argument: the array's GPU for the cuda backend, the CPU build of the
kernels for the emulator backend. Both backends are this one table with their own runtime, so a
new operator's launchers are registered once, here.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from roi_cupy._cuda import (
    multi_scale_roi_align,
    ps_roi_align,
    ps_roi_pool,
    roi_align,
    roi_align_rotated,
    roi_check,
    roi_pool,
)

# Contract name -> launcher(rt, first_array, *rest): the arguments of roi_cupy._backend's
# function, with the runtime in front.
LAUNCHERS: dict[str, Callable[..., Any]] = {
    "roi_align_forward": roi_align.forward,
    "roi_align_backward": roi_align.backward,
    "roi_align_max_forward": roi_align.max_forward,
    "roi_align_max_backward": roi_align.max_backward,
    "roi_pool_forward": roi_pool.forward,
    "roi_pool_backward": roi_pool.backward,
    "first_invalid": roi_check.first_invalid,
    "ps_roi_align_forward": ps_roi_align.forward,
    "ps_roi_align_backward": ps_roi_align.backward,
    "ps_roi_pool_forward": ps_roi_pool.forward,
    "ps_roi_pool_backward": ps_roi_pool.backward,
    "multi_scale_roi_align_forward": multi_scale_roi_align.forward,
    "multi_scale_roi_align_backward": multi_scale_roi_align.backward,
    "roi_align_rotated_forward": roi_align_rotated.forward,
    "roi_align_rotated_backward": roi_align_rotated.backward,
}


def functions(runtime_of: Callable[[Any], Any]) -> dict[str, Callable[..., Any]]:
    """The contract's functions, each running its launcher on ``runtime_of(first argument)``
    (for a list of arrays, a feature pyramid, that of its first array)."""

    def bind(launcher: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(launcher)
        def call(first: Any, *args: Any, **kwargs: Any) -> Any:
            owner = first[0] if isinstance(first, (list, tuple)) else first
            return launcher(runtime_of(owner), first, *args, **kwargs)

        return call

    return {name: bind(launcher) for name, launcher in LAUNCHERS.items()}
