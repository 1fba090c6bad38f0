"""``ModuleNative``: babilim's base for layers implemented per array library."""
from __future__ import annotations

from typing import Any

from roi_cupy import _interop


class ModuleNative:
    """A callable layer that works on whatever array kind it is given.

    Calling it unwraps every array argument (``Tensor``, NumPy, CuPy or DLPack) to the native
    array of its device, runs :meth:`build` once with those arrays, dispatches to
    :meth:`_call_numpy` (host arrays) or :meth:`_call_cupy` (CUDA arrays), and gives results back
    in the kind of the first array argument: Tensor in, Tensor out; NumPy in, NumPy out; a torch
    tensor in, a torch tensor out (through DLPack). Non-array arguments pass through unchanged.
    Results may be a single array or a tuple of arrays.

    Subclasses implement ``_call_numpy`` and ``_call_cupy`` and may override ``build``.
    """

    def __init__(self) -> None:
        self._built = False

    def build(self, *args: Any, **kwargs: Any) -> None:
        """Called once, before the first call, with the native arguments."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        natives, kind, device, first = [], None, None, None
        for i, arg in enumerate(args):
            if _is_array_like(arg):
                array, arg_kind = _interop.unwrap(arg, f"argument {i}")
                if device is None:
                    kind, device, first = arg_kind, _interop.device_of(array), i
                elif _interop.device_of(array) != device:
                    raise ValueError(
                        f"argument {i} is on {_interop.device_of(array)} but argument {first} "
                        f"is on {device}; move both to the same device"
                    )
                natives.append(array)
            else:
                natives.append(arg)
        if device is None:
            raise TypeError(f"{type(self).__name__} needs at least one array argument")
        if not getattr(self, "_built", False):
            self.build(*natives, **kwargs)
            self._built = True
        call = self._call_numpy if device == "cpu" else self._call_cupy
        result = call(*natives, **kwargs)
        if isinstance(result, tuple):
            return tuple(_interop.wrap(r, kind) for r in result)
        return _interop.wrap(result, kind)

    def _call_numpy(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no NumPy implementation")

    def _call_cupy(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no CuPy implementation")


def _is_array_like(obj: Any) -> bool:
    from roi_cupy._tensor import Tensor

    return isinstance(obj, Tensor) or hasattr(obj, "__dlpack__") or hasattr(obj, "__array__")
