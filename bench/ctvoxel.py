"""Where a chest-CT patch bundle's map loses the patient-level decision (docs/results.md).

    .venv/bin/python bench/ctvoxel.py runs/ctmap/TAG            # 24 new phantoms, seed 99
    .venv/bin/python bench/ctvoxel.py runs/ctmap/TAG --n 40 --seed 7

For each of the four maps (likelihood / posterior ratio, per patch / per voxel), over the
voxels inside the bundle's mask (the lungs) on the model grid: the voxel AUROC of lesion
voxels against the lung voxels of the normal volumes, the fraction of lesion voxels above
the normal volumes' 99th percentile (what a voxel threshold can catch), and the patient
AUROC of each volume's top 0.5 % of lung voxels (what a tail statistic makes of it). Lesion
voxels are all those of the ground-truth mask the map covers. A map can rank voxels well
(AUROC 0.95) and still fail patients when every normal volume holds thousands of voxels as
extreme as a lesion's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from flows.bundle import load_bundle  # noqa: E402
from flows.patchbundle import _maps, _prepared, map_calibration  # noqa: E402
from flows.phantoms.chestct import make_chestct  # noqa: E402
from flows.preprocess import resample_to_spacing  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--n", type=int, default=24, help="test volumes (half abnormal)")
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b = load_bundle(args.bundle)
    cal = map_calibration(b)
    iso = b.preprocessing.spacing
    assert iso is not None
    s = make_chestct(args.n, abnormal_fraction=0.5, seed=args.seed)
    sp = (float(s.spacing[0]), float(s.spacing[1]), float(s.spacing[2]))
    prepared = [_prepared(b, v[0], sp, cal.mask)[:2] for v in s.images]
    lesions = [resample_to_spacing(s.masks[i, 0].astype(np.float32), s.spacing, iso) > 0.5
               for i in range(len(s))]
    y = np.asarray(s.labels).astype(bool)
    for source, per_voxel in (("likelihood", False), ("posterior", False),
                              ("likelihood", True), ("posterior", True)):
        maps = _maps(b, prepared, source, cal.patch, cal.overlap, per_voxel, cal.min_mask_fraction)
        inside = [np.isfinite(m) & (pm if pm is not None else True)
                  for m, (_, pm) in zip(maps, prepared, strict=True)]
        normal = np.concatenate([m[ok] for m, ok, lab in zip(maps, inside, y, strict=True) if not lab])
        lesion = np.concatenate([m[les & np.isfinite(m)]
                                 for m, les, lab in zip(maps, lesions, y, strict=True) if lab])
        top = [float(np.percentile(m[ok], 99.5)) for m, ok in zip(maps, inside, strict=True)]
        voxel_auc = roc_auc_score(np.r_[np.ones(lesion.size), np.zeros(normal.size)], np.r_[lesion, normal])
        print(json.dumps({
            "bundle": args.bundle, "map": f"{source}{':voxel' if per_voxel else ''}",
            "reference": cal.reference, "voxel_auroc": round(float(voxel_auc), 3),
            "lesion_above_normal_p99": round(float(np.mean(lesion > np.percentile(normal, 99))), 3),
            "patient_auroc_top0.5pct": round(float(roc_auc_score(y, top)), 3),
            "lesion_voxels": int(lesion.size), "normal_voxels": int(normal.size)}), flush=True)


if __name__ == "__main__":
    main()
