"""Build, cache, load and launch CUDA kernels compiled for the CPU.

The kernel source is compiled unmodified as C++20 by the host compiler (``$CXX``, else ``g++``)
together with the shim in ``shim/``: ``roi_emulator.h`` (force-included: CUDA's qualifiers,
built-in variables, atomics and math on the CPU), ``cuda_fp16.h`` (``__half``), ``cuda_bf16.h``
(``__nv_bfloat16``) and ``roi_emulator_launch.h`` (the launcher that runs each CUDA thread as a
fiber). For every name expression the generated translation unit exports one ``extern "C"``
launch function.

Libraries are cached on disk under ``$ROI_CUPY_EMULATOR_CACHE``, else
``$XDG_CACHE_HOME/roi_cupy/emulator``, else ``~/.cache/roi_cupy/emulator``, keyed by a hash of
the translation unit, the shim, the compiler flags and the compiler's identity, and written under
a temporary name then renamed, so concurrent processes never load a half-written library. A
SHA-256 digest beside each library is checked before it is used: a damaged one is rebuilt, never
loaded. Build folders of compiles that were killed are removed by the next build.

``ROI_CUPY_EMULATOR_SANITIZE=address`` builds with AddressSanitizer (a separate cache entry), which
turns any out-of-bounds access by a kernel into an abort with a report. The ASan runtime must then
be loaded first: ``LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0``.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import operator
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy

SHIM_DIR = pathlib.Path(__file__).resolve().with_name("shim")
_PRELUDE = "roi_emulator.h"
_LAUNCHER = "roi_emulator_launch.h"
_FORMAT = "roi_cupy-emulator-2"  # bump when the generated code changes shape

_COMMON_FLAGS = (
    "-std=c++20",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
    "-ffp-contract=off",  # no fused multiply-add: the same numbers on every host
    "-fno-math-errno",
)
_PLAIN_FLAGS = ("-O2",)
_ASAN_FLAGS = ("-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer")

# CUDA's launch limits, so that launch code that a GPU would refuse fails here too.
_MAX_GRID = (2**31 - 1, 65535, 65535)
_MAX_BLOCK = (1024, 1024, 64)
_MAX_THREADS_PER_BLOCK = 1024
_ERROR_BYTES = 1024
_ASAN_SUFFIX = "-asan.so"
_SCRATCH = ".build-"  # build folders: .build-<pid>-<random>

_lock = threading.Lock()
_loaded: dict[pathlib.Path, Library] = {}
_identities: dict[tuple[str, ...], str] = {}


class CompilerMissing(RuntimeError):
    """No C++ compiler was found."""


def compiler() -> list[str]:
    """The compiler command: ``$CXX`` (split like a shell would), else ``g++``."""
    return shlex.split(os.environ.get("CXX", "").strip() or "g++")


def sanitizer() -> str | None:
    """``"address"`` when ``ROI_CUPY_EMULATOR_SANITIZE`` asks for AddressSanitizer, else None.

    Raises:
        ValueError: for any other non-empty value.
    """
    value = os.environ.get("ROI_CUPY_EMULATOR_SANITIZE", "").strip()
    if value in ("", "0", "none"):
        return None
    if value != "address":
        raise ValueError(f"ROI_CUPY_EMULATOR_SANITIZE must be 'address' or empty, got {value!r}")
    return value


def cache_dir() -> pathlib.Path:
    """Where built libraries are kept (see the module docstring)."""
    explicit = os.environ.get("ROI_CUPY_EMULATOR_CACHE")
    if explicit:
        return pathlib.Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "roi_cupy" / "emulator"


def flags(sanitize: str | None) -> tuple[str, ...]:
    """The compiler flags for a plain or an AddressSanitizer build."""
    return _COMMON_FLAGS + (_ASAN_FLAGS if sanitize == "address" else _PLAIN_FLAGS)


def _identity(command: list[str]) -> str:
    """The compiler command, its resolved path and its ``--version`` text (in the cache key)."""
    key = tuple(command)
    if key not in _identities:
        path = shutil.which(command[0])
        if path is None:
            raise CompilerMissing(
                f"the emulator needs a C++20 compiler (g++ >= 11): {command[0]!r} was not found; "
                "set CXX or install g++"
            )
        try:
            version = subprocess.run(
                [path, *command[1:], "--version"], capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise CompilerMissing(
                f"the emulator needs a C++20 compiler (g++ >= 11): {command[0]!r} does not run "
                f"({exc}); set CXX or install g++"
            ) from exc
        _identities[key] = f"{shlex.join(command)}\n{os.path.realpath(path)}\n{version}"
    return _identities[key]


def translation_unit(source: str, name_expressions: Sequence[str]) -> str:
    """The C++ file that is compiled: the kernel source, the launcher and one entry point each.

    Entry point ``roi_emu_launch_<i>`` launches ``name_expressions[i]``.
    """
    lines = [
        "// Generated by roi_cupy._emulator.runtime.",
        '#line 1 "kernels.cu"',
        source,
        '#line 1 "entry_points.cpp"',
        f'#include "{_LAUNCHER}"',
    ]
    for i, name in enumerate(name_expressions):
        lines += [
            f"ROI_EMU_EXPORT int roi_emu_launch_{i}(",
            "    const unsigned int* grid, const unsigned int* block, void** args,",
            "    const char* kinds, const size_t* sizes, const char* element_kinds,",
            "    const size_t* element_sizes, int count, char* error, size_t error_size) {",
            f"  return roi_emu::launch(&{name}, grid, block, args, kinds, sizes, element_kinds,",
            "                         element_sizes, count, error, error_size);",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _shim_digest() -> bytes:
    digest = hashlib.sha256()
    for path in sorted(SHIM_DIR.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.digest()


def build(
    source: str, name_expressions: Sequence[str], *, sanitize: str | None = None
) -> pathlib.Path:
    """Compile ``source`` for the CPU (or find it in the cache) and return the library's path.

    Args:
        source (str): CUDA C++ source text that defines every kernel named in
            ``name_expressions``.
        name_expressions (sequence of str): kernel instantiations such as
            ``"roi_align_forward<float, int>"``.
        sanitize (str or None): ``"address"`` for an AddressSanitizer build. Default: None.

    Raises:
        CompilerMissing: when the compiler cannot be found or run.
        RuntimeError: when the source does not compile; the message holds the compiler output.
    """
    command = compiler()
    identity = _identity(command)
    unit = translation_unit(source, name_expressions)
    all_flags = flags(sanitize)
    key = hashlib.sha256()
    for part in (_FORMAT, unit, "\0".join(all_flags), identity):
        key.update(part.encode() + b"\0")
    key.update(_shim_digest())
    directory = cache_dir()
    suffix = _ASAN_SUFFIX if sanitize else ".so"
    target = directory / f"kernels-{key.hexdigest()[:32]}{suffix}"
    if _intact(target):
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(
            f"cannot create the emulator cache {directory} ({exc}); "
            "set ROI_CUPY_EMULATOR_CACHE to a writable directory"
        ) from exc
    _remove_abandoned_builds(directory)
    prefix = f"{_SCRATCH}{os.getpid()}-"
    with tempfile.TemporaryDirectory(dir=directory, prefix=prefix) as scratch:
        cpp = pathlib.Path(scratch) / "kernels.cpp"
        cpp.write_text(unit)
        library = pathlib.Path(scratch) / target.name
        result = subprocess.run(
            [
                *command,
                *all_flags,
                "-I",
                str(SHIM_DIR),
                "-include",
                str(SHIM_DIR / _PRELUDE),
                str(cpp),
                "-o",
                str(library),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"the emulator could not compile the kernels with {shlex.join(command)} "
                f"(exit status {result.returncode}):\n{result.stderr.strip()}"
            )
        # The digest goes first and the library last, each renamed atomically: a reader sees
        # the old state or a library whose digest matches (see _intact).
        digest = pathlib.Path(scratch) / "digest"
        digest.write_text(_digest(library))
        os.replace(digest, _digest_path(target))
        os.replace(library, target)
    return target


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_path(library: pathlib.Path) -> pathlib.Path:
    return library.with_name(library.name + ".sha256")


def _intact(library: pathlib.Path) -> bool:
    """Whether ``library`` is in the cache whole: its bytes match the digest written beside it.

    A truncated or damaged library (a full disk, a copy cut short) would load, then crash the
    process with SIGBUS or SIGSEGV when a page past its end is touched: it is rebuilt instead.
    """
    try:
        return _digest(library) == _digest_path(library).read_text().strip()
    except OSError:
        return False


def _remove_abandoned_builds(directory: pathlib.Path) -> None:
    """Remove build folders left by processes that no longer run (a compile killed midway never
    reaches its own clean-up). Folders of running processes are left alone."""
    for scratch in directory.glob(f"{_SCRATCH}*"):
        pid = scratch.name[len(_SCRATCH) :].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def asan_preload_hint() -> str:
    """The environment a Python process needs to load AddressSanitizer builds."""
    runtime = subprocess.run(
        [*compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True
    ).stdout.strip()
    return f"LD_PRELOAD={runtime} ASAN_OPTIONS=detect_leaks=0"


def load(path: pathlib.Path, name_expressions: Sequence[str]) -> Library:
    """Load a library built by :func:`build` (once per process and path).

    Raises:
        RuntimeError: for an AddressSanitizer build in a process without the ASan runtime (loading
            it would abort the process).
    """
    if path.name.endswith(_ASAN_SUFFIX) and not hasattr(ctypes.CDLL(None), "__asan_init"):
        raise RuntimeError(
            "ROI_CUPY_EMULATOR_SANITIZE=address needs the AddressSanitizer runtime loaded first: "
            f"run Python with {asan_preload_hint()}"
        )
    with _lock:
        if path not in _loaded:
            _loaded[path] = Library(path, name_expressions)
        return _loaded[path]


class Library:
    """A loaded emulator library: one launch function per name expression."""

    def __init__(self, path: pathlib.Path, name_expressions: Sequence[str]):
        self.path = path
        self._cdll = ctypes.CDLL(str(path))
        self._kernels: dict[str, Kernel] = {}
        for i, name in enumerate(name_expressions):
            entry = getattr(self._cdll, f"roi_emu_launch_{i}")
            entry.restype = ctypes.c_int
            entry.argtypes = [
                ctypes.POINTER(ctypes.c_uint),
                ctypes.POINTER(ctypes.c_uint),
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.c_char_p,
                ctypes.POINTER(ctypes.c_size_t),
                ctypes.c_char_p,
                ctypes.POINTER(ctypes.c_size_t),
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_size_t,
            ]
            self._kernels[name] = Kernel(name, entry)
        self._set_block_order = self._cdll.roi_emu_set_block_order
        self._set_block_order.restype = None
        self._set_block_order.argtypes = [ctypes.c_ulonglong]

    @contextlib.contextmanager
    def block_order(self, seed: int) -> Iterator[None]:
        """Run the blocks of every launch inside the ``with`` block in a shuffled order (seeded by
        ``seed``; 0 keeps index order), as a GPU may run them, for tests that a result does not
        depend on that order. Process-wide while it lasts: for tests only."""
        self._set_block_order(seed)
        try:
            yield
        finally:
            self._set_block_order(0)

    def function(self, name_expression: str) -> Kernel:
        """The launcher of one kernel instantiation.

        Raises:
            KeyError: for a name expression the library was not built with.
        """
        try:
            return self._kernels[name_expression]
        except KeyError:
            raise KeyError(
                f"no emulated kernel {name_expression!r}; known: {', '.join(self._kernels)}"
            ) from None


def _dims(what: str, value: Any, limits: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        dims = tuple(operator.index(v) for v in value)
    except TypeError:
        dims = ()
    if len(dims) != 3:
        raise ValueError(f"{what} must be three ints, got {value!r}")
    if any(not 1 <= d <= limit for d, limit in zip(dims, limits)):
        raise ValueError(f"{what} must be positive and at most {limits}, got {dims}")
    return dims


class Kernel:
    """``kernel(grid, block, args)`` runs one kernel instantiation on the CPU.

    ``args`` holds C-contiguous NumPy arrays (passed as pointers to their data) and NumPy scalars
    (passed by value). The launcher checks every argument against the kernel's parameter types
    (count, kind and byte size of scalars, element kind and size of arrays, no read-only array
    behind a non-const pointer) before it runs.
    """

    def __init__(self, name: str, entry: Callable[..., int]):
        self.name = name
        self._entry = entry

    def __repr__(self) -> str:
        return f"<emulated kernel {self.name}>"

    def __call__(self, grid: Sequence[int], block: Sequence[int], args: Sequence[Any]) -> None:
        """Launch on the CPU; returns when every block has run.

        Raises:
            ValueError: for an invalid grid or block, or an array that is not C-contiguous.
            TypeError: for an argument that is neither a NumPy array, a NumPy scalar nor None
                (a null pointer).
            RuntimeError: when the arguments do not match the kernel's parameters, or the kernel
                deadlocks at ``__syncthreads``; the message starts with the kernel's name.
        """
        grid = _dims(f"{self.name}: grid", grid, _MAX_GRID)
        block = _dims(f"{self.name}: block", block, _MAX_BLOCK)
        if block[0] * block[1] * block[2] > _MAX_THREADS_PER_BLOCK:
            raise ValueError(
                f"{self.name}: a block must have at most {_MAX_THREADS_PER_BLOCK} threads, "
                f"got {block}"
            )
        count = len(args)
        pointers = (ctypes.c_void_p * max(count, 1))()  # the slots array arguments point into
        argv = (ctypes.c_void_p * max(count, 1))()
        kinds = bytearray(count)
        sizes = (ctypes.c_size_t * max(count, 1))()
        element_kinds = bytearray(count)
        element_sizes = (ctypes.c_size_t * max(count, 1))()
        scalars = []  # keeps the scalars' bytes alive during the call
        slot = ctypes.sizeof(ctypes.c_void_p)
        for i, arg in enumerate(args):
            if isinstance(arg, numpy.ndarray):
                if not arg.flags.c_contiguous:
                    raise ValueError(
                        f"{self.name}: argument {i} must be a C-contiguous array, "
                        f"got shape {arg.shape} with strides {arg.strides}"
                    )
                pointers[i] = arg.ctypes.data
                argv[i] = ctypes.addressof(pointers) + i * slot
                kinds[i] = ord("p" if arg.flags.writeable else "r")
                sizes[i] = slot
                element_kinds[i] = ord(_kind(arg.dtype))
                element_sizes[i] = arg.dtype.itemsize
            elif arg is None:  # a null pointer, as CuPy passes None
                pointers[i] = None
                argv[i] = ctypes.addressof(pointers) + i * slot
                kinds[i] = ord("n")
                sizes[i] = slot
            elif isinstance(arg, numpy.generic):
                value = numpy.array(arg)
                scalars.append(value)
                argv[i] = value.ctypes.data
                kinds[i] = ord(_kind(value.dtype))
                sizes[i] = value.dtype.itemsize
            else:
                raise TypeError(
                    f"{self.name}: argument {i} must be a NumPy array, a NumPy scalar "
                    f"(numpy.int32, numpy.float32, ...) or None, got {type(arg).__name__}"
                )
        error = ctypes.create_string_buffer(_ERROR_BYTES)
        status = self._entry(
            (ctypes.c_uint * 3)(*grid),
            (ctypes.c_uint * 3)(*block),
            argv,
            bytes(kinds),
            sizes,
            bytes(element_kinds),
            element_sizes,
            count,
            error,
            _ERROR_BYTES,
        )
        if status != 0:
            raise RuntimeError(f"{self.name}: {error.value.decode(errors='replace')}")


def _kind(dtype: numpy.dtype) -> str:
    """The kind the launcher checks a dtype by: NumPy's, and "z" for bfloat16 (ml_dtypes)."""
    return "z" if dtype.name == "bfloat16" else dtype.kind


class PoisonedNumpy:
    """NumPy, except that ``empty`` returns poisoned memory: NaN in floating arrays, and a byte
    pattern (0x5A5A... in every integer) elsewhere.

    GPU memory from an allocator holds whatever was there before, and freshly mapped host memory
    happens to be zeros, which is just what an output left unwritten by a kernel would often be
    expected to hold. Poison makes every element a kernel fails to write show in the results.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(numpy, name)

    @staticmethod
    def empty(shape: Any, dtype: Any = float, order: str = "C") -> numpy.ndarray:
        array = numpy.empty(shape, dtype=dtype, order=order)
        if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
            array.fill(numpy.nan)
        else:
            array.view(numpy.uint8).fill(0x5A)
        return array


class Runtime:
    """The kernel runtime of the emulator: NumPy arrays, kernels run on the CPU.

    Attributes:
        xp (PoisonedNumpy): ``numpy`` with a poisoning ``empty``: it allocates the arrays the
            kernels write.
    """

    xp = PoisonedNumpy()

    def __init__(self, library: Library):
        self.library = library

    def function(self, name_expression: str) -> Kernel:
        """``launch(grid, block, args)`` for one kernel instantiation (see :class:`Kernel`)."""
        return self.library.function(name_expression)
