"""NumPy backend: every operator on the CPU with the numbers of docs/semantics.md, a file per
operator."""
from roi_cupy._backend import Capabilities
from roi_cupy._numpy.multi_scale_roi_align import (
    multi_scale_roi_align_backward,
    multi_scale_roi_align_forward,
)
from roi_cupy._numpy.roi_align import (
    roi_align_backward,
    roi_align_forward,
    roi_align_max_backward,
    roi_align_max_forward,
)
from roi_cupy._numpy.roi_align_rotated import (
    roi_align_rotated_backward,
    roi_align_rotated_forward,
)
from roi_cupy._numpy.roi_check import first_invalid
from roi_cupy._numpy.roi_pool import roi_pool_backward, roi_pool_forward
from roi_cupy._numpy.ps_roi_align import ps_roi_align_backward, ps_roi_align_forward
from roi_cupy._numpy.ps_roi_pool import ps_roi_pool_backward, ps_roi_pool_forward

# The functions read features, gradients and indices of any strides (and indices of any integer
# dtype) chunk by chunk, so the caller passes them as they are: no full-size copy is made; and
# roi_pool_backward checks RoI Pool's indices chunk by chunk as it reads them.
CAPABILITIES = Capabilities(strided=True, fused_index_check=True)

__all__ = [
    "CAPABILITIES",
    "first_invalid",
    "ps_roi_align_backward",
    "ps_roi_align_forward",
    "ps_roi_pool_backward",
    "ps_roi_pool_forward",
    "multi_scale_roi_align_backward",
    "multi_scale_roi_align_forward",
    "roi_align_backward",
    "roi_align_forward",
    "roi_align_max_backward",
    "roi_align_max_forward",
    "roi_align_rotated_backward",
    "roi_align_rotated_forward",
    "roi_pool_backward",
    "roi_pool_forward",
]
