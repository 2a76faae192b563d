"""Noise estimation and harmonisation (flows.preprocess.noise_sd / harmonise_noise)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from flows.preprocess import Preprocessing, harmonise_noise, noise_sd


def _anatomy(rng: np.random.Generator) -> np.ndarray:
    """A smooth head-like volume: a bright ball in a darker one, values in HU."""
    z, y, x = np.mgrid[:32, :40, :40].astype(np.float32)
    r = np.sqrt((z - 16) ** 2 + (y - 20) ** 2 + (x - 20) ** 2)
    vol = np.where(r < 15, 30.0, -1000.0) + np.where(r < 6, 15.0, 0.0)
    return ndimage.gaussian_filter(vol, 1.0).astype(np.float32)


@pytest.mark.parametrize("sd", [2.0, 5.0, 12.0])
def test_noise_sd_reads_white_noise_on_anatomy(sd: float) -> None:
    rng = np.random.default_rng(0)
    vol = _anatomy(rng) + rng.normal(0, sd, (32, 40, 40)).astype(np.float32)
    est = noise_sd(vol, window=(-14.0, 114.0))
    assert est == pytest.approx(sd, rel=0.2)  # tissue edges add a little at low noise


def test_noise_sd_ignores_clipped_and_flat_regions() -> None:
    vol = np.full((20, 20, 20), -1000.0, dtype=np.float32)  # air only: nothing to read
    assert np.isnan(noise_sd(vol, window=(-14.0, 114.0)))
    assert np.isnan(noise_sd(np.zeros((20, 20, 20), np.float32)))


def test_harmonise_raises_every_volume_to_the_floor_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    base = _anatomy(rng)
    w = (-14.0, 114.0)
    got = []
    for sd in (1.0, 2.0, 3.0):
        vol = base + rng.normal(0, sd, base.shape).astype(np.float32)
        out = harmonise_noise(vol, 4.0, w)
        got.append(noise_sd(out, w))
        np.testing.assert_array_equal(out, harmonise_noise(vol, 4.0, w))  # same volume, same noise
    assert got == pytest.approx([4.0] * 3, rel=0.12)
    noisy = base + rng.normal(0, 6.0, base.shape).astype(np.float32)
    np.testing.assert_array_equal(harmonise_noise(noisy, 4.0, w), noisy)  # already above: untouched


def test_noise_floor_survives_the_manifest_round_trip() -> None:
    p = Preprocessing(kind="bct", shape=(8, 8, 8), n_bits=7, intensity="window",
                      window=(-14.0, 114.0), spacing=4.0, noise_floor=3.0)
    assert Preprocessing.from_dict(p.to_dict()) == p
    old = p.to_dict()
    del old["noise_floor"]  # a bundle written before the field existed
    q = Preprocessing.from_dict(old)
    assert q.noise_floor is None and q.mismatch(p) == ["noise_floor: None != 3.0"]
