"""Deterministic gradient sums (``deterministic=True``), for any runtime (GPU or emulator).

A backward kernel's ``roi_fixed_sink`` (cuda/roi_common.cuh) adds every term of a gradient
element to a 64-bit fixed-point integer, so that the sum has the same bits whatever order the
threads and blocks run in. :class:`FixedSum` holds those integers and launches the two kernels
around the backward kernel (cuda/roi_fixed.cu): ``roi_abs_max`` (the scale) before it and
``roi_fixed_finish`` (the gradient in its dtype) after it. Everything lives in one zero-filled
buffer: one fill, whatever the dtype.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy

from roi_cupy._cuda import launch

# roi_fixed_sink keeps every partial sum below 2**61 in magnitude (int64 holds 2**63).
_SUM_BITS = 61


def bits_for(count: int) -> int:
    """``ceil(log2(count))`` for a count >= 1 (0 for 0 or 1)."""
    return max(int(count) - 1, 0).bit_length()


class FixedSum:
    """The fixed-point accumulators of one gradient ``[*shape]`` of compute dtype ``real``.

    Args:
        rt: the runtime (``xp`` and ``function``).
        shape (tuple of int): the gradient's shape.
        real (numpy.dtype): the compute dtype (float32 or float64).
        sources (int): how many grad_output elements' terms can reach one gradient element, each
            with total weight at most 1 (it sets the scale: see roi_common.cuh).
        terms (int): how many terms one gradient element can take at most (it sets how many
            bits of each term's rounding residue float64 keeps).

    Raises:
        ValueError: when ``sources`` is beyond what 64-bit fixed point can hold (2**60).
    """

    def __init__(self, rt: Any, shape: tuple[int, ...], real: Any, sources: int, terms: int):
        self.rt = rt
        self.shape = tuple(shape)
        self.real = numpy.dtype(real)
        self.total = math.prod(self.shape)
        self.count_bits = bits_for(sources)
        if self.count_bits >= _SUM_BITS:
            raise ValueError(
                f"deterministic=True sums the terms of up to {sources} grad_output elements per "
                "gradient element, more than 64-bit fixed point can hold: use deterministic=False"
            )
        # float64: a second word with each term's rounding residue (|r| <= 1/2) times
        # 2**low_bits, as many bits as a sum of `terms` of them can take without overflowing.
        self.low_bits = 0
        if self.real == numpy.float64:
            self.low_bits = max(min(_SUM_BITS + 1 - bits_for(terms), 60), 0)
        words = self.total * (2 if self.low_bits else 1)
        flag_words = -(-self.total // 16)  # two bits per element in uint32 words
        # One uint64 buffer: hi, lo, the flags (two uint32 per word) and max_abs (one word).
        self._buffer = rt.xp.zeros(words + -(-flag_words // 2) + 1, dtype=numpy.uint64)
        self.hi = self._buffer[: self.total]
        self.lo = self._buffer[self.total : words] if self.low_bits else None
        self.flags = self._buffer[words:-1].view(numpy.uint32)[:flag_words]
        self.max_abs = self._buffer[-1:].view(self.real)[:1]

    def measure(self, values: Any) -> None:
        """Record the largest finite ``|values|`` (grad_output): the scale of the sums."""
        if values.size == 0:
            return
        index64 = launch.use_index64(values.size)
        grid, block = launch.grid(values.size)
        self.rt.function(launch.kernel_name("roi_abs_max", values.dtype, index64))(
            grid, block, (values, launch.index_scalar(index64)(values.size), self.max_abs)
        )

    def sink_args(self) -> tuple[Any, ...]:
        """The sink's kernel arguments: hi, lo (None but for float64), flags, max_abs,
        count_bits, low_bits."""
        return (
            self.hi, self.lo, self.flags, self.max_abs,
            numpy.int32(self.count_bits), numpy.int32(self.low_bits),
        )

    def finish(self, dtype: Any) -> Any:
        """The sums as the gradient: a new array ``[*shape]`` of ``dtype``."""
        out = self.rt.xp.empty(self.shape, dtype=dtype)
        if self.total == 0:
            return out
        index64 = launch.use_index64(self.total)
        grid, block = launch.grid(self.total)
        self.rt.function(launch.kernel_name("roi_fixed_finish", dtype, index64))(
            grid,
            block,
            (
                self.hi, self.lo, self.flags, self.max_abs,
                launch.index_scalar(index64)(self.total),
                numpy.int32(self.count_bits), numpy.int32(self.low_bits), out,
            ),
        )
        return out


def twin(kernel: str, accumulators: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    """For a backward kernel with a ``<kernel>_deterministic`` twin (RoI Align's, RoI Pool's): the
    kernel to launch for :func:`accumulate`'s ``accumulators`` and the parameters it takes of
    them (``grad_input`` for the atomic one, the fixed-point words for the twin)."""
    grad_input, *fixed_point = accumulators
    if grad_input is None:
        return f"{kernel}_deterministic", tuple(fixed_point)
    return kernel, (grad_input,)


def accumulate(
    rt: Any,
    shape: tuple[int, ...],
    grad_output: Any,
    deterministic: bool,
    sources: int,
    terms: int,
    launch_with: Callable[[tuple[Any, ...]], None],
) -> Any:
    """A gradient ``[*shape]`` summed by one backward launch that takes either accumulator.

    ``launch_with(accumulators)`` launches the kernel with ``accumulators`` in its parameter list:
    ``(grad_input, hi, lo, flags, max_abs, count_bits, low_bits)``, where ``grad_input`` (of the
    compute dtype, for atomicAdd) is None with ``deterministic`` and the fixed-point words are
    None without it. It is not called when there is nothing to sum.

    Args:
        rt: the runtime.
        shape (tuple of int): the gradient's shape.
        grad_output: the backward pass's input; its dtype is the gradient's.
        deterministic (bool): sum in fixed point (:class:`FixedSum`).
        sources, terms (int): as for :class:`FixedSum`.
        launch_with (callable): see above.

    Returns:
        ndarray[*shape] in grad_output's dtype.
    """
    real = launch.compute_dtype(grad_output.dtype)
    work = grad_output.size and math.prod(shape)
    if deterministic:
        sums = FixedSum(rt, shape, real, sources, terms)
        if work:
            sums.measure(grad_output)
            launch_with((None, *sums.sink_args()))
        return sums.finish(grad_output.dtype)
    # Accumulated with atomicAdd in the compute dtype; half is rounded once at the end.
    grad_input = rt.xp.zeros(shape, dtype=real)
    if work:
        launch_with((grad_input, None, None, None, None, numpy.int32(0), numpy.int32(0)))
    return grad_input.astype(grad_output.dtype, copy=False)
