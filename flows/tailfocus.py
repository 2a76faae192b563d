"""Tail-focused fine-tuning: M0 and M1 both learn the region where the base model is unsure.

With the ``shared`` strategy M0 and M1 are fine-tuned from one base model, on the normal set
and on the mixture. When abnormal regions are rare in the mixture (a few per cent of a chest
CT's lung patches) M1 barely differs from M0 where it matters, and ``log p0 - log p1`` is
mostly the two fine-tunings' drift. Tail focus fine-tunes both on the same region R of input
space instead: the samples the base model finds least likely (its per-position map's most
abnormal tenth, so a small finding counts), with one cut ``tau`` set on the normal set.

Why the ratio survives the selection: R is a deterministic function of x, so for x in R
``p(x | normal, R) / p(x | mixture, R) = p_n(x) / p_m(x) * P_m(R) / P_n(R)``, the same
posterior ratio up to a constant, which no ranking depends on. What changes is the
estimate: both models spend their capacity on R, and the mixture's abnormal samples, if the
base model puts them in R more often than normal ones, make up a larger share of M1's
fine-tuning set. The log line reports that share; on the CPU presets' phantoms it was
0.92-1.05x (the tail held the noisiest scans, not the findings: docs/results.md, session 13).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from flows.densitymap import log_p_maps, top_mean
from flows.glow import FlowModel
from flows.rows import ImageSet

MAP_TOP = 0.1  # the share of a sample's positions whose mean abnormality ranks it
_CHUNK = 512  # samples mapped at once (a 3D map per sample is large)


def tail_statistic(model: FlowModel, images01: ImageSet, n_bits: int) -> np.ndarray:
    """Per sample: mean of the top ``MAP_TOP`` of ``-log p`` over its positions (higher = less likely)."""
    out = np.empty(len(images01))
    for i in range(0, len(images01), _CHUNK):
        maps = log_p_maps(model, images01[i:i + _CHUNK], n_bits)
        out[i:i + len(maps)] = top_mean(-maps, MAP_TOP)
    return out


def check_fraction(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise ValueError(f"tail fraction must be between 0 and 1 (exclusive), got {fraction}")


def select_tail(model: FlowModel, normal: ImageSet, mixture: ImageSet, fraction: float,
                n_bits: int, log: Callable[[str], None] = print
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """(normal in R, mixture in R, tau): R holds the ``fraction`` of normals the model finds
    least likely, and every mixture sample at least as unlikely as the cut."""
    check_fraction(fraction)
    sn = tail_statistic(model, normal, n_bits)
    sm = tail_statistic(model, mixture, n_bits)
    tau = float(np.quantile(sn, 1.0 - fraction))
    keep_n, keep_m = sn >= tau, sm >= tau
    if keep_n.sum() < 2 or keep_m.sum() < 2:
        raise ValueError(f"tail focus at {fraction:g} keeps {int(keep_n.sum())} normal and "
                         f"{int(keep_m.sum())} mixture samples: too few to fine-tune on")
    log(f"tail focus: cut {tau:.3f} nats/position keeps {int(keep_n.sum())} of {len(normal)} normal "
        f"and {int(keep_m.sum())} of {len(mixture)} mixture samples "
        f"({keep_m.mean() / keep_n.mean():.2f}x the normal share)")
    return normal[keep_n], mixture[keep_m], tau
