"""roi_cupy.dask and ``python -m roi_cupy extract`` on a two-process local Dask cluster.

The crops must not depend on the chunking or on where they run: they are compared bit for bit
across chunkings (empty chunks and boxes in unsorted image order included), with roi_cupy's
in-memory ops called image by image (bit for bit) and called once (RoI Pool bit for bit, RoI
Align within the dtype's tolerance: see roi_cupy.dask on the NumPy backend's RoI Align). The
extract command runs end to end on small Zarr stores, is interrupted by killing a worker and the
command itself, and is run again.
"""
from __future__ import annotations

import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time

import numpy
import pytest
from conftest import BFLOAT16, assert_matches, compute_dtype, make_rng, per_image
from conftest import random_boxes, random_features

da = pytest.importorskip("dask.array", reason="dask is not installed: roi_cupy.dask is not tested")
distributed = pytest.importorskip(
    "distributed", reason="distributed is not installed: roi_cupy.dask is not tested"
)
zarr = pytest.importorskip(
    "zarr", reason="zarr is not installed: the extract command is not tested"
)

import dask  # noqa: E402

import roi_cupy  # noqa: E402
import roi_cupy.dask as rd  # noqa: E402
from roi_cupy import _extract  # noqa: E402

N, C, H, W = 7, 3, 11, 13
K = 40
# Images 2 and 5 get no box, so that some chunks of every chunking but one are empty.
USED = numpy.array([0, 1, 3, 4, 6])
CHUNKINGS = [(7,), (1,) * 7, (2, 3, 2), (3, 0, 4), (2, 1, 3, 1)]
DTYPES = [numpy.dtype(d) for d in (numpy.float16, BFLOAT16, numpy.float32, numpy.float64)
          if d is not None]


@pytest.fixture(scope="module")
def cluster():
    """The CI cluster: two worker processes, one thread each."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as local:
        yield local


@pytest.fixture(scope="module")
def client(cluster):
    """A client of the cluster that is not the default scheduler."""
    with distributed.Client(cluster, set_as_default=False) as c:
        yield c


def inputs(key, dtype, n=N, k=K, shape=(C, H, W)):
    """Features [n, *shape] and boxes [k, 5] (compute dtype) in unsorted image order, with no
    box on images 2 and 5."""
    rng = make_rng("dask", key, numpy.dtype(dtype).name)
    x = random_features(rng, (n,) + shape, dtype)
    boxes = random_boxes(rng, n, k, shape[1], shape[2], dtype=compute_dtype(dtype))
    if n == N:
        boxes[:, 0] = USED[boxes[:, 0].astype(int) % USED.size]
    return x, boxes


def chunked(x, chunks):
    return da.from_array(x, chunks=(chunks, -1, -1, -1))


def image_by_image(op, x, boxes, *args):
    """roi_cupy's in-memory op called once per image, rows in the boxes' order."""
    out = None
    for i in range(x.shape[0]):
        rows = numpy.flatnonzero(boxes[:, 0] == i)
        local = boxes[rows].copy()
        local[:, 0] = 0
        part = op(x[i : i + 1], local, *args)
        if out is None:
            out = numpy.empty((boxes.shape[0],) + part.shape[1:], part.dtype)
        out[rows] = part
    return out


def assert_same(actual, expected, what=""):
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"shape {actual.shape}, expected {expected.shape}"
    assert actual.tobytes() == expected.tobytes(), (
        f"{what} not bitwise equal: max abs difference "
        f"{numpy.nanmax(numpy.abs(actual.astype(float) - expected.astype(float))):.3g}"
    )


def test_import_roi_cupy_leaves_dask_alone():
    code = (
        "import roi_cupy, sys; "
        "loaded = [m for m in ('dask', 'distributed', 'zarr') if m in sys.modules]; "
        "assert not loaded, f'roi_cupy imported {loaded}'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roi_align_is_the_same_for_every_chunking(client, dtype):
    x, boxes = inputs("align", dtype)
    args = (3, 0.5, 2, True)
    outs = client.compute([rd.roi_align(chunked(x, c), boxes, *args) for c in CHUNKINGS],
                          sync=True)
    expected = image_by_image(roi_cupy.roi_align, x, boxes, *args)
    for chunks, out in zip(CHUNKINGS, outs):
        assert_same(out, expected, f"chunks {chunks}:")
    assert_matches(outs[0], roi_cupy.roi_align(x, boxes, *args).astype(numpy.float64), dtype)


def test_roi_align_numpy_chunks_are_cropped_image_by_image():
    # Large enough that one NumPy RoI Align call over a chunk of 4 images rounds some crops
    # differently from calls over one image (1315 of 100352 elements differ without roi_cupy.dask's
    # per-image calls); the small inputs above would pass without them too.
    rng = make_rng("dask", "per-image")
    x = random_features(rng, (4, 8, 64, 64), numpy.float32)
    lo = rng.uniform(0, 64 * 0.7, (256, 2))
    hi = lo + rng.uniform(0.5, 32, (256, 2))  # up to half the map
    boxes = numpy.concatenate([rng.integers(0, 4, (256, 1)), lo, hi], 1).astype(numpy.float32)
    one, four = (rd.roi_align(chunked(x, c), boxes, 7).compute(scheduler="sync")
                 for c in [(4,), (1,) * 4])
    assert_same(one, four, "chunks (4,) and (1, 1, 1, 1):")
    assert_same(one, image_by_image(roi_cupy.roi_align, x, boxes, 7))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roi_pool_is_the_same_for_every_chunking(client, dtype):
    x, boxes = inputs("pool", dtype)
    outs = client.compute([rd.roi_pool(chunked(x, c), boxes, (2, 3), 0.5) for c in CHUNKINGS],
                          sync=True)
    expected = roi_cupy.roi_pool(x, boxes, (2, 3), 0.5)
    for out in outs:
        assert_same(out, expected)


@pytest.mark.parametrize("sampling_ratio", [-1, 0, 3], ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
def test_roi_align_arguments_reach_the_op(client, sampling_ratio, aligned):
    x, boxes = inputs("args", numpy.float32)
    args = ((4, 2), 0.75, sampling_ratio, aligned)
    out = client.compute(rd.roi_align(chunked(x, (2, 3, 2)), boxes, *args), sync=True)
    assert_same(out, image_by_image(roi_cupy.roi_align, x, boxes, *args))


def test_sorted_boxes_keep_the_routing_chunks():
    x, boxes = inputs("sorted", numpy.float32)
    boxes = boxes[numpy.argsort(boxes[:, 0], kind="stable")]
    out = rd.roi_align(chunked(x, (2, 3, 2)), boxes, 2)
    counts = numpy.bincount(boxes[:, 0].astype(int), minlength=N)
    assert out.chunks[0] == (counts[:2].sum(), counts[2:5].sum(), counts[5:].sum())
    assert_same(out.compute(scheduler="sync"), image_by_image(roi_cupy.roi_align, x, boxes, 2))


def test_boxes_per_image_and_as_dask_arrays():
    x, boxes = inputs("kinds", numpy.float64)
    features = chunked(x, (3, 0, 4))
    expected = image_by_image(roi_cupy.roi_align, x, boxes, 3)
    lazy = da.from_array(boxes, chunks=7)
    assert_same(rd.roi_align(features, lazy, 3).compute(scheduler="sync"), expected)
    images = per_image(boxes, N)  # images 2 and 5 hold no box
    listed = [da.from_array(b) if i % 2 else b for i, b in enumerate(images)]
    order = numpy.argsort(boxes[:, 0], kind="stable")
    assert_same(rd.roi_align(features, listed, 3).compute(scheduler="sync"), expected[order])


def test_no_boxes_and_chunks_without_boxes():
    x, boxes = inputs("empty", numpy.float32)
    out = rd.roi_pool(chunked(x, (1,) * N), boxes[:0], 2)
    assert out.shape == (0, C, 2, 2) and out.dtype == x.dtype
    graph = dict(out.__dask_graph__())  # a task makes the empty array where it runs: the graph
    assert len(graph) == 1 and b"ndarray" not in pickle.dumps(graph)  # holds no (CuPy) array
    assert out.compute(scheduler="sync").shape == (0, C, 2, 2)
    one = boxes[boxes[:, 0] == 4][:1]
    assert_same(rd.roi_pool(chunked(x, (1,) * N), one, 2).compute(scheduler="sync"),
                roi_cupy.roi_pool(x, one, 2))


def _only(allowed):
    """A block function that refuses to give any N-chunk but those in ``allowed``."""

    def read(block, block_info=None):
        index = block_info[0]["chunk-location"][0]
        if index not in allowed:
            raise AssertionError(f"features chunk {index} was read but holds no box")
        return block

    return read


def test_only_chunks_with_boxes_are_read_and_nothing_is_shuffled():
    x, boxes = inputs("route", numpy.float32)
    boxes = boxes[numpy.isin(boxes[:, 0], [1, 4])]
    features = chunked(x, (1,) * N).map_blocks(_only({1, 4}), dtype=x.dtype)
    out = rd.roi_align(features, boxes, 2)  # lazy: building it reads nothing
    keys = set(dask.core.flatten(out.__dask_keys__()))
    graph = dict(out.__dask_graph__().cull(keys))
    read = {key for key in graph if key[0] == features.name}
    assert read == {(features.name, 1, 0, 0, 0), (features.name, 4, 0, 0, 0)}
    crop = next(n for n in out.dask.layers if n.startswith("roi_align-"))
    dependencies = out.dask.get_all_dependencies()
    for key in out.dask.layers[crop]:  # one N-chunk per task: no all-to-all
        assert [d[0] for d in dependencies[key]] == [features.name], dependencies[key]
    assert_same(out.compute(scheduler="sync"), image_by_image(roi_cupy.roi_align, x, boxes, 2))


def test_tasks_carry_no_compiled_code():
    x, boxes = inputs("pickle", numpy.float32)
    out = rd.roi_align(chunked(x, (2, 3, 2)), boxes, 2)
    name = next(n for n in out.dask.layers if n.startswith("roi_align-"))
    layer = dict(out.dask.layers[name])
    assert len(layer) == 3
    # Plain pickle (no cloudpickle): it refuses closures and stores functions by name.
    blob = pickle.dumps(layer)
    assert b"roi_cupy.dask" in blob and b"_crop_block" in blob
    assert len(blob) < 4096 + layer_boxes_bytes(layer)


def layer_boxes_bytes(layer):
    return sum(arg.nbytes for task in layer.values() for arg in _args(task)
               if isinstance(arg, numpy.ndarray))


def _args(task):
    """A task's arguments, old (tuple) or new (dask._task_spec) style."""
    if isinstance(task, tuple):
        return task[1:]
    return [getattr(a, "value", a) for a in getattr(task, "args", ())]


def test_kernels_are_built_once_per_worker_process(client):
    from roi_cupy import _emulator

    ok, why = _emulator.available()
    if not ok:
        pytest.skip(f"the emulator is not available: {why}")
    x, boxes = inputs("emulator", numpy.float32, n=6, k=12, shape=(2, 6, 7))
    with roi_cupy.use_backend("emulator"):
        out = rd.roi_align(chunked(x, (1,) * 6), boxes, 2, 1.0, 2, True)
        expected = roi_cupy.roi_align(x, boxes, 2, 1.0, 2, True)

    def runtimes():
        return sorted(id(r) for r in sys.modules["roi_cupy._emulator"]._runtimes.values())

    seen = []
    for _ in range(2):
        assert_same(client.compute(out, sync=True), expected)  # one call per chunk: bitwise
        seen.append(client.run(runtimes))
    assert seen[0] == seen[1], "a worker built the kernels again"
    assert all(len(ids) <= 1 for ids in seen[0].values()), seen[0]
    assert sum(len(ids) for ids in seen[0].values()) >= 1


def test_argument_errors():
    x, boxes = inputs("errors", numpy.float32)
    features = chunked(x, (3, 4))
    with pytest.raises(TypeError, match="features must be a dask array"):
        rd.roi_align(x, boxes, 2)
    with pytest.raises(ValueError, match=r"chunked along N only .* rechunk"):
        rd.roi_align(da.from_array(x, chunks=(3, 2, -1, -1)), boxes, 2)
    with pytest.raises(ValueError, match="known chunk sizes"):
        rd.roi_pool(features[features[:, 0, 0, 0] > -2], boxes, 2)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        rd.roi_align(features[0], boxes, 2)
    with pytest.raises(TypeError, match="output_size"):
        rd.roi_align(features, boxes, 2.5)
    with pytest.raises(TypeError, match="aligned must be a bool"):
        rd.roi_align(features, boxes, 2, aligned="False")
    with pytest.raises(ValueError, match="spatial_scale must lie within float32's range"):
        rd.roi_pool(features, boxes, 2, 1e39)
    bad = boxes.copy()
    bad[3, 2] = numpy.nan
    with pytest.raises(ValueError, match="boxes must be finite, got row 3"):
        rd.roi_align(features, bad, 2)
    bad = boxes.copy()
    bad[5, 0] = N
    with pytest.raises(ValueError, match=rf"integer in \[0, {N}\), got 7.0 in row 5"):
        rd.roi_pool(features, bad, 2)
    with pytest.raises(ValueError, match="one array per image"):
        rd.roi_align(features, per_image(boxes, N)[:3], 2)
    with pytest.raises(TypeError, match=r"pass numpy.asarray\(boxes"):
        rd.roi_align(features, boxes.tolist(), 2)


def _gpu_unavailable() -> str:
    try:
        import cupy
        import dask_cuda  # noqa: F401

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:  # no CuPy, no dask_cuda, no driver
        return f"CuPy with a GPU and dask_cuda are needed: {exc}"
    return ""


GPU_MISSING = _gpu_unavailable()


@pytest.mark.skipif(bool(GPU_MISSING), reason=GPU_MISSING)
def test_gpu_workers_match_the_in_memory_kernels(tmp_path):
    import cupy
    from dask_cuda import LocalCUDACluster

    x, boxes = inputs("gpu", numpy.float32)
    gx, gb = cupy.asarray(x), cupy.asarray(boxes)
    align_in_memory = roi_cupy.roi_align(gx, gb, 3, 0.5, 2, True).get()
    with LocalCUDACluster() as cluster, distributed.Client(cluster, set_as_default=False) as c:
        for chunks in CHUNKINGS:
            features = chunked(x, chunks).map_blocks(cupy.asarray)
            align, pool, empty = c.compute([rd.roi_align(features, boxes, 3, 0.5, 2, True),
                                            rd.roi_pool(features, boxes, 3, 0.5),
                                            rd.roi_pool(features, boxes[:0], 3)], sync=True)
            assert all(isinstance(a, cupy.ndarray) for a in (align, pool, empty))
            assert_same(align.get(), align_in_memory)  # one kernel call per chunk: bitwise
            assert_same(pool.get(), roi_cupy.roi_pool(gx, gb, 3, 0.5).get())
            assert empty.shape == (0, C, 3, 3)
        assert_matches(align.get(), roi_cupy.roi_align(x, boxes, 3, 0.5, 2, True)
                       .astype(numpy.float64), numpy.float32)
        numpy.save(tmp_path / "boxes.npy", boxes)
        out = str(tmp_path / "crops.zarr")
        args = [store(tmp_path, x, (2, C, H, W)), str(tmp_path / "boxes.npy"), out, "--device",
                "cuda", "--output-size", "3", "--spatial-scale", "0.5", "--sampling-ratio", "2",
                "--aligned", "--scheduler", c.scheduler.address]
        assert _extract.main(args) == 0
        assert_same(crops_of(out), align_in_memory)


# ----------------------------------------------------------------------------- extract
def store(tmp_path, x, chunks):
    path = str(tmp_path / "features.zarr")
    array = zarr.open_array(store=path, mode="w", shape=x.shape, chunks=chunks, dtype=x.dtype)
    array[:] = x
    return path


def crops_of(out):
    return zarr.open_array(store=out, path="crops", mode="r")[:]


def done_of(out):
    return zarr.open_array(store=out, path="done", mode="r")[:]


def chunk_file(out, j):
    """The file of output chunk ``j`` (Zarr 3 and Zarr 2 layouts)."""
    for path in (pathlib.Path(out, "crops", "c", str(j), "0", "0", "0"),
                 pathlib.Path(out, "crops", f"{j}.0.0.0")):
        if path.exists():
            return path
    raise AssertionError(f"no file for chunk {j} in {out}")


def stamp(path):
    status = path.stat()
    return status.st_ino, status.st_mtime_ns


def cli(*args):
    """``python -m roi_cupy extract ARGS`` in a new process, its output piped."""
    return subprocess.Popen([sys.executable, "-m", "roi_cupy", "extract", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_extract_end_to_end_on_a_local_cluster(tmp_path):
    x, boxes = inputs("extract", numpy.float32)
    features = store(tmp_path, x, (2, 2, H, W))  # chunked along C too: merged per N-chunk
    boxes_file = str(tmp_path / "boxes.csv")
    numpy.savetxt(boxes_file, boxes.astype(numpy.float64), delimiter=",")
    out = str(tmp_path / "crops.zarr")
    args = [features, boxes_file, out, "--workers", "2", "--chunk-boxes", "6",
            "--output-size", "3", "4", "--sampling-ratio", "2", "--aligned"]
    run = cli(*args)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert "7 chunks of 6 boxes: 0 done, 7 to write" in stdout
    assert "7/7 chunks written (100%)" in stderr
    loaded = numpy.loadtxt(boxes_file, delimiter=",")
    expected = image_by_image(roi_cupy.roi_align, x, loaded, (3, 4), 1.0, 2, True)
    assert_same(crops_of(out), expected)
    assert done_of(out).tolist() == [1] * 7
    assert _extract.main(args) == 0  # all done: nothing to compute, no cluster started


def test_extract_no_boxes_from_an_empty_text_file(tmp_path, capsys):
    x, _ = inputs("no boxes", numpy.float32)
    features = store(tmp_path, x, (2, C, H, W))
    for name in ("boxes.csv", "boxes.txt"):
        (tmp_path / name).write_text("")
        assert _extract.load_boxes(str(tmp_path / name)).shape == (0, 5)
    out = str(tmp_path / "crops.zarr")
    assert _extract.main([features, str(tmp_path / "boxes.csv"), out, "--output-size", "3"]) == 0
    assert "0 boxes" in capsys.readouterr().out  # nothing to write: no cluster started
    assert crops_of(out).shape == (0, C, 3, 3) and done_of(out).shape == (0,)


def test_extract_default_chunks_follow_the_routing(tmp_path):
    x, _ = inputs("chunks", numpy.float32)
    rng = make_rng("dask", "chunks")
    boxes = random_boxes(rng, N, 4 * N, H, W, dtype=numpy.float32)
    boxes[:, 0] = numpy.repeat(numpy.arange(N), 4)  # sorted, four per image
    numpy.save(tmp_path / "boxes.npy", boxes)
    features = store(tmp_path, x, (1, C, H, W))
    args = [features, str(tmp_path / "boxes.npy"), str(tmp_path / "crops.zarr")]
    one_image = _extract.plan(_extract._parser().parse_args(args))
    assert one_image.crops.chunks[0] == (4,) * N  # one output chunk per image's crops
    two_images = args + ["--images-per-chunk", "2", "--overwrite"]
    two_images = _extract.plan(_extract._parser().parse_args(two_images))
    assert two_images.crops.chunks[0] == (8, 8, 8, 4)
    assert len(two_images.writes) == 4


def test_extract_resumes_with_other_feature_chunks(tmp_path):
    x, _ = inputs("rechunk", numpy.float32)
    rng = make_rng("dask", "rechunk")
    boxes = random_boxes(rng, N, 3 * N, H, W, dtype=numpy.float32)
    boxes[:, 0] = numpy.repeat(numpy.arange(N), 3)
    numpy.save(tmp_path / "boxes.npy", boxes)
    out = str(tmp_path / "crops.zarr")
    args = [store(tmp_path, x, (1, C, H, W)), str(tmp_path / "boxes.npy"), out]
    first = _extract.plan(_extract._parser().parse_args(args))  # default: 3 boxes per chunk
    dask.compute(first.writes[:2], scheduler="sync")  # interrupted after two chunks
    again = _extract.plan(_extract._parser().parse_args(args + ["--images-per-chunk", "2"]))
    assert again.crops.chunks[0] == (3,) * N, "the resume did not keep the output's chunks"
    assert "2 done, 5 to write" in again.summary
    dask.compute(again.writes, scheduler="sync")
    assert done_of(out).tolist() == [1] * N
    assert_same(crops_of(out), image_by_image(roi_cupy.roi_align, x, boxes, 7))


def test_extract_restarts_after_a_killed_worker_and_command(cluster, client, tmp_path,
                                                            capsys):
    x, boxes = inputs("kill", numpy.float32, n=24, k=240, shape=(4, 16, 16))
    features = store(tmp_path, x, (1, 4, 16, 16))
    numpy.save(tmp_path / "boxes.npy", boxes)
    out = str(tmp_path / "crops.zarr")
    args = [features, str(tmp_path / "boxes.npy"), out, "--chunk-boxes", "6",
            "--scheduler", client.scheduler.address]

    class Throttle(distributed.WorkerPlugin):
        """Slows every task down, so that the run is still going when it is killed."""

        name = "roi-cupy-throttle"

        def transition(self, key, start, finish, **kwargs):
            if finish == "executing":
                time.sleep(0.03)

    client.register_plugin(Throttle())
    try:
        run = cli(*args)
        for line in run.stderr:  # progress: a line per tenth of the 40 chunks
            if "chunks written" in line:
                break
        killed, pid = next(iter(client.run(os.getpid).items()))
        os.kill(pid, signal.SIGKILL)
        run.send_signal(signal.SIGKILL)
        run.communicate(timeout=30)
        assert run.returncode == -signal.SIGKILL, "the command ended before it was killed"
        # Wait for the nanny's new worker, for the tasks that were running when the command
        # died to finish, and for the cluster object to have seen it all.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers = set(client.scheduler_info()["workers"])
            settled = len(workers) == 2 and killed not in workers
            settled &= set(cluster.scheduler_info["workers"]) == workers
            if settled and not any(client.processing().values()):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the cluster did not settle within 60 s of the kill: workers {workers}, "
                        f"processing {client.processing()}")
    finally:
        client.unregister_worker_plugin(Throttle.name)
    done = done_of(out) == 1
    assert 0 < done.sum() < done.size, done
    before = {j: stamp(chunk_file(out, j)) for j in numpy.flatnonzero(done)}

    capsys.readouterr()
    assert _extract.main(args) == 0
    stdout = capsys.readouterr().out
    assert f"{done.sum()} done, {done.size - done.sum()} to write" in stdout
    assert done_of(out).tolist() == [1] * done.size
    assert {j: stamp(chunk_file(out, j)) for j in before} == before, "a done chunk was redone"
    assert_same(crops_of(out), image_by_image(roi_cupy.roi_align, x, boxes, 7))


def test_extract_rewrites_unfinished_chunks_only(client, tmp_path, capsys):
    x, boxes = inputs("partial", numpy.float64)
    features = store(tmp_path, x, (3, C, H, W))
    numpy.save(tmp_path / "boxes.npy", boxes)
    out = str(tmp_path / "crops.zarr")
    args = [features, str(tmp_path / "boxes.npy"), out, "--op", "pool", "--output-size", "2",
            "--chunk-boxes", "8", "--scheduler", client.scheduler.address]
    assert _extract.main(args) == 0
    expected = roi_cupy.roi_pool(x, boxes, 2)
    assert_same(crops_of(out), expected)
    crops = zarr.open_array(store=out, path="crops", mode="r+")
    flags = zarr.open_array(store=out, path="done", mode="r+")
    crops[8:16] = numpy.nan  # chunk 1: written in part, never marked done
    flags[1] = 0
    crops[24:32] = 123.0  # chunk 3: marked done, so trusted and left alone
    capsys.readouterr()
    assert _extract.main(args) == 0
    assert "4 done, 1 to write" in capsys.readouterr().out
    result = crops_of(out)
    assert_same(result[8:16], expected[8:16])
    assert (result[24:32] == 123.0).all()


def test_extract_never_rewrites_a_chunk_marked_done(tmp_path):
    out = str(tmp_path / "crops.zarr")
    _extract.prepare_output(out, {"chunk_boxes": 4}, (8, 2, 3, 3), numpy.dtype("float32"), False)
    first = make_rng("dask", "rewrite").uniform(-1, 1, (4, 2, 3, 3)).astype(numpy.float32)
    assert _extract.write_chunk(first, out, 1) == 1
    before = stamp(chunk_file(out, 1))
    assert _extract.write_chunk(first + 1, out, 1) == 1  # the task run again: a lost worker
    assert stamp(chunk_file(out, 1)) == before
    assert_same(crops_of(out)[4:], first)
    assert done_of(out).tolist() == [0, 1]


def test_extract_refuses_other_settings_and_foreign_stores(client, tmp_path, capsys):
    x, boxes = inputs("refuse", numpy.float32)
    features = store(tmp_path, x, (7, C, H, W))
    numpy.save(tmp_path / "boxes.npy", boxes)
    out = str(tmp_path / "crops.zarr")
    base = [features, str(tmp_path / "boxes.npy"), out, "--scheduler", client.scheduler.address]
    assert _extract.main(base + ["--output-size", "2"]) == 0
    assert _extract.main(base + ["--output-size", "3"]) == 2
    assert "output_size [2, 2] there, [3, 3] now" in capsys.readouterr().err
    assert _extract.main(base + ["--output-size", "3", "--overwrite"]) == 0
    assert_same(crops_of(out), image_by_image(roi_cupy.roi_align, x, boxes, 3))
    other = str(tmp_path / "other.zarr")
    zarr.open_array(store=other, mode="w", shape=(2,), dtype=numpy.float32)
    foreign = [features, str(tmp_path / "boxes.npy"), other, "--scheduler",
               client.scheduler.address]
    assert _extract.main(foreign) == 2
    assert "holds no roi_cupy_extract record" in capsys.readouterr().err
    bad = boxes.astype(numpy.float64)
    bad[4, 0] = 9
    numpy.save(tmp_path / "bad.npy", bad)
    assert _extract.main([features, str(tmp_path / "bad.npy"), str(tmp_path / "x.zarr")]) == 2
    assert "got 9.0 in row 4" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()


def test_extract_refuses_zarr_3_0(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(zarr, "__version__", "3.0.10")  # writes chunks in place: torn on a kill
    out = tmp_path / "crops.zarr"
    assert _extract.main([str(tmp_path / "features.zarr"), "boxes.npy", str(out)]) == 2
    assert "needs Zarr 2.18+ or 3.1+, got 3.0.10" in capsys.readouterr().err
    assert not out.exists()


def test_extract_refuses_an_output_over_its_inputs(tmp_path, capsys):
    x, boxes = inputs("apart", numpy.float32)
    inside = tmp_path / "data"
    inside.mkdir()
    features = store(inside, x, (7, C, H, W))
    boxes_file = str(inside / "boxes.npy")
    numpy.save(boxes_file, boxes)
    (tmp_path / "link.zarr").symlink_to(features)
    for out, what in [(features, "FEATURES"), (str(tmp_path / "link.zarr"), "FEATURES"),
                      (features + "/crops.zarr", "FEATURES"), (str(inside), "FEATURES"),
                      ("file://" + features, "FEATURES")]:
        assert _extract.main([features, boxes_file, out, "--overwrite"]) == 2, out
        assert f"OUT {out} and {what} " in capsys.readouterr().err
    elsewhere = tmp_path / "features.zarr"
    store(tmp_path, x, (7, C, H, W))
    assert _extract.main([str(elsewhere), boxes_file, str(inside), "--overwrite"]) == 2
    assert f"OUT {inside} and BOXES {boxes_file} overlap" in capsys.readouterr().err
    assert_same(zarr.open_array(store=features, mode="r")[:], x)  # untouched
    assert sorted(os.listdir(features)) == sorted(os.listdir(elsewhere))


def test_extract_refuses_to_resume_under_other_versions(tmp_path, monkeypatch):
    x, boxes = inputs("versions", numpy.float32)
    numpy.save(tmp_path / "boxes.npy", boxes)
    out = str(tmp_path / "crops.zarr")
    args = [store(tmp_path, x, (7, C, H, W)), str(tmp_path / "boxes.npy"), out]
    _extract.plan(_extract._parser().parse_args(args))
    record = zarr.open_group(out, mode="r").attrs[_extract.RECORD]
    assert record["versions"] == {"roi_cupy": roi_cupy.__version__, "numpy": numpy.__version__}
    there = roi_cupy.__version__
    monkeypatch.setattr(roi_cupy, "__version__", "0.0.0")
    with pytest.raises(ValueError, match=rf"versions.roi_cupy '{there}' there, '0.0.0' now"):
        _extract.plan(_extract._parser().parse_args(args))
    _extract.plan(_extract._parser().parse_args(args + ["--overwrite"]))


def test_extract_records_the_features_path_absolute(tmp_path, monkeypatch):
    x, boxes = inputs("absolute", numpy.float32)
    store(tmp_path, x, (7, C, H, W))
    numpy.save(tmp_path / "boxes.npy", boxes)
    monkeypatch.chdir(tmp_path)
    _extract.plan(_extract._parser().parse_args(["features.zarr", "boxes.npy", "crops.zarr"]))
    source = zarr.open_group("crops.zarr", mode="r").attrs[_extract.RECORD]["features"]["source"]
    assert os.path.isabs(source) and os.path.samefile(source, tmp_path / "features.zarr")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the same store, spelt otherwise: resumed
    args = ["../features.zarr", "../boxes.npy", "../crops.zarr"]
    assert "0 done, 1 to write" in _extract.plan(_extract._parser().parse_args(args)).summary
