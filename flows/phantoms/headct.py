"""Non-contrast head CT phantoms (Hounsfield units) with labelled abnormalities.

Anatomy: nilearn's MNI152 2009a templates (grey/white-matter probability maps and the
skull-stripped T1, see :mod:`flows.phantoms.anatomy`), reduced to 2 mm once and cached:
the intracranial volume (ICV) as a signed distance to the inner table, grey matter (GM),
white matter (WM); cerebrospinal fluid (CSF) is the rest of the ICV (ventricles, sulci,
cisterns). A skull shell (5-8 mm, outer and inner tables denser than the diploe) and a
scalp layer are grown outwards from the ICV.

Per subject: affine pose (scale +-8 %, head flexion +-10 degrees, roll and yaw a few
degrees, translation), a smooth elastic deformation, ventricular enlargement (a radial
warp around the lateral ventricles), cortical atrophy (GM next to CSF turned into CSF),
tissue values (GM 35-44 HU, WM 22-30 HU, CSF 2-12 HU, bone 900-1500 HU, scalp 20-50 HU)
and a calibration offset. All of it is applied as one inverse mapping evaluated only on
the output grid (a trilinear gather from the cached 2 mm maps; tissue maps only inside
the head), so a case costs a few 1e5 samples.

Acquisition: ``D`` axial slices covering MNI z = -25 .. +85 mm (the supratentorial brain,
the vertex and the top of the posterior fossa), an in-plane field of view of 230 mm;
each slice averages ``ceil(thickness / 3.5 mm)`` sub-slices (partial volume), then a
reconstruction-kernel blur and correlated Gaussian noise of 3-7 HU (see
:mod:`flows.phantoms.noise`); outside the circular reconstruction field the value is
-1024 HU. ``spacing = (thickness, 230/H, 230/W)`` mm. Image axes: slice (inferior to
superior), row (anterior at the top), column (patient's right on the image's left).

Findings (``HEADCT_FINDINGS``), ``masks`` = the lesion's extent:

* ``haemorrhage``: intraparenchymal haematoma, 55-85 HU, irregular, 5-40 mL, with a
  hypodense oedema rim (included in the mask), deep in the parenchyma;
* ``subdural``: crescent along the inner table over one hemisphere, 50-75 HU, maximal
  thickness 3-15 mm (at least two pixels on coarse grids), not crossing the midline,
  with slight mass effect; voxels partial-volumed with bone are left out of the mask;
* ``infarction``: acute ischaemic infarct in a middle-cerebral-artery territory (whole
  territory or one division / cortical branch), wedge-shaped and cortically based,
  5-12 HU below normal parenchyma with loss of grey/white differentiation and sulcal
  effacement.

In the 7-bit "paper" window ``clip(HU + 14, 0, 127)`` parenchyma sits at ~36-58, CSF at
~16-26, blood at 64-99: every finding is inside the window.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .anatomy import (
    STACK_PAD,
    HeadTemplates,
    PhantomSet,
    case_plan,
    case_rng,
    check_case_args,
    check_seed,
    for_each_case,
    head_templates,
)
from .noise import ct_noise

__all__ = ["FOV_MM", "HEADCT_FINDINGS", "Z_RANGE_MM", "make_headct"]

HEADCT_FINDINGS: tuple[str, ...] = ("haemorrhage", "subdural", "infarction")
FOV_MM = 230.0
Z_RANGE_MM = (-25.0, 85.0)
_TAG = 0xC7
_BRAIN_CENTRE = np.array([0.0, -18.0, 18.0])
_SCANNER_CENTRE = np.array([0.0, -16.0, 0.0])


def _smooth(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _validate(
    n: int, shape: tuple[int, int, int], abnormal_fraction: float, findings: Sequence[str]
) -> tuple[tuple[int, int, int], tuple[str, ...]]:
    fs = check_case_args("make_headct", n, abnormal_fraction, findings, HEADCT_FINDINGS)
    try:
        dims = tuple(int(s) for s in shape)
        ok = len(dims) == 3 and all(not isinstance(s, bool) and int(s) == s for s in shape)
    except (TypeError, ValueError):
        ok = False
        dims = ()
    if not ok:
        raise ValueError(f"make_headct: shape must be three integers (D, H, W), got {shape!r}")
    d, h, w = dims
    if not (4 <= d <= 256 and 16 <= h <= 1024 and 16 <= w <= 1024):
        raise ValueError(f"make_headct: shape {dims} out of range: D in [4, 256], H and W in [16, 1024]")
    return (d, h, w), fs


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx = math.cos(rx), math.sin(rx)
    cy, sy = math.cos(ry), math.sin(ry)
    cz, sz = math.cos(rz), math.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def _corners(tpl: HeadTemplates, q: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Flat index of the lower corner and the 8 trilinear weights for MNI points q (3, N);
    points outside the templates land in the background padding."""
    nx, ny, nz = tpl.sdf_padded.shape
    org = np.asarray(tpl.origin, dtype=np.float32)[:, None]
    idx = (q.astype(np.float32, copy=False) - org) * np.float32(1.0 / tpl.res)
    idx += np.float32(STACK_PAD)
    lim = np.array([nx - 2, ny - 2, nz - 2], dtype=np.float32)[:, None]
    np.clip(idx, 0.0, lim + np.float32(0.999), out=idx)
    i0 = np.floor(idx)
    f = idx - i0
    ii = i0.astype(np.int64)
    base = (ii[0] * ny + ii[1]) * nz + ii[2]
    fx, fy, fz = f[0], f[1], f[2]
    gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
    w = [
        gx * gy * gz,
        gx * gy * fz,
        gx * fy * gz,
        gx * fy * fz,
        fx * gy * gz,
        fx * gy * fz,
        fx * fy * gz,
        fx * fy * fz,
    ]
    return base, w


def _offsets(tpl: HeadTemplates) -> list[int]:
    _, ny, nz = tpl.sdf_padded.shape
    sx, sy = ny * nz, nz
    return [0, 1, sy, sy + 1, sx, sx + 1, sx + sy, sx + sy + 1]


def _sample_sdf(tpl: HeadTemplates, q: np.ndarray) -> np.ndarray:
    """Signed distance to the inner table (mm) at MNI points q (3, N)."""
    base, w = _corners(tpl, q)
    flat = tpl.sdf_padded.reshape(-1)
    out = np.zeros(base.shape, dtype=np.float32)
    for off, wk in zip(_offsets(tpl), w, strict=True):
        out += np.take(flat, base + off) * wk
    return out


def _sample_tissue(tpl: HeadTemplates, q: np.ndarray) -> np.ndarray:
    """(gm, wm, csf_near) at MNI points q (3, N): returns (3, N) float32.

    A hand-rolled trilinear gather on the channel-last stack (``np.take`` on rows is
    several times faster than separate ``map_coordinates`` calls).
    """
    base, w = _corners(tpl, q)
    flat = tpl.stack.reshape(-1, tpl.stack.shape[-1])
    out = np.zeros((base.shape[0], flat.shape[1]), dtype=np.float32)
    for off, wk in zip(_offsets(tpl), w, strict=True):
        out += np.take(flat, base + off, axis=0) * wk[:, None]
    return np.ascontiguousarray(out.T)


class _Subject:
    """Per-subject pose, deformation and tissue parameters."""

    def __init__(self, rng: np.random.Generator, tpl: HeadTemplates) -> None:
        s0 = float(rng.uniform(0.92, 1.08))
        self.scale = s0 * rng.uniform(0.97, 1.03, size=3)
        self.R = _rotation(
            math.radians(float(rng.uniform(-10.0, 10.0))),  # flexion / gantry tilt
            math.radians(float(rng.uniform(-3.0, 3.0))),  # roll
            math.radians(float(rng.uniform(-4.0, 4.0))),  # yaw
        )
        self.shift = rng.normal(0.0, [3.0, 5.0, 4.0])
        # elastic: three smooth sinusoidal modes per axis
        self.el_k = rng.normal(0.0, 1.0, size=(3, 3, 3))
        self.el_k /= np.linalg.norm(self.el_k, axis=2, keepdims=True)
        self.el_k *= (2 * math.pi / rng.uniform(60.0, 130.0, size=(3, 3)))[..., None]
        self.el_phase = rng.uniform(0.0, 2 * math.pi, size=(3, 3))
        self.el_amp = rng.uniform(0.5, 2.0, size=(3, 3))
        self.vent = float(rng.uniform(0.0, 1.0) ** 1.5 * 0.35)
        self.atrophy = float(np.clip(rng.uniform(0.0, 1.0) ** 1.5 * 0.6 + 0.5 * self.vent, 0, 0.7))
        self.ventricles = tpl.ventricle_centres.astype(np.float64)
        gm = float(rng.uniform(35.0, 44.0))
        wm = float(rng.uniform(22.0, 30.0))
        if gm - wm < 7.0:
            wm = gm - 7.0
        off = float(rng.normal(0.0, 2.0))
        self.hu_gm, self.hu_wm = gm + off, wm + off
        self.hu_csf = float(rng.uniform(2.0, 12.0)) + off
        self.hu_bone = float(rng.uniform(900.0, 1500.0))
        self.skull = float(rng.uniform(5.0, 8.0))
        self.skull_var = rng.normal(0.0, 1.0, size=3)
        self.scalp = float(rng.uniform(5.0, 10.0))
        self.hu_scalp = float(rng.uniform(20.0, 50.0))
        self.face = float(rng.uniform(0.8, 1.1))

    def to_template(self, p: np.ndarray) -> np.ndarray:
        """Scanner mm (3, N) -> template (MNI) mm (3, N), before the ventricular warp."""
        c = _BRAIN_CENTRE.astype(np.float32)[:, None]
        A = (self.R.T / self.scale[:, None]).astype(np.float32)
        q = A @ (p - c - self.shift.astype(np.float32)[:, None]) + c
        disp = np.zeros_like(q)
        for axis in range(3):
            for m in range(3):
                k = self.el_k[axis, m].astype(np.float32)
                disp[axis] += np.float32(self.el_amp[axis, m]) * np.sin(
                    k @ q + np.float32(self.el_phase[axis, m])
                )
        return q + disp

    def ventricle_warp(self, q: np.ndarray) -> np.ndarray:
        """Enlarge the lateral ventricles: sample closer to their centres."""
        if self.vent <= 0:
            return q
        out = q.copy()
        sig = np.array([9.0, 28.0, 14.0], dtype=np.float32)[:, None]
        for vc in self.ventricles:
            d = q - vc.astype(np.float32)[:, None]
            near = np.flatnonzero((np.abs(d) < 4.0 * sig).all(axis=0))  # exp(-8) beyond
            dn = d[:, near]
            g = np.exp(-0.5 * ((dn / sig) ** 2).sum(axis=0))
            out[:, near] -= np.float32(self.vent) * g * dn
        return out


def _grid(shape: tuple[int, int, int], sub: int) -> tuple[np.ndarray, float, float, float]:
    """Scanner coordinates (3, D*sub*H*W) of the sub-slice grid, and the spacings."""
    d, h, w = shape
    thick = (Z_RANGE_MM[1] - Z_RANGE_MM[0]) / d
    py, px = FOV_MM / h, FOV_MM / w
    z = Z_RANGE_MM[0] + (np.arange(d * sub) + 0.5) * (thick / sub)
    y = _SCANNER_CENTRE[1] + FOV_MM / 2 - (np.arange(h) + 0.5) * py
    x = _SCANNER_CENTRE[0] + FOV_MM / 2 - (np.arange(w) + 0.5) * px
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    p = np.stack([X.ravel(), Y.ravel(), Z.ravel()]).astype(np.float32)
    return p, thick, py, px


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    qm, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return qm * np.sign(np.diag(r))


def _haemorrhage(
    rng: np.random.Generator, tpl: HeadTemplates, q: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(point indices, haematoma fraction, oedema fraction, haematoma HU) near the lesion."""
    c = tpl.haem_centres[int(rng.integers(len(tpl.haem_centres)))].astype(np.float32)
    c = c + rng.normal(0.0, 1.0, size=3).astype(np.float32)
    vol_ml = float(rng.uniform(5.0, 40.0))
    r_eq = (3.0 * vol_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    ax = rng.uniform(0.75, 1.3, size=3)
    ax /= np.prod(ax) ** (1.0 / 3.0)
    M = (_random_rotation(rng) / (r_eq * ax[:, None])).astype(np.float32)
    rim = float(rng.uniform(2.0, 6.0))
    terms = []
    for _ in range(6):
        k = rng.normal(size=3)
        k /= np.linalg.norm(k)
        terms.append(
            (
                k.astype(np.float32),
                float(rng.uniform(2.0, 6.0)),
                float(rng.uniform(0, 6.3)),
                float(rng.uniform(0.05, 0.12)),
            )
        )
    hu = float(rng.uniform(55.0, 85.0))
    reach = r_eq * 1.3 * 1.5 + rim + 4.0
    dq = q - c[:, None]
    near = np.flatnonzero((dq * dq).sum(axis=0) < reach * reach)
    d = M @ dq[:, near]
    f: np.ndarray = np.sqrt((d * d).sum(axis=0))
    wob: np.ndarray = np.ones_like(f)
    for kv, freq, ph, amp in terms:  # irregular, lobulated outline
        wob += amp * np.sin(freq * (kv @ d) + ph)
    f = f * wob
    haem = _smooth((1.0 - f) * (r_eq / 1.5) + 0.5)
    oedema = np.clip(_smooth((1.0 + rim / r_eq - f) * (r_eq / 1.5) + 0.5) - haem, 0.0, 1.0)
    return near, haem, oedema, hu


def _subdural_geometry(rng: np.random.Generator, px: float) -> tuple[float, np.ndarray, float, float, float]:
    side = 1.0 if rng.random() < 0.5 else -1.0
    az = math.radians(float(rng.uniform(-50.0, 50.0)))
    el = math.radians(float(rng.uniform(-5.0, 45.0)))
    u = np.array([side * math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    alpha = math.radians(float(rng.uniform(50.0, 80.0)))
    # 3-15 mm; on coarse grids at least two pixels thick, or it would be invisible
    t_max = float(rng.uniform(max(3.0, 2.0 * px), max(15.0, 2.0 * px + 4.0)))
    push = float(rng.uniform(0.3, 0.8))
    return side, u.astype(np.float32), alpha, t_max, push


def _subdural_thickness(q: np.ndarray, side: float, u: np.ndarray, alpha: float, t_max: float) -> np.ndarray:
    v = q - _BRAIN_CENTRE.astype(np.float32)[:, None]
    norm = np.sqrt((v * v).sum(axis=0)) + 1e-6
    ang = np.arccos(np.clip((u @ v) / norm, -1.0, 1.0))
    w = np.clip(np.cos(0.5 * math.pi * np.clip(ang / alpha, 0.0, 1.0)), 0.0, 1.0) ** 0.7
    w = w * _smooth((side * q[0] - 1.0) / 4.0) * _smooth((q[2] + 12.0) / 12.0)
    return (t_max * w).astype(np.float32)


def _infarct(
    rng: np.random.Generator, q: np.ndarray, within: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """(point indices, lesion weight, HU drop) of an MCA-territory infarct; only the
    points ``within`` (indices, e.g. the intracranial ones) are considered."""
    side = 1.0 if rng.random() < 0.5 else -1.0
    apex = np.array([side * 22.0, 2.0, -8.0], dtype=np.float32)
    kind = rng.random()
    if kind < 0.25:  # whole territory
        base = np.array([side, -0.15, 0.35])
        alpha, r_min = rng.uniform(34.0, 42.0), 5.0
    elif kind < 0.5:  # superior division
        base = np.array([side, 0.35, 0.55])
        alpha, r_min = rng.uniform(24.0, 32.0), 15.0
    elif kind < 0.75:  # inferior division
        base = np.array([side, -0.6, 0.05])
        alpha, r_min = rng.uniform(24.0, 32.0), 15.0
    else:  # a cortical branch
        base = np.array([side, rng.uniform(-0.8, 0.6), rng.uniform(0.0, 0.9)])
        alpha, r_min = rng.uniform(15.0, 24.0), 25.0
    axis = base / np.linalg.norm(base) + rng.normal(0.0, 0.08, size=3)
    axis = (axis / np.linalg.norm(axis)).astype(np.float32)
    drop = float(rng.uniform(5.0, 12.0))
    near = within[side * q[0, within] > 0.0]
    v = q[:, near] - apex[:, None]
    r = np.sqrt((v * v).sum(axis=0)) + 1e-6
    ang = np.degrees(np.arccos(np.clip((axis @ v) / r, -1.0, 1.0)))
    w = _smooth((alpha - ang) / 5.0 + 0.5) * _smooth((r - r_min) / 6.0 + 0.5)
    w = w * _smooth((side * q[0, near] - 3.0) / 4.0)
    return near, w.astype(np.float32), drop


@functools.lru_cache(maxsize=8)
def _grid_cached(shape: tuple[int, int, int], sub: int) -> tuple[np.ndarray, float, float, float]:
    p, thick, py, px = _grid(shape, sub)
    p.setflags(write=False)
    return p, thick, py, px


def _render(
    seed: int,
    index: int,
    shape: tuple[int, int, int],
    finding: str,
    tpl: HeadTemplates,
) -> tuple[np.ndarray, np.ndarray]:
    rng_a = case_rng(seed, _TAG, index, 0)
    rng_f = case_rng(seed, _TAG, index, 1)
    rng_n = case_rng(seed, _TAG, index, 2)
    sub = _Subject(rng_a, tpl)
    kernel = float(rng_n.uniform(0.3, 0.7))
    sigma = float(rng_n.uniform(3.0, 7.0))
    noise_k = float(rng_n.uniform(0.5, 1.0))
    d, h, w = shape
    thick_nominal = (Z_RANGE_MM[1] - Z_RANGE_MM[0]) / d
    ns = max(1, math.ceil(thick_nominal / 3.5))
    p, _thick, py, px = _grid_cached(shape, ns)
    pve = max(px, py, 1.0)
    q0 = sub.to_template(p)
    q_all = sub.ventricle_warp(q0)
    # the subdural collection sits under the inner table (undisplaced coordinates)
    sdf_all = _sample_sdf(tpl, q0 if finding == "subdural" else q_all)

    # everything below is computed only on points that may be more than air: within the
    # skull + scalp of the inner table, or in the face / skull-base block
    f_rel = (q0[0] / 62.0) ** 2 + ((q0[1] - 55.0) / 45.0) ** 2 + ((q0[2] + 40.0) / 35.0) ** 2
    reach = sub.skull * 1.5 + sub.scalp + 2.0 * pve
    head = np.flatnonzero((sdf_all < reach) | (f_rel * sub.face < 1.0))
    n_all = sdf_all.shape[0]
    sdf = sdf_all[head]
    q0 = q0[:, head]
    q = q_all[:, head]

    t_sdh = None
    sdh_idx = None
    q_brain = q
    if finding == "subdural":
        # the brain beneath the collection is pushed away from it (sampled further out)
        side, u, alpha, t_max, push = _subdural_geometry(rng_f, max(px, py))
        sdh_idx = np.flatnonzero((sdf < 2.0) & (-sdf < t_max + 40.0) & (side * q0[0] > -2.0))
        qs = q0[:, sdh_idx]
        t_sdh = _subdural_thickness(qs, side, u, alpha, t_max)
        cen = _BRAIN_CENTRE.astype(np.float32)[:, None]
        outward = (qs - cen) / (np.sqrt(((qs - cen) ** 2).sum(axis=0)) + 1e-6)
        depth_in = np.clip(-sdf[sdh_idx], 0.0, None)
        q_brain = q.copy()
        q_brain[:, sdh_idx] += outward * (push * t_sdh * np.exp(-depth_in / 35.0))
    # tissue maps only inside (or at) the intracranial volume
    inside = np.flatnonzero(sdf < 0.5 * pve + 0.5)
    maps = np.zeros((3, sdf.shape[0]), dtype=np.float32)
    maps[:, inside] = _sample_tissue(tpl, q_brain[:, inside])
    gm, wm, near = maps[0], maps[1], maps[2]
    icv = _smooth(0.5 - sdf / pve)
    gm = gm * (1.0 - sub.atrophy * near)  # cortical atrophy: GM next to CSF becomes CSF
    tissue = gm + wm
    scale = np.where(tissue > icv, icv / np.maximum(tissue, 1e-6), 1.0)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(icv - gm - wm, 0.0, 1.0)
    brain = gm * sub.hu_gm + wm * sub.hu_wm + csf * sub.hu_csf
    lesion = np.zeros_like(brain)

    if finding == "infarction":
        idx, wgt, drop = _infarct(rng_f, q0, inside)
        target = 0.5 * (sub.hu_gm + sub.hu_wm) - drop
        g_, w_, c_ = gm[idx], wm[idx], csf[idx]
        eff = 0.5 * wgt * c_  # sulcal effacement (swelling)
        brain[idx] += wgt * (g_ * (target - sub.hu_gm) + w_ * (target - sub.hu_wm)) + eff * (
            target - sub.hu_csf
        )
        lesion[idx] = wgt * np.clip((g_ + w_) * 2.0, 0.0, 1.0)
    elif finding == "haemorrhage":
        idx, haem, oedema, hu_h = _haemorrhage(rng_f, tpl, q0)
        haem = haem * icv[idx]
        oedema = oedema * (gm[idx] + wm[idx])
        qi = q0[:, idx]
        het = 3.0 * np.sin(0.35 * qi[0] + 0.2 * qi[1]) * np.sin(0.3 * qi[2])
        drop = float(rng_f.uniform(6.0, 12.0))
        brain[idx] = brain[idx] * (1.0 - haem) + haem * (hu_h + het) - oedema * drop
        lesion[idx] = np.clip(haem + oedema * 2.0, 0.0, 1.0) * (icv[idx] > 0.2)
    elif finding == "subdural" and t_sdh is not None and sdh_idx is not None:
        hu_s = float(rng_f.uniform(50.0, 75.0))
        din = -sdf[sdh_idx]
        sdh = _smooth((t_sdh - din) / 1.0 + 0.5) * (t_sdh > 0.5) * icv[sdh_idx]
        qs = q0[:, sdh_idx]
        het = 2.5 * np.sin(0.25 * qs[1] + 0.4 * qs[2])
        brain[sdh_idx] = brain[sdh_idx] * (1.0 - sdh) + sdh * (hu_s + het)
        lesion[sdh_idx] = sdh

    # skull: tables denser than diploe; thickness varies front to back
    yrel = q0[1] + 18.0
    tau = sub.skull * (
        1.0
        + 0.15 * sub.skull_var[0] * np.tanh(yrel / 60.0)
        + 0.12 * abs(sub.skull_var[1]) * np.abs(np.tanh(yrel / 50.0))
    )
    tau = np.maximum(tau, 3.5)
    outer = _smooth(0.5 - (sdf - tau) / pve)
    bone_h = np.clip(outer - icv, 0.0, 1.0)
    t_rel = np.clip(sdf / tau, 0.0, 1.0)
    hu_b = sub.hu_bone * (1.0 - 0.45 * np.sin(math.pi * t_rel) ** 2)
    scalp_out = _smooth(0.5 - (sdf - tau - sub.scalp) / pve)
    # face / orbits / skull-base soft tissue in the lowest, anterior slices
    face = _smooth((1.0 - f_rel[head] * sub.face) * 4.0) * (1.0 - icv)
    soft = np.clip(np.maximum(scalp_out, face) - outer, 0.0, 1.0)
    air = np.clip(1.0 - icv - bone_h - soft, 0.0, 1.0)
    hu = np.full(n_all, -1000.0, dtype=np.float32)
    hu[head] = brain + bone_h * hu_b + soft * sub.hu_scalp - 1000.0 * air
    lesion_all = np.zeros(n_all, dtype=np.float32)
    lesion_all[head] = lesion
    bone = np.zeros(n_all, dtype=np.float32)
    bone[head] = bone_h
    lesion = lesion_all

    # partial volume over the slice thickness, reconstruction kernel, noise
    vol = hu.reshape(d, ns, h, w).mean(axis=1)
    les = lesion.reshape(d, ns, h, w).mean(axis=1)
    bone_pv = bone.reshape(d, ns, h, w).mean(axis=1)
    vol = ndimage.gaussian_filter(vol, (0.0, kernel, kernel), mode="nearest")
    rng_q = case_rng(seed, _TAG, index, 3)
    vol = vol + ct_noise(rng_q, (d, h, w), sigma, noise_k)
    # circular reconstruction field; values clipped to the scanner's range
    yy = (np.arange(h) + 0.5) / h - 0.5
    xx = (np.arange(w) + 0.5) / w - 0.5
    outside = (yy[:, None] ** 2 + xx[None, :] ** 2) > 0.25
    vol = np.clip(vol, -1024.0, 3071.0)
    vol[:, outside] = -1024.0
    # the extent: voxels at least half lesion, excluding those partial-volumed with bone
    mask = (les >= 0.5) & (bone_pv < 0.15)
    if not mask.any():
        mask = les >= min(0.5, float(les.max()) * 0.8) if les.max() > 0 else mask
    mask[:, outside] = False
    return vol.astype(np.float32), mask


def make_headct(
    n: int,
    *,
    shape: tuple[int, int, int] = (16, 64, 64),
    abnormal_fraction: float = 0.0,
    findings: Sequence[str] = HEADCT_FINDINGS,
    seed: int = 0,
) -> PhantomSet:
    """``n`` head CT volumes ``(1, D, H, W)`` in HU.

    ``abnormal_fraction`` of the cases carry one finding each, spread evenly over
    ``findings``. Case ``i`` depends only on ``(seed, i)`` (its anatomy does not even
    depend on whether it is abnormal), so use different seeds for training and
    evaluation sets.
    """
    dims, fs = _validate(n, shape, abnormal_fraction, findings)
    seed = check_seed(seed, "make_headct")
    n = int(n)
    tpl = head_templates(2.0)
    labels, names, _ = case_plan(n, seed, _TAG, float(abnormal_fraction), fs or ("-",))
    images = np.empty((n, 1, *dims), dtype=np.float32)
    masks = np.zeros((n, 1, *dims), dtype=bool)

    def one(i: int) -> None:
        images[i, 0], masks[i, 0] = _render(seed, i, dims, names[i], tpl)

    for_each_case(n, one)
    zero_fraction = (images <= -1000.0).mean(axis=(1, 2, 3, 4)).astype(np.float32)
    d, h, w = dims
    thick = (Z_RANGE_MM[1] - Z_RANGE_MM[0]) / d
    return PhantomSet(
        images=images,
        labels=labels,
        findings=names,
        masks=masks,
        zero_fraction=zero_fraction,
        spacing=(thick, FOV_MM / h, FOV_MM / w),
        meta={
            "kind": "bct",
            "seed": int(seed),
            "shape": list(dims),
            "abnormal_fraction": float(abnormal_fraction),
            "findings": list(fs),
            "anatomy": tpl.source if tpl.source == "procedural" else "nilearn MNI152",
            "window_hu": [-14.0, 113.0],
            "z_range_mm": list(Z_RANGE_MM),
            "fov_mm": FOV_MM,
            "child": np.zeros(n, dtype=bool),
            "index": np.arange(n, dtype=np.int64),
        },
    )
