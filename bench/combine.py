"""Combine the test posteriors of several bench/accuracy.py runs: an ensemble after the fact.

    .venv/bin/python bench/combine.py TAG1 TAG2 [TAG3 ...]
    .venv/bin/python bench/combine.py --shift TAG TAG-OTHER

Every run must have scored the same test cases (the same KIND, ``nt`` and test seed). Prints
each run's posterior AUROC, the Pearson r between runs' posteriors per case (how much of a
case's score the runs agree on, i.e. is not training noise), and the AUROC with its 95 % CI of
the mean of the runs' standardised posteriors, for the first 2, 3, ... runs in the order given.

``--shift``: TAG-OTHER re-scored TAG's bundle on test cases made another way (e.g.
``"test_fov": 280``); prints how far the normal cases' mean likelihood and posterior moved, in
units of their SD under TAG, and the share of normal and abnormal cases at or above the bundle's
own threshold under each.
"""

from __future__ import annotations

import sys
from itertools import combinations
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from flows.evaluate import roc_auc_ci  # noqa: E402


def load(tag: str) -> tuple[np.ndarray, np.ndarray]:
    z = np.load(Path("runs/accuracy") / tag / "test_scores.npz")
    return z["log_p_mixture"] - z["log_p_normal"], z["labels"]  # abnormality: -log posterior


def shift(base: str, other: str) -> None:
    from flows.bundle import load_bundle

    threshold = load_bundle(Path("runs/accuracy") / base).calibration.threshold
    z0, z1 = (np.load(Path("runs/accuracy") / t / "test_scores.npz") for t in (base, other))
    n0, n1 = z0["labels"] == 0, z1["labels"] == 0
    for name, key in (("likelihood", "log_p_normal"), ("posterior", "chosen")):
        move = (z1[key][n1].mean() - z0[key][n0].mean()) / z0[key][n0].std()
        print(f"normals' mean {name} moved {move:+.2f} SD")
    for t, z in ((base, z0), (other, z1)):
        flagged = z["chosen"] >= threshold
        print(f"{t}: flagged at the bundle's threshold: normals {flagged[z['labels'] == 0].mean():.0%}, "
              f"abnormal {flagged[z['labels'] == 1].mean():.0%}")


def main() -> None:
    if sys.argv[1:2] == ["--shift"] and len(sys.argv) == 4:
        shift(sys.argv[2], sys.argv[3])
        return
    tags = sys.argv[1:]
    if len(tags) < 2:
        raise SystemExit(__doc__)
    post, labels = {}, None
    for t in tags:
        p, lab = load(t)
        if labels is not None and not np.array_equal(lab, labels):
            raise SystemExit(f"{t}: scored other test cases than {tags[0]}")
        post[t], labels = p, lab
    assert labels is not None
    for t in tags:
        print(f"{t}: posterior AUROC {roc_auc_ci(labels, post[t], n_boot=500).auc:.3f}")
    rs = [float(np.corrcoef(post[a], post[b])[0, 1]) for a, b in combinations(tags, 2)]
    print(f"per-case Pearson r between runs: mean {np.mean(rs):.2f}, range {min(rs):.2f} to {max(rs):.2f}")
    std = {t: (p - p.mean()) / p.std() for t, p in post.items()}
    for k in range(2, len(tags) + 1):
        ci = roc_auc_ci(labels, np.mean([std[t] for t in tags[:k]], axis=0), n_boot=500)
        print(f"mean of the first {k}: AUROC {ci.auc:.3f} [{ci.lo:.3f}, {ci.hi:.3f}]")


if __name__ == "__main__":
    main()
