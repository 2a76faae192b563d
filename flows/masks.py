"""Masks that guide patch selection: lungs for chest CT, the intracranial space for head CT.

Thresholding and morphology only (scipy.ndimage), so they work on any scanner's HU volume
without a model. Both return an empty mask rather than raising when nothing qualifies; the
patch map refuses an empty mask with a clear error, and the caller decides whether to fall
back to the whole volume.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from flows.preprocess import check_spacing


def _check(hu: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    vol = np.asarray(hu)
    if vol.ndim != 3:
        raise ValueError(f"a CT mask needs a 3D volume, got shape {vol.shape}")
    check_spacing(spacing, 3)
    if not np.isfinite(vol).all():
        raise ValueError(f"volume holds {int((~np.isfinite(vol)).sum())} NaN/inf voxel(s)")
    return vol


def _border_labels(labels: np.ndarray, slices_too: bool = True) -> np.ndarray:
    faces = [labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    if slices_too:
        faces += [labels[0], labels[-1]]
    ids = np.unique(np.concatenate([f.ravel() for f in faces]))
    return ids[ids > 0]


def _ball(radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    r = [max(1, round(radius_mm / s)) for s in spacing]
    zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    # the same tolerance as ball_closing: a voxel on the surface is in, whatever the rounding
    r2 = (radius_mm * (1.0 + 1e-9)) ** 2
    return ((zz * spacing[0]) ** 2 + (yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2) <= r2


def ball_closing(mask: np.ndarray, radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Binary closing with the Euclidean ball of :func:`_ball`, by two distance transforms.

    Dilation by a ball of radius r is {x : dist(x, mask) <= r} and erosion keeps the voxels
    whose nearest background lies farther than r, so this equals ``binary_closing(mask,
    _ball(r, spacing))`` wherever the ball stays inside the array (callers pad by the ball's
    radius) at O(voxels) instead of O(voxels x ball): 15 mm at 2 mm is a 2 000-voxel ball.
    """
    r = radius_mm * (1.0 + 1e-9)  # the ball includes its surface; keep ties on that side
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    grown = ndimage.distance_transform_edt(~mask, sampling=spacing) <= r
    if grown.all():
        return grown
    return np.asarray(ndimage.distance_transform_edt(grown, sampling=spacing) > r)


def _sealed_body(tissue: np.ndarray, spacing: tuple[float, ...], seal_mm: float) -> np.ndarray:
    """Per axial slice: the tissue closed by a disc of ``seal_mm``, its holes filled."""
    r = [max(1, round(seal_mm / s)) for s in spacing[1:]]
    yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1]
    disc = (yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2 <= seal_mm ** 2 * (1.0 + 1e-9)
    pad = [(r[0], r[0]), (r[1], r[1])]
    body = np.zeros(tissue.shape, dtype=bool)
    for k in range(tissue.shape[0]):
        if tissue[k].any():  # padded, so the closing does not erode at the image edge
            closed = ndimage.binary_closing(np.pad(tissue[k], pad), disc)[r[0]:-r[0], r[1]:-r[1]]
            body[k] = ndimage.binary_fill_holes(closed)
    return body


def lung_mask(hu: np.ndarray, spacing: tuple[float, float, float], *,
              threshold_hu: float = -400.0, min_cm3: float = 50.0,
              closing_mm: float = 25.0, seal_mm: float = 8.0) -> np.ndarray:
    """Lungs: air-like voxels inside the body, the large components, closed.

    The closing (a ball of ``closing_mm``) brings vessels, nodules and consolidation that
    touch the parenchyma back into the mask (CT-3DFlow selects patches by this mask, and a
    lesion outside it would never be scored); holes are filled slice by slice. 25 mm keeps a
    juxtapleural consolidation of 20 cm³ (34 mm across) inside, where 15 mm lost whole ones.
    """
    vol = _check(hu, spacing)
    # Air inside the body: a chest wall thinned to a voxel or two by partial volume and noise
    # must not join the lungs to the air outside (the lungs would then be discarded as
    # "outside"), so the body is sealed by a small in-plane closing before its holes are filled.
    air = (vol < threshold_hu) & _sealed_body(vol >= threshold_hu, spacing, seal_mm)
    labels, n = ndimage.label(air)
    if n == 0:
        return np.zeros(vol.shape, dtype=bool)
    # outside = air touching the in-plane edges; the trachea may leave through the top slice
    outside = _border_labels(labels, slices_too=False)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    unit = float(np.prod(spacing)) / 1000.0
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = sizes[1:] * unit >= min_cm3
    keep[outside] = False
    mask = np.zeros(vol.shape, dtype=bool)
    ball = _ball(closing_mm, spacing)
    pad = np.array(ball.shape) // 2 + 1
    # close each lung on its own, so the closing never bridges the mediastinum
    for lab in np.flatnonzero(keep):
        box = ndimage.find_objects((labels == lab).astype(np.int8))[0]
        lo = [max(0, s.start - p) for s, p in zip(box, pad, strict=True)]
        hi = [min(n, s.stop + p) for s, p, n in zip(box, pad, vol.shape, strict=True)]
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        one = np.pad(labels[sl] == lab, [(int(p), int(p)) for p in pad])
        closed = ball_closing(one, closing_mm, spacing)
        closed = closed[tuple(slice(int(p), -int(p)) for p in pad)]
        for k in range(closed.shape[0]):
            closed[k] = ndimage.binary_fill_holes(closed[k])
        mask[sl] |= closed
    return mask


def body_mask(hu: np.ndarray, spacing: tuple[float, float, float], *,
              threshold_hu: float = -400.0, seal_mm: float = 8.0) -> np.ndarray:
    """The patient: tissue sealed and filled slice by slice (lungs, airways and skull inside),
    the largest component only, so the table and other objects in air are left out."""
    vol = _check(hu, spacing)
    body = _sealed_body(vol >= threshold_hu, spacing, seal_mm)
    labels, n = ndimage.label(body)
    if n == 0:
        return body
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return np.asarray(labels == int(np.argmax(sizes)))


def intracranial_mask(hu: np.ndarray, spacing: tuple[float, float, float], *,
                      bone_hu: float = 300.0, min_cm3: float = 20.0) -> np.ndarray:
    """The space enclosed by the skull: the largest soft-tissue component inside the bone.

    Components touching the in-plane edges are outside the head; the first and last slice
    may cut through the brain, so touching those is allowed.
    """
    vol = _check(hu, spacing)
    soft = (vol > -200.0) & (vol < bone_hu)
    # seal the skull's foramina a little so the brain is not connected to the scalp
    bone = ndimage.binary_dilation(vol >= bone_hu, structure=_ball(2.0 * max(spacing[1:]), spacing))
    labels, n = ndimage.label(soft & ~bone)
    if n == 0:
        return np.zeros(vol.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    unit = float(np.prod(spacing)) / 1000.0
    sizes[0] = 0
    sizes[_border_labels(labels, slices_too=False)] = 0  # scan range may cut the brain
    best = int(np.argmax(sizes))
    if sizes[best] * unit < min_cm3:
        return np.zeros(vol.shape, dtype=bool)
    mask = labels == best  # the brain; the scalp is a thin shell outside the skull
    if mask.any():
        ball = _ball(2.0 * max(spacing[1:]), spacing)
        mask = ndimage.binary_dilation(mask, structure=ball) & (vol < bone_hu)
    return mask
