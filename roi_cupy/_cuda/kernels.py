"""The CUDA kernel source, its template instantiations, and the compiled module of each device.

The emulator compiles the same :func:`source` with the same :data:`NAME_EXPRESSIONS`, so nothing
here imports CuPy before :func:`module` is called.
"""
from __future__ import annotations

import functools
import pathlib
import re
from typing import Any

# Header first: the .cu files' own #include of it is dropped when they are concatenated.
_FILES = (
    "roi_common.cuh",
    "roi_align.cu",
    "roi_pool.cu",
    "roi_check.cu",
    "roi_fixed.cu",
    "ps_roi_align.cu",
    "ps_roi_pool.cu",
    "multi_scale_roi_align.cu",
    "roi_align_rotated.cu",
)
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"roi_common\.cuh"\s*$', re.MULTILINE)

KERNELS = (
    "roi_align_forward",
    "roi_align_backward",
    "roi_align_backward_deterministic",
    "roi_pool_forward",
    "roi_pool_backward",
    "roi_pool_backward_deterministic",
    "roi_check",
    "roi_abs_max",
    "roi_fixed_finish",
    "ps_roi_align_forward",
    "ps_roi_align_backward",
    "ps_roi_pool_forward",
    "ps_roi_pool_backward",
    "roi_align_max_forward",
    "roi_align_max_backward",
    "roi_align_max_backward_deterministic",
    "multi_scale_roi_align_forward",
    "multi_scale_roi_align_backward",
    "roi_align_rotated_forward",
    "roi_align_rotated_backward",
)
# Storage dtype -> the kernel's scalar type T; the compute type is float for all but float64.
SCALAR_TYPES = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "float64": "double",
}
INDEX_TYPES = ("int", "long long")
# roi_check reads only the RoIs, which are always of a compute dtype (float32 or float64).
_CHECK_DTYPES = ("float32", "float64")

# Kernels templated on the index type alone.
INDEX_KERNELS = ("roi_check_indices",)

NAME_EXPRESSIONS: tuple[str, ...] = tuple(
    f"{kernel}<{SCALAR_TYPES[dtype]}, {index}>"
    for kernel in KERNELS
    for dtype in (_CHECK_DTYPES if kernel == "roi_check" else SCALAR_TYPES)
    for index in INDEX_TYPES
) + tuple(f"{kernel}<{index}>" for kernel in INDEX_KERNELS for index in INDEX_TYPES)

# What cupy.RawModule gets (CuPy itself adds -ftz=true and the target architecture).
COMPILE_OPTIONS = ("-std=c++17",)


def name_expression(kernel: str, dtype: Any, index64: bool) -> str:
    """The instantiation of ``kernel`` for storage ``dtype`` (None for a kernel of
    :data:`INDEX_KERNELS`) and the 32- or 64-bit index path.

    Raises:
        TypeError: for a dtype the kernels do not handle.
    """
    if kernel in INDEX_KERNELS:
        return f"{kernel}<{INDEX_TYPES[index64]}>"
    name = getattr(dtype, "name", str(dtype))
    if name not in SCALAR_TYPES or (kernel == "roi_check" and name not in _CHECK_DTYPES):
        raise TypeError(
            f"the CUDA kernels take float16, bfloat16, float32 or float64 arrays, got {name}"
        )
    return f"{kernel}<{SCALAR_TYPES[name]}, {INDEX_TYPES[index64]}>"


def source_dir() -> pathlib.Path:
    """The folder holding the kernel sources: the installed package's copy
    (``roi_cupy/cuda/``) when there is one, else ``cuda/`` of the source checkout."""
    package = pathlib.Path(__file__).resolve().parents[1]
    for folder in (package / "cuda", package.parent / "cuda"):
        if all((folder / name).is_file() for name in _FILES):
            return folder
    raise FileNotFoundError(
        f"the CUDA kernel sources {', '.join(_FILES)} are neither in {package / 'cuda'} "
        f"nor in {package.parent / 'cuda'}"
    )


def source_files() -> list[pathlib.Path]:
    """The kernel source files, header first, in the order :func:`source` joins them."""
    folder = source_dir()
    return [folder / name for name in _FILES]


def source() -> str:
    """All kernels as one translation unit: roi_common.cuh, then each .cu file.

    Read as text and joined (not ``#include``-d) because CuPy's on-disk cache hashes the source
    text only: an edited header must change the text that is compiled.
    """
    parts = []
    for path in source_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        parts.append(f"// ---- {path.name}\n" + _LOCAL_INCLUDE.sub("", text))
    return "\n".join(parts)


def module(device_id: int) -> Any:
    """The compiled ``cupy.RawModule`` of every kernel for CUDA device ``device_id``.

    Compiled once per device and process (CuPy also caches the binary on disk).
    """
    import cupy

    with cupy.cuda.Device(device_id):
        return _compile_for_current_device()()


@functools.cache
def _compile_for_current_device() -> Any:
    import cupy

    @cupy.memoize(for_each_device=True)
    def compile() -> Any:
        return cupy.RawModule(
            code=source(), options=COMPILE_OPTIONS, name_expressions=NAME_EXPRESSIONS
        )

    return compile
