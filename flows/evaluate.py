"""Evaluation and reporting of anomaly scores (Shibata et al. figs 3–8, A.16–A.20).

Every score handed to this module is an ABNORMALITY score: higher = more abnormal. Callers
negate the log posterior ``log p0 − log p1`` and the log-likelihood ``log p0`` before
passing them in.

What is reported, per score:

* ROC curve and AUROC with a stratified-bootstrap percentile 95 % CI, overall (every
  finding vs normals) and per finding (that finding vs all normals);
* the Youden cutoff (``score >= threshold`` → abnormal) with its sensitivity/specificity;
* per-class score histograms with the cutoff marked;
* montages of the 16 most and least abnormal images;
* Spearman ρ of score vs the image's zero-pixel fraction — the confound that makes the
  plain likelihood fail (lots of empty background looks "likely"); the posterior should not
  correlate with it.

Labels: ``labels[i]`` is an index into ``findings``; ``findings[0]`` is the normal class
(label 0), ``findings[k]`` names label ``k``. String labels equal to entries of
``findings`` are accepted too.

Plots use matplotlib's object API (``Figure`` + ``FigureCanvasAgg``): no pyplot, no global
backend state. matplotlib is imported lazily, so importing this module for the statistics
alone stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from flows.atomic import write_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "AucCI",
    "Cutoff",
    "auc_rank",
    "evaluate",
    "plot_reference_distribution",
    "roc_auc_ci",
    "spearman",
    "youden_cutoff",
]

MIN_CASES_FOR_AUC = 2  # per class; below this a finding gets n only, no AUROC
MONTAGE_N = 16
_CI_ALPHA = 0.05  # evaluate() reports 95 % intervals
_BOOT_CELLS = 2_000_000  # bootstrap rows × unique values processed per chunk (memory bound)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AucCI:
    """AUROC with a percentile bootstrap confidence interval."""

    auc: float
    lo: float
    hi: float
    n_pos: int
    n_neg: int


@dataclass(frozen=True)
class Cutoff:
    """Youden-optimal operating point; ``score >= threshold`` is called abnormal."""

    threshold: float
    sensitivity: float
    specificity: float
    youden_j: float


def _as_1d_finite(values: Any, name: str) -> FloatArray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    try:
        out = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}") from exc
    bad = ~np.isfinite(out)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s) (NaN/inf) of {out.size}; "
            f"first at index {int(np.flatnonzero(bad)[0])}"
        )
    return out


def _check_binary(labels: Any, scores: Any) -> tuple[npt.NDArray[np.bool_], FloatArray]:
    """Validate ``labels`` (0/1 or bool) and finite ``scores`` of equal length."""
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {lab.shape}")
    if lab.size == 0:
        raise ValueError("labels is empty")
    sc = np.asarray(scores)
    if sc.ndim == 1 and sc.size != lab.size:
        raise ValueError(
            f"length mismatch: labels has {lab.size} entries but scores has {sc.size}"
        )
    s = _as_1d_finite(sc, "scores")
    if lab.dtype == np.bool_:
        y = lab
    else:
        try:
            lf = lab.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"labels must be 0/1 or bool, got dtype {lab.dtype}") from exc
        ok = (lf == 0) | (lf == 1)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"labels must be 0 (normal) or 1 (abnormal); {int((~ok).sum())} other "
                f"value(s), first at index {i}: {lab[i]!r}"
            )
        y = lf == 1
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        which = "1 (abnormal)" if n_pos else "0 (normal)"
        raise ValueError(
            f"only one class present: all {y.size} labels are {which}; AUROC needs both "
            "normals (0) and abnormals (1)"
        )
    return y, s


def _resampled_aucs(
    pos: FloatArray, neg: FloatArray, pos_idx: IntArray, neg_idx: IntArray
) -> FloatArray:
    """AUROC of each resample (rows of ``pos_idx``/``neg_idx``) by Mann–Whitney U.

    AUC = P(S+ > S−) + ½·P(S+ = S−), computed from per-resample counts over the sorted
    unique score values, so ties count one half exactly as in ``roc_auc_score``.
    """
    uniq = np.unique(np.concatenate([pos, neg]))
    m = uniq.size
    pos_v = np.searchsorted(uniq, pos)
    neg_v = np.searchsorted(uniq, neg)
    n_boot = pos_idx.shape[0]
    denom = float(pos_idx.shape[1]) * float(neg_idx.shape[1])
    out = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _BOOT_CELLS // m)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        b = stop - start
        offs = (np.arange(b, dtype=np.int64) * m)[:, None]
        cp = np.bincount((pos_v[pos_idx[start:stop]] + offs).ravel(), minlength=b * m)
        cn = np.bincount((neg_v[neg_idx[start:stop]] + offs).ravel(), minlength=b * m)
        cp2 = cp.reshape(b, m).astype(np.float64)
        cn2 = cn.reshape(b, m).astype(np.float64)
        below = np.cumsum(cn2, axis=1) - cn2  # negatives strictly below each value
        out[start:stop] = (cp2 * (below + 0.5 * cn2)).sum(axis=1) / denom
    return out


def _stratified_resamples(n_pos: int, n_neg: int, n_boot: int, seed: int) -> tuple[IntArray, IntArray]:
    """Bootstrap indices drawn within each class (every draw keeps both and their sizes)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, n_pos, size=(n_boot, n_pos), dtype=np.int64),
            rng.integers(0, n_neg, size=(n_boot, n_neg), dtype=np.int64))


def _class_resampled_aucs(y: npt.NDArray[np.bool_], s: FloatArray, pos_idx: IntArray,
                          neg_idx: IntArray) -> FloatArray:
    """:func:`_resampled_aucs` of one score, the resample indices drawn per class."""
    return _resampled_aucs(s[y], s[~y], pos_idx, neg_idx)


def auc_rank(labels: Any, scores: Any) -> float:
    """AUROC via ranks (Mann–Whitney U); equals ``sklearn.metrics.roc_auc_score``."""
    y, s = _check_binary(labels, scores)
    pos, neg = s[y], s[~y]
    pi = np.arange(pos.size, dtype=np.int64)[None, :]
    ni = np.arange(neg.size, dtype=np.int64)[None, :]
    return float(_resampled_aucs(pos, neg, pi, ni)[0])


def roc_auc_ci(
    labels: Any,
    scores: Any,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> AucCI:
    """AUROC (sklearn) with a stratified bootstrap percentile ``1 − alpha`` CI.

    Positives and negatives are resampled separately (so each draw keeps both classes and
    the class sizes); each draw's AUROC is computed vectorised by Mann–Whitney U.
    Raises ValueError for one class only, length mismatch, empty or non-finite input.
    """
    from sklearn.metrics import roc_auc_score

    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    y, s = _check_binary(labels, scores)
    pos, neg = s[y], s[~y]
    auc = float(roc_auc_score(y, s))
    pos_idx, neg_idx = _stratified_resamples(pos.size, neg.size, n_boot, seed)
    boots = _resampled_aucs(pos, neg, pos_idx, neg_idx)
    lo, hi = np.quantile(boots, [alpha / 2.0, 1.0 - alpha / 2.0])
    return AucCI(auc=auc, lo=float(lo), hi=float(hi), n_pos=int(pos.size), n_neg=int(neg.size))


def auc_difference_ci(labels: Any, a: Any, b: Any, *, n_boot: int = 1000, alpha: float = 0.05,
                      seed: int = 0) -> tuple[float, float, float]:
    """AUROC(a) − AUROC(b) on the same cases, with a paired stratified bootstrap percentile
    ``1 − alpha`` CI: ``(difference, lo, hi)``. Two scores of one test set are correlated, so
    their separate CIs overlap far more than the CI of their difference says."""
    y, sa = _check_binary(labels, a)
    sb = _check_binary(y, b)[1]
    idx = _stratified_resamples(int(y.sum()), int((~y).sum()), n_boot, seed)
    d = _class_resampled_aucs(y, sa, *idx) - _class_resampled_aucs(y, sb, *idx)
    lo, hi = np.quantile(d, [alpha / 2.0, 1.0 - alpha / 2.0])
    return auc_rank(y, sa) - auc_rank(y, sb), float(lo), float(hi)


def auc_gain_lower_bounds(labels: Any, base: Any, candidates: Mapping[str, Any], *,
                          n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
                          ) -> dict[str, tuple[float, float]]:
    """Each candidate score's AUROC gain over ``base`` and a lower bound on it that holds for
    all candidates at once (one-sided, level ``1 − alpha``): ``{name: (gain, lower)}``.

    Picking the best of many scores on one validation set overrates it (the winner's curse);
    a candidate whose simultaneous lower bound is above 0 beats ``base`` even allowing for
    the search. The bound is the bootstrap max-t one (Romano & Wolf 2005): the same
    stratified resamples for every score (the gains are paired), each gain's deviation
    studentised by its bootstrap SD, the ``1 − alpha`` quantile ``q`` of the largest
    deviation over the candidates, lower bound = gain − q·SD. Correlated candidates (the
    same map read out a little differently) cost far less than a Bonferroni correction.
    """
    if not candidates:
        return {}
    y, b = _check_binary(labels, base)
    idx = _stratified_resamples(int(y.sum()), int((~y).sum()), n_boot, seed)
    b_auc, b_boot = auc_rank(y, b), _class_resampled_aucs(y, b, *idx)
    names = list(candidates)
    gains, devs, sds = [], [], []
    for name in names:
        s = _check_binary(y, candidates[name])[1]
        g, gb = auc_rank(y, s) - b_auc, _class_resampled_aucs(y, s, *idx) - b_boot
        sd = float(gb.std()) or 1e-12  # a candidate identical to the base: no spread
        gains.append(g)
        sds.append(sd)
        devs.append((gb - g) / sd)
    q = float(np.quantile(np.max(np.stack(devs), axis=0), 1.0 - alpha))
    return {n: (g, g - q * sd) for n, g, sd in zip(names, gains, sds, strict=True)}


def better_than_default(labels: Any, default: Any, candidates: Mapping[str, Any], *,
                        alpha: float = 0.05, min_lower: float = 0.0
                        ) -> tuple[str | None, dict[str, tuple[float, float]]]:
    """The candidate to use instead of ``default`` (None: keep it), and every candidate's
    ``(gain, lower bound)`` from :func:`auc_gain_lower_bounds`: among the candidates whose
    simultaneous lower bound is above ``min_lower``, the one with the largest gain."""
    bounds = auc_gain_lower_bounds(labels, default, candidates, alpha=alpha)
    better = [k for k, (_, lower) in bounds.items() if lower > min_lower]
    return (max(better, key=lambda k: bounds[k][0]) if better else None), bounds


def youden_cutoff(labels: Any, scores: Any) -> Cutoff:
    """Threshold maximising J = sensitivity + specificity − 1 (``score >= threshold``).

    Only finite thresholds (actual score values) are considered; among equal J the highest
    threshold (the most specific operating point) wins.
    """
    from sklearn.metrics import roc_curve

    y, s = _check_binary(labels, scores)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    finite = np.isfinite(thr)
    j = np.where(finite, tpr - fpr, -np.inf)
    i = int(np.argmax(j))
    return Cutoff(
        threshold=float(thr[i]),
        sensitivity=float(tpr[i]),
        specificity=float(1.0 - fpr[i]),
        youden_j=float(tpr[i] - fpr[i]),
    )


def spearman(x: Any, y: Any) -> tuple[float, float]:
    """Spearman ρ and its two-sided p-value (``scipy.stats.spearmanr``).

    Raises ValueError (instead of returning NaN) for non-finite values, unequal lengths,
    fewer than 3 points or a constant input.
    """
    from scipy.stats import spearmanr

    xa = np.asarray(x)
    ya = np.asarray(y)
    if xa.ndim == 1 and ya.ndim == 1 and xa.size != ya.size:
        raise ValueError(f"length mismatch: x has {xa.size} entries but y has {ya.size}")
    xf = _as_1d_finite(xa, "x")
    yf = _as_1d_finite(ya, "y")
    if xf.size < 3:
        raise ValueError(f"Spearman correlation needs at least 3 points, got {xf.size}")
    for name, a in (("x", xf), ("y", yf)):
        if float(np.ptp(a)) == 0.0:
            raise ValueError(f"{name} is constant ({a[0]:g}); Spearman correlation undefined")
    res = spearmanr(xf, yf)
    rho, p = float(res[0]), float(res[1])
    if not (math.isfinite(rho) and math.isfinite(p)):
        raise ValueError("Spearman correlation is undefined for this input")
    return rho, p


# --------------------------------------------------------------------------------------
# Plot helpers (object API, no pyplot)
# --------------------------------------------------------------------------------------


def _figure(width: float, height: float, dpi: int = 100) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, bbox_inches="tight")


def _colour(i: int) -> str:
    palette = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
        "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
    ]
    return palette[i % len(palette)]


_NORMAL_COLOUR = "#4d4d4d"


def plot_reference_distribution(
    path: Path | str,
    scores: Any,
    *,
    marker: float | None = None,
    title: str = "",
) -> Path:
    """Small histogram PNG of a calibration reference distribution, optional marker line.

    The marker's percentile within the reference is shown in its legend label.
    """
    s = _as_1d_finite(scores, "scores")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure(4.0, 2.6)
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = float(s.min()), float(s.max())
    if marker is not None and math.isfinite(marker):
        lo, hi = min(lo, marker), max(hi, marker)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, min(40, max(10, int(np.sqrt(s.size)))) + 1)
    ax.hist(s, bins=bins.tolist(), color="#9ecae1", edgecolor="#3182bd", linewidth=0.5)
    if marker is not None and math.isfinite(marker):
        pct = 100.0 * float(np.mean(s <= marker))
        ax.axvline(marker, color="#d62728", linewidth=2, label=f"{marker:.3g} ({pct:.0f}th pct)")
        ax.legend(fontsize=7, loc="best", frameon=False)
    ax.set_xlabel("abnormality score", fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title or f"reference (n={s.size})", fontsize=9)
    _save(fig, out)
    return out


# --------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return s or "x"


def _unique_slugs(names: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    used: set[str] = set()
    for n in names:
        base = _slug(n)
        s, k = base, 2
        while s in used:
            s, k = f"{base}_{k}", k + 1
        used.add(s)
        out[n] = s
    return out


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only (numpy scalars/arrays, Paths, dataclasses converted; NaN → None)."""
    if obj is None or isinstance(obj, str | bool):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    return str(obj)


def _class_labels(labels: Any, findings: Sequence[str]) -> IntArray:
    names = [str(f) for f in findings]
    if len(names) < 2:
        raise ValueError(
            f"findings must name the normal class (label 0) and at least one finding, "
            f"got {names!r}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"findings has duplicate names: {names!r}")
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {lab.shape}")
    if lab.size == 0:
        raise ValueError("labels is empty")
    if lab.dtype.kind in "USO":
        index = {n: i for i, n in enumerate(names)}
        out = np.empty(lab.size, dtype=np.int64)
        for i, v in enumerate(lab.tolist()):
            if str(v) not in index:
                raise ValueError(f"label {v!r} at index {i} is not one of findings {names!r}")
            out[i] = index[str(v)]
        return out
    if lab.dtype.kind not in "biu":
        lf = lab.astype(np.float64)
        if not np.all(np.isfinite(lf)) or not np.all(lf == np.round(lf)):
            bad = np.flatnonzero(~np.isfinite(lf) | (lf != np.round(lf)))
            raise ValueError(
                f"labels must be integer class indices; {bad.size} non-integer value(s), "
                f"first at index {int(bad[0])}: {lab[bad[0]]!r}"
            )
    out = lab.astype(np.int64)
    oob = (out < 0) | (out >= len(names))
    if oob.any():
        i = int(np.flatnonzero(oob)[0])
        raise ValueError(
            f"labels must be in 0..{len(names) - 1} (indices into findings); "
            f"{int(oob.sum())} out of range, first at index {i}: {out[i]}"
        )
    return out


def _auc_entry(y: npt.NDArray[np.bool_], s: FloatArray, n_boot: int, seed: int) -> dict[str, Any]:
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos < MIN_CASES_FOR_AUC or n_neg < MIN_CASES_FOR_AUC:
        return {
            "auc": None, "lo": None, "hi": None, "n_pos": n_pos, "n_neg": n_neg,
            "note": f"too few cases (<{MIN_CASES_FOR_AUC} per class) for AUROC",
        }
    ci = roc_auc_ci(y, s, n_boot=n_boot, alpha=_CI_ALPHA, seed=seed)
    cut = youden_cutoff(y, s)
    return {**asdict(ci), "youden": asdict(cut)}


def _spearman_entry(x: FloatArray, y: FloatArray) -> dict[str, Any]:
    try:
        rho, p = spearman(x, y)
    except ValueError as exc:
        return {"rho": None, "p": None, "n": int(x.size), "note": str(exc)}
    return {"rho": rho, "p": p, "n": int(x.size)}


def format_auc(e: Mapping[str, Any], digits: int = 2) -> str:
    """An AUROC entry as ``auc [lo, hi]``, or the class sizes that were too small for one
    (fewer than ``MIN_CASES_FOR_AUC`` of a class)."""
    if e.get("auc") is None:
        return f"n/a ({e['n_pos']} abnormal, {e['n_neg']} normal)"
    return f"{e['auc']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"


def _display_slices(images: Any, n: int) -> Any:
    """Validate the image array's shape; returns it unchanged (slicing happens per panel)."""
    shape = tuple(np.shape(images))
    if len(shape) not in (3, 4, 5):
        raise ValueError(
            f"images must be (N,1,H,W) 2D or (N,1,D,H,W) 3D (or (N,H,W)), got shape {shape}"
        )
    if shape[0] != n:
        raise ValueError(f"length mismatch: labels has {n} entries but images has {shape[0]}")
    if len(shape) in (4, 5) and shape[1] != 1:
        raise ValueError(f"images must have one channel (N,1,...), got shape {shape}")
    return images


def _panel(images: Any, i: int) -> FloatArray:
    img = np.asarray(images[i], dtype=np.float64)
    if img.ndim == 2:
        return img
    img = img[0]
    if img.ndim == 3:  # (D, H, W): middle slice
        img = img[img.shape[0] // 2]
    return img


def _montage(
    path: Path,
    images: Any,
    order: IntArray,
    scores: FloatArray,
    labels: IntArray,
    names: Sequence[str],
    heading: str,
) -> None:
    """One mosaic image (fast: a single imshow) with a caption above each panel."""
    from matplotlib import colormaps

    k = min(MONTAGE_N, order.size)
    ncol = 4 if k > 4 else max(1, k)
    nrow = max(1, math.ceil(k / ncol))
    panels: list[FloatArray] = []
    for j in range(k):
        img = _panel(images, int(order[j]))
        finite = img[np.isfinite(img)]
        vmin, vmax = (0.0, 1.0)
        if finite.size:
            vmin, vmax = (float(v) for v in np.percentile(finite, [1.0, 99.0]))
        if vmax <= vmin:
            vmax = vmin + 1.0
        panels.append(np.clip((img - vmin) / (vmax - vmin), 0.0, 1.0))
    H = max(p.shape[0] for p in panels)
    W = max(p.shape[1] for p in panels)
    cap = max(2, round(0.24 * W))  # caption band above each panel (in pixels)
    gap = max(1, round(0.04 * W))
    tot_h, tot_w = nrow * (H + cap), ncol * W + (ncol - 1) * gap
    mosaic = np.full((tot_h, tot_w), np.nan)
    fig_w, head_in = 2.0 * ncol, 0.45
    fig_h = fig_w * tot_h / tot_w + head_in
    fig = _figure(fig_w, fig_h, dpi=110)
    ax = fig.add_axes((0.0, 0.0, 1.0, (fig_h - head_in) / fig_h))
    for j, p in enumerate(panels):
        i = int(order[j])
        r, c = divmod(j, ncol)
        y0, x0 = r * (H + cap) + cap, c * (W + gap)
        mosaic[y0 : y0 + p.shape[0], x0 : x0 + p.shape[1]] = p
        ax.text(
            x0 + W / 2.0, y0 - 0.03 * W,
            f"#{j + 1} {names[labels[i]]}\nscore {scores[i]:.4g} (case {i})",
            ha="center", va="bottom", fontsize=7,
            color=_NORMAL_COLOUR if labels[i] == 0 else "#d62728",
        )
    cmap = colormaps["gray"].with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=0.0, vmax=1.0, aspect="equal")
    ax.set_axis_off()
    fig.suptitle(heading, fontsize=10, y=1.0 - 0.12 / fig_h, va="top")
    fig.savefig(path)


def _plot_roc_overall(
    path: Path,
    y: npt.NDArray[np.bool_],
    scores: Mapping[str, FloatArray],
    entries: Mapping[str, Mapping[str, Any]],
    title: str,
) -> None:
    from sklearn.metrics import roc_curve

    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    for c, (name, s) in enumerate(scores.items()):
        fpr, tpr, _ = roc_curve(y, s)
        e = entries[name]
        ax.plot(fpr, tpr, color=_colour(c), linewidth=1.6, label=f"{name}: {format_auc(e)}")
        cut = e.get("youden")
        if cut:
            ax.plot(1.0 - cut["specificity"], cut["sensitivity"], "o", color=_colour(c), ms=5)
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    ax.set_title(f"{title + ': ' if title else ''}ROC, all findings vs normal\n"
                 f"({n_pos} abnormal, {n_neg} normal; AUROC [95% CI]; dot = Youden)",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_roc_findings(
    path: Path,
    cls: IntArray,
    names: Sequence[str],
    scores: Mapping[str, FloatArray],
    per_finding: Mapping[str, Mapping[str, Mapping[str, Any]]],
    title: str,
) -> None:
    from sklearn.metrics import roc_curve

    finds = list(range(1, len(names)))
    ncol = min(3, len(finds))
    nrow = math.ceil(len(finds) / ncol)
    fig = _figure(4.0 * ncol, 4.0 * nrow + 0.3)
    for j, k in enumerate(finds):
        ax = fig.add_subplot(nrow, ncol, j + 1)
        sel = (cls == 0) | (cls == k)
        y = cls[sel] == k
        fname = names[k]
        for c, (sname, s) in enumerate(scores.items()):
            e = per_finding[sname][fname]
            if e.get("auc") is None:
                continue
            fpr, tpr, _ = roc_curve(y, s[sel])
            ax.plot(fpr, tpr, color=_colour(c), linewidth=1.4, label=f"{sname}: {format_auc(e)}")
        n_pos = int(y.sum())
        if n_pos < MIN_CASES_FOR_AUC or int((~y).sum()) < MIN_CASES_FOR_AUC:
            ax.text(0.5, 0.5, f"n={n_pos}: too few cases", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="#777777")
        else:
            ax.legend(loc="lower right", fontsize=7)
        ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_title(f"{fname} (n={n_pos}) vs normal (n={int((~y).sum())})", fontsize=9)
        ax.set_xlabel("1 − specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title + ': ' if title else ''}ROC per finding", fontsize=10)
    _save(fig, path)


def _plot_hist(
    path: Path,
    sname: str,
    s: FloatArray,
    cls: IntArray,
    names: Sequence[str],
    cut: Mapping[str, Any] | None,
    title: str,
) -> None:
    fig = _figure(6.0, 3.8)
    ax: Axes = fig.add_subplot(1, 1, 1)
    edges = np.histogram_bin_edges(s, bins="auto")
    if edges.size > 61:
        edges = np.linspace(float(s.min()), float(s.max()), 61)
    for k, name in enumerate(names):
        v = s[cls == k]
        if v.size == 0:
            continue
        colour = _NORMAL_COLOUR if k == 0 else _colour(k)
        ax.hist(v, bins=edges.tolist(), density=True, histtype="stepfilled" if k == 0 else "step",
                alpha=0.35 if k == 0 else 1.0, linewidth=1.6, color=colour,
                label=f"{name} (n={v.size})")
    if cut:
        ax.axvline(cut["threshold"], color="black", linestyle="--", linewidth=1.2,
                   label=f"Youden cutoff {cut['threshold']:.4g}\n(sens {cut['sensitivity']:.2f}, "
                         f"spec {cut['specificity']:.2f})")
    ax.set_xlabel(f"{sname} (higher = more abnormal)")
    ax.set_ylabel("density")
    ax.set_title(f"{title + ': ' if title else ''}{sname} by class", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    _save(fig, path)


def _plot_zero_fraction(
    path: Path,
    sname: str,
    s: FloatArray,
    zf: FloatArray,
    cls: IntArray,
    names: Sequence[str],
    sp: Mapping[str, Mapping[str, Any]],
    title: str,
) -> None:
    fig = _figure(5.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for k, name in enumerate(names):
        sel = cls == k
        if not sel.any():
            continue
        colour = _NORMAL_COLOUR if k == 0 else _colour(k)
        ax.scatter(zf[sel], s[sel], s=8, alpha=0.6, color=colour, edgecolors="none",
                   label=f"{name} (n={int(sel.sum())})")

    def fmt(e: Mapping[str, Any]) -> str:
        if e.get("rho") is None:
            return "ρ n/a"
        return f"ρ = {e['rho']:.3f} (p = {e['p']:.2g})"

    ax.set_title(
        f"{title + ': ' if title else ''}{sname} vs zero-pixel fraction\n"
        f"Spearman all: {fmt(sp['all'])}; normals: {fmt(sp['normal'])}",
        fontsize=9,
    )
    ax.set_xlabel("fraction of zero pixels")
    ax.set_ylabel(f"{sname} (higher = more abnormal)")
    ax.legend(fontsize=7, markerscale=2)
    ax.grid(alpha=0.3)
    _save(fig, path)




def _markdown(summary: Mapping[str, Any], names: Sequence[str]) -> str:
    finds = list(names[1:])
    lines: list[str] = []
    lines.append(f"# {summary['title'] or 'Evaluation'}")
    lines.append("")
    counts = ", ".join(f"{k}: {v}" for k, v in summary["classes"].items())
    lines.append(f"n = {summary['n']} ({counts}). AUROC with stratified bootstrap 95 % CI "
                 f"({summary['n_boot']} draws, seed {summary['seed']}); scores: higher = more "
                 "abnormal; each finding vs all normals.")
    lines.append("")
    header = ["score", "overall", *finds]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    for sname, e in summary["scores"].items():
        row = [sname, format_auc(e["overall"])]
        row += [format_auc(e["per_finding"][f]) for f in finds]
        lines.append("| " + " | ".join(row) + " |")
    paired = summary.get("paired_differences", {})
    if paired.get("differences"):
        lines.append("")
        lines.append(f"## AUROC of {paired['against']} minus each other score (paired bootstrap 95 % CI)")
        lines.append("")
        for sname, d in paired["differences"].items():
            lines.append(f"- **{sname}**: {d['difference']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    lines.append("")
    lines.append("## Youden cutoff (score ≥ threshold → abnormal)")
    lines.append("")
    for sname, e in summary["scores"].items():
        c = e["youden"]
        if c is None:
            lines.append(f"- **{sname}**: n/a")
        else:
            lines.append(f"- **{sname}**: threshold {c['threshold']:.4g} → sensitivity "
                         f"{c['sensitivity']:.3f}, specificity {c['specificity']:.3f} "
                         f"(J = {c['youden_j']:.3f})")
    if summary.get("zero_fraction_given"):
        lines.append("")
        lines.append("## Spearman ρ vs zero-pixel fraction (background confound)")
        lines.append("")
        for sname, e in summary["scores"].items():
            sp = e["spearman_zero_fraction"]
            parts = []
            for key, label in (("all", "all cases"), ("normal", "normals only")):
                d = sp[key]
                if d["rho"] is None:
                    parts.append(f"{label}: n/a ({d.get('note', '')})")
                else:
                    parts.append(f"{label}: ρ = {d['rho']:.3f} (p = {d['p']:.2g}, n = {d['n']})")
            lines.append(f"- **{sname}**: " + "; ".join(parts))
    lines.append("")
    return "\n".join(lines)


def evaluate(
    out_dir: Path,
    *,
    labels: np.ndarray,
    findings: Sequence[str],
    scores: Mapping[str, np.ndarray],
    images: np.ndarray | None = None,
    zero_fraction: np.ndarray | None = None,
    title: str = "",
    n_boot: int = 1000,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the evaluation report into ``out_dir`` and return its JSON-serialisable summary.

    ``labels[i]`` indexes ``findings`` (``findings[0]`` = normal, label 0); ``scores`` maps a
    name to per-case abnormality scores (higher = more abnormal). Files written:
    ``roc.png``, ``roc_findings.png``, ``hist_<score>.png``, ``montage_<score>_most.png`` and
    ``montage_<score>_least.png`` (with ``images``), ``zero_fraction_<score>.png`` (with
    ``zero_fraction``), ``summary.json`` and ``summary.md``. A finding with fewer than 2
    cases gets its n and no AUROC.
    """
    names = [str(f) for f in findings]
    cls = _class_labels(labels, names)
    n = int(cls.size)
    y = cls > 0
    if not y.any() or y.all():
        which = "abnormal" if y.all() else "normal"
        raise ValueError(f"only one class present: all {n} cases are {which}")
    if not scores:
        raise ValueError("scores is empty: pass at least one named score array")
    svals: dict[str, FloatArray] = {}
    for sname, arr in scores.items():
        a = np.asarray(arr)
        if a.ndim == 1 and a.size != n:
            raise ValueError(
                f"length mismatch: labels has {n} entries but score {sname!r} has {a.size}"
            )
        svals[str(sname)] = _as_1d_finite(a, f"score {sname!r}")
    zf: FloatArray | None = None
    if zero_fraction is not None:
        za = np.asarray(zero_fraction)
        if za.ndim == 1 and za.size != n:
            raise ValueError(
                f"length mismatch: labels has {n} entries but zero_fraction has {za.size}"
            )
        zf = _as_1d_finite(za, "zero_fraction")
    if images is not None:
        _display_slices(images, n)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slugs = _unique_slugs(list(svals))
    files: list[str] = []

    score_entries: dict[str, dict[str, Any]] = {}
    for sname, s in svals.items():
        overall = _auc_entry(y, s, n_boot, seed)
        per_finding: dict[str, dict[str, Any]] = {}
        for k in range(1, len(names)):
            sel = (cls == 0) | (cls == k)
            per_finding[names[k]] = _auc_entry(cls[sel] == k, s[sel], n_boot, seed)
        entry: dict[str, Any] = {
            "overall": {k: v for k, v in overall.items() if k != "youden"},
            "per_finding": per_finding,
            "youden": overall.get("youden"),
            "mean": {names[k]: float(s[cls == k].mean()) for k in range(len(names))
                     if (cls == k).any()},
            "files": {},
        }
        if zf is not None:
            entry["spearman_zero_fraction"] = {
                "all": _spearman_entry(zf, s),
                "normal": _spearman_entry(zf[cls == 0], s[cls == 0]),
            }
        score_entries[sname] = entry

    first = next(iter(svals))
    paired = {name: dict(zip(("difference", "lo", "hi"),
                             auc_difference_ci(y, svals[first], sv, n_boot=n_boot, seed=seed),
                             strict=True))
              for name, sv in svals.items() if name != first}

    # --- plots ---
    _plot_roc_overall(
        out / "roc.png", y, svals,
        {k: {**v["overall"], "youden": v["youden"]} for k, v in score_entries.items()}, title,
    )
    files.append("roc.png")
    _plot_roc_findings(
        out / "roc_findings.png", cls, names, svals,
        {k: v["per_finding"] for k, v in score_entries.items()}, title,
    )
    files.append("roc_findings.png")
    for sname, s in svals.items():
        slug = slugs[sname]
        e = score_entries[sname]
        fmap: dict[str, str] = e["files"]
        fn = f"hist_{slug}.png"
        _plot_hist(out / fn, sname, s, cls, names, e["youden"], title)
        fmap["hist"] = fn
        if images is not None:
            most = np.argsort(-s, kind="stable").astype(np.int64)
            least = np.argsort(s, kind="stable").astype(np.int64)
            for which, order, word in (("most", most, "most"), ("least", least, "least")):
                fn = f"montage_{slug}_{which}.png"
                k = min(MONTAGE_N, n)
                head = f"{title + ': ' if title else ''}{sname}: {k} {word} abnormal"
                _montage(out / fn, images, order, s, cls, names, head)
                fmap[f"montage_{which}"] = fn
        if zf is not None:
            fn = f"zero_fraction_{slug}.png"
            _plot_zero_fraction(
                out / fn, sname, s, zf, cls, names, e["spearman_zero_fraction"], title
            )
            fmap["zero_fraction"] = fn
        files.extend(fmap.values())

    summary: dict[str, Any] = {
        "title": title,
        "n": n,
        "n_normal": int((~y).sum()),
        "n_abnormal": int(y.sum()),
        "classes": {names[k]: int((cls == k).sum()) for k in range(len(names))},
        "findings": names[1:],
        "normal_class": names[0],
        "convention": "scores are abnormality scores: higher = more abnormal; "
        "Youden: score >= threshold -> abnormal",
        "ci": "stratified bootstrap percentile 95% CI",
        "n_boot": int(n_boot),
        "seed": int(seed),
        "zero_fraction_given": zf is not None,
        "images_given": images is not None,
        "scores": score_entries,
        # AUROC of the first score minus each other's, paired bootstrap 95 % CI
        "paired_differences": {"against": first, "differences": paired},
        "files": [*files, "summary.json", "summary.md"],
        "extra": _jsonable(dict(extra)) if extra is not None else {},
    }
    summary = _jsonable(summary)
    write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    write_text(out / "summary.md", _markdown(summary, names))
    return summary


def save_samples(path: Path, images: np.ndarray, *, title: str = "", ncol: int = 4) -> Path:
    """A plain grid of images (e.g. samples drawn from a model), middle slice for 3D."""
    from matplotlib import colormaps

    n = int(np.shape(images)[0])
    if n == 0:
        raise ValueError("no images to show")
    ncol = max(1, min(ncol, n))
    nrow = math.ceil(n / ncol)
    panels = [_panel(images, i) for i in range(n)]
    H, W = panels[0].shape
    mosaic = np.full((nrow * (H + 1), ncol * (W + 1)), np.nan)
    for j, p in enumerate(panels):
        r, c = divmod(j, ncol)
        mosaic[r * (H + 1): r * (H + 1) + H, c * (W + 1): c * (W + 1) + W] = p
    fig = _figure(2.0 * ncol, 2.0 * nrow * H / W + 0.4, dpi=110)
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.92))
    ax.imshow(mosaic, cmap=colormaps["gray"].with_extremes(bad="white"), vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
