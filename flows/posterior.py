"""The two-model posterior (Shibata et al.).

``log p(normal | x) = log p(x | normal) - log p(x) + const``: M0 gives the first term, M1
(trained on the unlabelled mixture) the second. Likelihood alone rewards images with much
empty background; the ratio cancels what both models find easy and keeps what only the
mixture explains. Scores are deterministic: bin-centre dequantisation, or the mean over a
configured number of seeded dequantisation draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flows.bundle import Bundle
from flows.densitymap import (
    MapReference,
    MapScore,
    ScoreChoice,
    abnormality_maps,
    map_scores,
    pair_log_p_maps,
    prepared_maps,
)
from flows.errors import ScoringError
from flows.glow import FlowModel
from flows.pair import ModelPair
from flows.quantize import dequantize


@dataclass
class Scores:
    """Per-image scores (nats of the continuous density on the dequantised grid)."""

    log_p_normal: np.ndarray  # log p(x | normal), M0
    log_p_mixture: np.ndarray  # log p(x), M1
    log_posterior: np.ndarray  # log p0 - log p1 (higher = more normal)
    score: np.ndarray  # the bundle's abnormality score (whole-image or map-based; higher = worse)
    method: str  # which score: "whole" or a map score's name
    percentile: np.ndarray  # of ``score`` in the bundle's reference distribution
    abnormal: np.ndarray  # bool: score >= the bundle's operating threshold

    @property
    def abnormality(self) -> np.ndarray:
        """Whole-image abnormality, ``-log posterior`` (higher = more abnormal)."""
        return -self.log_posterior


@torch.no_grad()
def log_likelihood(model: FlowModel, images01: np.ndarray, n_bits: int, *, batch_size: int = 32,
                   draws: int = 0, seed: int = 0) -> np.ndarray:
    """log p(x) for preprocessed images ``(N, 1, *shape)`` in [0, 1], in float64."""
    model.eval()
    return _log_ps(lambda x: (model(x).log_p,), model, images01, n_bits, batch_size, draws, seed)[0]


@torch.no_grad()
def pair_log_likelihoods(m0: FlowModel, m1: FlowModel, images01: np.ndarray, n_bits: int, *,
                         batch_size: int = 32, draws: int = 0,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`log_likelihood` of both models on the same dequantised inputs, running their
    shared fine levels once (:class:`flows.pair.ModelPair`)."""
    m0.eval()
    m1.eval()
    lp0, lp1 = _log_ps(ModelPair(m0, m1).log_p, m0, images01, n_bits, batch_size, draws, seed)
    return lp0, lp1


def _log_ps(run: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], model: FlowModel,
            images01: np.ndarray, n_bits: int, batch_size: int, draws: int,
            seed: int) -> list[np.ndarray]:
    dev = next(model.parameters()).device
    outs: list[np.ndarray] = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(images01), batch_size):
        x01 = torch.from_numpy(np.ascontiguousarray(images01[i:i + batch_size], dtype=np.float32))
        if draws <= 0:
            lps = run(dequantize(x01, n_bits, noise=False).to(dev))
        else:
            each = [run(dequantize(x01, n_bits, noise=True, generator=gen).to(dev)) for _ in range(draws)]
            lps = tuple(torch.stack(d).mean(0) for d in zip(*each, strict=True))
        if not outs:
            outs = [np.empty(len(images01), dtype=np.float64) for _ in lps]
        for out, lp in zip(outs, lps, strict=True):
            out[i:i + len(x01)] = lp.cpu().numpy()
    for out in outs:
        bad = ~np.isfinite(out)
        if bad.any():
            raise ScoringError(f"{int(bad.sum())} image(s) got a non-finite log-likelihood "
                               f"(first index {int(np.argmax(bad))}); the model or input is broken")
    return outs


@torch.no_grad()
def two_model_scores(m0: FlowModel, m1: FlowModel, images01: np.ndarray, n_bits: int,
                     choice: ScoreChoice, reference: MapReference | None, *,
                     batch_size: int = 32, draws: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(log p0, log p1, abnormality score)`` under a score choice, in one joint pass.

    A map score needs the per-position maps; they sum to the log-densities, so the
    whole-image terms come with them at no extra cost.
    """
    if choice.map is None:
        lp0, lp1 = pair_log_likelihoods(m0, m1, images01, n_bits, batch_size=batch_size, draws=draws)
        return lp0, lp1, lp1 - lp0
    lp0, lp1, score = (np.empty(len(images01)) for _ in range(3))
    for i in range(0, len(images01), batch_size):  # batch by batch: 3D maps are large
        batch = slice(i, i + batch_size)
        a, b = pair_log_p_maps(m0, m1, images01[batch], n_bits, batch_size=batch_size)
        lp0[batch], lp1[batch], score[batch] = map_pair_scores(a, b, choice, reference)
    return lp0, lp1, score


def map_pair_scores(a: np.ndarray, b: np.ndarray, choice: ScoreChoice,
                    reference: MapReference | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(log p0, log p1, score)`` from both models' maps: the whole-image posterior, or the
    chosen map score."""
    lp0, lp1 = a.reshape(len(a), -1).sum(1), b.reshape(len(b), -1).sum(1)
    if choice.map is None:
        return lp0, lp1, lp1 - lp0
    score = map_scores(abnormality_maps(a, b, choice.map.source), choice.map, reference)
    if not np.isfinite(score).all():
        raise ScoringError(f"{int((~np.isfinite(score)).sum())} image(s) got a non-finite map score")
    return lp0, lp1, score


class PosteriorScorer:
    """Scores images with a bundle; batched, in inference mode, deterministic."""

    def __init__(self, bundle: Bundle, *, batch_size: int = 32, draws: int = 0) -> None:
        self.bundle = bundle
        self.batch_size = batch_size
        self.draws = draws
        self.choice = bundle.calibration.choice
        if self.choice.map is not None and draws:
            raise ValueError("map scores use bin-centre dequantisation; draws must be 0")

    def _checked(self, images01: np.ndarray) -> np.ndarray:
        prep = self.bundle.preprocessing
        expected = (1, *prep.shape)
        arr = np.asarray(images01)
        if arr.ndim != len(expected) + 1 or tuple(arr.shape[1:]) != expected:
            raise ValueError(f"bundle {self.bundle.name!r} expects images shaped (N, "
                             f"{', '.join(map(str, expected))}), got {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError("nothing to score: empty batch")
        if not np.isfinite(arr).all():
            raise ValueError(f"{int((~np.isfinite(arr)).sum())} NaN/inf pixel(s) in the batch")
        return arr

    def _scores(self, lp0: np.ndarray, lp1: np.ndarray, score: np.ndarray) -> Scores:
        cal = self.bundle.calibration
        return Scores(log_p_normal=lp0, log_p_mixture=lp1, log_posterior=lp0 - lp1, score=score,
                      method=self.choice.name, percentile=cal.percentile(score),
                      abnormal=score >= cal.threshold)

    def score(self, images01: np.ndarray) -> Scores:
        """Score images already preprocessed to the bundle's grid, values in [0, 1]."""
        arr = self._checked(images01)
        prep = self.bundle.preprocessing
        lp0, lp1, score = two_model_scores(
            self.bundle.m0, self.bundle.m1, arr, prep.n_bits, self.choice,
            self.bundle.map_reference, batch_size=self.batch_size, draws=self.draws)
        return self._scores(lp0, lp1, score)

    def score_maps(self, images01: np.ndarray) -> tuple[Scores, np.ndarray]:
        """The same scores plus each image's abnormality map ``(N, *shape)`` on the model grid.

        The maps come from the exact per-position decomposition (they sum to the
        log-densities), so the whole-image terms cost nothing extra. The map is the bundle's
        map score's source (the posterior ratio by default), smoothed and, when the bundle
        has a map reference, standardised per position: higher = more abnormal.
        """
        if self.draws:
            raise ValueError("maps use bin-centre dequantisation; draws must be 0")
        arr = self._checked(images01)
        n_bits = self.bundle.preprocessing.n_bits
        a, b = pair_log_p_maps(self.bundle.m0, self.bundle.m1, arr, n_bits, batch_size=self.batch_size)
        lp0, lp1 = a.reshape(len(a), -1).sum(1), b.reshape(len(b), -1).sum(1)
        ref = self.bundle.map_reference
        how = self.choice.map or MapScore(source="posterior", sigma=1.0, standardise=ref is not None)
        raw = abnormality_maps(a, b, how.source)
        score = lp1 - lp0 if self.choice.map is None else map_scores(raw, self.choice.map, ref)
        return self._scores(lp0, lp1, score), prepared_maps(raw, how, ref)

    def score_raw(self, images: np.ndarray) -> Scores:
        """Apply the bundle's preprocessing to raw arrays, then score."""
        return self.score(self.bundle.preprocessing.apply(images))
