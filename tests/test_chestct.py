"""Chest-CT phantoms, CT masks and patch sampling."""

from __future__ import annotations

import numpy as np
import pytest

from flows.masks import _ball, ball_closing, body_mask, intracranial_mask, lung_mask
from flows.patchmap import PatchMapError, sample_patches
from flows.phantoms import make_headct
from flows.phantoms.chestct import CHESTCT_FINDINGS, make_chestct
from flows.presets import get_preset


@pytest.fixture(scope="module")
def ct() -> object:
    return make_chestct(6, shape=(32, 40, 48), spacing_mm=6.0, abnormal_fraction=0.5, seed=5)


def test_chestct_phantom_is_deterministic_and_labelled(ct) -> None:  # type: ignore[no-untyped-def]
    again = make_chestct(6, shape=(32, 40, 48), spacing_mm=6.0, abnormal_fraction=0.5, seed=5)
    np.testing.assert_array_equal(ct.images, again.images)
    assert ct.images.shape == (6, 1, 32, 40, 48) and ct.spacing == (6.0, 6.0, 6.0)
    assert 2 <= int(ct.labels.sum()) <= 4
    assert set(ct.findings) <= {"normal", *CHESTCT_FINDINGS}
    for i in range(6):
        m = ct.masks[i, 0]
        lungs = ct.meta["lungs"][i]
        if ct.labels[i]:
            assert m.any() and not (m & ~lungs).any()  # lesions lie in the lung
            assert ct.meta["lesion_cm3"][i] == pytest.approx(m.sum() * 0.216)
        else:
            assert not m.any()
        # air outside the body, lungs far below soft tissue, bone present
        v = ct.images[i, 0]
        assert v[0, 0, 0] == -1000.0
        assert np.median(v[lungs & ~m]) < -700 and v.max() > 300


def test_chestct_lesion_volumes_span_the_papers_range() -> None:
    s = make_chestct(24, abnormal_fraction=1.0, seed=9)
    cm3 = s.meta["lesion_cm3"]
    assert cm3.min() >= 0.3 and cm3.max() <= 21.0
    assert cm3.max() > 4 * cm3.min()


def test_chestct_bad_arguments() -> None:
    with pytest.raises(ValueError, match="spacing_mm"):
        make_chestct(1, spacing_mm=0.0)
    with pytest.raises(ValueError, match="shape"):
        make_chestct(1, shape=(8, 8, 8))
    with pytest.raises(ValueError, match="field of view"):
        make_chestct(1, shape=(16, 24, 32), spacing_mm=4.0)
    with pytest.raises(ValueError, match="unknown finding"):
        make_chestct(1, abnormal_fraction=1.0, findings=["pneumothorax"])


def test_lung_mask_matches_the_phantom_lungs(ct) -> None:  # type: ignore[no-untyped-def]
    for i in range(len(ct)):
        m = lung_mask(ct.images[i, 0], ct.spacing)
        gt = ct.meta["lungs"][i]
        dice = 2 * (m & gt).sum() / (m.sum() + gt.sum())
        assert dice > 0.9
        if ct.labels[i]:  # lesions touching the parenchyma are brought back into the mask
            les = ct.masks[i, 0]
            assert (m & les).sum() / les.sum() > 0.5


def _simple_chest(shape: tuple[int, int, int] = (40, 64, 80)) -> tuple[np.ndarray, np.ndarray]:
    """A tissue cylinder (40 HU) holding two ellipsoid lungs (-850 HU) at 4 mm; (volume, lungs)."""
    zz, yy, xx = np.indices(shape).astype(float)
    d, h, w = shape
    vol = np.full(shape, -1000.0)
    vol[((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.46 * w)) ** 2 < 1] = 40.0
    lungs = np.zeros(shape, bool)
    for side in (-1, 1):
        lungs |= (((yy - h / 2) / (0.3 * h)) ** 2 + ((xx - w / 2 - side * 0.22 * w) / (0.14 * w)) ** 2
                  + ((zz - d / 2) / (0.4 * d)) ** 2) < 1
    vol[lungs] = -850.0
    return vol, lungs


def test_lung_mask_survives_a_chest_wall_thinned_to_nothing() -> None:
    vol, lungs = _simple_chest()
    right = np.argwhere(lungs[20, 32])[:, 0].max()  # the right lung's lateral edge in slice 20
    vol[18:23, 31:34, right:] = -1000.0  # a 3-voxel channel from that lung to the air outside
    m = lung_mask(vol, (4.0, 4.0, 4.0))
    assert (m & lungs).sum() / lungs.sum() > 0.98  # both lungs kept, not discarded as "outside"
    assert not m[20, 32, -3:].any()  # and the outside air stays outside


def test_lung_mask_keeps_a_large_consolidation_against_the_chest_wall() -> None:
    vol, lungs = _simple_chest()
    zz, yy, xx = np.indices(vol.shape)
    edge = np.argwhere(lungs[20, 32])[:, 0].max()
    # a 17.6 cm³ consolidation reaching the pleura: the 15 mm closing kept 13 % of it, 25 mm 80 %
    # (closing restores concavities, not the convex lung surface the lesion replaced)
    lesion = lungs & ((zz - 20) ** 2 + (yy - 32) ** 2 + (xx - edge + 2) ** 2 <= 4.2**2)
    vol[lesion] = 30.0
    assert lesion.sum() * 0.064 > 15  # cm³
    m = lung_mask(vol, (4.0, 4.0, 4.0))
    assert (m & lesion).sum() / lesion.sum() > 0.75
    assert (lung_mask(vol, (4.0, 4.0, 4.0), closing_mm=15.0) & lesion).sum() / lesion.sum() < 0.3


@pytest.mark.parametrize(("spacing", "radius"), [
    ((2.0, 2.0, 2.0), 15.0), ((2.8, 2.1, 2.1), 15.0), ((4.0, 4.0, 4.0), 15.0), ((2.0, 2.0, 2.0), 6.0),
    ((1.25, 0.7, 0.7), 6.0),  # (15 mm at 0.7 mm is a 43x43x25 ball: scipy's closing takes a minute)
    ((3.0, 1.4, 1.4), 6.0)])
def test_ball_closing_equals_morphological_closing(spacing: tuple[float, float, float],
                                                   radius: float) -> None:
    from scipy import ndimage

    ball = _ball(radius, spacing)
    pad = [(int(p), int(p)) for p in np.array(ball.shape) // 2 + 1]
    rng = np.random.default_rng(int(radius))
    blob = np.pad(ndimage.gaussian_filter(rng.random((20, 28, 28)), 2) > 0.52, pad)
    expected = ndimage.binary_closing(blob, structure=ball)
    got = ball_closing(blob, radius, spacing)
    assert got.dtype == bool and np.array_equal(got, expected)
    assert not ball_closing(np.zeros_like(blob), radius, spacing).any()


def test_intracranial_mask_holds_the_head_ct_lesions() -> None:
    h = make_headct(2, abnormal_fraction=1.0, seed=1)
    for i in range(2):
        m = intracranial_mask(h.images[i, 0], h.spacing)
        assert 0.1 < m.mean() < 0.6
        les = h.masks[i, 0]
        assert (m & les).sum() / les.sum() > 0.8


def test_body_mask_holds_the_lungs_and_leaves_out_the_air_and_the_table() -> None:
    vol, lungs = _simple_chest()
    vol = np.pad(vol, ((0, 0), (0, 10), (0, 0)), constant_values=-1000.0)
    lungs = np.pad(lungs, ((0, 0), (0, 10), (0, 0)))
    vol[:, -3:, :] = 200.0  # a table below the patient, 28 mm of air between
    body = body_mask(vol, (4.0, 4.0, 4.0))
    assert body[lungs].all()  # lungs and everything else inside the body wall
    assert not body[:, -3:, :].any() and not body[:, 0, :].any()
    assert body[:, 32, 40].all() and body.mean() < 0.7


def test_masks_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="spacing"):
        lung_mask(np.zeros((8, 8, 8)), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="NaN"):
        lung_mask(np.full((8, 8, 8), np.nan), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="3D"):
        intracranial_mask(np.zeros((8, 8)), (1.0, 1.0, 1.0))
    assert not lung_mask(np.full((8, 8, 8), 40.0), (1.0, 1.0, 1.0)).any()  # no lungs: empty


def test_patches_are_sampled_inside_the_mask(ct) -> None:  # type: ignore[no-untyped-def]
    prep = get_preset("cpu-chestct").preprocessing
    vols = prep.intensities(ct.images[:, 0])
    assert vols.shape == ct.images[:, 0].shape and vols.min() >= 0.0 and vols.max() <= 1.0
    masks = ct.meta["lungs"]
    p = sample_patches(vols, masks, 16, 10, np.random.default_rng(0), min_mask_fraction=0.3)
    assert p.shape[1:] == (1, 16, 16, 16) and 30 <= len(p) <= 60
    # guided patches hold far more lung (dark, but not air) than patches drawn anywhere
    anywhere = sample_patches(vols, None, 16, 10, np.random.default_rng(0))

    def lung_share(a: np.ndarray) -> float:
        return float(((a > 0.02) & (a < 0.35)).mean())

    assert lung_share(p) > 1.5 * lung_share(anywhere)
    with pytest.raises(PatchMapError, match="no patch"):
        sample_patches(vols, np.zeros_like(masks), 16, 10, np.random.default_rng(0))
