"""Sliding-window Log P map: this implementation vs a naive loop vs MONAI's sliding window.

    .venv/bin/pip install -e '.[bench]'          # MONAI, for the comparison only
    .venv/bin/python bench/patchmap.py            # CPU: cpu-chestct model on a chest-CT-sized volume
    .venv/bin/python bench/patchmap.py --preset ct3dflow --device cuda --patch 48 --overlap 10

``ours`` and ``ours-masked`` score with the node's scorer (traced on CPU; with ``--ratio`` two
models with their own weights, as a bundle's M0 and M1), ``naive`` and ``monai`` with the plain
``nn.Module`` (what a user of either would write), ``monai-traced`` hands MONAI a traced
scorer (so the windowing alone is compared). ``ours-masked`` evaluates only
the patches inside the body mask (as the node does with its lung or intracranial mask); the
others evaluate every patch. Each method runs in its own
process on the same volume with the same (randomly initialised, seeded) patch model, so peak
RSS is per method. The volume stands for a 512x512x300 CT at
0.7 x 0.7 x 1.25 mm after resampling to 2 mm (179 x 179 x 188 voxels). Prints a Markdown
table for docs/benchmarks.md: patches per second, seconds, peak RSS, and the share of the time
spent outside the model (patch extraction, transfer and aggregation).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flows.glow import Glow  # noqa: E402
from flows.patchmap import PatchGrid, gaussian_weights, glow_patch_scorer, patch_map  # noqa: E402
from flows.presets import get_preset  # noqa: E402

METHODS = ("ours", "ours-masked", "naive", "monai", "monai-traced")
# "node" is not a sliding-window variant but the node's whole CPU path for one CT, from the HU
# array on its own grid: resample + window + lung mask, the masked map, lesions, and the map
# resampled back onto the source grid (flows.patchbundle.PatchMapScorer.score's steps).


def _model(preset: str, device: str, seed: int = 0) -> tuple[Glow, int]:
    p = get_preset(preset)
    g = Glow(p.glow, seed=seed)
    g.initialize(torch.rand(8, 1, *p.preprocessing.shape) - 0.5)
    return g.to(device).eval(), p.preprocessing.n_bits


def _volume(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Random values inside an elliptic-cylinder "body" (as wide as a chest), air outside."""
    rng = np.random.default_rng(0)
    vol = rng.random(shape, dtype=np.float32)
    _, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - h / 2) / (0.36 * h)) ** 2 + ((xx - w / 2) / (0.47 * w)) ** 2 <= 1.0
    mask = np.broadcast_to(body, shape)
    return np.where(mask, vol, 0.0).astype(np.float32), mask


def _chest_hu(shape: tuple[int, int, int]) -> np.ndarray:
    """A CT-sized HU volume (slices, rows, columns): soft-tissue body, two lungs, noise."""
    d, h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    body = ((yy - h / 2) / (0.36 * h)) ** 2 + ((xx - w / 2) / (0.47 * w)) ** 2 <= 1.0
    lungs = np.zeros((h, w), bool)
    for cx in (0.3 * w, 0.7 * w):
        lungs |= ((yy - 0.48 * h) / (0.26 * h)) ** 2 + ((xx - cx) / (0.16 * w)) ** 2 <= 1.0
    plane = np.where(body, np.where(lungs, -850.0, 40.0), -1000.0).astype(np.float32)
    vol = np.empty(shape, dtype=np.float32)
    rng = np.random.default_rng(0)
    for k in range(d):  # slice by slice: no full-size temporaries
        vol[k] = plane + rng.normal(0.0, 20.0, (h, w)).astype(np.float32)
    vol[: d // 10] = np.where(body, 40.0, -1000.0)  # lung apices start below the first slices
    return vol


def run_node(args: argparse.Namespace) -> dict[str, float]:
    from dataclasses import replace

    from flows.lesions import find_lesions
    from flows.patchbundle import _prepared
    from flows.patchmap import to_source_grid

    torch.set_num_threads(args.threads)
    p = get_preset(args.preset)
    g, n_bits = _model(args.preset, args.device)
    g1 = _model(args.preset, args.device, seed=1)[0] if args.ratio else None  # M1: its own weights
    preset = replace(p, preprocessing=replace(p.preprocessing, spacing=float(args.spacing)))
    vol = _chest_hu(tuple(args.source_shape))
    base_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    grid01, mask, iso = _prepared(preset, vol, tuple(args.source_spacing), "lung")
    t1 = time.perf_counter()
    with torch.no_grad():
        pm = patch_map(grid01, glow_patch_scorer(g, g1, n_bits), patch=args.patch,
                       overlap=args.overlap, mask=mask, batch_size=args.batch, device=args.device)
    t2 = time.perf_counter()
    finite = pm.values[np.isfinite(pm.values)]
    find_lesions(pm.values, float(np.percentile(finite, 99.0)), (iso,) * 3, min_size=0.2)
    src = to_source_grid(pm.values, vol.shape)
    t3 = time.perf_counter()
    assert src.shape == vol.shape
    return {"patches": len(pm.starts), "seconds": t3 - t0, "model_seconds": t2 - t1,
            "patches_per_s": len(pm.starts) / (t3 - t0), "overhead": (t3 - t0 - (t2 - t1)) / (t2 - t1),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "volume_rss_gb": base_gb, "prepare_s": t1 - t0, "back_s": t3 - t2,
            "grid": list(grid01.shape)}  # type: ignore[dict-item]


def run_one(method: str, args: argparse.Namespace) -> dict[str, float]:
    if method == "node":
        return run_node(args)
    torch.set_num_threads(args.threads)
    g, n_bits = _model(args.preset, args.device)
    g1 = _model(args.preset, args.device, seed=1)[0] if args.ratio else None  # M1: its own weights
    vol, body = _volume(tuple(args.shape))
    # ours: the node's scorer (traced on CPU, flows.patchmap.glow_patch_scorer); naive and
    # monai call the plain nn.Module, as a user of either would; monai-traced hands MONAI our
    # traced scorer, to separate the windowing from the model engine
    inner = glow_patch_scorer(g, g1, n_bits,
                              trace=method in ("ours", "ours-masked", "monai-traced"))
    model_s = 0.0

    def scorer(x: torch.Tensor) -> torch.Tensor:
        nonlocal model_s
        t = time.perf_counter()
        out = inner(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        model_s += time.perf_counter() - t
        return out

    grid = PatchGrid.plan(vol.shape, args.patch, args.overlap)
    n = len(grid.starts())
    t0 = time.perf_counter()
    with torch.no_grad():
        if method in ("ours", "ours-masked"):
            pm = patch_map(vol, scorer, patch=args.patch, overlap=args.overlap,
                           batch_size=args.batch, device=args.device,
                           mask=body if method == "ours-masked" else None)
            n = len(pm.starts)
        elif method == "naive":
            num = np.zeros(vol.shape)
            den = np.zeros(vol.shape)
            w = gaussian_weights(grid.patch)
            for s in grid.starts():
                sl = grid.slices(s)
                x = torch.from_numpy(np.ascontiguousarray(vol[sl]))[None, None].to(args.device)
                v = float(scorer(x)[0])
                num[sl] += w * v
                den[sl] += w
            _ = num / den
        elif method in ("monai", "monai-traced"):
            from monai.inferers import sliding_window_inference

            def predictor(x: torch.Tensor) -> torch.Tensor:
                return scorer(x).float()[:, None, None, None, None].expand(-1, 1, *x.shape[2:]).clone()

            inp = torch.from_numpy(vol)[None, None].to(args.device)
            sliding_window_inference(inp, (args.patch,) * 3, args.batch, predictor,
                                     overlap=args.overlap / args.patch, mode="gaussian",
                                     sigma_scale=0.125)
        else:
            raise SystemExit(f"unknown method {method}")
    total = time.perf_counter() - t0
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"patches": n, "seconds": total, "model_seconds": model_s,
            "patches_per_s": n / total, "peak_rss_gb": rss_gb,
            "overhead": (total - model_s) / model_s if model_s else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-chestct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", type=int, nargs=3, default=[188, 179, 179])
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--overlap", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratio", action="store_true", help="two models (posterior-ratio map)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}, node")
    ap.add_argument("--source-shape", type=int, nargs=3, default=[300, 512, 512],
                    help="node: the CT on its own grid (slices, rows, columns)")
    ap.add_argument("--source-spacing", type=float, nargs=3, default=[1.25, 0.7, 0.7],
                    help="node: its spacing in mm")
    ap.add_argument("--spacing", type=float, default=2.0, help="node: the model grid's spacing in mm")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method; the median is shown")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.repeat):  # interleaved, so a slow minute on a shared machine hits all
        for m in args.methods.split(","):
            cmd = [sys.executable, __file__, "--one", m, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{m}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            runs.setdefault(m, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    # each method's median run by total seconds
    rows = {m: sorted(rs, key=lambda r: r["seconds"])[(len(rs) - 1) // 2] for m, rs in runs.items()}
    cpu = platform.processor() or platform.machine()
    print(f"\n{args.preset}, volume {tuple(args.shape)}, patch {args.patch}, overlap "
          f"{args.overlap}, batch {args.batch}, {args.device} ({cpu}, {args.threads} threads), "
          f"{'two models' if args.ratio else 'one model'}, median of {args.repeat} run(s)\n")
    print("| method | patches | seconds | (all runs) | patches/s | model s | overhead | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        every = ", ".join(f"{x['seconds']:.1f}" for x in runs[m])
        print(f"| {m} | {r['patches']} | {r['seconds']:.1f} | {every} | {r['patches_per_s']:.0f} | "
              f"{r['model_seconds']:.1f} | {100 * r['overhead']:.0f}% | {r['peak_rss_gb']:.2f} |")
    if "node" in rows:
        r = rows["node"]
        print(f"\nnode path, {tuple(args.source_shape)} at {tuple(args.source_spacing)} mm -> grid "
              f"{tuple(r['grid'])} at {args.spacing} mm: prepare {r['prepare_s']:.1f} s, map "
              f"{r['model_seconds']:.1f} s, lesions + back to the source grid {r['back_s']:.1f} s; "
              f"peak RSS {r['peak_rss_gb']:.2f} GB ({r['volume_rss_gb']:.2f} GB with just the volume)")
    for m in ("ours", "ours-masked"):
        for ref in ("monai", "monai-traced"):
            if m in rows and ref in rows:
                print(f"\nspeed-up of {m} over {ref}: {rows[ref]['seconds'] / rows[m]['seconds']:.2f}x")


if __name__ == "__main__":
    main()
