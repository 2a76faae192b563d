"""Chest CT phantoms (Hounsfield units) with labelled lung lesions and ground-truth masks.

Procedural anatomy on an isotropic grid (default 4 mm, 64 x 72 x 96 voxels = 256 mm
cranio-caudal, 288 mm antero-posterior, 384 mm left-right), axes (slice: inferior to
superior, row: anterior at the top, column: patient's right on the image's left):

* body: an elliptic cylinder whose size varies per subject and slowly along z, with a
  subcutaneous fat layer (-120 to -80 HU) over muscle (35-55 HU);
* lungs: two super-ellipsoids with domed bases (the diaphragm, the right one higher),
  parenchyma -880 to -820 HU with a gravity-dependent gradient (posterior denser by
  40-90 HU) and correlated power-law texture;
* mediastinum: heart (an ellipsoid, 30-45 HU, anterior and left of centre), aorta and
  trachea; the trachea divides at the carina into the main bronchi;
* vessels and airways: branching trees grown from each hilum, segments thinning with each
  generation (vessels 35-45 HU, airway walls ~0 HU around an air lumen), rendered by
  distance to each segment with partial volume;
* spine (vertebral bodies, cortical rim, canal) and ribs (bone arcs following the body
  wall at a regular pitch).

Acquisition: a reconstruction-kernel blur and correlated Gaussian noise of 8-25 HU
(:func:`flows.phantoms.noise.ct_noise`), -1000 HU air outside the body.

Findings (``CHESTCT_FINDINGS``), each 0.5-20 cm³ drawn log-uniformly and confined to the
lung, ``masks`` = the lesion's voxels:

* ``nodule``: a solid, lobulated nodule, 20-60 HU (0.5-6 cm³);
* ``ggo``: a ground-glass opacity, a fuzzy region raised to -650 to -450 HU (1-20 cm³);
* ``consolidation``: dense airspace disease, -50 to 40 HU, in a dependent, peripheral part
  of a lung (2-20 cm³).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .anatomy import PhantomSet, case_plan, case_rng, check_case_args, check_seed, for_each_case
from .noise import ct_noise, power_law_noise

__all__ = ["CHESTCT_FINDINGS", "make_chestct"]

CHESTCT_FINDINGS: tuple[str, ...] = ("nodule", "ggo", "consolidation")
_TAG = 0xC3
_VOLUMES_CM3 = {"nodule": (0.5, 6.0), "ggo": (1.0, 20.0), "consolidation": (2.0, 20.0)}


def _grid(shape: tuple[int, int, int], sp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates in mm, centred: z (superior +), y (posterior +), x (left +)."""
    d, h, w = shape
    z = (np.arange(d) - (d - 1) / 2) * sp
    y = (np.arange(h) - (h - 1) / 2) * sp
    x = (np.arange(w) - (w - 1) / 2) * sp
    return z[:, None, None], y[None, :, None], x[None, None, :]


def _segment_distance(pts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((pts - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    return np.linalg.norm(pts - (a + t[:, None] * ab), axis=1)


def _draw_tubes(vol: np.ndarray, segments: list[tuple[np.ndarray, np.ndarray, float]],
                value: float, sp: float, origin: np.ndarray, lumen: float | None = None,
                where: np.ndarray | None = None) -> None:
    """Render tubes (a, b, radius in mm) into ``vol`` with partial volume at the edge."""
    shape = np.array(vol.shape)
    for a, b, r in segments:
        lo = np.maximum(np.floor((np.minimum(a, b) - r - sp - origin) / sp).astype(int), 0)
        hi = np.minimum(np.ceil((np.maximum(a, b) + r + sp - origin) / sp).astype(int) + 1, shape)
        if (hi <= lo).any():
            continue
        idx = np.stack(np.meshgrid(*[np.arange(lo[k], hi[k]) for k in range(3)], indexing="ij"), -1)
        pts = idx.reshape(-1, 3) * sp + origin
        dist = _segment_distance(pts, a, b).reshape(idx.shape[:3])
        cover = np.clip((r - dist) / sp + 0.5, 0.0, 1.0)
        sl = tuple(slice(lo[k], hi[k]) for k in range(3))
        if where is not None:
            cover = cover * where[sl]
        block = vol[sl]
        block += cover * (value - block)
        if lumen is not None and r > 1.5 * sp:
            inner = np.clip((r * 0.55 - dist) / sp + 0.5, 0.0, 1.0)
            if where is not None:
                inner = inner * where[sl]
            block += inner * (lumen - block)


def _tree(rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, radius: float,
          generations: int, length: float) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """A branching tree of segments, each generation thinner and shorter."""
    out: list[tuple[np.ndarray, np.ndarray, float]] = []
    stack = [(root, direction / np.linalg.norm(direction), radius, length, 0)]
    while stack:
        a, d, r, ln, g = stack.pop()
        b = a + d * ln
        out.append((a, b, r))
        if g + 1 >= generations:
            continue
        for _ in range(2):
            nd = d + rng.normal(0.0, 0.55, 3)
            stack.append((b, nd / np.linalg.norm(nd), r * rng.uniform(0.65, 0.8),
                          ln * rng.uniform(0.65, 0.85), g + 1))
    return out


def _ellipsoid(z: np.ndarray, y: np.ndarray, x: np.ndarray, c: np.ndarray,
               r: np.ndarray) -> np.ndarray:
    return ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2


def _anatomy(rng: np.random.Generator, shape: tuple[int, int, int], sp: float
             ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    z, y, x = _grid(shape, sp)
    d, h, w = shape
    ext = np.array([d, h, w]) * sp / 2  # half-extent in mm
    # body: elliptic cylinder, slowly varying with z
    ax = rng.uniform(0.80, 0.92) * ext[2] * (1 + 0.04 * z / ext[0])
    ay = rng.uniform(0.62, 0.75) * ext[1] * (1 + 0.03 * z / ext[0])
    yc = rng.uniform(-0.04, 0.04) * ext[1]
    ell = np.sqrt(((y - yc) / ay) ** 2 + (x / ax) ** 2)  # 1 at the skin
    ell = np.broadcast_to(ell, shape)
    fat = rng.uniform(10, 22)
    muscle = rng.uniform(8, 14)
    depth = (1 - ell) * min(float(np.min(ax)), float(np.min(ay)))  # ~mm below the skin
    vol = np.full(shape, -1000.0, dtype=np.float32)
    body = ell <= 1.0
    vol[body] = rng.uniform(-120, -80)
    vol[depth > fat] = rng.uniform(35, 55)
    inner = depth > fat + muscle
    vol[inner] = rng.uniform(20, 40)  # mediastinal / soft-tissue background
    # lungs
    lungs = np.zeros(shape, dtype=bool)
    lung_r = np.array([rng.uniform(0.72, 0.85) * ext[0], rng.uniform(0.70, 0.8) * float(np.mean(ay)),
                       rng.uniform(0.40, 0.45) * float(np.mean(ax))])
    hila = []
    for side in (-1, 1):  # -1: patient's right (image left)
        c = np.array([rng.uniform(-0.05, 0.05) * ext[0] + (6.0 if side < 0 else 0.0),
                      yc + rng.uniform(0.0, 0.08) * ext[1],
                      side * rng.uniform(0.46, 0.54) * float(np.mean(ax))])
        r = lung_r * rng.uniform(0.93, 1.07, 3)
        # boxy in plane, tapering to the apex, cut below by the diaphragm's dome
        taper = np.sqrt(np.clip(1 - np.clip((z - c[0] - 0.1 * r[0]) / (0.9 * r[0]), 0, None) ** 2, 0, 1))
        in_plane = np.abs((y - c[1]) / r[1]) ** 2.4 + np.abs((x - c[2]) / r[2]) ** 2.4
        across = np.sqrt(np.clip(1 - ((x - c[2]) / r[2]) ** 2 - ((y - c[1]) / r[1]) ** 2, 0.0, 1.0))
        dome = z < (c[0] - 0.9 * r[0]) + 0.4 * r[0] * across
        lungs |= (in_plane <= taper ** 2.4) & ~np.broadcast_to(dome, shape) & inner
        hila.append(np.array([c[0] + 0.1 * r[0], c[1] - 0.1 * r[1], c[2] - side * 0.55 * r[2]]))
    # heart carves the left lung's mediastinal side
    heart_c = np.array([-0.35 * ext[0], yc - 0.3 * float(np.mean(ay)), 0.12 * float(np.mean(ax))])
    heart_r = np.array([0.45 * ext[0], 0.42 * float(np.mean(ay)), 0.3 * float(np.mean(ax))])
    heart_r = heart_r * rng.uniform(0.9, 1.1)
    heart = _ellipsoid(z, y, x, heart_c, heart_r) <= 1.0
    lungs &= ~heart
    grad = rng.uniform(40, 90)
    base = rng.uniform(-880, -820)
    tex = power_law_noise(rng, shape, rng.uniform(2.4, 3.0)) * rng.uniform(10, 20)
    lung_hu = base + grad * (y / (float(np.mean(ay)))) + tex
    vol = np.where(lungs, lung_hu, vol).astype(np.float32)
    vol[heart & inner] = rng.uniform(30, 45)
    origin = np.array([float(z.min()), float(y.min()), float(x.min())])
    # aorta (descending, left-posterior of the spine's front) and trachea
    ao_x, ao_y = 0.1 * float(np.mean(ax)), yc + 0.25 * float(np.mean(ay))
    _draw_tubes(vol, [(np.array([-ext[0], ao_y, ao_x]), np.array([ext[0] * 0.6, ao_y, ao_x]),
                       rng.uniform(10, 14))], 40.0, sp, origin)
    carina = np.array([0.25 * ext[0], yc - 0.05 * float(np.mean(ay)), 0.0])
    trach_r = rng.uniform(7, 10)
    airways = [(np.array([ext[0] * 1.1, carina[1], 0.0]), carina, trach_r)]
    vessels: list[tuple[np.ndarray, np.ndarray, float]] = []
    for hl in hila:
        out = hl - carina
        airways.append((carina, hl, trach_r * 0.7))
        for k in range(3):
            dirn = np.array([rng.uniform(-1, 1), rng.uniform(-0.6, 0.6), np.sign(out[2]) * 1.0])
            vessels += _tree(rng, hl, dirn, rng.uniform(4.5, 6.5), 5, rng.uniform(28, 38))
            if k < 2:
                airways += _tree(rng, hl, dirn + rng.normal(0, 0.2, 3), rng.uniform(3.5, 4.5), 3,
                                 rng.uniform(25, 32))
    _draw_tubes(vol, vessels, rng.uniform(35, 45), sp, origin, where=lungs.astype(np.float32))
    _draw_tubes(vol, airways, 0.0, sp, origin, lumen=-1000.0,
                where=(lungs | ~inner | (np.abs(x) < 25)).astype(np.float32) * body)
    # spine: vertebral bodies and canal, posterior midline
    sp_y = yc + 0.62 * float(np.mean(ay))
    r_vb = rng.uniform(14, 18)
    dist_vb = np.sqrt((y - sp_y) ** 2 + x ** 2)
    dist_vb = np.broadcast_to(dist_vb, shape)
    bone = rng.uniform(180, 260)
    disc = (np.mod(z + rng.uniform(0, 28), 28.0) < 5.0)
    vb = (dist_vb <= r_vb) & body
    vol[vb] = np.where(np.broadcast_to(disc, shape)[vb], 80.0, bone)
    vol[vb & (dist_vb > r_vb - 2.5)] = rng.uniform(600, 800)
    canal = np.broadcast_to(np.sqrt((y - sp_y - r_vb - 9) ** 2 + x ** 2) <= 7.0, shape) & body
    vol[canal] = 10.0
    # ribs: bone arcs just inside the muscle layer, one every ~30 mm along z
    pitch = rng.uniform(26, 32)
    slope = np.broadcast_to(z - 0.3 * y, shape)  # ribs run down towards the front
    rib = (np.abs(depth - fat - muscle * 0.6) < 4.5) & (np.mod(slope + rng.uniform(0, pitch), pitch) < 9.0)
    rib &= np.broadcast_to(y > yc - 0.9 * float(np.mean(ay)), shape)
    vol[rib] = rng.uniform(350, 550)
    organs = {"lungs": lungs, "body": body}
    return vol, lungs, organs


def _lesion(rng: np.random.Generator, finding: str, lungs: np.ndarray, vol: np.ndarray,
            sp: float) -> np.ndarray:
    """Add one finding to ``vol`` in place; return its mask."""
    lo, hi = _VOLUMES_CM3[finding]
    target_cm3 = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    target_vox = max(1, round(target_cm3 * 1000.0 / sp ** 3))
    eroded = ndimage.binary_erosion(lungs, iterations=1)
    cand = np.argwhere(eroded if eroded.any() else lungs)
    if finding == "consolidation":  # dependent (posterior) and peripheral
        score = cand[:, 1] + 0.3 * np.abs(cand[:, 2] - lungs.shape[2] / 2)
        cand = cand[score >= np.quantile(score, 0.7)]
    centre = cand[rng.integers(len(cand))].astype(float)
    radius_vox = (3 * target_vox / (4 * np.pi)) ** (1 / 3)
    axes = radius_vox * rng.uniform(0.75, 1.3, 3)
    d, h, w = vol.shape
    zz, yy, xx = np.ogrid[:d, :h, :w]
    r2 = (((zz - centre[0]) / axes[0]) ** 2 + ((yy - centre[1]) / axes[1]) ** 2
          + ((xx - centre[2]) / axes[2]) ** 2)
    bump = power_law_noise(rng, vol.shape, 2.0) * 0.25
    field = np.sqrt(r2) + bump
    # threshold chosen so the lesion inside the lung has the drawn volume
    inside = field[lungs]
    k = min(target_vox, inside.size) - 1
    thr = float(np.partition(inside, k)[k])
    mask = lungs & (field <= thr)
    if finding == "nodule":
        value = rng.uniform(20, 60)
        vol[mask] = value + (vol[mask] - vol[mask].mean()) * 0.2
    elif finding == "ggo":
        level = rng.uniform(-650, -450)
        soft = np.clip((thr - field) / 0.35 + 0.3, 0.0, 1.0) * lungs
        vol += (soft * (level - vol)).astype(np.float32) * (soft > 0)
        mask = lungs & (soft >= 0.3)
    else:
        value = rng.uniform(-50, 40)
        soft = np.clip((thr - field) / 0.15 + 0.5, 0.0, 1.0) * lungs
        vol += (soft * (value - vol)).astype(np.float32)
        mask = lungs & (soft >= 0.5)
    return mask


def make_chestct(
    n: int,
    *,
    shape: tuple[int, int, int] = (64, 72, 96),
    spacing_mm: float = 4.0,
    abnormal_fraction: float = 0.0,
    findings: Sequence[str] = CHESTCT_FINDINGS,
    seed: int = 0,
) -> PhantomSet:
    """``n`` chest CT volumes ``(1, D, H, W)`` in HU on an isotropic grid of ``spacing_mm``.

    ``abnormal_fraction`` of the cases carry one lesion each, spread evenly over
    ``findings``; ``meta["lungs"]`` holds each case's lung mask and ``meta["lesion_cm3"]``
    its lesion volume (0 for normals). Case ``i`` depends only on ``(seed, i)``.
    """
    fs = check_case_args("make_chestct", n, abnormal_fraction, findings, CHESTCT_FINDINGS)
    seed = check_seed(seed, "make_chestct")
    if len(shape) != 3 or any(int(s) < 16 for s in shape):
        raise ValueError(f"make_chestct: shape must be three sizes >= 16, got {shape}")
    if not 1.0 <= float(spacing_mm) <= 8.0:
        raise ValueError(f"make_chestct: spacing_mm must be in [1, 8], got {spacing_mm}")
    dims = (int(shape[0]), int(shape[1]), int(shape[2]))
    fov = [d * float(spacing_mm) for d in dims]
    if min(fov) < 120.0:
        raise ValueError(f"make_chestct: field of view {fov} mm is too small for a chest; "
                         "every axis needs >= 120 mm (raise shape or spacing_mm)")
    n = int(n)
    labels, names, _ = case_plan(n, seed, _TAG, float(abnormal_fraction), fs or ("-",))
    images = np.empty((n, 1, *dims), dtype=np.float32)
    masks = np.zeros((n, 1, *dims), dtype=bool)
    lungs = np.zeros((n, *dims), dtype=bool)
    lesion_cm3 = np.zeros(n, dtype=np.float64)
    unit = float(spacing_mm) ** 3 / 1000.0

    def one(i: int) -> None:
        vol, lung, organs = _anatomy(case_rng(seed, _TAG, i, 0), dims, float(spacing_mm))
        if names[i] != "normal":
            m = _lesion(case_rng(seed, _TAG, i, 1), names[i], lung, vol, float(spacing_mm))
            masks[i, 0] = m
            lesion_cm3[i] = m.sum() * unit
        nrng = case_rng(seed, _TAG, i, 2)
        kernel = nrng.uniform(0.5, 1.0)
        vol = ndimage.gaussian_filter(vol, (0.0, kernel * 0.6, kernel * 0.6))
        vol = vol + ct_noise(nrng, dims, nrng.uniform(8, 25), kernel)
        vol[~organs["body"]] = -1000.0  # air outside the body carries no noise
        images[i, 0] = np.clip(vol, -1024, 3000)
        lungs[i] = lung

    for_each_case(n, one)
    zero_fraction = (images <= -1000.0).mean(axis=(1, 2, 3, 4)).astype(np.float32)
    sp = float(spacing_mm)
    return PhantomSet(
        images=images, labels=labels, findings=names, masks=masks, zero_fraction=zero_fraction,
        spacing=(sp, sp, sp),
        meta={"kind": "chestct", "seed": int(seed), "shape": list(dims),
              "abnormal_fraction": float(abnormal_fraction), "findings": list(fs),
              "anatomy": "procedural", "lungs": lungs, "lesion_cm3": lesion_cm3,
              "child": np.zeros(n, dtype=bool), "index": np.arange(n, dtype=np.int64)},
    )

