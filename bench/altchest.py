"""A second, independently made chest-CT phantom, for generalisation checks only.

Like ``bench/altcxr.py``: built differently from the node's own chest-CT phantoms
(``flows/phantoms/chestct.py``) — an elliptic body with a fat layer, two ellipsoid lungs
with a dependent density gradient, straight tapered vessels, a mediastinum and a spine,
white noise smoothed by a kernel — with parameters fixed once, before any run, and not tuned
to the method. Lesions 0.5-20 cm³ (nodule, ground glass, consolidation). Values in HU on an
isotropic 4 mm grid.

    bench/ctmap.py TAG chestct '{"source": "alt"}'
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from bench.altcxr import alt_set
from flows.phantoms.anatomy import PhantomSet

FINDINGS = ("nodule", "ground_glass", "consolidation")
SPACING = 4.0


def _tube(shape: tuple[int, ...], a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """Distance-based mask of the segment a-b (voxels) with the given radius."""
    idx = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    ab = b - a
    t = np.clip(((idx - a) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
    d = np.linalg.norm(idx - (a + t[:, None] * ab), axis=1)
    return (d <= radius).reshape(shape)


def _one(rng: np.random.Generator, shape: tuple[int, int, int],
         finding: str) -> tuple[np.ndarray, np.ndarray]:
    d, h, w = shape
    zz, yy, xx = np.indices(shape).astype(np.float64)
    cy, cx = h / 2 + rng.normal(0, 1), w / 2 + rng.normal(0, 1)
    by, bx = h * rng.uniform(0.36, 0.44), w * rng.uniform(0.40, 0.47)
    rb = ((yy - cy) / by) ** 2 + ((xx - cx) / bx) ** 2
    vol = np.full(shape, -1000.0)
    vol[rb < 1.0] = -100.0  # fat
    vol[rb < 0.8] = 40.0  # muscle and mediastinum
    lungs = np.zeros(shape, bool)
    ly, lx, lz = by * rng.uniform(0.62, 0.72), bx * rng.uniform(0.30, 0.36), d * rng.uniform(0.40, 0.46)
    for side in (-1, 1):
        lungs |= (((yy - cy + 0.05 * h) / ly) ** 2 + ((xx - cx - side * 0.45 * bx) / lx) ** 2
                  + ((zz - d / 2) / lz) ** 2) < 1.0
    base = rng.uniform(-880, -820)
    vol[lungs] = (base + 60.0 * (yy / h - 0.5))[lungs]  # denser towards the back (dependent)
    spine = ((yy - (cy + 0.7 * by)) / 4.0) ** 2 + ((xx - cx) / 4.0) ** 2 < 1.0
    vol[spine & (rb < 1.0)] = 400.0
    lung_idx = np.argwhere(lungs)
    vessels = np.zeros(shape, bool)
    for _ in range(int(rng.integers(10, 16))):
        hil = np.array([d / 2 + rng.normal(0, 3), cy, cx + rng.choice([-1, 1]) * 0.2 * bx])
        end = lung_idx[rng.integers(len(lung_idx))].astype(np.float64)
        vessels |= _tube(shape, hil, end, rng.uniform(0.7, 1.3))
    vol[vessels & lungs] = 30.0
    mask = np.zeros(shape, bool)
    if finding != "normal":
        cm3 = {"nodule": rng.uniform(0.5, 6), "ground_glass": rng.uniform(1, 20),
               "consolidation": rng.uniform(2, 20)}[finding]
        r = (3 * cm3 * 1000 / (4 * np.pi)) ** (1 / 3) / SPACING  # voxels
        inner = np.argwhere(ndimage.binary_erosion(lungs, iterations=max(1, int(r * 0.6))))
        if finding == "consolidation":  # dependent: from the back half of the lung
            inner = inner[inner[:, 1] > np.median(inner[:, 1])]
        c = inner[rng.integers(len(inner))].astype(np.float64)
        dist = np.sqrt(((np.indices(shape).T - c).T ** 2).sum(0))
        mask = (dist <= r) & lungs
        hu = {"nodule": rng.uniform(20, 60), "ground_glass": rng.uniform(-650, -450),
              "consolidation": rng.uniform(10, 40)}[finding]
        vol[mask] = hu
    vol = ndimage.gaussian_filter(vol, 0.6)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, shape), 0.7)
    vol = vol + noise / noise.std() * rng.uniform(8, 25)
    vol[rb >= 1.0] = -1000.0
    return vol.astype(np.float32), mask


def make_alt_chestct(n: int, *, shape: tuple[int, int, int] = (64, 72, 96), abnormal_fraction: float = 0.0,
                     seed: int = 0) -> PhantomSet:
    """``n`` chest CT volumes ``(n, 1, D, H, W)`` in HU at 4 mm; case i depends only on (seed, i)."""
    return alt_set(n, shape, FINDINGS, abnormal_fraction, seed, lambda rng, f: _one(rng, shape, f),
                   spacing=(SPACING,) * 3, background=-1000.0, meta={"generator": "bench.altchest"})
