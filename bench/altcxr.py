"""A second, independently made chest-radiograph phantom, for generalisation checks only.

The node's own phantoms (``flows/phantoms/cxr.py``) are what the method is developed on. This
generator is deliberately built differently and simply — ellipse lungs and heart, rib bands,
additive white plus smooth noise, no real masks or boxes — in the spirit of the "noisy
synthetic radiographs" the flows issue quotes for scale. Its parameters were fixed once,
before any run, and are not tuned to the method: a score that does well only on
``flows/phantoms`` and not here has learnt the phantom, not the task.

    from bench.altcxr import make_alt_cxr   # or: bench/accuracy.py TAG cxr '{"source": "alt"}'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from flows.phantoms.anatomy import PhantomSet

FINDINGS = ("opacity", "nodule", "effusion", "cardiomegaly")


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _one(rng: np.random.Generator, size: int, finding: str, child: bool) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size  # unit square
    scale = rng.uniform(0.55, 0.75) if child else rng.uniform(0.9, 1.05)
    cy, cx = 0.5 + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.02)
    body = _ellipse(yy, xx, cy, cx, 0.48 * scale, 0.44 * scale)
    img = np.where(body, 0.45, 0.0)
    lung_ry, lung_rx = 0.30 * scale * rng.uniform(0.9, 1.1), 0.14 * scale * rng.uniform(0.9, 1.1)
    sep = 0.17 * scale
    lungs = [_ellipse(yy, xx, cy - 0.03 * scale, cx + s * sep, lung_ry, lung_rx) for s in (-1, 1)]
    lung = lungs[0] | lungs[1]
    img = np.where(lung, 0.18 + 0.10 * (yy - cy + 0.3 * scale), img)  # denser at the base
    ribs = 0.04 * (np.sin((yy * size) / (2.2 * scale) + rng.uniform(0, 6.3)) > 0.6)
    img = img + np.where(lung, ribs, 0.0)
    heart_r = 0.11 * scale * rng.uniform(0.9, 1.1)
    if finding == "cardiomegaly":
        heart_r *= rng.uniform(1.3, 1.55)
    heart = _ellipse(yy, xx, cy + 0.10 * scale, cx + 0.03 * scale, 0.8 * heart_r, heart_r)
    img = np.where(heart & body, 0.55, img)
    mask = np.zeros((size, size), bool)
    if finding in ("opacity", "nodule"):
        side = lungs[rng.integers(2)]
        py, px = np.argwhere(side)[rng.integers(side.sum())] / size
        sig = rng.uniform(0.04, 0.08) if finding == "opacity" else rng.uniform(0.015, 0.03)
        blob = np.exp(-(((yy - py) ** 2 + (xx - px) ** 2) / (2 * sig**2)))
        if finding == "nodule":
            blob = (blob > 0.4).astype(np.float64)
        amp = rng.uniform(0.12, 0.22)
        img = img + amp * blob * side
        mask = (blob > 0.3) & side
    elif finding == "effusion":
        side = lungs[rng.integers(2)]
        rows = np.where(side.any(1))[0]
        level = rows.max() - rng.uniform(0.15, 0.35) * len(rows)
        mask = side & (np.arange(size)[:, None] >= level)
        img = np.where(mask, 0.50, img)
    img = img + ndimage.gaussian_filter(rng.normal(0, 0.08, (size, size)), size / 12)
    img = img + rng.normal(0, 0.03, (size, size))
    img = np.where(body, img, 0.0)  # collimated background stays exactly 0
    return np.clip(img, 0, 1).astype(np.float32), mask


def alt_set(n: int, shape: tuple[int, ...], kinds: tuple[str, ...], abnormal_fraction: float, seed: int,
            render: Callable[[np.random.Generator, str], tuple[np.ndarray, np.ndarray]], *,
            spacing: tuple[float, ...], background: float, meta: dict[str, Any]) -> PhantomSet:
    """The case plan shared by the bench/alt* generators: findings spread evenly over ``kinds``,
    shuffled by ``seed``; case i drawn by ``render`` from the generator seeded by (seed, i);
    the zero fraction counts values at or below ``background``."""
    n_ab = round(n * abnormal_fraction)
    findings = ["normal"] * (n - n_ab) + [kinds[i % len(kinds)] for i in range(n_ab)]
    order = np.random.default_rng(seed).permutation(n)
    findings = [findings[i] for i in order]
    images = np.zeros((n, 1, *shape), np.float32)
    masks = np.zeros((n, 1, *shape), bool)
    for i, f in enumerate(findings):
        images[i, 0], masks[i, 0] = render(np.random.default_rng([seed, i]), f)
    labels = np.array([f != "normal" for f in findings], np.int64)
    zero = (images <= background).reshape(n, -1).mean(1)
    return PhantomSet(images, labels, findings, masks, zero, spacing, meta=meta)


def make_alt_cxr(n: int, *, size: int = 64, abnormal_fraction: float = 0.0, child_fraction: float = 0.2,
                 seed: int = 0) -> PhantomSet:
    """``n`` radiographs ``(n, 1, size, size)`` in [0, 1]; case i depends only on (seed, i)."""
    child: list[bool] = []

    def render(rng: np.random.Generator, finding: str) -> tuple[np.ndarray, np.ndarray]:
        child.append(bool(rng.random() < child_fraction))
        return _one(rng, size, finding, child[-1])

    meta: dict[str, Any] = {"generator": "bench.altcxr"}
    out = alt_set(n, (size, size), FINDINGS, abnormal_fraction, seed, render, spacing=(1.0, 1.0),
                  background=0.0, meta=meta)
    meta["child"] = np.array(child, bool)
    return out
