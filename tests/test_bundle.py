"""Bundles: round trip, verification, refusal with reasons; the posterior scorer."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.bundle import Bundle, BundleError, load_bundle
from flows.posterior import PosteriorScorer
from flows.preprocess import Preprocessing
from tests.conftest import blobs


def _copy(b: Bundle, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(b.path, dst)
    return dst


def test_bundle_round_trip_and_manifest(tiny_bundle: Bundle) -> None:
    m = tiny_bundle.manifest
    assert m["kind"] == "cxr" and m["preset"] == "tiny-cxr"
    assert set(m["files"]) == {"m0.pt", "m1.pt", "calibration.json"}
    assert m["training"]["normal"]["n"] == 64 and len(m["training"]["normal"]["sha256"]) == 64
    assert m["versions"]["torch"]
    again = load_bundle(tiny_bundle.path, expect=tiny_bundle.preprocessing)
    assert again.fingerprint == tiny_bundle.fingerprint
    assert tiny_bundle.calibration.threshold_method == "youden"


def _refused_when_corrupted(bundle_dir: Path, fname: str) -> None:
    """Flip one byte of ``fname``: loading names that file."""
    data = bytearray((bundle_dir / fname).read_bytes())
    data[-10] ^= 0xFF
    (bundle_dir / fname).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{re.escape(fname)} is corrupted"):
        load_bundle(bundle_dir)


def test_corrupted_weights_are_refused(tiny_bundle: Bundle, tmp_path: Path) -> None:
    _refused_when_corrupted(_copy(tiny_bundle, tmp_path), "m1.pt")


def test_preprocessing_mismatch_is_named(tiny_bundle: Bundle) -> None:
    other = Preprocessing(kind="cxr", shape=(32, 32), n_bits=8)
    with pytest.raises(BundleError, match=r"shape: \(16, 16\) != \(32, 32\)"):
        load_bundle(tiny_bundle.path, expect=other)


def test_format_version_and_missing_files(tiny_bundle: Bundle, tmp_path: Path) -> None:
    p = _copy(tiny_bundle, tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    m["format_version"] = 99
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(p)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path / "nowhere")
    q = tmp_path / "q"
    shutil.copytree(tiny_bundle.path, q)
    (q / "m0.pt").unlink()
    with pytest.raises(BundleError, match=r"missing m0\.pt"):
        load_bundle(q)


def test_scorer_is_deterministic_and_consistent(tiny_bundle: Bundle) -> None:
    x, _ = blobs(24, (16, 16), abnormal=0.5, seed=9)
    s1 = PosteriorScorer(tiny_bundle, batch_size=5).score(x)
    s2 = PosteriorScorer(tiny_bundle, batch_size=24).score(x)
    np.testing.assert_allclose(s1.log_posterior, s2.log_posterior, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s1.log_posterior, s1.log_p_normal - s1.log_p_mixture)
    assert ((s1.percentile >= 0) & (s1.percentile <= 100)).all()
    drawn = PosteriorScorer(tiny_bundle, draws=3).score(x)
    again = PosteriorScorer(tiny_bundle, draws=3).score(x)
    np.testing.assert_array_equal(drawn.log_posterior, again.log_posterior)


def test_scorer_refuses_bad_input(tiny_bundle: Bundle) -> None:
    sc = PosteriorScorer(tiny_bundle)
    with pytest.raises(ValueError, match="expects images shaped"):
        sc.score(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="empty"):
        sc.score(np.zeros((0, 1, 16, 16), np.float32))
    bad = np.zeros((2, 1, 16, 16), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sc.score(bad)
    with pytest.raises(ValueError, match="NaN"):
        sc.score_raw(bad[:, 0])


def test_preprocessing_apply() -> None:
    p = Preprocessing(kind="bct", shape=(4, 8, 8), n_bits=7, intensity="window", window=(-14, 114))
    hu = np.full((2, 8, 16, 16), 50.0, np.float32)
    hu[:, 0, 0, 0] = -1000.0  # one voxel of air: a blank volume is refused
    out = p.apply(hu)
    assert out.shape == (2, 1, 4, 8, 8)
    np.testing.assert_allclose(out[:, :, 1:, 1:, 1:], 64 / 128, atol=1e-5)
    with pytest.raises(ValueError, match=r"image 0 has shape \(1, 16, 16\): one slice is not a volume"):
        p.apply(hu[:, :1])
    with pytest.raises(ValueError, match="image 1 is blank"):
        p.apply(np.stack([hu[0], np.full((8, 16, 16), 50.0, np.float32)]))
    with pytest.raises(ValueError, match="shaped"):
        p.apply(np.zeros((8, 16, 16)))
    assert Preprocessing.from_dict(p.to_dict()) == p


def test_percentile_intensity_ignores_a_hot_pixel() -> None:
    rng = np.random.default_rng(0)
    img = rng.uniform(100, 1100, (1, 32, 32)).astype(np.float32)
    hot = img.copy()
    hot[0, 0, 0] = 10_000.0  # a dead detector element, or a burned-in label
    robust = Preprocessing(kind="cxr", shape=(32, 32), intensity="percentile")
    plain = Preprocessing(kind="cxr", shape=(32, 32), intensity="minmax")
    a, b = robust.apply(img)[0, 0], robust.apply(hot)[0, 0]
    assert np.abs(a - b)[1:, 1:].max() < 0.01 and b[0, 0] == 1.0  # clipped, the rest unchanged
    assert plain.apply(hot)[0, 0, 1:, 1:].max() < 0.12  # min-max: the anatomy squeezed into a tenth
    flat = np.zeros((1, 32, 32), np.float32)
    flat[0, 5, 5] = 1.0  # almost all one value: the full range keeps the one pixel
    assert robust.apply(flat)[0, 0, 5, 5] == 1.0
    child = np.zeros((1, 32, 32), np.float32)  # the same anatomy beside much empty background
    child[0, 8:24, 8:24] = img[0, 8:24, 8:24]
    adult = img[:, 8:24, 8:24]
    small = Preprocessing(kind="cxr", shape=(16, 16), intensity="percentile")
    # the anatomy's top is clipped alike however much of the image is empty (2 of 256 pixels)
    assert (robust.apply(child)[0, 0] >= 1).sum() == (small.apply(adult)[0, 0] >= 1).sum() == 2
    with pytest.raises(ValueError, match="unknown intensity mapping 'equalize'"):
        Preprocessing(kind="cxr", shape=(32, 32), intensity="equalize")  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ["independent", "finetune-m1", "finetune-m0", "shared"])
def test_every_strategy_builds_a_loadable_bundle(strategy: str, tmp_path: Path) -> None:
    from flows.build import BuildOptions, build_bundle
    from flows.presets import get_preset

    normal, _ = blobs(32, (16, 16), seed=1)
    mixture, _ = blobs(32, (16, 16), abnormal=0.5, seed=2)
    b = build_bundle(tmp_path / strategy, preset=get_preset("tiny-cxr"), normal=normal,
                     mixture=mixture, name=strategy, log=lambda s: None,
                     options=BuildOptions(strategy=strategy, epochs=1, finetune_epochs=1,  # type: ignore[arg-type]
                                          progress=False))
    assert b.manifest["training"]["strategy"] == strategy
    assert b.calibration.threshold_method == "percentile:90"
    s = PosteriorScorer(b).score(mixture[:4])
    assert np.isfinite(s.log_posterior).all()


def test_preset_step_floors_reach_the_base_and_both_fine_tuned_models(tmp_path: Path) -> None:
    from flows.build import BuildOptions, build_bundle
    from flows.presets import get_preset

    normal, _ = blobs(32, (16, 16), seed=1)
    mixture, _ = blobs(32, (16, 16), abnormal=0.5, seed=2)
    preset = get_preset("tiny-cxr").with_overrides(epochs=1, finetune_epochs=1, min_steps=9,
                                                   finetune_min_steps=6)
    b = build_bundle(tmp_path / "b", preset=preset, normal=normal, mixture=mixture, name="b",
                     log=lambda s: None, options=BuildOptions(strategy="shared", progress=False))
    t = b.manifest["training"]
    # base: 32 + 22 images (10 held out), 49 to train on, batch 16: 4 steps per epoch
    assert t["base"]["steps"] == 12 and t["base"]["epochs_planned"] == 3
    assert t["m0"]["steps"] == t["m1"]["steps"] == 6  # 2 steps per epoch each
    assert t["m0"]["epochs_planned"] == 3 and t["m1"]["epochs_planned"] == 3


def test_conditional_bundle_shares_one_network(tiny_bundle: Bundle) -> None:
    from flows.glow import Conditioned

    assert tiny_bundle.manifest["conditions"] == {"m0.pt": 0, "m1.pt": 1}
    assert isinstance(tiny_bundle.m0, Conditioned) and isinstance(tiny_bundle.m1, Conditioned)
    assert tiny_bundle.m0.condition == 0 and tiny_bundle.m1.condition == 1


def test_a_map_score_needs_a_gain_beyond_the_search(tiny_bundle: Bundle) -> None:
    """Labels unrelated to the images: some of the 18 map scores beat the whole-image posterior
    on these 40 cases by chance, none by more than the search over them allows."""
    from flows.densitymap import choose_score, log_p_maps

    rng = np.random.default_rng(5)
    imgs = rng.random((40, 1, 16, 16)).astype(np.float32)
    labels = rng.permutation(np.r_[np.zeros(20), np.ones(20)])
    b = tiny_bundle
    maps = [log_p_maps(m, imgs, b.preprocessing.n_bits) for m in (b.m0, b.m1)]
    choice, ref = choose_score(maps[0], maps[1], labels, maps[0], maps[1])
    assert choice.map is None and ref is None
    aucs = choice.validation_auroc
    assert len(choice.gain_lower_bound) == len(aucs) - 1 == 18
    assert max(aucs[k] for k in choice.gain_lower_bound) > aucs["whole"]
    assert max(choice.gain_lower_bound.values()) <= 0.0


def test_map_score_bundle_round_trip(tiny_bundle: Bundle, tmp_path: Path) -> None:
    """A bundle calibrated on a map score scores with it, and its reference file is verified."""
    from flows.bundle import Calibration, save_bundle
    from flows.densitymap import choose_score, log_p_maps, map_scores

    rng = np.random.default_rng(3)
    imgs = rng.random((24, 1, 16, 16)).astype(np.float32)
    labels = np.r_[np.zeros(12), np.ones(12)]
    imgs[12:, 0, 4:8, 4:8] = 1.0  # a bright square in the "abnormal" half
    b = tiny_bundle
    maps = [log_p_maps(m, imgs, b.preprocessing.n_bits) for m in (b.m0, b.m1)]
    choice, ref = choose_score(maps[0], maps[1], labels, maps[0], maps[1], min_lower=-1.0)
    assert choice.map is not None and "whole" in choice.validation_auroc
    expected = map_scores(maps[1] - maps[0], choice.map, ref)
    cal = Calibration.from_scores(expected, choice=choice)
    out = save_bundle(tmp_path / "mapb", m0=b.m0, m1=b.m1, preset="tiny-cxr",
                      preprocessing=b.preprocessing, calibration=cal, name="mapb",
                      map_reference=ref if choice.map.standardise else None)
    again = load_bundle(out)
    assert again.calibration.choice.gain_lower_bound == choice.gain_lower_bound != {}
    s = PosteriorScorer(again, batch_size=5).score(imgs)
    assert s.method == choice.name
    np.testing.assert_allclose(s.score, expected, rtol=1e-9)
    np.testing.assert_allclose(s.log_posterior, maps[0].sum((1, 2)) - maps[1].sum((1, 2)), rtol=1e-9)
    assert s.percentile.max() == 100.0
    if choice.map.standardise:
        p = out / "map_reference.npz"
        p.write_bytes(p.read_bytes()[:-10] + b"0123456789")
        with pytest.raises(BundleError, match=r"map_reference\.npz is corrupted"):
            load_bundle(out)


def test_manifest_naming_a_file_outside_the_bundle_is_refused(tiny_bundle: Bundle,
                                                              tmp_path: Path) -> None:
    p = _copy(tiny_bundle, tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    m["files"]["../secret"] = "0" * 64
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(p)


def test_add_extra_records_a_verified_file(tiny_bundle: Bundle, tmp_path: Path) -> None:
    from flows.bundle import add_extra

    p = _copy(tiny_bundle, tmp_path)
    add_extra(p, "notes.json", b'{"a": 1}')
    assert load_bundle(p).extra("notes.json") == b'{"a": 1}'
    (p / "notes.json").write_bytes(b'{"a": 2}')
    with pytest.raises(BundleError, match=r"notes\.json is corrupted"):
        load_bundle(p)
    for bad in ("../x", "m0.pt", "manifest.json", ".hidden"):
        with pytest.raises(BundleError, match="bad extra"):
            add_extra(p, bad, b"")


def test_reference_is_held_out_of_training(tiny_bundle: Bundle) -> None:
    """M1 fits its own training images better than new ones: scores of training images as
    the reference would rank every new case too low. The reference is held-out mixture."""
    from flows.build import split_reference

    x = np.arange(100, dtype=np.float32).reshape(100, 1)
    train, held = split_reference(x, 0.1, 10, seed=0)
    assert held is not None and len(held) == 10 and len(train) == 90
    assert not set(np.asarray(train)[:, 0]) & set(held[:, 0])  # disjoint
    assert np.array_equal(split_reference(x, 0.1, 10, seed=0)[1], held)  # seeded
    assert split_reference(x[:15], 0.1, 10, seed=0)[1] is None  # too small to spare 10
    assert split_reference(x, 0.0, 10, seed=0)[1] is None
    ref = tiny_bundle.manifest["training"]["reference"]
    assert ref["source"] == "held-out mixture" and ref["n"] == len(tiny_bundle.calibration.reference)
    assert tiny_bundle.manifest["training"]["mixture"]["n"] + ref["n"] == 64


@pytest.mark.parametrize("strategy", ["conditional", "shared"])
def test_an_ensemble_bundle_averages_its_members(strategy: str, tmp_path: Path) -> None:
    import torch

    from flows.build import BuildOptions, build_bundle
    from flows.glow import Averaged
    from flows.presets import get_preset
    from flows.quantize import dequantize

    normal, _ = blobs(32, (16, 16), seed=1)
    mixture, _ = blobs(32, (16, 16), abnormal=0.5, seed=2)
    val = blobs(24, (16, 16), abnormal=0.5, seed=3)
    b = build_bundle(tmp_path / "ens", preset=get_preset("tiny-cxr"), normal=normal, mixture=mixture,
                     name="ens", log=lambda s: None, validation=val,
                     options=BuildOptions(strategy=strategy, epochs=1, finetune_epochs=1,  # type: ignore[arg-type]
                                          members=2, progress=False))
    assert b.manifest["members"] == 2 and b.manifest["training"]["members"] == 2
    assert {"m0.pt", "m1.pt", "m0.1.pt", "m1.1.pt"} <= set(b.manifest["files"])
    assert isinstance(b.m0, Averaged) and isinstance(b.m1, Averaged)
    # the members differ (their own seeds) and the bundle's log-density is their mean
    x = dequantize(torch.from_numpy(mixture[:6]), b.preprocessing.n_bits, noise=False)
    with torch.no_grad():
        each = [m(x).log_p for m in b.m0._each()]
        assert not torch.allclose(each[0], each[1])
        assert torch.allclose(b.m0(x).log_p, (each[0] + each[1]) / 2)
        maps = [m.log_p_map(x) for m in b.m1._each()]
        assert torch.allclose(b.m1.log_p_map(x), (maps[0] + maps[1]) / 2)
    s = PosteriorScorer(b).score(mixture[:6])
    assert np.isfinite(s.score).all()
    # every member's weights are verified on load, and each one counts in the fingerprint
    copy = _copy(b, tmp_path)
    _refused_when_corrupted(copy, "m1.1.pt")
    (copy / "m1.1.pt").unlink()
    with pytest.raises(BundleError, match=r"missing m1\.1\.pt"):
        load_bundle(copy)
    manifest = dict(b.manifest, files={**b.manifest["files"], "m0.1.pt": "0" * 64})
    assert Bundle(path=b.path, manifest=manifest, m0=b.m0, m1=b.m1,
                  calibration=b.calibration).fingerprint != b.fingerprint


def test_an_interrupted_build_resumes_from_its_checkpoints(tmp_path: Path) -> None:
    from flows.build import BuildOptions, build_bundle
    from flows.presets import get_preset

    normal, _ = blobs(32, (16, 16), seed=1)
    mixture, _ = blobs(32, (16, 16), abnormal=0.5, seed=2)

    def build(epochs: int, resume: bool) -> tuple[Bundle, list[str]]:
        lines: list[str] = []
        b = build_bundle(tmp_path / "b", preset=get_preset("tiny-cxr"), normal=normal, mixture=mixture,
                         name="b", log=lines.append,
                         options=BuildOptions(strategy="shared", epochs=epochs, finetune_epochs=1,
                                              progress=False, resume=resume))
        return b, [ln.split(":")[0] for ln in lines if "resumed at step" in ln]

    first, _ = build(1, False)
    w0 = (first.path / "m0.pt").read_bytes()
    again, resumed = build(1, True)  # every model complete: nothing is trained again
    assert resumed == ["base", "M0", "M1"]
    assert (again.path / "m0.pt").read_bytes() == w0
    longer, resumed = build(2, True)  # the base trains one more epoch; M0 and M1 start afresh from it
    assert resumed == ["base"]
    assert longer.manifest["training"]["base"]["epochs"] == 2
    assert (longer.path / "m0.pt").read_bytes() != w0
