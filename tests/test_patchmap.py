"""The patch-aggregated map: tiling, aggregation weights, resampling, lesions, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from flows.errors import ScoringError
from flows.glow import Glow, GlowConfig
from flows.lesions import choose_size_threshold, find_lesions, unit_size, voxel_threshold
from flows.patchmap import (
    PatchGrid,
    PatchMapError,
    aggregate,
    axis_starts,
    glow_patch_scorer,
    patch_map,
    to_source_grid,
)
from flows.trace import ShapeTraced


@pytest.mark.parametrize("length,patch,overlap", [(48, 48, 10), (100, 48, 10), (97, 16, 4),
                                                  (17, 16, 15), (200, 48, 0)])
def test_axis_starts_cover_every_voxel(length: int, patch: int, overlap: int) -> None:
    starts = axis_starts(length, patch, overlap)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + patch] = True
    assert covered.all()
    assert starts[0] == 0 and starts[-1] == length - patch
    assert len(set(starts)) == len(starts)  # no patch evaluated twice
    assert all(b - a <= patch - overlap for a, b in itertools.pairwise(starts))


def test_grid_covers_3d_volume_and_pads_small_axes() -> None:
    grid = PatchGrid.plan((20, 70, 61), 32, 8)
    assert grid.shape == (32, 70, 61)
    cov = np.zeros(grid.shape, bool)
    for s in grid.starts():
        cov[grid.slices(s)] = True
    assert cov.all()
    vol = np.random.default_rng(0).random((20, 70, 61))
    assert np.array_equal(grid.crop(grid.pad(vol, 0.0)), vol)


@pytest.mark.parametrize("shape,patch,overlap", [((64, 64), 16, 6), ((30, 50, 41), 16, 5),
                                                 ((10, 12), 16, 4)])
def test_constant_patch_score_gives_constant_map(shape: tuple[int, ...], patch: int,
                                                 overlap: int) -> None:
    grid = PatchGrid.plan(shape, patch, overlap)
    starts = grid.starts()
    m = aggregate(grid, starts, np.full(len(starts), 3.25))
    assert m.shape == shape
    np.testing.assert_allclose(m, 3.25, rtol=1e-12)


def test_aggregation_is_a_weighted_average_of_overlapping_patches() -> None:
    grid = PatchGrid.plan((40,), 16, 8)
    starts = grid.starts()
    scores = np.arange(len(starts), dtype=float)
    m = aggregate(grid, starts, scores)
    # every voxel lies between the smallest and largest score of the patches covering it
    for i in range(40):
        cover = [v for s, v in zip(starts, scores, strict=True) if s[0] <= i < s[0] + 16]
        assert min(cover) - 1e-9 <= m[i] <= max(cover) + 1e-9
    assert np.all(np.diff(m) >= -1e-9)  # increasing scores give a monotone map


def test_mask_guided_selection_and_uncovered_voxels() -> None:
    vol = np.zeros((32, 32, 32), np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[2:10, 2:10, 2:10] = True
    pm = patch_map(vol, lambda x: x.flatten(1).mean(1), patch=16, overlap=4, mask=mask)
    assert len(pm.starts) < len(pm.grid.starts())
    assert pm.covered[5, 5, 5] and not pm.covered[31, 31, 31]
    with pytest.raises(PatchMapError, match="mask is empty"):
        patch_map(vol, lambda x: x.flatten(1).mean(1), patch=16, overlap=4,
                  mask=np.zeros(vol.shape, bool))


def test_map_localises_a_bright_blob_and_lines_up_on_the_source_grid() -> None:
    vol = np.zeros((40, 40, 40), np.float32)
    vol[24:30, 8:14, 16:22] = 1.0  # centre (26.5, 10.5, 18.5)
    pm = patch_map(vol, lambda x: x.flatten(1).mean(1), patch=12, overlap=8)
    peak = np.unravel_index(np.nanargmax(pm.values), pm.values.shape)
    assert np.abs(np.array(peak) - [26.5, 10.5, 18.5]).max() <= 2.0
    # back onto a source grid with twice the resolution along the last two axes
    src = to_source_grid(pm.values, (40, 80, 80))
    speak = np.unravel_index(np.nanargmax(src), src.shape)
    # model voxel i spans source voxels 2i, 2i+1: centre 2i + 0.5
    assert np.abs(np.array(speak) - [peak[0], 2 * peak[1] + 0.5, 2 * peak[2] + 0.5]).max() <= 1.0


def test_known_lesion_position_survives_resampling() -> None:
    src_shape = (30, 90, 90)
    model = np.zeros((30, 45, 45))
    model[10, 20, 30] = 5.0
    src = to_source_grid(model, src_shape)
    idx = np.argwhere(src == src.max())
    centre = idx.mean(axis=0)
    assert np.abs(centre - [10, 20 * 2 + 0.5, 30 * 2 + 0.5]).max() <= 1.0


def test_glow_patch_scorer_runs_batched_and_matches_one_at_a_time() -> None:
    g = Glow(GlowConfig(1, 3, levels=2, steps=1, hidden=4), seed=0)
    g.initialize(torch.rand(4, 1, 8, 8, 8) - 0.5)
    g.eval()
    vol = np.random.default_rng(1).random((20, 16, 16)).astype(np.float32)
    scorer = glow_patch_scorer(g, None, 8)
    a = patch_map(vol, scorer, patch=8, overlap=2, batch_size=7)
    b = patch_map(vol, scorer, patch=8, overlap=2, batch_size=1)
    np.testing.assert_allclose(a.patch_scores, b.patch_scores, rtol=1e-5)
    ratio = patch_map(vol, glow_patch_scorer(g, g, 8), patch=8, overlap=2)
    np.testing.assert_allclose(ratio.patch_scores, 0.0, atol=1e-9)  # same model twice


@pytest.mark.parametrize("bad,match", [
    (np.full((16, 16, 16), np.nan, np.float32), "NaN"),
    (np.zeros((4, 4, 4, 4), np.float32), "2D image or a 3D volume"),
])
def test_bad_volumes_are_refused(bad: np.ndarray, match: str) -> None:
    with pytest.raises(PatchMapError, match=match):
        patch_map(bad, lambda x: x.flatten(1).mean(1), patch=8, overlap=2)


def test_volume_smaller_than_a_patch_is_padded() -> None:
    pm = patch_map(np.ones((5, 6, 7), np.float32), lambda x: x.flatten(1).mean(1), patch=8,
                   overlap=2)
    assert pm.values.shape == (5, 6, 7) and np.isfinite(pm.values).all()


def test_lesion_volume_in_cm3_with_anisotropic_spacing() -> None:
    m = np.zeros((20, 30, 30))
    m[2:6, 10:20, 5:10] = 2.0  # 4 * 10 * 5 = 200 voxels
    m[15, 25, 25] = 3.0  # 1 voxel, filtered by min size
    spacing = (2.5, 0.7, 0.8)
    les = find_lesions(m, 1.0, spacing, min_size=0.01)
    assert len(les) == 1
    assert les[0].voxels == 200
    assert les[0].size == pytest.approx(200 * 2.5 * 0.7 * 0.8 / 1000)
    assert les[0].bbox == ((2, 6), (10, 20), (5, 10))
    assert les[0].centroid_mm == pytest.approx((3.5 * 2.5, 14.5 * 0.7, 7 * 0.8))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-100, 50, 7)
    les2 = find_lesions(m, 1.0, spacing, min_size=0.01, affine=affine)
    assert les2[0].centroid_mm == pytest.approx((3.5 * 2.5 - 100, 14.5 * 0.7 + 50, 7 * 0.8 + 7))
    assert unit_size((0.5, 0.5)) == pytest.approx(0.0025)  # cm² per pixel


@pytest.mark.parametrize("spacing", [(0.0, 1.0, 1.0), (1.0, -1.0, 1.0), (1.0, 1.0)])
def test_bad_spacing_is_refused(spacing: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="spacing"):
        find_lesions(np.zeros((4, 4, 4)), 1.0, spacing)


def test_thresholds_from_normals_and_validation_roc() -> None:
    rng = np.random.default_rng(0)
    t = voxel_threshold([rng.normal(size=(10, 10)) for _ in range(5)], 99.0)
    assert 1.8 < t < 3.0
    sizes = np.r_[rng.uniform(0, 1.5, 50), rng.uniform(3, 30, 50)]
    labels = np.r_[np.zeros(50), np.ones(50)]
    assert 1.4 <= choose_size_threshold(sizes, labels) <= 3.1
    with pytest.raises(ValueError, match="both normal and abnormal"):
        choose_size_threshold(sizes, np.ones(100))


def test_per_voxel_patch_maps_average_to_the_per_patch_scores() -> None:
    g = Glow(GlowConfig(1, 3, levels=2, steps=1, hidden=4), seed=0)
    g.initialize(torch.rand(4, 1, 8, 8, 8) - 0.5)
    g.eval()
    vol = np.random.default_rng(2).random((12, 16, 16)).astype(np.float32)
    for m1 in (None, Glow(GlowConfig(1, 3, levels=2, steps=1, hidden=4), seed=1)):
        if m1 is not None:
            m1.initialize(torch.rand(4, 1, 8, 8, 8) - 0.5)
            m1.eval()
        a = patch_map(vol, glow_patch_scorer(g, m1, 8), patch=8, overlap=4)
        b = patch_map(vol, glow_patch_scorer(g, m1, 8, per_voxel=True), patch=8, overlap=4)
        np.testing.assert_allclose(b.patch_scores, a.patch_scores, rtol=1e-6, atol=1e-8)
        assert b.values.shape == vol.shape and np.isfinite(b.values).all()
        assert b.values.std() > a.values.std() * 0.5  # voxel detail survives aggregation


def test_one_pass_of_the_pair_gives_all_four_maps() -> None:
    """patch_maps with glow_map_sources_scorer: each source's per-patch and per-voxel maps as
    four patch_map passes give them, from one pass of M0 and M1 (the calibration's maps)."""
    from flows.patchmap import glow_map_sources_scorer, patch_maps

    g0, g1 = (Glow(GlowConfig(1, 3, levels=2, steps=1, hidden=4), seed=s) for s in (0, 1))
    for g in (g0, g1):
        g.initialize(torch.rand(4, 1, 8, 8, 8) - 0.5)
        g.eval()
    vol = np.random.default_rng(3).random((12, 16, 20)).astype(np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[2:10, 3:14, 4:18] = True
    kw: dict[str, object] = dict(patch=8, overlap=4, mask=mask, batch_size=5)
    maps = patch_maps(vol, glow_map_sources_scorer(g0, g1, 8), **kw)  # type: ignore[arg-type]
    assert set(maps) == {"likelihood", "posterior", "likelihood:voxel", "posterior:voxel"}
    for name, pm in maps.items():
        source, _, voxel = name.partition(":")
        one = patch_map(vol, glow_patch_scorer(g0, g1 if source == "posterior" else None, 8,
                                               per_voxel=bool(voxel)), **kw)  # type: ignore[arg-type]
        assert pm.starts == one.starts, name
        np.testing.assert_allclose(pm.patch_scores, one.patch_scores, rtol=1e-5, atol=1e-6)
        covered = one.covered
        assert np.array_equal(pm.covered, covered), name
        np.testing.assert_allclose(pm.values[covered], one.values[covered], rtol=1e-5, atol=1e-6)
    with pytest.raises(PatchMapError, match="2 maps per patch for 3 sources"):
        patch_maps(vol, glow_map_sources_scorer(g0, g1, 8), ("a", "b", "c"), patch=8, overlap=4)

    def broken(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        out[0, 1, 0, 0, 0] = float("nan")
        return out

    with pytest.raises(ScoringError, match="non-finite"):
        patch_maps(vol, broken, patch=8, overlap=4)


def test_traced_scorer_agrees_with_the_eager_one_at_any_batch_size() -> None:
    torch.manual_seed(0)
    for shape in ((8, 8, 8), (8, 8)):
        g0, g1 = (Glow(GlowConfig(1, len(shape), levels=2, steps=1, hidden=4), seed=s) for s in (0, 1))
        for g in (g0, g1):
            g.initialize(torch.rand(4, 1, *shape) - 0.5)
            g.eval()
        for m1, per_voxel in ((None, False), (g1, False), (None, True), (g1, True)):
            traced = glow_patch_scorer(g0, m1, 8, per_voxel=per_voxel, trace=True)
            eager = glow_patch_scorer(g0, m1, 8, per_voxel=per_voxel, trace=False)
            assert isinstance(traced, ShapeTraced) and not isinstance(eager, ShapeTraced)
            assert isinstance(glow_patch_scorer(g0, m1, 8), ShapeTraced)  # the default, pair or not
            with torch.no_grad():
                for n in (5, 1, 9):
                    x = torch.rand(n, 1, *shape)
                    torch.testing.assert_close(traced(x), eager(x), rtol=1e-5, atol=1e-6)
            assert traced.traced and len(traced._traces) == 1  # one trace per patch shape, used
            # frozen for inference: the weights are constants of the trace, not parameters
            assert all(not list(t.parameters()) for t in traced._traces.values())  # type: ignore[union-attr]
    with torch.enable_grad():  # training or gradients: never the trace
        scorer = glow_patch_scorer(g0, None, 8)
        x = torch.rand(2, 1, 8, 8).requires_grad_()
        scorer(x).sum().backward()
        assert x.grad is not None and not scorer._traces  # type: ignore[attr-defined]


def test_an_untraceable_scorer_runs_eagerly() -> None:
    def moody(x: torch.Tensor) -> torch.Tensor:  # data-dependent control flow: no valid trace
        flat = x.flatten(1)
        return flat.sum(1) if bool(flat[0, 0] < flat[0, -1]) else -flat.sum(1)

    s = ShapeTraced(moody, [], "moody")
    with torch.no_grad():
        up = torch.linspace(0, 1, 16).reshape(1, 1, 4, 4).repeat(3, 1, 1, 1)
        down = up.flip(-1).flip(-2)
        assert torch.equal(s(up), moody(up)) and torch.equal(s(down), moody(down))
    assert not s.traced and "disagrees" in (s.eager_reason or "")


def test_per_patch_maps_aggregate_to_a_constant_when_constant() -> None:
    grid = PatchGrid.plan((20, 20), 8, 3)
    starts = grid.starts()
    m = aggregate(grid, starts, np.full((len(starts), 8, 8), -2.5))
    np.testing.assert_allclose(m, -2.5, rtol=1e-12)
