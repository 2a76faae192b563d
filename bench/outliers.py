"""How a radiograph bundle's AUROC survives outlier pixels (docs/results.md, session 15).

    .venv/bin/python bench/outliers.py BUNDLE [ours|alt] [N]

Scores N test radiographs (seed 13, half abnormal; ``alt``: bench/altcxr.py's phantoms) three
times through the bundle's own preprocessing: clean, with one pixel at twice the image's
maximum (a dead detector element), and with a 3x4-pixel label at 1.5 times its maximum (a
burned-in annotation). Prints the posterior's AUROC with a 95 % CI for each. Set NT to the
number of torch threads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.altcxr import make_alt_cxr  # noqa: E402
from flows.bundle import load_bundle  # noqa: E402
from flows.evaluate import roc_auc_ci  # noqa: E402
from flows.phantoms import make_cxr  # noqa: E402
from flows.posterior import PosteriorScorer  # noqa: E402


def with_outliers(x: np.ndarray) -> dict[str, np.ndarray]:
    """``(N, H, W)`` raw radiographs -> the three variants the probe scores."""
    top = x.reshape(len(x), -1).max(axis=1)
    hot, label = x.copy(), x.copy()
    hot[:, 0, 0] = 2.0 * top
    label[:, 2:5, 2:6] = 1.5 * top[:, None, None]
    return {"clean": x, "one hot pixel at 2x max": hot, "3x4 label at 1.5x max": label}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("NT", "2")))
    bundle = load_bundle(sys.argv[1])
    source = sys.argv[2] if len(sys.argv) > 2 else "ours"
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 400
    make = make_alt_cxr if source == "alt" else make_cxr
    test = make(n, size=64, abnormal_fraction=0.5, seed=13)
    y = test.labels.astype(bool)
    scorer = PosteriorScorer(bundle)
    print(f"{sys.argv[1]}: intensity {bundle.preprocessing.intensity}, {n} {source} radiographs")
    for name, imgs in with_outliers(test.images.astype(np.float32)[:, 0]).items():
        s = scorer.score(bundle.preprocessing.apply(imgs))
        a = roc_auc_ci(y, -s.log_posterior, n_boot=200)
        print(f"{name}: {a.auc:.3f} [{a.lo:.3f}, {a.hi:.3f}]", flush=True)


if __name__ == "__main__":
    main()
