"""Phantom generators: API contract, determinism, labels/masks, confounds, baselines."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from flows.phantoms import (
    CXR_FINDINGS,
    HEADCT_FINDINGS,
    PhantomSet,
    auroc,
    make_cxr,
    make_headct,
    trivial_baselines,
)
from flows.phantoms import anatomy as anatomy_mod

CT_SHAPE = (8, 32, 32)


def _sep(scores: np.ndarray, labels: np.ndarray) -> float:
    auc = roc_auc_score(labels, scores)
    return float(max(auc, 1.0 - auc))


@pytest.fixture(scope="module")
def cxr_mix() -> PhantomSet:
    return make_cxr(120, size=32, abnormal_fraction=0.5, seed=7)


@pytest.fixture(scope="module")
def ct_mix() -> PhantomSet:
    return make_headct(60, shape=CT_SHAPE, abnormal_fraction=0.5, seed=7)


# --------------------------------------------------------------------------- CXR


def test_cxr_contract(cxr_mix: PhantomSet) -> None:
    ps = cxr_mix
    n = len(ps)
    assert ps.images.shape == (n, 1, 32, 32) and ps.images.dtype == np.float32
    assert ps.masks.shape == ps.images.shape and ps.masks.dtype == bool
    assert ps.labels.dtype == np.int64 and set(np.unique(ps.labels)) <= {0, 1}
    assert ps.zero_fraction.dtype == np.float32 and ps.zero_fraction.shape == (n,)
    assert len(ps.findings) == n
    assert np.isfinite(ps.images).all()
    assert ps.images.min() >= 0.0 and ps.images.max() <= 1.0
    assert ps.spacing == pytest.approx((12.5, 12.5))
    np.testing.assert_allclose(ps.zero_fraction, (ps.images == 0).mean(axis=(1, 2, 3)))
    assert ps.meta["kind"] == "cxr"
    assert ps.meta["anatomy"] in ("torchxrayvision lung masks", "procedural")
    assert ps.meta["child"].dtype == bool and ps.meta["child"].shape == (n,)


def test_cxr_labels_findings_masks(cxr_mix: PhantomSet) -> None:
    ps = cxr_mix
    for lab, f, m, img in zip(ps.labels, ps.findings, ps.masks, ps.images, strict=True):
        if lab == 0:
            assert f == "normal" and not m.any()
        else:
            assert f in CXR_FINDINGS and m.any()
            # inside the collimated field and on the body, not on air
            assert (img[m] > 0).all()
            assert float(np.median(img[m])) > 0.1


def test_cxr_fractions_and_even_findings() -> None:
    labels, names, child = anatomy_mod.case_plan(120, 3, 0xC8, 0.5, CXR_FINDINGS, 0.2)
    assert labels.sum() == 60
    counts = Counter(f for f in names if f != "normal")
    assert set(counts) == set(CXR_FINDINGS)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert child[labels == 0].sum() == pytest.approx(12, abs=1)
    assert child[labels == 1].sum() == pytest.approx(12, abs=1)
    normal = make_cxr(5, size=32, seed=1)
    assert (normal.labels == 0).all() and not normal.masks.any()
    assert normal.findings == ["normal"] * 5
    only = make_cxr(8, size=32, abnormal_fraction=1.0, findings=["effusion"], seed=1)
    assert only.findings == ["effusion"] * 8


def test_cxr_determinism_and_chunks() -> None:
    a = make_cxr(10, size=32, abnormal_fraction=0.5, seed=5)
    b = make_cxr(10, size=32, abnormal_fraction=0.5, seed=5)
    np.testing.assert_array_equal(a.images, b.images)
    c = make_cxr(64, size=32, abnormal_fraction=0.5, seed=5)  # crosses a plan block
    np.testing.assert_array_equal(a.images, c.images[:10])
    np.testing.assert_array_equal(a.masks, c.masks[:10])
    np.testing.assert_array_equal(a.labels, c.labels[:10])
    assert a.findings == c.findings[:10]
    d = make_cxr(10, size=32, abnormal_fraction=0.5, seed=6)
    assert not np.array_equal(a.images, d.images)
    e = make_cxr(61, size=32, abnormal_fraction=0.5, seed=5)
    np.testing.assert_array_equal(e.images[60], c.images[60])


def test_cxr_findings_are_denser_than_the_same_patient_normal() -> None:
    normal = make_cxr(8, size=64, child_fraction=0.0, seed=3)
    for f in CXR_FINDINGS:
        ab = make_cxr(8, size=64, abnormal_fraction=1.0, findings=[f], child_fraction=0.0, seed=3)
        diffs = [float((ab.images[i, 0] - normal.images[i, 0])[ab.masks[i, 0]].mean()) for i in range(8)]
        assert np.median(diffs) > 0.02, (f, diffs)
        frac = ab.masks.mean(axis=(1, 2, 3))
        assert frac.max() < 0.25, (f, frac)  # visible, not absurdly huge


def test_cxr_child_confound(cxr_mix: PhantomSet) -> None:
    ps = cxr_mix
    child = ps.meta["child"]
    for cls in (0, 1):
        assert child[ps.labels == cls].any() and (~child[ps.labels == cls]).any()
    zc, za = ps.zero_fraction[child], ps.zero_fraction[~child]
    assert zc.mean() > 0.35 and za.mean() < 0.08
    assert zc.min() > za.max()


def test_cxr_sizes() -> None:
    for size in (16, 128):
        ps = make_cxr(2, size=size, abnormal_fraction=1.0, seed=2)
        assert ps.images.shape == (2, 1, size, size)
        assert ps.masks.any(axis=(1, 2, 3)).all()


# --------------------------------------------------------------------------- head CT


def test_headct_contract(ct_mix: PhantomSet) -> None:
    ps = ct_mix
    n = len(ps)
    assert ps.images.shape == (n, 1, *CT_SHAPE) and ps.images.dtype == np.float32
    assert ps.masks.shape == ps.images.shape and ps.masks.dtype == bool
    assert ps.labels.dtype == np.int64
    assert ps.images.min() >= -1024.0 and ps.images.max() <= 3071.0
    assert ps.images.max() > 500.0  # skull
    np.testing.assert_allclose(ps.zero_fraction, (ps.images <= -1000).mean(axis=(1, 2, 3, 4)))
    assert 0.1 < ps.zero_fraction.mean() < 0.7
    assert ps.spacing == pytest.approx((110.0 / 8, 230.0 / 32, 230.0 / 32))
    assert ps.meta["kind"] == "bct"
    assert ps.meta["anatomy"] in ("nilearn MNI152", "procedural")


def test_headct_labels_and_masks(ct_mix: PhantomSet) -> None:
    ps = ct_mix
    counts = Counter(f for f in ps.findings if f != "normal")
    assert set(counts) <= set(HEADCT_FINDINGS)
    assert ps.labels.sum() == pytest.approx(30, abs=6)
    for lab, f, m, vol in zip(ps.labels, ps.findings, ps.masks, ps.images, strict=True):
        if lab == 0:
            assert f == "normal" and not m.any()
            continue
        assert f in HEADCT_FINDINGS and m.any()
        hu = vol[m]
        # intracranial soft tissue, not air or bone (at 7 mm voxels a subdural next to
        # the skull picks up some bone through partial volume and the kernel blur)
        assert -10.0 < float(np.median(hu)) < 200.0, (f, np.median(hu))
        assert (hu > -200).mean() > 0.97 and (hu < 400).mean() > 0.85


def test_headct_findings_visible_in_window() -> None:
    normal = make_headct(6, shape=(16, 64, 64), seed=4)
    expect = {"haemorrhage": (10.0, None), "subdural": (10.0, None), "infarction": (None, -3.0)}
    for f, (lo, hi) in expect.items():
        ab = make_headct(6, shape=(16, 64, 64), abnormal_fraction=1.0, findings=[f], seed=4)
        for i in range(6):
            m = ab.masks[i, 0]
            win_ab = np.clip(ab.images[i, 0][m] + 14, 0, 127)
            win_no = np.clip(normal.images[i, 0][m] + 14, 0, 127)
            d = float((win_ab - win_no).mean())
            if lo is not None:
                assert d > lo, (f, i, d)
            if hi is not None:
                assert d < hi, (f, i, d)
        vol_ml = ab.masks.sum(axis=(1, 2, 3, 4)) * np.prod(ab.spacing) / 1000.0
        assert (vol_ml > 2).all() and (vol_ml < 250).all(), (f, vol_ml)


def test_headct_determinism_and_chunks() -> None:
    a = make_headct(4, shape=CT_SHAPE, abnormal_fraction=0.5, seed=9)
    b = make_headct(8, shape=CT_SHAPE, abnormal_fraction=0.5, seed=9)
    np.testing.assert_array_equal(a.images, b.images[:4])
    np.testing.assert_array_equal(a.masks, b.masks[:4])
    assert a.findings == b.findings[:4]
    c = make_headct(4, shape=CT_SHAPE, abnormal_fraction=0.5, seed=10)
    assert not np.array_equal(a.images, c.images)


# --------------------------------------------------------------------------- baselines


def test_trivial_baselines_cannot_separate(cxr_mix: PhantomSet, ct_mix: PhantomSet) -> None:
    cxr = make_cxr(240, size=32, abnormal_fraction=0.5, seed=21)
    ct = make_headct(120, shape=CT_SHAPE, abnormal_fraction=0.5, seed=21)
    for ps, kind in ((cxr, "cxr"), (ct, "bct")):
        scores = trivial_baselines(ps.images, kind=kind)
        assert set(scores) == {"mean_intensity", "entropy", "background_fraction"}
        for name, s in scores.items():
            assert s.shape == (len(ps),)
            auc = _sep(s, ps.labels)
            assert auc <= 0.75, (kind, name, auc)
            assert auroc(s, ps.labels) == pytest.approx(auc)


def test_trivial_baselines_values() -> None:
    imgs = np.zeros((2, 1, 4, 4), np.float32)
    imgs[1] = 0.5
    s = trivial_baselines(imgs, kind="cxr")
    np.testing.assert_allclose(s["background_fraction"], [1.0, 0.0])
    np.testing.assert_allclose(s["mean_intensity"], [0.0, 0.5])
    np.testing.assert_allclose(s["entropy"], [0.0, 0.0])
    ct = np.full((1, 1, 2, 2, 2), -1000.0, np.float32)
    ct[0, 0, 0] = 40.0
    s = trivial_baselines(ct, kind="bct")
    np.testing.assert_allclose(s["background_fraction"], [0.5])
    np.testing.assert_allclose(s["mean_intensity"], [27.0])
    np.testing.assert_allclose(s["entropy"], [1.0])
    with pytest.raises(ValueError, match="kind"):
        trivial_baselines(imgs, kind="mri")
    with pytest.raises(ValueError, match="both classes"):
        auroc(np.zeros(3), np.zeros(3))


# --------------------------------------------------------------------------- plumbing


def test_subset_and_npz_roundtrip(tmp_path, cxr_mix: PhantomSet) -> None:
    sub = cxr_mix.subset(np.arange(5, 15))
    assert len(sub) == 10 and sub.meta["child"].shape == (10,)
    np.testing.assert_array_equal(sub.meta["index"], np.arange(5, 15))
    assert sub.findings == cxr_mix.findings[5:15]
    path = tmp_path / "set.npz"
    sub.save_npz(path)
    back = PhantomSet.load_npz(path)
    np.testing.assert_array_equal(back.images, sub.images)
    np.testing.assert_array_equal(back.masks, sub.masks)
    np.testing.assert_array_equal(back.labels, sub.labels)
    np.testing.assert_array_equal(back.meta["child"], sub.meta["child"])
    assert back.findings == sub.findings and back.spacing == sub.spacing
    assert back.meta["kind"] == "cxr" and back.images.dtype == np.float32
    boolsel = cxr_mix.subset(cxr_mix.labels == 1)
    assert (boolsel.labels == 1).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "positive integer"),
        ({"n": -3}, "positive integer"),
        ({"n": 2.5}, "positive integer"),
        ({"n": 2, "size": 8}, "size"),
        ({"n": 2, "size": 64.0}, "size"),
        ({"n": 2, "abnormal_fraction": 1.5}, "abnormal_fraction"),
        ({"n": 2, "child_fraction": -0.1}, "child_fraction"),
        ({"n": 2, "abnormal_fraction": 0.5, "findings": ["pneumothorax"]}, "unknown finding"),
        ({"n": 2, "abnormal_fraction": 0.5, "findings": "opacity"}, "sequence"),
        ({"n": 2, "abnormal_fraction": 0.5, "findings": []}, "empty"),
        ({"n": 2, "seed": "7"}, "seed"),
    ],
)
def test_cxr_bad_arguments(kwargs: dict, match: str) -> None:
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=match):
        make_cxr(n, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "positive integer"),
        ({"n": 2, "shape": (2, 64, 64)}, "out of range"),
        ({"n": 2, "shape": (16, 64)}, "three integers"),
        ({"n": 2, "shape": (16, 64.5, 64)}, "three integers"),
        ({"n": 2, "abnormal_fraction": -0.5}, "abnormal_fraction"),
        ({"n": 2, "abnormal_fraction": 0.5, "findings": ["nodule"]}, "unknown finding"),
        ({"n": 2, "seed": 1.5}, "seed"),
    ],
)
def test_headct_bad_arguments(kwargs: dict, match: str) -> None:
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=match):
        make_headct(n, **kwargs)


def test_procedural_fallbacks_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anatomy_mod, "_lung_zip_names", lambda: None)
    with pytest.warns(UserWarning, match="pip install --no-deps torchxrayvision"):
        ps = make_cxr(4, size=32, abnormal_fraction=0.5, seed=1)
    assert ps.meta["anatomy"] == "procedural"
    assert ps.masks[ps.labels == 1].any(axis=(1, 2, 3)).all()

    monkeypatch.setattr(anatomy_mod, "_real_head", lambda res: None)
    anatomy_mod.head_templates.cache_clear()
    try:
        with pytest.warns(UserWarning, match="nilearn"):
            ct = make_headct(3, shape=CT_SHAPE, abnormal_fraction=1.0, seed=1)
        assert ct.meta["anatomy"] == "procedural"
        assert ct.masks.any(axis=(1, 2, 3, 4)).all()
    finally:
        anatomy_mod.head_templates.cache_clear()
