"""From an abnormality map to findings: binarise, keep connected components, measure them.

CT-3DFlow binarises the Log P map at a threshold calibrated on normal volumes, filters the
components, and calls a patient abnormal when the abnormal volume exceeds T cm³ (searched
over 0.5-20 cm³ on a validation ROC). For radiographs the same holds in 2D with areas in cm².
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from flows.preprocess import check_spacing


@dataclass
class Lesion:
    """One connected abnormal region."""

    size: float  # cm³ for volumes, cm² for images
    voxels: int
    centroid_index: tuple[float, ...]  # in array index order
    centroid_mm: tuple[float, ...]  # patient coordinates when an affine is given, else index * spacing
    peak: float  # highest map value inside
    bbox: tuple[tuple[int, int], ...]  # [start, stop) per axis

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def unit_size(spacing: tuple[float, ...]) -> float:
    """Size of one voxel in cm³ (3D) or one pixel in cm² (2D), from spacing in mm."""
    sp = check_spacing(spacing, len(spacing))
    return float(np.prod(sp) / (10.0 ** len(sp)))


def find_lesions(values: np.ndarray, threshold: float, spacing: tuple[float, ...], *,
                 min_size: float = 0.0, affine: np.ndarray | None = None,
                 connectivity: int = 1) -> list[Lesion]:
    """Connected components of ``values >= threshold`` of at least ``min_size`` cm³ (cm²).

    NaN (uncovered) voxels are never abnormal. ``affine`` maps array indices (homogeneous
    column vector) to patient millimetres; without it centroids are index times spacing.
    Lesions come sorted by size, largest first.
    """
    sp = check_spacing(spacing, values.ndim)
    binary = np.nan_to_num(values, nan=-np.inf) >= threshold
    structure = ndimage.generate_binary_structure(values.ndim, connectivity)
    labels, n = ndimage.label(binary, structure)
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    unit = unit_size(tuple(sp))
    peaks = ndimage.maximum(values, labels, idx)
    centroids = ndimage.center_of_mass(binary, labels, idx)
    boxes = ndimage.find_objects(labels)
    out = []
    for i in range(n):
        size = float(counts[i]) * unit
        if size < min_size:
            continue
        c = np.asarray(centroids[i], dtype=np.float64)
        if affine is not None:
            mm = (np.asarray(affine, dtype=np.float64) @ np.append(c, 1.0))[: values.ndim]
        else:
            mm = c * sp
        box = boxes[i]
        assert box is not None
        out.append(Lesion(size=size, voxels=int(counts[i]), centroid_index=tuple(map(float, c)),
                          centroid_mm=tuple(map(float, mm)), peak=float(peaks[i]),
                          bbox=tuple((int(s.start), int(s.stop)) for s in box)))
    return sorted(out, key=lambda le: -le.size)


def abnormal_size(lesions: list[Lesion]) -> float:
    return float(sum(le.size for le in lesions))


def voxel_threshold(normal_maps: list[np.ndarray] | np.ndarray, percentile: float = 99.0) -> float:
    """Binarisation threshold: a high percentile of the map values on normal cases."""
    vals = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in normal_maps])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        raise ValueError("no finite map values on the normal cases to calibrate a threshold")
    return float(np.percentile(vals, percentile))


def choose_size_threshold(sizes: np.ndarray, labels: np.ndarray,
                          search: tuple[float, float] = (0.5, 20.0), steps: int = 40) -> float:
    """T maximising Youden's J of ``size > T`` over a log-spaced grid in ``search``."""
    sizes = np.asarray(sizes, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("choosing T needs both normal and abnormal validation cases")
    best_t, best_j = search[0], -np.inf
    for t in np.geomspace(search[0], search[1], steps):
        pred = sizes > t
        j = pred[labels].mean() - pred[~labels].mean()
        if j > best_j:
            best_t, best_j = float(t), float(j)
    return best_t
