"""Shared fixtures: tiny structured data sets and a tiny trained bundle (built once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.build import BuildOptions, build_bundle
from flows.bundle import Bundle
from flows.presets import get_preset


def blobs(n: int, shape: tuple[int, ...], *, abnormal: float = 0.0, seed: int = 0
          ) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random images in [0, 1]; 'abnormal' ones carry a bright square."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random((n, *shape)), sigma=[0] + [1.5] * len(shape))
    x = (x - x.min()) / (x.max() - x.min()) * 0.6 + 0.2
    labels = (rng.random(n) < abnormal).astype(np.int64)
    for i in np.flatnonzero(labels):
        sl = tuple(slice(s // 4, s // 4 + max(2, s // 3)) for s in shape)
        x[(i, *sl)] = 0.95
    return x[:, None].astype(np.float32), labels


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    preset = get_preset("tiny-cxr")
    normal, _ = blobs(64, (16, 16), seed=1)
    mixture, _ = blobs(64, (16, 16), abnormal=0.5, seed=2)
    val = blobs(40, (16, 16), abnormal=0.5, seed=3)
    out: Path = tmp_path_factory.mktemp("bundle") / "tiny"
    return build_bundle(out, preset=preset, normal=normal, mixture=mixture, name="tiny",
                        options=BuildOptions(progress=False), validation=val, log=lambda s: None)
