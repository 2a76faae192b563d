"""Patch-map bundles: build, calibrate on validation, score a CT on its own grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from flows.build import BuildOptions
from flows.bundle import Bundle, BundleError
from flows.patchbundle import PatchMapScorer, build_patch_bundle, choose_noise_floor, map_calibration
from flows.phantoms import PhantomSet
from flows.phantoms.chestct import make_chestct
from flows.presets import get_preset


@pytest.fixture(scope="module")
def patch_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    shape = (16, 24, 32)
    nor = make_chestct(6, shape=shape, spacing_mm=8.0, seed=1)
    mix = make_chestct(6, shape=shape, spacing_mm=8.0, abnormal_fraction=0.5, seed=2)
    val = make_chestct(8, shape=shape, spacing_mm=8.0, abnormal_fraction=0.5, seed=3)
    out = tmp_path_factory.mktemp("pb") / "bundle"
    # the noise floor is set from the training volumes (flows.patchbundle.choose_noise_floor)
    preset = replace(get_preset("tiny-chestct"), noise_floor_percentile=95.0)
    return build_patch_bundle(out, preset=preset, normal=nor.volumes(), mixture=mix.volumes(),
                              validation=(val.volumes(), val.labels), name="pb",
                              options=BuildOptions(progress=False), patches_per_volume=16,
                              overlap=4, log=lambda s: None)


def test_patch_bundle_records_its_map_calibration(patch_bundle: Bundle) -> None:
    cal = map_calibration(patch_bundle)
    assert cal.source in ("likelihood", "posterior") and cal.mask == "lung"
    assert cal.patch == 8 and cal.overlap == 4
    assert 0.5 <= cal.size_threshold_cm3 <= 20.0
    assert set(cal.validation) == {"likelihood", "posterior", "likelihood:voxel", "posterior:voxel"}
    assert "patchmap.json" in patch_bundle.manifest["files"]
    # the reference for percentiles: one abnormal volume per validation normal
    n_normal = int((make_chestct(8, shape=(16, 24, 32), spacing_mm=8.0, abnormal_fraction=0.5,
                                 seed=3).labels == 0).sum())
    assert len(cal.reference_cm3) == n_normal and cal.reference_cm3 == sorted(cal.reference_cm3)
    assert all(len(v["reference_cm3"]) == n_normal for v in cal.validation.values())


def test_noise_floor_is_chosen_on_the_training_volumes_and_recorded(patch_bundle: Bundle) -> None:
    shape = (16, 24, 32)
    train = [v for seed, af in ((1, 0.0), (2, 0.5))
             for v in make_chestct(6, shape=shape, spacing_mm=8.0, abnormal_fraction=af, seed=seed).volumes()]
    prep = replace(patch_bundle.preprocessing, noise_floor=None)
    floor = choose_noise_floor(train, prep, "lung")
    assert floor > 0 and patch_bundle.preprocessing.noise_floor == floor
    # a volume is harmonised the same way every time it is scored
    vol = train[0][0]
    a = PatchMapScorer(patch_bundle).score(vol, (8.0,) * 3).values
    b = PatchMapScorer(patch_bundle).score(vol, (8.0,) * 3).values
    np.testing.assert_array_equal(a, b)


def test_map_percentile_reads_the_abnormal_volume_against_validation_normals(patch_bundle: Bundle) -> None:
    cal = replace(map_calibration(patch_bundle), reference_cm3=[0.0, 0.0, 1.0, 3.0])
    assert cal.percentile(0.0) == 25.0  # the mid-rank of the two normals at 0 cm³
    assert cal.percentile(2.0) == 75.0
    assert cal.percentile(3.5) == 100.0
    assert replace(cal, reference_cm3=[]).percentile(5.0) is None  # bundles from before the reference


def test_calibration_from_a_newer_version_loads_and_a_rewrite_does_not_reach_a_loaded_bundle(
        patch_bundle: Bundle, tmp_path: Path) -> None:
    import json
    import shutil

    from flows.bundle import add_extra, load_bundle

    copy = tmp_path / "b"
    shutil.copytree(patch_bundle.path, copy)
    cal = json.loads((copy / "patchmap.json").read_text())
    add_extra(copy, "patchmap.json", json.dumps({**cal, "added_later": [1, 2]}).encode())
    loaded = load_bundle(copy)
    assert map_calibration(loaded).voxel_threshold == cal["voxel_threshold"]
    # rewritten on disk after loading (as `triage calibrate` does): the loaded bundle keeps
    # the calibration it verified
    add_extra(copy, "patchmap.json", json.dumps({**cal, "voxel_threshold": 123.0}).encode())
    assert map_calibration(loaded).voxel_threshold == cal["voxel_threshold"]
    assert map_calibration(load_bundle(copy)).voxel_threshold == 123.0


def test_scorer_maps_a_volume_on_its_own_finer_grid(patch_bundle: Bundle) -> None:
    s = make_chestct(1, shape=(32, 48, 64), spacing_mm=4.0, abnormal_fraction=1.0,
                     findings=["consolidation"], seed=7)
    r = PatchMapScorer(patch_bundle).score(s.images[0, 0], s.spacing)
    assert r.values.shape == (32, 48, 64)
    assert np.isfinite(r.values).any()
    assert r.abnormal == (r.abnormal_cm3 > map_calibration(patch_bundle).size_threshold_cm3)
    assert r.percentile == map_calibration(patch_bundle).percentile(r.abnormal_cm3)
    assert r.percentile is not None and 0.0 <= r.percentile <= 100.0
    for le in r.lesions:
        assert all(0 <= c < n for c, n in zip(le.centroid_index, r.values.shape, strict=True))
        assert le.size > 0


def test_a_volume_unlike_the_validation_volumes_is_flagged(patch_bundle: Bundle) -> None:
    """The scan's noise and the mask's volume, against the validation volumes' range."""
    cal = map_calibration(patch_bundle)
    maps = {"likelihood", "posterior", "likelihood:voxel", "posterior:voxel"}
    assert set(cal.domain) == {"noise_hu", "mask_cm3", *(f"above:{m}" for m in maps)}
    assert len(cal.domain["noise_hu"]) == 8
    assert cal.noise_floor  # this bundle tops noise up: a quiet scan is in its domain
    sc = PatchMapScorer(patch_bundle)
    ps = make_chestct(2, shape=(16, 24, 32), spacing_mm=8.0, seed=11)
    (v, sp), _ = ps.volumes()
    r = sc.score(v, sp)
    assert r.domain["outside"] == [] and r.domain["noise_hu"] > 0
    # a header that says 2 mm where the voxels are 4 mm: lungs too small to be found
    at4mm = make_chestct(1, shape=(32, 48, 64), spacing_mm=4.0, seed=12).images[0, 0]
    small = sc.score(at4mm, (2.0, 2.0, 2.0))
    assert small.domain["mask_cm3"] == 0.0
    assert small.domain["outside"] == [f"mask_cm3 0 outside the validation volumes' "
                                       f"{cal.domain['mask_cm3'][0]:.3g}-{cal.domain['mask_cm3'][-1]:.3g}"]
    # a noisy scan (at this toy grid's 8 mm the lungs' texture reads as ~200 HU of noise; at
    # 2-4 mm a scan's noise is 10-30 HU): above the range; below it only without a noise floor
    hi = cal.domain["noise_hu"][-1]
    assert cal.outside_domain({"noise_hu": hi * 1.3})[0].startswith("noise_hu")
    assert cal.outside_domain({"noise_hu": hi * 1.2}) == []
    assert replace(cal, noise_floor=False).outside_domain({"noise_hu": cal.domain["noise_hu"][0] / 2})
    # a map lifted as a whole (a scan unlike the validation ones) is flagged; a clean one is not
    key = f"above:{cal.name}"
    assert cal.outside_domain({key: 0.5})[0].startswith(key)
    assert cal.outside_domain({key: 0.0}) == [] and key in r.domain
    assert cal.outside_domain({"noise_hu": cal.domain["noise_hu"][0] / 2, "mask_cm3": float("nan")}) == []


def test_scorer_refuses_bad_volumes_and_whole_image_bundles(patch_bundle: Bundle,
                                                            tiny_bundle: Bundle) -> None:
    sc = PatchMapScorer(patch_bundle)
    with pytest.raises(ValueError, match="NaN"):
        sc.score(np.full((16, 16, 16), np.nan), (4.0, 4.0, 4.0))
    with pytest.raises(ValueError, match="spacing"):
        sc.score(np.zeros((16, 16, 16)), (0.0, 4.0, 4.0))
    with pytest.raises(ValueError, match="3D"):
        sc.score(np.zeros((16, 16)), (4.0, 4.0, 4.0))
    # smaller than one patch after resampling: padded, not refused
    r = sc.score(np.full((4, 5, 6), -800.0), (8.0, 8.0, 8.0))
    assert r.values.shape == (4, 5, 6)
    # less than half a patch (32 mm) along an axis: a slab, not a study
    with pytest.raises(ValueError, match=r"covers 8 x 40 x 48 mm; .* at least half a patch \(32 mm\)"):
        sc.score(np.full((1, 5, 6), -800.0), (8.0, 8.0, 8.0))
    with pytest.raises(BundleError, match="no patch models"):
        PatchMapScorer(tiny_bundle)


def test_patch_bundle_needs_a_labelled_validation_set(tmp_path: Path) -> None:
    s = make_chestct(2, shape=(16, 24, 32), spacing_mm=8.0, seed=1)
    v = s.volumes()
    with pytest.raises(ValueError, match="normal and abnormal"):
        build_patch_bundle(tmp_path / "b", preset=get_preset("tiny-chestct"), normal=v, mixture=v,
                           validation=(v, np.zeros(2)), name="b",
                           options=BuildOptions(progress=False), patches_per_volume=4,
                           log=lambda m: None)


def test_general_domain_reference_is_trained_on_body_patches_and_recorded(tmp_path: Path) -> None:
    """``reference="body"``: M1 learns patches from anywhere in the body, and the bundle says so
    (a recalibration keeps it)."""
    from flows.patchbundle import calibrate_patch_bundle

    shape = (16, 24, 32)
    nor = make_chestct(2, shape=shape, spacing_mm=8.0, seed=1)
    val = make_chestct(4, shape=shape, spacing_mm=8.0, abnormal_fraction=0.5, seed=3)
    v = nor.volumes()
    vv = (val.volumes(), val.labels)
    kw = dict(preset=get_preset("tiny-chestct"), normal=v, mixture=v,
              validation=vv, options=BuildOptions(progress=False),
              patches_per_volume=4, overlap=4)
    with pytest.raises(ValueError, match="unknown reference"):
        build_patch_bundle(tmp_path / "x", name="x", reference="elsewhere", log=lambda m: None, **kw)
    said: list[str] = []
    b = build_patch_bundle(tmp_path / "b", name="b", reference="body", log=said.append, **kw)
    assert any("mixture patches (body)" in m for m in said)
    assert map_calibration(b).reference == "body"
    # four validation volumes cannot show another map beating the posterior ratio per patch
    cal = map_calibration(b)
    assert cal.name == "posterior" and set(cal.validation) == {"posterior", "likelihood",
                                                                 "posterior:voxel", "likelihood:voxel"}
    assert all(cal.validation[k]["gain_lower_bound"] <= 0 for k in cal.validation if k != "posterior")
    again = calibrate_patch_bundle(b, vv, log=lambda m: None)
    assert map_calibration(again).reference == "body"


def test_patch_batches_go_to_the_models_device(patch_bundle: Bundle) -> None:
    """A GPU worker loads its bundles on the GPU, so the patch batches must follow the models.
    CI has no GPU: the model sits on torch's 'meta' device, where a batch left on the CPU
    shows."""
    import copy

    import torch

    from flows.patchbundle import _maps, _prepared

    b = copy.copy(patch_bundle)
    b.m0 = copy.deepcopy(patch_bundle.m0).to("meta")
    seen: list[str] = []

    def scorer(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.device.type)
        return torch.zeros(len(x))

    s = make_chestct(1, shape=(16, 24, 32), spacing_mm=8.0, seed=5)
    prepared = [_prepared(b, s.images[0, 0], s.spacing, "lung")[:2]]
    _maps(b, prepared, "likelihood", 8, 4, scorer=scorer)
    assert seen and set(seen) == {"meta"}


def test_an_evaluated_case_keeps_its_measures_and_two_slices_not_the_volume() -> None:
    """flows.mapeval.case_from_result: hit and Dice from the full volumes, then only the
    overlay's axial and coronal slices (copies) are kept."""
    from flows.mapeval import case_from_result, summarise
    from flows.patchbundle import MapResult

    vol = np.arange(6 * 8 * 10, dtype=np.float32).reshape(6, 8, 10)
    values = np.zeros_like(vol)
    values[4, 2:4, 5:7] = 5.0  # detected: 4 voxels
    truth = np.zeros(vol.shape, dtype=bool)
    truth[4, 3:5, 5:7] = True  # 4 voxels, 2 shared
    r = MapResult(values=values, lesions=[], abnormal_cm3=0.004, abnormal=True, peak=5.0, source="x")
    c = case_from_result(vol, r, 1.0, label=1, finding="nodule", truth=truth, spacing=(1.0, 1.0, 1.0))
    assert c.hit is True and c.dice == pytest.approx(0.5) and c.truth_cm3 == pytest.approx(0.004)
    axial, coronal = c.views
    assert axial.name == "axial 4" and np.array_equal(axial.image, vol[4]) and axial.image.base is None
    assert coronal.name == "coronal 3" and np.array_equal(coronal.image, vol[::-1, 3])  # head up
    assert coronal.truth is not None and coronal.truth[1].any()  # slice 4 of 6, flipped: row 1
    normal = case_from_result(vol, r, 1.0, label=0, finding="normal", truth=np.zeros_like(truth),
                              spacing=(1.0, 1.0, 1.0))
    assert normal.hit is None and normal.dice is None and normal.views[0].name == "axial 4"
    s = summarise([c, normal], n_boot=10)
    assert s["hit_rate_ge_1cm3"] is None and s["dice_abnormal_mean"] == pytest.approx(0.5)
    assert s["lesion_hit_rate"] == {"0-1 cm3": {"n": 1, "hit_rate": 1.0}}


def test_training_and_calibration_hold_one_full_size_volume_at_a_time(tmp_path: Path) -> None:
    """A VolumeSet may read each CT when it is indexed (triage.labelled.Volumes does): the build
    keeps only patches and model-grid copies, so at most the volume being read and the one
    before it are alive, whatever the set's size."""
    import gc
    import weakref

    live: list[weakref.ref[np.ndarray]] = []
    most, reads = [0], [0]

    class Counted(Sequence[tuple[np.ndarray, tuple[float, float, float]]]):
        def __init__(self, ps: PhantomSet) -> None:
            self.ps = ps

        def __len__(self) -> int:
            return len(self.ps)

        def __getitem__(self, i):  # type: ignore[no-untyped-def]
            if isinstance(i, slice):
                raise TypeError("not needed")
            gc.collect()
            live[:] = [r for r in live if r() is not None]
            v = self.ps.images[i, 0].copy()  # a fresh array, as a file read gives
            live.append(weakref.ref(v))
            most[0], reads[0] = max(most[0], len(live)), reads[0] + 1
            return v, tuple(float(x) for x in self.ps.spacing)

    shape = (16, 24, 32)
    nor = make_chestct(6, shape=shape, spacing_mm=8.0, seed=1)
    mix = make_chestct(6, shape=shape, spacing_mm=8.0, abnormal_fraction=0.5, seed=2)
    val = make_chestct(6, shape=shape, spacing_mm=8.0, abnormal_fraction=0.5, seed=3)
    preset = replace(get_preset("tiny-chestct"), noise_floor_percentile=95.0)
    build_patch_bundle(tmp_path / "b", preset=preset, normal=Counted(nor), mixture=Counted(mix),
                       validation=(Counted(val), val.labels), name="b",
                       options=BuildOptions(progress=False, epochs=1, finetune_epochs=1),
                       patches_per_volume=4, overlap=4, log=lambda m: None)
    # training volumes twice (noise floor, patches), validation volumes once
    assert reads[0] == 2 * 12 + 6
    assert most[0] <= 2
    with pytest.raises(ValueError, match="6 volumes and 5 labels"):
        build_patch_bundle(tmp_path / "c", preset=preset, normal=nor.volumes(), mixture=mix.volumes(),
                           validation=(val.volumes(), val.labels[:5]), name="c", log=lambda m: None)


def test_score_all_gives_the_bundle_result_and_every_map_side_by_side(patch_bundle: Bundle) -> None:
    vol, sp = make_chestct(1, shape=(16, 24, 32), spacing_mm=8.0, abnormal_fraction=1.0,
                           seed=11).volumes()[0]
    scorer = PatchMapScorer(patch_bundle)
    one = scorer.score(vol, sp)
    both, sizes = scorer.score_all(vol, sp)
    np.testing.assert_allclose(both.values, one.values, rtol=1e-5, atol=1e-6)
    assert both.abnormal_cm3 == pytest.approx(one.abnormal_cm3) and both.abnormal == one.abnormal
    cal = map_calibration(patch_bundle)
    assert set(sizes) == set(cal.validation) and sizes[cal.name] == pytest.approx(one.abnormal_cm3)
    assert any(v > 0 for v in sizes.values()), sizes  # something to compare
    for name in cal.validation:  # each map's own calibration, as a scorer for that map gives it
        assert sizes[name] == pytest.approx(PatchMapScorer(patch_bundle, source=name).score(vol, sp)
                                            .abnormal_cm3), name
