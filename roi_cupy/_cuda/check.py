"""``python -m roi_cupy check-kernels``: compile every kernel instantiation for several GPU
architectures through NVRTC, without a GPU, and report registers, spills and shared memory.

Fails (exit status 1) on any compile error or warning, or an instantiation that produced no
kernel. Uses NVRTC directly (CuPy's own compile helpers ask the driver for a device) and the CUDA
headers of the nvidia-cuda-runtime wheel or a CUDA toolkit for ``cuda_fp16.h``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from roi_cupy._cuda import kernels

ARCHS = ("sm_75", "sm_80", "sm_90", "sm_100")
# The options cupy.RawModule compiles with, so that the numbers match what runs.
OPTIONS = (*kernels.COMPILE_OPTIONS, "-ftz=true")

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_WARNING = re.compile(r"\bwarning\b", re.IGNORECASE)
_PTX_ENTRY = re.compile(r"\.entry\s+([\w$]+)\s*\(")


class ToolsMissing(RuntimeError):
    """NVRTC or the CUDA headers are not installed."""


@dataclass
class KernelStats:
    """ptxas resource usage of one instantiation on one architecture."""

    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0


@dataclass
class ArchResult:
    """One compilation of the whole source for one architecture."""

    arch: str
    ok: bool
    log: str
    kernels: dict[str, KernelStats] = field(default_factory=dict)  # by name expression
    problems: list[str] = field(default_factory=list)


def _nvrtc() -> Any:
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception as exc:
        raise ToolsMissing(
            f"NVRTC bindings are not importable ({exc}): pip install cupy-cuda13x nvidia-cuda-nvrtc"
        ) from exc
    try:
        nvrtc.getVersion()
    except Exception as exc:
        raise ToolsMissing(f"the NVRTC library is not loadable ({exc}): "
                           "pip install nvidia-cuda-nvrtc") from exc
    return nvrtc


def include_dir() -> pathlib.Path:
    """A folder holding ``cuda_fp16.h`` (and what it includes).

    Raises:
        ToolsMissing: when neither the nvidia-cuda-runtime wheel nor a CUDA toolkit has one.
    """
    candidates = []
    try:
        import cupy

        candidates.append(pathlib.Path(cupy.cuda.get_cuda_path() or "") / "include")
    except Exception:  # get_cuda_path may fail without a toolkit; other places are tried
        pass
    try:
        import nvidia

        for root in nvidia.__path__:
            candidates += sorted(pathlib.Path(root).glob("*/include"))
    except ImportError:
        pass
    for variable in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(variable):
            candidates.append(pathlib.Path(os.environ[variable]) / "include")
    candidates.append(pathlib.Path("/usr/local/cuda/include"))
    for folder in candidates:
        if (folder / "cuda_fp16.h").is_file():
            return folder
    raise ToolsMissing(
        "no cuda_fp16.h found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "): pip install nvidia-cuda-runtime"
    )


def _parse_ptxas(log: str) -> dict[str, KernelStats]:
    """Resource usage per mangled kernel name from a ``-Xptxas=-v`` log."""
    stats: dict[str, KernelStats] = {}
    current: KernelStats | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = stats.setdefault(m.group(1), KernelStats())
        elif current is not None and (m := _FRAME.search(line)):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := _USED.search(line)):
            current.registers = int(m.group(1))
            if s := _SMEM.search(line):
                current.shared = int(s.group(1))
    return stats


def _ptx_bodies(ptx: str) -> dict[str, str]:
    """The PTX text of each kernel entry, by mangled name."""
    starts = [(m.group(1), m.start()) for m in _PTX_ENTRY.finditer(ptx)]
    ends = [start for _, start in starts[1:]] + [len(ptx)]
    return {name: ptx[start:end] for (name, start), end in zip(starts, ends)}


def _uses_double(name_expression: str) -> bool:
    return "<double," in name_expression


def compile_source(
    source: str, arch: str, name_expressions: Sequence[str], include: pathlib.Path
) -> ArchResult:
    """Compile ``source`` to a cubin for ``arch`` (e.g. ``"sm_80"``) with every name expression.

    Returns:
        ArchResult: ``ok`` only when it compiled without a warning, every name expression became
        a kernel that ptxas reported on, and no float16/float32 kernel has a double-precision
        instruction.
    """
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(source, "roi_kernels.cu", [], [])
    try:
        for name in name_expressions:
            nvrtc.addNameExpression(program, name)
        options = [*OPTIONS, f"--gpu-architecture={arch}", "-Xptxas=-v", f"-I{include}"]
        try:
            nvrtc.compileProgram(program, options)
            compiled = True
        except nvrtc.NVRTCError:
            compiled = False
        log = nvrtc.getProgramLog(program).rstrip("\x00").strip()
        result = ArchResult(arch, compiled, log)
        if not compiled:
            result.problems.append("compilation failed")
            return result
        warnings = [line for line in log.splitlines() if _WARNING.search(line)]
        result.problems += [f"warning: {line.strip()}" for line in warnings]
        stats = _parse_ptxas(log)
        ptx = nvrtc.getPTX(program)
        bodies = _ptx_bodies(ptx.decode() if isinstance(ptx, bytes) else ptx)
        for name in name_expressions:
            lowered = nvrtc.getLoweredName(program, name)
            if lowered not in stats:
                result.problems.append(f"{name} ({lowered}) was not compiled")
                continue
            result.kernels[name] = stats[lowered]
            # float16/float32 must compute in float: a stray double literal shows up as .f64.
            if not _uses_double(name) and ".f64" in bodies.get(lowered, ""):
                result.problems.append(f"{name} uses double-precision arithmetic")
        result.ok = not result.problems
        return result
    finally:
        nvrtc.destroyProgram(program)


def check(
    archs: Sequence[str] = ARCHS,
    source: str | None = None,
    name_expressions: Sequence[str] = kernels.NAME_EXPRESSIONS,
    progress: TextIO | None = None,
) -> list[ArchResult]:
    """Compile the kernels (or ``source``) for every architecture in ``archs``.

    Args:
        archs: target architectures, e.g. ``("sm_80",)``. Default: :data:`ARCHS`.
        source: CUDA source to compile. Default: the kernels (:func:`kernels.source`).
        name_expressions: the instantiations to compile. Default: every kernel's.
        progress: where to write a line as each architecture starts and ends (one NVRTC run
            each, seconds to minutes); None writes nothing. Default: None.

    Returns:
        list[ArchResult]: one per architecture, in the order of ``archs``.

    Raises:
        ToolsMissing: when NVRTC or the CUDA headers are not installed.
    """
    include = include_dir()
    text = kernels.source() if source is None else source
    results = []
    for i, arch in enumerate(archs, 1):
        step = f"[{i}/{len(archs)}] {arch}:"
        if progress is not None:
            print(f"{step} compiling {len(name_expressions)} instantiations ...", file=progress,
                  flush=True)
        start = time.perf_counter()
        result = compile_source(text, arch, name_expressions, include)
        if progress is not None:
            more = len(result.problems) - 1
            outcome = "ok" if result.ok else f"FAILED: {result.problems[0]}" + (
                f" (and {more} more)" if more else "")
            print(f"{step} {time.perf_counter() - start:.1f} s, {outcome}", file=progress,
                  flush=True)
        results.append(result)
    return results


def _table(results: Sequence[ArchResult]) -> str:
    names = sorted({n for r in results for n in r.kernels})
    width = max([len("kernel")] + [len(n) for n in names])
    lines = [
        f"{'kernel':<{width}} {'arch':<7} {'regs':>4} {'spill st/ld':>12} {'stack':>5} {'smem':>5}"
    ]
    for name in names:
        for r in results:
            if name in r.kernels:
                s = r.kernels[name]
                spill = f"{s.spill_stores}/{s.spill_loads}"
                lines.append(
                    f"{name:<{width}} {r.arch:<7} {s.registers:>4} {spill:>12} {s.stack:>5} "
                    f"{s.shared:>5}"
                )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m roi_cupy check-kernels",
        description="Compile every CUDA kernel instantiation through NVRTC for several GPU "
        "architectures (no GPU needed); fail on any error or warning.",
    )
    parser.add_argument(
        "--arch",
        action="append",
        help=f"target architecture, repeatable (default: {' '.join(ARCHS)})",
    )
    args = parser.parse_args(argv)
    archs = tuple(args.arch) if args.arch else ARCHS
    try:
        results = check(archs, progress=sys.stderr)
    except ToolsMissing as exc:
        print(f"check-kernels: {exc}", file=sys.stderr)
        return 1
    print(_table(results))
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"\n{r.arch}: " + "; ".join(r.problems), file=sys.stderr)
        if r.log:
            print(r.log, file=sys.stderr)
    total = len(kernels.NAME_EXPRESSIONS)
    if failed:
        print(f"\ncheck-kernels: FAILED on {', '.join(r.arch for r in failed)}", file=sys.stderr)
        return 1
    architectures = "architecture" if len(archs) == 1 else "architectures"
    print(f"\ncheck-kernels: {total} instantiations x {len(archs)} {architectures} "
          f"({', '.join(archs)}) compiled without warnings")
    return 0
