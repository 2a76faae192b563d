"""The two-model posterior (Shibata et al.).

``log p(normal | x) = log p(x | normal) - log p(x) + const``: M0 gives the first term, M1
(trained on the unlabelled mixture) the second. Likelihood alone rewards images with much
empty background; the ratio cancels what both models find easy and keeps what only the
mixture explains. Scores are deterministic: bin-centre dequantisation, or the mean over a
configured number of seeded dequantisation draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flows.bundle import Bundle
from flows.glow import FlowModel
from flows.quantize import dequantize


class ScoringError(RuntimeError):
    """A model produced a non-finite score."""


@dataclass
class Scores:
    """Per-image scores (nats of the continuous density on the dequantised grid)."""

    log_p_normal: np.ndarray  # log p(x | normal), M0
    log_p_mixture: np.ndarray  # log p(x), M1
    log_posterior: np.ndarray  # log p0 - log p1 (higher = more normal)
    percentile: np.ndarray  # of the abnormality score in the bundle's reference distribution
    abnormal: np.ndarray  # bool: abnormality >= the bundle's operating threshold

    @property
    def abnormality(self) -> np.ndarray:
        """Higher = more abnormal (``-log posterior``)."""
        return -self.log_posterior


@torch.no_grad()
def log_likelihood(model: FlowModel, images01: np.ndarray, n_bits: int, *, batch_size: int = 32,
                   draws: int = 0, seed: int = 0) -> np.ndarray:
    """log p(x) for preprocessed images ``(N, 1, *shape)`` in [0, 1], in float64."""
    model.eval()
    dev = next(model.parameters()).device
    out = np.empty(len(images01), dtype=np.float64)
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(images01), batch_size):
        x01 = torch.from_numpy(np.ascontiguousarray(images01[i:i + batch_size], dtype=np.float32))
        if draws <= 0:
            lp = model(dequantize(x01, n_bits, noise=False).to(dev)).log_p
        else:
            lp = torch.stack([model(dequantize(x01, n_bits, noise=True, generator=gen).to(dev)).log_p
                              for _ in range(draws)]).mean(0)
        out[i:i + len(x01)] = lp.cpu().numpy()
    bad = ~np.isfinite(out)
    if bad.any():
        raise ScoringError(f"{int(bad.sum())} image(s) got a non-finite log-likelihood "
                           f"(first index {int(np.argmax(bad))}); the model or input is broken")
    return out


class PosteriorScorer:
    """Scores images with a bundle; batched, in inference mode, deterministic."""

    def __init__(self, bundle: Bundle, *, batch_size: int = 32, draws: int = 0) -> None:
        self.bundle = bundle
        self.batch_size = batch_size
        self.draws = draws

    def score(self, images01: np.ndarray) -> Scores:
        """Score images already preprocessed to the bundle's grid, values in [0, 1]."""
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
        kw = dict(batch_size=self.batch_size, draws=self.draws)
        lp0 = log_likelihood(self.bundle.m0, arr, prep.n_bits, **kw)
        lp1 = log_likelihood(self.bundle.m1, arr, prep.n_bits, **kw)
        post = lp0 - lp1
        cal = self.bundle.calibration
        return Scores(log_p_normal=lp0, log_p_mixture=lp1, log_posterior=post,
                      percentile=cal.percentile(-post), abnormal=(-post) >= cal.threshold)

    def score_raw(self, images: np.ndarray) -> Scores:
        """Apply the bundle's preprocessing to raw arrays, then score."""
        return self.score(self.bundle.preprocessing.apply(images))
