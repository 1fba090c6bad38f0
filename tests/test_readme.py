"""The README's Python examples run as printed, in order, in one namespace (as a reader pasting
them into one session would). A block that needs what this machine lacks (a GPU, torch, jax, dask) is
skipped with the reason; the blocks after it still run."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _missing(block: str) -> str:
    """Why ``block`` cannot run here, or ""."""
    if "import cupy" in block:
        from roi_cupy import _cuda

        ok, why = _cuda.available()
        if not ok:
            return f"the block runs on a GPU: {why}"
    for framework in ("torch", "jax", "dask", "distributed", "dask_cuda"):
        if re.search(rf"\bimport (roi_cupy\.)?{framework}\b|\bfrom {framework}\b", block) and (
            importlib.util.find_spec(framework) is None
        ):
            return f"the block needs {framework}, which is not installed"
    return ""


@pytest.fixture(scope="module")
def outcomes() -> list[tuple[str, BaseException | None]]:
    namespace: dict = {"__name__": "readme"}
    results = []
    for block in BLOCKS:
        why = _missing(block)
        error = None
        if not why:
            try:
                exec(compile(block, str(README), "exec"), namespace)
            except BaseException as exc:  # reported by the block's own test
                error = exc
        results.append((why, error))
    return results


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, outcomes):
    why, error = outcomes[index]
    if why:
        pytest.skip(why)
    if error is not None:
        raise AssertionError(f"README block {index} failed:\n{BLOCKS[index]}") from error
