"""Conversion between the caller's array kinds and the native arrays the backends work on.

Every public entry point unwraps its array arguments to a NumPy array (host memory) or a CuPy
array (CUDA memory), computes, and wraps the results back into the kind the caller passed: a
:class:`~roi_cupy.Tensor` in gives a Tensor out, NumPy gives NumPy, CuPy gives CuPy, and any
other DLPack producer (a torch or JAX tensor) gives an array of the producer's own library, made
zero-copy through DLPack.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy

# DLPack device types (dlpack.h, DLDeviceType).
_DL_CPU = 1
_DL_CUDA = 2
_DL_CUDA_HOST = 3
_DL_CUDA_MANAGED = 13


def cupy_or_none() -> ModuleType | None:
    """CuPy if it is already imported: an array can only be a CuPy array once CuPy is loaded."""
    return sys.modules.get("cupy")


def is_cupy_array(obj: Any) -> bool:
    cupy = cupy_or_none()
    return cupy is not None and isinstance(obj, cupy.ndarray)


def array_module(array: Any) -> ModuleType:
    """``numpy`` or ``cupy``, whichever owns ``array`` (a native array)."""
    return cupy_or_none() if is_cupy_array(array) else numpy


def device_of(array: Any) -> str:
    """``"cpu"`` or ``"cuda:N"`` for a native array."""
    if is_cupy_array(array):
        return f"cuda:{array.device.id}"
    return "cpu"


@dataclass(frozen=True)
class Kind:
    """How to give a result back to the caller.

    ``name`` is ``"numpy"``, ``"cupy"``, ``"dlpack"`` (``library`` is then the producer's
    top-level module name, e.g. ``"torch"``) or ``"tensor"`` (``inner`` is the kind of the
    Tensor's native array).
    """

    name: str
    library: str | None = None
    inner: Kind | None = None


def _describe(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _from_dlpack(obj: Any, what: str) -> Any:
    try:
        device_type, device_id = obj.__dlpack_device__()
    except Exception as exc:  # a broken producer says why
        raise TypeError(f"{what} could not report its DLPack device: {exc}") from exc
    try:
        if device_type in (_DL_CPU, _DL_CUDA_HOST):
            return numpy.from_dlpack(obj)
        if device_type in (_DL_CUDA, _DL_CUDA_MANAGED):
            try:
                import cupy
            except ImportError as exc:
                raise ValueError(
                    f"{what} lives on CUDA device {device_id}, which needs CuPy: "
                    "pip install 'roi_cupy[cuda13]' (or [cuda12])"
                ) from exc
            return cupy.from_dlpack(obj)
    except (BufferError, RuntimeError, TypeError) as exc:
        hint = ""
        if getattr(obj, "requires_grad", False):
            hint = " (a tensor that requires grad cannot be exported: pass tensor.detach())"
        raise TypeError(f"{what} could not be exported through DLPack: {exc}{hint}") from exc
    raise ValueError(
        f"{what} lives on DLPack device type {device_type}; only CPU and CUDA are supported"
    )


def unwrap(obj: Any, what: str) -> tuple[Any, Kind]:
    """The native array behind ``obj`` and the kind to give results back in.

    Args:
        obj: a NumPy array, CuPy array, :class:`~roi_cupy.Tensor`, or an object with
            ``__dlpack__``.
        what (str): the argument's name, for error messages.

    Raises:
        TypeError: when ``obj`` is none of these.
    """
    from roi_cupy._tensor import Tensor

    if isinstance(obj, Tensor):
        array, inner = unwrap(obj.native, what)
        return array, Kind("tensor", inner=inner)
    if isinstance(obj, numpy.ndarray):
        return obj, Kind("numpy")
    if is_cupy_array(obj):
        return obj, Kind("cupy")
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        library = type(obj).__module__.split(".")[0]
        return _from_dlpack(obj, what), Kind("dlpack", library=library)
    raise TypeError(
        f"{what} must be a NumPy or CuPy array, a roi_cupy.Tensor or a DLPack tensor, "
        f"got {_describe(obj)}"
    )


def _library_from_dlpack(library: str) -> Any:
    module = importlib.import_module(library)
    if library == "jax":
        return importlib.import_module("jax.numpy").from_dlpack
    return module.from_dlpack


def wrap(array: Any, kind: Kind) -> Any:
    """Give the native ``array`` back in the caller's ``kind`` (the inverse of :func:`unwrap`)."""
    if kind.name == "tensor":
        from roi_cupy._tensor import Tensor

        return Tensor(data=wrap(array, kind.inner), trainable=False)
    if kind.name == "dlpack":
        return _library_from_dlpack(kind.library)(array)
    return array


def unwrap_like(obj: Any, what: str, device: str, other: str) -> Any:
    """Unwrap ``obj`` and check that it lives where the argument named ``other`` does."""
    array, _ = unwrap(obj, what)
    if device_of(array) != device:
        raise ValueError(
            f"{what} is on {device_of(array)} but {other} is on {device}; "
            "move both to the same device"
        )
    return array
