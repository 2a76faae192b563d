"""Frontal (PA) chest-radiograph phantoms with labelled abnormalities.

Each case is a physical projection model: the line integral of attenuation ``A`` through a
patient built from a real lung segmentation (torchxrayvision's v7labs lung masks; see
:mod:`flows.phantoms.anatomy`) placed with random scale, rotation, translation and
inspiration depth, and a body drawn around it: soft-tissue envelope (neck, shoulders,
arms, chest wall, abdomen, optional breasts), mediastinum and heart (cardiothoracic ratio
0.40-0.50 when normal), aortic knob, trachea, spine, posterior and anterior ribs,
clavicles, humeral heads, gastric bubble, lung vessels and parenchymal texture. ``A`` is
in units of water attenuation times path length (mu_water = 0.02 / mm). The detected
signal then goes through the noise model of :mod:`flows.phantoms.noise` and a random
display processing (log, window, gamma, unsharp masking), so exposure, contrast and
sharpness vary from case to case as in a real archive.

The field of view is 400 mm wide (``spacing = (400/size, 400/size)`` mm). About
``child_fraction`` of the cases (in both classes) are small children: the body fills only
part of the field and everything outside the collimation is exactly 0, the confound
described by Shibata et al.

Findings (``CXR_FINDINGS``), each with ``masks`` = its extent:

* ``opacity``: airspace consolidation (pneumonia-like), soft-edged and patchy, at the
  position and size of a real RSNA pneumonia box (Target = 1), inside the lung;
* ``nodule``: one round, well-defined dense nodule, 10-25 mm (at least 3 pixels across);
* ``effusion``: pleural fluid at one or both lung bases, meniscus-shaped upper border,
  blunted costophrenic angle;
* ``cardiomegaly``: enlarged cardiac silhouette, cardiothoracic ratio 0.56-0.70.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .anatomy import (
    TXV_INSTALL,
    LungShape,
    PhantomSet,
    case_plan,
    case_rng,
    check_case_args,
    check_seed,
    for_each_case,
    lung_shape,
    lung_source,
    n_lung_shapes,
    rsna_boxes,
    rsna_lung_field,
)
from .noise import (
    gain_field,
    gaussian_psf,
    lowpass,
    poisson_gaussian,
    power_law_noise,
    ridge_texture,
)

__all__ = ["CXR_FINDINGS", "FIELD_MM", "make_cxr"]

CXR_FINDINGS: tuple[str, ...] = ("opacity", "nodule", "effusion", "cardiomegaly")
FIELD_MM = 400.0
MU = 0.02  # water, per mm
MU_BONE = 0.028  # bone in excess of the soft tissue it replaces, per mm
_TAG = 0xC8
_MIN_SIZE, _MAX_SIZE = 16, 2048


def _smooth(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _band(dist: np.ndarray, half: float, edge: float) -> np.ndarray:
    """1 inside |dist| < half, soft edge of width ``edge`` (mm)."""
    return _smooth((half - np.abs(dist)) / max(edge, 1e-3) + 0.5)


# --------------------------------------------------------------------------- validation


def _validate(
    n: int, size: int, abnormal_fraction: float, findings: Sequence[str], child_fraction: float
) -> tuple[str, ...]:
    fs = check_case_args("make_cxr", n, abnormal_fraction, findings, CXR_FINDINGS)
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise ValueError(f"make_cxr: size must be an integer, got {size!r}")
    if not _MIN_SIZE <= size <= _MAX_SIZE:
        raise ValueError(f"make_cxr: size must be in [{_MIN_SIZE}, {_MAX_SIZE}], got {size}")
    if not 0.0 <= float(child_fraction) <= 1.0:
        raise ValueError(f"make_cxr: child_fraction must be in [0, 1], got {child_fraction!r}")
    return fs


# --------------------------------------------------------------------------- one case


class _Case:
    """Geometry of one patient in the *patient frame* (mm, origin at the field centre for
    an adult, x to the image's right, y down)."""

    def __init__(self, rng: np.random.Generator, child: bool, procedural: bool) -> None:
        self.child = child
        self.scale = float(rng.uniform(0.48, 0.66)) if child else float(rng.uniform(0.94, 1.04))
        self.rot = math.radians(float(np.clip(rng.normal(0.0, 2.0), -6, 6)))
        shift = 14.0 if child else 7.0
        self.shift = (float(rng.normal(0, shift)), float(rng.normal(0, shift)))
        idx = int(rng.integers(n_lung_shapes() if not procedural else 64))
        self.lung: LungShape = lung_shape(idx, procedural=procedural)
        self.W_l = float(rng.uniform(255.0, 300.0))
        aspect = float(np.clip(self.lung.aspect, 0.68, 1.08))
        self.inspiration = float(rng.uniform(0.9, 1.08))
        self.H_l = self.W_l * aspect * self.inspiration
        self.Y_top = float(rng.uniform(-165.0, -140.0))
        self.ctr = float(rng.uniform(0.40, 0.50))
        self.heart_rot = math.radians(float(rng.uniform(18.0, 32.0)))
        self.heart_ab = float(rng.uniform(1.45, 1.75))
        self.heart_x = float(rng.uniform(0.10, 0.20))
        self.heart_bottom = float(rng.uniform(0.84, 0.92))
        self.heart_depth = float(rng.uniform(110.0, 150.0))
        self.soft = float(rng.uniform(16.0, 50.0))  # chest wall soft tissue + ribs (mm)
        self.shoulder = float(rng.uniform(15.0, 35.0))
        self.neck = float(rng.uniform(52.0, 68.0))
        self.T_ap = float(rng.uniform(190.0, 260.0))
        self.lung_depth = float(rng.uniform(0.55, 0.7))
        self.arms = bool(rng.random() < 0.7)
        self.arm_gap = float(rng.uniform(0.0, 25.0))
        self.arm_w = float(rng.uniform(70.0, 95.0))
        self.knob = (float(rng.uniform(18.0, 32.0)), float(rng.uniform(10.0, 15.0)))
        self.trachea_x = float(rng.uniform(-7.0, 0.0))
        self.spine_period = float(rng.uniform(25.0, 31.0))
        self.spine_phase = float(rng.uniform(0.0, 1.0))
        self.rib_period = self.H_l / float(rng.uniform(8.0, 9.2))
        self.rib_phase = float(rng.uniform(-0.12, -0.02))
        self.rib_curve = (float(rng.uniform(0.08, 0.16)), float(rng.uniform(0.2, 0.32)))
        self.clav = [
            (
                float(rng.uniform(14.0, 24.0)),
                float(rng.uniform(2.0, 20.0)),
                float(rng.uniform(-25.0, -5.0)),
                float(rng.uniform(-6.0, 6.0)),
            )
            for _ in range(2)
        ]
        self.bubble = (
            bool(rng.random() < 0.6),
            float(rng.uniform(35.0, 80.0)),
            float(rng.uniform(8.0, 28.0)),
            float(rng.uniform(15.0, 30.0)),
            float(rng.uniform(9.0, 18.0)),
            float(rng.uniform(20.0, 50.0)),
        )
        self.breasts = (not child) and bool(rng.random() < 0.4)
        self.breast = (
            float(rng.uniform(0.45, 0.62)),
            float(rng.uniform(0.6, 0.8)),
            float(rng.uniform(50.0, 80.0)),
            float(rng.uniform(15.0, 35.0)),
        )
        self.texture_beta = float(rng.uniform(2.6, 3.2))
        self.texture_amp = float(rng.uniform(2.0, 5.0))
        self.vessel_amp = float(rng.uniform(14.0, 22.0))
        self.vessel_width = float(rng.uniform(0.25, 0.4))
        self.texture_seed = int(rng.integers(2**31))

    # patient frame <-> field (mm, origin at the top-left corner of the field)
    def to_patient(self, fx: np.ndarray, fy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.rot), math.sin(self.rot)
        dx = fx - FIELD_MM / 2 - self.shift[0]
        dy = fy - FIELD_MM / 2 - self.shift[1]
        X = (c * dx + s * dy) / self.scale
        Y = (-s * dx + c * dy) / self.scale
        return X, Y

    def to_field(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.rot), math.sin(self.rot)
        fx = self.scale * (c * X - s * Y) + FIELD_MM / 2 + self.shift[0]
        fy = self.scale * (s * X + c * Y) + FIELD_MM / 2 + self.shift[1]
        return fx, fy


def _sample_lungs(case: _Case, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """right, left, depth (3, H, W) from the canonical lung frame."""
    C = case.lung.right.shape[0]
    u = (X + case.W_l / 2) / case.W_l
    v = (Y - case.Y_top) / case.H_l
    coords = np.stack([v * C - 0.5, u * C - 0.5])
    out = np.empty((3, *X.shape), np.float32)
    for k, arr in enumerate((case.lung.right, case.lung.left, case.lung.depth)):
        out[k] = ndimage.map_coordinates(arr.astype(np.float32), coords, order=1, mode="constant", cval=0.0)
    return np.clip(out / 255.0, 0.0, 1.0)


def _heart(case: _Case, X: np.ndarray, Y: np.ndarray, ctr: float) -> tuple[np.ndarray, ...]:
    """Cardiac silhouette (soft 0..1) and AP depth (mm) for a cardiothoracic ratio ``ctr``.

    A tilted ellipse (apex down and to the patient's left). An enlarged heart grows mostly
    along its long axis, to the left and upwards, keeping its base on the diaphragm.
    """
    TW = case.W_l * 1.03
    phi = case.heart_rot
    ab0 = case.heart_ab
    cos2, sin2 = math.cos(phi) ** 2, math.sin(phi) ** 2
    # normal heart: semi-axes (a0, b0) giving the case's own normal ratio
    b0 = (case.ctr * TW / 2) / math.sqrt(ab0**2 * cos2 + sin2)
    a0 = ab0 * b0
    # enlarged: a = a0 * f, b = b0 * (1 + 0.5 (f - 1)), f solved for the target width
    f = 1.0
    for _ in range(30):
        a, b = a0 * f, b0 * (1.0 + 0.5 * (f - 1.0))
        width = 2.0 * math.sqrt(a * a * cos2 + b * b * sin2)
        f *= (ctr * TW) / width
    a, b = a0 * f, b0 * (1.0 + 0.5 * (f - 1.0))
    half_w = math.sqrt(a * a * cos2 + b * b * sin2)
    vert = math.sqrt(a * a * sin2 + b * b * cos2)
    half_w0 = math.sqrt(a0 * a0 * cos2 + b0 * b0 * sin2)
    vert0 = math.sqrt(a0 * a0 * sin2 + b0 * b0 * cos2)
    # right border (image left) moves out by only a third of the growth
    right0 = case.ctr * TW * case.heart_x - half_w0
    right = right0 - (half_w - half_w0) * 0.6
    cx = right + half_w
    bottom = case.Y_top + case.H_l * case.heart_bottom - 0.8 * vert0 + vert0
    cy = bottom - vert - 0.1 * (vert - vert0)
    dx, dy = X - cx, Y - cy
    c, s = math.cos(phi), math.sin(phi)
    p = (c * dx + s * dy) / a
    q = (-s * dx + c * dy) / b
    r = np.sqrt(p * p + q * q)
    inside = _smooth((1.0 - r) * b / 3.0 + 0.5)
    depth = case.heart_depth * (b / b0) ** 0.5 * np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
    return inside, depth


def _body(case: _Case, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft-tissue path length (mm), bone path length (mm) and the body mask."""
    Yt, H = case.Y_top, case.H_l
    B = case.W_l / 2 + case.soft
    sh = case.shoulder
    # half-width of the trunk: neck, sloping shoulders, chest wall, waist
    t_sh = _smooth((Y - (Yt - 75.0)) / 70.0) ** 0.6
    hw = case.neck + (B + sh - case.neck) * t_sh
    hw = hw - sh * _smooth((Y - (Yt + 0.1 * H)) / (0.6 * H))
    hw = hw - 10.0 * _smooth((Y - (Yt + H)) / 80.0)
    ky = np.array([Yt - 400, Yt - 70, Yt - 10, Yt + 0.3 * H, Yt + H, 900])
    kt = np.array([0.5, 0.5, 0.85, 1.0, 1.05, 1.05]) * case.T_ap
    tap = np.interp(Y, ky, kt)
    rel = np.clip(1.0 - (X / hw) ** 2, 0.0, 1.0)
    soft = tap * np.sqrt(rel) * _smooth((hw - np.abs(X)) / 3.0 + 0.5)
    body = (np.abs(X) < hw).astype(np.float32)
    bone = np.zeros_like(X)
    xa = B + case.arm_gap + case.arm_w / 2
    top = _smooth((Y - (Yt - 10.0)) / 25.0)
    for sgn in (-1.0, 1.0):
        if case.arms:
            d = (sgn * X - xa) / (case.arm_w / 2)
            arm = np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0)) * top
            soft = soft + 0.85 * case.arm_w * arm
            body = np.maximum(body, (np.abs(d) < 1.0) * (top > 0.5))
            bone += 12.0 * _band(sgn * X - xa, 12.0, 2.0) * _smooth((Y - (Yt + 25.0)) / 10.0)
        # humeral head and scapular neck at the shoulder
        hx = sgn * (B + sh * 0.4)
        r = np.sqrt((X - hx) ** 2 + (Y - (Yt + 5.0)) ** 2) / 24.0
        bone += 14.0 * np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
    return soft.astype(np.float32), bone.astype(np.float32), body


def _rib_profile(frac: np.ndarray, width: float, power: float) -> np.ndarray:
    t = np.clip(frac / width, 0.0, 1.0)
    inside = frac < width
    body = np.abs(np.sin(np.pi * t)) ** power
    cortex = np.cos(np.pi * t) ** 8
    return np.where(inside, body + 0.4 * cortex, 0.0)


def _skeleton(case: _Case, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Bone path length (mm, bone in excess of soft tissue): spine, ribs, clavicles."""
    Yt, H = case.Y_top, case.H_l
    bone = np.zeros_like(X)
    # spine: vertebral bodies with disc spaces, pedicles (seen through the mediastinum)
    sw = 21.0
    col = np.sqrt(np.clip(1.0 - (X / sw) ** 2, 0.0, 1.0))
    t = ((Y - Yt) / case.spine_period + case.spine_phase) % 1.0
    disc = 1.0 - 0.6 * _band(t - 0.5, 0.07, 0.04)
    bone += 8.0 * col * disc
    for sgn in (-1.0, 1.0):
        ped = np.sqrt(((X - sgn * 13.0) / 5.0) ** 2 + ((t - 0.3) * case.spine_period / 7.0) ** 2)
        bone += 3.0 * _smooth((1.0 - ped) * 3.0)
    # posterior ribs: arcs convex upwards, bending down at the lateral chest wall
    R = case.W_l / 2 * 1.05
    d = np.abs(X) / R
    c1, c2 = case.rib_curve
    y_first = Yt + case.rib_phase * H
    shape_post = R * (-0.2 * d + c1 * 3.0 * d**2 + c2 * d**6)
    ph = (Y - shape_post - y_first) / case.rib_period
    win = _smooth((d - 0.1) / 0.06) * _smooth((1.03 - d) / 0.04)
    win = win * _smooth((ph + 0.3) / 0.3) * _smooth((10.3 - ph) / 0.6)
    bone += 8.0 * _rib_profile(ph % 1.0, 0.42, 0.5) * win
    # anterior ribs: from the lateral end of each posterior rib, sloping down medially,
    # fading where the costal cartilage (invisible) begins
    lat = R * (-0.2 + c1 * 3.0 + c2)
    shape_ant = lat + 0.55 * R * (1.0 - d)
    pha = (Y - shape_ant - y_first) / case.rib_period
    wina = _smooth((d - 0.3) / 0.2) * _smooth((1.02 - d) / 0.04)
    wina = wina * _smooth((pha + 0.2) / 0.3) * _smooth((6.5 - pha) / 0.6)
    bone += 5.0 * _rib_profile(pha % 1.0, 0.55, 1.0) * wina
    # clavicles
    B = case.W_l / 2 + case.soft + case.shoulder
    for k, sgn in enumerate((-1.0, 1.0)):
        med_x, med_y, lat_y, bend = case.clav[k]
        x0, x1 = med_x, B - 10.0
        y0, y1 = Yt + med_y, Yt + lat_y
        tt = (sgn * X - x0) / (x1 - x0)
        yc = y0 + (y1 - y0) * tt + bend * np.sin(2 * np.pi * np.clip(tt, 0, 1))
        on = _smooth(tt * 12.0) * _smooth((1.0 - tt) * 12.0)
        bone += 14.0 * _rib_profile((Y - yc + 8.0) / 16.0, 1.0, 0.5) * on * (np.abs(Y - yc) < 8)
    return bone.astype(np.float32)


def _nearest_inside(
    mask: np.ndarray, X: np.ndarray, Y: np.ndarray, x: float, y: float
) -> tuple[float, float]:
    rr, cc = np.nonzero(mask)
    if len(rr) == 0:
        return x, y
    d2 = (X[rr, cc] - x) ** 2 + (Y[rr, cc] - y) ** 2
    j = int(np.argmin(d2))
    return float(X[rr[j], cc[j]]), float(Y[rr[j], cc[j]])


def _vessel_tree(rng: np.random.Generator, dx: np.ndarray, dy: np.ndarray, width: float) -> np.ndarray:
    """Vessel-like lines radiating from a hilum at (0, 0): ridges of a noise field that is
    smooth along the radius and rough around it, thinning and fading outwards."""
    n_rho, n_theta = 48, 192
    base = rng.standard_normal((n_rho, n_theta)).astype(np.float32)
    field = ndimage.gaussian_filter(base, (3.0, 1.6), mode=("nearest", "wrap"))
    field /= max(float(field.std()), 1e-6)
    r = np.sqrt(dx * dx + dy * dy)
    rho = np.log1p(r / 15.0) / math.log1p(250.0 / 15.0) * (n_rho - 1)
    theta = (np.arctan2(dy, dx) / (2 * math.pi) % 1.0) * n_theta
    val = ndimage.map_coordinates(field, np.stack([rho, theta]), order=1, mode="grid-wrap")
    ridge = ridge_texture(val, width * 30.0 / (r + 30.0) + 0.02)
    return (ridge * np.exp(-r / 140.0)).astype(np.float32)


def _render(
    seed: int, index: int, size: int, finding: str, child: bool, procedural: bool
) -> tuple[np.ndarray, np.ndarray]:
    rng_a = case_rng(seed, _TAG, index, 0)
    rng_f = case_rng(seed, _TAG, index, 1)
    rng_n = case_rng(seed, _TAG, index, 2)
    case = _Case(rng_a, child, procedural)
    px = FIELD_MM / size
    g = (np.arange(size, dtype=np.float32) + 0.5) * px
    fy, fx = np.meshgrid(g, g, indexing="ij")
    X, Y = case.to_patient(fx, fy)
    X = X.astype(np.float32)
    Y = Y.astype(np.float32)
    px_pat = px / case.scale  # patient mm per pixel

    right, left, depth = _sample_lungs(case, X, Y)
    lung = np.clip(right + left, 0.0, 1.0)
    v = (Y - case.Y_top) / case.H_l
    D_max = case.lung_depth * case.T_ap
    D_lung = D_max * depth * lung * (0.8 + 0.3 * np.clip(v, 0, 1))

    ctr = case.ctr
    if finding == "cardiomegaly":
        ctr = float(rng_f.uniform(0.56, 0.70))
    heart_in, heart_depth = _heart(case, X, Y, ctr)
    # aortic knob: a bulge of the mediastinal contour into the left lung (image right)
    ky = case.Y_top + 0.24 * case.H_l
    near = (left > 0.5) & (np.abs(Y - ky) < max(3.0, px_pat))
    kx0 = float(X[near].min()) if near.any() else 20.0
    kx = kx0 - case.knob[1] * 0.25
    kr = case.knob[1]
    kn = np.sqrt((X - kx) ** 2 + (Y - ky) ** 2) / kr
    knob = _smooth((1.0 - kn) * kr / 2.5 + 0.5)
    # the heart displaces lung over its own AP depth (tangential border, denser centre)
    D_lung = np.clip(D_lung - heart_depth * heart_in, 0.0, None) * (1.0 - 0.85 * knob)

    soft, bone, body = _body(case, X, Y)
    bone = bone + _skeleton(case, X, Y)
    A = MU * soft + MU_BONE * bone
    A -= MU * 0.78 * D_lung
    A += MU * 0.03 * heart_depth * lung
    # trachea and main bronchi (air)
    carina = case.Y_top + 0.3 * case.H_l
    tx = case.trachea_x
    trachea = _band(X - tx, 8.0, 3.0) * _smooth((carina - Y) / 6.0)
    for sgn, ang in ((-1.0, 0.6), (1.0, 0.8)):
        along = (Y - carina) * math.cos(ang) + sgn * (X - tx) * math.sin(ang)
        across = -(Y - carina) * math.sin(ang) + sgn * (X - tx) * math.cos(ang)
        trachea = np.maximum(
            trachea,
            0.8 * _band(across, 6.0, 3.0) * _smooth(along / 4.0) * _smooth((40.0 - along) / 8.0),
        )
    A -= MU * 0.9 * 18.0 * trachea
    # gastric bubble under the left hemidiaphragm
    has_bubble, bx, by, brx, bry, bpath = case.bubble
    if has_bubble:
        lys = Y[left > 0.5]
        yb = float(lys.max()) if lys.size else case.Y_top + case.H_l
        rb = np.sqrt(((X - bx) / brx) ** 2 + ((Y - yb - by) / bry) ** 2)
        A -= MU * 0.9 * bpath * np.sqrt(np.clip(1.0 - rb * rb, 0.0, 1.0)) * (1.0 - lung)
    if case.breasts:
        bxr, byr, brad, bth = case.breast
        R = case.W_l / 2
        for sgn in (-1.0, 1.0):
            cx, cy = sgn * R * bxr, case.Y_top + case.H_l * byr
            r = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2) / brad
            prof = np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0)) * _smooth((Y - cy + 0.4 * brad) / brad)
            A += MU * bth * prof * _smooth((1.0 - r) * brad / 3.0)

    # lung texture: parenchyma (power-law noise) and vessels radiating from the hila,
    # tapering and fading towards the periphery
    trng = np.random.default_rng(case.texture_seed)
    tex = power_law_noise(trng, (size, size), case.texture_beta)
    vessels = np.zeros_like(X)
    for sgn in (-1.0, 1.0):
        hx, hy = sgn * case.W_l * 0.13, case.Y_top + 0.45 * case.H_l
        vessels = np.maximum(vessels, _vessel_tree(trng, X - hx, Y - hy, case.vessel_width))
    lungw = lung * (1.0 - heart_in)
    A += MU * (case.texture_amp * tex + case.vessel_amp * vessels) * lungw
    # hilar vessels
    hilum = np.exp(-(((np.abs(X) - case.W_l * 0.14) / 16.0) ** 2)) * np.exp(
        -(((Y - case.Y_top - 0.45 * case.H_l) / 32.0) ** 2)
    )
    A += MU * 18.0 * hilum * np.clip(lung * 2.0, 0.0, 1.0)

    # ---------------------------------------------------------------- the finding
    mask = np.zeros((size, size), dtype=bool)
    if finding == "opacity":
        dA, mask = _opacity(rng_f, case, X, Y, lung, depth, heart_in, D_lung, px_pat)
        A += dA
    elif finding == "nodule":
        dA, mask = _nodule(rng_f, X, Y, lung, depth, heart_in, px_pat)
        A += dA
    elif finding == "effusion":
        dA, mask = _effusion(rng_f, case, X, Y, right, left, D_lung)
        A += dA
    elif finding == "cardiomegaly":
        mask = (heart_in > 0.5) & (body > 0)

    # ---------------------------------------------------------------- acquisition
    # all acquisition/processing parameters first (the noise draws come from their own
    # stream, so a case's exposure and processing do not depend on its finding)
    spr = float(rng_n.uniform(0.1, 0.4))
    dose = 10.0 ** float(rng_n.uniform(3.3, 4.3))
    gain_amp = float(rng_n.uniform(0.0, 0.04))
    e_sigma = float(rng_n.uniform(1.0, 4.0))
    psf = float(rng_n.uniform(0.3, 0.9))
    coll = rng_n.uniform(0.0, 1.0, size=7)
    p_lo, d_lo = float(rng_n.uniform(0.5, 3.0)), float(rng_n.uniform(0.2, 0.7))
    p_hi, d_hi = float(rng_n.uniform(98.0, 99.8)), float(rng_n.uniform(-0.1, 0.35))
    gamma = float(rng_n.uniform(0.8, 1.4))
    k_usm = float(rng_n.uniform(0.2, 1.0))
    floor = float(rng_n.uniform(0.01, 0.05))
    rng_q = case_rng(seed, _TAG, index, 3)

    A = ndimage.gaussian_filter(A, 0.5 * max(1.0, 2.0 / px), mode="nearest")
    prim = np.exp(-A)
    scatter = spr * lowpass(prim, 40.0 / px)
    bin_factor = (512.0 / size) ** 2
    N0 = dose * bin_factor
    gain = gain_field(rng_q, (size, size), gain_amp)
    expected = N0 * gain * (prim + scatter)
    counts = poisson_gaussian(rng_q, expected, e_sigma * math.sqrt(bin_factor))
    counts = gaussian_psf(counts, psf)
    A_meas = -np.log(np.maximum(counts, 0.5) / (N0 * (1.0 + spr)))

    # collimation: children tightly around the body, exactly 0 outside; adults at most
    # a thin border
    field = np.ones((size, size), dtype=bool)
    if child:
        B = case.W_l / 2 + case.soft + case.shoulder + 30.0
        corners_x = np.array([-B, B, -B, B], dtype=np.float32)
        top = case.Y_top - (40.0 + 40.0 * coll[0])
        bottom = case.Y_top + case.H_l + (40.0 + 60.0 * coll[1])
        corners_y = np.array([top, top, bottom, bottom], dtype=np.float32)
        cfx, cfy = case.to_field(corners_x, corners_y)
        m = 12.0 * coll[2:6]
        x0, x1 = cfx.min() - m[0], cfx.max() + m[1]
        y0, y1 = cfy.min() - m[2], cfy.max() + m[3]
        field = (fx >= x0) & (fx <= x1) & (fy >= y0) & (fy <= y1)
    elif coll[6] < 0.5:
        m = 0.04 * FIELD_MM * coll[2:6]
        field = (fx >= m[0]) & (fx <= FIELD_MM - m[1]) & (fy >= m[2]) & (fy <= FIELD_MM - m[3])

    # display processing: window on the anatomy (air and thin tissue saturate dark),
    # gamma, unsharp mask (equalisation), a small black-level offset
    inb = (body > 0.5) & field
    vals = A_meas[inb] if inb.sum() > 16 else A_meas[field]
    lo = float(np.percentile(vals, p_lo)) - d_lo
    hi = float(np.percentile(vals, p_hi)) + d_hi
    d = np.clip((A_meas - lo) / max(hi - lo, 0.5), 0.0, 1.0)
    d = d**gamma
    d = d + k_usm * (d - lowpass(d, 25.0 / px))
    d = floor + (1.0 - floor) * np.clip(d, 0.0, 1.0)
    d = np.clip(d, 1.0 / 255.0, 1.0)
    img = np.where(field, d, 0.0).astype(np.float32)
    mask &= field
    return img, mask


def _opacity(
    rng: np.random.Generator,
    case: _Case,
    X: np.ndarray,
    Y: np.ndarray,
    lung: np.ndarray,
    depth: np.ndarray,
    heart_in: np.ndarray,
    D_lung: np.ndarray,
    px_pat: float,
) -> tuple[np.ndarray, np.ndarray]:
    boxes = rsna_boxes()
    fx0, fy0, fx1, fy1 = rsna_lung_field()
    if boxes is not None:
        bx, by, bw, bh = (float(v) for v in boxes[int(rng.integers(len(boxes)))])
    else:  # typical RSNA box statistics
        bw, bh = float(rng.uniform(0.12, 0.3)), float(rng.uniform(0.12, 0.45))
        bx = float(rng.choice([rng.uniform(0.15, 0.45 - bw / 2), rng.uniform(0.55, 0.85 - bw / 2)]))
        by = float(rng.uniform(0.2, 0.85 - bh))
    uc = (bx + bw / 2 - fx0) / (fx1 - fx0)
    vc = (by + bh / 2 - fy0) / (fy1 - fy0)
    cx = -case.W_l / 2 + uc * case.W_l
    cy = case.Y_top + vc * case.H_l
    sx = max(bw / (fx1 - fx0) * case.W_l * float(rng.uniform(0.35, 0.5)), 16.0, 2.0 * px_pat)
    sy = max(bh / (fy1 - fy0) * case.H_l * float(rng.uniform(0.35, 0.5)), 16.0, 2.0 * px_pat)
    sx, sy = min(sx, 0.3 * case.W_l), min(sy, 0.35 * case.H_l)
    deep = (lung > 0.5) & (heart_in < 0.2) & (depth > 0.3)
    if not deep.any():
        deep = lung > 0.5
    cx, cy = _nearest_inside(deep, X, Y, cx, cy)
    size = X.shape[0]
    n1 = power_law_noise(rng, (size, size), 3.0)
    n2 = power_law_noise(rng, (size, size), 3.0)
    ang = float(rng.uniform(-0.5, 0.5))
    c, s = math.cos(ang), math.sin(ang)
    p = (c * (X - cx) + s * (Y - cy)) / sx
    q = (-s * (X - cx) + c * (Y - cy)) / sy
    r = np.sqrt(p * p + q * q) * (1.0 + 0.28 * np.clip(n1, -1.5, 1.5))
    density = _smooth((1.15 - r) / 0.5) * np.clip(0.72 + 0.28 * n2, 0.3, 1.0)
    strength = float(rng.uniform(0.5, 0.95))
    opac = density * lung * strength
    dA = MU * 0.78 * D_lung * opac  # consolidation replaces the air that is there
    envelope = _smooth((1.15 - r) / 0.5)
    mask = (envelope > 0.5) & (lung > 0.5) & (heart_in < 0.5)
    if not mask.any():
        mask = (envelope > 0.3) & (lung > 0.2)
    lab, nlab = ndimage.label(mask)
    if nlab > 1:  # the extent is the consolidation's main connected region
        sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, nlab + 1))
        mask = lab == (int(np.argmax(sizes)) + 1)
    return dA.astype(np.float32), mask


def _nodule(
    rng: np.random.Generator,
    X: np.ndarray,
    Y: np.ndarray,
    lung: np.ndarray,
    depth: np.ndarray,
    heart_in: np.ndarray,
    px_pat: float,
) -> tuple[np.ndarray, np.ndarray]:
    # 10-25 mm; on coarse grids at least 3 pixels across, or it would be invisible
    diam = float(rng.uniform(max(10.0, 3.0 * px_pat), max(25.0, 4.0 * px_pat)))
    r = diam / 2
    # the whole nodule inside aerated lung, clear of the heart and of the lung's edge
    free = ndimage.distance_transform_edt((lung > 0.5) & (heart_in < 0.3)) * px_pat
    cand = free >= r + 4.0
    if not cand.any():
        cand = free >= 0.5 * free.max()
    rr, cc = np.nonzero(cand)
    j = int(rng.integers(len(rr)))
    cx = float(X[rr[j], cc[j]]) + float(rng.uniform(-0.5, 0.5)) * px_pat
    cy = float(Y[rr[j], cc[j]]) + float(rng.uniform(-0.5, 0.5)) * px_pat
    rho2 = (X - cx) ** 2 + (Y - cy) ** 2
    chord = 2.0 * np.sqrt(np.clip(r * r - rho2, 0.0, None))
    dA = MU * float(rng.uniform(2.0, 2.6)) * chord
    mask = rho2 <= (r + 0.5 * px_pat) ** 2
    return dA.astype(np.float32), mask


def _effusion(
    rng: np.random.Generator,
    case: _Case,
    X: np.ndarray,
    Y: np.ndarray,
    right: np.ndarray,
    left: np.ndarray,
    D_lung: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    u = rng.random()
    sides = [right] if u < 0.45 else [left] if u < 0.8 else [right, left]
    dA = np.zeros_like(X)
    mask = np.zeros(X.shape, dtype=bool)
    for L in sides:
        inside = L > 0.5
        if not inside.any():
            continue
        xs = X[inside]
        lateral_is_neg = float(xs.mean()) < 0
        x_lat = float(xs.min()) if lateral_is_neg else float(xs.max())
        x_med = float(xs.max()) if lateral_is_neg else float(xs.min())
        # the hemidiaphragm: lowest lung point of each column; its dome is the highest
        low = np.where(inside, Y, -np.inf).max(axis=0)
        cols = np.isfinite(low)
        xc = X[:, cols].mean(axis=0)
        lp = (xc - x_med) / (x_lat - x_med)
        central = (lp > 0.2) & (lp < 0.8)
        y_dome = float(low[cols][central].min()) if central.any() else float(low[cols].min())
        lpos = np.clip((X - x_med) / (x_lat - x_med), 0.0, 1.0)
        h0 = float(rng.uniform(0.05, 0.28)) * case.H_l
        rise = float(rng.uniform(0.06, 0.15)) * case.H_l
        level = y_dome - h0 - rise * lpos**1.5  # meniscus: higher laterally
        ramp = float(rng.uniform(10.0, 25.0))
        fluid = _smooth((Y - level) / ramp)
        dens = float(rng.uniform(0.85, 1.0))
        dA += MU * 0.78 * D_lung * fluid * L * dens  # fluid replaces aerated lung
        mask |= (fluid * L > 0.3) & (L > 0.5)
    return dA.astype(np.float32), mask


# --------------------------------------------------------------------------- public


def make_cxr(
    n: int,
    *,
    size: int = 64,
    abnormal_fraction: float = 0.0,
    findings: Sequence[str] = CXR_FINDINGS,
    child_fraction: float = 0.2,
    seed: int = 0,
) -> PhantomSet:
    """``n`` frontal chest radiographs, ``size`` x ``size``, values in [0, 1].

    ``abnormal_fraction`` of the cases carry one finding each (spread evenly over
    ``findings``); about ``child_fraction`` of each class are small children with a large
    exactly-zero collimated background. Case ``i`` depends only on ``(seed, i)`` (its
    anatomy does not even depend on whether it is abnormal), so use different seeds for
    training and evaluation sets.
    """
    fs = _validate(n, size, abnormal_fraction, findings, child_fraction)
    seed = check_seed(seed, "make_cxr")
    n, size = int(n), int(size)
    source = lung_source()
    procedural = source == "procedural"
    if procedural:
        warnings.warn(
            "torchxrayvision's lung masks were not found (or Pillow, which decodes them, is "
            "missing): chest-radiograph phantoms use procedural lung shapes instead. For real "
            f"anatomy: {TXV_INSTALL}",
            UserWarning,
            stacklevel=2,
        )
    if "opacity" in fs and rsna_boxes() is None and not procedural:
        warnings.warn(
            "torchxrayvision's RSNA box table was not found: opacities are placed from "
            "typical box statistics instead.",
            UserWarning,
            stacklevel=2,
        )
    labels, names, child = case_plan(
        n, seed, _TAG, float(abnormal_fraction), fs or ("-",), float(child_fraction)
    )
    images = np.empty((n, 1, size, size), dtype=np.float32)
    masks = np.zeros((n, 1, size, size), dtype=bool)

    def one(i: int) -> None:
        images[i, 0], masks[i, 0] = _render(seed, i, size, names[i], bool(child[i]), procedural)

    for_each_case(n, one)
    zero_fraction = (images == 0.0).mean(axis=(1, 2, 3)).astype(np.float32)
    px = FIELD_MM / size
    return PhantomSet(
        images=images,
        labels=labels,
        findings=names,
        masks=masks,
        zero_fraction=zero_fraction,
        spacing=(px, px),
        meta={
            "kind": "cxr",
            "seed": int(seed),
            "size": size,
            "abnormal_fraction": float(abnormal_fraction),
            "child_fraction": float(child_fraction),
            "findings": list(fs),
            "anatomy": source,
            "field_mm": FIELD_MM,
            "child": child,
            "index": np.arange(n, dtype=np.int64),
        },
    )
