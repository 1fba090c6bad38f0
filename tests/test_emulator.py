"""The CPU emulator's CUDA semantics, checked with small kernels built by the same machinery.

The RoI operators themselves run on the emulator through the ``backend`` fixture of the operator
tests; this file pins what those tests rely on: indexing, shared memory and barriers, atomics,
__half rounding, argument checking, the build cache, and AddressSanitizer builds.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import pathlib
import shlex
import subprocess
import sys
import textwrap

import numpy
import pytest

import roi_cupy._emulator as emulator

# The module roi_cupy._emulator.runtime (the package attribute of that name is runtime()).
rt = importlib.import_module("roi_cupy._emulator.runtime")

SOURCE = r"""
#include <cuda_fp16.h>

// 12 numbers per thread: threadIdx, blockIdx, blockDim, gridDim.
__global__ void indices(unsigned int* out)
{
    const unsigned int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned int thread =
        threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned int* o = out + 12 * (block * blockDim.x * blockDim.y * blockDim.z + thread);
    o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
    o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
    o[6] = blockDim.x; o[7] = blockDim.y; o[8] = blockDim.z;
    o[9] = gridDim.x; o[10] = gridDim.y; o[11] = gridDim.z;
}

// Reverses each block's slice through shared memory; blocks whose index is not a multiple of
// `every` leave theirs alone (a block-uniform early return, legal around a barrier).
__global__ void reverse(float* data, int every)
{
    __shared__ float buffer[1024];
    if (blockIdx.x % every != 0) return;
    const unsigned int n = blockDim.x * blockDim.y;
    const unsigned int t = threadIdx.x + blockDim.x * threadIdx.y;
    float* slice = data + blockIdx.x * n;
    buffer[t] = slice[t];
    __syncthreads();
    slice[t] = buffer[n - 1 - t];
}

// Tree sum of each block's slice (blockDim.x a power of two): one barrier per level.
template <typename T>
__global__ void block_sum(const T* in, T* out)
{
    __shared__ T partial[1024];
    const unsigned int t = threadIdx.x;
    partial[t] = in[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s /= 2) {
        if (t < s) partial[t] += partial[t + s];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = partial[0];
}

// sums[i % bins] += values[i]; previous[i] = the value atomicAdd read.
template <typename T>
__global__ void accumulate(const T* values, T* sums, T* previous, int bins, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) previous[i] = atomicAdd(sums + i % bins, values[i]);
}

__global__ void to_half(const float* in, __half* out, float* back, const double* in64,
                        __half* out64, int n)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        out[i] = __float2half_rn(in[i]);
        back[i] = __half2float(out[i]);
        out64[i] = __double2half(in64[i]);
    }
}

__global__ void takes(const float* x, __half* h, int n, long long m, float s, double d,
                      bool flag)
{
}

// Thread 1 returns while thread 0 waits at the barrier.
__global__ void returns_before_barrier(float* x)
{
    if (threadIdx.x == 1) return;
    __syncthreads();
    x[threadIdx.x] = 1.0f;
}

// Thread 0 returns without a barrier, then thread 1 waits at one.
__global__ void barrier_after_return(float* x)
{
    if (threadIdx.x == 0) return;
    __syncthreads();
}
"""
NAMES = (
    "indices",
    "reverse",
    "block_sum<double>",
    "block_sum<float>",
    "accumulate<float>",
    "accumulate<double>",
    "to_half",
    "takes",
    "returns_before_barrier",
    "barrier_after_return",
)


def _compiler_reason() -> str | None:
    try:
        rt._identity(rt.compiler())
    except rt.CompilerMissing as exc:
        return str(exc)
    return None


needs_compiler = pytest.mark.skipif(
    _compiler_reason() is not None, reason=_compiler_reason() or ""
)


@pytest.fixture(scope="module")
def lib() -> rt.Library:
    reason = _compiler_reason()
    if reason is not None:
        pytest.skip(reason)
    return rt.load(rt.build(SOURCE, NAMES, sanitize=rt.sanitizer()), NAMES)


def _expected_indices(grid, block):
    rows = []
    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                for tz in range(block[2]):
                    for ty in range(block[1]):
                        for tx in range(block[0]):
                            rows.append((tx, ty, tz, bx, by, bz, *block, *grid))
    return numpy.array(rows, dtype=numpy.uint32)


@pytest.mark.parametrize(
    "grid, block",
    [
        ((1, 1, 1), (1, 1, 1)),
        ((3, 2, 2), (4, 3, 2)),
        ((5, 1, 1), (32, 1, 1)),
        ((1, 2, 3), (2, 1, 4)),
    ],
    ids=str,
)
def test_thread_and_block_indices(lib, grid, block):
    threads = numpy.prod(grid) * numpy.prod(block)
    out = numpy.full((threads, 12), 0xDEADBEEF, dtype=numpy.uint32)
    lib.function("indices")(grid, block, (out,))
    numpy.testing.assert_array_equal(out, _expected_indices(grid, block))


@pytest.mark.parametrize("every", [1, 2], ids=lambda e: f"every{e}")
@pytest.mark.parametrize("block", [(128, 1, 1), (16, 8, 1), (1024, 1, 1)], ids=str)
def test_shared_memory_reverse_per_block(lib, block, every):
    rng = numpy.random.default_rng(1)
    n = block[0] * block[1]
    data = rng.standard_normal(7 * n).astype(numpy.float32)
    expected = data.reshape(7, n).copy()
    expected[::every] = expected[::every, ::-1]
    lib.function("reverse")((7, 1, 1), block, (data, numpy.int32(every)))
    numpy.testing.assert_array_equal(data.reshape(7, n), expected)


@pytest.mark.parametrize("threads", [1, 2, 64, 256, 1024])
def test_shared_memory_tree_sum(lib, threads):
    rng = numpy.random.default_rng(threads)
    blocks = 9
    values = rng.integers(-1000, 1000, blocks * threads).astype(numpy.float64)
    out = numpy.full(blocks, numpy.nan)
    lib.function("block_sum<double>")((blocks, 1, 1), (threads, 1, 1), (values, out))
    numpy.testing.assert_array_equal(out, values.reshape(blocks, threads).sum(axis=1))


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: d.__name__)
def test_atomic_add_is_sequential_in_thread_order(lib, dtype):
    rng = numpy.random.default_rng(2)
    n, bins = 5000, 7
    values = rng.standard_normal(n).astype(dtype)
    sums = rng.standard_normal(bins).astype(dtype)
    start = sums.copy()
    previous = numpy.full(n, numpy.nan, dtype=dtype)
    kernel = lib.function("accumulate<float>" if dtype == numpy.float32 else "accumulate<double>")
    grid = (-(-n // 128), 1, 1)
    kernel(grid, (128, 1, 1), (values, sums, previous, numpy.int32(bins), numpy.int32(n)))
    for b in range(bins):
        # Threads run in index order, so every bin is a sequential sum in the storage dtype.
        running = numpy.cumsum(numpy.concatenate([start[b : b + 1], values[b::bins]]), dtype=dtype)
        numpy.testing.assert_array_equal(previous[b::bins], running[:-1])
        assert sums[b] == running[-1]


@pytest.fixture(scope="module")
def soft_half_lib(lib) -> rt.Library:
    """The test kernels with __half converted in software, as for a compiler without _Float16."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CXX", shlex.join([*rt.compiler(), "-U__FLT16_MAX__"]))
    try:
        return rt.load(rt.build(SOURCE, NAMES, sanitize=rt.sanitizer()), NAMES)
    finally:
        mp.undo()


@pytest.mark.parametrize("conversions", ["native", "software"])
def test_half_conversions_round_to_nearest_even(request, conversions):
    lib = request.getfixturevalue("lib" if conversions == "native" else "soft_half_lib")
    rng = numpy.random.default_rng(3)
    special = numpy.array(
        [
            0.0, -0.0, 1.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 2.0**-24, 2.0**-25,
            3 * 2.0**-25, 2.0**-14 - 2.0**-25, 65504.0, 65519.99, 65520.0, -65520.0, 1e-8,
            numpy.inf, -numpy.inf, numpy.nan,
        ]
    )
    scaled = rng.standard_normal(3000) * 10.0 ** rng.integers(-8, 6, 3000)
    random = numpy.concatenate([scaled, rng.uniform(-7e4, 7e4, 1000)])
    # Every tie between neighbouring finite halves, and its two neighbours.
    halves = numpy.arange(65536, dtype=numpy.uint16).view(numpy.float16)
    finite = numpy.unique(halves[numpy.isfinite(halves)].astype(numpy.float64))
    ties = (finite[:-1] + finite[1:]) / 2
    near = [ties, numpy.nextafter(ties, numpy.inf), numpy.nextafter(ties, -numpy.inf)]
    in64 = numpy.concatenate([special, random, finite, *near])
    in32 = in64.astype(numpy.float32)
    n = in64.size
    out = numpy.empty(n, numpy.float16)
    back = numpy.empty(n, numpy.float32)
    out64 = numpy.empty(n, numpy.float16)
    args = (in32, out, back, in64, out64, numpy.int32(n))
    lib.function("to_half")((4, 1, 1), (256, 1, 1), args)
    with numpy.errstate(over="ignore"):
        expected32 = in32.astype(numpy.float16)
        expected64 = in64.astype(numpy.float16)
    nan = numpy.isnan(in64)
    bits = numpy.uint16
    numpy.testing.assert_array_equal(out.view(bits)[~nan], expected32.view(bits)[~nan])
    numpy.testing.assert_array_equal(out64.view(bits)[~nan], expected64.view(bits)[~nan])
    assert numpy.isnan(out[nan]).all() and numpy.isnan(out64[nan]).all()
    assert numpy.isnan(back[nan]).all()
    numpy.testing.assert_array_equal(back, expected32.astype(numpy.float32))


def _takes_args():
    return [
        numpy.zeros(3, numpy.float32),
        numpy.zeros(3, numpy.float16),
        numpy.int32(1),
        numpy.int64(2),
        numpy.float32(0.5),
        numpy.float64(0.25),
        numpy.bool_(True),
    ]


def test_matching_arguments_launch(lib):
    lib.function("takes")((1, 1, 1), (1, 1, 1), tuple(_takes_args()))


@pytest.mark.parametrize(
    "index, value, message",
    [
        (2, numpy.int64(1), "argument 2: the kernel parameter is int32, got numpy.int64"),
        (2, numpy.float32(1), "argument 2: the kernel parameter is int32, got numpy.float32"),
        (3, numpy.uint64(1), "argument 3: the kernel parameter is int64, got numpy.uint64"),
        (4, numpy.float64(1), "argument 4: the kernel parameter is float32, got numpy.float64"),
        (6, numpy.int8(1), "argument 6: the kernel parameter is bool, got numpy.int8"),
        (5, numpy.zeros(1), "argument 5: the kernel parameter is float64, got an array of float64"),
        (0, numpy.zeros(3), "argument 0: the kernel parameter is a pointer to float32, "
         "got an array of float64"),
        (1, numpy.zeros(3, numpy.uint16), "argument 1: the kernel parameter is a pointer to "
         "float16, got an array of uint16"),
        (0, numpy.float32(1), "argument 0: the kernel parameter is a pointer to float32, "
         "got numpy.float32"),
        (4, None, "argument 4: the kernel parameter is float32, got None"),
    ],
    ids=str,
)
def test_argument_mismatch_names_kernel_and_argument(lib, index, value, message):
    args = _takes_args()
    args[index] = value
    with pytest.raises(RuntimeError) as info:
        lib.function("takes")((1, 1, 1), (1, 1, 1), tuple(args))
    assert str(info.value) == f"takes: {message}"


def test_read_only_array_behind_a_writable_pointer_is_refused(lib):
    args = _takes_args()
    args[0].flags.writeable = False  # const float*: fine
    lib.function("takes")((1, 1, 1), (1, 1, 1), tuple(args))
    args[1].flags.writeable = False  # __half*
    with pytest.raises(RuntimeError, match="^takes: argument 1: the kernel may write through"):
        lib.function("takes")((1, 1, 1), (1, 1, 1), tuple(args))


def test_none_is_a_null_pointer_as_on_cupy(lib):
    args = _takes_args()
    args[0], args[1] = None, None  # any pointer parameter, const or not
    lib.function("takes")((1, 1, 1), (1, 1, 1), tuple(args))


def test_argument_count_is_checked(lib):
    with pytest.raises(RuntimeError, match=r"^takes: the kernel takes 7 arguments, got 6$"):
        lib.function("takes")((1, 1, 1), (1, 1, 1), tuple(_takes_args()[:6]))


def test_python_scalars_and_strided_arrays_are_refused(lib):
    args = _takes_args()
    args[2] = 1
    with pytest.raises(TypeError, match="^takes: argument 2 must be a NumPy array, a NumPy scalar"):
        lib.function("takes")((1, 1, 1), (1, 1, 1), tuple(args))
    args = _takes_args()
    args[0] = numpy.zeros(6, numpy.float32)[::2]
    with pytest.raises(ValueError, match="takes: argument 0 must be a C-contiguous array"):
        lib.function("takes")((1, 1, 1), (1, 1, 1), tuple(args))


@pytest.mark.parametrize(
    "grid, block, message",
    [
        ((1, 1, 1), (1025, 1, 1), "block must be positive and at most"),
        ((1, 1, 1), (64, 32, 1), "a block must have at most 1024 threads"),
        ((0, 1, 1), (1, 1, 1), "grid must be positive"),
        ((1, 65536, 1), (1, 1, 1), "grid must be positive and at most"),
        ((1, 1), (1, 1, 1), "grid must be three ints"),
    ],
    ids=str,
)
def test_invalid_launch_configuration(lib, grid, block, message):
    with pytest.raises(ValueError, match=message):
        lib.function("takes")(grid, block, tuple(_takes_args()))


@pytest.mark.parametrize("name", ["returns_before_barrier", "barrier_after_return"])
def test_thread_returning_while_others_wait_is_a_deadlock(lib, name):
    x = numpy.zeros(64, numpy.float32)
    with pytest.raises(RuntimeError, match=f"^{name}: deadlock: thread \\(") as info:
        lib.function(name)((2, 1, 1), (64, 1, 1), (x,))
    assert "block (0, 0, 0)" in str(info.value)


def test_unknown_name_expression(lib):
    with pytest.raises(KeyError, match="no emulated kernel 'indices<int>'"):
        lib.function("indices<int>")


@needs_compiler
def test_compile_error_carries_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv("ROI_CUPY_EMULATOR_CACHE", str(tmp_path))
    source = "__global__ void broken(float* x) { x[0] = undeclared_name; }\n"
    with pytest.raises(RuntimeError, match="could not compile the kernels") as info:
        rt.build(source, ["broken"])
    assert "undeclared_name" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # the failed build left nothing behind


def test_missing_compiler_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ROI_CUPY_EMULATOR_CACHE", str(tmp_path / "cache"))
    message = r"needs a C\+\+20 compiler .*set CXX or install g\+\+"
    with pytest.raises(rt.CompilerMissing, match=message):
        rt.build(SOURCE, NAMES)
    ok, why = emulator.available()
    assert not ok
    assert "no-such-compiler" in why and "set CXX or install g++" in why
    assert not (tmp_path / "cache").exists()


@needs_compiler
def test_cache_hit_and_rebuild_on_change(tmp_path, monkeypatch):
    monkeypatch.setenv("ROI_CUPY_EMULATOR_CACHE", str(tmp_path))
    source = "__global__ void one(float* x) { x[threadIdx.x] = 1.0f; }\n"
    first = rt.build(source, ["one"])
    stamp = first.stat().st_mtime_ns
    assert rt.build(source, ["one"]) == first
    assert first.stat().st_mtime_ns == stamp
    # No temporary files left behind: the library and its digest.
    assert sorted(tmp_path.iterdir()) == [first, first.with_name(first.name + ".sha256")]

    changed = rt.build(source.replace("1.0f", "2.0f"), ["one"])
    assert changed != first and changed.exists()
    x = numpy.zeros(4, numpy.float32)
    rt.load(changed, ["one"]).function("one")((1, 1, 1), (4, 1, 1), (x,))
    numpy.testing.assert_array_equal(x, 2.0)


@needs_compiler
def test_a_damaged_library_is_rebuilt_not_loaded(tmp_path):
    """A library cut short in the cache (a full disk, say) used to be loaded and crash the
    process with SIGBUS; it is rebuilt instead. Run in a child process, so that a crash shows
    as a failed test rather than killing the suite."""
    script = textwrap.dedent(
        """
        import importlib, os, sys, numpy
        rt = importlib.import_module("roi_cupy._emulator.runtime")
        source = "__global__ void one(float* x) { x[threadIdx.x] = 1.0f; }\\n"
        path = rt.build(source, ["one"])
        if sys.argv[1] == "damage":
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 3)
        else:
            x = numpy.zeros(4, numpy.float32)
            rt.load(path, ["one"]).function("one")((1, 1, 1), (4, 1, 1), (x,))
            assert (x == 1.0).all()
            print("ok")
        """
    )
    env = dict(os.environ, ROI_CUPY_EMULATOR_CACHE=str(tmp_path))
    subprocess.run([sys.executable, "-c", script, "damage"], env=env, check=True)
    done = subprocess.run([sys.executable, "-c", script, "use"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr)


@needs_compiler
def test_build_folders_of_killed_compiles_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("ROI_CUPY_EMULATOR_CACHE", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    abandoned = tmp_path / f".build-{dead}-x1y2"  # a compile killed midway leaves this
    live = tmp_path / f".build-{os.getpid()}-busy"  # a build still running in this process
    for folder in (abandoned, live):
        folder.mkdir()
        (folder / "kernels.cpp").write_text("// partial")
    rt.build("__global__ void two(float* x) { x[0] = 2.0f; }\n", ["two"])
    assert not abandoned.exists() and live.exists()


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("ROI_CUPY_EMULATOR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert rt.cache_dir() == tmp_path / "roi_cupy" / "emulator"
    monkeypatch.setenv("ROI_CUPY_EMULATOR_CACHE", str(tmp_path / "mine"))
    assert rt.cache_dir() == tmp_path / "mine"


def test_sanitizer_setting(monkeypatch):
    monkeypatch.setenv("ROI_CUPY_EMULATOR_SANITIZE", "address")
    assert rt.sanitizer() == "address"
    assert "-fsanitize=address" in rt.flags("address")
    monkeypatch.setenv("ROI_CUPY_EMULATOR_SANITIZE", "thread")
    with pytest.raises(ValueError, match="ROI_CUPY_EMULATOR_SANITIZE must be 'address'"):
        rt.sanitizer()


@needs_compiler
def test_real_kernels_build_and_check_arguments():
    ok, why = emulator.available()
    assert ok, why
    from roi_cupy._cuda import kernels

    runtime = emulator.runtime()
    assert runtime.xp.zeros is numpy.zeros and runtime.xp.float32 is numpy.float32
    for name in kernels.NAME_EXPRESSIONS:
        runtime.function(name)
    with pytest.raises(RuntimeError, match=r"^roi_align_forward<float, int>: the kernel takes"):
        runtime.function("roi_align_forward<float, int>")((1, 1, 1), (1, 1, 1), ())


_ASAN_SCRIPT = textwrap.dedent(
    """
    import importlib, sys
    import numpy
    rt = importlib.import_module("roi_cupy._emulator.runtime")
    source = '''
    __global__ void read_all(const float* in, float* out, int n)
    {
        __shared__ float total[1];
        if (threadIdx.x == 0) total[0] = 0.0f;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) atomicAdd(total, in[i]);
        __syncthreads();
        if (threadIdx.x == 0) out[blockIdx.x] = total[0];
    }
    '''
    lib = rt.load(rt.build(source, ["read_all"], sanitize="address"), ["read_all"])
    data = numpy.ones(100, numpy.float32)
    out = numpy.zeros(2, numpy.float32)
    lib.function("read_all")((2, 1, 1), (32, 1, 1), (data, out, numpy.int32(100)))
    print("in bounds:", out.tolist(), flush=True)
    lib.function("read_all")((2, 1, 1), (32, 1, 1), (data, out, numpy.int32(101)))
    print("past the end went unnoticed", flush=True)
    """
)


def _asan_runtime() -> str | None:
    try:
        found = subprocess.run(
            [*rt.compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return None
    return found if os.path.isabs(found) and os.path.exists(found) else None


needs_asan = pytest.mark.skipif(
    _asan_runtime() is None, reason="the compiler has no AddressSanitizer runtime"
)


@needs_compiler
@needs_asan
def test_address_sanitizer_build_without_its_runtime_is_refused(tmp_path, monkeypatch):
    if hasattr(ctypes.CDLL(None), "__asan_init"):
        pytest.skip("this process has the AddressSanitizer runtime loaded")
    monkeypatch.setenv("ROI_CUPY_EMULATOR_CACHE", str(tmp_path))
    source = "__global__ void one(float* x) { x[threadIdx.x] = 1.0f; }\n"
    path = rt.build(source, ["one"], sanitize="address")
    with pytest.raises(RuntimeError, match="LD_PRELOAD=/.*libasan.* ASAN_OPTIONS=detect_leaks=0"):
        rt.load(path, ["one"])


@needs_compiler
@needs_asan
def test_address_sanitizer_catches_a_read_past_the_end():
    root = str(pathlib.Path(emulator.__file__).parents[2])
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=_asan_runtime(),
        ASAN_OPTIONS="detect_leaks=0",
        PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, "-c", _ASAN_SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert "in bounds: [100.0, 100.0]" in result.stdout, result.stderr[-3000:]
    assert result.returncode != 0
    assert "past the end went unnoticed" not in result.stdout
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in result.stderr
    assert "read_all" in result.stderr


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int64", "int32"])
def test_runtime_allocates_poisoned_memory(dtype):
    """What a kernel leaves unwritten shows: NaN in floating arrays, 0x5A bytes elsewhere."""
    array = rt.Runtime.xp.empty((3, 4), dtype=dtype)
    assert isinstance(array, numpy.ndarray) and array.shape == (3, 4) and array.dtype == dtype
    if numpy.dtype(dtype).kind == "f":
        assert numpy.isnan(array).all()
    else:
        assert (array.view(numpy.uint8) == 0x5A).all()
