"""Priority levels for the worklist: 1 is read first.

=====  ===========  ==============================================================
level  name         when
=====  ===========  ==============================================================
1      urgent       abnormal, and beyond the 99th percentile of the bundle's
                    reference scores (or, for a map, abnormal volume >= 4 T)
2      abnormal     above the bundle's operating threshold
3      borderline   above the 90th percentile (or any abnormal voxel cluster)
4      routine      everything else
=====  ===========  ==============================================================

Within a level, studies are ordered by score (higher = more abnormal), then arrival.
"""

from __future__ import annotations

import math

__all__ = ["PRIORITY_NAMES", "priority"]

PRIORITY_NAMES = {1: "urgent", 2: "abnormal", 3: "borderline", 4: "routine"}


def priority(*, abnormal: bool, percentile: float | None = None, abnormal_cm3: float | None = None,
             threshold_cm3: float | None = None) -> int:
    """The priority level of one result (see the module table)."""
    if percentile is not None and math.isfinite(percentile):
        if abnormal and percentile >= 99.0:
            return 1
        if abnormal:
            return 2
        return 3 if percentile >= 90.0 else 4
    cm3 = abnormal_cm3 or 0.0
    if abnormal and threshold_cm3 is not None and cm3 >= 4 * max(threshold_cm3, 0.5):
        return 1
    if abnormal:
        return 2
    return 3 if cm3 > 0 else 4
