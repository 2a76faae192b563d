"""Accuracy sweep of the two-model posterior on phantoms (the runs in docs/results.md).

    .venv/bin/python bench/accuracy.py TAG KIND 'JSON'

KIND is cxr or bct. JSON overrides the cpu-KIND preset and the run: ``{"strategy": "conditional",
"glow": {"coords": true}, "prep": {"n_bits": 5}, "ep": 4, "fep": 2, "freeze": 1, "n": 1500, "nt":
600, "nv": 400, "seed": 0, "ema": 0.98, "members": 1, "source": "alt", "tta": 1, "shift": 2,
"mirror": true, "ttm": true, "from": "TAG0", "resume": true, "test_fov": 280,
"src": [16, 128, 128], "tail": 0.5, "preset": "paper-bct", "device": "cuda", "max_s": 240,
"min_steps": 0, "nm": 375}``; ``nm`` is the mixture set's size (default ``n``); ``min_steps``
replaces both of the preset's floors of optimisation steps;
``preset`` replaces the cpu-KIND preset (e.g. a paper preset on a GPU), ``max_s`` caps each
model's training time in seconds; ``tail`` fine-tunes M0 and M1 on the base model's
least likely half (flows.tailfocus); ``shift`` trains with random
translations of up to that many pixels; ``mirror`` / ``ttm`` mirror images along the preset's mirror
axis in training / at scoring; ``tta`` scores each image as the mean over its translations within
that many pixels (flows.glow.Translated); ``from`` re-scores the bundle runs/accuracy/TAG0 (e.g.
with another ``tta``) instead of training one (its calibration is not redone: AUROCs do not need
it); ``resume`` continues an interrupted run of the same TAG from its checkpoints under
runs/accuracy/TAG/work; ``base_from`` starts from TAG0's trained base (``shared``: only M0 and M1
are trained, e.g. with other fine-tuning settings); ``source`` "alt" trains and tests on the
independently made phantoms of bench/altcxr.py or bench/althead.py instead of flows/phantoms;
``test_fov`` renders the head-CT test set at that in-plane field of view (mm; training uses 230),
as another site's protocol would; ``src`` is the grid head CTs are rendered on (default the
model grid, 16x64x64; real scans are finer than the model grid); with
``nv`` a labelled validation set (seed 14) lets the bundle choose its score (whole-image posterior
or a map score), and the chosen score is reported beside the whole-image posterior and the
likelihood.
Normal set seed 11, mixture seed 12 (50 % abnormal), test seed 13 (50 % abnormal). Prints
one JSON line (AUROC overall and per finding, Spearman rho of each score with the
zero-pixel fraction) and appends it to runs/accuracy.jsonl; the per-case test scores go to
runs/accuracy/TAG/test_scores.npz (to combine runs, e.g. training seeds).
Set NT to the number of torch threads (two runs side by side: NT=1 each).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.altcxr

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from bench.altcxr import make_alt_cxr  # noqa: E402
from bench.althead import make_alt_headct  # noqa: E402
from flows.build import BuildOptions, build_bundle  # noqa: E402
from flows.bundle import Bundle, load_bundle  # noqa: E402
from flows.evaluate import roc_auc_ci  # noqa: E402
from flows.glow import Translated  # noqa: E402
from flows.phantoms import PhantomSet, make_cxr, make_headct  # noqa: E402
from flows.posterior import PosteriorScorer  # noqa: E402
from flows.presets import Preset, get_preset  # noqa: E402


def main() -> None:
    torch.set_num_threads(int(os.environ.get("NT", "2")))
    tag, kind = sys.argv[1], sys.argv[2]
    cfg = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    p = get_preset(cfg.get("preset", f"cpu-{kind}"))
    prep_over: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                 for k, v in cfg.get("prep", {}).items()}
    p = dataclasses.replace(p, glow=dataclasses.replace(p.glow, **cfg.get("glow", {})),
                            preprocessing=dataclasses.replace(p.preprocessing, **prep_over))
    if "min_steps" in cfg:  # the preset's floors of steps (0: epochs only, as before session 15)
        p = dataclasses.replace(p, min_steps=cfg["min_steps"], finetune_min_steps=cfg["min_steps"])
    n, nt = cfg.get("n", 1500), cfg.get("nt", 600)

    def make(count: int, **kw: object) -> PhantomSet:
        if kind == "cxr" and cfg.get("source") == "alt":  # the independently made phantoms
            return make_alt_cxr(count, size=cfg.get("size", 64), **kw)  # type: ignore[arg-type]
        if kind == "cxr":
            return make_cxr(count, size=cfg.get("size", 64), **kw)  # type: ignore[arg-type]
        if cfg.get("source") == "alt":
            return make_alt_headct(count, **kw)  # type: ignore[arg-type]
        return make_headct(count, shape=tuple(cfg.get("src", (16, 64, 64))), **kw)  # type: ignore[arg-type]

    t0 = time.time()
    prep = p.preprocessing
    with field_of_view(cfg.get("test_fov"), kind, cfg.get("source")):
        test = make(nt, abnormal_fraction=0.5, seed=13)
    timg = prep.apply(test.images)
    out = Path("runs/accuracy") / tag
    if cfg.get("from"):
        b = load_bundle(Path("runs/accuracy") / cfg["from"], device=cfg.get("device", "cpu"))
        if cfg.get("tta") or cfg.get("ttm"):
            mirror = p.mirror_axis if cfg.get("ttm") else None
            b.m0, b.m1 = (Translated(m, cfg.get("tta", 0), mirror).eval() for m in (b.m0, b.m1))
        out.mkdir(parents=True, exist_ok=True)
    else:
        b = train_bundle(tag, out, p, cfg, make, n)  # on the device it trained on
    report(tag, kind, cfg, p, b, test, timg, out, t0)


@contextlib.contextmanager
def field_of_view(mm: float | None, kind: str, source: str | None) -> Iterator[None]:
    """Render head CTs at another in-plane field of view (another site's protocol)."""
    if mm is None:
        yield
        return
    if kind != "bct" or source == "alt":
        raise SystemExit("test_fov is for our head-CT phantoms")
    import flows.phantoms.headct as h

    old = h.FOV_MM
    h.FOV_MM = float(mm)
    h._grid_cached.cache_clear()
    try:
        yield
    finally:
        h.FOV_MM = old
        h._grid_cached.cache_clear()


def train_bundle(tag: str, out: Path, p: Preset, cfg: dict[str, Any], make: Callable[..., PhantomSet],
                 n: int) -> Bundle:
    prep = p.preprocessing
    normal = prep.apply(make(n, seed=11).images)
    mixture = prep.apply(make(cfg.get("nm", n), abnormal_fraction=0.5, seed=12).images)
    nv = cfg.get("nv", 0)
    validation = None
    if nv:  # the bundle chooses its score (whole-image or map) on this labelled set
        vset = make(nv, abnormal_fraction=0.5, seed=14)
        validation = (prep.apply(vset.images), vset.labels)
    if cfg.get("base_from"):  # reuse a trained base: M0 and M1 are fine-tuned afresh from it
        shutil.copytree(Path("runs/accuracy") / cfg["base_from"] / "work" / "base", out / "work" / "base",
                        dirs_exist_ok=True)
    return build_bundle(out, preset=p, normal=normal, mixture=mixture, name=tag, log=print,
                     validation=validation,
                     options=BuildOptions(strategy=cfg.get("strategy"),
                                          epochs=cfg.get("ep"), finetune_epochs=cfg.get("fep"),
                                          freeze_levels=cfg.get("freeze"),
                                          seed=cfg.get("seed", 0), ema_decay=cfg.get("ema"),
                                          members=cfg.get("members", 1),
                                          focus_tail=cfg.get("tail"), device=cfg.get("device"),
                                          max_seconds_per_model=cfg.get("max_s"),
                                          test_time_shift=cfg.get("tta"),
                                          augment_shift=cfg.get("shift", 0),
                                          train_mirror=cfg.get("mirror"), test_time_mirror=cfg.get("ttm"),
                                          resume=bool(cfg.get("base_from") or cfg.get("resume")),
                                          progress=False))


def report(tag: str, kind: str, cfg: dict[str, Any], p: Preset, b: Bundle, test: PhantomSet,
           timg: np.ndarray, out: Path, t0: float) -> None:
    scored = PosteriorScorer(b).score(timg)
    l0 = scored.log_p_normal
    post = scored.abnormality
    res: dict[str, object] = {"tag": tag, "kind": kind, "cfg": cfg, "chosen_score": scored.method,
                              "ema_decay": cfg.get("ema", p.ema_decay),  # what was used
                              "validation_auroc": b.calibration.choice.validation_auroc}
    res.update(auroc_rows(test, {"posterior": post, "likelihood": -l0, "chosen": scored.score}))
    res["seconds"] = round(time.time() - t0)
    # per-case scores, so that runs (e.g. seeds) can be combined afterwards
    np.savez(out / "test_scores.npz", log_p_normal=l0, log_p_mixture=scored.log_p_mixture,
             chosen=scored.score, labels=test.labels, findings=np.array(test.findings))
    record(res, "runs/accuracy.jsonl")


def auroc_rows(test: PhantomSet, scores: dict[str, np.ndarray]) -> dict[str, object]:
    """Per score: AUROC with its 95 % CI, AUROC per finding, Spearman rho with the zero fraction."""
    res: dict[str, object] = {}
    for name, s in scores.items():
        ci = roc_auc_ci(test.labels, s, n_boot=500)
        res[name] = [round(ci.auc, 3), round(ci.lo, 3), round(ci.hi, 3)]
        for fd in sorted(set(test.findings) - {"normal"}):
            sel = np.array([x in ("normal", fd) for x in test.findings])
            res[f"{name}:{fd}"] = round(roc_auc_ci(test.labels[sel], s[sel], n_boot=10).auc, 3)
        res[f"rho_zero:{name}"] = round(float(spearmanr(test.zero_fraction, s)[0]), 3)
    return res


def record(res: dict[str, object], jsonl: str) -> None:
    """Print the result as one JSON line and append it to ``jsonl``."""
    line = json.dumps(res)
    print(line)
    Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
    with open(jsonl, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
