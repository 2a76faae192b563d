"""Training one Glow by maximum likelihood.

Adam with linear warm-up, gradient-norm clipping, a guard that skips (and counts) steps with
a non-finite loss or gradient, validation bits/dim with early stopping, periodic atomic
checkpoints that ``resume=True`` continues from, and seeded determinism.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from flows.atomic import torch_save
from flows.glow import Glow, translate
from flows.presets import Preset
from flows.quantize import bits_per_dim, dequantize
from flows.rows import ImageSet, as_rows

log = logging.getLogger(__name__)

ImageLoader = Callable[[Path], "np.ndarray | None"]
_LOADERS: list[ImageLoader] = []


def register_loader(loader: ImageLoader) -> None:
    """Register a loader for folders that are not .npy/.npz (``triage`` adds DICOM)."""
    if loader not in _LOADERS:
        _LOADERS.append(loader)


def load_images(source: str | Path, ndim: int) -> np.ndarray:
    """Raw ``ndim``-D images, batched, from an .npy/.npz file, a folder of them, or a folder a
    registered loader understands.

    An .npz holding an ``images`` array (phantom sets) uses it; otherwise its first array. A
    file may hold one image ``(*spatial)``, a batch ``(N, *spatial)`` or ``(N, 1, *spatial)``.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {path}")
    if path.is_file():
        return _batched(_load_array_file(path), ndim, path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
    if files:
        arrays = [_batched(_load_array_file(p), ndim, p) for p in files]
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"{path}: arrays of different shapes {sorted(shapes)}; resample first")
        return np.concatenate(arrays, axis=0)
    for loader in _LOADERS:
        arr = loader(path)
        if arr is not None:
            return _batched(arr, ndim, path)
    raise ValueError(f"{path}: no .npy/.npz files and no registered loader recognised it "
                     "(DICOM folders need the triage package's loader)")


def _load_array_file(p: Path) -> np.ndarray:
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    else:
        with np.load(p, allow_pickle=False) as z:
            if not z.files:
                raise ValueError(f"{p}: empty .npz")
            arr = z["images"] if "images" in z.files else z[z.files[0]]
    return arr


def _batched(arr: np.ndarray, ndim: int, where: Path) -> np.ndarray:
    if arr.ndim == ndim:
        return arr[None, None]
    if arr.ndim == ndim + 1:
        return arr[:, None]
    if arr.ndim == ndim + 2 and arr.shape[1] == 1:
        return arr
    raise ValueError(f"{where}: array of shape {arr.shape} is not a {ndim}D image or batch of them")


def check_dataset(images: ImageSet, preset: Preset, name: str = "training set") -> None:
    shape = (1, *preset.preprocessing.shape)
    if images.ndim != len(shape) + 1 or tuple(images.shape[1:]) != shape:
        raise ValueError(f"{name}: expected preprocessed images of shape (N, {', '.join(map(str, shape))}), "
                         f"got {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    bad, lo, hi = 0, math.inf, -math.inf
    for c in as_rows(images).chunks():  # a batch at a time: no set-sized temporaries
        finite = np.isfinite(c)
        bad += int((~finite).sum())
        if finite.any():
            lo, hi = min(lo, float(c[finite].min())), max(hi, float(c[finite].max()))
    if bad:
        raise ValueError(f"{name} holds {bad} NaN/inf pixel(s)")
    if lo < 0 or hi > 1:
        raise ValueError(f"{name}: values must be in [0, 1] after preprocessing, "
                         f"got [{lo:.3g}, {hi:.3g}]")


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainResult:
    model: Glow
    history: list[dict[str, float]]
    best_val_bpd: float
    skipped_steps: int
    steps: int
    seconds: float
    stopped_early: bool
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainOptions:
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0
    warmup_steps: int = 200
    grad_clip: float = 50.0
    val_fraction: float = 0.1
    patience: int = 5
    seed: int = 0
    checkpoint_every: int = 500  # steps; a checkpoint is also written at every epoch end
    max_bad_steps: int = 50  # consecutive non-finite steps before giving up
    augment_shift: int = 0  # random translation (pixels/voxels) during training
    augment_mirror: int | None = None  # spatial axis along which half the images are mirrored
    max_seconds: float | None = None
    keep_best: bool = True  # end with the best-validation weights (else the last ones)
    freeze_levels: int = 0  # fine-tuning: keep the k finest levels as loaded
    # Exponential moving average of the weights (0 = off): validation, the best state and the
    # final model use the averaged weights, which carry less of the last steps' SGD noise
    # (a bundle's posterior is a difference of two models, so that noise does not cancel).
    ema_decay: float = 0.0
    # Train for max(epochs, the epochs that reach min_steps optimisation steps): the preset's
    # training length holds on a data set smaller than the one it was measured on.
    min_steps: int = 0

    @classmethod
    def from_preset(cls, preset: Preset, **kw: Any) -> TrainOptions:
        """The preset's options; ``kw`` overrides them (``None`` values are ignored). The
        preset's step floor applies only with the preset's own epochs: epochs given here are
        trained as given."""
        base: dict[str, Any] = dict(epochs=preset.epochs, lr=preset.lr, batch_size=preset.batch_size,
                                    min_steps=preset.min_steps if kw.get("epochs") is None else 0,
                                    weight_decay=preset.weight_decay,
                                    warmup_steps=preset.warmup_steps, grad_clip=preset.grad_clip,
                                    ema_decay=preset.ema_decay,
                                    augment_mirror=preset.mirror_axis if preset.train_mirror else None)
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)


def _batches(n: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    for i in range(0, n, batch):
        yield order[i:i + batch]


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random integer translation with edge replication (no wrap-around)."""
    if max_shift <= 0:
        return x
    offs = torch.randint(0, 2 * max_shift + 1, (x.dim() - 2,), generator=gen).tolist()
    return translate(x, [o - max_shift for o in offs])


def _mirror(x: torch.Tensor, axis: int | None, gen: torch.Generator) -> torch.Tensor:
    """Each image of the batch mirrored along spatial ``axis`` with probability 1/2."""
    if axis is None:
        return x
    flip = torch.rand(len(x), generator=gen) < 0.5
    if flip.any():
        x = x.clone()
        x[flip] = x[flip].flip(2 + axis)
    return x


def _cond(conditions: np.ndarray | None, idx: np.ndarray | slice, dev: torch.device
          ) -> torch.Tensor | None:
    return None if conditions is None else torch.from_numpy(conditions[idx]).to(dev)


@torch.no_grad()
def evaluate_bpd(model: Glow, images: ImageSet, n_bits: int, device: torch.device,
                 batch_size: int, conditions: np.ndarray | None = None) -> float:
    """Mean validation bits/dim with deterministic (bin-centre) dequantisation."""
    model.eval()
    dims = int(np.prod(images.shape[1:]))
    total, count = 0.0, 0
    for i in range(0, len(images), batch_size):
        x = dequantize(torch.from_numpy(images[i:i + batch_size]).to(device), n_bits, noise=False)
        c = _cond(conditions, slice(i, i + batch_size), device)
        bpd = bits_per_dim(model(x, c).log_p, dims, n_bits)
        total += float(bpd.sum())
        count += x.shape[0]
    return total / max(count, 1)




def train(images: ImageSet, preset: Preset, *, out_dir: str | Path | None = None,
          options: TrainOptions | None = None, init_state: dict[str, Any] | None = None,
          resume: bool = False, device: str | None = None, progress: bool = True,
          label: str = "train", conditions: np.ndarray | None = None) -> TrainResult:
    """Train one Glow on preprocessed images ``(N, 1, *shape)`` in [0, 1] (an array, or a
    :class:`flows.rows.Rows` selection of arrays: batches are gathered as they are drawn).

    ``init_state`` starts from another model's weights (fine-tuning; ActNorm stays as loaded).
    With ``out_dir`` a checkpoint is kept there, and ``resume=True`` continues from it.
    ``conditions`` (one class index per image) trains a class-conditional Glow; the preset's
    Glow must then have ``conditions`` > 0.
    """
    opts = options or TrainOptions.from_preset(preset)
    check_dataset(images, preset)
    if (conditions is None) != (preset.glow.conditions == 0):
        raise ValueError("class indices are needed exactly when the Glow is conditional")
    if conditions is not None:
        conditions = np.asarray(conditions, dtype=np.int64)
        if conditions.shape != (len(images),):
            raise ValueError(f"need one condition per image: {conditions.shape} vs {len(images)}")
    if opts.epochs < 1 or opts.batch_size < 1 or opts.lr <= 0 or opts.min_steps < 0:
        raise ValueError(f"bad training options: {opts}")
    dev = pick_device(device)
    torch.manual_seed(opts.seed)
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    rng = np.random.default_rng(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)

    n = len(images)
    n_val = round(n * opts.val_fraction) if n >= 10 else 0
    perm = rng.permutation(n)
    rows = as_rows(images)  # a selection: the set is not copied
    val, trn = rows.take(perm[:n_val]), rows.take(perm[n_val:])
    val_c = None if conditions is None else conditions[perm[:n_val]]
    trn_c = None if conditions is None else conditions[perm[n_val:]]
    n_bits = preset.preprocessing.n_bits
    dims = int(np.prod(images.shape[1:]))

    model = Glow(preset.glow, seed=opts.seed).to(dev)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.freeze_finest(opts.freeze_levels)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=opts.lr, weight_decay=opts.weight_decay)
    if not 0.0 <= opts.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {opts.ema_decay}")
    history: list[dict[str, float]] = []
    step, start_epoch, skipped, bad_run = 0, 0, 0, 0
    best_val, best_state, since_best = math.inf, None, 0
    ckpt = Path(out_dir) / "checkpoint.pt" if out_dir else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    st: dict[str, Any] | None = None  # the checkpoint resumed from
    if resume and ckpt is not None and ckpt.exists():
        st = torch.load(ckpt, map_location=dev, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, start_epoch, skipped = st["step"], st["epoch"], st["skipped"]
        history, best_val, since_best = st["history"], st["best_val"], st["since_best"]
        best_state = st["best_state"]
        rng.bit_generator.state = st["np_rng"]
        gen.set_state(st["torch_gen"])
        torch.set_rng_state(st["torch_rng"])
    elif init_state is None:
        k = min(len(trn), 256)
        model.initialize(dequantize(torch.from_numpy(trn[:k]).to(dev), n_bits, noise=True,
                                    generator=gen), _cond(trn_c, slice(0, k), dev))
    # after ActNorm's initialisation, so the average starts from initialised weights
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(opts.ema_decay))
           if opts.ema_decay > 0 else None)
    if ema is not None and st is not None:
        if st.get("ema") is not None:
            ema.load_state_dict(st["ema"])
        else:  # a checkpoint written without averaging: the average starts at the resumed weights
            log.info("%s: checkpoint has no weight average; it starts from the resumed weights", label)
    scored = cast(Glow, ema.module) if ema is not None else model  # what validation and the result use

    def save_checkpoint(epoch: int) -> None:
        if ckpt is None:
            return
        torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                      "epoch": epoch, "skipped": skipped, "history": history, "best_val": best_val,
                      "since_best": since_best, "best_state": best_state,
                      "np_rng": rng.bit_generator.state, "torch_gen": gen.get_state(),
                      "torch_rng": torch.get_rng_state(), "preset": preset.name,
                      "ema": ema.state_dict() if ema is not None else None}, ckpt)

    t0 = time.monotonic()
    stopped_early = False
    steps_per_epoch = math.ceil(len(trn) / opts.batch_size)
    epochs = max(opts.epochs, math.ceil(opts.min_steps / steps_per_epoch))
    columns = (TextColumn(f"[bold]{label}[/] ep {{task.fields[epoch]}}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"),
               TextColumn("bpd {task.fields[bpd]:.3f} val {task.fields[val]:.3f}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        if epochs > opts.epochs:
            bar.console.log(f"{label}: {len(trn)} training images make {steps_per_epoch} steps per "
                            f"epoch; {epochs} epochs instead of {opts.epochs} to reach "
                            f"{opts.min_steps} steps")
        task = bar.add_task(label, total=epochs * steps_per_epoch,
                            completed=start_epoch * steps_per_epoch, epoch=start_epoch,
                            bpd=float("nan"), val=best_val if best_val < math.inf else float("nan"))
        for epoch in range(start_epoch, epochs):
            model.train()
            run_loss, run_n = 0.0, 0
            for idx in _batches(len(trn), opts.batch_size, rng):
                x01 = _shift(torch.from_numpy(trn[idx]), opts.augment_shift, gen)
                x01 = _mirror(x01, opts.augment_mirror, gen)
                x = dequantize(x01, n_bits, noise=True, generator=gen).to(dev)
                lr = opts.lr * min(1.0, (step + 1) / max(1, opts.warmup_steps))
                for g in opt.param_groups:
                    g["lr"] = lr
                loss = bits_per_dim(model(x, _cond(trn_c, idx, dev)).log_p, dims, n_bits).mean()
                opt.zero_grad(set_to_none=True)
                ok = bool(torch.isfinite(loss))
                if ok:
                    loss.backward()
                    gnorm = torch.nn.utils.clip_grad_norm_(trainable, opts.grad_clip)
                    ok = bool(torch.isfinite(gnorm))
                if ok:
                    opt.step()
                    if ema is not None:
                        ema.update_parameters(model)
                    bad_run = 0
                    run_loss += float(loss.detach()) * len(idx)
                    run_n += len(idx)
                else:
                    skipped += 1
                    bad_run += 1
                    bar.console.log(f"[yellow]{label}: skipped step {step} (non-finite loss or gradient)")
                    if bad_run >= opts.max_bad_steps:
                        raise FloatingPointError(
                            f"{label}: {bad_run} consecutive non-finite steps at step {step}; "
                            "lower the learning rate or check the data")
                step += 1
                bar.update(task, advance=1, epoch=epoch + 1,
                           bpd=run_loss / max(run_n, 1))
                if ckpt is not None and step % opts.checkpoint_every == 0:
                    save_checkpoint(epoch)
            train_bpd = run_loss / max(run_n, 1)
            val_bpd = (evaluate_bpd(scored, val, n_bits, dev, opts.batch_size, val_c)
                       if len(val) else train_bpd)
            history.append({"epoch": epoch + 1, "step": step, "train_bpd": train_bpd,
                            "val_bpd": val_bpd, "seconds": time.monotonic() - t0})
            bar.update(task, val=val_bpd)
            if val_bpd < best_val - 1e-4:
                best_val, since_best = val_bpd, 0
                best_state = copy.deepcopy(scored.state_dict())
            else:
                since_best += 1
            save_checkpoint(epoch + 1)
            if since_best >= opts.patience:
                stopped_early = True
                bar.console.log(f"{label}: early stop after epoch {epoch + 1} "
                                f"(no validation gain for {opts.patience} epochs)")
                break
            if opts.max_seconds is not None and time.monotonic() - t0 > opts.max_seconds:
                bar.console.log(f"{label}: time budget reached after epoch {epoch + 1}")
                break
    if opts.keep_best and best_state is not None:
        model.load_state_dict(best_state)
    elif ema is not None:
        model.load_state_dict(scored.state_dict())
    model.freeze_finest(0)
    model.eval()
    result = TrainResult(model=model, history=history, best_val_bpd=best_val, skipped_steps=skipped,
                         steps=step, seconds=time.monotonic() - t0, stopped_early=stopped_early)
    result.metrics = {"best_val_bpd": best_val, "skipped_steps": skipped, "steps": step,
                      "epochs": len(history), "epochs_planned": epochs, "seconds": round(result.seconds, 1),
                      "stopped_early": stopped_early, "options": asdict(opts),
                      "resumed_at_step": None if st is None else st["step"]}
    if out_dir is not None:
        summary = result.metrics | {"history": history}
        (Path(out_dir) / "history.json").write_text(json.dumps(summary, indent=2))
    return result
