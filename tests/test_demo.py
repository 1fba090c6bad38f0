"""``python -m roi_cupy demo``, the main job: what it prints, what it writes, what it refuses."""
from __future__ import annotations

import numpy
import pytest
from conftest import availability

import roi_cupy
from roi_cupy import __main__ as cli
from roi_cupy import _demo


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
    ok, why = availability("cuda")
    if ok:
        pytest.skip("a GPU is present: the refusal of an unusable cuda backend cannot be shown")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--backend", "cuda"])
    assert "the cuda backend cannot run here" in capsys.readouterr().err
