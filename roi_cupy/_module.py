"""``ModuleNative``: babilim's base for layers implemented per array library."""
from __future__ import annotations

from typing import Any

import numpy

from roi_cupy import _interop


class ModuleNative:
    """A callable layer that works on whatever array kind it is given.

    Calling it unwraps every array argument, positional or keyword (``Tensor``, NumPy, CuPy or
    DLPack), to the native array of its device, runs :meth:`build` once with those arrays,
    dispatches to :meth:`_call_numpy` (host arrays) or :meth:`_call_cupy` (CUDA arrays), and
    gives results back in the kind of the first array argument (positional ones first): Tensor
    in, Tensor out; NumPy in, NumPy out; a torch tensor in, a torch tensor out (through DLPack).
    Non-array arguments pass through unchanged. Results may be a single array or a tuple of
    arrays.

    A layer that can take part in a framework's autograd lists the framework in ``FRAMEWORKS``
    (``"torch"``, ``"jax"``) and implements ``_call_torch`` / ``_call_jax``: when the first array
    argument belongs to such a framework, those get the framework's own tensors (a ``Tensor``'s
    ``native``), untouched, and their results are given back as they are (as ``Tensor`` when the
    first argument was one).

    Subclasses implement ``_call_numpy`` and ``_call_cupy`` and may override ``build``.
    """

    FRAMEWORKS: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self._built = False

    def build(self, *args: Any, **kwargs: Any) -> None:
        """Called once, before the first call, with the native arguments."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leading = next((a for a in (*args, *kwargs.values()) if _is_array_like(a)), None)
        framework = _interop.framework_of(leading)
        if framework in self.FRAMEWORKS:
            return self._call_in_framework(framework, leading, args, kwargs)
        kind, device, first = None, None, None

        def native(arg: Any, what: str) -> Any:
            nonlocal kind, device, first
            if not _is_array_like(arg):
                return arg
            array, arg_kind = _interop.unwrap(arg, what)
            if device is None:
                kind, device, first = arg_kind, _interop.device_of(array), what
            elif _interop.device_of(array) != device:
                raise ValueError(
                    f"{what} is on {_interop.device_of(array)} but {first} is on {device}; "
                    "move both to the same device"
                )
            return array

        natives = [native(arg, f"argument {i}") for i, arg in enumerate(args)]
        kwargs = {name: native(arg, f"argument {name!r}") for name, arg in kwargs.items()}
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

    def _call_in_framework(
        self, framework: str, leading: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        from roi_cupy._tensor import Tensor

        def native(arg: Any, what: str) -> Any:
            if not _is_array_like(arg):
                return arg
            arg = arg.native if isinstance(arg, Tensor) else arg
            # JAX functions take NumPy arrays as they are, so a JAX call may mix them in.
            plain_ok = framework == "jax" and isinstance(arg, numpy.ndarray)
            if _interop.framework_of(arg) != framework and not plain_ok:
                raise TypeError(
                    f"{what} must be a {framework} array like the first array argument, "
                    f"got {type(arg).__module__}.{type(arg).__qualname__}"
                )
            return arg

        natives = [native(arg, f"argument {i}") for i, arg in enumerate(args)]
        kwargs = {name: native(arg, f"argument {name!r}") for name, arg in kwargs.items()}
        if not getattr(self, "_built", False):
            self.build(*natives, **kwargs)
            self._built = True
        call = {"torch": self._call_torch, "jax": self._call_jax}[framework]
        result = call(*natives, **kwargs)
        if not isinstance(leading, Tensor):
            return result
        if isinstance(result, tuple):
            return tuple(Tensor(data=r) for r in result)
        return Tensor(data=result)

    def _call_torch(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no PyTorch implementation")

    def _call_jax(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no JAX implementation")

    def _call_numpy(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no NumPy implementation")

    def _call_cupy(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no CuPy implementation")


def _is_array_like(obj: Any) -> bool:
    from roi_cupy._tensor import Tensor

    return isinstance(obj, Tensor) or hasattr(obj, "__dlpack__") or hasattr(obj, "__array__")
