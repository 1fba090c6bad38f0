"""Tensor, ModuleNative and the array-kind round trips (NumPy, torch through DLPack)."""
import sys

import numpy
import pytest

import roi_cupy
from roi_cupy import ModuleNative, Tensor

RNG = numpy.random.default_rng(7)


def _features(n=2, c=3, h=12, w=14, dtype=numpy.float32):
    return RNG.standard_normal((n, c, h, w)).astype(dtype)


def _rois(n=2, k=3):
    xy = RNG.uniform(0, 10, size=(n, k, 2))
    wh = RNG.uniform(1, 6, size=(n, k, 2))
    return numpy.concatenate([xy, xy + wh], axis=2).astype(numpy.float32)


def test_tensor_wraps_numpy_without_copy():
    x = _features()
    t = Tensor(data=x, trainable=True)
    assert t.native is x
    assert t.numpy() is x
    assert t.shape == x.shape and t.dtype == x.dtype and t.device == "cpu"
    assert t.trainable is True
    assert "shape=(2, 3, 12, 14)" in repr(t)


def test_tensor_of_tensor_shares_native():
    x = _features()
    t = Tensor(data=Tensor(data=x))
    assert t.native is x and t.trainable is False


def test_tensor_is_a_dlpack_producer():
    x = _features()
    back = numpy.from_dlpack(Tensor(data=x))
    assert numpy.shares_memory(back, x)
    assert Tensor(data=x).__dlpack_device__() == (1, 0)


def test_tensor_from_dlpack():
    x = _features()
    t = Tensor.from_dlpack(x)
    assert numpy.shares_memory(t.numpy(), x)
    with pytest.raises(TypeError, match="obj must implement __dlpack__"):
        Tensor.from_dlpack([1, 2])


@pytest.mark.parametrize("data", [[1.0, 2.0], "abc", None, 3.0])
def test_tensor_rejects_non_arrays(data):
    with pytest.raises(TypeError, match="data must be a NumPy or CuPy array"):
        Tensor(data=data)


def test_ops_give_back_the_callers_kind():
    x, rois = _features(), _rois()
    boxes = roi_cupy.convert_boxes_to_roi_format(rois)
    plain = roi_cupy.roi_align(x, boxes, 3)
    assert isinstance(plain, numpy.ndarray)
    wrapped = roi_cupy.roi_align(Tensor(data=x), boxes, 3)
    assert isinstance(wrapped, Tensor) and isinstance(wrapped.native, numpy.ndarray)
    numpy.testing.assert_array_equal(wrapped.numpy(), plain)
    out, idx = roi_cupy.roi_pool(Tensor(data=x), boxes, 3, return_indices=True)
    assert isinstance(out, Tensor) and isinstance(idx, Tensor) and idx.dtype == numpy.int64


def test_convert_boxes_keeps_kind_and_dtype():
    rois = _rois(n=2, k=3).astype(numpy.float64)
    out = roi_cupy.convert_boxes_to_roi_format(Tensor(data=rois))
    assert isinstance(out, Tensor) and out.dtype == numpy.float64 and out.shape == (6, 5)
    numpy.testing.assert_array_equal(out.numpy()[:, 0], [0, 0, 0, 1, 1, 1])
    numpy.testing.assert_array_equal(out.numpy()[3:, 1:], rois[1])
    listed = roi_cupy.convert_boxes_to_roi_format([rois[0], rois[1][:1]])
    numpy.testing.assert_array_equal(listed[:, 0], [0, 0, 0, 1])


class _Echo(ModuleNative):
    """Counts builds and returns its first argument doubled, plus the second unchanged."""

    def __init__(self):
        super().__init__()
        self.builds = 0

    def build(self, a, b):
        self.builds += 1

    def _call_numpy(self, a, b):
        return a * 2, b


def test_module_native_builds_once_and_wraps_results():
    m = _Echo()
    a, b = _features(), _rois()
    out, same = m(Tensor(data=a), b)
    out2, _ = m(a, b)
    assert m.builds == 1
    assert isinstance(out, Tensor) and isinstance(same, Tensor)
    assert isinstance(out2, numpy.ndarray)
    numpy.testing.assert_array_equal(out.numpy(), a * 2)


def test_module_native_needs_an_array():
    with pytest.raises(TypeError, match="needs at least one array argument"):
        _Echo()(1, 2)


def test_cuda_input_without_cupy_says_what_to_install(monkeypatch):
    class OnGpu:
        """A CUDA DLPack producer."""

        def __dlpack__(self, stream=None):
            raise BufferError("unreachable")

        def __dlpack_device__(self):
            return (2, 0)

    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    with pytest.raises(ValueError, match="argument 0 lives on CUDA device 0, which needs CuPy"):
        _Echo()(OnGpu(), _rois())


# ----------------------------------------------------------------------------- torch through DLPack
def _torch():
    return pytest.importorskip("torch", reason="torch is not installed: DLPack round trips with torch are not checked")


def test_torch_in_torch_out_zero_copy():
    torch = _torch()
    x = torch.from_numpy(_features())
    t = Tensor(data=x)
    assert t.device == "cpu" and t.shape == tuple(x.shape)
    assert numpy.shares_memory(t.numpy(), x.numpy())
    back = torch.from_dlpack(t)
    assert back.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_torch_tensors_through_the_ops(dtype):
    torch = _torch()
    x = _features(dtype=dtype)
    boxes = roi_cupy.convert_boxes_to_roi_format(_rois()).astype(dtype)
    expected = roi_cupy.roi_align(x, boxes, (2, 3), 0.5, 2, True)
    got = roi_cupy.roi_align(torch.from_numpy(x), torch.from_numpy(boxes), (2, 3), 0.5, 2, True)
    assert isinstance(got, torch.Tensor) and got.dtype == getattr(torch, dtype)
    numpy.testing.assert_array_equal(got.numpy(), expected)
    out, idx = roi_cupy.roi_pool(torch.from_numpy(x), torch.from_numpy(boxes), 2, return_indices=True)
    assert isinstance(out, torch.Tensor) and idx.dtype == torch.int64
    grad = roi_cupy.roi_pool_backward(out, torch.from_numpy(boxes), idx, x.shape)
    assert isinstance(grad, torch.Tensor) and tuple(grad.shape) == x.shape


def test_torch_module_call_and_requires_grad_message():
    torch = _torch()
    layer = roi_cupy.RoiAlign(output_size=(7, 4))
    x = torch.from_numpy(_features())
    out = layer(x, torch.from_numpy(_rois()))
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 3, 3, 7, 4)
    boxes = roi_cupy.convert_boxes_to_roi_format(torch.from_numpy(_rois()))
    expected = r"input requires grad.*roi_cupy\.torch \(roi_cupy\.torch\.roi_align"
    with pytest.raises(TypeError, match=expected):
        roi_cupy.roi_align(x.clone().requires_grad_(True), boxes, 2)


def test_arrays_on_different_devices_are_named(monkeypatch):
    from roi_cupy import _interop

    x, boxes = _features(), roi_cupy.convert_boxes_to_roi_format(_rois())
    real = _interop.device_of
    monkeypatch.setattr(_interop, "device_of", lambda a: "cuda:1" if a is boxes else real(a))
    with pytest.raises(ValueError, match="boxes is on cuda:1 but input is on cpu"):
        roi_cupy.roi_align(x, boxes, 2)
    with pytest.raises(ValueError, match="argument 1 is on cuda:1 but argument 0 is on cpu"):
        _Echo()(x, boxes)


# ----------------------------------------------------------------------------- first contact
def test_boxes_as_python_lists_get_a_hint():
    with pytest.raises(TypeError, match=r"boxes must be an array .*got a list of builtins.list: "
                                        r"pass numpy.asarray"):
        roi_cupy.roi_align(_features(), [[[0.0, 0.0, 4.0, 4.0]], [[1.0, 1.0, 5.0, 5.0]]], 2)


def test_torch_bfloat16_cpu_is_read_in_place():
    torch = _torch()
    pytest.importorskip("ml_dtypes", reason="ml_dtypes gives NumPy its bfloat16")
    from roi_cupy import _interop

    x = torch.from_numpy(_features()).to(torch.bfloat16)
    array, _ = _interop.unwrap(x, "input")
    assert array.dtype.name == "bfloat16" and array.ctypes.data == x.data_ptr()
    boxes = roi_cupy.convert_boxes_to_roi_format(_rois())
    got = roi_cupy.roi_align(x, torch.from_numpy(boxes), 3, 1.0, 2, True)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16
    expected = roi_cupy.roi_align(array, boxes, 3, 1.0, 2, True)
    assert torch.equal(got, torch.from_numpy(expected.view(numpy.int16)).view(torch.bfloat16))


def test_tensor_keeps_a_tensor_that_requires_grad():
    torch = _torch()
    parameter = torch.nn.Parameter(torch.from_numpy(_features()))
    t = Tensor(data=parameter, trainable=True)
    assert t.native is parameter and t.trainable
    assert t.shape == tuple(parameter.shape) and t.dtype == numpy.float32 and t.device == "cpu"
    assert numpy.shares_memory(t.numpy(), parameter.detach().numpy())


def _jax():
    return pytest.importorskip("jax", reason="jax is not installed: JAX round trips are not checked")


def test_jax_arrays_through_the_plain_ops():
    jax = _jax()
    x, boxes = _features(), roi_cupy.convert_boxes_to_roi_format(_rois())
    got = roi_cupy.roi_align(jax.numpy.asarray(x), jax.numpy.asarray(boxes), 3, 0.5, 2, True)
    assert isinstance(got, jax.Array) and got.dtype == numpy.float32
    numpy.testing.assert_array_equal(numpy.asarray(got), roi_cupy.roi_align(x, boxes, 3, 0.5, 2, True))
    wrapped = roi_cupy.RoiPool(2)(Tensor(data=jax.numpy.asarray(x)), _rois())
    assert isinstance(wrapped, Tensor) and isinstance(wrapped.native, jax.Array)


def test_jax_tracers_point_to_the_adapter():
    jax = _jax()
    boxes = roi_cupy.convert_boxes_to_roi_format(_rois())
    with pytest.raises(TypeError, match=r"input is a JAX tracer .*roi_cupy\.jax\.roi_align"):
        jax.jit(lambda x: roi_cupy.roi_align(x, boxes, 2))(_features())


@pytest.mark.parametrize("backend_name", ["numpy", "emulator"])
@pytest.mark.parametrize("dtype", ["f2", "f4", "f8"])
def test_byte_order_never_changes_a_number(backend_name, dtype):
    x, boxes = _features(dtype=numpy.float64), roi_cupy.convert_boxes_to_roi_format(_rois())
    swapped = "<" if numpy.dtype(dtype).byteorder == ">" else ">"
    native, foreign = x.astype(dtype), x.astype(swapped + dtype)
    with roi_cupy.use_backend(backend_name):
        expected = roi_cupy.roi_align(native, boxes.astype(dtype), 3, 0.5, 2, True)
        got = roi_cupy.roi_align(foreign, boxes.astype(swapped + dtype), 3, 0.5, 2, True)
        numpy.testing.assert_array_equal(got, expected)
        assert got.dtype == expected.dtype == numpy.dtype(dtype)
        pooled, idx = roi_cupy.roi_pool(foreign, boxes, 3, return_indices=True)
        numpy.testing.assert_array_equal(pooled, roi_cupy.roi_pool(native, boxes, 3))
        grad = roi_cupy.roi_pool_backward(pooled.astype(swapped + dtype), boxes,
                                          idx.astype(swapped + "i8"), x.shape)
        numpy.testing.assert_array_equal(grad, roi_cupy.roi_pool_backward(pooled, boxes, idx, x.shape))
