"""Backend selection and the contract every backend implements.

A backend is a module that provides the functions listed below, one or two per operator (the
cuda and emulator backends both take them from one table of kernel launchers,
``roi_cupy._cuda.kernel_backend``; the NumPy backend has a file per operator). ``roi_cupy.ops``
validates and normalises everything before calling them, so a backend may rely on the following:

- Every backend module states what it can do in ``CAPABILITIES``, a :class:`Capabilities`.
- ``input`` / ``grad_output`` are C-contiguous arrays of the backend's array library, dtype
  float16, float32 or float64 (bfloat16 where the library has it); a backend with
  ``Capabilities.strided`` gets them with any strides instead (and ``argmax`` of any integer
  dtype), one with ``Capabilities.channels_last`` the features of ``roi_align_forward`` and
  ``roi_pool_forward`` channels-last where the caller's are.
- A backend with ``Capabilities.fused_index_check`` checks RoI Pool's indices in its
  ``roi_pool_backward(..., check_indices=True)`` pass (raising :class:`IndexOutOfRange`) rather
  than in ``first_invalid``.
- ``rois`` is a C-contiguous ``[K, 5]`` array ``(batch_index, x1, y1, x2, y2)`` of the *compute*
  dtype: float64 for float64 features, float32 otherwise; for the rotated functions a ``[K, 6]``
  array ``(batch_index, cx, cy, w, h, angle)``, the angle in degrees.  ``validate=False`` lets
  invalid rows through (a batch index outside ``[0, N)`` or a non-finite value anywhere in the
  row): a backend must give such a RoI zeros, zero gradient and argmax -1, and never index out of
  bounds with it. The batch index is read by truncation toward zero.
- ``pooled_h``, ``pooled_w`` are Python ints >= 1, ``sampling_ratio`` a pair of Python ints
  ``(sampling_h, sampling_w)`` (``<= 0``: that axis adaptive),
  ``spatial_scale`` a positive finite Python float, ``aligned`` and ``clockwise`` bools,
  ``input_shape`` a tuple of four Python ints ``(N, C, H, W)``.
- ``argmax`` is a C-contiguous int64 array ``[K, C, PH, PW]`` (flat index in the H x W plane, -1
  for an empty bin).

Functions (results are new arrays of the input's dtype; grad_input is ``[N, C, H, W]``)::

    roi_align_forward(input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned)
        -> output [K, C, PH, PW]
    roi_align_backward(grad_output, rois, input_shape, spatial_scale, sampling_ratio, aligned,
                       deterministic=False)
        -> grad_input [N, C, H, W]; ``deterministic`` as for roi_pool_backward
    roi_align_rotated_forward(input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio,
                              aligned, clockwise)
        -> output [K, C, PH, PW]                          (rois [K, 6])
    roi_align_rotated_backward(grad_output, rois, input_shape, spatial_scale, sampling_ratio,
                               aligned, clockwise)
        -> grad_input [N, C, H, W]
    roi_pool_forward(input, rois, pooled_h, pooled_w, spatial_scale, indices=True)
        -> (output [K, C, PH, PW], argmax int64 [K, C, PH, PW]; may be None when not indices)
    roi_pool_backward(grad_output, rois, argmax, input_shape, deterministic=False)
        -> grad_input [N, C, H, W]; with ``deterministic`` the same bits on every run and
           launch configuration (a backend that always gives them ignores the flag)
    first_invalid(rois, batch, limit=inf, indices=None, plane=0)
        -> (int, int): the first row with a value of magnitude above ``limit`` (NaN and
           infinities included) or a batch index that is not an integer in [0, batch), and the
           first flat position of ``indices`` outside [-1, plane); -1 for none (what
           ``validate=True`` checks; one synchronisation on a GPU). ``rois`` is float32 or
           float64, possibly wider than the compute dtype, whose range ``limit`` then is, with
           5 or 6 columns.
    multi_scale_roi_align_forward(inputs, rois, pooled_h, pooled_w, spatial_scales,
                                  sampling_ratio, aligned, canonical_scale, bounds)
        -> output [K, C, PH, PW]: RoI k through roi_align_forward on inputs[level(k)] at
           spatial_scales[level(k)]; zeros where level(k) is none. ``inputs`` is a list of 2 to
           8 arrays [N, C, H_l, W_l] of one dtype (contiguous, or any strides as above),
           ``spatial_scales`` a list of Python floats, ``canonical_scale`` a Python int and
           ``bounds`` a tuple of at most len(inputs) rising Python floats, each exactly a value
           of the compute dtype. level(k) is the number of bounds that
           q = sqrt((x2 - x1) * (y2 - y1)) / canonical_scale reaches (q >= bound), every step
           in the compute dtype; none when q is NaN or reaches len(inputs) bounds. On a GPU one
           kernel launch.
    multi_scale_roi_align_backward(grad_output, rois, input_shapes, spatial_scales,
                                   sampling_ratio, aligned, canonical_scale, bounds,
                                   deterministic=False)
        -> [grad_input [N, C, H_l, W_l] for each level]: the adjoint, with ``input_shapes`` a
           list of 2 to 8 shapes as ``input_shape`` above.

The position-sensitive operators take features whose C is a multiple of ``PH * PW`` (output
channel ``c`` at bin ``(ph, pw)`` reads input channel ``(c * PH + ph) * PW + pw``)::

    ps_roi_align_forward(input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio)
        -> output [K, C / (PH * PW), PH, PW]
    ps_roi_align_backward(grad_output, rois, input_shape, spatial_scale, sampling_ratio)
        -> grad_input [N, C, H, W]
    ps_roi_pool_forward(input, rois, pooled_h, pooled_w, spatial_scale)
        -> output [K, C / (PH * PW), PH, PW]
    ps_roi_pool_backward(grad_output, rois, input_shape, spatial_scale)
        -> grad_input [N, C, H, W]

RoI Align's ``mode`` does not reach a backend as an argument: ``roi_cupy.ops`` calls the two
RoI Align functions above for ``mode="avg"`` and these two, which every backend also provides,
for ``mode="max"`` (a bin holds the largest of its samples; docs/semantics.md, "RoI Align, max
mode")::

    roi_align_max_forward(input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned)
        -> output [K, C, PH, PW]
    roi_align_max_backward(grad_output, input, rois, input_shape, spatial_scale, sampling_ratio,
                           aligned, deterministic=False)
        -> grad_input [N, C, H, W]

The backward pass's ``input`` is the forward's features, of shape ``input_shape`` and
grad_output's dtype, C-contiguous (any strides for a backend with ``Capabilities.strided``): each
bin's maximum is found in it again, and a backend must pick the sample its own forward pass
picked.

The exact numbers are those of docs/semantics.md. NumPy inputs go to the backend chosen with
:func:`use_backend` ("numpy" by default); CuPy inputs always go to the CUDA backend.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Capabilities:
    """What a backend does beyond the common contract (see the module docstring).

    Attributes:
        strided (bool): reads features, gradients and indices of any strides (and indices of any
            integer dtype) as they are, so the caller makes no contiguous copy.
        fused_index_check (bool): ``roi_pool_backward(..., check_indices=True)`` checks RoI
            Pool's indices while it reads them.
        channels_last (bool): ``roi_align_forward`` and ``roi_pool_forward`` also read
            features ``[N, C, H, W]`` laid out channels-last (a transposed view of a C-contiguous
            ``[N, H, W, C]``) as they are, with the results they give the same features in
            C order, bit for bit; the other functions get C-contiguous arrays.
    """

    strided: bool = False
    fused_index_check: bool = False
    channels_last: bool = False


class IndexOutOfRange(Exception):
    """Raised by a backend's ``roi_pool_backward(..., check_indices=True)`` (see
    ``Capabilities.fused_index_check``) for the first index outside ``[-1, H * W)``.

    Attributes:
        position (int): its flat (C-order) position in ``argmax``.
    """

    def __init__(self, position: int):
        super().__init__(position)
        self.position = position


# Backends for NumPy inputs, by name, and the module that implements each.
_NUMPY_BACKENDS = {
    "numpy": "roi_cupy._numpy",
    "emulator": "roi_cupy._emulator.backend",
}
_CUDA_BACKEND = "roi_cupy._cuda.backend"
_DEFAULT = "numpy"

# The open use_backend blocks of this context, innermost last: a context variable, so that every
# thread and every asyncio task has its own; each block removes its own entry when it ends, so that
# blocks left out of order (two generators, say) leave nothing behind.
_blocks: contextvars.ContextVar[tuple[tuple[object, str], ...]] = contextvars.ContextVar(
    "roi_cupy_backend_blocks", default=()
)


def known_backends() -> tuple[str, ...]:
    """Names accepted by :func:`use_backend`."""
    return tuple(_NUMPY_BACKENDS)


def current_backend() -> str:
    """The backend NumPy inputs go to here (this thread or asyncio task)."""
    blocks = _blocks.get()
    return blocks[-1][1] if blocks else _DEFAULT


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run NumPy inputs through the named backend inside a ``with`` block.

    The choice holds for the code inside the block, in this thread or asyncio task only (it is a
    context variable): other threads and tasks keep theirs, and a task started inside the block
    starts with it.

    Args:
        name (str): ``"numpy"`` (the default outside any block) or ``"emulator"`` (the CUDA
            kernels compiled for the CPU; needs a C++ compiler).

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    if not isinstance(name, str) or name not in _NUMPY_BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, _NUMPY_BACKENDS))}, got {name!r}: "
            "use_backend only picks where NumPy inputs run; CuPy arrays and CUDA tensors "
            "select the cuda backend automatically"
        )
    entry = (object(), name)
    _blocks.set(_blocks.get() + (entry,))
    try:
        yield
    finally:
        _blocks.set(tuple(block for block in _blocks.get() if block is not entry))


def backend_for(xp: ModuleType) -> ModuleType:
    """The backend module for arrays of the library ``xp`` (numpy or cupy)."""
    if xp.__name__ == "numpy":
        return importlib.import_module(_NUMPY_BACKENDS[current_backend()])
    return importlib.import_module(_CUDA_BACKEND)
