"""A second, independently made head-CT phantom, for generalisation checks only.

Like ``bench/altcxr.py``: built differently from the node's own phantoms
(``flows/phantoms/headct.py``, which warp real MNI152 templates) — an ellipsoid head with a
skull shell, cortex and white matter, two ventricles, white noise smoothed in-plane — with
parameters fixed once, before any run, and not tuned to the method. Values in HU.

    bench/accuracy.py TAG bct '{"source": "alt"}'
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from bench.altcxr import alt_set
from flows.phantoms.anatomy import PhantomSet

FINDINGS = ("haemorrhage", "subdural", "infarction")
SPACING = (8.0, 3.5, 3.5)  # mm: thick slices, as in the node's own head-CT phantoms


def _one(rng: np.random.Generator, shape: tuple[int, int, int],
         finding: str) -> tuple[np.ndarray, np.ndarray]:
    d, h, w = shape
    zz, yy, xx = np.mgrid[0:d, 0:h, 0:w].astype(np.float64)
    zz = (zz - d / 2 + rng.normal(0, 0.5)) / (d / 2)
    yy = (yy - h / 2 + rng.normal(0, 1.5)) / (h / 2)
    xx = (xx - w / 2 + rng.normal(0, 1.5)) / (w / 2)
    ang = rng.normal(0, 0.08)  # in-plane tilt
    yy, xx = np.cos(ang) * yy - np.sin(ang) * xx, np.sin(ang) * yy + np.cos(ang) * xx
    s = rng.uniform(0.85, 1.0)
    ay, ax, az = 0.82 * s * rng.uniform(0.95, 1.05), 0.68 * s * rng.uniform(0.95, 1.05), 1.2
    r = np.sqrt((yy / ay) ** 2 + (xx / ax) ** 2 + (zz / az) ** 2)  # 1 = outer scalp
    vol = np.full(shape, -1000.0)
    vol[r < 1.0] = 30.0  # scalp
    skull_in = rng.uniform(0.86, 0.9)
    vol[(r < 0.95) & (r >= skull_in)] = rng.uniform(800, 1200)
    brain = r < skull_in
    vol[brain] = 8.0  # a thin CSF rim under the skull
    cortex = r < skull_in - 0.03
    vol[cortex] = 36.0 + rng.normal(0, 1.5)
    wm = r < skull_in - 0.15
    vol[wm] = 27.0 + rng.normal(0, 1.5)
    vsz = rng.uniform(0.8, 1.3)
    vents = np.zeros(shape, bool)
    for side in (-1, 1):
        vents |= (((yy + 0.05) / (0.28 * vsz)) ** 2 + ((xx - side * 0.1) / (0.07 * vsz)) ** 2
                  + (zz / 0.45) ** 2) < 1.0
    vol[vents & wm] = 6.0
    mask = np.zeros(shape, bool)
    if finding == "haemorrhage":
        inner = np.argwhere(wm & ~vents)
        c = inner[rng.integers(len(inner))]
        ry = rng.uniform(1.5, 4.5)
        g = ((np.indices(shape)[1] - c[1]) / ry) ** 2 + ((np.indices(shape)[2] - c[2]) / ry) ** 2 \
            + ((np.indices(shape)[0] - c[0]) / max(ry * 3.5 / 8.0, 0.6)) ** 2
        mask = (g < 1.0) & brain
        vol[mask] = rng.uniform(60, 80)
    elif finding == "subdural":
        theta = np.arctan2(yy, xx)
        t0, span = rng.uniform(-np.pi, np.pi), rng.uniform(0.6, 1.4)
        arc = np.abs(np.angle(np.exp(1j * (theta - t0)))) < span / 2
        thick = rng.uniform(0.03, 0.07)
        mask = brain & (r >= skull_in - thick) & arc & (np.abs(zz) < rng.uniform(0.4, 0.9))
        vol[mask] = rng.uniform(55, 75)
    elif finding == "infarction":
        theta = np.arctan2(yy, xx)
        t0, span = rng.uniform(-np.pi, np.pi), rng.uniform(0.5, 1.0)
        arc = np.abs(np.angle(np.exp(1j * (theta - t0)))) < span / 2
        mask = cortex & ~vents & arc & (r > 0.3) & (np.abs(zz) < rng.uniform(0.3, 0.7))
        vol[mask] -= rng.uniform(5, 12)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, shape), (0, 0.8, 0.8))
    vol = vol + noise / noise.std() * rng.uniform(3, 7)
    vol[r >= 1.0] = -1000.0
    return vol.astype(np.float32), mask


def make_alt_headct(n: int, *, shape: tuple[int, int, int] = (16, 64, 64), abnormal_fraction: float = 0.0,
                    seed: int = 0) -> PhantomSet:
    """``n`` head CT volumes ``(n, 1, D, H, W)`` in HU; case i depends only on (seed, i)."""
    return alt_set(n, shape, FINDINGS, abnormal_fraction, seed, lambda rng, f: _one(rng, shape, f),
                   spacing=SPACING, background=-1000.0, meta={"generator": "bench.althead"})
