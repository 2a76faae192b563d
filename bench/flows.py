"""Throughput of the flows: forward + log-det (inference), one training step, and the
two-model posterior scored model by model and as a pair (flows.pair: the fine levels a
preset's fine-tuning keeps frozen run once), per preset.

    .venv/bin/python bench/flows.py                      # cpu-* presets
    .venv/bin/python bench/flows.py --presets paper-cxr,paper-bct,ct3dflow   # on a GPU

Prints a Markdown table for docs/benchmarks.md. Timings exclude the first (warm-up) call;
CUDA timings synchronise the device.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

# This file is named like the package it measures: keep bench/ off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from flows.glow import Glow  # noqa: E402
from flows.pair import ModelPair  # noqa: E402
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
    sep_s, pair_s = _posterior_times(model, p.finetune_freeze if p.strategy == "shared" else 0, x,
                                     dev, repeats)
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return {"batch": bs, "train_step_s": train_s, "train_img_s": bs / train_s,
            "fwd_img_s": bs / fwd_s, "params_M": sum(q.numel() for q in model.parameters()) / 1e6,
            "peak_gib": mem, "frozen": p.finetune_freeze if p.strategy == "shared" else 0,
            "post_sep_img_s": bs / sep_s, "post_pair_img_s": bs / pair_s}


def _posterior_times(m0: Glow, frozen: int, x: torch.Tensor, dev: torch.device,
                     repeats: int) -> tuple[float, float]:
    """Seconds per batch for log p0 and log p1: each model alone, then as a pair. M1 is M0
    with every level above the ``frozen`` finest ones changed, as fine-tuning leaves it."""
    m1 = copy.deepcopy(m0)
    with torch.no_grad():
        for name, q in m1.named_parameters():
            if not name.startswith(tuple(f"{g}.{i}." for g in ("levels", "splits") for i in range(frozen))):
                q.add_(0.01)
    pair = ModelPair(m0, m1)
    assert pair.shared == min(frozen, m0.config.levels - 1)

    def timed(fn: Callable[[], object]) -> float:
        with torch.inference_mode():
            fn()
            _sync(dev)
            t = time.perf_counter()
            for _ in range(repeats):
                fn()
            _sync(dev)
        return (time.perf_counter() - t) / repeats
    return timed(lambda: (m0(x).log_p, m1(x).log_p)), timed(lambda: pair.log_p(x))


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
    print("| preset | batch | params (M) | train step (s) | train img/s | forward img/s | "
          "posterior img/s, each model / pair (shared levels) | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.presets.split(","):
        r = bench(name, dev, a.batch, a.repeats)
        print(f"| {name} | {r['batch']:.0f} | {r['params_M']:.2f} | {r['train_step_s']:.3f} | "
              f"{r['train_img_s']:.1f} | {r['fwd_img_s']:.1f} | {r['post_sep_img_s']:.1f} / "
              f"{r['post_pair_img_s']:.1f} ({r['frozen']:.0f}) | {r['peak_gib']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
