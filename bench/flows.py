"""Throughput of the flows: forward + log-det (inference) and one training step, per preset.

    .venv/bin/python bench/flows.py                      # cpu-* presets
    .venv/bin/python bench/flows.py --presets paper-cxr,paper-bct,ct3dflow   # on a GPU

Prints a Markdown table for docs/benchmarks.md. Timings exclude the first (warm-up) call;
CUDA timings synchronise the device.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

# This file is named like the package it measures: keep bench/ off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from flows.glow import Glow  # noqa: E402
from flows.presets import get_preset  # noqa: E402
from flows.quantize import bits_per_dim, dequantize  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(name: str, dev: torch.device, batch: int | None, repeats: int) -> dict[str, float]:
    p = get_preset(name)
    bs = batch or p.batch_size
    model = Glow(p.glow, seed=0).to(dev)
    x01 = torch.rand(bs, 1, *p.preprocessing.shape)
    x = dequantize(x01, p.preprocessing.n_bits, noise=True).to(dev)
    dims = x[0].numel()
    model.initialize(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def step() -> None:
        loss = bits_per_dim(model(x).log_p, dims, p.preprocessing.n_bits).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    step()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(dev)
    train_s = (time.perf_counter() - t) / repeats
    model.eval()
    with torch.inference_mode():
        model(x)
        _sync(dev)
        t = time.perf_counter()
        for _ in range(repeats):
            model(x)
        _sync(dev)
        fwd_s = (time.perf_counter() - t) / repeats
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return {"batch": bs, "train_step_s": train_s, "train_img_s": bs / train_s,
            "fwd_img_s": bs / fwd_s, "params_M": sum(q.numel() for q in model.parameters()) / 1e6,
            "peak_gib": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", default="cpu-cxr,cpu-bct,cpu-chestct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="override the preset batch size")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    dev = torch.device(a.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}")
    print("| preset | batch | params (M) | train step (s) | train img/s | forward img/s | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|")
    for name in a.presets.split(","):
        r = bench(name, dev, a.batch, a.repeats)
        print(f"| {name} | {r['batch']:.0f} | {r['params_M']:.2f} | {r['train_step_s']:.3f} | "
              f"{r['train_img_s']:.1f} | {r['fwd_img_s']:.1f} | {r['peak_gib']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
