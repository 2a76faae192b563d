"""Patch-map bundles for CT: two patch models, the map's calibration, and a scorer.

A patch bundle is an ordinary bundle (:mod:`flows.bundle`) whose M0/M1 are patch Glows
(the preset's ``shape`` is the patch, ``spacing`` the isotropic grid volumes are resampled
to) plus ``patchmap.json``: which map (likelihood or posterior ratio) the node uses, the
voxel threshold, the minimum component size and the patient-level size threshold T, all
chosen on a labelled validation set.

The scorer takes a volume in HU on its own grid, resamples it, computes the mask and the
map, binarises it, lists the lesions (sizes in cm³ from the model grid's voxel size,
centroids mapped back to the source grid) and returns the map resampled onto the source
grid for the overlay.

Training and calibration take their CT volumes as a :data:`VolumeSet`: any sequence of
(volume in HU, spacing) pairs. It is walked in order, one volume at a time, and only what is
derived from each (its patches, its model-grid copy) is kept, so a sequence that reads each
volume from disk when it is indexed (``triage.cli`` passes one) holds one full-size CT in
memory at a time.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from flows.build import BuildOptions, build_bundle
from flows.bundle import Bundle, BundleError, add_extra, load_bundle
from flows.lesions import Lesion, abnormal_size, choose_size_threshold, find_lesions, voxel_threshold
from flows.masks import body_mask, intracranial_mask, lung_mask
from flows.patchmap import (
    PatchScorer,
    glow_map_sources_scorer,
    glow_patch_scorer,
    patch_map,
    patch_maps,
    sample_patches,
    to_source_grid,
)
from flows.preprocess import Preprocessing, check_hounsfield, noise_sd, resample_to_spacing
from flows.presets import Preset

PATCHMAP_FILE = "patchmap.json"
MASKS: dict[str, Callable[[np.ndarray, tuple[float, float, float]], np.ndarray]] = {
    "lung": lung_mask, "intracranial": intracranial_mask, "body": body_mask}
DEFAULT_MASK = {"chestct": "lung", "bct": "intracranial"}
Spacing3 = tuple[float, float, float]
# (volume in HU, spacing in mm) per case; may read each case when it is indexed
VolumeSet = Sequence[tuple[np.ndarray, Spacing3]]


@dataclass
class MapCalibration:
    """How a patch bundle turns a volume into a decision."""

    source: str  # "likelihood" (-log p0) or "posterior" (log p1 - log p0), per voxel
    patch: int
    overlap: int
    mask: str  # "lung", "intracranial" or "none"
    voxel_threshold: float
    min_size_cm3: float
    size_threshold_cm3: float  # T: abnormal when the abnormal volume exceeds it
    per_voxel: bool = False  # each patch contributes its per-voxel decomposition, not one number
    min_mask_fraction: float = 0.1  # patches scored (and trained on) hold at least this much mask
    validation: dict[str, Any] = field(default_factory=dict)
    # abnormal volumes (cm³) of the validation set's normal volumes: the reference a new
    # volume's percentile is read against (empty in bundles calibrated before it existed)
    reference_cm3: list[float] = field(default_factory=list)
    # what M1 was trained on: "mixture" (the mixture's patches under ``mask``: the posterior
    # ratio) or "body" (the mixture's patches anywhere in the body: a general-domain reference)
    reference: str = "mixture"
    # domain_stats of the validation volumes, sorted per statistic (empty in older bundles):
    # the range a volume is checked against (outside_domain)
    domain: dict[str, list[float]] = field(default_factory=dict)
    noise_floor: bool = False  # the bundle tops noise up: a quiet scan is not outside its domain

    def outside_domain(self, stats: dict[str, float]) -> list[str]:
        """Why a volume with ``stats`` lies outside the validation volumes' range (empty: inside,
        or a bundle calibrated before this was recorded)."""
        out = []
        for k, v in stats.items():
            ref = self.domain.get(k)
            if not ref or not np.isfinite(v):
                continue
            lo, hi = ref[0] / DOMAIN_MARGIN, ref[-1] * DOMAIN_MARGIN
            # too little of the map above threshold is a clean scan, and a quiet one is topped up
            low_ok = k.startswith("above:") or (k == "noise_hu" and self.noise_floor)
            if v > hi or (v < lo and not low_ok):
                out.append(f"{k} {v:.3g} outside the validation volumes' {ref[0]:.3g}-{ref[-1]:.3g}")
        return out

    @property
    def name(self) -> str:
        return f"{self.source}{':voxel' if self.per_voxel else ''}"

    def percentile(self, abnormal_cm3: float) -> float | None:
        """Where an abnormal volume falls among the validation normals' (0-100), so that map
        results rank against each other and beside whole-image results; None without a
        reference. Ties take the mid-rank: most normals have an abnormal volume of exactly
        0 cm³, and a new 0 cm³ volume is in the middle of them, not above them all."""
        if not self.reference_cm3:
            return None
        from scipy.stats import percentileofscore

        return float(percentileofscore(self.reference_cm3, abnormal_cm3, kind="mean"))


@dataclass
class MapResult:
    """One volume's map and what was read off it."""

    values: np.ndarray  # the map on the source grid (NaN outside the mask)
    lesions: list[Lesion]  # sizes in cm³, centroids in source-grid indices and mm
    abnormal_cm3: float
    abnormal: bool
    peak: float
    source: str
    percentile: float | None = None  # of abnormal_cm3 among the validation normals'
    domain: dict[str, Any] = field(default_factory=dict)  # domain_stats and "outside" (reasons)


def _prepared(bundle_or_preset: Bundle | Preset, volume_hu: np.ndarray,
              spacing: tuple[float, float, float], mask: str) -> tuple[np.ndarray, np.ndarray | None, float]:
    """The volume on the model grid as the patch model reads it, its mask there, the grid's mm."""
    prep = bundle_or_preset.preprocessing
    grid, m = _on_grid(bundle_or_preset, volume_hu, spacing, mask)
    return prep.intensities(grid, m), m, float(prep.spacing)  # type: ignore[arg-type]


def _on_grid(bundle_or_preset: Bundle | Preset, volume_hu: np.ndarray,
             spacing: tuple[float, float, float], mask: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The volume in HU on the model grid and its mask, checked: HU, and at least half a patch."""
    prep = bundle_or_preset.preprocessing
    if prep.spacing is None:
        raise BundleError(f"{prep.kind}: preprocessing has no spacing; not a patch model")
    if prep.intensity == "window":
        check_hounsfield(volume_hu, prep.kind)
    grid, m = _grid(prep.spacing, volume_hu, spacing, mask)
    covers = np.asarray(grid.shape, dtype=float) * prep.spacing
    need = 0.5 * np.asarray(prep.shape, dtype=float) * prep.spacing
    if np.any(covers < need):  # mostly padding in every patch: nothing the model can read
        raise ValueError(f"{prep.kind}: the volume covers {' x '.join(f'{c:.0f}' for c in covers)} mm; "
                         f"a patch model needs at least half a patch ({need[0]:.0f} mm) along every "
                         "axis (a single slice, a localizer or a cropped fragment is not a study)")
    return grid, m


def _above(values: np.ndarray, threshold: float) -> float:
    """The share of a map's scored voxels above its voxel threshold. A focal finding keeps it at
    a few percent; a scan unlike any the models were calibrated on (another kernel, slice
    thickness or scanner) lifts the whole map, and with it this share."""
    finite = values[np.isfinite(values)]
    return float((finite > threshold).mean()) if finite.size else float("nan")


DOMAIN_MARGIN = 1.25
"""A volume is outside a bundle's domain when a statistic lies beyond the validation volumes'
range widened by this factor (below min / margin or above max × margin)."""


def domain_stats(grid_hu: np.ndarray, mask: np.ndarray | None, prep: Preprocessing) -> dict[str, float]:
    """What a density model is most sensitive to besides anatomy, measured on the model grid
    before any noise harmonisation: the scan's noise (HU, inside the mask; kernel and dose) and
    the mask's volume (cm³, 0 when none is found; coverage, and a header whose voxel size is
    wrong). The share of the map above its threshold is added where the map is made
    (``above:<map>``)."""
    assert prep.spacing is not None
    return {"noise_hu": float(noise_sd(grid_hu, prep.window, mask)),
            "mask_cm3": float(mask.sum()) * prep.spacing ** 3 / 1000.0 if mask is not None else 0.0}


_T = TypeVar("_T")


def _volume_name(vols: VolumeSet, i: int, what: str) -> str:
    """``what`` volume i of n, and where it came from when the set can say (``describe(i)``, as
    triage.labelled.Volumes does: its file or DICOM series)."""
    where = f"{what} volume {i + 1} of {len(vols)}"
    describe = getattr(vols, "describe", None)
    return f"{where} ({describe(i)})" if describe is not None else where


def _in_context(where: str, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)``, a ValueError saying which volume of a set it was about."""
    try:
        return fn(*args)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _grid(iso: float, volume_hu: np.ndarray, spacing: tuple[float, float, float], mask: str
          ) -> tuple[np.ndarray, np.ndarray | None]:
    """The volume in HU on the isotropic model grid, and its mask there (None: no mask)."""
    vol = np.asarray(volume_hu, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"a patch map needs a 3D volume, got shape {vol.shape}")
    if not np.isfinite(vol).all():
        raise ValueError(f"volume holds {int((~np.isfinite(vol)).sum())} NaN/inf voxel(s)")
    grid = resample_to_spacing(vol, spacing, iso)
    m = MASKS[mask](grid, (iso,) * 3) if mask != "none" else None
    if m is not None and not m.any():
        m = None  # documented fallback: no mask found, score the whole volume
    return grid, m


def choose_noise_floor(volumes: Iterable[tuple[np.ndarray, Spacing3]], prep: Preprocessing,
                       mask: str, percentile: float = 95.0, margin: float = 1.2) -> float:
    """The noise floor (HU on the model grid) for :func:`flows.preprocess.harmonise_noise`:
    ``margin`` times the ``percentile`` of the training volumes' own noise, so that nearly
    every scan is topped up to one level while one unusually noisy scan cannot set it."""
    assert prep.spacing is not None
    est = []
    for v, sp in volumes:
        grid, m = _grid(prep.spacing, v, sp, mask)
        est.append(noise_sd(grid, prep.window, m))
    ok = np.asarray([e for e in est if np.isfinite(e)])
    if ok.size == 0:
        raise ValueError("no training volume has enough unclipped tissue to measure its noise")
    return round(float(margin * np.percentile(ok, percentile)), 3)


def _maps(bundle: Bundle, prepared: Sequence[tuple[np.ndarray, np.ndarray | None]], source: str,
          patch: int, overlap: int, per_voxel: bool = False,
          min_mask_fraction: float = 0.1, scorer: PatchScorer | None = None) -> list[np.ndarray]:
    """Maps of volumes already resampled, windowed and masked (:func:`_prepared`)."""
    scorer = scorer or glow_patch_scorer(bundle.m0, bundle.m1 if source == "posterior" else None,
                                         bundle.preprocessing.n_bits, per_voxel=per_voxel)
    # batches go where the models are (a GPU worker loads its bundles on the GPU)
    device = next(bundle.m0.parameters()).device
    return [patch_map(grid01, scorer, patch=patch, overlap=overlap, mask=m,
                      min_mask_fraction=min_mask_fraction, batch_size=64, device=device).values
            for grid01, m in prepared]


def _sizes(maps: list[np.ndarray], thr: float, spacing: float, min_size: float) -> np.ndarray:
    return np.array([abnormal_size(find_lesions(m, thr, (spacing,) * 3, min_size=min_size))
                     for m in maps])


def _validation_labels(validation: tuple[VolumeSet, np.ndarray]) -> np.ndarray:
    """The labels as booleans, once they are known to fit the volumes and hold both classes."""
    y = np.asarray(validation[1]).astype(bool)
    if y.all() or not y.any():
        raise ValueError("the validation set needs normal and abnormal volumes")
    if len(validation[0]) != len(y):
        raise ValueError(f"the validation set has {len(validation[0])} volumes and {len(y)} labels")
    return y


def build_patch_bundle(out: str | Path, *, preset: Preset, normal: VolumeSet, mixture: VolumeSet,
                       validation: tuple[VolumeSet, np.ndarray],
                       name: str, version: str = "1", options: BuildOptions | None = None,
                       patches_per_volume: int = 64, overlap: int | None = None,
                       mask: str | None = None, min_mask_fraction: float = 0.1,
                       voxel_percentile: float = 99.0, min_size_cm3: float = 0.2,
                       reference: str = "mixture",
                       log: Callable[[str], None] = print) -> Bundle:
    """Train M0/M1 patch models on mask-guided patches, then :func:`calibrate_patch_bundle`.
    Each training volume is read once for its patches (twice when the preset sets the noise
    floor from the data) and dropped.

    ``reference="body"`` trains M1 on the mixture's patches from anywhere in the body rather
    than under ``mask``: a general-domain model in the sense of Schirrmeister et al. (2020).
    Its ratio to M0 cancels what makes any patch likely to any flow (smoothness, noise
    level) and keeps what makes it unlike the organ M0 knows (soft tissue where lung
    should be), without needing abnormal cases in the mixture.
    """
    prep = preset.preprocessing
    if prep.spacing is None or len(prep.shape) != 3 or len(set(prep.shape)) != 1:
        raise ValueError(f"preset {preset.name} is not a cubic 3D patch preset with a spacing")
    mask = mask or DEFAULT_MASK.get(prep.kind, "none")
    if mask not in (*MASKS, "none"):
        raise ValueError(f"unknown mask {mask!r}; use lung, intracranial, body or none")
    if reference not in ("mixture", "body"):
        raise ValueError(f"unknown reference {reference!r}; use mixture or body")
    _validation_labels(validation)  # before any training
    for what, vols in (("normal", normal), ("mixture", mixture)):
        if len(vols) == 0:
            raise ValueError(f"no {what} training volumes")
    patch = prep.shape[0]
    overlap = patch // 2 if overlap is None else overlap
    rng = np.random.default_rng((options or BuildOptions()).seed)
    if preset.noise_floor_percentile and prep.noise_floor is None:
        floor = choose_noise_floor(itertools.chain(normal, mixture), prep, mask,
                                   preset.noise_floor_percentile)
        prep = replace(prep, noise_floor=floor)
        preset = replace(preset, preprocessing=prep)
        log(f"noise floor {floor} HU ({preset.noise_floor_percentile:g}th percentile of the "
            "training volumes' noise × 1.2): every volume is topped up to it")

    def patches(what: str, vols: VolumeSet, where: str, fraction: float) -> np.ndarray:
        got = []
        for i, (v, sp) in enumerate(vols):  # one volume in memory at a time: only its patches are kept
            where_i = _volume_name(vols, i, what)
            grid01, m, _ = _in_context(where_i, _prepared, preset, v, sp, where)
            got.append(sample_patches(grid01[None], m[None] if m is not None else None, patch,
                                      patches_per_volume, rng, min_mask_fraction=fraction))
        return np.concatenate(got)

    pn = patches("normal", normal, mask, min_mask_fraction)
    pm = (patches("mixture", mixture, mask, min_mask_fraction) if reference == "mixture"
          else patches("mixture", mixture, "body", 0.5))
    log(f"{len(pn)} normal and {len(pm)} mixture patches ({reference}) of {patch}³ at "
        f"{prep.spacing} mm, from {len(normal)} normal and {len(mixture)} mixture volumes")
    opts = replace(options or BuildOptions(), map_scores=False)
    b = build_bundle(out, preset=preset, normal=pn, mixture=pm, name=name, version=version,
                     options=opts, log=log)
    return calibrate_patch_bundle(b, validation, overlap=overlap, mask=mask,
                                  min_mask_fraction=min_mask_fraction,
                                  voxel_percentile=voxel_percentile, min_size_cm3=min_size_cm3,
                                  reference=reference, log=log)


def calibrate_patch_bundle(b: Bundle, validation: tuple[VolumeSet, np.ndarray],
                           *, overlap: int | None = None, mask: str | None = None,
                           min_mask_fraction: float = 0.1, voxel_percentile: float = 99.0,
                           min_size_cm3: float = 0.2, reference: str | None = None,
                           log: Callable[[str], None] = print) -> Bundle:
    """(Re)calibrate a patch bundle's map on a labelled validation set; rewrites the bundle.

    Four maps are evaluated (likelihood or posterior ratio, per patch or per voxel), each with
    its voxel threshold (a percentile of the map on validation normals), T (validation ROC over
    0.5-20 cm³) and the AUROC of its abnormal volume. The posterior ratio per patch is
    recorded unless another map's AUROC gain over it has a simultaneous lower bound above 0
    (:func:`flows.evaluate.auc_gain_lower_bounds`); every map's figures are kept beside it.
    """
    from flows.evaluate import auc_rank, better_than_default

    prep = b.preprocessing
    if prep.spacing is None:
        raise BundleError(f"{b.path}: not a patch bundle (its preprocessing has no spacing)")
    patch = prep.shape[0]
    overlap = patch // 2 if overlap is None else overlap
    mask = mask or DEFAULT_MASK.get(prep.kind, "none")
    if reference is None:  # recalibration keeps what M1 was trained on
        reference = (map_calibration(b).reference if b.extra(PATCHMAP_FILE) is not None
                     else "mixture")
    vols, y = validation[0], _validation_labels(validation)
    # all four maps of a volume from one pass of the pair (flows.patchmap.patch_maps), as each
    # volume is read; only the maps are kept, as float32
    scorer = glow_map_sources_scorer(b.m0, b.m1, prep.n_bits)
    device = next(b.m0.parameters()).device
    maps_of: dict[str, list[np.ndarray]] = {}
    domain: dict[str, list[float]] = {}
    for i, (v, sp) in enumerate(vols):
        grid, m = _in_context(_volume_name(vols, i, "validation"), _on_grid, b, v, sp, mask)
        for k, x in domain_stats(grid, m, prep).items():
            domain.setdefault(k, []).append(x)
        grid01 = prep.intensities(grid, m)
        for name, pm in patch_maps(grid01, scorer, patch=patch, overlap=overlap, mask=m,
                                   min_mask_fraction=min_mask_fraction, batch_size=64,
                                   device=device).items():
            maps_of.setdefault(name, []).append(pm.values.astype(np.float32))
    cals: dict[str, MapCalibration] = {}
    sizes_of: dict[str, np.ndarray] = {}
    report: dict[str, Any] = {}
    for source, per_voxel in (("likelihood", False), ("posterior", False),
                              ("likelihood", True), ("posterior", True)):
        maps = maps_of[f"{source}:voxel" if per_voxel else source]
        thr = voxel_threshold([m for m, lab in zip(maps, y, strict=True) if not lab], voxel_percentile)
        domain[f"above:{source}{':voxel' if per_voxel else ''}"] = [_above(m, thr) for m in maps]
        sizes = _sizes(maps, thr, prep.spacing, min_size_cm3)
        t = choose_size_threshold(sizes, y)
        auc = auc_rank(y, sizes)
        ref = sorted(float(v) for v, lab in zip(sizes, y, strict=True) if not lab)
        cal = MapCalibration(source=source, patch=patch, overlap=overlap, mask=mask,
                             voxel_threshold=thr, min_size_cm3=min_size_cm3, size_threshold_cm3=t,
                             per_voxel=per_voxel, min_mask_fraction=min_mask_fraction,
                             reference=reference, reference_cm3=ref, noise_floor=bool(prep.noise_floor))
        cals[cal.name], sizes_of[cal.name] = cal, sizes
        report[cal.name] = {"auroc_volume": round(auc, 4), "voxel_threshold": thr, "T_cm3": t,
                            "reference_cm3": ref}
        log(f"validation: {cal.name} map, abnormal-volume AUROC {auc:.3f}, T {t:.2f} cm³")
    # The method's map (the posterior ratio per patch) unless another beats it beyond what
    # choosing among three gives by chance (docs/decisions.md, session 14).
    default = "posterior"
    pick, bounds = better_than_default(y, sizes_of[default],
                                       {k: v for k, v in sizes_of.items() if k != default})
    for k, (_, lower) in bounds.items():
        report[k]["gain_lower_bound"] = round(lower, 4)
    chosen = replace(cals[pick or default], validation=report,
                     domain={k: sorted(x for x in xs if np.isfinite(x)) for k, xs in domain.items()})
    add_extra(b.path, PATCHMAP_FILE, json.dumps(asdict(chosen), indent=2).encode())
    log(f"patch bundle written to {b.path}: {chosen.name} map, T {chosen.size_threshold_cm3:.2f} cm³")
    return load_bundle(b.path, device=next(b.m0.parameters()).device)


def map_calibration(bundle: Bundle) -> MapCalibration:
    raw = bundle.extra(PATCHMAP_FILE)
    if raw is None:
        raise BundleError(f"{bundle.path}: no patch models ({PATCHMAP_FILE} missing); this "
                          "bundle scores whole images only")
    known = {f.name for f in fields(MapCalibration)}
    # keys a newer version added are ignored, so a bundle re-calibrated later still loads here
    return MapCalibration(**{k: v for k, v in json.loads(raw).items() if k in known})


class PatchMapScorer:
    """Scores CT volumes with a patch bundle."""

    def __init__(self, bundle: Bundle, source: str | None = None) -> None:
        """``source`` overrides the bundle's choice of map (to compare both maps), with the
        voxel threshold and T calibrated for that map on the same validation set."""
        self.bundle = bundle
        self.cal = map_calibration(bundle)
        if source is not None and source != self.cal.name:
            v = self.cal.validation.get(source)
            if v is None:
                raise BundleError(f"{bundle.path}: no calibration for the {source!r} map")
            self.cal = replace(self.cal, source=source.split(":")[0],
                               per_voxel=source.endswith(":voxel"),
                               voxel_threshold=float(v["voxel_threshold"]),
                               size_threshold_cm3=float(v["T_cm3"]),
                               reference_cm3=list(v.get("reference_cm3", [])))
        c = self.cal
        # one scorer for every volume this scorer maps, so its trace is made once
        self._scorer = glow_patch_scorer(bundle.m0, bundle.m1 if c.source == "posterior" else None,
                                         bundle.preprocessing.n_bits, per_voxel=c.per_voxel)
        self._all: PatchScorer | None = None  # both sources per voxel (score_all), when asked

    def score(self, volume_hu: np.ndarray, spacing: tuple[float, float, float],
              affine: np.ndarray | None = None) -> MapResult:
        """``affine`` maps source-grid indices to patient mm (for lesion centroids)."""
        c = self.cal
        grid, m = _on_grid(self.bundle, volume_hu, spacing, c.mask)
        stats = domain_stats(grid, m, self.bundle.preprocessing)
        vals = _maps(self.bundle, [(self.bundle.preprocessing.intensities(grid, m), m)], c.source,
                     c.patch, c.overlap, c.per_voxel, c.min_mask_fraction, self._scorer)[0]
        return self._result(vals, volume_hu, spacing, affine, stats)

    def score_all(self, volume_hu: np.ndarray, spacing: tuple[float, float, float],
                  affine: np.ndarray | None = None) -> tuple[MapResult, dict[str, float]]:
        """:meth:`score`'s result and, from the same single pass of M0 and M1
        (:func:`flows.patchmap.patch_maps`), the abnormal volume (cm³) of every map the bundle
        was calibrated with, each at its own voxel threshold: the maps side by side."""
        c = self.cal
        iso = self.bundle.preprocessing.spacing
        assert iso is not None
        if self._all is None:
            self._all = glow_map_sources_scorer(self.bundle.m0, self.bundle.m1,
                                                self.bundle.preprocessing.n_bits)
        grid, m = _on_grid(self.bundle, volume_hu, spacing, c.mask)
        stats = domain_stats(grid, m, self.bundle.preprocessing)
        grid01 = self.bundle.preprocessing.intensities(grid, m)
        maps = patch_maps(grid01, self._all, patch=c.patch, overlap=c.overlap, mask=m,
                          min_mask_fraction=c.min_mask_fraction, batch_size=64,
                          device=next(self.bundle.m0.parameters()).device)
        sizes = {name: abnormal_size(find_lesions(maps[name].values, float(v["voxel_threshold"]),
                                                  (iso,) * 3, min_size=c.min_size_cm3))
                 for name, v in c.validation.items() if name in maps}
        return self._result(maps[c.name].values, volume_hu, spacing, affine, stats), sizes

    def _result(self, vals: np.ndarray, volume_hu: np.ndarray, spacing: tuple[float, float, float],
                affine: np.ndarray | None, stats: dict[str, float]) -> MapResult:
        """Lesions, abnormal volume and decision from a map on the model grid; the map and the
        lesions moved onto the source grid."""
        c = self.cal
        iso = self.bundle.preprocessing.spacing
        assert iso is not None
        les = find_lesions(vals, c.voxel_threshold, (iso,) * 3, min_size=c.min_size_cm3)
        src = to_source_grid(vals, tuple(np.asarray(volume_hu).shape))
        # centroids and boxes on the source grid: model voxel i covers source (i + 0.5) * f - 0.5
        f = np.array(src.shape, dtype=float) / np.array(vals.shape, dtype=float)
        moved = []
        for le in les:
            ci = (np.array(le.centroid_index) + 0.5) * f - 0.5
            mm = ((np.asarray(affine, dtype=float) @ np.append(ci, 1.0))[:3] if affine is not None
                  else ci * np.asarray(spacing, dtype=float))
            box = tuple((int(np.floor(a * fk)), int(np.ceil(b * fk)))
                        for (a, b), fk in zip(le.bbox, f, strict=True))
            moved.append(replace(le, centroid_index=tuple(map(float, ci)),
                                 centroid_mm=tuple(map(float, mm)), bbox=box))
        size = abnormal_size(moved)
        stats = {**stats, f"above:{c.name}": _above(vals, c.voxel_threshold)}
        finite = vals[np.isfinite(vals)]
        return MapResult(values=src, lesions=moved, abnormal_cm3=size,
                         abnormal=size > c.size_threshold_cm3,
                         peak=float(finite.max()) if finite.size else float("nan"), source=c.source,
                         percentile=c.percentile(size),
                         domain={**stats, "outside": c.outside_domain(stats)})
