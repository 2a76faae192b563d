"""Head CT as a stack of 2D slices: an experiment for the two-model posterior (issue 2).

    NT=2 .venv/bin/python bench/bctslices.py TAG '{"n": 300, "nt": 300, "ep": 1, "fep": 1}'

The whole-volume ``cpu-bct`` models stay at chance on head-CT phantoms (docs/results.md).
Here each volume is preprocessed exactly as ``cpu-bct`` does (16x64x64, the paper's window),
then cut into its 16 axial slices; M0 and M1 are ``cpu-cxr``-sized 2D Glows trained on the
slices of the normal and mixture volumes (16 times the images per volume, at a 2D model's
cost). A volume's score is the sum of its slices' log-ratios (the posterior of a density
that treats slices as independent) and, beside it, the maximum over its slices (a finding
sits in a few slices). Same phantoms and seeds as bench/accuracy.py (normal 11, mixture 12,
test 13). One JSON line to stdout and runs/bctslices.jsonl. JSON keys: ``n``, ``nt``,
``ep``, ``fep``, ``bits`` (default 5), ``freeze`` (default 2), ``tta`` (default 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.accuracy

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.accuracy import auroc_rows, record  # noqa: E402
from flows.build import BuildOptions, build_bundle  # noqa: E402
from flows.phantoms import make_headct  # noqa: E402
from flows.posterior import PosteriorScorer  # noqa: E402
from flows.presets import get_preset  # noqa: E402


def slices(vols: np.ndarray) -> np.ndarray:
    """(N, 1, D, H, W) -> (N * D, 1, H, W), slice-major within each volume."""
    n, c, d, h, w = vols.shape
    return vols.transpose(0, 2, 1, 3, 4).reshape(n * d, c, h, w)


def main() -> None:
    tag = sys.argv[1]
    cfg = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    torch.set_num_threads(int(os.environ.get("NT", "2")))
    t0 = time.time()
    bct = get_preset("cpu-bct").preprocessing
    prep2d = dataclasses.replace(bct, shape=bct.shape[1:], n_bits=cfg.get("bits", 5))
    p = dataclasses.replace(get_preset("cpu-cxr"), name="bct-slices", preprocessing=prep2d,
                            test_time_shift=cfg.get("tta", 0))
    n, nt = cfg.get("n", 300), cfg.get("nt", 300)
    normal = slices(bct.apply(make_headct(n, seed=11).images))
    mixture = slices(bct.apply(make_headct(n, abnormal_fraction=0.5, seed=12).images))
    test = make_headct(nt, abnormal_fraction=0.5, seed=13)
    timg = bct.apply(test.images)
    depth = timg.shape[2]
    b = build_bundle(Path("runs/bctslices") / tag, preset=p, normal=normal, mixture=mixture, name=tag,
                     log=print, options=BuildOptions(epochs=cfg.get("ep"), finetune_epochs=cfg.get("fep"),
                                                     freeze_levels=cfg.get("freeze", 2), progress=False))
    s = PosteriorScorer(b).score(slices(timg))
    ratio = (s.log_p_mixture - s.log_p_normal).reshape(nt, depth)
    lik = -s.log_p_normal.reshape(nt, depth).sum(1)
    res: dict[str, object] = {"tag": tag, "cfg": cfg}
    res.update(auroc_rows(test, {"sum": ratio.sum(1), "max": ratio.max(1), "likelihood": lik}))
    res["seconds"] = round(time.time() - t0)
    record(res, "runs/bctslices.jsonl")

if __name__ == "__main__":
    main()
