"""Chest-CT patch map on phantoms: train patch models, map, binarise, decide (docs/results.md).

    .venv/bin/python bench/chestct.py TAG '{"n": 150, "per": 64, "ep": 2, "fep": 2}'

Normal volumes seed 21, mixture seed 22 (50 % abnormal), validation seed 23, test seed 24
(50 % abnormal each). Patch models: the cpu-chestct preset (16³ patches at 4 mm) trained with
the ``shared`` strategy on patches sampled inside each volume's lung mask. Maps: 16³
patches with an overlap of 8, lung-mask guided. Both the likelihood map (``-log p0`` per
voxel) and the posterior-ratio map (``log p1 - log p0``) are reported. The voxel threshold
is the 99th percentile of the map on validation normals, T (cm³) is chosen on the validation
ROC over 0.5-20 cm³, and test figures use both unchanged. Prints one JSON line and appends
it to runs/chestct.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import f1_score, roc_auc_score  # noqa: E402

from flows.build import BuildOptions, build_bundle  # noqa: E402
from flows.lesions import abnormal_size, choose_size_threshold, find_lesions, voxel_threshold  # noqa: E402
from flows.masks import lung_mask  # noqa: E402
from flows.patchmap import glow_patch_scorer, patch_map, sample_patches  # noqa: E402
from flows.phantoms.chestct import make_chestct  # noqa: E402
from flows.presets import get_preset  # noqa: E402


def main() -> None:
    torch.set_num_threads(int(os.environ.get("NT", "2")))
    tag = sys.argv[1]
    cfg = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    n, nv, nt = cfg.get("n", 150), cfg.get("nv", 60), cfg.get("nt", 100)
    preset = get_preset("cpu-chestct")
    preset = dataclasses.replace(preset, glow=dataclasses.replace(preset.glow, **cfg.get("glow", {})))
    prep = preset.preprocessing
    patch, overlap = prep.shape[0], cfg.get("overlap", 8)
    t0 = time.time()
    sets = {name: make_chestct(k, abnormal_fraction=af, seed=seed)
            for name, k, af, seed in (("normal", n, 0.0, 21), ("mixture", n, 0.5, 22),
                                      ("val", nv, 0.5, 23), ("test", nt, 0.5, 24))}
    vols = {k: prep.intensities(s.images[:, 0]) for k, s in sets.items()}
    masks = {k: np.stack([lung_mask(v[0], s.spacing) for v in s.images]) for k, s in sets.items()}
    rng = np.random.default_rng(0)
    pn = sample_patches(vols["normal"], masks["normal"], patch, cfg.get("per", 64), rng)
    pm = sample_patches(vols["mixture"], masks["mixture"], patch, cfg.get("per", 64), rng)
    print(f"data {time.time() - t0:.0f} s; patches {len(pn)} + {len(pm)}", flush=True)
    b = build_bundle(Path("runs/chestct") / tag, preset=preset, normal=pn, mixture=pm, name=tag,
                     log=print, options=BuildOptions(strategy="shared", epochs=cfg.get("ep", 2),
                                                     finetune_epochs=cfg.get("fep", 2),
                                                     freeze_levels=cfg.get("freeze", 0),
                                                     progress=False))
    t1 = time.time()
    res: dict[str, object] = {"tag": tag, "cfg": cfg, "train_s": round(t1 - t0)}
    spacing = sets["test"].spacing
    for source, m1 in (("likelihood", None), ("posterior", b.m1)):
        scorer = glow_patch_scorer(b.m0, m1, prep.n_bits)
        maps = {k: [patch_map(v, scorer, patch=patch, overlap=overlap, mask=m, batch_size=64).values
                    for v, m in zip(vols[k], masks[k], strict=True)] for k in ("val", "test")}
        val, test = sets["val"], sets["test"]
        thr = voxel_threshold([m for m, y in zip(maps["val"], val.labels, strict=True) if y == 0],
                              cfg.get("pct", 99.0))
        min_size = cfg.get("min_cm3", 0.2)

        def sizes(ms: list[np.ndarray], thr: float = thr,
                  min_size: float = min_size) -> tuple[np.ndarray, list]:
            les = [find_lesions(m, thr, spacing, min_size=min_size) for m in ms]
            return np.array([abnormal_size(le) for le in les]), les

        vs, _ = sizes(maps["val"])
        t_cm3 = choose_size_threshold(vs, val.labels)
        ts, tles = sizes(maps["test"])
        y = test.labels
        pred = ts > t_cm3
        peak = np.array([np.nanmax(m) for m in maps["test"]])
        hits, bins = [], []
        for i in np.flatnonzero(y):
            gt = test.masks[i, 0]
            cm3 = float(test.meta["lesion_cm3"][i])
            hit = any(gt[tuple(slice(a, b) for a, b in le.bbox)].any() and
                      _overlaps(le, gt, maps["test"][i], thr) for le in tles[i])
            hits.append(hit)
            bins.append(cm3)
        hits_a, bins_a = np.array(hits), np.array(bins)
        binarised = [np.nan_to_num(m, nan=-np.inf) >= thr for m in maps["test"]]
        dice = [2 * (bm & test.masks[i, 0]).sum() / max(bm.sum() + test.masks[i, 0].sum(), 1)
                for i, bm in enumerate(binarised) if y[i]]
        res[source] = {
            "auroc_volume": round(float(roc_auc_score(y, ts)), 3),
            "auroc_peak": round(float(roc_auc_score(y, peak)), 3),
            "f1": round(float(f1_score(y, pred)), 3),
            "accuracy": round(float((pred == y).mean()), 3),
            "T_cm3": round(t_cm3, 2), "voxel_threshold": round(thr, 4),
            "hit_rate_ge1cm3": round(float(hits_a[bins_a >= 1].mean()), 3),
            "hit_rate_lt1cm3": round(float(hits_a[bins_a < 1].mean()), 3) if (bins_a < 1).any() else None,
            "dice_abnormal": round(float(np.mean(dice)), 3),
            "per_finding_auroc_volume": {
                f: round(float(roc_auc_score(y[np.isin(test.findings, ["normal", f])],
                                             ts[np.isin(test.findings, ["normal", f])])), 3)
                for f in sorted(set(test.findings) - {"normal"})},
        }
        print(source, json.dumps(res[source]), flush=True)
    res["map_s"] = round(time.time() - t1)
    line = json.dumps(res)
    print(line)
    Path("runs").mkdir(exist_ok=True)
    with open("runs/chestct.jsonl", "a") as f:
        f.write(line + "\n")


def _overlaps(lesion: object, gt: np.ndarray, m: np.ndarray, thr: float) -> bool:
    """A detected component hits the lesion when any of its voxels is a lesion voxel."""
    box = tuple(slice(a, b) for a, b in lesion.bbox)  # type: ignore[attr-defined]
    return bool((gt[box] & (np.nan_to_num(m[box], nan=-np.inf) >= thr)).any())


if __name__ == "__main__":
    main()
