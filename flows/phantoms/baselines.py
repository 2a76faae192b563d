"""Trivial per-image scores that must *not* separate normal from abnormal phantoms.

If any of them reaches a high AUROC, the benchmark would measure the phantom (a global
brightness or background difference), not the anomaly detector. Each returns one number
per image:

* ``mean_intensity``: mean of the display image (CXR: the [0, 1] image; CT: the 7-bit
  window ``clip(HU + 14, 0, 127)``);
* ``entropy``: Shannon entropy (bits) of a 64-bin histogram over the kind's fixed range
  (CXR [0, 1]; CT the window [0, 127], i.e. [-14, 113] HU);
* ``background_fraction``: fraction of empty background (CXR: pixels exactly 0; CT:
  voxels at or below -1000 HU).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

__all__ = ["CT_WINDOW", "auroc", "ct_window", "trivial_baselines"]

CT_WINDOW = (-14.0, 113.0)
"""The head-CT "paper" window in HU: ``clip(HU + 14, 0, 127)`` (7 bits)."""

_BINS = 64


def ct_window(hu: np.ndarray) -> np.ndarray:
    """The 7-bit head-CT window, values in [0, 127]."""
    return np.clip(np.asarray(hu, dtype=np.float32) + 14.0, 0.0, 127.0)


def _entropy(flat: np.ndarray, lo: float, hi: float) -> np.ndarray:
    idx = np.clip(((flat - lo) / (hi - lo) * _BINS).astype(np.int64), 0, _BINS - 1)
    n = flat.shape[1]
    counts = np.zeros((flat.shape[0], _BINS), dtype=np.float64)
    rows = np.repeat(np.arange(flat.shape[0]), n)
    np.add.at(counts, (rows, idx.ravel()), 1.0)
    p = counts / n
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
    return h


def trivial_baselines(images: np.ndarray, *, kind: str) -> dict[str, np.ndarray]:
    """Per-image ``mean_intensity``, ``entropy`` and ``background_fraction``.

    ``images`` is ``(N, ...)``; ``kind`` is ``"cxr"`` (values in [0, 1]) or ``"bct"`` (head CT,
    Hounsfield units).
    """
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim < 2:
        raise ValueError(f"trivial_baselines: images must be (N, ...), got shape {arr.shape}")
    flat = arr.reshape(arr.shape[0], -1)
    k = kind.lower()
    if k == "cxr":
        disp = np.clip(flat, 0.0, 1.0)
        lo, hi = 0.0, 1.0
        background = (flat == 0.0).mean(axis=1)
    elif k == "bct":
        disp = ct_window(flat)
        lo, hi = 0.0, 127.0
        background = (flat <= -1000.0).mean(axis=1)
    else:
        raise ValueError(f"trivial_baselines: kind must be 'cxr' or 'bct', got {kind!r}")
    return {
        "mean_intensity": disp.mean(axis=1).astype(np.float64),
        "entropy": _entropy(disp, lo, hi),
        "background_fraction": background.astype(np.float64),
    }


def auroc(scores: np.ndarray, labels: np.ndarray, *, either_direction: bool = True) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half).

    With ``either_direction`` it returns ``max(auc, 1 - auc)``: how well the score
    separates the classes whichever way round.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("auroc: needs both classes")
    ranks = rankdata(s)
    auc = (ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return float(max(auc, 1.0 - auc)) if either_direction else float(auc)
