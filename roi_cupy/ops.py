"""Functional RoI operators with torchvision's signatures and numbers.

Every function validates its arguments on the host (``roi_cupy._args``), normalises the boxes to
a ``[K, 5]`` array, hands native arrays to a backend (see ``roi_cupy._backend``) and gives the
results back in the kind of array the caller passed. Each operator's entry points live in a file
of its own under ``roi_cupy/_ops/``.
"""
from roi_cupy._args import BoxesLike, SizeLike, convert_boxes_to_roi_format
from roi_cupy._ops.multi_scale_roi_align import (
    multi_scale_roi_align,
    multi_scale_roi_align_backward,
)
from roi_cupy._ops.roi_align import roi_align, roi_align_backward
from roi_cupy._ops.roi_align_rotated import roi_align_rotated, roi_align_rotated_backward
from roi_cupy._ops.roi_pool import roi_pool, roi_pool_backward
from roi_cupy._ops.ps_roi_align import ps_roi_align, ps_roi_align_backward
from roi_cupy._ops.ps_roi_pool import ps_roi_pool, ps_roi_pool_backward

__all__ = [
    "BoxesLike",
    "SizeLike",
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
]
