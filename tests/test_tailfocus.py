"""Tail-focused fine-tuning (flows.tailfocus): which samples it keeps, and the build option."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.build import BuildOptions, build_bundle
from flows.bundle import Bundle
from flows.presets import get_preset
from flows.tailfocus import select_tail, tail_statistic
from tests.conftest import blobs


def _with_noisy_corner(images: np.ndarray, seed: int) -> np.ndarray:
    """Copies with white noise in one 5x5 corner (10 % of a 16x16 image): a small, local oddity."""
    out = images.copy()
    out[:, 0, :5, :5] = np.random.default_rng(seed).random((len(out), 5, 5))
    return out


def test_the_tail_holds_the_locally_unlikely_samples(tiny_bundle: Bundle) -> None:
    n_bits = tiny_bundle.preprocessing.n_bits
    normal, _ = blobs(60, (16, 16), seed=11)
    odd = _with_noisy_corner(blobs(10, (16, 16), seed=12)[0], seed=13)
    mixture = np.concatenate([blobs(50, (16, 16), seed=14)[0], odd])
    # the statistic ranks a local oddity above every clean image of the same model
    s_odd = tail_statistic(tiny_bundle.m0, odd, n_bits)
    s_clean = tail_statistic(tiny_bundle.m0, normal, n_bits)
    assert np.median(s_odd) > np.quantile(s_clean, 0.9)
    kn, km, tau = select_tail(tiny_bundle.m0, normal, mixture, 0.25, n_bits, log=lambda s: None)
    assert len(kn) == pytest.approx(15, abs=1)  # the normal set's quarter
    kept_odd = sum(any(np.array_equal(o, k) for k in km) for o in odd)
    assert kept_odd >= 9
    assert len(km) < len(mixture)
    assert np.all(tail_statistic(tiny_bundle.m0, km, n_bits) >= tau)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_a_fraction_outside_0_1_is_refused(tiny_bundle: Bundle, fraction: float) -> None:
    x, _ = blobs(8, (16, 16), seed=1)
    with pytest.raises(ValueError, match="tail fraction"):
        select_tail(tiny_bundle.m0, x, x, fraction, 8, log=lambda s: None)


def test_a_shared_build_fine_tunes_on_the_tail(tmp_path: Path) -> None:
    normal, _ = blobs(48, (16, 16), seed=1)
    mixture, _ = blobs(48, (16, 16), abnormal=0.5, seed=2)
    b = build_bundle(tmp_path / "b", preset=get_preset("tiny-cxr"), normal=normal, mixture=mixture,
                     name="tail", log=lambda s: None,
                     options=BuildOptions(strategy="shared", epochs=1, finetune_epochs=1,
                                          focus_tail=0.5, progress=False))
    focus = b.manifest["training"]["focus_tail"]
    assert focus["fraction"] == 0.5
    assert focus["normal"] == 24
    assert 2 <= focus["mixture"] < len(mixture)
    t = b.manifest["training"]
    assert t["m0"]["steps"] < t["base"]["steps"]  # fine-tuned on the half it kept


@pytest.mark.parametrize(("strategy", "fraction", "reason"), [
    ("finetune-m1", 0.5, "shared strategy"),  # no base model to find the tail with
    ("shared", 1.5, "tail fraction"),
])
def test_a_tail_focus_that_cannot_work_is_refused_before_training(
        tmp_path: Path, strategy: str, fraction: float, reason: str) -> None:
    x, _ = blobs(16, (16, 16), seed=1)
    with pytest.raises(ValueError, match=reason):
        build_bundle(tmp_path / "b", preset=get_preset("tiny-cxr"), normal=x, mixture=x, name="x",
                     log=lambda s: None,
                     options=BuildOptions(strategy=strategy, focus_tail=fraction,  # type: ignore[arg-type]
                                          progress=False))
    assert not (tmp_path / "b" / "work").exists()  # nothing was trained
