"""triage.imaging: DICOM series -> arrays with geometry, and the errors for bad series."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import triage.imaging as imaging
from flows.train import load_images
from triage.imaging import ImagingError, dicom_folder_loader, read_series, read_series_folder

CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _save(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _pixels(ds: Dataset, stored: np.ndarray, *, signed: bool, bits: int = 16) -> None:
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = np.ascontiguousarray(stored.astype("<i2" if signed else "<u2")).tobytes()


def ct_slice(path: Path, stored: np.ndarray, position: Sequence[float], *, series: str, study: str = "1.2.3",
             orientation: Sequence[float] = AXIAL, spacing: Sequence[float] = (0.8, 0.7),
             slope: float = 1.0, intercept: float = -1024.0, pixels: bool = True,
             thickness: float | None = None) -> Path:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
    ds.PixelSpacing = [f"{v:.6g}" for v in spacing]
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    if thickness is not None:
        ds.SliceThickness = f"{thickness:g}"
    _pixels(ds, stored, signed=True)
    if not pixels:
        del ds.PixelData
    return _save(ds, path)


def ct_series(folder: Path, n: int = 5, shape: tuple[int, int] = (6, 7), *, spacing: float = 2.5,
              orientation: Sequence[float] = AXIAL, seed: int = 0, series: str | None = None,
              positions: Sequence[float] | None = None) -> tuple[list[Path], np.ndarray]:
    """``n`` slices at ``positions`` (mm along the normal); returns files and the stored volume."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(0, 2000, size=(n, *shape)).astype(np.int16)
    series = series or generate_uid()
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    pos = positions if positions is not None else [k * spacing for k in range(n)]
    origin = np.array([-20.0, 13.0, 7.0])
    files = [ct_slice(folder / f"s{k:03d}.dcm", vol[k], origin + pos[k] * normal, series=series,
                      orientation=orientation) for k in range(n)]
    return files, vol


def dx_image(path: Path, stored: np.ndarray, *, photometric: str = "MONOCHROME2",
             orientation: Sequence[str] | None = ("L", "F"), series: str | None = None,
             spacing: Sequence[float] | None = (0.2, 0.2), rows: int | None = None) -> Path:
    ds = Dataset()
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = "DX"
    ds.PhotometricInterpretation = photometric
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    if orientation is not None:
        ds.PatientOrientation = list(orientation)
    if spacing is not None:
        ds.ImagerPixelSpacing = [f"{v:g}" for v in spacing]
    _pixels(ds, stored, signed=False, bits=12)
    if rows is not None:
        ds.Rows = rows
    return _save(ds, path)


# --------------------------------------------------------------------------- volumes


def test_shuffled_slices_are_sorted(tmp_path: Path) -> None:
    files, vol = ct_series(tmp_path, n=6)
    shuffled = [files[i] for i in (3, 0, 5, 1, 4, 2)]
    s = read_series(shuffled)
    np.testing.assert_array_equal(s.array, vol.astype(np.float32) - 1024)
    assert s.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert s.origin == pytest.approx((-20.0, 13.0, 7.0))
    assert s.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert len(s.sop_instance_uids) == 6 and s.meta["kind"] == "volume"


def test_oblique_and_reversed_normal_sorted_by_projection(tmp_path: Path) -> None:
    c, sn = np.cos(0.4), np.sin(0.4)
    oblique = (1.0, 0.0, 0.0, 0.0, c, sn)  # normal (0, -sn, c)
    files, vol = ct_series(tmp_path / "obl", n=4, orientation=oblique, spacing=3.0)
    s = read_series(files[::-1])
    np.testing.assert_array_equal(s.array, vol.astype(np.float32) - 1024)
    assert s.spacing[0] == pytest.approx(3.0, abs=1e-4)
    assert s.direction is not None and s.direction[6:] == pytest.approx((0.0, -sn, c))
    # normal pointing to the feet: slice 0 is the lowest position along that normal
    files, vol = ct_series(tmp_path / "rev", n=4, orientation=(1, 0, 0, 0, -1, 0))
    s = read_series(list(reversed(files)))
    np.testing.assert_array_equal(s.array, vol.astype(np.float32) - 1024)


def test_rescale_applied_per_slice(tmp_path: Path) -> None:
    stored = np.arange(42, dtype=np.int16).reshape(6, 7)
    files = [ct_slice(tmp_path / "a.dcm", stored, (0, 0, 0), series="1.9", slope=2.0, intercept=-1000.0),
             ct_slice(tmp_path / "b.dcm", stored, (0, 0, 1.5), series="1.9", slope=0.5, intercept=10.0)]
    s = read_series(files)
    np.testing.assert_allclose(s.array[0], stored * 2.0 - 1000.0)
    np.testing.assert_allclose(s.array[1], stored * 0.5 + 10.0)
    assert s.array.dtype == np.float32 and s.spacing[0] == pytest.approx(1.5)


def test_single_slice_uses_thickness(tmp_path: Path) -> None:
    stored = np.zeros((6, 7), dtype=np.int16)
    f = ct_slice(tmp_path / "a.dcm", stored, (0, 0, 0), series="1.9", thickness=1.25)
    s = read_series([f])
    assert s.array.shape == (1, 6, 7) and s.spacing[0] == 1.25
    g = ct_slice(tmp_path / "b.dcm", stored, (0, 0, 0), series="1.8")
    with pytest.raises(ImagingError, match="missing geometry"):
        read_series([g])
    h = ct_slice(tmp_path / "c.dcm", stored, (0, 0, 0), series="1.7", thickness=0.0)
    with pytest.raises(ImagingError, match="zero or negative slice spacing"):
        read_series([h])


# --------------------------------------------------------------------------- projections


def test_monochrome1_inverted_and_monochrome2_kept(tmp_path: Path) -> None:
    stored = np.arange(48, dtype=np.uint16).reshape(6, 8) * 80
    s1 = read_series([dx_image(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1")])
    np.testing.assert_array_equal(s1.array, 4095.0 - stored)
    assert s1.meta["inverted"] and s1.meta["value_range"] == (0.0, 4095.0)
    s2 = read_series([dx_image(tmp_path / "m2.dcm", stored)])
    np.testing.assert_array_equal(s2.array, stored.astype(np.float32))
    assert s2.array.shape == (6, 8) and s2.modality == "DX" and s2.origin is None
    assert s2.spacing == (0.2, 0.2) and s2.meta["spacing_source"] == "ImagerPixelSpacing"


def test_inverse_presentation_lut_shape_inverts_once(tmp_path: Path) -> None:
    stored = np.arange(48, dtype=np.uint16).reshape(6, 8) * 80
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        f = dx_image(tmp_path / f"{photometric}.dcm", stored, photometric=photometric)
        ds = pydicom.dcmread(f)
        ds.PresentationLUTShape = "INVERSE"
        ds.save_as(f)
        s = read_series([f])
        # MONOCHROME1 + INVERSE (as the DX IOD requires) and MONOCHROME2 + INVERSE both display
        # low values white: one inversion, not two
        np.testing.assert_array_equal(s.array, 4095.0 - stored)
        assert s.meta["inverted"]


def test_projection_orientation_made_canonical(tmp_path: Path) -> None:
    stored = np.arange(48, dtype=np.uint16).reshape(6, 8)
    s = read_series([dx_image(tmp_path / "rf.dcm", stored, orientation=("R", "F"))])
    np.testing.assert_array_equal(s.array, stored[:, ::-1])
    assert s.meta["patient_orientation"] == ["L", "F"] and s.meta["orientation_ops"] == ["flip_columns"]
    s = read_series([dx_image(tmp_path / "fl.dcm", stored, orientation=("F", "L"), spacing=(0.1, 0.3))])
    np.testing.assert_array_equal(s.array, stored.T)
    assert s.spacing == (0.3, 0.1)
    s = read_series([dx_image(tmp_path / "pf.dcm", stored, orientation=("P", "F"))])  # lateral: as stored
    np.testing.assert_array_equal(s.array, stored)
    s = read_series([dx_image(tmp_path / "none.dcm", stored, orientation=None, spacing=None)])
    assert np.isnan(s.spacing).all() and s.meta["spacing_source"] == "unknown"


# --------------------------------------------------------------------------- errors


def test_error_no_pixel_data(tmp_path: Path) -> None:
    f = ct_slice(tmp_path / "a.dcm", np.zeros((4, 4), np.int16), (0, 0, 0), series="1.9", pixels=False)
    with pytest.raises(ImagingError, match="no pixel data"):
        read_series([f])


def test_error_mixed_series(tmp_path: Path) -> None:
    a, _ = ct_series(tmp_path / "a", n=2)
    b, _ = ct_series(tmp_path / "b", n=2)
    with pytest.raises(ImagingError, match="mixed series: 4 files carry 2 different SeriesInstanceUIDs"):
        read_series(a + b)


def test_error_inconsistent_orientation(tmp_path: Path) -> None:
    files, _ = ct_series(tmp_path, n=3, series="1.5")
    ct_slice(files[1], np.zeros((6, 7), np.int16), (0, 0, 2.5), series="1.5", orientation=(1, 0, 0, 0, 0, -1))
    with pytest.raises(ImagingError, match="inconsistent ImageOrientationPatient"):
        read_series(files)


def test_error_inconsistent_rows_columns(tmp_path: Path) -> None:
    files, _ = ct_series(tmp_path, n=3, series="1.5")
    ct_slice(files[2], np.zeros((6, 8), np.int16), (0, 0, 5.0), series="1.5")
    with pytest.raises(ImagingError, match="inconsistent Rows/Columns"):
        read_series(files)


def test_error_duplicate_positions(tmp_path: Path) -> None:
    files, _ = ct_series(tmp_path, n=4, positions=[0.0, 2.5, 2.5, 5.0])
    with pytest.raises(ImagingError, match="duplicate slice positions: 1 of 4"):
        read_series(files)


def test_error_zero_spacing(tmp_path: Path) -> None:
    files, _ = ct_series(tmp_path, n=3, positions=[4.0, 4.0, 4.0])
    with pytest.raises(ImagingError, match="zero slice spacing"):
        read_series(files)


def test_error_non_uniform_spacing(tmp_path: Path) -> None:
    files, _ = ct_series(tmp_path, n=4, positions=[0.0, 2.5, 5.0, 10.0])  # a missing slice
    with pytest.raises(ImagingError, match="non-uniform slice spacing"):
        read_series(files)
    files, _ = ct_series(tmp_path / "ok", n=4, positions=[0.0, 2.5, 5.01, 7.5])  # within 1 %
    assert read_series(files).spacing[0] == pytest.approx(2.5)
    with pytest.raises(ImagingError, match="non-uniform"):
        read_series(files, spacing_tolerance=0.001)


def test_error_missing_geometry(tmp_path: Path) -> None:
    files, _ = ct_series(tmp_path, n=2)
    ds = pydicom.dcmread(files[1])
    del ds.ImagePositionPatient
    ds.save_as(files[1])
    with pytest.raises(ImagingError, match=r"missing geometry \(ImagePositionPatient\)"):
        read_series(files)


def test_error_sheared_stack(tmp_path: Path) -> None:
    series = generate_uid()
    files = [ct_slice(tmp_path / f"{k}.dcm", np.zeros((6, 7), np.int16), (3.0 * k, 0, 2.5 * k), series=series)
             for k in range(3)]
    with pytest.raises(ImagingError, match="not stacked along their normal"):
        read_series(files)


def test_error_bad_orientation_vectors(tmp_path: Path) -> None:
    files = [ct_slice(tmp_path / f"{k}.dcm", np.zeros((6, 7), np.int16), (0, 0, k), series="1.4",
                      orientation=(1, 0, 0, 1, 0, 0)) for k in range(2)]
    with pytest.raises(ImagingError, match="not two orthogonal unit vectors"):
        read_series(files)


def test_sizes_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(h: object) -> np.ndarray:
        raise AssertionError("pixel data decoded before the size check")

    monkeypatch.setattr(imaging, "_decode", no_decode)
    stored = np.zeros((4, 4), np.uint16)
    with pytest.raises(ImagingError, match=r"outside 1\.\.16384"):
        read_series([dx_image(tmp_path / "big.dcm", stored, rows=20000)])
    series = generate_uid()
    files = []
    for k in range(3):  # 3 x 16384 x 16384 float32 > 2 GiB, though every file is tiny
        ds_file = ct_slice(tmp_path / f"h{k}.dcm", np.zeros((4, 4), np.int16), (0, 0, k), series=series)
        ds = pydicom.dcmread(ds_file)
        ds.Rows = ds.Columns = 16384
        ds.save_as(ds_file)
        files.append(ds_file)
    with pytest.raises(ImagingError, match="more than 2 GiB"):
        read_series(files)


def test_error_not_dicom_and_multiframe_and_empty(tmp_path: Path) -> None:
    txt = tmp_path / "x.dcm"
    txt.write_text("hello")
    with pytest.raises(ImagingError, match="not a DICOM file"):
        read_series([txt])
    with pytest.raises(ImagingError, match="no files"):
        read_series([])
    f = dx_image(tmp_path / "mf.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(f)
    ds.NumberOfFrames = 2
    ds.save_as(f)
    with pytest.raises(ImagingError, match="multi-frame"):
        read_series([f])
    series = generate_uid()
    two = [dx_image(tmp_path / f"dx{k}.dcm", np.zeros((4, 4), np.uint16), series=series) for k in range(2)]
    with pytest.raises(ImagingError, match="holds 2 images"):
        read_series(two)


def test_error_undecodable_pixel_data(tmp_path: Path) -> None:
    f = dx_image(tmp_path / "short.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(f)
    ds.PixelData = b"\x00\x00" * 3
    ds.save_as(f)
    with pytest.raises(ImagingError, match="cannot decode pixel data"):
        read_series([f])


# --------------------------------------------------------------------------- folders and the loader


def test_read_series_folder_groups_and_skips(tmp_path: Path) -> None:
    _, a_vol = ct_series(tmp_path / "00000", n=3, seed=1)
    _, b_vol = ct_series(tmp_path / "00001" / "deeper", n=3, seed=2)
    (tmp_path / "labels.csv").write_text("case,label\n0,0\n")
    (tmp_path / "00000" / "README").write_bytes(b"\x00" * 300)
    sr = Dataset()  # a non-image DICOM object (no Rows): skipped
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.SOPInstanceUID = generate_uid()
    sr.SeriesInstanceUID = generate_uid()
    sr.Modality = "SR"
    _save(sr, tmp_path / "00000" / "sr.dcm")
    series = read_series_folder(tmp_path)
    assert len(series) == 2
    np.testing.assert_array_equal(series[0].array, a_vol - 1024.0)
    np.testing.assert_array_equal(series[1].array, b_vol - 1024.0)


def test_read_series_folder_names_the_bad_folder(tmp_path: Path) -> None:
    ct_series(tmp_path / "00003", n=3, positions=[0.0, 1.0, 1.0])
    with pytest.raises(ImagingError, match="00003: duplicate slice positions"):
        read_series_folder(tmp_path)
    with pytest.raises(NotADirectoryError):
        read_series_folder(tmp_path / "missing")


def test_loader_none_for_empty_or_non_dicom(tmp_path: Path) -> None:
    assert dicom_folder_loader(tmp_path) is None
    (tmp_path / "labels.csv").write_text("case\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.bin").write_bytes(b"\x01" * 200)
    assert dicom_folder_loader(tmp_path) is None
    assert dicom_folder_loader(tmp_path / "labels.csv") is None


def test_loader_stacks_equal_shapes_and_refuses_mixed(tmp_path: Path) -> None:
    vols = [ct_series(tmp_path / "set" / f"{i:05d}", n=3, seed=i)[1] for i in range(3)]
    batch = dicom_folder_loader(tmp_path / "set")
    assert batch is not None and batch.shape == (3, 3, 6, 7) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, np.stack(vols) - 1024.0)
    # through flows.train's registry, as training uses it
    images = load_images(tmp_path / "set", ndim=3)
    assert images.shape == (3, 1, 3, 6, 7)
    ct_series(tmp_path / "set" / "00009", n=4, seed=9)
    with pytest.raises(ValueError, match=r"different shapes \[\(3, 6, 7\), \(4, 6, 7\)\]; resample"):
        dicom_folder_loader(tmp_path / "set")


def test_a_folder_of_unread_dicom_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from triage.labelled import LABELS_CSV, read_labelled_folder

    stored = np.arange(48, dtype=np.uint16).reshape(6, 8)
    f = dx_image(tmp_path / "bare" / "a.dcm", stored)
    ds = pydicom.dcmread(f)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(f, enforce_file_format=False)  # the data set alone: no preamble, no 'DICM'
    with caplog.at_level("WARNING", logger="triage.imaging"):
        assert imaging.scan_series_folder(tmp_path / "bare") == []
    assert "1 file(s) look like DICOM without the Part 10 header" in caplog.text and "a.dcm" in caplog.text

    ot = dx_image(tmp_path / "ot" / "b.dcm", stored)  # a radiograph exported as Modality OT
    ds = pydicom.dcmread(ot)
    ds.Modality = "OT"
    ds.save_as(ot)
    (tmp_path / "ot" / LABELS_CSV).write_text(f"series_instance_uid,label\n{ds.SeriesInstanceUID},0\n")
    msg = r"no DICOM images found \(1 series of modality OT read as volumes\)"
    with pytest.raises(ValueError, match=msg):
        read_labelled_folder(tmp_path / "ot", volumes=False)
