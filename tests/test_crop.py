"""Foreground crop of whole-image models: field of view and position do not reach the model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flows.bundle import Bundle
from flows.preprocess import CROP_MARGIN, Preprocessing, foreground_box
from triage.analyze import _posterior
from triage.imaging import Series

BCT = Preprocessing(kind="bct", shape=(4, 16, 16), n_bits=7, intensity="window", window=(-14.0, 114.0),
                    crop_above=-300.0)


def _head(shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, float, float],
          seed: int = 0) -> np.ndarray:
    """Air (-1000 HU) with an ellipsoidal 'head' of 30 +- 5 HU."""
    g = np.stack(np.meshgrid(*[np.arange(n) + 0.5 for n in shape], indexing="ij"))
    inside = sum(((g[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1.0
    rng = np.random.default_rng(seed)
    return np.where(inside, 30.0 + rng.normal(0, 5, shape), -1000.0).astype(np.float32)


def test_box_is_the_largest_region_plus_margin_without_thin_attachments() -> None:
    v = _head((20, 60, 60), (10, 30, 24), (6, 20, 12))
    v[10, 50:58, 24] = 100.0  # a one-voxel cable hanging off the head
    v[2:4, 2:5, 50:53] = 40.0  # a separate small object (the holder's foam block)
    box = foreground_box(v, -300.0)
    # the ellipsoid spans 4..16, 10..50, 12..36; the margin adds ceil(5 % of the extent)
    assert box == (slice(3, 17), slice(8, 52), slice(10, 38))
    assert CROP_MARGIN == 0.05


@pytest.mark.parametrize("offset", [0, 3, 7])
def test_box_found_on_a_coarse_sample_never_cuts_the_region(offset: int) -> None:
    img = np.full((700, 1000), -1000.0, np.float32)
    img[101 + offset:603 - offset, 7 * offset:905 + offset] = 30.0  # steps 6 and 8
    exact = foreground_box(img, -300.0, detect_size=10_000)
    fast = foreground_box(img, -300.0)
    for e, f, k in zip(exact, fast, (6, 8), strict=True):
        assert f.start <= e.start and f.stop >= e.stop
        assert e.start - f.start <= k + 1 and f.stop - e.stop <= k + 1


def test_field_of_view_and_position_do_not_change_the_model_input() -> None:
    head = _head((12, 40, 40), (6, 20, 20), (5, 16, 14))
    wide = np.full((16, 80, 70), -1000.0, np.float32)  # a larger field of view, head off centre
    wide[3:15, 30:70, 5:45] = head
    a, b = BCT.apply(np.stack([head]))[0], BCT.apply(np.stack([wide]))[0]
    np.testing.assert_allclose(a, b, atol=1e-6)
    plain = dataclasses.replace(BCT, crop_above=None)
    assert np.abs(plain.apply(head[None]) - plain.apply(wide[None])).max() > 0.1  # without it they differ


def test_blank_image_and_patch_models_are_refused_clearly() -> None:
    air = np.full((1, 8, 32, 32), -1000.0, np.float32)
    with pytest.raises(ValueError, match="the image is blank"):
        BCT.apply(air)
    air[0, 4, 16, 16] = -900.0  # not blank, but no tissue either
    with pytest.raises(ValueError, match="nothing above -300 to crop to"):
        BCT.apply(air)
    with pytest.raises(ValueError, match="crop_above is for whole-image models"):
        Preprocessing(kind="bct", shape=(8, 8, 8), intensity="window", window=(-14.0, 114.0),
                      spacing=4.0, crop_above=-300.0)
    assert Preprocessing.from_dict(BCT.to_dict()) == BCT
    assert Preprocessing.from_dict({**BCT.to_dict(), "crop_above": None}).crop_above is None


def test_node_map_lies_in_the_crop_box(tiny_bundle: Bundle) -> None:
    """The model only saw the box: its map is placed there, the rest of the image is unscored."""
    prep = {**tiny_bundle.manifest["preprocessing"], "crop_above": 0.5}
    b = dataclasses.replace(tiny_bundle, manifest={**tiny_bundle.manifest, "preprocessing": prep})
    img = np.zeros((64, 48), np.float32)
    img[10:42, 20:44] = np.random.default_rng(0).uniform(0.8, 1.0, (32, 24))
    s = Series(array=img, spacing=(0.5, 0.5), modality="DX", series_instance_uid="1.2",
               study_instance_uid="1.3", sop_instance_uids=["1.4"])
    res = _posterior("cxr", b, s, None)
    assert res.map is not None and res.map.shape == img.shape
    box = b.preprocessing.crop_box(img)
    assert box == (slice(8, 44), slice(18, 46))
    inside = np.zeros(img.shape, bool)
    inside[box] = True
    assert np.isfinite(res.map[inside]).all() and np.isnan(res.map[~inside]).all()
