"""Training: learning happens, determinism, checkpoint/resume, the non-finite guard, data loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flows.presets import get_preset
from flows.train import TrainOptions, load_images, register_loader, train
from tests.conftest import blobs

PRESET = get_preset("tiny-cxr")


def _opts(**kw: object) -> TrainOptions:
    base: dict[str, object] = dict(epochs=3, patience=10)
    base.update(kw)
    return TrainOptions.from_preset(PRESET, **base)


def test_training_lowers_bits_per_dim() -> None:
    x, _ = blobs(96, (16, 16))
    res = train(x, PRESET, options=_opts(epochs=4), progress=False)
    first, last = res.history[0], res.history[-1]
    assert last["val_bpd"] < first["val_bpd"]
    assert res.skipped_steps == 0
    assert all(np.isfinite(h["train_bpd"]) for h in res.history)


def test_seeded_training_is_deterministic() -> None:
    x, _ = blobs(48, (16, 16))
    a = train(x, PRESET, options=_opts(epochs=2), progress=False)
    b = train(x, PRESET, options=_opts(epochs=2), progress=False)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_training_on_a_selection_of_rows_is_training_on_the_copy() -> None:
    """flows.rows.Rows: two sets seen as one, without concatenating them, train bit for bit as
    their concatenation does (the batches hold the same rows in the same order)."""
    from flows.rows import Rows

    x, _ = blobs(60, (16, 16))
    a = train(np.concatenate([x[:25], x[25:]]), PRESET, options=_opts(epochs=2), progress=False)
    b = train(Rows.cat(x[:25], x[25:]), PRESET, options=_opts(epochs=2), progress=False)
    assert a.history == [h | {"seconds": a.history[i]["seconds"]} for i, h in enumerate(b.history)]
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_step_floor_trains_a_small_set_for_more_epochs() -> None:
    x, _ = blobs(40, (16, 16))  # 36 training images, batch 16: 3 steps per epoch
    floored = train(x, PRESET, options=_opts(epochs=1, min_steps=7, patience=100), progress=False)
    assert floored.steps == 9 and len(floored.history) == 3
    assert floored.metrics["epochs_planned"] == 3
    plain = train(x, PRESET, options=_opts(epochs=1), progress=False)
    assert plain.steps == 3


def test_preset_step_floor_applies_only_to_its_own_epochs() -> None:
    floored = PRESET.with_overrides(min_steps=500)
    assert TrainOptions.from_preset(floored).min_steps == 500
    assert TrainOptions.from_preset(floored, epochs=2).min_steps == 0  # epochs asked for: as asked
    assert TrainOptions.from_preset(floored, epochs=2, min_steps=30).min_steps == 30


def test_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    x, _ = blobs(48, (16, 16))
    full = train(x, PRESET, options=_opts(epochs=3), progress=False)
    train(x, PRESET, out_dir=tmp_path, options=_opts(epochs=2), progress=False)
    assert (tmp_path / "checkpoint.pt").exists()
    resumed = train(x, PRESET, out_dir=tmp_path, options=_opts(epochs=3), resume=True,
                    progress=False)
    assert len(resumed.history) == 3
    for (k, va), vb in zip(full.model.state_dict().items(), resumed.model.state_dict().values(),
                           strict=True):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_weight_average_is_the_model_returned_and_survives_resume(tmp_path: Path) -> None:
    x, _ = blobs(48, (16, 16))
    plain = train(x, PRESET, options=_opts(epochs=2, keep_best=False), progress=False)
    ema = train(x, PRESET, options=_opts(epochs=2, keep_best=False, ema_decay=0.9), progress=False)
    # same seed and steps: only the averaging differs, and it is what comes back
    moved = [k for (k, a), b in zip(plain.model.state_dict().items(), ema.model.state_dict().values(),
                                    strict=True) if a.is_floating_point() and not torch.equal(a, b)]
    assert moved
    # an average that forgets at once is the last weights: the average follows every step
    last = train(x, PRESET, options=_opts(epochs=2, keep_best=False, ema_decay=1e-9), progress=False)
    for (k, a), b in zip(plain.model.state_dict().items(), last.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), k
    # the average lags behind: its validation bits/dim is not the last weights'
    assert ema.history[-1]["val_bpd"] != plain.history[-1]["val_bpd"]
    train(x, PRESET, out_dir=tmp_path, options=_opts(epochs=1, keep_best=False, ema_decay=0.9),
          progress=False)
    resumed = train(x, PRESET, out_dir=tmp_path, options=_opts(epochs=2, keep_best=False, ema_decay=0.9),
                    resume=True, progress=False)
    for (k, va), vb in zip(ema.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(va, vb, atol=1e-6), k
    with pytest.raises(ValueError, match="ema_decay"):
        train(x, PRESET, options=_opts(epochs=1, ema_decay=1.0), progress=False)
    # a checkpoint written without averaging resumes with it (the average starts there)
    plain_dir = tmp_path / "plain"
    train(x, PRESET, out_dir=plain_dir, options=_opts(epochs=1, keep_best=False), progress=False)
    res = train(x, PRESET, out_dir=plain_dir, options=_opts(epochs=2, keep_best=False, ema_decay=0.9),
                resume=True, progress=False)
    assert len(res.history) == 2


def test_non_finite_steps_are_skipped_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.train as ft

    calls = {"n": 0}
    real = ft.bits_per_dim

    def flaky(log_p: torch.Tensor, n_dims: int, n_bits: int) -> torch.Tensor:
        calls["n"] += 1
        out = real(log_p, n_dims, n_bits)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(ft, "bits_per_dim", flaky)
    x, _ = blobs(32, (16, 16))
    res = train(x, PRESET, options=_opts(epochs=1, val_fraction=0.0), progress=False)
    assert res.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_persistent_non_finite_loss_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.train as ft

    monkeypatch.setattr(ft, "bits_per_dim", lambda lp, d, b: lp * float("nan"))
    x, _ = blobs(32, (16, 16))
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(x, PRESET, options=_opts(epochs=50, max_bad_steps=3), progress=False)


@pytest.mark.parametrize(
    "make,msg",
    [
        (lambda: np.zeros((0, 1, 16, 16), np.float32), "empty"),
        (lambda: np.zeros((4, 16, 16), np.float32), "shape"),
        (lambda: np.zeros((4, 1, 32, 32), np.float32), "shape"),
        (lambda: np.full((4, 1, 16, 16), np.nan, np.float32), "NaN"),
        (lambda: np.full((4, 1, 16, 16), 3.0, np.float32), r"\[0, 1\]"),
    ],
)
def test_bad_training_data(make: object, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        train(make(), PRESET, options=_opts(epochs=1), progress=False)  # type: ignore[operator]
    from flows.rows import Rows

    bad = make()  # type: ignore[operator]
    if bad.ndim == 4 and len(bad):  # the same checks on a selection of rows
        good = np.full((3, *bad.shape[1:]), 0.5, np.float32) if bad.shape[1:] == (1, 16, 16) else bad
        with pytest.raises(ValueError, match=msg):
            train(Rows.cat(good, bad), PRESET, options=_opts(epochs=1), progress=False)


def test_load_images_from_files_and_folders(tmp_path: Path) -> None:
    a = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "one.npy", a[0])
    np.savez(tmp_path / "batch.npz", images=a[1:])
    got = load_images(tmp_path, ndim=2)
    assert got.shape == (3, 1, 8, 8)
    assert load_images(tmp_path / "batch.npz", ndim=2).shape == (2, 1, 8, 8)
    with pytest.raises(FileNotFoundError):
        load_images(tmp_path / "missing", ndim=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no registered loader"):
        load_images(empty, ndim=2)
    np.save(tmp_path / "odd.npy", np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="different shapes"):
        load_images(tmp_path, ndim=2)


def test_registered_loader_is_used(tmp_path: Path) -> None:
    marker = tmp_path / "dicomish"
    marker.mkdir()
    (marker / "x.dcm").write_bytes(b"")

    def loader(p: Path) -> np.ndarray | None:
        return np.ones((2, 4, 4), np.float32) if (p / "x.dcm").exists() else None

    register_loader(loader)
    assert load_images(marker, ndim=2).shape == (2, 1, 4, 4)


def test_frozen_fine_levels_cancel_in_the_ratio() -> None:
    x, _ = blobs(48, (16, 16))
    base = train(x, PRESET, options=_opts(epochs=1), progress=False)
    y, _ = blobs(48, (16, 16), abnormal=1.0, seed=5)
    tuned = train(y, PRESET, options=_opts(epochs=1, freeze_levels=1),
                  init_state=base.model.state_dict(), progress=False)
    b, t = base.model.state_dict(), tuned.model.state_dict()
    fine = [k for k in b if k.startswith(("levels.0.", "splits.0."))]
    coarse = [k for k in b if k.startswith("levels.1.") and b[k].dtype.is_floating_point]
    assert fine and all(torch.equal(b[k], t[k]) for k in fine)
    assert any(not torch.equal(b[k], t[k]) for k in coarse)
    assert all(p.requires_grad for p in tuned.model.parameters())  # unfrozen afterwards
