"""Conversion between the caller's array kinds and the native arrays the backends work on.

Every public entry point unwraps its array arguments to a NumPy array (host memory) or a CuPy
array (CUDA memory), computes, and wraps the results back into the kind the caller passed: a
:class:`~roi_cupy.Tensor` in gives a Tensor out, NumPy gives NumPy, CuPy gives CuPy, and any
other DLPack producer (a torch or JAX tensor) gives an array of the producer's own library, made
zero-copy through DLPack.
"""
from __future__ import annotations

import importlib
import numbers
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
            return _host_array(obj, what)
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
        raise TypeError(f"{what} could not be exported through DLPack: {exc}") from exc
    raise ValueError(
        f"{what} lives on DLPack device type {device_type}; only CPU and CUDA are supported"
    )


def _host_array(obj: Any, what: str) -> numpy.ndarray:
    """A CPU DLPack tensor as a NumPy array sharing its memory.

    DLPack has bfloat16 but NumPy has none: a bfloat16 tensor's memory is reinterpreted as
    ml_dtypes' bfloat16 (no copy, no rounding) where the producer allows.
    """
    if _framework(obj) == "torch" and str(obj.dtype) == "torch.bfloat16":
        import torch

        return numpy.from_dlpack(obj.view(torch.int16)).view(_bfloat16(what))
    if _framework(obj) == "jax" and str(obj.dtype) == "bfloat16":
        return numpy.asarray(obj)  # jax's host arrays are ml_dtypes arrays already
    return numpy.from_dlpack(obj)


def _bfloat16(what: str) -> numpy.dtype:
    try:
        import ml_dtypes
    except ImportError as exc:
        raise TypeError(
            f"{what} is bfloat16, which NumPy knows only through ml_dtypes: pip install ml_dtypes"
        ) from exc
    return numpy.dtype(ml_dtypes.bfloat16)


def _framework(obj: Any) -> str | None:
    """``"torch"`` for a torch tensor, ``"jax"`` for a jax array or tracer, else None.

    Only libraries already imported are asked: an object of a library cannot exist before it is
    loaded, and roi_cupy never imports a framework itself.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(obj, (jax.Array, jax.core.Tracer)):
        return "jax"
    return None


def framework_of(obj: Any) -> str | None:
    """The framework that owns ``obj`` (unwrapping a :class:`~roi_cupy.Tensor`): ``"torch"``,
    ``"jax"`` or None for NumPy, CuPy and other DLPack producers."""
    from roi_cupy._tensor import Tensor

    return _framework(obj.native if isinstance(obj, Tensor) else obj)


def is_tracer(obj: Any) -> bool:
    """Whether ``obj`` is a JAX tracer (an array being traced by jit, grad or vmap)."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(obj, jax.core.Tracer)


def detached(obj: Any) -> Any:
    """``obj``, or for a torch tensor that requires grad, its detached view (same memory), for
    reading its data without taking part in autograd."""
    if _framework(obj) == "torch" and obj.requires_grad:
        return obj.detach()
    return obj


def _refuse_traced(obj: Any, what: str) -> None:
    """Objects that have no data to export yet, or whose gradient would be lost silently."""
    if is_tracer(obj):
        raise TypeError(
            f"{what} is a JAX tracer (inside jax.jit, jax.grad or jax.vmap), which has no data "
            "for roi_cupy to read: use the same operator from roi_cupy.jax (roi_cupy.jax.roi_align "
            "and the others), which traces, differentiates and vectorises"
        )
    if _framework(obj) == "torch" and obj.requires_grad:
        raise TypeError(
            f"{what} requires grad, and the functional roi_cupy ops keep no autograd graph: "
            "use the same operator from roi_cupy.torch (roi_cupy.torch.roi_align and the others: "
            "autograd, torch.compile), or pass tensor.detach() if no gradient should flow"
        )


def unwrap(obj: Any, what: str) -> tuple[Any, Kind]:
    """The native array behind ``obj`` and the kind to give results back in.

    A NumPy array in non-native byte order (``'>f8'`` on a little-endian machine) comes back as
    a native-order copy, so that every backend reads the same numbers.

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
        if not obj.dtype.isnative:  # byte order must never change a number: compute natively
            obj = obj.astype(obj.dtype.newbyteorder("="))
        return obj, Kind("numpy")
    if is_cupy_array(obj):
        return obj, Kind("cupy")
    _refuse_traced(obj, what)
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        library = _framework(obj) or type(obj).__module__.split(".")[0]
        return _from_dlpack(obj, what), Kind("dlpack", library=library)
    hint = ""
    if isinstance(obj, (list, tuple, numbers.Number)):
        hint = (
            " (Python numbers and lists are not taken: "
            "pass numpy.asarray(..., dtype=numpy.float32))"
        )
    raise TypeError(
        f"{what} must be a NumPy or CuPy array, a roi_cupy.Tensor or a DLPack tensor, "
        f"got {_describe(obj)}{hint}"
    )


def _give_to(library: str, array: Any) -> Any:
    """``array`` (NumPy or CuPy) as an array of the DLPack producer ``library``."""
    if numpy.dtype(array.dtype).name == "bfloat16" and not is_cupy_array(array):
        if library == "torch":  # torch cannot import ml_dtypes' bfloat16: reinterpret the bits
            import torch

            return torch.from_numpy(array.view(numpy.int16)).view(torch.bfloat16)
        if library == "jax":
            import jax.numpy

            return jax.numpy.asarray(array)
    if library == "jax":
        import jax.numpy

        return jax.numpy.from_dlpack(array)
    return importlib.import_module(library).from_dlpack(array)


def wrap(array: Any, kind: Kind) -> Any:
    """Give the native ``array`` back in the caller's ``kind`` (the inverse of :func:`unwrap`)."""
    if kind.name == "tensor":
        from roi_cupy._tensor import Tensor

        return Tensor(data=wrap(array, kind.inner), trainable=False)
    if kind.name == "dlpack":
        return _give_to(kind.library, array)
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


def is_channels_last(array: Any) -> bool:
    """Whether ``array`` [N, C, H, W] is a transposed view of a C-contiguous [N, H, W, C] and
    not C-contiguous itself."""
    return (
        array.ndim == 4
        and not array.flags.c_contiguous
        and array.transpose(0, 2, 3, 1).flags.c_contiguous
    )
