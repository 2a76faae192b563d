"""Evaluating Log P maps against ground truth (CT-3DFlow's Table 1 metrics and more).

Patient level: AUROC (with a bootstrap CI) of the abnormal volume and of the map's peak, and
F1 / accuracy of the bundle's decision (abnormal volume > T). Lesion level: the hit rate
(a lesion is hit when a detected component overlaps it) by lesion volume bin. Voxel level:
Dice of the binarised map against the lesion mask on abnormal cases. Overlay PNGs show
axial and coronal slices through each case's largest lesion (or its centre) with the map.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flows.atomic import write_bytes
from flows.evaluate import _figure, _save, auc_difference_ci, format_auc, roc_auc_ci
from flows.lesions import Lesion

if TYPE_CHECKING:
    from flows.patchbundle import MapResult

VOLUME_BINS = ((0.0, 1.0), (1.0, 5.0), (5.0, 20.0), (20.0, float("inf")))


@dataclass
class CaseView:
    """One 2D slice of a case for its overlay: the image, the map, the binarised map, the truth."""

    image: np.ndarray
    values: np.ndarray
    binary: np.ndarray
    truth: np.ndarray | None
    name: str  # "axial 12"


@dataclass
class CaseMap:
    """One evaluated case: what was detected, the truth, the per-case measures, and the two
    slices its overlay shows. The volumes themselves are not kept, so evaluating hundreds of
    full-size CTs holds one at a time."""

    lesions: list[Lesion]
    abnormal_cm3: float
    abnormal: bool
    peak: float
    label: int
    finding: str
    truth_cm3: float  # 0 without a mask or without a lesion
    hit: bool | None  # a detected component overlaps the lesion (None: no lesion mask)
    dice: float | None  # of the binarised map against the lesion mask (None: no lesion mask)
    views: tuple[CaseView, CaseView]  # axial and coronal through the lesion (or the centre)


def case_from_result(image: np.ndarray, result: MapResult, voxel_threshold: float, *,
                     label: int, finding: str, truth: np.ndarray | None,
                     spacing: tuple[float, ...]) -> CaseMap:
    """A :class:`CaseMap` from a patch scorer's result and the case's ground truth."""
    binary = np.nan_to_num(result.values, nan=-np.inf) >= voxel_threshold
    lesion = truth is not None and bool(truth.any())
    ref = truth if lesion else binary
    assert ref is not None
    if ref.any():
        c = np.argwhere(ref).mean(axis=0)
        z, y = int(c[0]), int(c[1])
    else:
        z, y = image.shape[0] // 2, image.shape[1] // 2
    def view(cut: Any, name: str) -> CaseView:  # copies: a view would keep the volume alive
        return CaseView(np.array(image[cut]), np.array(result.values[cut]), np.array(binary[cut]),
                        None if truth is None else np.array(truth[cut]), name)

    coronal = (slice(None, None, -1), y)  # [:, y] with the slices flipped: head up
    views = (view((z,), f"axial {z}"), view(coronal, f"coronal {y}"))
    hit = dice = None
    cm3 = 0.0
    if lesion:
        assert truth is not None
        hit, dice = bool((binary & truth).any()), _dice(binary, truth)
        cm3 = float(truth.sum() * np.prod(spacing) / 1000.0)
    return CaseMap(lesions=result.lesions, abnormal_cm3=result.abnormal_cm3,
                   abnormal=result.abnormal, peak=result.peak, label=label, finding=finding,
                   truth_cm3=cm3, hit=hit, dice=dice, views=views)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def summarise(cases: Sequence[CaseMap], *, n_boot: int = 1000) -> dict[str, Any]:
    y = np.array([c.label for c in cases])
    vol = np.array([c.abnormal_cm3 for c in cases])
    peak = np.array([c.peak for c in cases])
    pred = np.array([c.abnormal for c in cases])
    out: dict[str, Any] = {"n": len(cases), "n_abnormal": int(y.sum())}
    if 0 < y.sum() < len(y):
        for name, s in (("abnormal_volume", vol), ("peak", peak)):
            ci = roc_auc_ci(y, s, n_boot=n_boot)
            out[f"auroc_{name}"] = {"auc": ci.auc, "lo": ci.lo, "hi": ci.hi}
        findings = sorted({c.finding for c in cases} - {"normal"})
        out["auroc_volume_per_finding"] = {}
        for f in findings:
            keep = np.array([c.finding in ("normal", f) for c in cases])
            out["auroc_volume_per_finding"][f] = roc_auc_ci(y[keep], vol[keep], n_boot=200).auc
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    n_pos, n_neg = int(y.sum()), int((y == 0).sum())
    out["accuracy"] = float((pred == (y == 1)).mean())
    # undefined without abnormal (or normal) cases: None, not 0, in a set of one class
    out["f1"] = 2 * tp / (2 * tp + fp + fn) if n_pos else None
    out["sensitivity"] = tp / n_pos if n_pos else None
    out["specificity"] = float((~pred & (y == 0)).sum()) / n_neg if n_neg else None
    with_truth = [c for c in cases if c.label and c.hit is not None]
    if with_truth:
        bins = {}
        for lo, hi in VOLUME_BINS:
            in_bin = [c for c in with_truth if lo <= c.truth_cm3 < hi]
            if in_bin:
                rate = float(np.mean([bool(c.hit) for c in in_bin]))
                bins[f"{lo:g}-{hi:g} cm3"] = {"n": len(in_bin), "hit_rate": rate}
        out["lesion_hit_rate"] = bins
        big = [c for c in with_truth if c.truth_cm3 >= 1.0]
        out["hit_rate_ge_1cm3"] = float(np.mean([bool(c.hit) for c in big])) if big else None
        out["dice_abnormal_mean"] = float(np.mean([c.dice for c in with_truth]))
    return out


def overlay_png(case: CaseMap, path: Path, *, window: tuple[float, float], title: str) -> Path:
    """Axial and coronal slices with the map (colour, transparent where low) and outlines."""
    fig = _figure(8, 4.2)
    finite = np.concatenate([v.values[np.isfinite(v.values)] for v in case.views])
    vmin, vmax = (np.percentile(finite, [50, 99.5]) if finite.size else (0.0, 1.0))
    for k, v in enumerate(case.views):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(v.image, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
        shown = np.ma.masked_where(~np.isfinite(v.values) | (v.values < vmin), v.values)
        ax.imshow(shown, cmap="inferno", alpha=0.5, vmin=vmin, vmax=vmax, interpolation="nearest")
        if v.binary.any():
            ax.contour(v.binary, [0.5], colors="cyan", linewidths=0.8)
        if v.truth is not None and v.truth.any():
            ax.contour(v.truth, [0.5], colors="lime", linewidths=0.8, linestyles="dashed")
        ax.set_title(v.name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
    return path


def compare_maps(labels: Sequence[int], sizes: Mapping[str, Sequence[float]], chosen: str, *,
                 n_boot: int = 1000) -> dict[str, dict[str, Any]]:
    """Every map's patient-level AUROC (its abnormal volume, at its own calibrated threshold)
    with a 95 % CI, and its difference from the bundle's chosen map on the same volumes with a
    paired bootstrap CI: issue 3's "both maps side by side", on a site's own test set."""
    y = np.asarray(labels)
    if not 0 < y.sum() < len(y):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, vol in sizes.items():
        ci = roc_auc_ci(y, vol, n_boot=n_boot)
        entry: dict[str, Any] = {"auc": ci.auc, "lo": ci.lo, "hi": ci.hi, "chosen": name == chosen}
        if name != chosen and chosen in sizes:
            d, lo, hi = auc_difference_ci(y, vol, sizes[chosen], n_boot=n_boot)
            entry["minus_chosen"] = {"difference": d, "lo": lo, "hi": hi}
        out[name] = entry
    return out


def write_report(out: Path, cases: Sequence[CaseMap], *, title: str, window: tuple[float, float],
                 extra: dict[str, Any] | None = None, n_overlays: int = 8,
                 n_boot: int = 1000) -> dict[str, Any]:
    """summary.json, summary.md and overlay PNGs (the most abnormal cases and some normals)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"title": title, **(extra or {}), **summarise(cases, n_boot=n_boot)}
    order = np.argsort([-c.abnormal_cm3 for c in cases])
    pick = list(order[: n_overlays // 2]) + [i for i in order[::-1] if cases[i].label == 1][: n_overlays // 2]
    pngs = []
    for i in dict.fromkeys(int(j) for j in pick):
        c = cases[i]
        name = f"overlay_case{i:04d}.png"
        overlay_png(c, out / name, window=window,
                    title=f"case {i}: {c.finding}, truth {c.truth_cm3:.1f} cm³, detected "
                          f"{c.abnormal_cm3:.1f} cm³ ({'abnormal' if c.abnormal else 'normal'})")
        pngs.append(name)
    summary["overlays"] = pngs
    write_bytes(out / "summary.json", json.dumps(summary, indent=2, default=float).encode())
    lines = [f"# {title}", ""]
    for key in ("auroc_abnormal_volume", "auroc_peak"):
        if key in summary:
            e = summary[key]
            lines.append(f"- {key}: {format_auc(e, 3)}")
    for key in ("f1", "accuracy", "sensitivity", "specificity", "hit_rate_ge_1cm3", "dice_abnormal_mean"):
        if summary.get(key) is not None:
            lines.append(f"- {key}: {summary[key]:.3f}")
    for b, e in summary.get("lesion_hit_rate", {}).items():
        lines.append(f"- hit rate {b}: {e['hit_rate']:.2f} (n={e['n']})")
    if summary.get("maps"):
        lines += ["", "Every calibrated map on these volumes (abnormal volume at the map's own "
                  "threshold; difference from the chosen map with a paired bootstrap 95 % CI):", "",
                  "| map | AUROC [95 % CI] | minus the chosen map |", "|---|---|---|"]
        for name, e in summary["maps"].items():
            diff = e.get("minus_chosen")
            d = (f"{diff['difference']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}]" if diff
                 else "(chosen)" if e["chosen"] else "")
            lines.append(f"| {name} | {format_auc(e, 3)} | {d} |")
    lines += ["", *[f"![{p}]({p})" for p in pngs], ""]
    write_bytes(out / "summary.md", "\n".join(lines).encode())
    return summary


def map_montage(images: np.ndarray, maps: np.ndarray, titles: Sequence[str], path: Path, *,
                ncol: int = 4, title: str = "") -> Path:
    """2D images with their abnormality maps on top (radiograph overlays).

    ``images`` ``(N, H, W)`` in [0, 1]; ``maps`` ``(N, H, W)`` (higher = more abnormal); the
    colour scale is shared, from the median to the 99.5th percentile of all maps, and values
    below the median are left transparent.
    """
    n = len(images)
    if n == 0 or maps.shape != images.shape:
        raise ValueError(f"need matching non-empty images and maps, got {images.shape} and {maps.shape}")
    rows = (n + ncol - 1) // ncol
    fig = _figure(2.4 * ncol, 2.6 * rows)
    lo, hi = np.percentile(maps, [50, 99.5])
    for i in range(n):
        ax = fig.add_subplot(rows, ncol, i + 1)
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.imshow(np.ma.masked_where(maps[i] < lo, maps[i]), cmap="inferno", alpha=0.55,
                  vmin=lo, vmax=hi, interpolation="bilinear")
        ax.set_title(titles[i], fontsize=7)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)
    return path


def radiograph_localisation(maps: np.ndarray, masks: np.ndarray, findings: Sequence[str], *,
                            threshold: float | None = None, top_fraction: float = 0.02) -> dict[str, Any]:
    """Where a radiograph's map points, against the findings' ground-truth masks.

    ``maps`` and ``masks`` are ``(N, H, W)`` on the same grid (higher map = more abnormal).
    Per finding, over the abnormal cases with a non-empty mask:

    * ``pointing``: the map's maximum lies in the mask (grown by one pixel); ``chance`` is
      the mean grown-mask area fraction, what a point drawn at random would score;
    * ``top_hit``: the top ``top_fraction`` of the map overlaps the mask;
    * ``overlay_hit`` (when ``threshold`` is given, the node's overlay threshold): the binary
      overlay ``map >= threshold`` overlaps the mask. Hits are cheap when the overlay is
      large, so ``overlay_area`` (mean fraction of the image marked) and, over the normal
      cases, ``normal_overlay_rate`` (how many normals get any overlay) come with it.
    """
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    if maps.ndim != 3 or maps.shape != masks.shape or len(findings) != len(maps):
        raise ValueError(f"need (N, H, W) maps and masks of one shape and N findings, got {maps.shape}, "
                         f"{masks.shape} and {len(findings)}")
    from scipy import ndimage

    flat = maps.reshape(len(maps), -1)
    k = max(1, round(top_fraction * flat.shape[1]))
    top_idx = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    grown = np.array([ndimage.binary_dilation(m) for m in masks]) if len(masks) else masks
    per: dict[str, dict[str, list[float]]] = {}
    for i, f in enumerate(findings):
        if f == "normal" or not masks[i].any():
            continue
        e = per.setdefault(f, {"pointing": [], "chance": [], "top_hit": [], "overlay_hit": [],
                               "overlay_area": []})
        g = grown[i].ravel()
        e["pointing"].append(float(g[int(np.argmax(flat[i]))]))
        e["chance"].append(float(g.mean()))
        e["top_hit"].append(float(masks[i].ravel()[top_idx[i]].any()))
        if threshold is not None:
            on = flat[i] >= threshold
            e["overlay_hit"].append(float((on & masks[i].ravel()).any()))
            e["overlay_area"].append(float(on.mean()))
    out: dict[str, Any] = {"top_fraction": top_fraction, "threshold": threshold, "findings": {}}
    for f, e in sorted(per.items()):
        out["findings"][f] = {"n": len(e["pointing"]),
                              **{key: float(np.mean(v)) for key, v in e.items() if v}}
    every = [x for e in per.values() for x in e["pointing"]]
    if every:
        out["pointing"] = float(np.mean(every))
        out["chance"] = float(np.mean([x for e in per.values() for x in e["chance"]]))
    if threshold is not None:
        normals = [i for i, f in enumerate(findings) if f == "normal"]
        if normals:
            out["normal_overlay_rate"] = float(np.mean([(flat[i] >= threshold).any() for i in normals]))
    return out


def localisation_markdown(loc: dict[str, Any]) -> str:
    """A table of :func:`radiograph_localisation`'s figures per finding."""
    over = loc.get("threshold") is not None
    head = "| finding | n | pointing | chance | top hit |" + (" overlay hit | overlay area |" if over else "")
    lines = ["## Localisation (map against the lesion masks)", "",
             f"Top hit: the top {100 * loc['top_fraction']:g} % of the map overlaps the lesion; pointing: "
             "the map's maximum lies in it (grown by one pixel); chance: the mean grown-mask area."
             + (f" Overlay: the node's binary overlay (map ≥ {loc['threshold']:g})." if over else ""),
             "", head, "|" + "---|" * (head.count("|") - 1)]
    for f, e in loc["findings"].items():
        row = f"| {f} | {e['n']} | {e['pointing']:.2f} | {e['chance']:.2f} | {e['top_hit']:.2f} |"
        if over:
            row += f" {e.get('overlay_hit', float('nan')):.2f} | {e.get('overlay_area', float('nan')):.3f} |"
        lines.append(row)
    if "normal_overlay_rate" in loc:
        lines += ["", f"Normal cases with any overlay: {loc['normal_overlay_rate']:.2f}"]
    return "\n".join(lines) + "\n"
