"""``Tensor``: babilim's framework-neutral wrapper around a native array."""
from __future__ import annotations

from typing import Any

import numpy

from roi_cupy import _interop


class Tensor:
    """A native array (NumPy, CuPy, or any DLPack tensor such as torch or JAX) with a flag.

    The wrapped object is kept as it is (``native``): a torch tensor that requires grad stays in
    its autograd graph, a JAX tracer stays traced, and the babilim layers run them through
    :mod:`roi_cupy.torch` and :mod:`roi_cupy.jax`. Conversions happen when an op needs them and
    are zero-copy where the producer allows.

    Args:
        data: a NumPy array, CuPy array, another ``Tensor`` (its native is shared), or any object
            with ``__dlpack__`` and ``__dlpack_device__``.
        trainable (bool): whether the tensor is a trainable parameter (kept for babilim's API;
            gradients come from the framework that owns ``data``). Default: False.

    Raises:
        TypeError: when ``data`` is none of the above.
    """

    def __init__(self, data: Any, trainable: bool = False):
        if isinstance(data, Tensor):
            data = data.native
        if _interop.framework_of(data) is None:
            _interop.unwrap(data, "data")  # refuses what is not an array, with the reason
        self.native = data
        self.trainable = bool(trainable)

    @property
    def _array(self) -> Any:
        """The native array roi_cupy reads (a torch tensor's detached view: same memory)."""
        return _interop.unwrap(_interop.detached(self.native), "data")[0]

    @classmethod
    def from_dlpack(cls, obj: Any, trainable: bool = False) -> Tensor:
        """Wrap any DLPack producer (zero-copy where it allows)."""
        if not hasattr(obj, "__dlpack__"):
            raise TypeError(f"obj must implement __dlpack__, got {type(obj).__qualname__}")
        return cls(data=obj, trainable=trainable)

    @property
    def shape(self) -> tuple[int, ...]:
        if _interop.framework_of(self.native) is not None:
            return tuple(int(v) for v in self.native.shape)
        return tuple(self._array.shape)

    @property
    def dtype(self) -> numpy.dtype:
        if _interop.framework_of(self.native) == "jax":  # a tracer has a dtype but no data
            return numpy.dtype(self.native.dtype)
        return numpy.dtype(self._array.dtype)

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N"`` (``"traced"`` for a JAX tracer, which has no data yet)."""
        if _interop.is_tracer(self.native):
            return "traced"
        return _interop.device_of(self._array)

    def numpy(self) -> numpy.ndarray:
        """The data as a NumPy array: the same memory on the CPU, a host copy from a GPU."""
        if _interop.is_cupy_array(self._array):
            return self._array.get()
        return self._array

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self._array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._array.__dlpack_device__()

    def __repr__(self) -> str:
        return (
            f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device!r}, "
            f"trainable={self.trainable}, native={type(self.native).__module__}."
            f"{type(self.native).__qualname__})"
        )
