"""roi_cupy: RoI operators (RoI Align and its max mode, RoI Pool, their position-sensitive,
rotated and multi-scale versions) for NumPy, CuPy and any DLPack tensor."""
from roi_cupy._backend import use_backend
from roi_cupy._module import ModuleNative
from roi_cupy._tensor import Tensor
from roi_cupy.modules import RoiAlign, RoiPool
from roi_cupy.ops import (
    convert_boxes_to_roi_format,
    ps_roi_align,
    ps_roi_align_backward,
    ps_roi_pool,
    ps_roi_pool_backward,
    multi_scale_roi_align,
    multi_scale_roi_align_backward,
    roi_align,
    roi_align_backward,
    roi_align_rotated,
    roi_align_rotated_backward,
    roi_pool,
    roi_pool_backward,
)

__version__ = "0.1.0"

__all__ = [
    "ModuleNative",
    "RoiAlign",
    "RoiPool",
    "Tensor",
    "convert_boxes_to_roi_format",
    "ps_roi_align",
    "ps_roi_align_backward",
    "ps_roi_pool",
    "ps_roi_pool_backward",
    "multi_scale_roi_align",
    "multi_scale_roi_align_backward",
    "roi_align",
    "roi_align_backward",
    "roi_align_rotated",
    "roi_align_rotated_backward",
    "roi_pool",
    "roi_pool_backward",
    "use_backend",
]
