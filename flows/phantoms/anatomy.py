"""Anatomical sources, the case plan and the :class:`PhantomSet` container.

Real anatomy comes from data files that ship inside two optional packages; nothing is
downloaded and nothing is written anywhere (decoded data are cached in memory only):

* chest radiographs: ``torchxrayvision/data/semantic_masks_v7labs_lungs.zip`` (517 real
  lung segmentations from frontal chest radiographs) and
  ``torchxrayvision/data/kaggle_stage_2_train_labels.csv.zip`` (RSNA pneumonia challenge
  boxes, 1024x1024 coordinates). torchxrayvision is *never imported* (it would pull in
  torchvision); its files are located through ``importlib.metadata``.
  Install with ``pip install --no-deps torchxrayvision``.
* head CT: nilearn's bundled MNI152 2009a symmetric templates (T1, grey- and white-matter
  probability maps, 1 mm). nilearn is *not imported* (slow); its data directory is found
  through ``importlib.util.find_spec`` and the NIfTI files are read with nibabel.
  Install with ``pip install nilearn``.

When a source is missing the generators fall back to procedural shapes and say so with a
:class:`UserWarning`; ``PhantomSet.meta["anatomy"]`` records which one was used.

The *case plan* decides, for every case index ``i``, whether it is abnormal, which finding
it carries and whether it is a child, using only ``(seed, i)``: cases are grouped in
blocks of :data:`BLOCK` consecutive indices and each block is planned by its own seeded
generator, so case ``i`` is identical whether a set of 10 or of 10 000 is generated.
Within a block the abnormal cases (and, inside each class, the child cases) are counted by
error diffusion so that the fractions hold exactly over whole blocks, and the findings
cycle so that they are spread evenly among the abnormal cases.
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "BLOCK",
    "SDF_OUTSIDE",
    "STACK_PAD",
    "HeadTemplates",
    "LungShape",
    "PhantomSet",
    "case_plan",
    "case_rng",
    "check_seed",
    "for_each_case",
    "head_templates",
    "lung_shape",
    "n_lung_shapes",
    "rsna_boxes",
    "rsna_lung_field",
]

BLOCK = 60
"""Cases are planned in blocks of this many consecutive indices (divisible by 2..6)."""

LUNG_CANON = 128
"""Side of the canonical lung-mask frame (the lung pair's bounding box, stretched)."""

STACK_PAD = 2
"""Background voxels around :attr:`HeadTemplates.stack`."""

SDF_OUTSIDE = 60.0
"""Signed distance (mm) assumed outside the template's box: far outside the head."""

TXV_INSTALL = "pip install --no-deps torchxrayvision"
NILEARN_INSTALL = "pip install nilearn"


# --------------------------------------------------------------------------- PhantomSet


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value and "dtype" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value


@dataclass
class PhantomSet:
    """A labelled set of synthetic images.

    ``images`` is float32: CXR ``(N, 1, H, W)`` display intensity in [0, 1] (1 = dense,
    white bone); head CT ``(N, 1, D, H, W)`` in Hounsfield units. ``labels`` is int64
    (0 normal, 1 abnormal), ``findings`` the finding name per case ("normal" for normals),
    ``masks`` the lesion extent (all False for normals), ``zero_fraction`` the fraction of
    empty background (CXR: pixels exactly 0 (collimation); CT: voxels <= -1000 HU (air)),
    ``spacing`` the pixel/voxel spacing in mm. ``meta`` holds the generator's settings;
    per-case arrays in it (length N, e.g. ``meta["child"]``, ``meta["index"]``) follow
    :meth:`subset`.
    """

    images: np.ndarray
    labels: np.ndarray
    findings: list[str]
    masks: np.ndarray
    zero_fraction: np.ndarray
    spacing: tuple[float, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if not (len(self.images) == len(self.findings) == len(self.masks) == n):
            raise ValueError("PhantomSet: images, labels, findings and masks differ in length")
        if len(self.zero_fraction) != n:
            raise ValueError("PhantomSet: zero_fraction has the wrong length")
        if self.masks.shape != self.images.shape:
            raise ValueError("PhantomSet: masks must have the same shape as images")

    def __len__(self) -> int:
        return len(self.labels)

    def volumes(self) -> list[tuple[np.ndarray, tuple[float, float, float]]]:
        """Each CT volume (a view, no copy) with its spacing: the (volume, spacing) pairs a
        patch bundle trains and calibrates on (:mod:`flows.patchbundle`)."""
        if self.images.ndim != 5:
            raise ValueError(f"not a set of volumes (images of shape {self.images.shape})")
        sp = tuple(float(x) for x in self.spacing)
        return [(v[0], sp) for v in self.images]  # type: ignore[misc]

    def subset(self, idx: Any) -> PhantomSet:
        """Cases ``idx`` (an index array, a boolean mask or a slice) as a new set."""
        n = len(self)
        sel = np.arange(n)[idx]
        sel = np.atleast_1d(sel)
        meta = {
            k: (v[sel] if isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == n else v)
            for k, v in self.meta.items()
        }
        return PhantomSet(
            images=self.images[sel],
            labels=self.labels[sel],
            findings=[self.findings[int(j)] for j in sel],
            masks=self.masks[sel],
            zero_fraction=self.zero_fraction[sel],
            spacing=tuple(self.spacing),
            meta=meta,
        )

    def save_npz(self, path: str | Path) -> None:
        """Write the set with ``np.savez_compressed`` (meta as a JSON string)."""
        np.savez_compressed(
            Path(path),
            images=self.images,
            labels=self.labels,
            findings=np.asarray(self.findings, dtype=str),
            masks=self.masks,
            zero_fraction=self.zero_fraction,
            spacing=np.asarray(self.spacing, dtype=np.float64),
            meta=np.asarray(json.dumps(_to_jsonable(self.meta))),
        )

    @classmethod
    def load_npz(cls, path: str | Path) -> PhantomSet:
        """Read a set written by :meth:`save_npz`."""
        with np.load(Path(path), allow_pickle=False) as z:
            return cls(
                images=z["images"].astype(np.float32, copy=False),
                labels=z["labels"].astype(np.int64, copy=False),
                findings=[str(s) for s in z["findings"].tolist()],
                masks=z["masks"].astype(bool, copy=False),
                zero_fraction=z["zero_fraction"].astype(np.float32, copy=False),
                spacing=tuple(float(s) for s in z["spacing"].tolist()),
                meta=_from_jsonable(json.loads(str(z["meta"]))),
            )


# --------------------------------------------------------------------------- case plan


def _seed_word(seed: int) -> int:
    return int(seed) % (1 << 64)  # SeedSequence wants non-negative integers


def check_case_args(who: str, n: object, abnormal_fraction: float, findings: Sequence[str],
                    known: Sequence[str]) -> tuple[str, ...]:
    """The argument checks every generator shares; returns the findings as a tuple."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise ValueError(f"{who}: n must be a positive integer, got {n!r}")
    if not 0.0 <= float(abnormal_fraction) <= 1.0:
        raise ValueError(f"{who}: abnormal_fraction must be in [0, 1], got {abnormal_fraction!r}")
    if isinstance(findings, str):
        raise ValueError(f"{who}: findings must be a sequence of names, not one string")
    fs = tuple(findings)
    unknown = [f for f in fs if f not in known]
    if unknown:
        raise ValueError(f"{who}: unknown finding(s) {unknown}; choose from {list(known)}")
    if not fs and abnormal_fraction > 0:
        raise ValueError(f"{who}: findings is empty but abnormal_fraction > 0")
    return fs


def check_seed(seed: object, who: str) -> int:
    """The seed as an int, or a ValueError that says what was wrong."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"{who}: seed must be an integer, got {seed!r}")
    return int(seed)


def case_rng(seed: int, kind_tag: int, index: int, stream: int) -> np.random.Generator:
    """Independent generator for one case and one purpose (anatomy, finding, noise)."""
    return np.random.default_rng([_seed_word(seed), kind_tag, index, stream])


def _diffused_count(block: int, fraction: float, size: int = BLOCK) -> int:
    lo = math.floor(block * size * fraction + 0.5)
    hi = math.floor((block + 1) * size * fraction + 0.5)
    return hi - lo


def case_plan(
    n: int,
    seed: int,
    kind_tag: int,
    abnormal_fraction: float,
    findings: Sequence[str],
    child_fraction: float = 0.0,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Labels, finding names and child flags of cases ``0..n-1`` (see module docstring)."""
    labels = np.zeros(n, dtype=np.int64)
    names = ["normal"] * n
    child = np.zeros(n, dtype=bool)
    k = len(findings)
    for b in range(math.ceil(n / BLOCK)):
        rng = np.random.default_rng([_seed_word(seed), kind_tag, 0xB10C, b])
        order = rng.permutation(BLOCK)
        n_ab = _diffused_count(b, abnormal_fraction)
        abnormal_pos = order[:n_ab]
        normal_pos = order[n_ab:]
        first = math.floor(b * BLOCK * abnormal_fraction + 0.5)  # abnormals before block
        for j, pos in enumerate(abnormal_pos):
            i = b * BLOCK + int(pos)
            if i < n:
                labels[i] = 1
                names[i] = findings[(first + j) % k]
        if child_fraction > 0:
            # within each class, its own error-diffused share of children
            for cls_pos, tag in ((normal_pos, 0), (abnormal_pos, 1)):
                m = len(cls_pos)
                if m == 0:
                    continue
                r = np.random.default_rng([_seed_word(seed), kind_tag, 0xC41D, b, tag])
                offset = r.random()
                n_child = math.floor(m * child_fraction + offset)
                for pos in r.permutation(cls_pos)[:n_child]:
                    i = b * BLOCK + int(pos)
                    if i < n:
                        child[i] = True
    return labels, names, child


def for_each_case(n: int, render: Callable[[int], None]) -> None:
    """Call ``render(i)`` for every case, on a few threads when it pays.

    Each case has its own generators, so the result does not depend on the order; numpy
    and scipy release the GIL in the heavy loops, so threads give a real speed-up.
    """
    workers = min(4, os.cpu_count() or 1, n)
    if workers <= 1 or n < 4:
        for i in range(n):
            render(i)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(render, range(n)):
            pass


# --------------------------------------------------------------------------- file location


def _dist_file(dist: str, rel: str) -> Path | None:
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    p = Path(str(d.locate_file(rel)))
    return p if p.is_file() else None


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc)
        if p.is_dir():
            return p
    return None


def txv_file(name: str) -> Path | None:
    """Path of a data file shipped in the torchxrayvision wheel, or None."""
    p = _dist_file("torchxrayvision", f"torchxrayvision/data/{name}")
    if p is not None:
        return p
    d = _package_dir("torchxrayvision")  # finds the package without importing it
    if d is not None and (d / "data" / name).is_file():
        return d / "data" / name
    return None


def nilearn_template(name: str) -> Path | None:
    """Path of a template bundled with nilearn (``nilearn/datasets/data/<name>``), or None."""
    d = _package_dir("nilearn")
    if d is not None and (d / "datasets" / "data" / name).is_file():
        return d / "datasets" / "data" / name
    p = _dist_file("nilearn", f"nilearn/datasets/data/{name}")
    return p


# --------------------------------------------------------------------------- lungs (CXR)


@dataclass(frozen=True)
class LungShape:
    """A lung pair in the canonical frame (its bounding box stretched to a square).

    ``right`` / ``left`` are the soft masks of the lung on the image's left / right (the
    patient's right / left lung in a PA view), ``depth`` a [0, 1] AP-depth profile (1 at
    the thickest part of each lung), ``aspect`` the bounding box's height / width in the
    source image and ``source`` its provenance.
    """

    right: np.ndarray
    left: np.ndarray
    depth: np.ndarray
    aspect: float
    source: str


@functools.lru_cache(maxsize=1)
def _lung_zip_names() -> tuple[Path, tuple[str, ...]] | None:
    path = txv_file("semantic_masks_v7labs_lungs.zip")
    if path is None or importlib.util.find_spec("PIL") is None:  # Pillow decodes PNG/JPEG
        return None
    try:
        with zipfile.ZipFile(path) as z:
            names = tuple(sorted(n for n in z.namelist() if n.lower().endswith((".png", ".jpg", ".jpeg"))))
    except (OSError, zipfile.BadZipFile):
        return None
    return (path, names) if names else None


def lung_source() -> str:
    """ "torchxrayvision lung masks" when the real masks are available, else "procedural"."""
    return "torchxrayvision lung masks" if _lung_zip_names() is not None else "procedural"


def n_lung_shapes() -> int:
    """How many lung shapes :func:`lung_shape` indexes (real files or procedural)."""
    zn = _lung_zip_names()
    return len(zn[1]) if zn is not None else _N_PROCEDURAL_LUNGS


def _decode_gray(data: bytes, max_side: int = 320) -> np.ndarray:
    from PIL import Image  # Pillow is a matplotlib dependency

    src = Image.open(io.BytesIO(data))
    if src.format == "JPEG":
        src.draft("L", (max_side, max_side))  # decode at reduced size: much faster
    gray = src.convert("L")
    gray.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)


def _canonical_from_binary(binary: np.ndarray, source: str) -> LungShape | None:
    """Quality-check a binary two-lung mask and put it into the canonical frame."""
    lab, nlab = ndimage.label(binary)
    if nlab < 2:
        return None
    sizes = ndimage.sum_labels(binary, lab, index=np.arange(1, nlab + 1))
    order = np.argsort(sizes)[::-1]
    a, b = int(order[0]) + 1, int(order[1]) + 1
    if sizes[order[1]] < 0.35 * sizes[order[0]] or sizes[order[1]] < 0.01 * binary.size:
        return None
    comp_a = ndimage.binary_fill_holes(lab == a)
    comp_b = ndimage.binary_fill_holes(lab == b)
    ca = ndimage.center_of_mass(comp_a)
    cb = ndimage.center_of_mass(comp_b)
    right, left = (comp_a, comp_b) if ca[1] < cb[1] else (comp_b, comp_a)
    union = right | left
    rows = np.flatnonzero(union.any(axis=1))
    cols = np.flatnonzero(union.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = r1 - r0, c1 - c0
    aspect = h / w
    if not 0.6 <= aspect <= 1.3 or h < 24 or w < 24:
        return None
    # the two lungs must sit side by side: right lung left of left lung, large vertical overlap
    rr = np.flatnonzero(right.any(axis=1))
    lr = np.flatnonzero(left.any(axis=1))
    overlap = min(rr[-1], lr[-1]) - max(rr[0], lr[0])
    if overlap < 0.6 * min(rr[-1] - rr[0], lr[-1] - lr[0]):
        return None
    if np.flatnonzero(right.any(axis=0))[-1] > np.flatnonzero(left.any(axis=0))[0] + 0.05 * w:
        return None
    if union[r0:r1, c0:c1].mean() < 0.35:
        return None
    # each lung: fill fraction of its own box plausible (rejects lines, rings, fragments)
    for comp in (right, left):
        cr = np.flatnonzero(comp.any(axis=1))
        cc = np.flatnonzero(comp.any(axis=0))
        fill = comp.sum() / ((cr[-1] - cr[0] + 1) * (cc[-1] - cc[0] + 1))
        if fill < 0.45 or (cr[-1] - cr[0]) < 0.6 * h:
            return None
    C = LUNG_CANON
    zoom = (C / h, C / w)

    def canon(m: np.ndarray) -> np.ndarray:
        crop = m[r0:r1, c0:c1].astype(np.float32)
        out = ndimage.zoom(crop, zoom, order=1, grid_mode=True, mode="grid-constant")
        out = ndimage.gaussian_filter(out[:C, :C], 0.7)
        full = np.zeros((C, C), np.float32)
        full[: out.shape[0], : out.shape[1]] = out
        return np.clip(full, 0.0, 1.0)

    rm, lm = canon(right), canon(left)
    # AP depth profile: rises over ~1 cm from the lung's outline (crisp borders against
    # the mediastinum and chest wall, as tangential interfaces look), then slowly inwards
    depth = np.zeros((C, C), np.float32)
    for m in (rm, lm):
        edt = ndimage.distance_transform_edt(m > 0.5).astype(np.float32)
        if edt.max() > 0:
            prof = (1.0 - np.exp(-edt / 5.0)) * (0.75 + 0.25 * np.sqrt(edt / edt.max()))
            depth = np.maximum(depth, prof)
    depth = ndimage.gaussian_filter(depth, 0.8)
    depth /= max(float(depth.max()), 1e-6)
    return LungShape(
        right=(rm * 255).round().astype(np.uint8),
        left=(lm * 255).round().astype(np.uint8),
        depth=(depth * 255).round().astype(np.uint8),
        aspect=float(aspect),
        source=source,
    )


@functools.cache
def _real_lung(index: int) -> LungShape | None:
    zn = _lung_zip_names()
    if zn is None:
        return None
    path, names = zn
    name = names[index]
    try:
        with zipfile.ZipFile(path) as z:
            gray = _decode_gray(z.read(name))
    except Exception:  # a damaged member is skipped, not fatal
        return None
    return _canonical_from_binary(gray > 160, f"v7labs:{name.rsplit('/', 1)[-1]}")


_N_PROCEDURAL_LUNGS = 64


@functools.cache
def _procedural_lung(index: int) -> LungShape:
    """A plausible lung pair drawn from a parametric family (used without torchxrayvision)."""
    rng = np.random.default_rng([0x1C0F, index])
    C = LUNG_CANON
    v, u = np.mgrid[0:C, 0:C].astype(np.float32) / (C - 1)  # v: down, u: right
    masks = []
    for side in (0, 1):
        # side-local frame: x = 0 at the lateral chest wall, 1 at the mediastinum
        x = u / 0.42 if side == 0 else (1.0 - u) / 0.42
        apex0 = rng.uniform(0.0, 0.04)
        top = apex0 + 0.3 * np.abs((x - 0.5) / 0.5) ** 2.5
        lateral = 0.03 + 0.4 * (1.0 - np.clip(v / 0.45, 0.0, 1.0)) ** 2
        notch = (0.25 if side == 1 else 0.1) * rng.uniform(0.7, 1.3)
        medial = 1.0 - notch * np.clip((v - 0.45) / 0.45, 0.0, 1.0) ** 0.8
        b_lat = rng.uniform(0.93, 1.0)
        dome = rng.uniform(0.08, 0.16)
        bottom = b_lat - dome * np.clip(1.0 - ((x - 0.55) / 0.55) ** 2, 0.0, 1.0)
        inside = (v > top) & (v < bottom) & (x > lateral) & (x < medial)
        masks.append(inside.astype(np.float32))
    binary = (masks[0] + masks[1]) > 0.5
    shape = _canonical_from_binary(binary, f"procedural:{index}")
    if shape is None:  # the family is built to pass; keep a safe fallback anyway
        raise RuntimeError("procedural lung shape failed its own quality check")
    aspect = float(rng.uniform(0.8, 1.05))
    return LungShape(shape.right, shape.left, shape.depth, aspect, shape.source)


def lung_shape(index: int, *, procedural: bool = False) -> LungShape:
    """Lung pair ``index`` (mod the number of shapes); rejected real masks are skipped."""
    m = n_lung_shapes() if not procedural else _N_PROCEDURAL_LUNGS
    if not procedural and _lung_zip_names() is not None:
        for k in range(m):
            s = _real_lung((index + k) % m)
            if s is not None:
                return s
        raise RuntimeError("no usable lung mask in the torchxrayvision archive")
    return _procedural_lung(index % _N_PROCEDURAL_LUNGS)


@functools.lru_cache(maxsize=1)
def rsna_boxes() -> np.ndarray | None:
    """RSNA pneumonia boxes (Target=1) as ``(K, 4)`` x, y, w, h in units of the image width."""
    path = txv_file("kaggle_stage_2_train_labels.csv.zip")
    if path is None:
        return None
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith(".csv"))
            text = z.read(name).decode("utf-8")
    except (OSError, zipfile.BadZipFile, StopIteration):
        return None
    rows = []
    for rec in csv.DictReader(io.StringIO(text)):
        if rec.get("Target") == "1" and rec.get("x"):
            rows.append([float(rec["x"]), float(rec["y"]), float(rec["width"]), float(rec["height"])])
    if not rows:
        return None
    return (np.asarray(rows, dtype=np.float64) / 1024.0).astype(np.float32)


@functools.lru_cache(maxsize=1)
def rsna_lung_field() -> tuple[float, float, float, float]:
    """Where the lung fields sit in RSNA images (x0, y0, x1, y1 in image widths).

    Estimated from the boxes themselves (1st/99th percentiles of their centres); a typical
    value is used when the boxes are missing.
    """
    b = rsna_boxes()
    if b is None:
        return (0.12, 0.10, 0.90, 0.88)
    cx = b[:, 0] + b[:, 2] / 2
    cy = b[:, 1] + b[:, 3] / 2
    # box centres lie inside the lungs; the apices (rarely boxed) sit ~8 % higher
    return (
        float(np.percentile(cx, 1)) - 0.03,
        float(np.percentile(cy, 1)) - 0.08,
        float(np.percentile(cx, 99)) + 0.03,
        float(np.percentile(cy, 99)) + 0.02,
    )


# --------------------------------------------------------------------------- head (CT)


@dataclass(frozen=True, eq=False)
class HeadTemplates:
    """Head anatomy on a regular grid in MNI millimetres (RAS), at ``res`` mm.

    ``sdf`` is the signed distance to the inner table of the skull (negative inside the
    intracranial volume, mm), ``gm`` / ``wm`` the grey / white matter fractions,
    ``csf_near`` how close a voxel is to cerebrospinal fluid (for atrophy);
    ``sdf_padded`` and ``stack`` (gm, wm, csf_near as one channel-last ``(X, Y, Z, 3)``
    array) are the same maps padded by :data:`STACK_PAD` voxels of background on every
    side, for fast trilinear sampling; ``origin`` the MNI coordinate of voxel (0, 0, 0)
    (x, y, z) of the unpadded maps, ``haem_centres`` candidate centres (MNI mm) for deep
    parenchymal lesions, ``ventricle_centres`` the two lateral ventricles' centres.
    """

    sdf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf_near: np.ndarray
    sdf_padded: np.ndarray
    stack: np.ndarray
    origin: tuple[float, float, float]
    res: float
    haem_centres: np.ndarray
    ventricle_centres: np.ndarray
    source: str


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    pad = [(0, (-s) % f) for s in a.shape]
    a = np.pad(a, pad, mode="edge")
    sh = [s // f for s in a.shape]
    return a.reshape(sh[0], f, sh[1], f, sh[2], f).mean(axis=(1, 3, 5))


def _finish_templates(
    icv: np.ndarray,
    gm: np.ndarray,
    wm: np.ndarray,
    origin: tuple[float, float, float],
    res: float,
    source: str,
) -> HeadTemplates:
    inside = icv > 0.5
    d_out = ndimage.distance_transform_edt(~inside) * res
    d_in = ndimage.distance_transform_edt(inside) * res
    sdf = (d_out - d_in).astype(np.float32)
    # sub-voxel refinement: shift by the partial-volume fraction
    sdf -= ((icv - 0.5) * res).astype(np.float32) * (np.abs(sdf) <= 1.5 * res)
    gm = np.clip(gm, 0, 1).astype(np.float32)
    wm = np.clip(wm, 0, 1).astype(np.float32)
    tot = gm + wm
    over = tot > 1
    gm[over] /= tot[over]
    wm[over] /= tot[over]
    csf = np.clip(icv - gm - wm, 0, 1)
    csf_near = ndimage.gaussian_filter(csf, 1.5 / res * 1.5).astype(np.float32)
    csf_near = np.clip(csf_near / max(float(np.percentile(csf_near[inside], 99)), 1e-6), 0, 1)
    # deep parenchymal candidate centres (for haematomas): parenchyma all around
    par = ndimage.gaussian_filter(gm + wm, 4.0 / res)
    zz = origin[2] + res * np.arange(icv.shape[2])
    zok = ((zz > -20) & (zz < 60))[None, None, :]
    cand = (par > 0.93) & (d_in > 22) & zok
    idx = np.argwhere(cand)
    if len(idx) < 10:
        cand = (par > 0.85) & (d_in > 15) & zok
        idx = np.argwhere(cand)
    centres = (np.asarray(origin) + res * idx).astype(np.float32)
    # lateral ventricles: deep CSF, left and right of the midline
    deep_csf = (csf > 0.6) & (d_in > 25)
    xs = origin[0] + res * np.arange(icv.shape[0])
    vc = []
    for sgn in (-1, 1):
        m = deep_csf & ((sgn * xs) > 2)[:, None, None]
        if m.any():
            vc.append(np.asarray(origin) + res * np.argwhere(m).mean(axis=0))
        else:
            vc.append(np.array([sgn * 15.0, -10.0, 15.0]))
    pad = STACK_PAD
    padded_shape = tuple(n + 2 * pad for n in sdf.shape)
    inner = (slice(pad, -pad),) * 3
    sdf_padded = np.full(padded_shape, SDF_OUTSIDE, dtype=np.float32)
    sdf_padded[inner] = sdf
    stack = np.zeros((*padded_shape, 3), dtype=np.float32)
    stack[(*inner, 0)] = gm
    stack[(*inner, 1)] = wm
    stack[(*inner, 2)] = csf_near
    return HeadTemplates(
        sdf_padded=sdf_padded,
        stack=stack,
        sdf=sdf,
        gm=gm,
        wm=wm,
        csf_near=csf_near.astype(np.float32),
        origin=origin,
        res=res,
        haem_centres=centres,
        ventricle_centres=np.asarray(vc, dtype=np.float32),
        source=source,
    )


def _real_head(res: float) -> HeadTemplates | None:
    paths = [
        nilearn_template(f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz") for k in ("t1", "gm", "wm")
    ]
    if any(p is None for p in paths):
        return None
    import nibabel as nib

    try:
        imgs: list[Any] = [nib.load(str(p)) for p in paths]
        t1, gm, wm = (np.asarray(im.dataobj, dtype=np.float32) / 255.0 for im in imgs)
    except Exception:  # damaged file: fall back
        return None
    affine = imgs[0].affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        return None  # the templates are 1 mm RAS; anything else is not what we expect
    # intracranial volume: the template's brain (skull-stripped T1), closed and filled,
    # plus a 1.5 mm layer of subarachnoid CSF
    brain = t1 > 0.04
    brain = ndimage.binary_closing(brain, structure=np.ones((3, 3, 3)), iterations=2)
    brain = ndimage.binary_fill_holes(brain)
    icv1 = ndimage.binary_dilation(brain, iterations=1).astype(np.float32)
    icv1 = ndimage.gaussian_filter(icv1, 0.6)
    f = max(1, round(res))
    icv = _block_mean(icv1, f)
    # close the basal cisterns, fissures and sulci (all intracranial CSF) with a ~6 mm ball
    r = max(1, round(6.0 / f))
    zz, yy, xx = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    ball = (zz**2 + yy**2 + xx**2) <= r * r
    padded = np.pad(icv > 0.5, r + 1)
    closed = ndimage.binary_closing(padded, structure=ball)[r + 1 : -r - 1, r + 1 : -r - 1, r + 1 : -r - 1]
    closed = ndimage.binary_fill_holes(closed)
    for k in range(closed.shape[2]):  # cisterns open inferiorly: fill each axial slice
        closed[:, :, k] = ndimage.binary_fill_holes(closed[:, :, k])
    icv = np.maximum(icv, ndimage.gaussian_filter(closed.astype(np.float32), 0.5))
    gmr = _block_mean(gm, f)
    wmr = _block_mean(wm, f)
    off = 0.5 * (f - 1)
    origin = (
        float(affine[0, 3] + off),
        float(affine[1, 3] + off),
        float(affine[2, 3] + off),
    )
    return _finish_templates(icv, gmr, wmr, origin, float(f), "nilearn MNI152 2009a")


def _procedural_head(res: float) -> HeadTemplates:
    """Ellipsoidal brain with a folded cortex, white matter and lateral ventricles."""
    rng = np.random.default_rng(0x4EAD)
    origin = (-96.0, -132.0, -70.0)
    shape = (int(192 / res) + 1, int(228 / res) + 1, int(184 / res) + 1)
    x = origin[0] + res * np.arange(shape[0])[:, None, None]
    y = origin[1] + res * np.arange(shape[1])[None, :, None]
    z = origin[2] + res * np.arange(shape[2])[None, None, :]
    cy, cz = -18.0, 12.0
    # cerebrum: ellipsoid; cerebellum: smaller ellipsoid postero-inferiorly
    r1 = np.sqrt((x / 68) ** 2 + ((y - cy) / 86) ** 2 + ((z - cz) / 66) ** 2)
    r2 = np.sqrt((x / 50) ** 2 + ((y + 62) / 30) ** 2 + ((z + 38) / 22) ** 2)
    fissure = np.exp(-((x / 2.0) ** 2)) * (z > -5)  # interhemispheric CSF
    icv = (np.minimum(r1, r2) < 1.0).astype(np.float32)
    depth = np.clip((1.0 - np.minimum(r1, r2)) * 60.0, 0, None)  # ~mm from the surface
    # sulcal folding: band-limited noise modulating the cortical ribbon
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3.0 / res)
    noise /= noise.std()
    sulci = np.clip(1.0 - np.abs(noise) * 2.2, 0, 1) * (depth < 14)
    ribbon = np.clip(1.0 - np.abs(depth - 4.0) / 3.5, 0, 1)
    vent = np.zeros(shape, np.float32)
    for s in (-1, 1):
        rv = np.sqrt(((x - s * 12) / 7) ** 2 + ((y + 8) / 30) ** 2 + ((z - 16) / 12) ** 2)
        vent = np.maximum(vent, (rv < 1.0).astype(np.float32))
    par = icv * (1 - sulci) * (1 - vent) * (1 - fissure) * (depth > 1.5)
    gm = np.clip(par * np.maximum(ribbon, 0.0), 0, 1)
    wm = np.clip(par - gm, 0, 1) * (depth > 3)
    gm = gm + np.clip(par - gm - wm, 0, 1)
    icv = ndimage.gaussian_filter(icv, 0.6)
    return _finish_templates(icv, gm, wm, origin, res, "procedural")


@functools.lru_cache(maxsize=4)
def head_templates(res: float = 2.0, *, procedural: bool = False) -> HeadTemplates:
    """Head templates at ``res`` mm (real MNI152 when nilearn is installed)."""
    if not procedural:
        real = _real_head(res)
        if real is not None:
            return real
        warnings.warn(
            "nilearn's MNI152 templates were not found: head-CT phantoms use procedural "
            f"ellipsoid anatomy instead. For real anatomy: {NILEARN_INSTALL}",
            UserWarning,
            stacklevel=3,
        )
    return _procedural_head(res)
