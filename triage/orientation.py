"""One axis order for every volume a model sees, whatever order the scanner stored it in.

A DICOM series is stacked as stored: slices along the normal of Image Orientation (Patient),
rows and columns as the scanner wrote them. Most axial CTs come out as (S, P, L) — slices
towards the head, rows towards the back, columns towards the patient's left — but a series
stored right-to-left, bottom-to-top, or acquired sagittally or coronally does not, and a model
trained on (S, P, L) volumes scores such a mirror image as something else. NIfTI files are
read in (S, P, L) already (:mod:`triage.imagefiles`, through nibabel's closest canonical).
:func:`canonical_volume` brings a DICOM volume there too (nibabel's orientation tools: the
closest axis-aligned order, flips and permutations only, no resampling), and
:class:`Reorientation` takes a map and lesion positions back to the stored grid, where the
node's SEG and key images must go.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

if TYPE_CHECKING:
    from triage.imaging import Series

CANONICAL = np.array([[2.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
"""nibabel orientation of an (S, P, L) array in patient LPS millimetres: array axis 0 runs
along world z (+, superior), axis 1 along world y (+, posterior), axis 2 along world x
(+, left)."""


def volume_affine(s: Series) -> np.ndarray:
    """4x4 matrix from (slice, row, column) indices to patient LPS millimetres."""
    if s.origin is None or s.direction is None:
        raise ValueError("the volume has no patient geometry")
    d = np.asarray(s.direction, dtype=float).reshape(3, 3)  # row cosine, column cosine, normal
    a = np.eye(4)
    a[:3, 0] = d[2] * s.spacing[0]  # slice index moves along the normal
    a[:3, 1] = d[1] * s.spacing[1]  # row index moves along the column cosine
    a[:3, 2] = d[0] * s.spacing[2]  # column index moves along the row cosine
    a[:3, 3] = s.origin
    return a


@dataclass(frozen=True)
class Reorientation:
    """How a canonical (S, P, L) volume maps back onto the series as stored."""

    to_stored: np.ndarray  # nibabel orientation transform, canonical -> stored
    index_to_stored: np.ndarray  # 4x4: canonical voxel index -> stored voxel index

    def values(self, canonical: np.ndarray) -> np.ndarray:
        """A map on the canonical grid -> the same map on the stored grid."""
        return np.ascontiguousarray(apply_orientation(canonical, self.to_stored))

    def index(self, point: tuple[float, ...] | list[float]) -> list[float]:
        """A voxel position (fractional) on the canonical grid -> on the stored grid."""
        return [float(v) for v in (self.index_to_stored @ np.append(np.asarray(point, float), 1.0))[:3]]

    def box(self, bbox: list[list[int]] | tuple[tuple[int, int], ...]) -> list[list[int]]:
        """A half-open box per axis, ``[[lo, hi), ...]`` on the canonical grid -> on the stored grid."""
        lo = self.index([float(a) for a, _ in bbox])
        hi = self.index([float(b) - 1.0 for _, b in bbox])
        return [[round(min(a, b)), round(max(a, b)) + 1] for a, b in zip(lo, hi, strict=True)]


def canonical_volume(s: Series) -> tuple[Series, Reorientation | None]:
    """``s`` in (S, P, L) axis order, and how to go back (None: ``s`` is in that order
    already, or has no patient geometry to tell, like a ``.npy`` array)."""
    if not s.is_volume or s.origin is None or s.direction is None:
        return s, None
    a = volume_affine(s)
    start = io_orientation(a)
    if np.array_equal(start, CANONICAL):
        return s, None
    t = ornt_transform(start, CANONICAL)
    arr = np.ascontiguousarray(apply_orientation(s.array, t))
    ac = a @ inv_ornt_aff(t, s.array.shape)
    sp = np.sqrt((ac[:3, :3] ** 2).sum(axis=0))
    direction = (*(ac[:3, 2] / sp[2]), *(ac[:3, 1] / sp[1]), *(ac[:3, 0] / sp[0]))
    # the slice axis keeps its instances only if it is still axis 0
    uids = (list(s.sop_instance_uids)[:: int(t[0, 1])] if int(t[0, 0]) == 0 else [])
    out = replace(s, array=arr, spacing=(float(sp[0]), float(sp[1]), float(sp[2])),
                  origin=(float(ac[0, 3]), float(ac[1, 3]), float(ac[2, 3])),
                  direction=tuple(float(v) for v in direction), sop_instance_uids=uids,
                  meta={**s.meta, "reoriented_from": [[int(i), int(f)] for i, f in start]})
    return out, Reorientation(to_stored=ornt_transform(CANONICAL, start),
                              index_to_stored=np.linalg.inv(a) @ ac)
