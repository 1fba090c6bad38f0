"""The CUDA backend: kernel sources, their compilation, and launchers (CuPy is imported lazily)."""
from __future__ import annotations


def available() -> tuple[bool, str]:
    """Whether CuPy imports and sees a CUDA device, and if not, why.

    Returns:
        (bool, str): ``(True, "")`` or ``(False, reason)``. Never raises.
    """
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA installation found at import
        return False, f"CuPy is not importable: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, or one too old for CuPy's CUDA runtime
        return False, f"CuPy finds no usable CUDA device: {exc}"
    if count < 1:
        return False, "CuPy finds no CUDA device"
    return True, ""
