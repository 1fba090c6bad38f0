"""The implementations the runner times, each behind one small adapter.

A :class:`Backend` says whether it can run here (and why not), and for a workload builds a
:class:`Runner` whose ``forward(i)``, ``backward(i)`` and ``fwd_bwd(i)`` make one call each on
copy ``i`` of the rotated inputs. roi_cupy goes through its public functions (``roi_cupy.ops``),
so the host-side checks a user pays for are timed too; ``validate`` is part of the backend's name.
"""
from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy

from roi_cupy._bench import timing
from roi_cupy._bench.workloads import Inputs, Workload
from roi_cupy._cuda import NO_GPU

NAMES = (
    "roi_cupy-cuda",
    "roi_cupy-cuda(validate=False)",
    "roi_cupy-cuda(validate=False,deterministic=True)",
    "torchvision-cuda",
    "roi_cupy-numpy",
    "roi_cupy-numpy(validate=False)",
    "torchvision-cpu",
)


# ----------------------------------------------------------------------------- library probes
@functools.lru_cache(maxsize=1)
def load_torchvision() -> tuple[Any, Any]:
    """``(torch, torchvision.ops)``, through the local ``tvref`` loader where a plain import fails.

    Raises:
        ImportError: when neither works; the message carries both reasons.
    """
    try:
        import torch
        import torchvision.ops

        return torch, torchvision.ops
    except Exception as plain:  # a broken torchvision install fails with OSError or RuntimeError
        try:
            import tvref
        except ImportError:
            raise ImportError(f"torchvision is not importable ({plain})") from plain
        # The failed import leaves a half-initialised torchvision behind; the loader starts afresh.
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        try:
            return tvref.load()
        except Exception as exc:
            raise ImportError(f"torchvision is not importable ({plain}; tvref: {exc})") from exc


def set_torch_threads(count: int) -> None:
    """Let torch's CPU kernels use ``count`` threads (nothing to do without torch)."""
    try:
        torch, _ = load_torchvision()
    except ImportError:
        return
    torch.set_num_threads(count)


def probe_roi_cupy_cuda() -> str | None:
    """None when roi_cupy's CUDA backend can run here, else the reason it cannot."""
    try:
        from roi_cupy import _cuda
    except ImportError as exc:
        return f"roi_cupy._cuda is not importable ({exc})"
    available = getattr(_cuda, "available", None)
    if available is None:
        return "roi_cupy._cuda has no available()"
    try:
        answer = available()
    except Exception as exc:
        return f"roi_cupy._cuda.available() raised {type(exc).__name__}: {exc}"
    if isinstance(answer, tuple):
        ok, reason = bool(answer[0]), (str(answer[1]) if len(answer) > 1 else "")
    else:
        ok, reason = bool(answer), ""
    if ok:
        return None
    return reason or "roi_cupy._cuda.available() says no"


_CONTRACT = ("roi_align_forward", "roi_align_backward", "roi_pool_forward", "roi_pool_backward")


def probe_numpy_backend() -> str | None:
    """None when roi_cupy's NumPy backend is importable and complete, else what is missing."""
    try:
        module = importlib.import_module("roi_cupy._numpy")
    except ImportError as exc:
        return f"roi_cupy's NumPy backend is not importable ({exc})"
    missing = [f for f in _CONTRACT if not hasattr(module, f)]
    if missing:
        return f"roi_cupy's NumPy backend lacks {', '.join(missing)}"
    return None


def probe_torchvision(device: str) -> str | None:
    try:
        torch, _ = load_torchvision()
    except ImportError as exc:
        return str(exc)
    if device == "cuda" and not torch.cuda.is_available():
        return f"{NO_GPU}; torch.cuda.is_available() is False"
    return None


# ----------------------------------------------------------------------------- runners
class Runner:
    """One backend set up for one workload: rotated device copies of the inputs and the calls.

    Each call method takes the repetition index and uses input copy ``i % copies``.
    """

    copies: int = 1

    def forward(self, i: int) -> Any:
        raise NotImplementedError

    def backward(self, i: int) -> Any:
        raise NotImplementedError

    def fwd_bwd(self, i: int) -> Any:
        raise NotImplementedError

    def to_numpy(self, array: Any) -> numpy.ndarray:
        raise NotImplementedError

    def call(self, pass_: str) -> Callable[[int], Any]:
        return {"forward": self.forward, "backward": self.backward, "fwd+bwd": self.fwd_bwd}[pass_]

    def results(self, pass_: str) -> dict[str, numpy.ndarray]:
        """Run the pass once on copy 0 and return its outputs (``output``, ``grad_input``)."""
        value = self.call(pass_)(0)
        if pass_ == "forward":
            return {"output": self.to_numpy(value)}
        if pass_ == "backward":
            return {"grad_input": self.to_numpy(value)}
        return {"output": self.to_numpy(value[0]), "grad_input": self.to_numpy(value[1])}


class RoiCupyRunner(Runner):
    """roi_cupy's public ops on NumPy (the NumPy backend) or CuPy (the CUDA backend) arrays."""

    def __init__(
        self,
        xp: Any,
        workload: Workload,
        inputs: Inputs,
        copies: int,
        validate: bool,
        deterministic: bool = False,
    ):
        from roi_cupy import ops

        self.ops, self.xp, self.w, self.validate, self.copies = ops, xp, workload, validate, copies
        self.deterministic = deterministic
        self.x = [xp.array(inputs.features) for _ in range(copies)]
        self.g = [xp.array(inputs.grad_output) for _ in range(copies)]
        self.rois = xp.asarray(inputs.rois)
        if workload.op == "roi_pool":
            _, argmax = self._pool(self.x[0], return_indices=True)
            self.argmax = [argmax.copy() for _ in range(copies)]

    def _align(self, x: Any) -> Any:
        w = self.w
        return self.ops.roi_align(x, self.rois, w.output_size, w.spatial_scale, w.sampling_ratio,
                                  w.aligned, validate=self.validate)

    def _pool(self, x: Any, return_indices: bool = False) -> Any:
        w = self.w
        return self.ops.roi_pool(x, self.rois, w.output_size, w.spatial_scale,
                                 return_indices=return_indices, validate=self.validate)

    def _align_backward(self, g: Any) -> Any:
        w = self.w
        return self.ops.roi_align_backward(g, self.rois, w.input_shape, w.output_size,
                                           w.spatial_scale, w.sampling_ratio, w.aligned,
                                           validate=self.validate,
                                           deterministic=self.deterministic)

    def _pool_backward(self, g: Any, argmax: Any) -> Any:
        return self.ops.roi_pool_backward(g, self.rois, argmax, self.w.input_shape,
                                          validate=self.validate,
                                          deterministic=self.deterministic)

    def forward(self, i: int) -> Any:
        x = self.x[i % self.copies]
        return self._align(x) if self.w.op == "roi_align" else self._pool(x)

    def backward(self, i: int) -> Any:
        g = self.g[i % self.copies]
        if self.w.op == "roi_align":
            return self._align_backward(g)
        return self._pool_backward(g, self.argmax[i % self.copies])

    def fwd_bwd(self, i: int) -> Any:
        x, g = self.x[i % self.copies], self.g[i % self.copies]
        if self.w.op == "roi_align":
            return self._align(x), self._align_backward(g)
        out, argmax = self._pool(x, return_indices=True)
        return out, self._pool_backward(g, argmax)

    def to_numpy(self, array: Any) -> numpy.ndarray:
        return numpy.asarray(array) if self.xp is numpy else self.xp.asnumpy(array)


class TorchvisionRunner(Runner):
    """torchvision.ops on torch tensors; gradients through autograd on the features.

    torchvision wants the boxes in the features' dtype; the workloads draw float16-exact boxes for
    float16 features, so every library sees the same boxes.
    """

    def __init__(self, torch: Any, tv_ops: Any, device: str, workload: Workload, inputs: Inputs,
                 copies: int):
        self.torch, self.tv, self.w, self.copies = torch, tv_ops, workload, copies
        features = torch.from_numpy(inputs.features)
        self.x = [features.to(device).clone().requires_grad_(True) for _ in range(copies)]
        self.x_frozen = [x.detach() for x in self.x]
        self.g = [torch.from_numpy(inputs.grad_output).to(device).clone() for _ in range(copies)]
        self.rois = torch.from_numpy(inputs.rois).to(device=device, dtype=features.dtype)
        # One output whose graph the backward pass differentiates again and again: the backward
        # kernels read grad_output (rotated) and the boxes, never the features.
        self.out = self._op(self.x[0])

    def _op(self, x: Any) -> Any:
        w = self.w
        if w.op == "roi_align":
            return self.tv.roi_align(x, self.rois, w.output_size, w.spatial_scale,
                                     w.sampling_ratio, w.aligned)
        return self.tv.roi_pool(x, self.rois, w.output_size, w.spatial_scale)

    def forward(self, i: int) -> Any:
        with self.torch.no_grad():
            return self._op(self.x_frozen[i % self.copies])

    def backward(self, i: int) -> Any:
        g = self.g[i % self.copies]
        return self.torch.autograd.grad(self.out, self.x[0], g, retain_graph=True)[0]

    def fwd_bwd(self, i: int) -> Any:
        k = i % self.copies
        out = self._op(self.x[k])
        return out, self.torch.autograd.grad(out, self.x[k], self.g[k])[0]

    def to_numpy(self, array: Any) -> numpy.ndarray:
        return array.detach().cpu().numpy()


# ----------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class Backend:
    """A timed implementation.

    Attributes:
        name (str): one of :data:`NAMES`.
        library (str): ``"roi_cupy"`` or ``"torchvision"``.
        device (str): ``"cuda"`` or ``"cpu"``.
        validate (bool or None): roi_cupy's ``validate`` argument; None for torchvision.
        deterministic (bool): roi_cupy's backward passes with ``deterministic=True``.
    """

    name: str
    library: str
    device: str
    validate: bool | None
    deterministic: bool = False

    def probe(self) -> str | None:
        """None when this backend can run here, else why not."""
        if self.library == "torchvision":
            return probe_torchvision(self.device)
        if self.device == "cuda":
            return probe_roi_cupy_cuda()
        return probe_numpy_backend()

    def prepare(self, workload: Workload, inputs: Inputs) -> Runner:
        """Move the inputs to the device (rotated where they would stay cache-hot)."""
        copies = timing.rotation_copies(
            inputs.features.nbytes + inputs.grad_output.nbytes, self.cache_bytes()
        )
        if self.library == "torchvision":
            torch, tv_ops = load_torchvision()
            return TorchvisionRunner(torch, tv_ops, self.device, workload, inputs, copies)
        if self.device == "cuda":
            import cupy

            return RoiCupyRunner(
                cupy, workload, inputs, copies, bool(self.validate), self.deterministic
            )
        return RoiCupyRunner(numpy, workload, inputs, copies, bool(self.validate))

    def cache_bytes(self) -> int:
        if self.device == "cpu":
            return timing.cpu_cache_bytes()
        if self.library == "torchvision":
            torch, _ = load_torchvision()
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            return int(getattr(props, "L2_cache_size", 0) or 50 << 20)
        import cupy

        return int(cupy.cuda.Device().attributes.get("L2CacheSize", 50 << 20))

    def clock(self) -> timing.CpuClock | timing.CudaClock:
        """A fresh clock for this backend's calls (events of its own library on a GPU)."""
        if self.device == "cpu":
            return timing.CpuClock()
        return timing.torch_clock() if self.library == "torchvision" else timing.cupy_clock()

    def release(self) -> None:
        """Hand cached device memory back, so that the next backend finds the GPU empty."""
        if self.device != "cuda":
            return
        if self.library == "torchvision":
            torch, _ = load_torchvision()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        else:
            import cupy

            cupy.cuda.Device().synchronize()
            cupy.get_default_memory_pool().free_all_blocks()


def all_backends() -> list[Backend]:
    out = []
    for name in NAMES:
        library, _, rest = name.partition("-")
        device = "cuda" if rest.startswith("cuda") else "cpu"
        validate = None if library == "torchvision" else "validate=False" not in name
        out.append(Backend(name, library, device, validate, "deterministic=True" in name))
    return out


def select(names: str | None) -> list[Backend]:
    """Backends by comma-separated names (see :data:`NAMES`); None gives all.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    known = {b.name: b for b in all_backends()}
    if not names:
        return list(known.values())
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in known:
            raise ValueError(f"backends must be among {', '.join(NAMES)}; got {name!r}")
        if known[name] not in chosen:
            chosen.append(known[name])
    return chosen


def peer_of(backend: Backend) -> str:
    """The torchvision backend on the same device, the yardstick of the ratio column."""
    return f"torchvision-{backend.device}"


def gpu_present() -> bool:
    """Whether any CUDA device is reachable through CuPy or torch."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return True
    except Exception:  # no CuPy, or CuPy without a driver
        pass
    try:
        torch, _ = load_torchvision()
        return bool(torch.cuda.is_available())
    except Exception:
        return False
