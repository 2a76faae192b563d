"""triage.phantom_dicom: phantom sets -> DICOM studies that a PACS and dciodvfy accept."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from flows.phantoms import PhantomSet
from triage.imaging import read_series_folder
from triage.phantom_dicom import CT_IMAGE_STORAGE, DX_FOR_PRESENTATION_STORAGE, write_dicom_studies

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def tiny_cxr(n: int = 3, size: int = 32, seed: int = 0) -> PhantomSet:
    rng = np.random.default_rng(seed)
    images = rng.random((n, 1, size, size), dtype=np.float32)
    images[:, :, :2] = 0.0  # collimation
    images[0, 0, 5, 5], images[0, 0, 6, 6] = 1.0, 0.0
    labels = np.arange(n, dtype=np.int64) % 2
    return PhantomSet(images=images, labels=labels,
                   findings=["opacity" if v else "normal" for v in labels],
                   masks=np.zeros_like(images, dtype=bool),
                   zero_fraction=np.linspace(0.05, 0.3, n).astype(np.float32),
                   spacing=(0.7, 0.65),
                   meta={"kind": "cxr", "child": np.arange(n) == n - 1})


def tiny_ct(n: int = 3, shape: tuple[int, int, int] = (4, 16, 16), seed: int = 0) -> PhantomSet:
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 1, *shape), dtype=np.float32) * 2200 - 1100).astype(np.float32)
    images[:, :, 0, 0, 0] = -1024.0
    images[:, :, 1, 0, 0] = 3000.4
    labels = np.array([i % 2 for i in range(n)], dtype=np.int64)
    return PhantomSet(images=images, labels=labels,
                   findings=["haemorrhage" if v else "normal" for v in labels],
                   masks=np.zeros_like(images, dtype=bool),
                   zero_fraction=np.full(n, 0.25, dtype=np.float32),
                   spacing=(5.0, 0.9, 0.8),
                   meta={"kind": "bct"})


def read_labels(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- round trips


def test_cxr_round_trip(tmp_path: Path) -> None:
    ps = tiny_cxr()
    labels_csv = write_dicom_studies(ps, tmp_path / "cxr", seed=3)
    assert labels_csv == tmp_path / "cxr" / "labels.csv"
    assert sorted(p.name for p in (tmp_path / "cxr").iterdir()) == ["00000", "00001", "00002", "labels.csv"]
    series = read_series_folder(tmp_path / "cxr")
    assert len(series) == 3
    rows = read_labels(labels_csv)
    for i, (s, row) in enumerate(zip(series, rows, strict=True)):
        assert s.array.shape == (32, 32) and s.array.dtype == np.float32
        np.testing.assert_allclose(s.array / 4095.0, ps.images[i, 0], rtol=0, atol=0.5 / 4095 + 1e-7)
        assert s.spacing == pytest.approx(ps.spacing)
        assert s.modality == "DX"
        assert s.meta["view_position"] == ("AP" if i == 2 else "PA")
        assert s.meta["value_range"] == (0.0, 4095.0)
        assert s.study_instance_uid == row["study_instance_uid"]
        assert s.series_instance_uid == row["series_instance_uid"]

    ds = pydicom.dcmread(tmp_path / "cxr" / "00000" / "00000-00001.dcm")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == DX_FOR_PRESENTATION_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition) == ("DX", "CHEST", "PA")
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert list(ds.PatientOrientation) == ["L", "F"]
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert [float(v) for v in ds.ImagerPixelSpacing] == pytest.approx(ps.spacing)
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert ds.PatientName == "PHANTOM^00000" and ds.ReferringPhysicianName == ""
    assert "WindowCenter" in ds and "WindowWidth" in ds
    assert int(ds.pixel_array.max()) <= 4095


def test_ct_round_trip(tmp_path: Path) -> None:
    ps = tiny_ct()
    write_dicom_studies(ps, tmp_path / "ct")
    series = read_series_folder(tmp_path / "ct")
    assert len(series) == 3
    for i, s in enumerate(series):
        assert s.array.shape == (4, 16, 16)
        assert float(np.abs(s.array - ps.images[i, 0]).max()) <= 0.5 + 1e-3  # within 1 HU
        assert s.spacing == pytest.approx(ps.spacing)
        assert s.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
        assert s.modality == "CT"
        assert len(set(s.sop_instance_uids)) == 4

    files = sorted((tmp_path / "ct" / "00001").glob("*.dcm"))
    assert [f.name for f in files] == [f"00001-{k:05d}.dcm" for k in range(1, 5)]
    slices = [pydicom.dcmread(f) for f in files]
    assert {d.SOPClassUID for d in slices} == {CT_IMAGE_STORAGE}
    assert len({d.FrameOfReferenceUID for d in slices}) == 1
    assert len({d.SeriesInstanceUID for d in slices}) == 1
    assert [int(d.InstanceNumber) for d in slices] == [1, 2, 3, 4]
    z = [float(d.ImagePositionPatient[2]) for d in slices]
    assert np.diff(z) == pytest.approx([5.0] * 3)
    d0 = slices[0]
    assert [float(v) for v in d0.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert (float(d0.RescaleIntercept), float(d0.RescaleSlope)) == (-1024.0, 1.0)
    assert float(d0.SliceThickness) == 5.0
    assert list(d0.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert d0.BodyPartExamined == "HEAD" and "KVP" in d0
    assert d0.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_labels_csv(tmp_path: Path) -> None:
    ps = tiny_cxr(n=4)
    rows = read_labels(write_dicom_studies(ps, tmp_path))
    assert list(rows[0]) == ["case", "study_instance_uid", "series_instance_uid", "label", "finding",
                             "zero_fraction"]
    assert [r["case"] for r in rows] == ["00000", "00001", "00002", "00003"]
    assert [int(r["label"]) for r in rows] == ps.labels.tolist()
    assert [r["finding"] for r in rows] == ps.findings
    assert np.array_equal(np.array([r["zero_fraction"] for r in rows], dtype=np.float32), ps.zero_fraction)
    uids = [r["study_instance_uid"] for r in rows] + [r["series_instance_uid"] for r in rows]
    assert len(set(uids)) == len(uids)
    for r in rows:
        ds = pydicom.dcmread(next((tmp_path / r["case"]).glob("*.dcm")), stop_before_pixels=True)
        assert ds.StudyInstanceUID == r["study_instance_uid"]
        assert ds.SeriesInstanceUID == r["series_instance_uid"]


# --------------------------------------------------------------------------- determinism, UIDs


def test_deterministic_bytes_and_rewrite(tmp_path: Path) -> None:
    for make in (tiny_cxr, tiny_ct):
        ps = make()
        a, b = tmp_path / f"{make.__name__}-a", tmp_path / f"{make.__name__}-b"
        write_dicom_studies(ps, a, seed=7)
        write_dicom_studies(ps, b, seed=7)
        first = all_bytes(a)
        assert first == all_bytes(b)
        write_dicom_studies(ps, a, seed=7)  # rewriting an earlier output in place
        assert all_bytes(a) == first
    # a smaller set written over a larger one leaves no stale studies behind
    write_dicom_studies(tiny_ct(n=2, shape=(3, 16, 16)), tmp_path / "tiny_ct-a", seed=7)
    assert len(read_series_folder(tmp_path / "tiny_ct-a")) == 2


def test_uids_valid_unique_and_not_in_paths(tmp_path: Path) -> None:
    ps = tiny_ct()
    write_dicom_studies(ps, tmp_path / "s0", seed=0)
    write_dicom_studies(ps, tmp_path / "s1", seed=1)
    changed = tiny_ct()
    changed.images[1] += 10.0
    write_dicom_studies(changed, tmp_path / "c0", seed=0)

    def uids(root: Path) -> list[str]:
        out = []
        for f in sorted(root.rglob("*.dcm")):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            out += [ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID]
            assert ds.SOPInstanceUID not in str(f) and ds.StudyInstanceUID not in str(f)
        return out

    u0, u1, c0 = uids(tmp_path / "s0"), uids(tmp_path / "s1"), uids(tmp_path / "c0")
    for u in u0:
        assert len(u) <= 64 and UID_RE.match(u), u
    sop0 = u0[0::4]
    assert len(set(sop0)) == len(sop0) == 12
    assert not set(u0) & set(u1)  # another seed: other UIDs
    assert u0[:16] == c0[:16]  # case 0 unchanged
    assert not set(u0[16:32]) & set(c0[16:32])  # case 1's pixels changed: new UIDs


# --------------------------------------------------------------------------- validation


def test_argument_validation(tmp_path: Path) -> None:
    ps = tiny_cxr()
    with pytest.raises(ValueError, match="kind"):
        write_dicom_studies(PhantomSet(ps.images, ps.labels, ps.findings, ps.masks, ps.zero_fraction,
                                    ps.spacing, {"kind": "mri"}), tmp_path / "a")
    bad = tiny_cxr()
    bad.images[0, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_dicom_studies(bad, tmp_path / "b")
    with pytest.raises(ValueError, match="shaped"):
        write_dicom_studies(PhantomSet(ps.images[:, 0, 0], ps.labels, ps.findings, ps.masks[:, 0, 0],
                                    ps.zero_fraction, ps.spacing, {"kind": "cxr"}), tmp_path / "c")
    with pytest.raises(ValueError, match="spacing"):
        write_dicom_studies(PhantomSet(ps.images, ps.labels, ps.findings, ps.masks, ps.zero_fraction,
                                    (0.0, 1.0), {"kind": "cxr"}), tmp_path / "d")
    with pytest.raises(ValueError, match=r"entries|differ in length"):
        write_dicom_studies(PhantomSet(ps.images, ps.labels[:2], ps.findings, ps.masks, ps.zero_fraction,
                                    ps.spacing, {"kind": "cxr"}), tmp_path / "e")
    with pytest.raises(ValueError, match="seed"):
        write_dicom_studies(ps, tmp_path / "f", seed=-1)
    with pytest.raises(TypeError, match="PhantomSet-like"):
        write_dicom_studies(object(), tmp_path / "g")  # type: ignore[arg-type]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_dicom_studies(ps, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- dicom3tools


def _dicom3tools(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} not found on PATH: install dicom3tools (apt-get install dicom3tools) "
                    "to validate the phantom DICOM files")
    return exe


def test_dciodvfy_accepts_cxr_and_ct(tmp_path: Path) -> None:
    dciodvfy = _dicom3tools("dciodvfy")
    write_dicom_studies(tiny_cxr(), tmp_path / "cxr")
    write_dicom_studies(tiny_ct(), tmp_path / "ct")
    for f, iod in ((tmp_path / "cxr" / "00002" / "00002-00001.dcm", "DXImageForPresentation"),
                   (tmp_path / "ct" / "00000" / "00000-00002.dcm", "CTImage")):
        res = subprocess.run([dciodvfy, str(f)], capture_output=True, text=True, timeout=60, check=False)
        report = res.stdout + res.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"dciodvfy on {f.name}:\n{report}"
        assert iod in report, report


def test_dcentvfy_accepts_a_ct_series(tmp_path: Path) -> None:
    """Patient/study/series attributes agree across all slices of a series."""
    dcentvfy = _dicom3tools("dcentvfy")
    write_dicom_studies(tiny_ct(), tmp_path)
    files = sorted(str(f) for f in (tmp_path / "00000").glob("*.dcm"))
    res = subprocess.run([dcentvfy, *files], capture_output=True, text=True, timeout=60, check=False)
    report = res.stdout + res.stderr
    assert res.returncode == 0 and "Error" not in report, report
