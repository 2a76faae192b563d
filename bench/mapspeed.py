"""Radiograph maps: the single-pass decomposition vs the sliding patch window, seconds per image.

    .venv/bin/python bench/mapspeed.py [--n 200] [--patch 16] [--overlap 8]

Both on 64x64 images with two models each (the posterior-ratio map): the decomposition uses
the cpu-cxr Glow (one forward pass per model per image); the window uses a 2D patch Glow
(16x16, L2 K8, width 64, as in docs/results.md's patch run) on every patch. Models are at
their seeded random initialisation (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flows.densitymap import log_p_maps  # noqa: E402
from flows.glow import Glow, GlowConfig  # noqa: E402
from flows.patchmap import glow_patch_scorer, patch_map  # noqa: E402
from flows.presets import get_preset  # noqa: E402


def _glow(cfg: GlowConfig, shape: tuple[int, ...], seed: int) -> Glow:
    g = Glow(cfg, seed=seed)
    g.initialize(torch.rand(8, 1, *shape) - 0.5)
    return g.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--overlap", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = get_preset("cpu-cxr")
    shape = p.preprocessing.shape
    imgs = np.random.default_rng(0).random((args.n, 1, *shape)).astype(np.float32)
    m0, m1 = _glow(p.glow, shape, 0), _glow(p.glow, shape, 1)
    t = time.perf_counter()
    log_p_maps(m0, imgs, 5)
    log_p_maps(m1, imgs, 5)
    dec = (time.perf_counter() - t) / args.n
    pc = dataclasses.replace(GlowConfig(1, 2, levels=2, steps=8, hidden=64))
    q0, q1 = _glow(pc, (args.patch,) * 2, 0), _glow(pc, (args.patch,) * 2, 1)
    scorer = glow_patch_scorer(q0, q1, 5)
    t = time.perf_counter()
    n_patches = 0
    for im in imgs[:, 0]:
        n_patches = len(patch_map(im, scorer, patch=args.patch, overlap=args.overlap,
                                  batch_size=64).starts)
    win = (time.perf_counter() - t) / args.n
    print(f"\n64x64 radiographs, {args.n} images, two models, {args.threads} threads\n")
    print("| map | seconds per image | images/s |")
    print("|---|---|---|")
    print(f"| decomposition (cpu-cxr Glow, L4 K8 w96) | {dec:.4f} | {1 / dec:.1f} |")
    print(f"| patch window ({args.patch}², overlap {args.overlap}, {n_patches} patches; L2 K8 w64) "
          f"| {win:.4f} | {1 / win:.1f} |")


if __name__ == "__main__":
    main()
