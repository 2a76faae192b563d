"""Single-pass Log P maps and the scores read off them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.densitymap import (
    MapReference,
    MapScore,
    abnormality_maps,
    log_p_maps,
    map_scores,
    top_mean,
)
from flows.glow import Conditioned, Glow, GlowConfig
from flows.posterior import log_likelihood


def _model(cond: int = 0) -> Glow:
    g = Glow(GlowConfig(1, 2, levels=2, steps=2, hidden=8, conditions=cond), seed=0)
    x = torch.rand(8, 1, 16, 16) - 0.5
    g.initialize(x, 0 if cond else None)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return g.eval()


def test_maps_sum_to_the_whole_image_log_likelihood() -> None:
    imgs = np.random.default_rng(0).random((5, 1, 16, 16)).astype(np.float32)
    g = _model()
    maps = log_p_maps(g, imgs, 5, batch_size=2)
    assert maps.shape == (5, 16, 16)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), log_likelihood(g, imgs, 5), rtol=1e-6)
    c = _model(cond=2)
    m0, m1 = log_p_maps(Conditioned(c, 0), imgs, 5), log_p_maps(Conditioned(c, 1), imgs, 5)
    post = abnormality_maps(m0, m1, "posterior")
    np.testing.assert_allclose(post.sum(axis=(1, 2)),
                               log_likelihood(Conditioned(c, 1), imgs, 5)
                               - log_likelihood(Conditioned(c, 0), imgs, 5), rtol=1e-5, atol=1e-4)


def test_top_mean_and_standardised_score_find_the_odd_position() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(5.0, 2.0, size=(200, 8, 8)) + np.linspace(0, 10, 8)  # position bias
    ref = ref.copy()
    ref[:5, 3, 3] += 40  # a few abnormal references barely move the median
    refm = MapReference.from_maps(ref)
    normal = rng.normal(5.0, 2.0, size=(50, 8, 8)) + np.linspace(0, 10, 8)
    odd = normal.copy()
    odd[:, 2, 1] += 8.0  # 4 SD at a low-bias position
    s = MapScore("posterior", sigma=0, top_fraction=1 / 64)
    a, b = map_scores(normal, s, refm), map_scores(odd, s, refm)
    assert (b > a).mean() > 0.9
    assert top_mean(np.arange(100.0).reshape(1, 10, 10), 0.05)[0] == pytest.approx(97.0)


def test_map_score_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="top_fraction"):
        MapScore(top_fraction=0)
    with pytest.raises(ValueError, match="source"):
        MapScore(source="entropy")
    with pytest.raises(ValueError, match="no reference"):
        map_scores(np.zeros((2, 4, 4)), MapScore(), None)
    with pytest.raises(ValueError, match="do not match"):
        MapReference.from_maps(np.zeros((3, 4, 4))).standardise(np.zeros((2, 5, 5)))
