"""Single-pass Log P maps and map-based abnormality scores.

A Glow's log p(x) decomposes exactly over input positions (:meth:`flows.glow.Glow.log_p_map`),
so one forward pass gives a likelihood map, and the two models of a bundle give a
posterior-ratio map ``log p1 - log p0`` per position (higher = more abnormal there). A
whole-image score averages a small finding away among all the pixels; a score read off the
map (the mean of its most abnormal positions) does not.

Maps are standardised per position against a reference set of the same kind (the mixture
the bundle was calibrated on): radiographs and head CTs are roughly aligned, and "denser
than usual here" is what matters, not how dense the heart always is. The median and a
robust spread (MAD) per position are used, so the abnormal cases in the mixture, each
abnormal in a different place, barely move the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from flows.errors import ScoringError
from flows.glow import FlowModel
from flows.pair import ModelPair
from flows.quantize import dequantize

MAD_TO_SD = 1.4826


@torch.no_grad()
def log_p_maps(model: FlowModel, images01: np.ndarray, n_bits: int, *,
               batch_size: int = 32) -> np.ndarray:
    """Per-position log p(x) for preprocessed images ``(N, 1, *shape)`` in [0, 1].

    Returns ``(N, *shape)`` float64 maps; each sums to the image's log p(x).
    """
    model.eval()
    return _maps(lambda x: (model.log_p_map(x),), images01, n_bits, batch_size, _device(model))[0]


@torch.no_grad()
def pair_log_p_maps(m0: FlowModel, m1: FlowModel, images01: np.ndarray, n_bits: int, *,
                    batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """:func:`log_p_maps` of both models of a bundle, running their shared levels once
    (:class:`flows.pair.ModelPair`); the same maps as two separate calls."""
    m0.eval()
    m1.eval()
    pair = ModelPair(m0, m1)
    a, b = _maps(pair.log_p_maps, images01, n_bits, batch_size, _device(m0))
    return a, b


def _device(model: FlowModel) -> torch.device:
    return next(model.parameters()).device


def _maps(run: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], images01: np.ndarray, n_bits: int,
          batch_size: int, device: torch.device) -> list[np.ndarray]:
    outs: list[np.ndarray] = []
    for i in range(0, len(images01), batch_size):
        x01 = torch.from_numpy(np.ascontiguousarray(images01[i:i + batch_size], dtype=np.float32))
        maps = run(dequantize(x01, n_bits, noise=False).to(device))
        if not outs:
            outs = [np.empty((len(images01), *images01.shape[2:]), dtype=np.float64) for _ in maps]
        for out, m in zip(outs, maps, strict=True):
            out[i:i + len(x01)] = m.cpu().numpy()
    for out in outs:
        bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
        if bad.any():
            raise ScoringError(f"{int(bad.sum())} image(s) got a non-finite log-likelihood map "
                               f"(first index {int(np.argmax(bad))}); the model or input is broken")
    return outs


@dataclass(frozen=True)
class MapScore:
    """How a map becomes one number: smooth, standardise per position, mean of the top part."""

    source: str = "posterior"  # "posterior": log p1 - log p0; "likelihood": -log p0
    sigma: float = 1.0  # Gaussian smoothing in pixels/voxels before scoring (0: none)
    top_fraction: float = 0.05  # mean of this fraction of the most abnormal positions
    standardise: bool = True  # per-position median/MAD of the reference maps

    def __post_init__(self) -> None:
        if self.source not in ("posterior", "likelihood"):
            raise ValueError(f"map source must be 'posterior' or 'likelihood', not {self.source!r}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def abnormality_maps(lp0: np.ndarray, lp1: np.ndarray | None, source: str) -> np.ndarray:
    """Raw abnormality maps from per-position log-densities (higher = more abnormal)."""
    if source == "likelihood":
        return -lp0
    if lp1 is None:
        raise ValueError("a posterior map needs both models' maps")
    return lp1 - lp0


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of each map (not across the batch axis)."""
    if sigma <= 0:
        return maps
    return np.stack([gaussian_filter(m, sigma, mode="nearest") for m in maps])


@dataclass
class MapReference:
    """Per-position median and robust spread of reference abnormality maps."""

    median: np.ndarray
    spread: np.ndarray

    @classmethod
    def from_maps(cls, maps: np.ndarray) -> MapReference:
        if len(maps) < 2:
            raise ValueError("a map reference needs at least two maps")
        med = np.median(maps, axis=0)
        mad = np.median(np.abs(maps - med), axis=0) * MAD_TO_SD
        # Positions that never vary (collimated background, frozen shared levels) must not
        # blow up: floor the spread at a fraction of its typical value.
        floor = max(float(np.median(mad)) * 0.1, 1e-6)
        return cls(median=med, spread=np.maximum(mad, floor))

    def standardise(self, maps: np.ndarray) -> np.ndarray:
        if maps.shape[1:] != self.median.shape:
            raise ValueError(f"maps of shape {maps.shape[1:]} do not match the reference "
                             f"{self.median.shape}")
        return (maps - self.median) / self.spread


def top_mean(maps: np.ndarray, fraction: float) -> np.ndarray:
    """Mean of the top ``fraction`` of each map's values."""
    flat = maps.reshape(len(maps), -1)
    k = max(1, round(fraction * flat.shape[1]))
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(axis=1)


def prepared_maps(raw: np.ndarray, score: MapScore, reference: MapReference | None) -> np.ndarray:
    """Smooth, then standardise against the reference when the score asks for it."""
    maps = smooth(raw, score.sigma)
    if score.standardise:
        if reference is None:
            raise ValueError("this map score standardises per position but has no reference")
        maps = reference.standardise(maps)
    return maps


def map_scores(raw: np.ndarray, score: MapScore, reference: MapReference | None) -> np.ndarray:
    """One abnormality score per image from its raw abnormality map."""
    return top_mean(prepared_maps(raw, score, reference), score.top_fraction)


def score_name(score: MapScore | None) -> str:
    """A short label: ``whole`` or e.g. ``map:posterior:s1:top0.05:std``."""
    if score is None:
        return "whole"
    return (f"map:{score.source}:s{score.sigma:g}:top{score.top_fraction:g}"
            f"{':std' if score.standardise else ''}")


def candidate_scores(source: str = "posterior") -> list[MapScore]:
    """The map scores a bundle chooses among on its validation set."""
    return [MapScore(source, sigma, frac, std) for sigma in (0.0, 1.0, 2.0)
            for frac in (0.01, 0.05, 0.2) for std in (True, False)]


@dataclass
class ScoreChoice:
    """Which abnormality score a bundle uses, and the validation AUROC of every candidate."""

    map: MapScore | None  # None: the whole-image posterior
    validation_auroc: dict[str, float]
    # each map score's simultaneous lower bound on its validation AUROC gain over the whole image
    gain_lower_bound: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return score_name(self.map)

    def to_dict(self) -> dict[str, object]:
        return {"method": "map" if self.map else "whole",
                "map": self.map.to_dict() if self.map else None,
                "validation_auroc": self.validation_auroc,
                "gain_lower_bound": self.gain_lower_bound}

    @classmethod
    def from_dict(cls, d: dict[str, object] | None) -> ScoreChoice:
        if not d:
            return cls(None, {})
        aucs, lower = dict(d.get("validation_auroc", {})), dict(d.get("gain_lower_bound", {}))  # type: ignore[call-overload]
        if d.get("method", "whole") == "whole":
            return cls(None, aucs, lower)
        m = d.get("map")
        if not isinstance(m, dict):
            raise ValueError("a map score choice needs its map settings")
        return cls(MapScore(**m), aucs, lower)


def choose_score(val0: np.ndarray, val1: np.ndarray, labels: np.ndarray,
                 ref0: np.ndarray, ref1: np.ndarray, *, alpha: float = 0.05,
                 min_lower: float = 0.0) -> tuple[ScoreChoice, MapReference | None]:
    """Pick the whole-image posterior or a map score on a labelled validation set.

    ``val*``/``ref*`` are per-position log-density maps of M0 and M1 on the validation set
    and on reference (mixture) images. The best of 18 map scores on a few hundred cases
    beats the whole-image posterior by chance alone (a head-CT demo bundle chose a map score
    at +0.035 on 120 volumes that lost 0.02 on the test set), so a map score is chosen only
    when the simultaneous lower bound on its AUROC gain (:func:`flows.evaluate.
    auc_gain_lower_bounds`, level ``1 - alpha``) is above ``min_lower``; among those, the
    one with the largest gain. Otherwise the simpler score stays.
    """
    from flows.evaluate import auc_rank, better_than_default

    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        raise ValueError("choosing a score needs normal and abnormal validation cases")
    n = len(val0)
    whole = (val1 - val0).reshape(n, -1).sum(axis=1)
    scores: dict[str, np.ndarray] = {}
    cands: dict[str, tuple[MapScore, MapReference | None]] = {}
    refs: dict[tuple[str, float], MapReference] = {}
    for cand in candidate_scores():
        raw_ref = abnormality_maps(ref0, ref1, cand.source)
        key = (cand.source, cand.sigma)
        if cand.standardise and key not in refs:
            refs[key] = MapReference.from_maps(smooth(raw_ref, cand.sigma))
        ref = refs[key] if cand.standardise else None
        name = score_name(cand)
        scores[name] = map_scores(abnormality_maps(val0, val1, cand.source), cand, ref)
        cands[name] = (cand, ref)
    best, bounds = better_than_default(y, whole, scores, alpha=alpha, min_lower=min_lower)
    w = auc_rank(y, whole)
    aucs = {"whole": w} | {k: w + gain for k, (gain, _) in bounds.items()}
    choice = ScoreChoice(cands[best][0] if best else None, {k: round(v, 4) for k, v in aucs.items()},
                         {k: round(lo, 4) for k, (_, lo) in bounds.items()})
    return choice, cands[best][1] if best else None
