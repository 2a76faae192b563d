"""One complete series -> scores, a map and a lesion list (the work of a Job).

The models are bundles named per kind in the configuration (``models.cxr``, ``models.bct``,
``models.chestct``, optionally ``models.bct_patch``). :class:`Models` loads each one once
per process, lazily, on the first series that needs it, so a Celery prefork worker
never touches CUDA before it forks.

* ``cxr`` and ``bct``: the two-model posterior of the whole image (the bundle's chosen
  score), with the per-position posterior-ratio map resampled onto the source grid;
  head CT also gets the patch map when ``models.bct_patch`` is set.
* ``chestct``: the CT-3DFlow patch map when the bundle holds patch models (abnormal
  volume, lesions, decision at T cm³), else the whole-volume posterior.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import OrientationError

from flows.bundle import Bundle, BundleError, load_bundle
from flows.errors import ScoringError
from flows.patchbundle import PATCHMAP_FILE, PatchMapScorer
from flows.patchmap import to_source_grid
from flows.posterior import PosteriorScorer
from triage.config import ModelSettings, RankSettings
from triage.imaging import ImagingError, Series, read_series
from triage.orientation import canonical_volume, volume_affine
from triage.rank import priority

__all__ = ["Analysis", "AnalysisError", "Models", "analyse_series", "to_stored_grid", "volume_affine"]


POSTERIOR_MAP_Z = 3.0
"""Binary overlay of a standardised posterior map: positions this many robust SDs above the
mixture's median map (bundles without a map reference get no binary overlay)."""


class AnalysisError(RuntimeError):
    """The series cannot be analysed; ``permanent`` failures are not retried."""

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass
class Analysis:
    kind: str
    bundle: Bundle
    method: str
    score: float
    abnormal: bool
    priority: int
    log_posterior: float | None = None
    log_p_normal: float | None = None
    percentile: float | None = None
    abnormal_cm3: float | None = None
    lesions: list[dict[str, Any]] = field(default_factory=list)
    # On the stored pixel grid (radiographs: as stored, not display-flipped; volumes: slices in
    # details["slice_order"]), higher = more abnormal.
    map: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Models:
    """Bundles per kind, loaded once per process on first use."""

    def __init__(self, cfg: ModelSettings) -> None:
        self.cfg = cfg
        self._cache: dict[str, Bundle] = {}
        self._scorers: dict[str, PatchMapScorer] = {}
        self._lock = threading.Lock()

    def path(self, name: str) -> Path | None:
        return getattr(self.cfg, name, None)

    def get(self, name: str) -> Bundle:
        with self._lock:
            if name in self._cache:
                return self._cache[name]
            path = self.path(name)
            if path is None:
                raise AnalysisError(f"no model bundle configured for {name!r} "
                                    f"(set models.{name} or TRIAGE_MODELS__{name.upper()})")
            try:
                b = load_bundle(path, device=_device(self.cfg.device))
            except (BundleError, OSError) as exc:
                raise AnalysisError(f"model bundle for {name!r} cannot be loaded: {exc}") from exc
            self._cache[name] = b
            return b

    def patch_scorer(self, name: str) -> PatchMapScorer:
        """The patch bundle's scorer, kept with the bundle (its traced model is made once)."""
        bundle = self.get(name)
        with self._lock:
            if name not in self._scorers:
                self._scorers[name] = PatchMapScorer(bundle)
            return self._scorers[name]

    def loaded(self) -> dict[str, str]:
        with self._lock:
            return {k: f"{b.name} {b.version}" for k, b in self._cache.items()}


def _posterior(kind: str, bundle: Bundle, s: Series, levels: RankSettings | None) -> Analysis:
    scorer = PosteriorScorer(bundle, batch_size=1)
    try:
        images, (box,) = bundle.preprocessing.apply_with_boxes(s.array[None])
    except ValueError as exc:
        raise AnalysisError(f"preprocessing failed: {exc}") from exc
    sc, maps = scorer.score_maps(images)
    # the model saw only the preprocessing's crop box: its map goes there, the rest is unscored
    source_map = np.full(s.array.shape, np.nan, dtype=np.float32)
    source_map[box] = to_source_grid(maps[0], tuple(source_map[box].shape))
    pct = float(sc.percentile[0])
    abnormal = bool(sc.abnormal[0])
    return Analysis(kind=kind, bundle=bundle, method=sc.method, score=float(sc.score[0]),
                    abnormal=abnormal, priority=priority(abnormal=abnormal, percentile=pct, levels=levels),
                    log_posterior=float(sc.log_posterior[0]), log_p_normal=float(sc.log_p_normal[0]),
                    percentile=pct, map=source_map,
                    details={"threshold": bundle.calibration.threshold,
                             # the map is standardised per position when the bundle has a map
                             # reference: 3 robust SDs above the mixture marks "abnormal"
                             "map_threshold": POSTERIOR_MAP_Z if bundle.map_reference is not None else None})


def _patch_map(kind: str, scorer: PatchMapScorer, s: Series, levels: RankSettings | None) -> Analysis:
    if not s.is_volume:
        raise AnalysisError(f"{kind}: a patch bundle needs a volume")
    bundle = scorer.bundle
    res = scorer.score(s.array, (float(s.spacing[0]), float(s.spacing[1]), float(s.spacing[2])),
                       volume_affine(s))
    cal = scorer.cal
    lesions = [{"volume_cm3": float(le.size), "centroid_mm": [float(v) for v in le.centroid_mm],
                "centroid_index": [float(v) for v in le.centroid_index], "peak": float(le.peak),
                "bbox": [list(map(int, b)) for b in le.bbox]} for le in res.lesions]
    return Analysis(kind=kind, bundle=bundle, method=f"patch map ({cal.name})",
                    score=float(res.abnormal_cm3),
                    abnormal=bool(res.abnormal),
                    priority=priority(abnormal=bool(res.abnormal), abnormal_cm3=res.abnormal_cm3,
                                      threshold_cm3=cal.size_threshold_cm3, levels=levels),
                    # orders map results within a level; the level itself comes from the volume
                    percentile=res.percentile,
                    abnormal_cm3=float(res.abnormal_cm3), lesions=lesions,
                    map=np.asarray(res.values, dtype=np.float32),
                    details={"T_cm3": cal.size_threshold_cm3, "voxel_threshold": cal.voxel_threshold,
                             "map_threshold": cal.voxel_threshold, "peak": res.peak,
                             # outside the validation volumes' noise or coverage: read with care
                             "domain": res.domain})


def to_stored_grid(values: np.ndarray, ops: Sequence[str]) -> np.ndarray:
    """Undo :mod:`triage.imaging`'s display-orientation flips, so a radiograph's map lies on
    the pixel grid of the stored image (where its SEG must go)."""
    out = values
    for op in reversed(list(ops)):
        if op == "flip_rows":
            out = out[::-1, :]
        elif op == "flip_columns":
            out = out[:, ::-1]
        elif op == "transpose":
            out = out.T
        else:
            raise AnalysisError(f"unknown orientation operation {op!r}")
    return np.ascontiguousarray(out)


def _is_patch_bundle(b: Bundle) -> bool:
    return b.extra(PATCHMAP_FILE) is not None


def analyse_series(files: Sequence[Path], kind: str, models: Models,
                   levels: RankSettings | None = None) -> Analysis:
    """Read the series, score it with the kind's bundle(s); raises :class:`AnalysisError`."""
    t0 = time.perf_counter()
    try:
        s = read_series(files)
    except ImagingError as exc:
        raise AnalysisError(f"cannot read the series: {exc}") from exc
    t_read = time.perf_counter() - t0
    if kind == "cxr" and s.is_volume:
        raise AnalysisError("routed as a radiograph but the series is a volume")
    if kind in ("bct", "chestct") and not s.is_volume:
        raise AnalysisError(f"routed as {kind} but the series is a single projection image")
    bundle = models.get(kind)
    t1 = time.perf_counter()
    stored = s
    try:
        s, back = canonical_volume(s)  # the models' axis order; maps go back to the stored one
        out = (_patch_map(kind, models.patch_scorer(kind), s, levels) if _is_patch_bundle(bundle)
               else _posterior(kind, bundle, s, levels))
        if kind == "bct" and models.path("bct_patch") is not None:
            extra = _patch_map(kind, models.patch_scorer("bct_patch"), s, levels)
            # the map, its threshold and lesions come from the patch bundle; the decision and
            # the level are the more urgent of the two
            out.abnormal_cm3, out.lesions, out.map = extra.abnormal_cm3, extra.lesions, extra.map
            out.details.update({k: extra.details[k] for k in ("map_threshold", "T_cm3", "voxel_threshold",
                                                              "domain")})
            out.abnormal = out.abnormal or extra.abnormal
            out.priority = min(out.priority, extra.priority)
            out.details["patch_bundle"] = f"{extra.bundle.name} {extra.bundle.version}"
        if back is not None:
            out.map = back.values(out.map) if out.map is not None else None
            for le in out.lesions or []:
                le["centroid_index"], le["bbox"] = back.index(le["centroid_index"]), back.box(le["bbox"])
            out.details["reoriented_from"] = s.meta["reoriented_from"]
    # PatchMapError is a ValueError
    except (ValueError, OrientationError, np.linalg.LinAlgError, BundleError, ScoringError) as exc:
        raise AnalysisError(f"scoring failed: {exc}") from exc
    s = stored
    if out.map is not None and s.meta.get("orientation_ops"):
        out.map = to_stored_grid(out.map, s.meta["orientation_ops"])
    out.details.update({
        # the map's slice k belongs to instance slice_order[k] (volumes: sorted along the normal)
        "slice_order": list(s.sop_instance_uids),
        "timings_s": {"read": round(t_read, 4), "score": round(time.perf_counter() - t1, 4)},
        "shape": list(s.array.shape), "spacing_mm": [float(v) for v in s.spacing],
        "modality": s.modality, "instances": len(s.sop_instance_uids),
    })
    return out
