"""Throughput of ``python -m roi_cupy extract`` on a local Dask cluster of 1 and of 2 workers,
against roi_cupy's in-memory call, in one run; and the scheduler's overhead per chunk.

Run: python benchmarks/dask_extract.py (the dask extra installed; about 3 minutes on 2 cores).
``--images``, ``--channels``, ``--size`` and ``--boxes-per-image`` change the workload.

What is timed (median and quartiles over ``--repeats`` runs, the configurations interleaved):

- in memory: ``roi_cupy.roi_align`` over all features already in memory, in one call and image by
  image (what roi_cupy.dask runs on NumPy chunks, for reproducibility); and the same one call
  with the Zarr read of the features and the Zarr write of the crops around it. Each is timed
  on its second run in a row.
- extract: ``python -m roi_cupy extract``'s own code (``run``, ``--overwrite`` each time) on an
  already started cluster of 1 and of 2 worker processes, one thread each, started as the command
  starts its own: features read from the Zarr store, crops written to another. Cluster start-up
  and the command's client connection are reported apart. The bytes moved between processes
  (workers' ``transfer_outgoing_bytes_total``) are reported per box.
- extract's graph in-process: the same tasks run by dask's synchronous scheduler, no cluster.
- overhead per chunk: the same paths on a data set of tiny images (one 1x1 crop each, one image
  per feature chunk and per output chunk): wall time per chunk on the cluster minus the same
  graph's in-process time, and the tasks per chunk of the graph.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import statistics
import tempfile
import time

import dask
import numpy as np
import zarr
from distributed import Client

import roi_cupy
from roi_cupy import _extract


def make(root, name, n, c, size, per_image, seed=0, shuffle=False):
    """A Zarr store of features [n, c, size, size] (one image per chunk) and a .npy file of
    ``per_image`` boxes per image, sorted by image as a data set's box file would be (or, with
    ``shuffle``, in random order)."""
    rng = np.random.default_rng(seed)
    path = os.path.join(root, f"{name}.zarr")
    store = zarr.open_array(store=path, mode="w", shape=(n, c, size, size),
                            chunks=(1, c, size, size), dtype="float32")
    for i in range(n):
        store[i] = rng.uniform(-1, 1, (c, size, size)).astype(np.float32)
    k = n * per_image
    lo = rng.uniform(0, 0.6, (k, 2)) * size
    hi = lo + rng.uniform(0.1, 0.4, (k, 2)) * size
    boxes = np.concatenate([np.repeat(np.arange(n), per_image)[:, None], lo, hi], 1)
    if shuffle:
        boxes = boxes[rng.permutation(k)]
    boxes_path = os.path.join(root, f"{name}.npy")
    np.save(boxes_path, boxes.astype(np.float32))
    return path, boxes_path


def settle():
    """Let the previous run's processes finish freeing memory before the next is timed."""
    gc.collect()
    time.sleep(0.5)


def quartiles(times):
    q1, med, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return med, q1, q3


def fmt(times, unit=1.0):
    med, q1, q3 = quartiles([t * unit for t in times])
    return f"{med:8.3f} (IQR {q1:.3f}-{q3:.3f})"


def moved(client):
    return sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())


def extract(client, features, boxes, out, args):
    """One ``extract`` run (``--overwrite``) on ``client``'s cluster: the command's own code from
    its arguments to the last chunk written, less connecting a client; returns (seconds, bytes
    moved between processes)."""
    parsed = _extract._parser().parse_args([features, boxes, out, "--overwrite", *args])
    before = moved(client)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        start = time.perf_counter()
        _extract.run(parsed, client)
        seconds = time.perf_counter() - start
    return seconds, moved(client) - before


def connect(address):
    """What the command adds to :func:`extract`: connecting a client and closing it."""
    start = time.perf_counter()
    Client(address).close()
    return time.perf_counter() - start


def in_memory(features, boxes, out, args, mode):
    """The in-memory call: ``compute`` (one call), ``per-image``, or ``read+compute+write``;
    timed on its second run, so that the process's first large allocations stay out."""
    parsed = _extract._parser().parse_args([features, boxes, out, *args])
    op = dict(output_size=_extract._output_size(parsed), spatial_scale=parsed.spatial_scale,
              sampling_ratio=parsed.sampling_ratio, aligned=parsed.aligned)
    b = np.load(boxes)
    x = zarr.open_array(store=features, mode="r")[:]

    def once():
        if mode == "read+compute+write":
            read = zarr.open_array(store=features, mode="r")[:]
            crops = roi_cupy.roi_align(read, b, **op)
            chunk = max(1, (32 << 20) // crops[0].nbytes)
            zarr.open_array(store=out, mode="w", shape=crops.shape, dtype=crops.dtype,
                            chunks=(chunk,) + crops.shape[1:])[:] = crops
        elif mode == "compute":
            roi_cupy.roi_align(x, b, **op)
        else:
            for i in range(x.shape[0]):
                rows = b[b[:, 0] == i].copy()
                rows[:, 0] = 0
                roi_cupy.roi_align(x[i : i + 1], rows, **op)

    once()
    start = time.perf_counter()
    once()
    return time.perf_counter() - start


def plan(features, boxes, out, args):
    """The extract command's plan (``--overwrite``: every chunk to write)."""
    parsed = _extract._parser().parse_args([features, boxes, out, "--overwrite", *args])
    return _extract.plan(parsed)


def synchronous(features, boxes, out, args):
    """The extract command's work, the same graph, run in this process without a cluster."""
    start = time.perf_counter()
    dask.compute(plan(features, boxes, out, args).writes, scheduler="synchronous")
    return time.perf_counter() - start


def tasks_per_chunk(features, boxes, out, args):
    """Tasks of the optimised graph extract computes, per output chunk."""
    job = plan(features, boxes, out, args)
    (everything,) = dask.optimize(dask.delayed(job.writes))
    return (len(everything.__dask_graph__()) - 1) / len(job.writes)  # less the list's task


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--boxes-per-image", type=int, default=64)
    parser.add_argument("--images-per-chunk", type=int, default=8,
                        help="extract's feature chunk (the store keeps one image per chunk)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shuffle", action="store_true",
                        help="boxes in random order (the crops are put back in it by one take)")
    parser.add_argument("--tiny-images", type=int, default=400)
    opts = parser.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)
    n, c, s, per = opts.images, opts.channels, opts.size, opts.boxes_per_image
    align = ["--output-size", "7", "--sampling-ratio", "2", "--aligned",
             "--images-per-chunk", str(opts.images_per_chunk)]
    with tempfile.TemporaryDirectory() as root:
        features, boxes = make(root, "data", n, c, s, per, shuffle=opts.shuffle)
        tiny, tiny_boxes = make(root, "tiny", opts.tiny_images, 1, 4, 1, seed=1)
        tiny_args = ["--output-size", "1", "--sampling-ratio", "2", "--aligned",
                     "--chunk-boxes", "1"]
        k = n * per
        crop_bytes = k * c * 49 * 4
        print(f"workload: features [{n}, {c}, {s}, {s}] float32 ({n * c * s * s * 4 / 2**20:.0f}"
              f" MiB, one image per Zarr chunk, {opts.images_per_chunk} per extract chunk), {k} "
              f"boxes {'in random order' if opts.shuffle else 'sorted by image'} ({per} per "
              f"image), "
              f"RoI Align 7x7, sampling_ratio=2, aligned; crops {crop_bytes / 2**20:.0f} MiB; "
              f"{os.cpu_count()} cores; median s (IQR) over {opts.repeats} runs")
        clusters, clients = {}, {}
        for workers in (1, 2):
            start = time.perf_counter()
            clusters[workers] = _extract.local_cluster(workers)  # as extract starts it
            clients[workers] = Client(clusters[workers], set_as_default=False)
            print(f"cluster of {workers} worker(s) started in "
                  f"{time.perf_counter() - start:.2f} s")
        try:
            results = {name: [] for name in ("compute", "per-image", "read+compute+write",
                                             "synchronous", "extract 1", "extract 2")}
            transfer = {1: [], 2: []}
            out = os.path.join(root, "out.zarr")
            for workers in (1, 2):  # warm-up: worker imports, first reads
                extract(clients[workers], features, boxes, out, align)
            for _ in range(opts.repeats):
                for mode in ("compute", "per-image", "read+compute+write"):
                    settle()
                    results[mode].append(in_memory(features, boxes, out, align, mode))
                settle()
                results["synchronous"].append(synchronous(features, boxes, out, align))
                for workers in (1, 2):
                    settle()
                    seconds, nbytes = extract(clients[workers], features, boxes, out, align)
                    results[f"extract {workers}"].append(seconds)
                    transfer[workers].append(nbytes)
            expected = roi_cupy.roi_align(zarr.open_array(store=features, mode="r")[:],
                                          np.load(boxes), output_size=7, spatial_scale=1.0,
                                          sampling_ratio=2, aligned=True)
            got = zarr.open_array(store=out, path="crops", mode="r")[:]
            print(f"the command's own client: connect and close in "
                  f"{statistics.median(connect(clients[1].scheduler.address) for _ in range(3)):.2f}"
                  f" s, on top of the extract rows below")
            print(f"extract vs in-memory one call: max abs difference "
                  f"{np.abs(got - expected).max():.3g}")
            base = statistics.median(results["read+compute+write"])
            print(f"\n{'path':44s} {'seconds':>8s}               boxes/s   vs in-memory r+c+w")
            labels = {
                "compute": "in memory, one call (compute only)",
                "per-image": "in memory, image by image (compute only)",
                "read+compute+write": "in memory, Zarr read + one call + Zarr write",
                "synchronous": "extract's graph, in-process (no cluster)",
                "extract 1": "extract, 1 worker",
                "extract 2": "extract, 2 workers",
            }
            for key, label in labels.items():
                med = statistics.median(results[key])
                print(f"{label:44s} {fmt(results[key])}  {k / med:8.0f}   {base / med:5.2f}x")
            for workers in (1, 2):
                per_box = statistics.median(transfer[workers]) / k
                print(f"bytes moved between processes, {workers} worker(s): {per_box:.0f} per "
                      f"box (a crop is {c * 49 * 4} bytes)")

            chunks = opts.tiny_images
            tiny_times = {"in memory, image by image": [], "synchronous": [], "extract 1": [],
                          "extract 2": []}
            for workers in (1, 2):
                extract(clients[workers], tiny, tiny_boxes, out, tiny_args)
            for _ in range(opts.repeats):
                tiny_times["in memory, image by image"].append(
                    in_memory(tiny, tiny_boxes, out, tiny_args, "per-image"))
                tiny_times["synchronous"].append(synchronous(tiny, tiny_boxes, out, tiny_args))
                for workers in (1, 2):
                    tiny_times[f"extract {workers}"].append(
                        extract(clients[workers], tiny, tiny_boxes, out, tiny_args)[0])
            floor = statistics.median(tiny_times["synchronous"])
            tasks = tasks_per_chunk(tiny, tiny_boxes, out, tiny_args)
            print(f"\noverhead per chunk: {chunks} tiny images [1, 1, 4, 4], one box and one "
                  f"1x1 crop each, one image per feature chunk and per output chunk, "
                  f"{tasks:.1f} tasks per chunk")
            for key, times in tiny_times.items():
                med = statistics.median(times)
                extra = ""
                if key.startswith("extract"):
                    extra = f", {(med - floor) / chunks * 1e3:.2f} ms more than in-process"
                print(f"{labels.get(key, key):44s} {fmt(times)} s  "
                      f"{med / chunks * 1e3:6.2f} ms per chunk{extra}")
        finally:
            for workers in (1, 2):
                clients[workers].close()
                clusters[workers].close()


if __name__ == "__main__":
    main()
