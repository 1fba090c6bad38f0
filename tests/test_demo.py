"""``python -m roi_cupy demo``, the main job: what it prints, what it writes, what it refuses."""
from __future__ import annotations

import sys
import types

import numpy
import pytest
from conftest import availability

import roi_cupy
from roi_cupy import __main__ as cli
from roi_cupy import _cuda, _demo


@pytest.mark.parametrize("backend", ["numpy", "emulator"])
def test_demo_runs_and_reports(backend, tmp_path, capsys):
    ok, why = availability(backend)
    if not ok:
        pytest.skip(f"backend {backend!r} is not available: {why}")
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--backend", backend, "--out", str(out), "--size", "16"]) == 0
    text = capsys.readouterr().out
    assert f"demo on the {backend} backend" in text
    assert "RoiAlign  16x16" in text and "-> [1, 5, 3, 16, 16]" in text
    assert "RoiPool   4x4" in text and "-> [1, 5, 3, 4, 4]" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "PNG skipped: matplotlib is missing" in text and not out.exists()
    else:
        assert f"wrote {out}" in text and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_crops_are_the_layers_results():
    image = _demo.scene()
    assert image.shape == (3, 256, 384) and image.dtype == numpy.float32
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.1
    rois = numpy.array([[b[1:] for b in _demo.BOXES]], dtype=numpy.float32)
    crops = roi_cupy.RoiAlign((8, 8), sampling_ratio=2)(image[None], rois)
    # The sun crop is mostly sun yellow; the box past the right edge is partly black (zeros).
    sun = crops[0, 0].reshape(3, -1).mean(axis=1)
    assert sun[0] > 0.8 and sun[2] < 0.5
    assert (crops[0, 4, :, :, -1] == 0).all() and (crops[0, 4, :, :, 0] > 0).all()


def test_demo_refuses_bad_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--size", "0"])
    assert "--size: must be a positive number of pixels, got 0" in capsys.readouterr().err


# What CuPy raises on a machine without an NVIDIA GPU (or with a driver too old for it).
INSUFFICIENT_DRIVER = ("cudaErrorInsufficientDriver: CUDA driver version is insufficient for "
                       "CUDA runtime version")


@pytest.fixture
def no_gpu(monkeypatch):
    """roi_cupy._cuda.available() as on a machine without a usable GPU, whatever this one has:
    it runs against a stand-in CuPy whose runtime raises what CuPy's does there."""
    def no_driver():
        raise RuntimeError(INSUFFICIENT_DRIVER)

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_driver))
    real = _cuda.available

    def available():
        with monkeypatch.context() as m:  # the stand-in only while available() looks
            m.setitem(sys.modules, "cupy", cupy)
            return real()

    monkeypatch.setattr(_cuda, "available", available)


def test_available_says_no_usable_gpu_then_cupys_reason(no_gpu):
    assert _cuda.available() == (
        False, f"no usable NVIDIA GPU was found; CuPy says: {INSUFFICIENT_DRIVER}")


def test_demo_without_a_gpu_says_so_plainly(no_gpu, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--backend", "cuda"])
    assert (
        "the cuda backend cannot run here: no usable NVIDIA GPU was found; CuPy says: "
        + INSUFFICIENT_DRIVER
    ) in capsys.readouterr().err
    # auto runs on NumPy instead, and says why.
    assert cli.main(["demo", "--out", str(tmp_path / "demo.png"), "--size", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("demo on the numpy backend")
    assert lines[1] == f"  (not on cuda: no usable NVIDIA GPU was found; CuPy says: " \
                       f"{INSUFFICIENT_DRIVER})"


def test_caption_explains_roi_pool_colour_halos():
    caption = " ".join(_demo.CAPTION.split())
    assert "maximum of each channel on its own" in caption
    assert "R, G and B maxima may come from different pixels" in caption
    assert "pink rim" in caption


def test_figure_text_stays_inside_the_png():
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (demo)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = _demo.scene()
    rois = numpy.array([[b[1:] for b in _demo.BOXES]], dtype=numpy.float32)
    aligned = roi_cupy.RoiAlign((48, 48), sampling_ratio=2)(image[None], rois)[0]
    pooled = roi_cupy.RoiPool((12, 12))(image[None], rois)[0]
    fig = _demo.figure(image, aligned, pooled)
    try:
        fig.set_dpi(110)  # as saved
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)
        page = fig.bbox
        texts = [t for ax in fig.axes for t in [ax.title, *ax.texts] if t.get_text()]
        assert any(t.get_text() == _demo.CAPTION for t in texts)
        for t in texts:
            box = t.get_window_extent(renderer)
            inside = (box.x0 >= page.x0 and box.y0 >= page.y0 and box.x1 <= page.x1
                      and box.y1 <= page.y1)
            assert inside, (t.get_text()[:40], box, page)
    finally:
        plt.close(fig)


def test_cli_without_a_command_and_version(capsys):
    assert cli.main([]) == 2
    assert "a command is needed" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"roi_cupy {roi_cupy.__version__}"


def test_cli_output_to_a_closed_pipe_is_quiet():
    """``python -m roi_cupy ... | head -1``: when the reader leaves early, the command ends with
    status 1 and no traceback (a megabyte of output does not fit the pipe's buffer)."""
    import subprocess

    code = (
        "import sys, roi_cupy.__main__ as cli\n"
        "cli.main = lambda: print('x' * 10**6) or 0\n"
        "sys.exit(cli._run())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err == b"", err.decode()
