"""flows.pair: M0 and M1 scored together, their shared fine levels run once."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.bundle import load_bundle
from flows.densitymap import log_p_maps, pair_log_p_maps
from flows.glow import Averaged, Glow, GlowConfig, Translated
from flows.pair import ModelPair, shared_levels
from flows.posterior import log_likelihood, pair_log_likelihoods

ROOT = Path(__file__).resolve().parents[1]


def _glow(ndim: int = 2, seed: int = 0, levels: int = 3) -> Glow:
    g = Glow(GlowConfig(1, ndim, levels=levels, steps=2, hidden=8), seed=seed)
    shape = (16, 1) + ((8, 8, 8) if ndim == 3 else (16, 16))
    g.initialize(torch.rand(shape, generator=torch.Generator().manual_seed(seed)))
    return g.eval()


def _finetuned(base: Glow, frozen: int, seed: int = 1) -> Glow:
    """A copy of ``base`` whose levels from ``frozen`` on are perturbed (a fine-tuned M1)."""
    m = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            level = int(name.split(".")[1]) if name.startswith(("levels.", "splits.")) else m.config.levels
            if level >= frozen:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return m


@pytest.mark.parametrize("frozen", [0, 1, 2])
def test_shared_levels_counts_identical_fine_levels(frozen: int) -> None:
    base = _glow()
    assert shared_levels(base, _finetuned(base, frozen)) == frozen


def test_shared_levels_never_claims_a_whole_model_or_a_different_one() -> None:
    base = _glow()
    assert shared_levels(base, base) == 0
    assert shared_levels(base, copy.deepcopy(base)) == 2  # levels - 1 at most
    assert shared_levels(base, _glow(seed=5)) == 0
    other = Glow(GlowConfig(1, 2, levels=3, steps=2, hidden=16), seed=0)
    assert shared_levels(base, other) == 0
    cond = Glow(GlowConfig(1, 2, levels=3, steps=2, hidden=8, conditions=2), seed=0)
    assert shared_levels(cond, copy.deepcopy(cond)) == 0


def _separate(m0: torch.nn.Module, m1: torch.nn.Module, x: torch.Tensor,
              maps: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if maps:
        return m0.log_p_map(x), m1.log_p_map(x)  # type: ignore[operator]
    return m0(x).log_p, m1(x).log_p


def _pairs() -> dict[str, tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]]:
    x2 = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    x3 = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    b2, b3 = _glow(), _glow(ndim=3)
    m1 = _finetuned(b2, 2)
    b2b = _glow(seed=7)
    return {
        "glow": (b2, m1, x2),
        "glow3d": (b3, _finetuned(b3, 1), x3),
        "unshared": (b2, _glow(seed=9), x2),
        "translated": (Translated(b2, 1), Translated(m1, 1), x2),
        "mirrored": (Translated(b3, 0, 2), Translated(_finetuned(b3, 1), 0, 2), x3),
        "mirror-mismatched": (Translated(b2, 1, 1), Translated(m1, 1), x2),
        "averaged": (Averaged([b2, b2b]), Averaged([m1, _finetuned(b2b, 1)]), x2),
        "translated-averaged": (Translated(Averaged([b2, b2b]), 1),
                                Translated(Averaged([m1, _finetuned(b2b, 1)]), 1), x2),
        "mismatched": (Translated(b2, 1), m1, x2),
    }


@pytest.mark.parametrize("maps", [False, True], ids=["log_p", "maps"])
@pytest.mark.parametrize("case", list(_pairs()))
def test_pair_equals_scoring_each_model_alone(case: str, maps: bool) -> None:
    m0, m1, x = _pairs()[case]
    pair = ModelPair(m0, m1)  # type: ignore[arg-type]
    with torch.no_grad():
        got = pair.log_p_maps(x) if maps else pair.log_p(x)
        want = _separate(m0, m1, x, maps)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-7)
    if maps:  # maps still sum to the log-densities
        lp = pair.log_p(x)
        for m, s in zip(got, lp, strict=True):
            torch.testing.assert_close(m.flatten(1).sum(1), s, rtol=1e-9, atol=1e-6)


def test_the_shared_levels_run_once() -> None:
    base = _glow()
    m1 = _finetuned(base, 2)
    calls = {"m0": 0, "m1": 0}
    base._steps(0)[0].register_forward_hook(lambda *_: calls.__setitem__("m0", calls["m0"] + 1))
    m1._steps(0)[0].register_forward_hook(lambda *_: calls.__setitem__("m1", calls["m1"] + 1))
    pair = ModelPair(base, m1)
    assert pair.shared == 2
    with torch.no_grad():
        pair.log_p(torch.rand(2, 1, 16, 16))
    assert calls == {"m0": 1, "m1": 0}
    with torch.no_grad():
        ModelPair(Translated(base, 1), Translated(m1, 1)).log_p_maps(torch.rand(2, 1, 16, 16))
    assert calls == {"m0": 1 + 9, "m1": 0}


def test_numpy_helpers_match_single_model_scoring() -> None:
    base = _glow()
    m1 = _finetuned(base, 1)
    imgs = np.random.default_rng(0).random((5, 1, 16, 16)).astype(np.float32)
    a, b = pair_log_p_maps(base, m1, imgs, 5, batch_size=2)
    np.testing.assert_allclose(a, log_p_maps(base, imgs, 5, batch_size=2), rtol=1e-9)
    np.testing.assert_allclose(b, log_p_maps(m1, imgs, 5, batch_size=2), rtol=1e-9)
    for draws in (0, 2):
        l0, l1 = pair_log_likelihoods(base, m1, imgs, 5, batch_size=2, draws=draws)
        np.testing.assert_allclose(l0, log_likelihood(base, imgs, 5, batch_size=2, draws=draws), rtol=1e-9)
        np.testing.assert_allclose(l1, log_likelihood(m1, imgs, 5, batch_size=2, draws=draws), rtol=1e-9)


def test_the_demo_bundle_shares_the_levels_its_preset_froze() -> None:
    """Fine-tuning with frozen levels (and weight averaging) must leave them bit-identical."""
    bundle = load_bundle(ROOT / "models" / "cxr")
    assert ModelPair(bundle.m0, bundle.m1).shared == 2  # cpu-cxr: finetune_freeze=2
