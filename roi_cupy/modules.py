"""babilim's RoI layers: ``RoiPool`` and ``RoiAlign`` on per-image boxes ``[N, K, 4]``."""
from __future__ import annotations

from typing import Any

from roi_cupy import _args, _interop, ops
from roi_cupy._module import ModuleNative, _is_array_like


class _RoiLayer(ModuleNative):
    """Shared call path: ``(features [N, C, H, W], rois [N, K, 4]) -> [N, K, C, PH, PW]``.

    NumPy, CuPy and DLPack arrays run the functional ops; torch tensors run
    :mod:`roi_cupy.torch` and JAX arrays :mod:`roi_cupy.jax`, so gradients flow to the features.
    """

    FRAMEWORKS = frozenset({"torch", "jax"})

    def __init__(self, output_size: ops.SizeLike, spatial_scale: float = 1.0):
        super().__init__()
        self.output_size = _args.output_size_pair(output_size)
        self.spatial_scale = _args.spatial_scale_of(spatial_scale)

    def _op(self, ops_module: Any, features: Any, boxes: Any) -> Any:
        """The layer's op from ``ops_module`` (roi_cupy.ops or an adapter) on ``[K, 5]`` boxes
        or a list of per-image ``[K, 4]`` boxes."""
        raise NotImplementedError

    def __call__(self, features: Any, rois: Any) -> Any:
        for value, what in ((features, "features"), (rois, "rois")):
            if not _is_array_like(value):
                _interop.unwrap(value, what)  # raises the TypeError that says what to pass
        return super().__call__(features, rois)

    @staticmethod
    def _check_rois(features: Any, rois: Any) -> None:
        if len(rois.shape) != 3 or rois.shape[2] != 4:
            raise ValueError(f"rois must have shape [N, K, 4], got {tuple(rois.shape)}")
        if rois.shape[0] != features.shape[0]:
            raise ValueError(
                f"rois must hold boxes for each of the N = {features.shape[0]} images, "
                f"got {rois.shape[0]}"
            )

    @staticmethod
    def _per_image(out: Any, rois: Any) -> Any:
        n, k = rois.shape[:2]
        return out.reshape((n, k) + tuple(out.shape[1:]))

    def _forward(self, features: Any, rois: Any) -> Any:
        _args.check_features(features, "features")
        self._check_rois(features, rois)
        return self._per_image(self._op(ops, features, ops.convert_boxes_to_roi_format(rois)), rois)

    def _call_numpy(self, features: Any, rois: Any) -> Any:
        return self._forward(features, rois)

    def _call_cupy(self, features: Any, rois: Any) -> Any:
        return self._forward(features, rois)

    def _call_torch(self, features: Any, rois: Any) -> Any:
        import roi_cupy.torch

        self._check_rois(features, rois)
        return self._per_image(self._op(roi_cupy.torch, features, list(rois.unbind(0))), rois)

    def _call_jax(self, features: Any, rois: Any) -> Any:
        import roi_cupy.jax

        self._check_rois(features, rois)
        per_image = [rois[i] for i in range(rois.shape[0])]
        return self._per_image(self._op(roi_cupy.jax, features, per_image), rois)


class RoiPool(_RoiLayer):
    """RoI Pool (Fast R-CNN) as a babilim layer.

    Call with ``features (Tensor[N, C, H, W])`` and ``rois (Tensor[N, K, 4])``, boxes
    ``(x1, y1, x2, y2)`` per image; returns ``Tensor[N, K, C, PH, PW]`` in the features' kind.

    Args:
        output_size (int or (int, int)): ``(PH, PW)`` of each crop.
        spatial_scale (float): maps box coordinates to feature coordinates. Default: 1.0.
    """

    def _op(self, ops_module: Any, features: Any, boxes: Any) -> Any:
        return ops_module.roi_pool(features, boxes, self.output_size, self.spatial_scale)


class RoiAlign(_RoiLayer):
    """RoI Align (Mask R-CNN) as a babilim layer.

    Call with ``features (Tensor[N, C, H, W])`` and ``rois (Tensor[N, K, 4])``, boxes
    ``(x1, y1, x2, y2)`` per image; returns ``Tensor[N, K, C, PH, PW]`` in the features' kind.

    Note the default ``aligned=True``: babilim's layer passes that to torchvision, whereas the
    functional :func:`roi_cupy.roi_align` keeps torchvision's default ``aligned=False``.

    Args:
        output_size (int or (int, int)): ``(PH, PW)`` of each crop.
        spatial_scale (float): maps box coordinates to feature coordinates. Default: 1.0.
        sampling_ratio (int or (int, int)): samples per bin along both axes, or per axis
            ``(sampling_h, sampling_w)``; ``<= 0`` for adaptive. Default: -1.
        aligned (bool): half-pixel shift of the box coordinates. Default: True.
        mode (str): ``"avg"`` (a bin's mean) or ``"max"`` (its largest sample), as for
            :func:`roi_cupy.roi_align`. Default: "avg".
    """

    def __init__(
        self,
        output_size: ops.SizeLike,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = True,
        *,
        mode: str = "avg",
    ):
        super().__init__(output_size, spatial_scale)
        _args.sampling_of(sampling_ratio)  # checked here, kept as given
        self.sampling_ratio = sampling_ratio
        self.aligned = _args.flag(aligned, "aligned")
        self.mode = _args.align_mode(mode)

    def _op(self, ops_module: Any, features: Any, boxes: Any) -> Any:
        return ops_module.roi_align(
            features, boxes, self.output_size, self.spatial_scale, self.sampling_ratio,
            self.aligned, mode=self.mode,
        )
