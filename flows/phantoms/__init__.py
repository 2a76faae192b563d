"""Synthetic ("phantom") data with labelled abnormalities for the flow models.

* :func:`make_cxr`: frontal chest radiographs (real lung shapes from torchxrayvision's
  lung masks, real RSNA pneumonia box positions), findings ``CXR_FINDINGS``;
* :func:`make_headct`: head CT volumes in HU (real anatomy from nilearn's MNI152
  templates), findings ``HEADCT_FINDINGS``;
* :func:`trivial_baselines`: mean intensity, histogram entropy and background fraction,
  the scores a good phantom must not let separate normal from abnormal.

Generation is deterministic: case ``i`` depends only on ``(seed, i)``.
"""

from .anatomy import PhantomSet
from .baselines import auroc, trivial_baselines
from .cxr import CXR_FINDINGS, make_cxr
from .headct import HEADCT_FINDINGS, make_headct

__all__ = [
    "CXR_FINDINGS",
    "HEADCT_FINDINGS",
    "PhantomSet",
    "auroc",
    "make_cxr",
    "make_headct",
    "trivial_baselines",
]
