"""Supervised ceiling for the chest-CT patient decision (docs/results.md, session 18).

    NT=1 .venv/bin/python bench/ctceiling.py TAG '{"n": 60, "nt": 40}'

How well can *any* model on the CPU preset's grid and patch size tell abnormal chest CTs from
normal ones when it is told where the lesions are? A small 3D CNN is trained on the lung
patches (the preset's patch size and spacing, the bundle's window and lung mask) of the same
training volumes the patch bundles use (normal seed 21, mixture seed 22), with each patch
labelled by the phantom's lesion mask (>= ``min_vox`` lesion voxels). A volume's score is its
most lesion-like patch on the inference grid. Test AUROC (seed 24, as bench/ctmap.py) with a
bootstrap CI, per finding. The unsupervised maps cannot beat this: if it is high, the density
models are what hold the maps back; if it is low, the grid or the patch size is.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.accuracy import record  # noqa: E402
from flows.evaluate import auc_rank, roc_auc_ci  # noqa: E402
from flows.patchbundle import DEFAULT_MASK, _prepared  # noqa: E402
from flows.patchmap import PatchGrid, select_patches  # noqa: E402
from flows.phantoms.chestct import make_chestct  # noqa: E402
from flows.presets import get_preset  # noqa: E402


def _patches(ps, preset, min_vox: int, overlap: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per volume: its lung patches (M, 1, p, p, p) and their labels (>= min_vox lesion voxels)."""
    xs, ys = [], []
    size = preset.preprocessing.shape
    for i, (v, sp) in enumerate(ps.volumes()):
        v01, m, _ = _prepared(preset, v, sp, DEFAULT_MASK["chestct"])
        truth = ps.masks[i, 0]
        if truth.shape != v01.shape:
            raise ValueError("the phantoms must be made on the preset's grid")
        grid = PatchGrid.plan(v01.shape, size, overlap)
        starts = select_patches(grid, m, 0.1)
        pv, pt = grid.pad(v01, 0.0), grid.pad(truth, False)
        cut = [tuple(slice(s, s + q) for s, q in zip(st, size, strict=True)) for st in starts]
        xs.append(np.stack([pv[c] for c in cut])[:, None].astype(np.float32))
        ys.append(np.array([pt[c].sum() >= min_vox for c in cut], dtype=np.float32))
    return xs, ys


def _net() -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv3d(i, o, 3, padding=1), nn.BatchNorm3d(o), nn.ReLU()]
    return nn.Sequential(*block(1, 16), *block(16, 16), nn.MaxPool3d(2), *block(16, 32),
                         *block(32, 32), nn.MaxPool3d(2), *block(32, 64), nn.AdaptiveMaxPool3d(1),
                         nn.Flatten(), nn.Linear(64, 1))


def main() -> None:
    torch.set_num_threads(int(os.environ.get("NT", "1")))
    tag = sys.argv[1]
    cfg = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    n, nt, steps = cfg.get("n", 60), cfg.get("nt", 40), cfg.get("steps", 1500)
    min_vox, overlap = cfg.get("min_vox", 8), cfg.get("overlap", 8)
    preset = get_preset(cfg.get("preset", "cpu-chestct"))
    t0 = time.time()
    train_x, train_y = [], []
    for seed, af in ((21, 0.0), (22, 0.5)):
        xs, ys = _patches(make_chestct(n, abnormal_fraction=af, seed=seed), preset, min_vox, overlap)
        train_x += xs
        train_y += ys
    x, y = np.concatenate(train_x), np.concatenate(train_y)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    print(f"{len(x)} training patches, {len(pos)} with a lesion ({time.time() - t0:.0f} s)", flush=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    net.train()
    for step in range(steps):  # balanced batches, random flips
        idx = np.concatenate([rng.choice(pos, 32), rng.choice(neg, 32)])
        xb = torch.from_numpy(x[idx])
        for ax in (2, 3, 4):
            if rng.random() < 0.5:
                xb = xb.flip(ax)
        loss = loss_fn(net(xb)[:, 0], torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    net.eval()
    test = make_chestct(nt, abnormal_fraction=0.5, seed=24)
    xs, ys = _patches(test, preset, min_vox, overlap)
    scores, hits = [], []
    with torch.inference_mode():
        for xv, yv in zip(xs, ys, strict=True):
            chunks = np.array_split(xv, max(1, len(xv) // 256))
            p = torch.cat([net(torch.from_numpy(c)) for c in chunks])[:, 0]
            scores.append(float(p.max()))
            if yv.any():  # is the most lesion-like patch one that holds the lesion?
                hits.append(bool(yv[int(p.argmax())]))
    s, labels = np.asarray(scores), np.asarray(test.labels)
    ci = roc_auc_ci(labels, s, n_boot=1000)
    per = {}
    for f in sorted(set(test.findings) - {"normal"}):
        keep = np.array([g in ("normal", f) for g in test.findings])
        per[f] = round(auc_rank(labels[keep], s[keep]), 3)
    res = {"tag": tag, "cfg": cfg, "auroc": round(ci.auc, 3), "ci": [round(ci.lo, 3), round(ci.hi, 3)],
           "per_finding": per, "top_patch_holds_lesion": round(float(np.mean(hits)), 3) if hits else None,
           "train_patches": len(x), "lesion_patches": len(pos), "s": round(time.time() - t0)}
    record(res, "runs/ctceiling.jsonl")


if __name__ == "__main__":
    main()
