"""The node's scorers on a GPU against the same scorers on the CPU (run by bench/gpu-check).

    python3 bench/gpu_smoke.py --device cuda            # on a lent GPU machine
    .venv/bin/python bench/gpu_smoke.py --device cpu    # here: checks the script itself

CI has no GPU, so this is where the node's GPU path is checked: each demo bundle in models/
(cxr and bct: the whole-image posterior; chestct: the patch map) scores the same phantoms
loaded on ``--device`` and on the CPU, through the classes the node's workers use
(flows.posterior.PosteriorScorer, flows.patchbundle.PatchMapScorer). Prints a Markdown table:
the largest difference between the two (log posterior in nats; map values), also as a share
of the scores' spread (posteriors over the cases, map values over the voxels: the scales a
percentile or a threshold is read on; a map scored where the CPU's was not counts as an
infinite difference), and seconds per
case on each after one warm-up case. On CUDA it runs twice: with cuDNN's TF32 convolutions
(PyTorch's default, ~1e-3 relative error per convolution) and without, so the size of that
error against a CPU-calibrated bundle is measured, not assumed. Exits 1 when the difference
without TF32 exceeds ``--tolerance`` of the spread.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flows.bundle import Bundle, load_bundle  # noqa: E402
from flows.patchbundle import PatchMapScorer  # noqa: E402
from flows.phantoms import PhantomSet, make_cxr, make_headct  # noqa: E402
from flows.phantoms.chestct import make_chestct  # noqa: E402
from flows.posterior import PosteriorScorer  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"


def _timed(run: Callable[[int], np.ndarray], n: int) -> tuple[np.ndarray, float]:
    """Every case's result and the seconds per case, the first (warm-up) case not timed."""
    out = [run(0)]
    t0 = time.perf_counter()
    out += [run(i) for i in range(1, n)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return np.stack(out), (time.perf_counter() - t0) / max(1, n - 1)


def _whole(b: Bundle, images01: np.ndarray) -> Callable[[int], np.ndarray]:
    scorer = PosteriorScorer(b)
    return lambda i: scorer.score(images01[i:i + 1]).log_posterior


def _patch(b: Bundle, volumes: np.ndarray, spacing: tuple[float, float, float]
           ) -> Callable[[int], np.ndarray]:
    scorer = PatchMapScorer(b)
    return lambda i: scorer.score(volumes[i, 0], spacing).values  # NaN outside the mask


def _cases(kind: str, n: int) -> PhantomSet:
    if kind == "cxr":
        return make_cxr(n, size=64, abnormal_fraction=0.5, seed=5)
    if kind == "bct":
        return make_headct(n, abnormal_fraction=0.5, seed=5)
    return make_chestct(n, abnormal_fraction=0.5, seed=5)


def _scored(kind: str, device: str, data: PhantomSet, n: int) -> tuple[np.ndarray, float]:
    b = load_bundle(MODELS / kind, device=device)
    if kind == "chestct":
        spacing = tuple(float(x) for x in data.spacing)
        return _timed(_patch(b, data.images, spacing), n)  # type: ignore[arg-type]
    return _timed(_whole(b, b.preprocessing.apply(data.images)), n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=6, help="cases per kind")
    ap.add_argument("--tolerance", type=float, default=1e-2,
                    help="largest difference allowed without TF32, as a share of the scores' spread")
    args = ap.parse_args()
    n = max(2, args.n)
    cuda = args.device.startswith("cuda")
    rows, worst = [], 0.0
    for kind in ("cxr", "bct", "chestct"):
        data = _cases(kind, n)
        ref, t_cpu = _scored(kind, "cpu", data, n)
        # the scale a threshold is read on: posteriors across cases, map values across voxels
        spread = float(np.nanstd(ref)) or 1.0
        for tf32 in ((True, False) if cuda else (False,)):
            torch.backends.cudnn.allow_tf32 = tf32
            got, t_dev = _scored(kind, args.device, data, n)
            same_mask = np.array_equal(np.isnan(got), np.isnan(ref))
            diff = float(np.nanmax(np.abs(got - ref))) if same_mask else float("inf")
            if not tf32:
                worst = max(worst, diff / spread)
            rows.append((kind, "on" if tf32 else "off", diff, diff / spread, t_dev, t_cpu))
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"\nnode scorers on {args.device} ({name}) against the CPU, {n} phantoms per kind, "
          f"torch {torch.__version__}\n")
    print(f"| kind | TF32 | largest difference | / spread of the scores | s per case on "
          f"{args.device} | s per case on cpu |")
    print("|---|---|---|---|---|---|")
    for kind, tf32, diff, rel, t_dev, t_cpu in rows:
        print(f"| {kind} | {tf32} | {diff:.2e} | {rel:.2e} | {t_dev:.3f} | {t_cpu:.3f} |")
    if worst > args.tolerance:
        sys.exit(f"the {args.device} scores differ from the CPU's by {worst:.3g} of their spread "
                 f"(> {args.tolerance})")


if __name__ == "__main__":
    main()
