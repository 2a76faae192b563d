"""Patch-map accuracy on CT phantoms: both maps side by side (docs/results.md).

    .venv/bin/python bench/ctmap.py TAG chestct '{"n": 150, "per": 64}'
    .venv/bin/python bench/ctmap.py TAG bct '{"preset": "cpu-bct-patch"}'
    .venv/bin/python bench/ctmap.py TAG chestct '{"bits": 5}'     # input quantised to 5 bits
    .venv/bin/python bench/ctmap.py TAG chestct '{"source": "alt"}'  # bench/altchest.py's phantoms
    .venv/bin/python bench/ctmap.py TAG bct '{"seed": 1, "freeze": 1}'  # training seed; shared finest level
    .venv/bin/python bench/ctmap.py TAG bct '{"floor": "auto"}'  # noise floor from the training set (or HU)
    .venv/bin/python bench/ctmap.py TAG chestct '{"reference": "body"}'  # M1: general-domain body patches
    .venv/bin/python bench/ctmap.py TAG chestct '{"per": 128, "tail": 0.5}'  # tail-focused fine-tuning
    python3 bench/ctmap.py TAG chestct '{"preset": "ct3dflow", "mm": 2, "device": "cuda", "max_s": 120}'

Normal set seed 21, mixture seed 22 (50 % abnormal), validation seed 23, test seed 24
(50 % abnormal each); sizes ``n`` (normal and mixture), ``nv``, ``nt``. A patch bundle is
built with :func:`flows.patchbundle.build_patch_bundle` (mask-guided patches, ``shared``
strategy, map calibration on the validation set); then the test set is mapped with the
likelihood map and with the posterior-ratio map, each with its own validation-calibrated
voxel threshold and T. Prints one JSON line per map and appends them to runs/ctmap.jsonl;
``rho_noise_map_mean`` is the Spearman correlation, over the test volumes, of the map's mean
with the volume's own noise level (:func:`flows.preprocess.noise_sd` on its source grid; runs
before 2026-12-01 used the median absolute Laplacian where the map is defined, the same
quantity up to scale): near 1, the map measures the scanner, not the anatomy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.alt*

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from bench.altchest import make_alt_chestct  # noqa: E402
from bench.althead import make_alt_headct  # noqa: E402
from flows.build import BuildOptions  # noqa: E402
from flows.bundle import load_bundle  # noqa: E402
from flows.mapeval import case_from_result, summarise  # noqa: E402
from flows.patchbundle import PatchMapScorer, build_patch_bundle, calibrate_patch_bundle  # noqa: E402
from flows.phantoms import PhantomSet, make_headct  # noqa: E402
from flows.phantoms.chestct import make_chestct  # noqa: E402
from flows.preprocess import noise_sd  # noqa: E402
from flows.presets import get_preset  # noqa: E402


def _make(kind: str, n: int, af: float, seed: int, source: str = "", mm: float = 0.0) -> PhantomSet:
    if source == "alt":  # the independently made phantoms (generalisation checks)
        if kind == "chestct":
            return make_alt_chestct(n, abnormal_fraction=af, seed=seed)
        return make_alt_headct(n, abnormal_fraction=af, seed=seed)
    if kind == "chestct":
        if mm:  # the same 256 x 288 x 384 mm body on a finer grid (ct3dflow's 2 mm)
            shape = tuple(round(s * 4.0 / mm) for s in (64, 72, 96))
            return make_chestct(n, abnormal_fraction=af, seed=seed, shape=shape, spacing_mm=mm)  # type: ignore[arg-type]
        return make_chestct(n, abnormal_fraction=af, seed=seed)
    return make_headct(n, abnormal_fraction=af, seed=seed)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("NT", "2")))
    tag, kind = sys.argv[1], sys.argv[2]
    cfg = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    preset = get_preset(cfg.get("preset", "cpu-chestct" if kind == "chestct" else "cpu-bct-patch"))
    if "bits" in cfg:  # quantisation depth of the model's input (the noise floor it has to model)
        preset = replace(preset, preprocessing=replace(preset.preprocessing, n_bits=int(cfg["bits"])))
    if cfg.get("floor") == "auto":  # noise floor from the training volumes (choose_noise_floor)
        preset = replace(preset, noise_floor_percentile=95.0)
    elif "floor" in cfg:  # noise harmonisation: HU SD on the model grid (harmonise_noise)
        preset = replace(preset, preprocessing=replace(preset.preprocessing,
                                                       noise_floor=float(cfg["floor"])))
    n, nv, nt = cfg.get("n", 150), cfg.get("nv", 60), cfg.get("nt", 100)
    t0 = time.time()
    src = cfg.get("source", "")
    mm = float(cfg.get("mm", 0.0))
    val, test = _make(kind, nv, 0.5, 23, src, mm), _make(kind, nt, 0.5, 24, src, mm)
    if cfg.get("reuse"):  # recalibrate an already trained patch bundle
        b = calibrate_patch_bundle(load_bundle(cfg["reuse"]), (val.volumes(), val.labels),
                                   overlap=cfg.get("overlap"), log=print,
                                   min_mask_fraction=cfg.get("min_mask", 0.1))
    else:
        nor, mix = _make(kind, n, 0.0, 21, src, mm), _make(kind, n, 0.5, 22, src, mm)
        b = build_patch_bundle(
            Path("runs/ctmap") / tag, preset=preset, normal=nor.volumes(), mixture=mix.volumes(),
            validation=(val.volumes(), val.labels), name=tag,
            patches_per_volume=cfg.get("per", 64), overlap=cfg.get("overlap"), log=print,
            min_mask_fraction=cfg.get("min_mask", 0.1), reference=cfg.get("reference", "mixture"),
            options=BuildOptions(epochs=cfg.get("ep"), finetune_epochs=cfg.get("fep"),
                                 freeze_levels=cfg.get("freeze"), seed=cfg.get("seed", 0),
                                 focus_tail=cfg.get("tail"), device=cfg.get("device"),
                                 max_seconds_per_model=cfg.get("max_s"), progress=False))
    t1 = time.time()
    vols, sps = zip(*test.volumes(), strict=True)
    # the nuisance a density model measures first: the scan's own noise level (docs/results.md,
    # session 5: r 0.98 with the likelihood's per-volume mean), before any harmonisation
    noise = [noise_sd(v, b.preprocessing.window) for v in vols]
    for source in ("likelihood", "posterior", "likelihood:voxel", "posterior:voxel"):
        scorer = PatchMapScorer(b, source=source)
        cases, means = [], []
        for i, (v, sp) in enumerate(zip(vols, sps, strict=True)):
            r = scorer.score(v, sp)
            means.append(float(np.nanmean(r.values)))
            truth = test.masks[i, 0]
            cases.append(case_from_result(v, r, scorer.cal.voxel_threshold,
                                          label=int(test.labels[i]), finding=test.findings[i],
                                          truth=truth, spacing=sp))
        s = summarise(cases, n_boot=500)
        res: dict[str, Any] = {
            "tag": tag, "kind": kind, "cfg": cfg, "map": source,
            "chosen": source == PatchMapScorer(b).cal.name, "T_cm3": scorer.cal.size_threshold_cm3,
            **{k: s[k] for k in ("auroc_abnormal_volume", "auroc_peak", "f1", "accuracy",
                                 "hit_rate_ge_1cm3", "dice_abnormal_mean", "lesion_hit_rate",
                                 "auroc_volume_per_finding") if k in s},
            "rho_noise_map_mean": spearmanr(noise, means).statistic,
            "train_s": round(t1 - t0), "map_s": round(time.time() - t1)}
        line = json.dumps(res, default=lambda x: round(float(x), 3))
        print(line, flush=True)
        Path("runs").mkdir(exist_ok=True)
        with open("runs/ctmap.jsonl", "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
