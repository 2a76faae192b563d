"""Train a whole bundle: M0 on normal images, M1 on the unlabelled mixture, then calibrate.

Strategies (see docs/decisions.md):

- ``independent``: both models from scratch, as in Shibata et al.
- ``finetune-m1`` (default): M0 from scratch on normals; M1 starts from M0's weights and is
  fine-tuned on the mixture. The two models then share everything the normal set already
  explains (noise, texture, anatomy), so ``log p0 - log p1`` is not swamped by two
  independent trainings' idiosyncrasies and moves only where the mixture differs.
- ``finetune-m0``: the mirror image (M1 from scratch, M0 fine-tuned on normals).
- ``conditional``: one class-conditional Glow trained on normal + mixture with
  the set as its condition; M0 = p(x | normal set), M1 = p(x | mixture). Every weight is
  shared and trained on all the data; only the condition pathway (one input channel per
  coupling and split prior, and the top prior) can tell the two apart, so the ratio carries
  what distinguishes the mixture and little of the estimation noise of two separate fits.
- ``shared``: a base model on normal + mixture, then M0 and M1 are each fine-tuned from it,
  on normals and on the mixture, with the same schedule. Whatever the base had not yet
  learnt, both learn equally, so ``log p0 - log p1`` is not a measure of training progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flows.bundle import MAX_TEST_TIME_SHIFT, Bundle, Calibration, load_bundle, save_bundle
from flows.densitymap import ScoreChoice, choose_score, pair_log_p_maps
from flows.glow import Averaged, Conditioned, FlowModel, Translated
from flows.posterior import map_pair_scores, two_model_scores
from flows.presets import Preset
from flows.rows import ImageSet, Rows, fingerprint
from flows.tailfocus import check_fraction, select_tail
from flows.train import TrainOptions, TrainResult, pick_device, train

Strategy = Literal["conditional", "independent", "finetune-m1", "finetune-m0", "shared"]
STRATEGIES: tuple[str, ...] = ("conditional", "independent", "finetune-m1", "finetune-m0", "shared")


@dataclass
class BuildOptions:
    strategy: Strategy | None = None  # None: the preset's
    seed: int = 0
    epochs: int | None = None  # for models trained from scratch
    finetune_epochs: int | None = None
    finetune_lr: float | None = None
    batch_size: int | None = None
    augment_shift: int = 0
    freeze_levels: int | None = None  # fine-tuning keeps the k finest levels shared
    threshold_percentile: float = 90.0
    device: str | None = None
    progress: bool = True
    max_seconds_per_model: float | None = None
    map_scores: bool = True  # with a validation set, consider map-based scores too
    max_reference_maps: int = 400  # mixture images whose maps form the per-position reference
    # Mixture images kept out of training to form the reference distribution (percentiles):
    # M1 fits its own training images better than new ones, so scores of training images
    # would place every new case too low. 0 disables (the reference is then the training set).
    reference_holdout: float = 0.1
    min_reference: int = 10
    ema_decay: float | None = None  # None: the preset's
    # independently trained (M0, M1) pairs whose log-densities are averaged (flows.glow.Averaged);
    # member k trains with seeds + 1000 k. Each member costs one more training.
    members: int = 1
    test_time_shift: int | None = None  # None: the preset's (flows.glow.Translated)
    # mirror images along the preset's mirror_axis in training / at scoring; None: the preset's
    train_mirror: bool | None = None
    test_time_mirror: bool | None = None
    # continue each model from its checkpoint under out/work (an interrupted build, or more
    # epochs); a model fine-tuned from one that trained further in this run starts afresh
    resume: bool = False
    # ``shared`` only: fine-tune M0 and M1 on the fraction of the normal set the base model
    # finds least likely, and the mixture beyond the same cut (flows.tailfocus)
    focus_tail: float | None = None


def split_reference(mixture: ImageSet, fraction: float, minimum: int, seed: int
                    ) -> tuple[ImageSet, np.ndarray | None]:
    """(training part, held-out reference part or None) of the mixture set, seeded. The
    training part is a selection of the set's rows (:class:`flows.rows.Rows`), not a copy."""
    n = len(mixture)
    k = max(minimum, round(fraction * n)) if fraction > 0 else 0
    if k == 0 or n - k < max(minimum, k):  # too small to spare a reference: use the training set
        return mixture, None
    order = np.random.default_rng(seed + 7919).permutation(n)
    rows = Rows.cat(mixture)
    return rows.take(np.sort(order[k:])), rows[np.sort(order[:k])]


def _mirror_axis(preset: Preset, on: bool) -> int | None:
    if on and preset.mirror_axis is None:
        raise ValueError(f"preset {preset.name} has no mirror axis: its anatomy is not mirror-symmetric")
    return preset.mirror_axis if on else None


def _choice_line(choice: ScoreChoice) -> str:
    aucs, lower = choice.validation_auroc, choice.gain_lower_bound
    best = max(lower, key=lambda k: aucs[k]) if lower else None
    line = f"score chosen on validation: {choice.name} (AUROC {aucs[choice.name]:.3f}"
    if best is not None:
        line += (f"; best map score {best} {aucs[best]:.3f}, lower bound on its gain over the "
                 f"whole-image posterior ({aucs['whole']:.3f}) {lower[best]:+.3f}")
    return line + ")"


def build_bundle(out: str | Path, *, preset: Preset, normal: ImageSet, mixture: ImageSet,
                 name: str, version: str = "1", options: BuildOptions | None = None,
                 validation: tuple[np.ndarray, np.ndarray] | None = None,
                 log: Callable[[str], None] = print) -> Bundle:
    """Train M0 and M1 on preprocessed images in [0, 1] and write a verified bundle.

    ``validation`` = (images, labels) picks the operating threshold by Youden's J; without
    it the threshold is a percentile of the mixture's score distribution. The sets are read
    in place (:mod:`flows.rows`): training holds no copy of them.
    """
    opts = options or BuildOptions()
    if opts.strategy is None:
        opts = replace(opts, strategy=preset.strategy)  # type: ignore[arg-type]
    if opts.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {opts.strategy!r}; use one of {', '.join(STRATEGIES)}")
    out = Path(out)
    mixture, held = split_reference(mixture, opts.reference_holdout, opts.min_reference, opts.seed)
    reference = held if held is not None else np.asarray(mixture)
    if held is not None:
        log(f"{len(held)} mixture images held out of training for the reference distribution")
    scratch = TrainOptions.from_preset(preset, epochs=opts.epochs, batch_size=opts.batch_size,
                                       seed=opts.seed, augment_shift=opts.augment_shift,
                                       max_seconds=opts.max_seconds_per_model, ema_decay=opts.ema_decay)
    tune = TrainOptions.from_preset(
        preset, epochs=opts.finetune_epochs or preset.finetune_epochs or preset.epochs,
        lr=opts.finetune_lr or preset.finetune_lr or preset.lr, batch_size=opts.batch_size,
        min_steps=preset.finetune_min_steps if opts.finetune_epochs is None else 0,
        seed=opts.seed + 1, augment_shift=opts.augment_shift, warmup_steps=1,
        max_seconds=opts.max_seconds_per_model, keep_best=False, patience=10**6, ema_decay=opts.ema_decay,
        freeze_levels=opts.freeze_levels if opts.freeze_levels is not None else preset.finetune_freeze)
    train_mirror = preset.train_mirror if opts.train_mirror is None else opts.train_mirror
    mirror = _mirror_axis(preset, train_mirror)
    scratch, tune = replace(scratch, augment_mirror=mirror), replace(tune, augment_mirror=mirror)

    advanced: set[int] = set()  # results that took training steps in this run

    def fit(images: ImageSet, label: str, o: TrainOptions, init: TrainResult | None,
            init_name: str = "", work: Path = out / "work") -> TrainResult:
        how = f"fine-tuned from {init_name}" if init else "from scratch"
        log(f"training {label} on {len(images)} images ({preset.name}, {how})")
        res = train(images, preset, out_dir=work / label.lower(), options=o,
                    init_state=init.model.state_dict() if init else None, device=opts.device,
                    progress=opts.progress, label=label,
                    resume=opts.resume and (init is None or id(init) not in advanced))
        done = res.metrics["resumed_at_step"]
        if done is not None:
            log(f"{label}: resumed at step {done}, now at step {res.metrics['steps']}")
        if res.metrics["steps"] != done:
            advanced.add(id(res))
        return res

    def pair(k: int) -> tuple[FlowModel, FlowModel, dict[str, Any]]:
        """Member k's M0 and M1, by the strategy; member k > 0 differs only in its seeds."""
        sc = replace(scratch, seed=scratch.seed + 1000 * k)
        tn = replace(tune, seed=tune.seed + 1000 * k)
        work = out / "work" / (f"member{k}" if k else "")
        if opts.strategy == "conditional":
            cp = replace(preset, glow=replace(preset.glow, conditions=2))
            log(f"training a conditional Glow on {len(normal)} normal + {len(mixture)} mixture images "
                f"({preset.name})")
            joint = train(Rows.cat(normal, mixture), cp, out_dir=work / "joint",
                          options=sc, device=opts.device, progress=opts.progress, label="M0|M1",
                          conditions=np.repeat([0, 1], [len(normal), len(mixture)]))
            return Conditioned(joint.model, 0), Conditioned(joint.model, 1), {"joint": joint.metrics}
        base: TrainResult | None = None
        if opts.strategy == "independent":
            r0 = fit(normal, "M0", sc, None, work=work)
            r1 = fit(mixture, "M1", replace(sc, seed=sc.seed + 1), None, work=work)
        elif opts.strategy == "finetune-m1":
            r0 = fit(normal, "M0", sc, None, work=work)
            r1 = fit(mixture, "M1", tn, r0, "M0", work=work)
        elif opts.strategy == "finetune-m0":
            r1 = fit(mixture, "M1", sc, None, work=work)
            r0 = fit(normal, "M0", tn, r1, "M1", work=work)
        else:
            base = fit(Rows.cat(normal, mixture), "base", sc, None, work=work)
            tn_normal, tn_mixture = normal, mixture
            if opts.focus_tail is not None:
                tn_normal, tn_mixture, tau = select_tail(base.model, normal, mixture, opts.focus_tail,
                                                         preset.preprocessing.n_bits, log)
                focus = {"fraction": opts.focus_tail, "cut": tau, "normal": len(tn_normal),
                         "mixture": len(tn_mixture)}
            r0 = fit(tn_normal, "M0", tn, base, "base", work=work)
            r1 = fit(tn_mixture, "M1", tn, base, "base", work=work)
        metrics: dict[str, Any] = {"m0": r0.metrics, "m1": r1.metrics}
        if base is not None:
            metrics["base"] = base.metrics
            if opts.focus_tail is not None:
                metrics["focus_tail"] = focus
        return r0.model, r1.model, metrics

    if opts.focus_tail is not None:  # refused before any training, not after the base
        if opts.strategy != "shared":
            raise ValueError("tail focus needs the shared strategy (a base model to find the tail with)")
        check_fraction(opts.focus_tail)
    if opts.members < 1:
        raise ValueError(f"members must be >= 1, got {opts.members}")
    shift = preset.test_time_shift if opts.test_time_shift is None else opts.test_time_shift
    if not 0 <= shift <= MAX_TEST_TIME_SHIFT:
        raise ValueError(f"test-time shift must be 0-{MAX_TEST_TIME_SHIFT} pixels, got {shift}")
    pairs = []
    for k in range(opts.members):
        if opts.members > 1:
            log(f"ensemble member {k + 1} of {opts.members}")
        pairs.append(pair(k))
    m0: FlowModel
    m1: FlowModel
    if opts.members == 1:
        m0, m1, metrics = pairs[0]
    else:  # the mean log-density of the members (flows.glow.Averaged)
        m0, m1 = Averaged([p[0] for p in pairs]), Averaged([p[1] for p in pairs])  # type: ignore[misc]
        metrics = {**pairs[0][2], "member_metrics": [p[2] for p in pairs]}
    tt_mirror = _mirror_axis(preset, preset.test_time_mirror if opts.test_time_mirror is None
                             else opts.test_time_mirror)
    if shift or tt_mirror is not None:  # calibrate on the scores the node will compute
        n_views = (2 * shift + 1) ** len(preset.preprocessing.shape) * (1 if tt_mirror is None else 2)
        log(f"scores are means over {n_views} copies of each image (translations within {shift} "
            f"pixel(s){'' if tt_mirror is None else ', each also mirrored'})")
        m0, m1 = Translated(m0, shift, tt_mirror).eval(), Translated(m1, shift, tt_mirror).eval()
    n_bits = preset.preprocessing.n_bits
    choice, map_ref = ScoreChoice(None, {}), None
    val_labels = val_scores = ref = None
    if validation is not None:
        vimg, val_labels = validation
        if opts.map_scores and len(np.unique(val_labels)) == 2:
            rng = np.random.default_rng(opts.seed)
            pick = np.sort(rng.choice(len(reference), min(len(reference), opts.max_reference_maps),
                                      replace=False))
            v0, v1 = pair_log_p_maps(m0, m1, vimg, n_bits)
            r0, r1 = pair_log_p_maps(m0, m1, reference[pick], n_bits)
            choice, map_ref = choose_score(v0, v1, val_labels, r0, r1)
            log(_choice_line(choice))
            # the maps are at hand: score them the same way the scorer will
            val_scores = map_pair_scores(v0, v1, choice, map_ref)[2]
            if len(pick) == len(reference):
                ref = map_pair_scores(r0, r1, choice, map_ref)[2]
        else:
            val_scores = two_model_scores(m0, m1, vimg, n_bits, choice, map_ref)[2]
    if ref is None:
        ref = two_model_scores(m0, m1, reference, n_bits, choice, map_ref)[2]
    cal = Calibration.from_scores(ref, labels=val_labels, scores=val_scores,
                                  percentile=opts.threshold_percentile, choice=choice)
    training: dict[str, Any] = {
        "strategy": opts.strategy,
        "seed": opts.seed,
        "members": opts.members,
        "normal": fingerprint(normal),
        "mixture": fingerprint(mixture),
        "reference": {"source": "held-out mixture" if held is not None else "training mixture",
                      **fingerprint(reference)},
        **metrics,
    }
    save_bundle(out, m0=m0, m1=m1, preset=preset.name,
                preprocessing=preset.preprocessing, calibration=cal, name=name, version=version,
                training=training, map_reference=map_ref)
    log(f"bundle written to {out} (threshold {cal.threshold:.3f}, {cal.threshold_method})")
    # verified from disk, on the device it trained on (a GPU preset scored on a CPU takes hours)
    return load_bundle(out, device=pick_device(opts.device))
