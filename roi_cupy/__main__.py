"""``python -m roi_cupy COMMAND``: the demo, the benchmark runner, the kernel compile check and
the Dask extraction of RoI features from Zarr to Zarr."""
from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "demo": ("roi_cupy._demo", "run RoiAlign and RoiPool on an embedded image and save a PNG"),
    "bench": ("roi_cupy._bench", "measure roi_cupy against torchvision side by side"),
    "check-kernels": (
        "roi_cupy._cuda.check",
        "compile every CUDA kernel through NVRTC for several GPU architectures (no GPU needed)",
    ),
    "extract": (
        "roi_cupy._extract",
        "crop RoI features of a whole data set (Zarr in, Zarr out) on a Dask cluster, resumable",
    ),
}


def _usage() -> str:
    lines = ["usage: python -m roi_cupy [--version] COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<14} {text}" for name, (_, text) in _COMMANDS.items()]
    lines += ["", "python -m roi_cupy COMMAND --help describes a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(f"a command is needed\n\n{_usage()}", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        import roi_cupy

        print(f"roi_cupy {roi_cupy.__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _COMMANDS:
        print(f"unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[name][0])
    return int(module.main(rest) or 0)


def _run() -> int:
    """:func:`main`, quiet when the reader of its output goes away (``... --help | head``)."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit: point it elsewhere.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(_run())
