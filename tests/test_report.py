"""triage.report: SR (TID 1500) and SEGs that dciodvfy accepts and highdicom reads back.

Phantom studies (flows.phantoms -> triage.phantom_dicom) stand in for what a PACS sends; the
analysis is synthetic: a Gaussian blob at a known position plus noise on the stored grid,
a threshold that makes one component, and lesion dicts computed from it the way the patch
map does (``flows.lesions.find_lesions`` with the volume's affine).
"""

from __future__ import annotations

import dataclasses
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from flows.lesions import find_lesions
from flows.phantoms import make_cxr, make_headct
from flows.phantoms.chestct import make_chestct
from triage import MANUFACTURER
from triage.analyze import volume_affine
from triage.imaging import Series, read_series
from triage.phantom_dicom import write_dicom_studies
from triage.report import ReportError, ReportInput, build_reports
from triage.report.seg import (
    BINARY_SEGMENT_LABEL,
    FRACTIONAL_SEGMENT_LABEL,
    MAX_FRACTIONAL_VALUE,
    SEG_SERIES_NUMBER,
    normalise_map,
)
from triage.report.sr import CODES, MAX_LESIONS, PROCEDURES, SR_SERIES_NUMBER
from triage.report.uids import OUTPUTS, device_uid, output_uid, tracking_uid

UID_RE = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")
THRESHOLD = 1.0
FINGERPRINT = "0123456789abcdef" * 4
ANONYMISED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
              "AccessionNumber", "StudyID", "ReferringPhysicianName")


# --------------------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Study:
    kind: str
    files: list[Path]
    series: Series

    def datasets(self, *, shuffle: bool = True) -> list[Dataset]:
        out = [pydicom.dcmread(f) for f in self.files]
        if shuffle:
            random.Random(len(out)).shuffle(out)  # build_reports takes the sources in any order
        return out


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Study]:
    root = tmp_path_factory.mktemp("report-phantoms")
    sets = {
        "cxr": make_cxr(1, seed=1),
        "bct": make_headct(1, shape=(16, 64, 64), seed=2),
        "chestct": make_chestct(1, shape=(60, 64, 64), spacing_mm=2.0, seed=3),
    }
    out = {}
    for kind, ps in sets.items():
        write_dicom_studies(ps, root / kind, seed=5)
        files = sorted((root / kind / "00000").glob("*.dcm"))
        out[kind] = Study(kind, files, read_series(files))
    return out


def _blob_centre(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A position off the centre, so that flips or swapped axes would show."""
    if len(shape) == 2:
        return (shape[0] // 3, (2 * shape[1]) // 3)
    return ((2 * shape[0]) // 3, shape[1] // 3, (2 * shape[2]) // 3)


def synthetic_map(shape: tuple[int, ...], *, blob: bool = True, nan_border: bool = True, seed: int = 0
                  ) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 0.1, shape)
    if blob:
        grid = np.indices(shape, dtype=np.float64)
        centre = _blob_centre(shape)
        d2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
        values += 3.0 * np.exp(-d2 / (2 * 2.0**2))
    out = values.astype(np.float32)
    if nan_border:
        out[..., :2] = np.nan  # outside the analysed mask
    return out


def report_input(study: Study, *, version: int = 1, values: np.ndarray | None = None, result_id: int = 42,
                 threshold: float | None = THRESHOLD, **changes: Any) -> ReportInput:
    s = study.series
    if values is None:
        values = synthetic_map(tuple(s.array.shape))
    if s.is_volume:
        lesions = find_lesions(values, THRESHOLD, tuple(s.spacing), affine=volume_affine(s))
    else:
        lesions = find_lesions(values, THRESHOLD, tuple(s.spacing))
    lesion_dicts = [{"volume_cm3": le.size, "centroid_mm": list(le.centroid_mm),
                     "centroid_index": list(le.centroid_index), "peak": le.peak,
                     "bbox": [list(b) for b in le.bbox]} for le in lesions]
    fields: dict[str, Any] = {
        "result_id": result_id, "version": version, "kind": study.kind,
        "bundle_name": f"cpu-{study.kind}", "bundle_version": "1.2.3", "bundle_fingerprint": FINGERPRINT,
        "method": "posterior", "score": 3.25, "abnormal": bool(lesions), "priority": 2 if lesions else 4,
        "log_posterior": -4.5, "log_p_normal": -12345.75, "percentile": 97.5,
        "abnormal_cm3": None if study.kind == "cxr" else float(sum(le.size for le in lesions)),
        "lesions": lesion_dicts, "map": values, "threshold": threshold,
        "slice_order": list(s.sop_instance_uids), "predecessor": None,
    }
    fields.update(changes)
    return ReportInput(**fields)


def dciodvfy(path: Path) -> tuple[list[str], list[str], str]:
    """Error lines, warning lines and the whole report of dciodvfy on ``path``."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy not found on PATH: install dicom3tools (apt-get install dicom3tools)")
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120, check=False)
    report = res.stdout + res.stderr
    lines = report.splitlines()
    return ([ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")],
            report)


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_valid(ds: Dataset, path: Path, iod: str) -> None:
    """Written to ``path``, ``ds`` passes dciodvfy as ``iod`` without errors (warnings allowed)."""
    errors, _warnings, report = dciodvfy(write(ds, path))
    assert not errors, f"dciodvfy on {path.name}:\n{report}"
    assert iod in report, report


def measurement(group: Any, code: Any) -> float:
    (m,) = group.get_measurements(name=code)
    return float(m.value)


def evaluation(group: Any, code: Any) -> Any:
    (q,) = group.get_qualitative_evaluations(name=code)
    return q.value


def source_of_frames(seg: Dataset) -> list[str]:
    return [str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for f in seg.PerFrameFunctionalGroupsSequence]


# --------------------------------------------------------------------------- the main path


@pytest.mark.parametrize("kind", ["cxr", "bct", "chestct"])
def test_reports_are_valid_and_read_back(kind: str, studies: dict[str, Study], tmp_path: Path) -> None:
    study = studies[kind]
    source = study.datasets()
    inp = report_input(study)
    assert len(inp.lesions) == 1, "the synthetic map must make exactly one component"
    out = build_reports(source, inp, software_version="0.1.0")
    assert out.notes == []
    assert [s.SegmentationType for s in out.segs] == ["FRACTIONAL", "BINARY"]

    sr_path = tmp_path / "sr.dcm"
    assert_valid(out.sr, sr_path, "Comprehensive3DSR")
    for i, seg in enumerate(out.segs):
        assert_valid(seg, tmp_path / f"seg{i}.dcm", "Segmentation")

    study_uid = str(source[0].StudyInstanceUID)
    source_uids = {str(ds.SOPInstanceUID) for ds in source}
    fractional_path, binary_path = tmp_path / "seg0.dcm", tmp_path / "seg1.dcm"

    # ---- SR
    sr = hd.sr.srread(sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == study_uid
    assert sr.SeriesInstanceUID == output_uid(42, 1, "sr-series") != source[0].SeriesInstanceUID
    assert sr.SOPInstanceUID == output_uid(42, 1, "sr")
    assert int(sr.SeriesNumber) == SR_SERIES_NUMBER
    assert sr.Modality == "SR" and sr.Manufacturer == MANUFACTURER
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.PatientID == source[0].PatientID
    evidence = sr.get_evidence()
    referenced = [e[2] for e in evidence]
    assert len([u for u in referenced if u in source_uids]) == len(source) == len(study.files)
    assert set(referenced) == source_uids | {out.segs[0].SOPInstanceUID, out.segs[1].SOPInstanceUID}
    assert all(e[0] == study_uid for e in evidence)

    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    procedure = report[0].ContentSequence
    assert any(getattr(item, "name", None) == codes.DCM.ProcedureReported and item.value == PROCEDURES[kind]
               for item in procedure)
    (observer,) = report.get_observer_contexts(observer_type=codes.cid270.Device)
    attrs = observer.observer_identifying_attributes
    assert attrs.uid == device_uid(inp.bundle_name, inp.bundle_version, FINGERPRINT)
    assert attrs.name == inp.bundle_name and attrs.manufacturer_name == MANUFACTURER

    (group,) = report.get_image_measurement_groups()
    assert measurement(group, codes.SCT.Score) == pytest.approx(3.25)
    assert measurement(group, CODES["log_posterior"]) == pytest.approx(-4.5)
    assert measurement(group, CODES["log_p_normal"]) == pytest.approx(-12345.75)
    assert measurement(group, CODES["percentile"]) == pytest.approx(97.5)
    if kind == "cxr":
        assert group.get_measurements(name=CODES["abnormal_cm3"]) == []
    else:
        assert measurement(group, CODES["abnormal_cm3"]) == pytest.approx(inp.abnormal_cm3, rel=1e-6)
        assert measurement(group, CODES["lesion_count"]) == 1
    assert evaluation(group, codes.SCT.HasInterpretation) == codes.SCT.Abnormal
    assert evaluation(group, codes.SCT.Priority) == CODES["priority_2"]
    names = [i.value for i in group[0].ContentSequence if getattr(i, "name", None) == codes.DCM.AlgorithmName]
    assert names == [inp.bundle_name]

    (roi,) = report.get_volumetric_roi_measurement_groups()
    lesion = inp.lesions[0]
    assert roi.reference_type == codes.DCM.ReferencedSegment
    assert roi.referenced_segment.referenced_sop_instance_uid == out.segs[1].SOPInstanceUID
    assert roi.referenced_segment.referenced_segment_numbers == [1]
    assert str(roi.tracking_uid) == tracking_uid(42, 1, 0)
    if kind == "cxr":
        assert measurement(roi, codes.SCT.Area) == pytest.approx(lesion["volume_cm3"], rel=1e-6)
        row, col = lesion["centroid_index"]
        assert measurement(roi, CODES["centroid_row"]) == pytest.approx(row, abs=1e-6)
        assert measurement(roi, CODES["centroid_column"]) == pytest.approx(col, abs=1e-6)
    else:
        volume = pydicom.sr.coding.Code("118565006", "SCT", "Volume")
        assert measurement(roi, volume) == pytest.approx(lesion["volume_cm3"], rel=1e-6)
        for axis, v in zip("xyz", lesion["centroid_mm"], strict=True):
            assert measurement(roi, CODES[f"centroid_{axis}"]) == pytest.approx(v, abs=1e-3)
    assert measurement(roi, CODES["peak"]) == pytest.approx(lesion["peak"], rel=1e-5)

    # ---- IHE AIR contributing equipment, on every object
    for ds in (out.sr, *out.segs):
        items = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == MANUFACTURER]
        assert len(items) == 1
        (item,) = items
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        assert item.ManufacturerModelName == inp.bundle_name
        assert item.SoftwareVersions == inp.bundle_version
        assert item.DeviceUID == device_uid(inp.bundle_name, inp.bundle_version, FINGERPRINT)

    # ---- SEGs
    n_frames = len(study.files) if kind != "cxr" else 1
    order = inp.slice_order
    values = np.asarray(inp.map)
    expected_mask = np.nan_to_num(values, nan=-np.inf) >= THRESHOLD
    expected_frac, _, _ = normalise_map(values)
    for path, label, seg_type, uid_kind, number in (
            (fractional_path, FRACTIONAL_SEGMENT_LABEL, "FRACTIONAL", "seg-fractional", 1),
            (binary_path, BINARY_SEGMENT_LABEL, "BINARY", "seg-binary", 2)):
        seg = hd.seg.segread(path)
        assert seg.SegmentationType == seg_type
        assert seg.SOPInstanceUID == output_uid(42, 1, uid_kind)
        assert seg.SeriesInstanceUID == output_uid(42, 1, "seg-series")
        assert int(seg.SeriesNumber) == SEG_SERIES_NUMBER and int(seg.InstanceNumber) == number
        assert seg.StudyInstanceUID == study_uid and seg.Manufacturer == MANUFACTURER
        assert seg.get_segment_numbers() == [1]
        desc = seg.get_segment_description(1)
        assert desc.segment_label == label
        assert desc.algorithm_identification[0].AlgorithmName == inp.bundle_name
        assert desc.algorithm_identification[0].AlgorithmVersion == inp.bundle_version
        assert int(seg.NumberOfFrames) == n_frames  # omit_empty_frames=False
        frames = source_of_frames(seg)
        assert sorted(frames) == sorted(order)  # one frame per source instance
        if kind != "cxr":  # each frame sits where its source instance does
            position = {str(ds.SOPInstanceUID): [float(v) for v in ds.ImagePositionPatient] for ds in source}
            for item, uid in zip(seg.PerFrameFunctionalGroupsSequence, frames, strict=True):
                got_ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
                assert got_ipp == pytest.approx(position[uid], abs=1e-3)
        if seg_type == "BINARY":  # frame of source instance slice_order[k] = map slice k (raw pixels)
            raw = pydicom.dcmread(path).pixel_array.reshape(n_frames, *values.shape[-2:])
            for i, uid in enumerate(frames):
                k = order.index(uid)
                want_k = expected_mask[k] if kind != "cxr" else expected_mask
                np.testing.assert_array_equal(raw[i].astype(bool), want_k)
        pixels = seg.get_pixels_by_source_instance(order, segment_numbers=[1], rescale_fractional=True)
        pixels = pixels[..., 0]
        assert pixels.shape == (n_frames, int(source[0].Rows), int(source[0].Columns))
        if seg_type == "BINARY":
            want = expected_mask if kind != "cxr" else expected_mask[None]
            np.testing.assert_array_equal(pixels.astype(bool), want)
            centre = _blob_centre(values.shape)
            assert pixels[centre if kind != "cxr" else (0, *centre)] == 1
        else:
            want = expected_frac if kind != "cxr" else expected_frac[None]
            got = pixels.astype(np.float64)  # rescaled from 0..MAX_FRACTIONAL_VALUE to [0, 1]
            assert float(np.abs(got - want).max()) <= 0.5 / MAX_FRACTIONAL_VALUE + 1e-6
            assert float(got[..., :2].max()) == 0.0  # NaN -> 0
    if kind == "cxr":
        seg = pydicom.dcmread(binary_path)
        assert list(seg.PatientOrientation) == list(source[0].PatientOrientation)


# --------------------------------------------------------------------------- identity and versions


def test_uids_are_deterministic_and_versioned(studies: dict[str, Study]) -> None:
    study = studies["bct"]
    a = build_reports(study.datasets(), report_input(study), software_version="0.1.0")
    b = build_reports(study.datasets(shuffle=False), report_input(study), software_version="0.2.0")
    assert a.sr.SOPInstanceUID == b.sr.SOPInstanceUID
    assert [s.SOPInstanceUID for s in a.segs] == [s.SOPInstanceUID for s in b.segs]
    assert a.sr.SeriesInstanceUID == b.sr.SeriesInstanceUID
    pred = (str(a.sr.SOPClassUID), str(a.sr.SOPInstanceUID), str(a.sr.SeriesInstanceUID))
    c = build_reports(study.datasets(), report_input(study, version=2, predecessor=pred),
                      software_version="0.1.0")
    old = {a.sr.SOPInstanceUID, a.sr.SeriesInstanceUID, *(s.SOPInstanceUID for s in a.segs),
           a.segs[0].SeriesInstanceUID}
    new = {c.sr.SOPInstanceUID, c.sr.SeriesInstanceUID, *(s.SOPInstanceUID for s in c.segs),
           c.segs[0].SeriesInstanceUID}
    assert not old & new
    assert "PredecessorDocumentsSequence" not in a.sr
    (study_item,) = c.sr.PredecessorDocumentsSequence
    assert study_item.StudyInstanceUID == a.sr.StudyInstanceUID
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == a.sr.SeriesInstanceUID
    (sop_item,) = series_item.ReferencedSOPSequence
    assert (sop_item.ReferencedSOPClassUID, sop_item.ReferencedSOPInstanceUID) == pred[:2]
    assert c.sr.SeriesDescription.endswith("v2")
    # the same study, always
    assert c.sr.StudyInstanceUID == c.segs[0].StudyInstanceUID == study.series.study_instance_uid


def test_predecessor_sr_is_valid(studies: dict[str, Study], tmp_path: Path) -> None:
    study = studies["cxr"]
    pred = ("1.2.840.10008.5.1.4.1.1.88.34", output_uid(42, 1, "sr"), output_uid(42, 1, "sr-series"))
    out = build_reports(study.datasets(), report_input(study, version=2, predecessor=pred),
                        software_version="0.1.0")
    assert_valid(out.sr, tmp_path / "sr.dcm", "Comprehensive3DSR")
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    assert sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == pred[1]


def test_output_uid() -> None:
    seen = set()
    for result_id in (0, 1, 2**62):
        for version in (1, 2, 1000):
            for what in sorted(OUTPUTS):
                uid = output_uid(result_id, version, what)
                assert uid == output_uid(result_id, version, what)
                assert UID_RE.match(uid) and len(uid) <= 64
                seen.add(uid)
    assert len(seen) == 3 * 3 * len(OUTPUTS)
    for bad in (("sc",), ("",)):
        with pytest.raises(ValueError, match="what"):
            output_uid(1, 1, *bad)
    with pytest.raises(ValueError, match="version"):
        output_uid(1, 0, "sr")
    with pytest.raises(ValueError, match="result_id"):
        output_uid(-1, 1, "sr")
    with pytest.raises(ValueError, match="result_id"):
        output_uid(True, 1, "sr")  # type: ignore[arg-type]
    base = device_uid("b", "1", FINGERPRINT)
    assert base == device_uid("b", "1", FINGERPRINT.upper())
    assert len({base, device_uid("b", "1", "f" * 64), device_uid("b", "2", FINGERPRINT),
                device_uid("c", "1", FINGERPRINT), device_uid("b1", "", FINGERPRINT)}) == 5
    assert tracking_uid(1, 1, 0) != tracking_uid(1, 1, 1) != tracking_uid(1, 2, 1)


# --------------------------------------------------------------------------- bad cases


def test_anonymised_source_still_works(studies: dict[str, Study], tmp_path: Path) -> None:
    for kind in ("chestct", "cxr"):
        study = studies[kind]
        source = study.datasets()
        for ds in source:
            for name in ANONYMISED:
                if name in ds:
                    delattr(ds, name)
        out = build_reports(source, report_input(study), software_version="0.1.0")
        assert all(name not in source[0] for name in ANONYMISED)  # the caller's data sets are untouched
        assert len(out.segs) == 2
        assert_valid(out.sr, tmp_path / f"{kind}-sr.dcm", "Comprehensive3DSR")
        for i, seg in enumerate(out.segs):
            assert_valid(seg, tmp_path / f"{kind}-seg{i}.dcm", "Segmentation")
        sr = hd.sr.srread(tmp_path / f"{kind}-sr.dcm")
        assert sr.PatientID in ("", None) and sr.StudyInstanceUID == study.series.study_instance_uid
        seg = hd.seg.segread(tmp_path / f"{kind}-seg1.dcm")
        assert seg.get_pixels_by_source_instance(report_input(study).slice_order, segment_numbers=[1]).any()


def test_no_lesion_leaves_the_binary_seg_out(studies: dict[str, Study], tmp_path: Path) -> None:
    study = studies["chestct"]
    values = synthetic_map(tuple(study.series.array.shape), blob=False)
    inp = report_input(study, values=values)
    assert inp.lesions == [] and not inp.abnormal
    out = build_reports(study.datasets(), inp, software_version="0.1.0")
    assert [s.SegmentationType for s in out.segs] == ["FRACTIONAL"]
    assert any("no binary SEG" in n and "threshold" in n for n in out.notes)
    assert_valid(out.sr, tmp_path / "sr.dcm", "Comprehensive3DSR")
    assert_valid(out.segs[0], tmp_path / "seg.dcm", "Segmentation")
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    assert report.get_volumetric_roi_measurement_groups() == []
    (group,) = report.get_image_measurement_groups()
    assert evaluation(group, codes.SCT.HasInterpretation) == codes.SCT.Normal
    assert evaluation(group, codes.SCT.Priority) == CODES["priority_4"]
    assert measurement(group, CODES["lesion_count"]) == 0
    # no threshold at all: no binary SEG either, said so
    out = build_reports(study.datasets(), report_input(study, threshold=None), software_version="0.1.0")
    assert len(out.segs) == 1 and any("no threshold" in n for n in out.notes)
    # no map: no SEG, the SR still reports (lesions without a segment reference)
    out = build_reports(study.datasets(), report_input(study, map=None), software_version="0.1.0")
    assert out.segs == [] and any("no map" in n for n in out.notes)
    write(out.sr, tmp_path / "sr-nomap.dcm")
    assert not dciodvfy(tmp_path / "sr-nomap.dcm")[0]


def test_missing_frame_of_reference_skips_the_segs(studies: dict[str, Study], tmp_path: Path) -> None:
    study = studies["bct"]
    source = study.datasets()
    for ds in source:
        del ds.FrameOfReferenceUID
    inp = report_input(study)
    assert len(inp.lesions) == 1
    out = build_reports(source, inp, software_version="0.1.0")
    assert out.segs == []
    assert any("FrameOfReferenceUID" in n for n in out.notes)
    assert_valid(out.sr, tmp_path / "sr.dcm", "Comprehensive3DSR")
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    assert report.get_volumetric_roi_measurement_groups() == []
    groups = report.get_image_measurement_groups()
    assert len(groups) == 2  # the series, and the lesion without a segment reference
    lesion_group = next(g for g in groups if str(g.tracking_uid) == tracking_uid(42, 1, 0))
    volume = pydicom.sr.coding.Code("118565006", "SCT", "Volume")
    assert measurement(lesion_group, volume) == pytest.approx(inp.lesions[0]["volume_cm3"], rel=1e-6)
    assert len(hd.sr.srread(tmp_path / "sr.dcm").get_evidence()) == len(source)


def test_radiograph_needs_no_frame_of_reference(studies: dict[str, Study]) -> None:
    study = studies["cxr"]
    source = study.datasets()
    assert "FrameOfReferenceUID" not in source[0]
    out = build_reports(source, report_input(study), software_version="0.1.0")
    assert len(out.segs) == 2


def test_inconsistent_input_is_refused(studies: dict[str, Study]) -> None:
    study = studies["bct"]
    source = study.datasets()
    with pytest.raises(ReportError, match="map shape"):
        build_reports(source, report_input(study, map=np.zeros((3, 4, 5), np.float32)), software_version="1")
    with pytest.raises(ReportError, match="slice_order"):
        build_reports(source[1:], report_input(study), software_version="1")
    with pytest.raises(ReportError, match="kind"):
        build_reports(source, report_input(study, kind="mr"), software_version="1")
    with pytest.raises(ReportError, match="priority"):
        build_reports(source, report_input(study, priority=7), software_version="1")
    with pytest.raises(ReportError, match="no source"):
        build_reports([], report_input(study), software_version="1")
    other = studies["chestct"].datasets()[:1]
    with pytest.raises(ReportError, match="one series"):
        build_reports([*source, *other], report_input(study), software_version="1")
    with pytest.raises(ReportError, match="more than once"):
        build_reports([*source, source[0]], report_input(study), software_version="1")


def test_late_instances_are_left_out(studies: dict[str, Study]) -> None:
    """An image that arrived after the analysis is not in slice_order: not reported, noted."""
    study = studies["bct"]
    source = study.datasets()
    late = study.datasets()[0]
    late.SOPInstanceUID = output_uid(999, 1, "sr")  # any UID the series does not hold yet
    out = build_reports([*source, late], report_input(study), software_version="1")
    assert any("not in slice_order" in n for n in out.notes)
    evidence = {str(i.ReferencedSOPInstanceUID) for s in out.sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert str(late.SOPInstanceUID) not in evidence
    assert int(out.segs[0].NumberOfFrames) == len(source)


def test_non_finite_measurements_are_left_out(studies: dict[str, Study], tmp_path: Path) -> None:
    study = studies["cxr"]
    inp = report_input(study, log_posterior=float("nan"), percentile=None, log_p_normal=float("inf"))
    out = build_reports(study.datasets(), inp, software_version="0.1.0")
    assert any("log_posterior" in n for n in out.notes) and any("log_p_normal" in n for n in out.notes)
    write(out.sr, tmp_path / "sr.dcm")
    (group,) = hd.sr.srread(tmp_path / "sr.dcm").content.get_image_measurement_groups()
    assert group.get_measurements(name=CODES["log_posterior"]) == []
    assert group.get_measurements(name=CODES["percentile"]) == []
    assert measurement(group, codes.SCT.Score) == pytest.approx(3.25)


def test_many_lesions_are_capped(studies: dict[str, Study], tmp_path: Path) -> None:
    study = studies["cxr"]
    base = report_input(study)
    lesions = [{**base.lesions[0], "volume_cm3": float(i + 1)} for i in range(MAX_LESIONS + 7)]
    out = build_reports(study.datasets(), report_input(study, lesions=lesions), software_version="0.1.0")
    assert any(f"7 of {MAX_LESIONS + 7} lesions left out" in n for n in out.notes)
    write(out.sr, tmp_path / "sr.dcm")
    groups = hd.sr.srread(tmp_path / "sr.dcm").content.get_volumetric_roi_measurement_groups()
    assert len(groups) == MAX_LESIONS
    areas = sorted(measurement(g, codes.SCT.Area) for g in groups)
    assert areas == [float(i + 1) for i in range(7, MAX_LESIONS + 7)]  # the largest are kept


def test_normalise_map() -> None:
    values = np.array([[np.nan, 0.0, 1.0], [2.0, 3.0, 100.0]], dtype=np.float32)
    norm, lo, _hi = normalise_map(values)
    assert norm.dtype == np.float32 and norm.shape == values.shape
    assert norm[0, 0] == 0.0 and norm.min() >= 0.0 and norm.max() <= 1.0
    assert lo == pytest.approx(np.percentile([0, 1, 2, 3, 100], 50.0))
    assert norm[1, 2] == 1.0 and norm[0, 1] == 0.0
    flat, _, _ = normalise_map(np.full((4, 4), 7.0, np.float32))
    assert not flat.any()
    empty, _, _ = normalise_map(np.full((4, 4), np.nan, np.float32))
    assert not empty.any()


@pytest.mark.parametrize("kind", ["cxr", "chestct"])
def test_key_images_are_valid_secondary_captures(kind: str, studies: dict[str, Study],
                                                 tmp_path: Path) -> None:
    study = studies[kind]
    inp = report_input(study)
    objs = build_reports(study.datasets(), inp, software_version="9.9", key_images=True)
    assert 1 <= len(objs.key_images) <= 4
    again = build_reports(study.datasets(), inp, software_version="9.9", key_images=True)
    uids = [str(d.SOPInstanceUID) for d in objs.key_images]
    assert [str(d.SOPInstanceUID) for d in again.key_images] == uids
    for i, sc in enumerate(objs.key_images):
        assert_valid(sc, tmp_path / f"sc{i}.dcm", "SC")
        assert sc.StudyInstanceUID == study.series.study_instance_uid
        assert sc.PhotometricInterpretation == "RGB" and sc.Manufacturer == "triage-node"
        rgb = pydicom.dcmread(tmp_path / f"sc{i}.dcm").pixel_array
        assert rgb.shape[-1] == 3 and rgb.shape[:2] == study.series.array.shape[-2:]
    if kind == "chestct":  # the slice through the lesion's centroid is among them
        k = round(inp.lesions[0]["centroid_index"][0])
        assert str(study.series.sop_instance_uids[k]) in {
            str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in objs.key_images}
    assert build_reports(study.datasets(), inp, software_version="9.9").key_images == []


def test_output_uids_differ_between_installations() -> None:
    from triage.report.uids import output_uid

    a = output_uid(1, 1, "sr", "a" * 32)
    assert a == output_uid(1, 1, "sr", "a" * 32) != output_uid(1, 1, "sr", "b" * 32)
    assert output_uid(1, 1, "sr", "a" * 32) != output_uid(1, 1, "sr")


def test_key_image_orientation_from_image_orientation() -> None:
    from pydicom.dataset import Dataset

    from triage.report.sc import _orientation

    def ds(iop: list[float]) -> Dataset:
        d = Dataset()
        d.ImageOrientationPatient = iop
        return d

    assert _orientation(ds([1, 0, 0, 0, 1, 0])) == ("L", "P")  # axial
    assert _orientation(ds([1, 0, 0, 0, 0, -1])) == ("L", "F")  # coronal
    assert _orientation(ds([0, 1, 0, 0, 0, -1])) == ("P", "F")  # sagittal
    assert _orientation(Dataset()) is None
