"""The CUDA backend: kernel sources, their compilation, and launchers (CuPy is imported lazily)."""
from __future__ import annotations

NO_GPU = "no usable NVIDIA GPU was found"


def available() -> tuple[bool, str]:
    """Whether CuPy imports and sees a CUDA device, and if not, why.

    Returns:
        (bool, str): ``(True, "")`` or ``(False, reason)``. Without a device the reason starts
        with :data:`NO_GPU` and goes on with CuPy's own words (e.g. its
        ``cudaErrorInsufficientDriver``, which is also what a machine without any GPU gets).
        Never raises.
    """
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA installation found at import
        return False, (
            f"CuPy is not importable ({exc}): pip install 'roi_cupy[cuda13]' (or [cuda12])"
        )
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, or one too old for CuPy's CUDA runtime
        return False, f"{NO_GPU}; CuPy says: {exc}"
    if count < 1:
        return False, f"{NO_GPU}; CuPy sees no CUDA device"
    return True, ""
