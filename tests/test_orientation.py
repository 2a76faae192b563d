"""Volumes stored in any axis order reach the models as (S, P, L), and their maps go back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from flows.phantoms.chestct import make_chestct
from triage.analyze import Models, analyse_series
from triage.config import ModelSettings
from triage.imaging import Series, read_series, scan_series_folder
from triage.orientation import canonical_volume, volume_affine
from triage.phantom_dicom import write_dicom_studies

ROOT = Path(__file__).resolve().parents[1]
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _series(arr: np.ndarray, spacing: tuple[float, float, float], origin: np.ndarray,
            direction: tuple[float, ...]) -> Series:
    return Series(arr, spacing, "CT", "1.2", "1.3", [str(i) for i in range(arr.shape[0])],
                  origin=tuple(float(v) for v in origin), direction=direction)


@pytest.fixture
def axial() -> Series:
    arr = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    return _series(arr, (3.0, 1.0, 2.0), np.array([10.0, 20.0, 30.0]), AXIAL)


def test_axial_series_is_left_as_it_is(axial: Series) -> None:
    c, back = canonical_volume(axial)
    assert c is axial and back is None


def test_mirrored_rows_come_back_to_the_axial_order(axial: Series) -> None:
    a = volume_affine(axial)
    # the same voxels stored right to left; a mirrored row cosine flips the normal, so the
    # slices run towards the feet: stored voxel (k, r, c) is axial voxel (4 - k, r, 6 - c)
    stored = _series(axial.array[::-1, :, ::-1].copy(), axial.spacing,
                     (a @ np.array([4, 0, 6, 1.0]))[:3], (-1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0))
    c, back = canonical_volume(stored)
    assert back is not None
    np.testing.assert_array_equal(c.array, axial.array)
    np.testing.assert_allclose(volume_affine(c), a, atol=1e-9)
    assert c.sop_instance_uids == stored.sop_instance_uids[::-1]
    np.testing.assert_array_equal(back.values(c.array), stored.array)
    # a voxel and a box on the canonical grid land on the same voxels of the stored one
    assert back.index([1, 2, 3]) == pytest.approx([3, 2, 3])
    box = back.box([[0, 2], [1, 3], [0, 1]])
    assert box == [[3, 5], [1, 3], [6, 7]]
    probe = np.zeros_like(c.array)
    probe[0:2, 1:3, 0:1] = 1
    stored_probe = back.values(probe)
    assert stored_probe[tuple(slice(lo, hi) for lo, hi in box)].all() and stored_probe.sum() == probe.sum()


def test_sagittal_series_is_permuted(axial: Series) -> None:
    a = volume_affine(axial)
    # slices along the normal row x column = -x (towards the right), rows towards the feet,
    # columns towards the back: stored voxel (k, r, c) is axial voxel (4 - r, c, 6 - k)
    sag = np.transpose(axial.array, (2, 0, 1))[::-1, ::-1, :].copy()
    stored = _series(sag, (2.0, 3.0, 1.0), (a @ np.array([4, 0, 6, 1.0]))[:3],
                     (0, 1.0, 0, 0, 0, -1.0, -1.0, 0, 0))
    d = np.asarray(stored.direction).reshape(3, 3)
    np.testing.assert_allclose(np.cross(d[0], d[1]), d[2])  # as read_series stacks slices
    np.testing.assert_allclose(volume_affine(stored) @ np.array([6, 4, 5, 1.0]),
                               a @ np.array([0, 5, 0, 1.0]))  # the same voxel in both
    c, back = canonical_volume(stored)
    assert back is not None
    np.testing.assert_array_equal(c.array, axial.array)
    np.testing.assert_allclose(volume_affine(c), a, atol=1e-9)
    assert c.spacing == axial.spacing and c.sop_instance_uids == []  # the slice axis moved
    np.testing.assert_array_equal(back.values(c.array), stored.array)
    assert back.index([1, 2, 3]) == pytest.approx([3, 3, 2])
    assert back.box([[0, 2], [1, 3], [0, 1]]) == [[6, 7], [3, 5], [1, 3]]


def _mirror_rows(src: Path, dst: Path) -> None:
    """A copy of a DICOM series with every slice's pixels stored right to left, its geometry
    saying so (what some scanners and reconstructions write)."""
    dst.mkdir(parents=True)
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        px = ds.pixel_array[:, ::-1].copy()
        ds.PixelData = px.tobytes()
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + (ds.Columns - 1) * float(ds.PixelSpacing[1]), y, z]
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        ds.save_as(dst / f.name)


@pytest.fixture(scope="module")
def ct_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("orient")
    ps = make_chestct(2, abnormal_fraction=1.0, seed=5)
    write_dicom_studies(ps, root / "axial", seed=5)
    _mirror_rows(root / "axial" / "00000", root / "mirrored" / "00000")
    return root / "axial" / "00000", root / "mirrored" / "00000"


def test_site_folders_read_mirrored_series_as_axial(ct_pair: tuple[Path, Path]) -> None:
    axial, mirrored = ct_pair
    (a,), (m,) = scan_series_folder(axial), scan_series_folder(mirrored)
    sa, sm = a.read(), m.read()
    np.testing.assert_array_equal(sm.array, sa.array)
    assert sm.spacing == pytest.approx(sa.spacing)
    # the stored series keeps the scanner's order (the node's SEG goes there): columns right
    # to left, and slices towards the feet (the normal of a mirrored row cosine)
    assert np.array_equal(read_series(m.files).array, sa.array[::-1, :, ::-1])


def test_node_scores_a_mirrored_series_alike_and_maps_it_back(ct_pair: tuple[Path, Path]) -> None:
    axial, mirrored = ct_pair
    models = Models(ModelSettings(chestct=ROOT / "models" / "chestct"))
    ra = analyse_series(sorted(axial.glob("*.dcm")), "chestct", models)
    rm = analyse_series(sorted(mirrored.glob("*.dcm")), "chestct", models)
    assert rm.score == pytest.approx(ra.score) and rm.abnormal == ra.abnormal
    assert rm.map is not None and ra.map is not None
    np.testing.assert_allclose(rm.map, ra.map[::-1, :, ::-1], equal_nan=True)
    assert rm.details["reoriented_from"] and "reoriented_from" not in ra.details
    assert ra.details["domain"]["outside"] == [] and ra.details["domain"]["noise_hu"] > 0
    # a voxel threshold low enough for lesions, so that their positions are checked too
    scorer = models.patch_scorer("chestct")
    scorer.cal = replace(scorer.cal, voxel_threshold=float(np.nanpercentile(ra.map, 99.5)))
    ra = analyse_series(sorted(axial.glob("*.dcm")), "chestct", models)
    rm = analyse_series(sorted(mirrored.glob("*.dcm")), "chestct", models)
    assert len(rm.lesions) == len(ra.lesions) > 0
    n, _, cols = ra.map.shape
    for la, lm in zip(ra.lesions, rm.lesions, strict=True):
        assert lm["centroid_mm"] == pytest.approx(la["centroid_mm"], abs=1e-3)
        z, y, x = la["centroid_index"]
        assert lm["centroid_index"] == pytest.approx([n - 1 - z, y, cols - 1 - x], abs=1e-6)
        (z0, z1), (y0, y1), (x0, x1) = la["bbox"]
        assert lm["bbox"] == [[n - z1, n - z0], [y0, y1], [cols - x1, cols - x0]]
