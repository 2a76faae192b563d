"""Small PNG plots for the pages (matplotlib's Agg canvas; no pyplot state, thread-safe)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from sqlalchemy import select

from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Instance, Result

__all__ = ["calibration_png", "overlay_png", "reference_png"]

_FG, _REF, _NORMAL, _ABN, _CASE = "#1d2125", "#8fa7c2", "#3b8a3e", "#b3001b", "#e0601a"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def reference_png(reference: list[float], score: float, threshold: float | None,
                  percentile: float | None, label: str = "abnormality score") -> bytes:
    """Where one case's score falls on the bundle's reference distribution."""
    ref = np.asarray(reference, dtype=np.float64)
    fig = _figure(4.2, 1.9)
    ax = fig.add_subplot()
    lo, hi = np.percentile(np.append(ref, score), [0.5, 99.5])
    pad = 0.05 * (hi - lo or 1.0)
    bins = np.linspace(min(lo, score) - pad, max(hi, score) + pad, 40)
    ax.hist(np.clip(ref, bins[0], bins[-1]), bins=bins, color=_REF, label=f"reference (n={ref.size})")
    if threshold is not None:
        ax.axvline(threshold, color=_FG, ls="--", lw=1, label="threshold")
    ax.axvline(score, color=_CASE, lw=2.5, label="this case" + (f" ({percentile:.0f}th pct)"
                                                                 if percentile is not None else ""))
    ax.set_xlabel(label, fontsize=8)
    ax.set_yticks([])
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    return _png(fig)


def calibration_png(cal: dict[str, Any], title: str = "") -> bytes:
    """The bundle's calibration: ROC on the labelled validation set (when recorded) and the
    score histograms (reference; validation normal and abnormal) with the threshold."""
    from sklearn.metrics import roc_auc_score, roc_curve

    val = cal.get("validation") or None
    fig = _figure(8.0 if val else 4.4, 3.0)
    axes = fig.subplots(1, 2 if val else 1, squeeze=False)[0]
    hist = axes[-1]
    ref = np.asarray(cal.get("reference") or [], dtype=np.float64)
    allv = [ref] + ([np.asarray(val["scores"], dtype=np.float64)] if val else [])
    data = np.concatenate(allv) if sum(a.size for a in allv) else np.zeros(1)
    lo, hi = np.percentile(data, [0.5, 99.5])
    bins: Any = np.linspace(lo, hi, 40) if hi > lo else 20
    hist.hist(ref, bins=bins, color=_REF, alpha=0.8, density=True, label="reference (mixture)")
    if val:
        y = np.asarray(val["labels"]) > 0.5
        s = np.asarray(val["scores"], dtype=np.float64)
        hist.hist(s[~y], bins=bins, histtype="step", lw=1.8, color=_NORMAL, density=True,
                  label=f"validation normal (n={int((~y).sum())})")
        hist.hist(s[y], bins=bins, histtype="step", lw=1.8, color=_ABN, density=True,
                  label=f"validation abnormal (n={int(y.sum())})")
        roc = axes[0]
        fpr, tpr, _ = roc_curve(y, s)
        roc.plot(fpr, tpr, color=_ABN, lw=2, label=f"AUROC {roc_auc_score(y, s):.3f}")
        roc.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":")
        yd = cal.get("youden") or {}
        if "sensitivity" in yd:
            roc.plot(1 - yd["specificity"], yd["sensitivity"], "o", color=_FG, label="operating point")
        roc.set_xlabel("1 − specificity", fontsize=8)
        roc.set_ylabel("sensitivity", fontsize=8)
        roc.set_title("ROC on the validation set", fontsize=9)
        roc.legend(fontsize=7, loc="lower right", frameon=False)
        roc.tick_params(labelsize=7)
        roc.set_aspect("equal")
    if cal.get("threshold") is not None:
        hist.axvline(float(cal["threshold"]), color=_FG, ls="--", lw=1,
                     label=f"threshold ({cal.get('threshold_method', '')})")
    hist.set_title(title or "score distributions", fontsize=9)
    hist.set_xlabel("abnormality score", fontsize=8)
    hist.set_yticks([])
    hist.tick_params(labelsize=7)
    hist.legend(fontsize=7, frameon=False)
    return _png(fig)


def overlay_png(db: Database, blobs: BlobStore, result_id: int) -> bytes:
    """A thumbnail of the result's map over the middle (or most abnormal) source image."""
    import pydicom
    from matplotlib.figure import Figure
    from pydicom.pixels import apply_modality_lut

    from triage.report.sc import render
    from triage.report.seg import normalise_map

    with db.sessions() as s:
        res = s.get(Result, result_id)
        if res is None or not res.map_blob:
            raise LookupError("no map for this result")
        keys = list((res.details or {}).get("instance_blobs") or [])
        order = list((res.details or {}).get("slice_order") or [])
        kind = res.kind
        values = np.load(io.BytesIO(blobs.get(res.map_blob)), allow_pickle=False).astype(np.float32)
    if not keys:
        raise LookupError("the analysed instances are not recorded")
    k = 0
    if values.ndim == 3:
        filled = np.where(np.isfinite(values), values, -np.inf)
        k = int(np.unravel_index(np.argmax(filled), filled.shape)[0])
    key = keys[0]
    if order and k < len(order):  # the blob of the map's slice k, by one indexed look-up
        with db.sessions() as s:
            key = s.scalar(select(Instance.blob).where(Instance.sop_instance_uid == order[k],
                                                       Instance.blob.in_(keys))) or key
    src = pydicom.dcmread(blobs.path(key))
    norm, _, _ = normalise_map(values)
    rgb = render(apply_modality_lut(src.pixel_array, src), norm if norm.ndim == 2 else norm[k], kind,
                 str(src.get("PhotometricInterpretation", "")) == "MONOCHROME1")
    fig = Figure(figsize=(3, 3 * rgb.shape[0] / rgb.shape[1]), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgb)
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
