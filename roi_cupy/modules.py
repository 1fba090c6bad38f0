"""babilim's RoI layers: ``RoiPool`` and ``RoiAlign`` on per-image boxes ``[N, K, 4]``."""
from __future__ import annotations

from typing import Any

from roi_cupy import ops
from roi_cupy._module import ModuleNative


class _RoiLayer(ModuleNative):
    """Shared call path: ``(features [N, C, H, W], rois [N, K, 4]) -> [N, K, C, PH, PW]``."""

    def __init__(self, output_size: ops.SizeLike, spatial_scale: float = 1.0):
        super().__init__()
        self.output_size = ops._pair(output_size)
        self.spatial_scale = ops._scale(spatial_scale)

    def _op(self, features: Any, boxes: Any) -> Any:
        raise NotImplementedError

    def _forward(self, features: Any, rois: Any) -> Any:
        ops._check_features(features, "features")
        if rois.ndim != 3 or rois.shape[2] != 4:
            raise ValueError(f"rois must have shape [N, K, 4], got {tuple(rois.shape)}")
        if rois.shape[0] != features.shape[0]:
            raise ValueError(
                f"rois must hold boxes for each of the N = {features.shape[0]} images, "
                f"got {rois.shape[0]}"
            )
        n, k = rois.shape[:2]
        out = self._op(features, ops.convert_boxes_to_roi_format(rois))
        return out.reshape((n, k) + tuple(out.shape[1:]))

    def _call_numpy(self, features: Any, rois: Any) -> Any:
        return self._forward(features, rois)

    def _call_cupy(self, features: Any, rois: Any) -> Any:
        return self._forward(features, rois)


class RoiPool(_RoiLayer):
    """RoI Pool (Fast R-CNN) as a babilim layer.

    Call with ``features (Tensor[N, C, H, W])`` and ``rois (Tensor[N, K, 4])``, boxes
    ``(x1, y1, x2, y2)`` per image; returns ``Tensor[N, K, C, PH, PW]`` in the features' kind.

    Args:
        output_size (int or (int, int)): ``(PH, PW)`` of each crop.
        spatial_scale (float): maps box coordinates to feature coordinates. Default: 1.0.
    """

    def _op(self, features: Any, boxes: Any) -> Any:
        return ops.roi_pool(features, boxes, self.output_size, self.spatial_scale)


class RoiAlign(_RoiLayer):
    """RoI Align (Mask R-CNN) as a babilim layer.

    Call with ``features (Tensor[N, C, H, W])`` and ``rois (Tensor[N, K, 4])``, boxes
    ``(x1, y1, x2, y2)`` per image; returns ``Tensor[N, K, C, PH, PW]`` in the features' kind.

    Note the default ``aligned=True``: babilim's layer passes that to torchvision, whereas the
    functional :func:`roi_cupy.roi_align` keeps torchvision's default ``aligned=False``.

    Args:
        output_size (int or (int, int)): ``(PH, PW)`` of each crop.
        spatial_scale (float): maps box coordinates to feature coordinates. Default: 1.0.
        sampling_ratio (int): samples per bin and axis, ``<= 0`` for adaptive. Default: -1.
        aligned (bool): half-pixel shift of the box coordinates. Default: True.
    """

    def __init__(
        self,
        output_size: ops.SizeLike,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = True,
    ):
        super().__init__(output_size, spatial_scale)
        self.sampling_ratio = ops._sampling(sampling_ratio)
        self.aligned = ops._flag(aligned, "aligned")

    def _op(self, features: Any, boxes: Any) -> Any:
        return ops.roi_align(
            features, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )
