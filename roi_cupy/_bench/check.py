"""The correctness gate in front of every timing: outputs against a float64 reference.

The reference is roi_cupy's NumPy backend run in float64 on the workload's inputs (the float16
reference is rounded to float16 once); RoI Pool's forward runs in the workload's dtype, since its
bin edges depend on the compute dtype and its maxima are exact. An error is the largest absolute difference divided by the
data scale, the largest magnitude in the reference; it must stay within the tolerance of the
output's dtype (for RoI Align in float32, widened by the rounding of sample positions: see
:func:`tolerance`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy

from roi_cupy._bench.workloads import Inputs, Workload

TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3}


@dataclass(frozen=True)
class Verdict:
    """Outcome of one comparison: ``ok``, the worst scaled error, and a one-line account."""

    ok: bool
    max_error: float
    tolerance: float
    detail: str


def reference(workload: Workload, inputs: Inputs, pass_: str) -> dict[str, numpy.ndarray]:
    """The float64 results a pass must reproduce (``output`` and/or ``grad_input``).

    Raises:
        ImportError: when roi_cupy's NumPy backend is not importable or incomplete.
    """
    from roi_cupy import ops
    from roi_cupy._bench.backends import probe_numpy_backend

    missing = probe_numpy_backend()
    if missing:
        raise ImportError(missing)

    w = workload
    x = inputs.features.astype(numpy.float64)
    g = inputs.grad_output.astype(numpy.float64)
    rois = inputs.rois.astype(numpy.float64)
    want: dict[str, numpy.ndarray] = {}
    if w.op == "roi_align":
        if pass_ in ("forward", "fwd+bwd"):
            want["output"] = ops.roi_align(x, rois, w.output_size, w.spatial_scale,
                                           w.sampling_ratio, w.aligned)
        if pass_ in ("backward", "fwd+bwd"):
            want["grad_input"] = ops.roi_align_backward(g, rois, w.input_shape, w.output_size,
                                                        w.spatial_scale, w.sampling_ratio,
                                                        w.aligned)
    else:
        # RoI Pool's bin edges are computed in the compute dtype (float32 for float32 features,
        # as torchvision does too), and float64 can put an edge one pixel further; the maxima
        # themselves are exact. So its reference runs on the workload's own arrays, and only
        # the gradient is summed in float64.
        out, argmax = ops.roi_pool(inputs.features, inputs.rois, w.output_size, w.spatial_scale,
                                   return_indices=True)
        if pass_ in ("forward", "fwd+bwd"):
            want["output"] = out.astype(numpy.float64)
        if pass_ in ("backward", "fwd+bwd"):
            want["grad_input"] = ops.roi_pool_backward(g, rois, argmax, w.input_shape)
    return want


def tolerance(workload: Workload, inputs: Inputs) -> float:
    """The bound on a workload's scaled error: its dtype's, and for RoI Align in float32 also
    the rounding of the sample positions.

    float32 holds a sample position (in feature pixels) to about an ulp of its coordinate,
    ``eps * |c|``, where the float64 reference places it exactly. The workloads' features are
    standard normal, neighbouring pixels about the data scale apart, so a position off by ``d``
    pixels moves a result by about ``d`` of the scale: the bound grows by ``eps`` times the
    largest coordinate (1e-5 becomes 4.6e-5 on a map 304 pixels wide). torchvision's float32
    kernels round their positions the same way.
    """
    tol = TOLERANCE[workload.dtype]
    if workload.dtype == "float32" and workload.op == "roi_align":
        corner = float(numpy.abs(inputs.rois[:, 1:]).max(initial=0.0)) * workload.spatial_scale
        tol += float(numpy.finfo(numpy.float32).eps) * corner
    return tol


def compare(got: dict[str, numpy.ndarray], want: dict[str, numpy.ndarray],
            dtype: str, tol: float | None = None) -> Verdict:
    """Check every array of ``want`` against ``got``: dtype, shape, then scaled error.

    Args:
        got: a backend's results by name (``output``, ``grad_input``).
        want: the float64 reference by the same names.
        dtype (str): the workload's dtype, which every result must have.
        tol (float or None): the bound on the scaled error (:func:`tolerance`); None: the
            dtype's. Default: None.
    """
    tol = TOLERANCE[dtype] if tol is None else tol
    worst, problems = 0.0, []
    for name, ref in want.items():
        value = got.get(name)
        if value is None:
            problems.append(f"{name} missing")
            continue
        if value.dtype != numpy.dtype(dtype) or value.shape != ref.shape:
            problems.append(f"{name} is {value.dtype}{list(value.shape)}, expected "
                            f"{dtype}{list(ref.shape)}")
            continue
        ref_rounded = ref.astype(dtype).astype(numpy.float64)
        scale = float(numpy.max(numpy.abs(ref_rounded), initial=0.0)) or 1.0
        diff = numpy.abs(value.astype(numpy.float64) - ref_rounded)
        err = float(numpy.max(diff, initial=0.0)) / scale
        if not numpy.isfinite(err) or not numpy.isfinite(value).all():
            problems.append(f"{name} has non-finite values")
            worst = float("inf")
            continue
        worst = max(worst, err)
        if err > tol:
            where = numpy.unravel_index(int(numpy.argmax(diff)), diff.shape)
            problems.append(f"{name} error {err:.2e} > {tol:.1e} at {list(map(int, where))}")
    if problems:
        return Verdict(False, worst, tol, "; ".join(problems))
    return Verdict(True, worst, tol, f"max error {worst:.1e} <= {tol:.1e}")
