"""The benchmark runner: workloads, statistics, byte floors, checks, reports and the CLI."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy
import pytest

import roi_cupy
from roi_cupy import _bench as bench
from roi_cupy._bench import backends, check, main, record, report, runner, timing, workloads
from roi_cupy._bench.workloads import WORKLOADS, Workload, floor_bytes

TINY = Workload(
    "tiny", "test: [1, 3, 9, 11] f32, 4 boxes", batch=1, channels=3, height=9, width=11,
    boxes_per_image=4, output_size=2, spatial_scale=1.0, box_min=2.0, box_max=9.0,
    device="cpu", seed=5,
)


# ----------------------------------------------------------------------------- NumPy backend
def _stub_backend() -> types.ModuleType:
    """A stand-in with the backend contract's signatures, for a tree without roi_cupy._numpy:
    each RoI's output is its image's per-channel mean, every gradient a plain scatter."""
    m = types.ModuleType("roi_cupy._numpy")

    def crops(x, rois, ph, pw):
        b = rois[:, 0].astype(numpy.int64)
        mean = x[b].mean(axis=(2, 3), keepdims=True)
        return numpy.ascontiguousarray(
            numpy.broadcast_to(mean, (len(rois), x.shape[1], ph, pw))).astype(x.dtype)

    def scatter(g, rois, shape):
        out = numpy.zeros(shape, dtype=g.dtype)
        numpy.add.at(out, rois[:, 0].astype(numpy.int64), g.sum(axis=(2, 3))[..., None, None])
        return out

    m.roi_align_forward = lambda x, rois, ph, pw, scale, ratio, aligned: crops(x, rois, ph, pw)
    m.roi_align_backward = lambda g, rois, shape, scale, ratio, aligned: scatter(g, rois, shape)
    m.roi_pool_forward = lambda x, rois, ph, pw, scale: (
        crops(x, rois, ph, pw), numpy.zeros((len(rois), x.shape[1], ph, pw), numpy.int64))
    m.roi_pool_backward = lambda g, rois, argmax, shape: scatter(g, rois, shape)
    return m


@pytest.fixture
def numpy_backend(monkeypatch):
    """roi_cupy's NumPy backend, or a stand-in (said in the test's output) where it is absent."""
    missing = backends.probe_numpy_backend()
    if missing:
        print(f"{missing}: running against a stand-in backend")
        monkeypatch.setitem(sys.modules, "roi_cupy._numpy", _stub_backend())


# ----------------------------------------------------------------------------- workloads
def test_catalogue_names_and_families():
    assert {"W1", "W2", "W3", "W4", "W5", "W6", "cpu-core", "cpu-pool"} <= set(WORKLOADS)
    assert WORKLOADS["cpu-pool"].op == "roi_pool" and WORKLOADS["cpu-pool"].device == "cpu"
    assert WORKLOADS["cpu-pool"].draw_rois().tolist() == WORKLOADS["cpu-core"].draw_rois().tolist()
    assert [w.name for w in workloads.select("W7")] == [
        "W7-sr0-small", "W7-sr0-large", "W7-sr2-small", "W7-sr2-large"]
    assert [w.num_rois for w in workloads.select("sweep")] == [16, 64, 256, 1024, 4096]
    assert [w.name for w in workloads.select("W4, W1,W4")] == ["W4", "W1"]
    cpu = workloads.select("cpu")
    assert {w.name for w in cpu} == {w.name for w in WORKLOADS.values() if w.device == "cpu"}
    assert {"cpu-aligned", "cpu-adaptive", "cpu-f64", "cpu-mask", "cpu-many", "cpu-pool-many",
            "cpu-large", "cpu-pool-large", "cpu-one", "cpu-two"} <= {w.name for w in cpu}
    assert WORKLOADS["cpu-f64"].inputs().features.dtype == numpy.float64
    with pytest.raises(ValueError, match="W99"):
        workloads.select("W1,W99")


@pytest.mark.parametrize("name", list(WORKLOADS), ids=str)
def test_workload_definitions(name):
    w = WORKLOADS[name]
    assert len({x.name for x in WORKLOADS.values()}) == len(WORKLOADS)
    assert w.op in ("roi_align", "roi_pool") and w.device in ("cpu", "cuda")
    assert w.image_size == (w.height / w.spatial_scale, w.width / w.spatial_scale)
    q = w.shrunk()
    assert q.quick and q.shrunk() is q
    assert q.channels < w.channels or w.channels == 1
    assert q.height * q.width < w.height * w.width
    assert 1 <= q.boxes_per_image <= w.boxes_per_image


def test_real_sizes_of_the_spec():
    w1 = WORKLOADS["W1"]
    assert (w1.input_shape, w1.boxes_per_image, w1.output_size) == ((2, 256, 200, 304), 512, 7)
    assert (w1.spatial_scale, w1.sampling_ratio, w1.aligned, w1.dtype) == (0.25, 2, True,
                                                                            "float32")
    assert w1.image_size == (800, 1216) and (w1.box_min, w1.box_max) == (16, 512)
    assert WORKLOADS["W2"].output_size == 14 and WORKLOADS["W2"].boxes_per_image == 128
    assert WORKLOADS["W3"].sampling_ratio == 0
    assert WORKLOADS["W4"].input_shape == (1, 64, 50, 50) and WORKLOADS["W4"].num_rois == 16
    assert WORKLOADS["W5"].dtype == "float16"
    assert WORKLOADS["W6"].op == "roi_pool"
    assert WORKLOADS["W6"].draw_rois().tolist() == w1.draw_rois().tolist()
    assert {w.sampling_ratio for w in workloads.select("W7")} == {0, 2}
    assert all(w.input_shape == (1, 512, 256, 256) and w.num_rois == 512
               for w in workloads.select("W7"))
    core = WORKLOADS["cpu-core"]
    assert (core.input_shape, core.num_rois, core.output_size, core.sampling_ratio,
            core.aligned, core.device) == ((2, 256, 64, 64), 256, 7, 2, False, "cpu")


@pytest.mark.parametrize("name", ["W1", "W4", "W5", "W7-sr0-large", "cpu-core"], ids=str)
def test_inputs_shapes_dtypes_and_bounds(name):
    w = WORKLOADS[name].shrunk()
    inputs = w.inputs()
    assert inputs.features.shape == w.input_shape and inputs.features.dtype == w.dtype
    assert inputs.grad_output.shape == w.output_shape and inputs.grad_output.dtype == w.dtype
    assert inputs.rois.shape == (w.num_rois, 5) and inputs.rois.dtype == w.compute_dtype
    rois = inputs.rois.astype(numpy.float64)
    image_h, image_w = w.image_size
    assert rois[:, 0].tolist() == numpy.repeat(numpy.arange(w.batch), w.boxes_per_image).tolist()
    assert (rois[:, [1, 3]] >= 0).all() and (rois[:, [1, 3]] <= image_w).all()
    assert (rois[:, [2, 4]] >= 0).all() and (rois[:, [2, 4]] <= image_h).all()
    assert (rois[:, 3] > rois[:, 1]).all() and (rois[:, 4] > rois[:, 2]).all()
    assert numpy.std(inputs.features.astype(numpy.float64)) > 0.5  # random, not zeros


def test_box_sizes_follow_the_proposal_distribution():
    w = dataclasses.replace(WORKLOADS["W1"], boxes_per_image=2000)
    r = w.draw_rois().astype(numpy.float64)
    size = numpy.sqrt((r[:, 3] - r[:, 1]) * (r[:, 4] - r[:, 2]))
    # clipping only shrinks a box, and never below half of each side
    assert size.max() <= w.box_max * 1.0001 and size.min() >= w.box_min / 2 * 0.999
    assert numpy.median(size) < 200  # log-uniform: median near sqrt(16 * 512) = 91 before clipping


def test_inputs_are_deterministic_per_seed():
    a, b = TINY.inputs(), TINY.inputs()
    for name in ("features", "rois", "grad_output"):
        numpy.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = dataclasses.replace(TINY, seed=6).inputs()
    assert not numpy.array_equal(a.features, c.features)
    assert not numpy.array_equal(a.rois, c.rois)


def test_half_workload_boxes_are_float16_exact():
    rois = WORKLOADS["W5"].shrunk().draw_rois()
    assert rois.dtype == numpy.float32
    numpy.testing.assert_array_equal(rois.astype(numpy.float16).astype(numpy.float32), rois)


# ----------------------------------------------------------------------------- statistics
def test_stats_median_and_quartiles():
    s = timing.Stats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median_ms, s.q1_ms, s.q3_ms, s.min_ms, s.max_ms, s.mean_ms, s.repeat) == (
        3.0, 2.0, 4.0, 1.0, 5.0, 3.0, 5)
    s = timing.Stats.of([4.0, 1.0, 3.0, 2.0])
    assert (s.median_ms, s.q1_ms, s.q3_ms) == (2.5, 1.75, 3.25)
    assert timing.Stats.from_dict(s.as_dict()) == s
    with pytest.raises(ValueError, match="non-empty"):
        timing.Stats.of([])


def test_cpu_clock_runs_warmup_then_repeat_with_rotation_index():
    calls = []
    stats = timing.CpuClock()(calls.append, repeat=4, warmup=2)
    assert calls == [0, 1, 0, 1, 2, 3] and stats.repeat == 4 and stats.min_ms >= 0


def test_cuda_clock_pairs_events_around_each_call():
    ticks = iter(range(100))

    class Event:
        def record(self):
            self.t = next(ticks)

    synced = []
    clock = timing.CudaClock(Event, lambda s, e: float(e.t - s.t), lambda: synced.append(1))
    calls = []
    stats = clock(calls.append, repeat=3, warmup=1)
    assert calls == [0, 0, 1, 2] and synced == [1, 1]
    assert stats.times_ms == (1.0, 1.0, 1.0)


def test_measure_interleaves_and_isolates_a_failure():
    calls = []

    def broken(i):
        calls.append(("broken", i))
        if i == 1:
            raise RuntimeError("out of memory")

    outcome = timing.measure(
        [(timing.CpuClock(), lambda i: calls.append(("a", i))), (timing.CpuClock(), broken),
         (timing.CpuClock(), lambda i: calls.append(("b", i)))], repeat=3, warmup=1)
    assert calls == [("a", 0), ("broken", 0), ("b", 0),
                     ("a", 0), ("broken", 0), ("b", 0),
                     ("a", 1), ("broken", 1), ("b", 1),
                     ("a", 2), ("b", 2)]
    assert outcome[0].repeat == 3 and outcome[2].repeat == 3
    assert isinstance(outcome[1], RuntimeError)


def test_backend_names_devices_and_validate():
    by_name = {b.name: b for b in backends.all_backends()}
    assert list(by_name) == list(backends.NAMES)
    assert by_name["roi_cupy-cuda"].device == "cuda" and by_name["roi_cupy-cuda"].validate
    assert by_name["roi_cupy-numpy(validate=False)"].validate is False
    det = by_name["roi_cupy-cuda(validate=False,deterministic=True)"]
    assert det.deterministic and det.validate is False and det.device == "cuda"
    assert not by_name["roi_cupy-cuda(validate=False)"].deterministic
    tv = by_name["torchvision-cpu"]
    assert tv.device == "cpu" and tv.validate is None
    assert backends.peer_of(by_name["roi_cupy-cuda"]) == "torchvision-cuda"
    assert [b.name for b in backends.select("torchvision-cpu,roi_cupy-numpy")] == [
        "torchvision-cpu", "roi_cupy-numpy"]
    with pytest.raises(ValueError, match="cuda-magic"):
        backends.select("cuda-magic")


def test_rotation_copies():
    assert timing.rotation_copies(100 << 20, 50 << 20) == 1
    assert timing.rotation_copies(10 << 20, 50 << 20) == 10
    assert timing.rotation_copies(1 << 10, 50 << 20) == 256
    assert timing.rotation_copies(600 << 20, 400 << 20, budget_bytes=1 << 30) == 1


# ----------------------------------------------------------------------------- byte floor
def test_floor_bytes_arithmetic():
    w1 = WORKLOADS["W1"]
    features, boxes, output = 2 * 256 * 200 * 304 * 4, 1024 * 5 * 4, 1024 * 256 * 7 * 7 * 4
    assert floor_bytes(w1, "forward") == features + boxes + output
    assert floor_bytes(w1, "backward") == output + boxes + features
    assert floor_bytes(w1, "fwd+bwd") == 2 * (features + boxes + output)
    half = WORKLOADS["W5"]  # half features and outputs, float32 boxes
    assert floor_bytes(half, "forward") == features // 2 + boxes + output // 2
    argmax = 1024 * 256 * 7 * 7 * 8
    assert floor_bytes(WORKLOADS["W6"], "forward") == features + boxes + output + argmax
    assert floor_bytes(WORKLOADS["W6"], "backward") == output + argmax + boxes + features
    with pytest.raises(ValueError, match="pass"):
        floor_bytes(w1, "sideways")


def test_derived_figures():
    rec = _record([_row("a", "roi_cupy-numpy", 2.0), _row("a", "torchvision-cpu", 3.0),
                   _row("a", "roi_cupy-numpy(validate=False)", 1.5)])
    runner.fill_derived(rec)
    ours, tv, fast = rec.rows
    assert ours.gbps == pytest.approx(4e6 / 2e-3 / 1e9)
    assert ours.floor_fraction == pytest.approx(ours.gbps / 10.0)
    assert (ours.speedup, tv.speedup, fast.speedup) == (1.5, 1.0, 2.0)


# ----------------------------------------------------------------------------- the check
def test_compare_within_and_beyond_tolerance():
    ref = numpy.random.default_rng(0).standard_normal((3, 4, 2, 2)) * 10
    near = (ref + 1e-6 * 10).astype(numpy.float32)  # 1e-6 relative to a scale of ~30
    assert check.compare({"output": near}, {"output": ref}, "float32").ok
    far = near.copy()
    far[1, 2, 0, 1] += 1e-2
    verdict = check.compare({"output": far}, {"output": ref}, "float32")
    assert not verdict.ok and "[1, 2, 0, 1]" in verdict.detail and verdict.max_error > 1e-5
    wrong_dtype = check.compare({"output": ref}, {"output": ref}, "float32")
    assert not wrong_dtype.ok and "float64" in wrong_dtype.detail
    nan = near.copy()
    nan[0, 0, 0, 0] = numpy.nan
    assert not check.compare({"output": nan}, {"output": ref}, "float32").ok
    assert not check.compare({}, {"grad_input": ref}, "float32").ok


def test_tolerance_widens_for_float32_positions_only():
    """RoI Align in float32 holds sample positions to an ulp of the coordinate: the bound grows
    by eps times the largest feature-space coordinate; other dtypes and RoI Pool keep theirs."""
    eps = float(numpy.finfo(numpy.float32).eps)
    large = WORKLOADS["cpu-large"]
    corner = float(numpy.abs(large.draw_rois()[:, 1:]).max()) * large.spatial_scale
    assert 300 <= corner <= 304
    assert check.tolerance(large, large.inputs()) == pytest.approx(1e-5 + eps * corner)
    for name in ("cpu-pool-large", "cpu-f64"):
        w = WORKLOADS[name]
        assert check.tolerance(w, w.inputs()) == check.TOLERANCE[w.dtype]
    ref = numpy.full((1, 1, 1, 1), 2.0)
    off = {"output": (ref + 2 * 3e-5).astype(numpy.float32)}  # 3e-5 of the scale
    assert not check.compare(off, {"output": ref}, "float32").ok
    assert check.compare(off, {"output": ref}, "float32", 1e-5 + eps * corner).ok


# ----------------------------------------------------------------------------- reports
def _row(workload, backend, median, status=record.OK):
    device = "cpu"
    return record.Row(workload, "forward", backend, device, None, status,
                      stats=timing.Stats.of([median * 0.9, median, median * 1.1]),
                      floor_bytes=4_000_000)


def _record(rows, variant="quick"):
    return record.Record(
        variant=variant, date="2026-11-23", timestamp="2026-11-23T00:00:00+00:00",
        command=["--quick"], environment={"host": "h", "cpu": "c", "cpu_count": 2,
                                          "numpy": numpy.__version__},
        bandwidth={"cpu": {"method": "m", "bytes": 1 << 20, "median_ms": 1.0, "gbps": 10.0}},
        workloads={"a": dataclasses.replace(TINY, name="a").as_dict()},
        repeat=3, warmup=1, rows=rows,
        skipped=[{"backend": "torchvision-cuda", "reason": "torch has no CUDA device",
                  "workloads": "all"}],
    )


def test_pool_reference_keeps_the_bins_of_the_compute_dtype():
    """A box 29 pixels wide in 7 bins: the last bin ends at ceil(7 * (29 / 7)), 36 in float32
    but 37 in float64; the float32 backends and torchvision draw the float32 bin, and so must
    the reference."""
    w = dataclasses.replace(WORKLOADS["cpu-pool"], batch=1, channels=1, height=8, width=40)
    features = numpy.zeros((1, 1, 8, 40), dtype=numpy.float32)
    features[0, 0, 0, 36] = 5.0  # only the float64 bin (0, 6) reaches column 36
    features[0, 0, 0, 35] = 1.0
    rois = numpy.array([[0, 7, 0, 35, 7]], dtype=numpy.float32)
    grad = numpy.ones((1, 1, 7, 7), dtype=numpy.float32)
    assert numpy.ceil(7 * numpy.float32(29 / 7)) != numpy.ceil(7 * (29 / 7))
    want = check.reference(w, workloads.Inputs(features, rois, grad), "fwd+bwd")
    got = roi_cupy.roi_pool(features, rois, 7, return_indices=True)
    assert want["output"][0, 0, 0, 6] == 1.0
    assert check.compare({"output": got[0], "grad_input": roi_cupy.roi_pool_backward(
        grad, rois, got[1], features.shape)}, want, "float32").ok


def test_json_round_trip(tmp_path):
    rec = _record([_row("a", "roi_cupy-numpy", 2.0),
                   record.Row("a", "backward", "roi_cupy-numpy", "cpu", True, record.INVALID,
                              "grad_input error 1e-2 > 1e-05", 1e-2, 1e-5)])
    runner.fill_derived(rec)
    path = tmp_path / "r.json"
    report.write_json(rec, path)
    data = json.loads(path.read_text())
    assert data["schema"] == record.SCHEMA and data["variant"] == "quick"
    assert data["rows"][0]["pass"] == "forward" and data["rows"][0]["stats"]["median_ms"] == 2.0
    assert data["rows"][1]["status"] == "INVALID" and data["rows"][1]["stats"] is None
    assert report.read_json(path) == rec
    data["schema"] = "other/9"
    with pytest.raises(ValueError, match="schema"):
        record.Record.from_dict(data)


def test_table_and_markdown_content():
    rec = _record([_row("a", "roi_cupy-numpy", 2.0), _row("a", "torchvision-cpu", 3.0),
                   record.Row("a", "backward", "roi_cupy-numpy", "cpu", True, record.INVALID,
                              "grad_input error 1e-2 > 1e-05")])
    rec.rows[0].max_error = 3e-7
    runner.fill_derived(rec)
    text = report.table(rec)
    assert "QUICK variant" in text and "2.000" in text and "1.50x" in text
    assert "ok (error 3e-07)" in text
    assert "INVALID: grad_input error" in text and "skipped torchvision-cuda" in text
    md = report.markdown(rec)
    lines = md.splitlines()
    assert lines[0] == "# roi_cupy benchmark, 2026-11-23 (quick)"
    header = next(i for i, line in enumerate(lines) if line.startswith("| workload"))
    assert lines[header + 1].count("|") == len(report.HEADERS) + 1
    assert "| a | forward | roi_cupy-numpy | 2.000 | 1.900-2.100 |" in md
    assert "**INVALID: grad_input error 1e-2 > 1e-05**" in md
    assert "validate=True (the default)" in md and "## Workloads" in md


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = report.write_plot(_record([_row("a", "roi_cupy-numpy", 2.0)]), tmp_path / "p.png")
    assert "matplotlib is not installed" in result["skipped"]
    assert not (tmp_path / "p.png").exists()


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra")
    rows = [_row("a", "roi_cupy-numpy", 2.0), _row("a", "torchvision-cpu", 3.0)]
    rec = _record(rows)
    for n, k in ((1, 16), (2, 64)):
        name = f"sweep-{k}"
        rec.workloads[name] = {**dataclasses.replace(TINY, name=name, boxes_per_image=k // 2,
                                                     group="sweep").as_dict()}
        rec.rows.append(_row(name, "roi_cupy-numpy", float(n)))
    runner.fill_derived(rec)
    result = report.write_plot(rec, tmp_path / "p.png")
    assert result == {"path": str(tmp_path / "p.png")}
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- end to end
def _tiny_plan(passes=("forward", "backward", "fwd+bwd")):
    chosen = [b for b in backends.all_backends() if b.library == "roi_cupy" and b.device == "cpu"]
    return runner.Plan([TINY, dataclasses.replace(TINY, name="tiny-pool", op="roi_pool")],
                       chosen, {"torchvision-cpu": "not wanted here"}, list(passes), quick=True,
                       forced=False, repeat=3, warmup=1)


def test_end_to_end_on_the_numpy_backend(numpy_backend, capsys):
    rec = runner.run(_tiny_plan(), ["--test"], progress=sys.stderr)
    assert len(rec.rows) == 2 * 2 * 3
    assert all(r.status == record.OK for r in rec.rows), [r.detail for r in rec.rows]
    assert all(r.stats.repeat == 3 and r.gbps > 0 for r in rec.rows)
    assert {r.validate for r in rec.rows} == {True, False}
    assert rec.skipped[0] == {"backend": "torchvision-cpu", "reason": "not wanted here",
                              "workloads": "all"}
    assert rec.bandwidth["cpu"]["gbps"] > 0 and rec.environment["numpy"] == numpy.__version__
    progress = capsys.readouterr().err.splitlines()
    assert progress[0].startswith("[1-2/12] tiny forward: checking, then timing 2 backend(s)")
    assert progress[1].startswith("[1/12] tiny forward roi_cupy-numpy ... ")
    assert progress[-1].startswith("[12/12] tiny-pool fwd+bwd roi_cupy-numpy(validate=False) ...")
    assert [(r.workload, r.pass_) for r in rec.rows[:2]] == [("tiny", "forward")] * 2


def test_end_to_end_marks_a_wrong_backend_invalid(numpy_backend, monkeypatch, tmp_path):
    real = backends.RoiCupyRunner.results

    def off_by_a_bit(self, pass_):
        got = real(self, pass_)
        return {k: v + numpy.asarray(1e-3, v.dtype) for k, v in got.items()}

    monkeypatch.setattr(backends.RoiCupyRunner, "results", off_by_a_bit)
    rec = runner.run(_tiny_plan(["forward"]), [], progress=sys.stderr)
    assert {r.status for r in rec.rows} == {record.INVALID}
    assert all("error" in r.detail and r.max_error > r.tolerance for r in rec.rows)
    assert "INVALID: output error" in report.table(rec)
    argv = ["--quick", "--workloads", "cpu-core", "--backends", "roi_cupy-numpy", "--passes",
            "forward", "--repeat", "1", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert main(argv + ["--allow-invalid"]) == 0


def test_end_to_end_without_a_reference_is_unchecked(numpy_backend, monkeypatch):
    monkeypatch.setattr(backends, "probe_numpy_backend", lambda: "reference backend absent")
    rec = runner.run(_tiny_plan(["forward"]), [], progress=sys.stderr)
    assert {r.status for r in rec.rows} == {record.UNCHECKED}
    assert all(r.stats is not None and r.max_error is None for r in rec.rows)
    assert "timed without a check: no reference to check against: reference backend absent" \
        in report.table(rec)


def test_cli_end_to_end(numpy_backend, tmp_path, capsys):
    code = main(["--quick", "--workloads", "cpu-core", "--backends", "roi_cupy-numpy",
                 "--passes", "forward,backward", "--repeat", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "QUICK variant" in out and "cpu-core" in out
    (stem,) = {p.stem for p in tmp_path.iterdir()}
    assert stem.endswith("-cpu-quick")
    saved = report.read_json(tmp_path / f"{stem}.json")
    assert saved.variant == "quick" and [r.pass_ for r in saved.rows] == ["forward", "backward"]
    assert saved.workloads["cpu-core"]["channels"] == 16
    # The NumPy rows carry their memory peak: more than nothing (the channels-last copy alone
    # is 64 KiB), far less than the features.
    assert all(0.05 < r.extra_mib < 8 for r in saved.rows), [r.extra_mib for r in saved.rows]
    assert (tmp_path / f"{stem}.md").read_text().startswith("# roi_cupy benchmark")
    assert ("path" in saved.plot) == (tmp_path / f"{stem}.png").exists()


def test_results_go_to_bench_results_unless_out_is_given(numpy_backend, monkeypatch, tmp_path,
                                                         capsys):
    # Run from a tree that has the committed results folder: a run without --out leaves it alone.
    monkeypatch.chdir(tmp_path)
    committed = tmp_path / "benchmarks" / "results"
    committed.mkdir(parents=True)
    assert bench.parser().parse_args([]).out == bench.DEFAULT_OUT == Path("bench-results")
    argv = ["--quick", "--workloads", "cpu-core", "--backends", "roi_cupy-numpy", "--passes",
            "forward", "--repeat", "1"]
    assert main(argv) == 0
    assert list(committed.iterdir()) == []
    written = sorted(p.suffix for p in (tmp_path / "bench-results").iterdir())
    assert written in ([".json", ".md"], [".json", ".md", ".png"])
    assert "wrote bench-results/" in capsys.readouterr().out
    assert main(argv + ["--out", "benchmarks/results"]) == 0
    assert sorted(p.suffix for p in committed.iterdir()) == written


def test_help_states_the_default_out():
    text = bench.parser().format_help()
    assert "default: ./bench-results" in " ".join(text.split())


def _fake_cupy(get_device_count) -> types.ModuleType:
    """A stand-in for CuPy whose runtime reports devices through ``get_device_count``."""
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=get_device_count))
    return cupy


INSUFFICIENT_DRIVER = ("cudaErrorInsufficientDriver: CUDA driver version is insufficient for "
                       "CUDA runtime version")  # CuPy's words on a machine without a GPU


def test_unusable_gpu_is_said_plainly(monkeypatch, capsys):
    def no_driver():
        raise RuntimeError(INSUFFICIENT_DRIVER)

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(no_driver))
    assert backends.probe_roi_cupy_cuda() == (
        f"no usable NVIDIA GPU was found; CuPy says: {INSUFFICIENT_DRIVER}")
    assert main(["--workloads", "cpu-core", "--backends", "roi_cupy-cuda"]) == 1
    err = capsys.readouterr().err
    assert f"skipping roi_cupy-cuda: no usable NVIDIA GPU was found; CuPy says: " \
           f"{INSUFFICIENT_DRIVER}" in err
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda: 0))
    assert backends.probe_roi_cupy_cuda() == (
        "no usable NVIDIA GPU was found; CuPy sees no CUDA device")


def test_quick_by_default_says_why(numpy_backend, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(backends, "gpu_present", lambda: False)
    assert main(["--workloads", "W4", "--backends", "roi_cupy-numpy", "--passes", "forward",
                 "--repeat", "1", "--out", str(tmp_path)]) == 0
    assert "QUICK variant (the default here: no usable NVIDIA GPU was found; --full runs the " \
           "real sizes)" in capsys.readouterr().err


def test_quick_is_the_default_only_for_gpu_workloads_without_a_gpu():
    core, w1 = workloads.select("cpu-core"), workloads.select("W1,cpu-core")
    assert bench.default_quick(w1, lambda: False)
    assert not bench.default_quick(w1, lambda: True)
    assert not bench.default_quick(core, lambda: False)


def test_cli_rejects_bad_options(capsys):
    assert main(["--workloads", "W99"]) == 2
    assert main(["--backends", "cuda-magic"]) == 2
    assert main(["--passes", "sideways"]) == 2
    assert main(["--repeat", "0"]) == 2
    assert main(["--cpu-threads", "0"]) == 2
    err = capsys.readouterr().err
    assert "W99" in err and "cuda-magic" in err and "sideways" in err and "--repeat" in err
    assert "--cpu-threads must be >= 1, got 0" in err


def test_cli_help_lists_workloads_and_options():
    done = subprocess.run([sys.executable, "-m", "roi_cupy", "bench", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for word in ("--quick", "--full", "--workloads", "--backends", "--passes", "--out",
                 "--repeat", "--cpu-threads", "W7-sr0-large", "sweep-4096", "cpu-core",
                 "roi_cupy-cuda(validate=False)", "torchvision-cpu"):
        assert word in done.stdout


def test_gpu_script_fits_a_short_lease():
    """benchmarks/gpu-run.sh: valid bash, and its steps' time limits add up to under 9 minutes
    (a lent GPU gives 15 minutes in all, start and transfers included)."""
    import re
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu-run.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    limits = dict(re.findall(r"^step (\w+) (\d+) ", script.read_text(), flags=re.MULTILINE))
    assert set(limits) == {"env", "pytest", "memcheck", "racecheck", "bench"}
    assert sum(int(v) for v in limits.values()) < 9 * 60
    # The bench step names its workloads (the CPU family is run on its own): all exist.
    chosen = re.search(r"--workloads (\S+)", script.read_text()).group(1)
    assert workloads.select(chosen) and "cpu-large" not in chosen
