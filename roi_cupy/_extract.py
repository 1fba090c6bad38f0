"""``python -m roi_cupy extract``: RoI features of a whole data set, computed on a Dask cluster.

Features come from a Zarr array ``[N, C, H, W]`` (read chunk by chunk by the workers), boxes
from a file, and the crops ``[K, C, PH, PW]`` go to a Zarr group ``OUT``, row ``i`` the crop of
box ``i``. Each feature task reads one N-chunk (``--images-per-chunk`` images, all of C, H and
W, whatever the store's chunks along C, H and W); :mod:`roi_cupy.dask` routes the boxes to the
N-chunks that hold their images; the crops are rechunked along K into the output's chunks
(``--chunk-boxes`` boxes each; by default those of the output being resumed, else as many as an
N-chunk's boxes, so that with boxes sorted by image each output chunk is one N-chunk's crops and
no crop moves between workers), and one task per output chunk writes it and then marks it done.

The output group holds ``crops``, ``done`` (one uint8 per output chunk, each its own Zarr chunk,
set to 1 after the chunk's data is written) and, in its attributes, the record of the settings
the crops were made with, the roi_cupy and NumPy versions of the process that runs the command
included. A run that is interrupted (a killed worker, a killed command) leaves some chunks marked
done; run again with the same arguments and only the others are written: a done chunk is never
written again, and a partly written one is written again in full. That saves the done chunks'
writes; it limits the features read and the crops computed to the remaining chunks only when
the boxes are sorted by image (in another order, a remaining output chunk needs the crops of
every N-chunk its boxes come from, all the crops of each). A restart with other settings, or
under other roi_cupy or NumPy versions (whose crops could differ in the last bits), is refused
unless ``--overwrite`` starts again. The chunking of the features and the cluster may change
between runs: the crops are the same bit for bit, on workers of the same CPU kind and library
versions (BLAS picks its kernels by CPU; see :mod:`roi_cupy.dask`).

Progress: one line on stderr, redrawn in place on a terminal and printed at every tenth of the
chunks otherwise. Write tasks are released as soon as they finish, so a worker lost later never
makes the cluster redo a chunk already written; and a write task run again all the same (its
worker lost before the scheduler heard it finish) finds its chunk marked done and leaves it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from typing import Any

import numpy

from roi_cupy import _args, _interop

# What the output group's attributes hold the settings under.
RECORD = "roi_cupy_extract"
# Most crops in one output chunk by default (the unit written, marked done, redone after a failure).
CHUNK_BYTES = 32 << 20


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m roi_cupy extract",
        description="Crop RoI features of every box of a data set on a Dask cluster: features "
        "from a Zarr array, boxes from a file, crops to a Zarr group. Interrupted and run again "
        "with the same arguments, it computes only the chunks not yet written.",
    )
    parser.add_argument("features", help="Zarr array [N, C, H, W] (a path or URL Dask reads)")
    parser.add_argument(
        "boxes",
        help="boxes [K, 5] of rows (batch_index, x1, y1, x2, y2): a .npy file, or a .csv "
        "(comma-separated) or other text file (whitespace-separated)",
    )
    parser.add_argument("out", help="Zarr group to write: crops [K, C, PH, PW] and done flags")
    parser.add_argument("--component", help="the array inside FEATURES when that is a group")
    parser.add_argument("--op", choices=("align", "pool"), default="align",
                        help="RoI Align or RoI Pool (default: align)")
    parser.add_argument("--output-size", type=int, nargs="+", default=[7], metavar="SIZE",
                        help="crop size: PH, or PH PW (default: 7)")
    parser.add_argument("--spatial-scale", type=float, default=1.0,
                        help="box-to-feature coordinate scale, e.g. 0.0625 (default: 1.0)")
    parser.add_argument("--sampling-ratio", type=int, default=-1,
                        help="RoI Align samples per bin and axis, <= 0 adaptive (default: -1)")
    parser.add_argument("--aligned", action="store_true",
                        help="RoI Align with the half-pixel shift (Detectron2)")
    parser.add_argument("--chunk-boxes", type=int,
                        help="boxes per output chunk (default: OUT's when resuming, else the "
                        "median number of boxes per feature chunk, at most 32 MiB of crops)")
    parser.add_argument("--images-per-chunk", type=int,
                        help="images per feature chunk (default: the store's chunks along N)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="address of a running Dask scheduler (default: a local cluster)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="workers of the local cluster, one thread each (default: one per "
                        "core)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: CuPy chunks on GPU workers, a dask_cuda LocalCUDACluster "
                        "(one worker per GPU) unless --scheduler is given (default: cpu)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again when OUT holds crops of other settings or roi_cupy "
                        "and NumPy versions (or is no extract output)")
    return parser


# ----------------------------------------------------------------------------- inputs
def load_boxes(path: str) -> numpy.ndarray:
    """The ``[K, 5]`` boxes of a .npy file or a text file (comma-separated for .csv; an empty
    one holds no box)."""
    if path.endswith(".npy"):
        return numpy.load(path, allow_pickle=False)
    delimiter = "," if path.endswith(".csv") else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "loadtxt: input contained no data")
        boxes = numpy.loadtxt(path, delimiter=delimiter, ndmin=2, dtype=numpy.float64)
    return boxes.reshape(0, 5) if boxes.size == 0 else boxes  # loadtxt gives (0, 1)


def _features(args: argparse.Namespace) -> Any:
    """The features as a dask array chunked along N only: each task reads one N-chunk, all of
    C, H and W, straight from the store (``--images-per-chunk`` images, else the store's chunk
    along N)."""
    import dask.array as da

    if args.images_per_chunk is not None and args.images_per_chunk < 1:
        raise ValueError(f"--images-per-chunk must be positive, got {args.images_per_chunk}")
    stored = da.from_zarr(args.features, component=args.component)
    _args.check_features(stored, "features")
    images = args.images_per_chunk or stored.chunksize[0]
    features = da.from_zarr(args.features, component=args.component,
                            chunks=(images,) + stored.shape[1:])
    if args.device == "cuda":
        import cupy

        meta = cupy.empty((0, 0, 0, 0), dtype=features.dtype)
        features = features.map_blocks(cupy.asarray, dtype=features.dtype, meta=meta)
    return features


def _chunk_boxes(crops: Any) -> int:
    """The default output chunk: the median number of boxes per routed N-chunk (split evenly
    where that is over :data:`CHUNK_BYTES` of crops). With sorted boxes and as many per chunk,
    each output chunk is then one N-chunk's crops (or a part), written where they were
    computed."""
    sizes = [size for size in crops.chunks[0] if size] or [1]
    block = max(1, math.ceil(numpy.median(sizes)))
    per_box = math.prod(crops.shape[1:]) * crops.dtype.itemsize
    return math.ceil(block / math.ceil(block * per_box / CHUNK_BYTES))


def _output_size(args: argparse.Namespace) -> tuple[int, int]:
    if len(args.output_size) > 2:
        raise ValueError(f"--output-size takes PH [PW], got {args.output_size}")
    size = args.output_size[0] if len(args.output_size) == 1 else args.output_size
    return _args.output_size_pair(size)


def _crops(args: argparse.Namespace, features: Any, boxes: numpy.ndarray) -> Any:
    import roi_cupy.dask as rd

    if args.op == "align":
        return rd.roi_align(features, boxes, _output_size(args), args.spatial_scale,
                            args.sampling_ratio, args.aligned)
    return rd.roi_pool(features, boxes, _output_size(args), args.spatial_scale)


def _settings(args: argparse.Namespace, features: Any, boxes: numpy.ndarray, chunk: int) -> dict:
    """What the crops depend on, as JSON: a restart must match it."""
    import roi_cupy

    settings = {
        "op": args.op,
        "output_size": list(_output_size(args)),
        "spatial_scale": args.spatial_scale,
        "backend": "cuda" if args.device == "cuda" else "numpy",
        "features": {
            "source": args.features if "://" in args.features else os.path.abspath(args.features),
            "component": args.component,
            "shape": list(features.shape),
            "dtype": features.dtype.name,
        },
        "boxes": {
            "shape": list(boxes.shape),
            "dtype": boxes.dtype.name,
            "sha256": hashlib.sha256(numpy.ascontiguousarray(boxes).tobytes()).hexdigest(),
        },
        "chunk_boxes": chunk,
        "versions": {"roi_cupy": roi_cupy.__version__, "numpy": numpy.__version__},
    }
    if args.op == "align":
        settings.update(sampling_ratio=args.sampling_ratio, aligned=args.aligned)
    return json.loads(json.dumps(settings))


# ----------------------------------------------------------------------------- output
def _real(location: str) -> tuple[str, str]:
    """A location made comparable, and its separator: the real path of a local path or
    ``file://`` URL, else the URL itself."""
    if location.startswith("file://"):
        location = location[len("file://") :]
    elif "://" in location:
        return location.rstrip("/"), "/"
    return os.path.realpath(location), os.sep


def check_apart(out: str, inputs: dict[str, str]) -> None:
    """Refuse an output that is one of ``inputs`` (name: location), lies inside one or holds
    one, with or without ``--overwrite``: writing it would destroy that input."""
    for what, location in inputs.items():
        (a, sep), (b, _) = _real(out), _real(location)
        if a == b or a.startswith(b.rstrip(sep) + sep) or b.startswith(a.rstrip(sep) + sep):
            raise ValueError(
                f"OUT {out} and {what} {location} overlap (the same path, or one inside the "
                "other): writing OUT would destroy the input, even with --overwrite; choose "
                "another OUT"
            )


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} there, {b!r} now")
    return out


def _create(out: str, settings: dict, shape: tuple, dtype: numpy.dtype) -> None:
    """The output arrays, empty (``done`` all 0)."""
    import zarr

    chunk = settings["chunk_boxes"]
    zarr.open_array(store=out, path="crops", mode="w", shape=shape,
                    chunks=(chunk,) + shape[1:], dtype=dtype, fill_value=0)
    zarr.open_array(store=out, path="done", mode="w", shape=(math.ceil(shape[0] / chunk),),
                    chunks=(1,), dtype=numpy.uint8, fill_value=0)


def _array_not_found() -> type:
    """Zarr's missing-array error (a ``ValueError`` in Zarr 2, a ``FileNotFoundError`` in 3.1)."""
    import zarr.errors

    return getattr(zarr.errors, "ArrayNotFoundError", FileNotFoundError)


def read_record(out: str) -> tuple[bool, dict | None]:
    """Whether ``out`` exists, and the settings record it holds (None if it holds none)."""
    import zarr
    import zarr.errors

    try:
        return True, zarr.open_group(out, mode="r").attrs.get(RECORD)
    except zarr.errors.ContainsArrayError:
        return True, None
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False, None


def prepare_output(
    out: str, settings: dict, shape: tuple, dtype: numpy.dtype, overwrite: bool
) -> numpy.ndarray:
    """Open or create the output group and return which of its chunks are done.

    The settings record is written before the arrays, so a run stopped while creating them
    creates them again on restart.

    Returns:
        ndarray[chunks] bool: True where a chunk was written in full and marked done.

    Raises:
        ValueError: when ``out`` holds crops of other settings, or something that is no extract
            output, and ``overwrite`` is False.
    """
    import zarr

    exists, record = read_record(out)
    if exists and not overwrite:
        if record is None:
            raise ValueError(
                f"{out} exists and holds no {RECORD} record: it is no extract output; pass "
                "--overwrite to replace it"
            )
        if record != settings:
            raise ValueError(
                f"{out} holds crops made with other settings ("
                + "; ".join(_differences(record, settings))
                + "): run with the same ones to resume, or pass --overwrite to start again"
            )
        try:
            done = zarr.open_array(store=out, path="done", mode="r")
            crops = zarr.open_array(store=out, path="crops", mode="r")
            complete = done.shape == (math.ceil(shape[0] / settings["chunk_boxes"]),)
            complete &= crops.shape == shape
        except (FileNotFoundError, _array_not_found()):
            complete = False
        if complete:
            return done[:] == 1
    else:
        # "w-" fails rather than replace anything there: only --overwrite replaces.
        zarr.open_group(out, mode="w" if exists else "w-").attrs[RECORD] = settings
    _create(out, settings, shape, dtype)
    return numpy.zeros(math.ceil(shape[0] / settings["chunk_boxes"]), dtype=bool)


def write_chunk(block: Any, out: str, index: int) -> int:
    """Write output chunk ``index`` (``block`` [k, C, PH, PW], NumPy or CuPy) of ``out``, then
    mark it done, unless it is marked done already (a task run again after its worker was lost);
    returns ``index``."""
    import zarr

    done = zarr.open_array(store=out, path="done", mode="r+")
    if done[index]:
        return index
    if _interop.is_cupy_array(block):
        block = block.get()
    crops = zarr.open_array(store=out, path="crops", mode="r+")
    start = index * crops.chunks[0]
    crops[start : start + block.shape[0]] = block
    done[index] = 1
    return index


# ----------------------------------------------------------------------------- running
class _Progress:
    """Chunks written so far, on one line of stderr."""

    def __init__(self, total: int, stream: Any = None):
        self.total, self.count, self.start = total, 0, time.perf_counter()
        self.stream = sys.stderr if stream is None else stream
        self.live = self.stream.isatty()
        self.shown = -1

    def step(self) -> None:
        self.count += 1
        tenth = 10 * self.count // max(1, self.total)
        if self.live or tenth != self.shown or self.count == self.total:
            self.shown = tenth
            line = (f"extract: {self.count}/{self.total} chunks written "
                    f"({100 * self.count // max(1, self.total)}%), "
                    f"{time.perf_counter() - self.start:.1f} s")
            end = "" if self.live and self.count < self.total else "\n"
            print(("\r" if self.live else "") + line, end=end, file=self.stream, flush=True)


def local_cluster(workers: int) -> Any:
    """The local cluster extract starts: ``workers`` processes of one thread each.

    Distributed spawns workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which turns glibc's
    dynamic mmap threshold off: every large temporary of the NumPy backend is then a fresh
    mmap, page-faulted again, and RoI Align ran 1.6x slower in such a worker than in a plain
    process ([256, 48, 48] features, 64 boxes: 12 ms against 7 ms per image). These workers are
    spawned without it.
    """
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                            dashboard_address=":0", silence_logs=logging.ERROR)


def _connect(args: argparse.Namespace, stack: contextlib.ExitStack) -> Any:
    """A client of ``--scheduler``, else of a new local cluster; both closed with ``stack``."""
    from distributed import Client

    if args.scheduler:
        return stack.enter_context(Client(args.scheduler))
    if args.device == "cuda":
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(silence_logs=logging.ERROR)
    else:
        cluster = local_cluster(args.workers)
    stack.enter_context(cluster)
    return stack.enter_context(Client(cluster))


@dataclasses.dataclass
class Plan:
    """What a run does: the crops' graph, the output's chunks, and a write per chunk not done.

    Attributes:
        crops (dask.array.Array[K, C, PH, PW]): the crops, chunked along K as the output is.
        done (ndarray[chunks] bool): the output chunks already written and marked done.
        writes (list of dask.delayed.Delayed): one :func:`write_chunk` per chunk not done.
        summary (str): one line on the inputs, the output and what is left to do.
    """

    crops: Any
    done: numpy.ndarray
    writes: list
    summary: str


def plan(args: argparse.Namespace) -> Plan:
    """Check every argument and box, open or create the output, and build the writes of the
    chunks not yet done (computing nothing)."""
    import dask

    if args.workers < 1:
        raise ValueError(f"--workers must be positive, got {args.workers}")
    if args.chunk_boxes is not None and args.chunk_boxes < 1:
        raise ValueError(f"--chunk-boxes must be positive, got {args.chunk_boxes}")
    check_apart(args.out, {"FEATURES": args.features, "BOXES": args.boxes})
    boxes = load_boxes(args.boxes)
    features = _features(args)
    crops = _crops(args, features, boxes)  # checks every argument and box
    k = crops.shape[0]
    chunk = args.chunk_boxes
    if chunk is None and not args.overwrite:  # a resume keeps the output's chunks
        record = read_record(args.out)[1]
        recorded = record.get("chunk_boxes") if isinstance(record, dict) else None
        chunk = recorded if type(recorded) is int and recorded > 0 else None
    chunk = chunk or _chunk_boxes(crops)
    settings = _settings(args, features, boxes, chunk)
    done = prepare_output(args.out, settings, crops.shape, crops.dtype, args.overwrite)
    crops = crops.rechunk({0: chunk})
    todo = numpy.flatnonzero(~done).tolist()
    blocks = crops.to_delayed().ravel() if todo else []
    summary = (
        f"extract: {k} boxes -> {args.out}/crops {list(crops.shape)} {crops.dtype.name}, "
        f"{done.size} chunks of {chunk} boxes: {done.size - len(todo)} done, {len(todo)} to "
        f"write; features {list(features.shape)} in {features.numblocks[0]} chunks along N"
    )
    writes = [dask.delayed(write_chunk)(blocks[j], args.out, j) for j in todo]
    return Plan(crops, done, writes, summary)


def run(args: argparse.Namespace, client: Any = None) -> int:
    """:func:`plan`, then compute and write the chunks not yet done on ``client``'s cluster, by
    default on the one the arguments name (started only when there is something to write);
    returns how many chunks were written."""
    from distributed import as_completed

    job = plan(args)
    print(job.summary, flush=True)
    if not job.writes:
        return 0
    with contextlib.ExitStack() as stack:
        if client is None:
            client = _connect(args, stack)
        progress = _Progress(len(job.writes))
        for future in as_completed(client.compute(job.writes), loop=client.loop):
            future.result()  # raises the task's error here
            progress.step()
    seconds = time.perf_counter() - progress.start
    boxes = sum(job.crops.chunks[0][j] for j in numpy.flatnonzero(~job.done))
    print(f"extract: wrote {len(job.writes)} chunks ({boxes} boxes) in {seconds:.2f} s, "
          f"{boxes / max(seconds, 1e-9):.0f} boxes/s", flush=True)
    return len(job.writes)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
        import zarr
    except ImportError as exc:
        print(f"extract needs Dask, distributed and Zarr: pip install 'roi_cupy[dask]' ({exc})",
              file=sys.stderr)
        return 2
    if zarr.__version__.startswith("3.0."):
        # Its LocalStore writes chunks in place: a killed write leaves a torn chunk.
        print(f"extract needs Zarr 2.18+ or 3.1+, got {zarr.__version__}: pip install "
              "'roi_cupy[dask]'", file=sys.stderr)
        return 2
    try:
        run(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"extract: {exc}", file=sys.stderr)
        return 2
    return 0
