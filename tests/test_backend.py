"""use_backend: names, nesting, thread-locality; and that importing roi_cupy stays light."""
import subprocess
import sys
import threading

import pytest

import roi_cupy
from roi_cupy import _backend


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"backend must be one of 'numpy', 'emulator', got 'gpu'"):
        with roi_cupy.use_backend("gpu"):
            pass
    with pytest.raises(ValueError, match=r"backend must be one of .*, got \['numpy'\]"):
        with roi_cupy.use_backend(["numpy"]):  # unhashable: still the same message
            pass


def test_cuda_is_refused_with_how_it_is_chosen():
    # The README lists a cuda backend, but it is chosen by the array kind, not by use_backend.
    with pytest.raises(ValueError) as refused:
        with roi_cupy.use_backend("cuda"):
            pass
    message = str(refused.value)
    assert message.startswith("backend must be one of 'numpy', 'emulator', got 'cuda': ")
    assert "use_backend only picks where NumPy inputs run" in message
    assert "CuPy arrays and CUDA tensors select the cuda backend automatically" in message
    assert _backend.current_backend() == "numpy"


def test_use_backend_nests_and_restores():
    assert _backend.current_backend() == "numpy"
    with roi_cupy.use_backend("emulator"):
        assert _backend.current_backend() == "emulator"
        with roi_cupy.use_backend("numpy"):
            assert _backend.current_backend() == "numpy"
        assert _backend.current_backend() == "emulator"
    assert _backend.current_backend() == "numpy"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with roi_cupy.use_backend("emulator"):
            raise RuntimeError("boom")
    assert _backend.current_backend() == "numpy"


def test_use_backend_does_not_leak_across_asyncio_tasks():
    import asyncio

    async def inside(entered, release):
        with roi_cupy.use_backend("emulator"):
            entered.set()
            await release.wait()
            return _backend.current_backend()

    async def outside(entered, release):
        await entered.wait()
        seen = _backend.current_backend()  # while the other task is inside its block
        release.set()
        return seen

    async def main():
        entered, release = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(inside(entered, release), outside(entered, release))

    assert asyncio.run(main()) == ["emulator", "numpy"]
    assert _backend.current_backend() == "numpy"


def test_blocks_left_out_of_order_leave_nothing_behind():
    def block(name):
        with roi_cupy.use_backend(name):
            yield _backend.current_backend()

    first, second = block("emulator"), block("numpy")
    assert next(first) == "emulator"
    assert next(second) == "numpy"
    first.close()  # leaves its block first, although it entered first
    assert _backend.current_backend() == "numpy"
    second.close()
    assert _backend.current_backend() == "numpy"
    first, second = block("numpy"), block("emulator")
    next(first), next(second)
    first.close()
    assert _backend.current_backend() == "emulator"  # the block still open
    second.close()
    assert _backend.current_backend() == "numpy"


def test_use_backend_is_thread_local():
    seen = []
    with roi_cupy.use_backend("emulator"):
        t = threading.Thread(target=lambda: seen.append(_backend.current_backend()))
        t.start()
        t.join()
    assert seen == ["numpy"]


def test_import_is_light():
    code = (
        "import sys, time; t = time.perf_counter(); import roi_cupy; "
        "print(time.perf_counter() - t); "
        "print(sorted(m for m in ('cupy', 'torch', 'jax', 'matplotlib', 'subprocess') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, loaded = out.stdout.splitlines()
    assert loaded == "[]"
    assert float(seconds) < 2.0  # generous: catches a compile or a heavy import, not jitter


def test_cuda_runtime_looks_each_kernel_up_once(monkeypatch):
    """Launch objects are cached per runtime (one per device): no RawModule.get_function call
    per launch."""
    pytest.importorskip("cupy", reason="CuPy is not installed (the cuda12/cuda13 extras)")
    from roi_cupy._cuda import kernels, launch

    looked_up = []

    class Module:
        def get_function(self, name):
            looked_up.append(name)
            return object()

    monkeypatch.setattr(kernels, "module", lambda device_id: Module())
    runtime = launch.CupyRuntime(0)
    first = runtime.function("roi_align_forward<float, int>")
    assert runtime.function("roi_align_forward<float, int>") is first
    runtime.function("roi_pool_forward<float, int>")
    assert looked_up == ["roi_align_forward<float, int>", "roi_pool_forward<float, int>"]
