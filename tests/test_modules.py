"""babilim's RoiPool / RoiAlign layers: the seed page's examples and their numbers."""
import numpy
import pytest

import roi_cupy
from roi_cupy import RoiAlign, RoiPool, Tensor


def _seed_inputs():
    tensor = Tensor(data=numpy.zeros((2, 3, 24, 24), dtype=numpy.float32), trainable=False)
    rois = Tensor(
        data=numpy.array(
            [[[0, 0, 12, 12], [4, 7, 6, 23]], [[0, 0, 12, 12], [4, 7, 6, 23]]], dtype=numpy.float32
        ),
        trainable=False,
    )
    return tensor, rois


@pytest.mark.parametrize("layer", [RoiPool, RoiAlign], ids=lambda c: c.__name__)
def test_seed_example_shapes(layer, capsys):
    roi = layer(output_size=(7, 4))
    tensor, rois = _seed_inputs()
    print(rois.shape)
    print(tensor.shape)
    result = roi(tensor, rois)
    print(result.shape)
    assert capsys.readouterr().out == "(2, 2, 4)\n(2, 3, 24, 24)\n(2, 2, 3, 7, 4)\n"
    assert isinstance(result, Tensor)


def test_layers_match_the_functional_ops():
    rng = numpy.random.default_rng(3)
    x = rng.standard_normal((2, 4, 20, 18)).astype(numpy.float32)
    xy = rng.uniform(-2, 14, size=(2, 5, 2))
    rois = numpy.concatenate([xy, xy + rng.uniform(0.5, 8, size=(2, 5, 2))], 2).astype(numpy.float32)
    flat = roi_cupy.convert_boxes_to_roi_format(rois)

    got = RoiAlign((3, 5), spatial_scale=0.5, sampling_ratio=2)(x, rois)
    want = roi_cupy.roi_align(x, flat, (3, 5), 0.5, 2, aligned=True)
    numpy.testing.assert_array_equal(got, want.reshape(2, 5, 4, 3, 5))

    got = RoiAlign(2, aligned=False)(x, rois)
    numpy.testing.assert_array_equal(got, roi_cupy.roi_align(x, flat, 2).reshape(2, 5, 4, 2, 2))

    got = RoiPool((3, 2), spatial_scale=0.5)(x, rois)
    numpy.testing.assert_array_equal(got, roi_cupy.roi_pool(x, flat, (3, 2), 0.5).reshape(2, 5, 4, 3, 2))


def test_roi_align_layer_defaults_to_aligned():
    assert RoiAlign(7).aligned is True
    assert RoiAlign(7).sampling_ratio == -1
    assert RoiAlign(7).output_size == (7, 7)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: RoiAlign(0), ValueError, "output_size must be positive"),
        (lambda: RoiPool((7, 2.5)), TypeError, "output_size must be an int or a pair"),
        (lambda: RoiAlign(7, spatial_scale=-1.0), ValueError, "spatial_scale must be positive"),
        (lambda: RoiAlign(7, sampling_ratio=0.5), TypeError, "sampling_ratio must be an int"),
    ],
)
def test_layer_arguments_are_checked(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_layer_call_shapes_are_checked():
    x = numpy.ones((2, 3, 8, 8), dtype=numpy.float32) * 0.5
    with pytest.raises(ValueError, match=r"rois must have shape \[N, K, 4\], got \(2, 4\)"):
        RoiPool(2)(x, numpy.ones((2, 4), dtype=numpy.float32))
    with pytest.raises(ValueError, match="rois must hold boxes for each of the N = 2 images, got 3"):
        RoiPool(2)(x, numpy.ones((3, 1, 4), dtype=numpy.float32))
    with pytest.raises(ValueError, match=r"features must have shape \[N, C, H, W\]"):
        RoiAlign(2)(x[0], numpy.ones((2, 1, 4), dtype=numpy.float32))


@pytest.mark.parametrize("layer", [RoiPool, RoiAlign], ids=lambda c: c.__name__)
def test_keyword_arguments_are_unwrapped_too(layer):
    rng = numpy.random.default_rng(5)
    features = Tensor(data=rng.uniform(-1, 1, (2, 3, 10, 10)).astype(numpy.float32))
    rois = Tensor(data=numpy.array([[[0, 0, 6, 6]], [[2, 1, 9, 8]]], dtype=numpy.float32))
    expected = layer(3)(features, rois).numpy()
    for result in (layer(3)(features=features, rois=rois), layer(3)(features, rois=rois)):
        assert isinstance(result, Tensor)
        numpy.testing.assert_array_equal(result.numpy(), expected)


@pytest.mark.parametrize("layer", [RoiPool, RoiAlign], ids=lambda c: c.__name__)
def test_empty_batch(layer):
    features = numpy.ones((0, 3, 8, 8), dtype=numpy.float32)
    result = layer((2, 3))(features, numpy.ones((0, 4, 4), dtype=numpy.float32))
    assert result.shape == (0, 4, 3, 2, 3) and result.dtype == numpy.float32
    rois = roi_cupy.convert_boxes_to_roi_format(numpy.ones((0, 4, 4), dtype=numpy.float64))
    assert rois.shape == (0, 5) and rois.dtype == numpy.float64


@pytest.mark.parametrize("layer", [roi_cupy.RoiAlign, roi_cupy.RoiPool])
def test_python_lists_are_refused_with_what_to_pass(layer):
    features = numpy.random.default_rng(3).random((1, 2, 8, 8)).astype(numpy.float32)
    rois = numpy.array([[[0, 0, 4, 4]]], dtype=numpy.float32)
    hint = r"got builtins.list \(Python numbers and lists are not taken: pass numpy.asarray"
    with pytest.raises(TypeError, match="rois must be a NumPy or CuPy array.*" + hint):
        layer(2)(features, rois.tolist())
    with pytest.raises(TypeError, match="features must be a NumPy or CuPy array.*" + hint):
        layer(2)(features=features.tolist(), rois=rois)
