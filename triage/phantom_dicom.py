"""Write a phantom set (``flows.phantoms``) as DICOM studies a real PACS accepts.

One study per case, one series per study, under ``out_dir/<case:05d>/``:

* chest radiographs (``meta["kind"] == "cxr"``): one Digital X-Ray Image - For
  Presentation instance, 12 bits stored in 16, display intensity [0, 1] -> 0..4095,
  MONOCHROME2 (higher = denser = whiter);
* head CT (``meta["kind"] == "bct"``): one CT Image instance per axial slice, Hounsfield
  units stored as signed 16-bit values with RescaleIntercept -1024, RescaleSlope 1.

``out_dir/labels.csv`` lists, per case, the study and series UIDs, the label, the finding
and the zero fraction, so that evaluations on what a PACS sends back can be scored.

Every output is a pure function of the inputs: UIDs are name-based (ISO/IEC 9834-8
``2.25.`` UUIDs derived from the seed, the case, the instance and a digest of the stored
pixels), dates come from the case number, so writing the same set twice gives identical
bytes, and a PACS sees a resend as the same instances. File names come from case and
instance numbers only, never from UIDs.

Array orientation conventions (the phantom generators follow them):

* CXR ``(H, W)``: as a PA film is displayed - rows run towards the patient's left, columns
  towards the feet (Patient Orientation ``L\\F``).
* head CT ``(D, H, W)``: slice 0 is the most inferior; within a slice rows run anterior to
  posterior and columns from the patient's right to left (standard axial display; Image
  Orientation (Patient) ``1\\0\\0\\0\\1\\0`` in LPS), slices step towards the head.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import logging
import math
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

__all__ = [
    "CT_IMAGE_STORAGE",
    "DX_FOR_PRESENTATION_STORAGE",
    "PhantomLike",
    "phantom_uid",
    "write_dicom_studies",
]

log = logging.getLogger(__name__)

DX_FOR_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")

_UID_NAMESPACE = uuid.UUID("6c1f3b0e-5d2a-5b7e-9c47-2f0d8e1a4b93")
"""Namespace of the name-based UUIDs behind every phantom UID (fixed forever: changing it
changes every UID and a PACS would see all phantoms as new instances)."""

_UID_VERSION = "triage-phantom-dicom-v1"
_CXR_BITS = 12
_CT_INTERCEPT = -1024.0
_BASE_DATE = dt.date(2024, 1, 1)
_CASE_FOLDER = re.compile(r"^\d{5,}$")
_CASE_FILE = re.compile(r"^\d{5,}-\d{5}\.dcm(\.tmp)?$")
_MAX_CASES = 10**7  # AccessionNumber (SH, 16 chars) carries 7 digits of case number


class PhantomLike(Protocol):
    """What the writer needs of a ``flows.phantoms.PhantomSet`` (duck typing is enough)."""

    images: np.ndarray
    labels: np.ndarray
    findings: list[str]
    zero_fraction: np.ndarray
    spacing: tuple[float, ...]
    meta: dict[str, Any]


def phantom_uid(*parts: object) -> UID:
    """A deterministic ``2.25.`` UID (a name-based UUID of ``parts``).

    ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` would ignore the entropy and
    return a random UUID, and with a prefix it joins the sources without a separator
    (``["1", "23"]`` == ``["12", "3"]``); hence this.
    """
    name = "\x1f".join([_UID_VERSION, *(str(p) for p in parts)])
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


# --------------------------------------------------------------------------- validation


def _check_inputs(ps: PhantomLike, seed: int, institution: str) -> tuple[str, np.ndarray, int]:
    """Validate ``ps``; returns the kind, the images without channel axis and N."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(institution, str) or len(institution) > 64 or "\\" in institution:
        raise ValueError("institution must be a string of at most 64 characters without '\\'")
    for attr in ("images", "labels", "findings", "zero_fraction", "spacing", "meta"):
        if not hasattr(ps, attr):
            raise TypeError(f"write_dicom_studies needs a PhantomSet-like object; missing .{attr}")
    meta = ps.meta if isinstance(ps.meta, dict) else {}
    kind = meta.get("kind")
    if kind not in ("cxr", "bct", "chestct"):
        raise ValueError(f"ps.meta['kind'] must be 'cxr', 'bct' or 'chestct', got {kind!r}")
    images = np.asarray(ps.images)
    spatial = 2 if kind == "cxr" else 3
    if images.ndim == spatial + 2 and images.shape[1] == 1:
        images = images[:, 0]
    elif images.ndim != spatial + 1:
        want = "(N, 1, H, W)" if kind == "cxr" else "(N, 1, D, H, W)"
        raise ValueError(f"{kind}: images must be shaped {want}, got {images.shape}")
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("the phantom set is empty")
    if n > _MAX_CASES:
        raise ValueError(f"at most {_MAX_CASES} cases per set, got {n}")
    if min(images.shape[1:]) < 1 or max(images.shape[-2:]) > 65535:
        raise ValueError(f"{kind}: image size {images.shape[1:]} is not storable in DICOM")
    if not np.issubdtype(images.dtype, np.number):
        raise ValueError(f"images must be numeric, got dtype {images.dtype}")
    if not np.isfinite(images).all():
        raise ValueError(f"images hold {int((~np.isfinite(images)).sum())} NaN/inf value(s)")
    if len(ps.labels) != n or len(ps.findings) != n or len(ps.zero_fraction) != n:
        raise ValueError(f"labels, findings and zero_fraction must each have {n} entries "
                         f"(got {len(ps.labels)}, {len(ps.findings)}, {len(ps.zero_fraction)})")
    spacing = tuple(ps.spacing)
    if len(spacing) != spatial:
        raise ValueError(f"{kind}: spacing must have {spatial} values (mm), got {spacing}")
    if not all(isinstance(s, int | float | np.number) and math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be finite and positive (mm), got {spacing}")
    child = meta.get("child")
    if child is not None and len(np.atleast_1d(child)) != n:
        raise ValueError(f"meta['child'] must have {n} entries, got {len(np.atleast_1d(child))}")
    return kind, images, n


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir``, or clear the output of an earlier run in it.

    Stale slices from an earlier, larger run would otherwise sit beside the new series
    and show up as extra series; anything that is not ours is left alone and refused.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list(out_dir.iterdir())
    if not entries:
        return
    foreign = [e.name for e in entries
               if not (e.name in ("labels.csv", "labels.csv.tmp") and e.is_file())
               and not (_CASE_FOLDER.match(e.name) and e.is_dir())]
    for e in entries:
        if e.is_dir() and _CASE_FOLDER.match(e.name):
            foreign += [f"{e.name}/{f.name}" for f in e.iterdir()
                        if not (f.is_file() and _CASE_FILE.match(f.name))]
    if foreign:
        shown = ", ".join(sorted(foreign)[:5])
        raise FileExistsError(f"{out_dir} is not empty and is not an earlier phantom DICOM output "
                              f"({shown}); choose an empty or new folder")
    for e in entries:
        if e.is_dir():
            for f in e.iterdir():
                f.unlink()
            e.rmdir()
        else:
            e.unlink()


# --------------------------------------------------------------------------- datasets


def _ds_str(x: float) -> str:
    """A DS value (at most 16 characters) that round-trips ``x`` as well as DS allows."""
    for digits in range(12, 0, -1):
        s = f"{x:.{digits}g}"
        if len(s) <= 16:
            return s
    raise ValueError(f"cannot encode {x} as DS")


def _common(kind: str, case: int, seed: int, institution: str, study_uid: UID, series_uid: UID,
            when: dt.datetime) -> Dataset:
    """Patient, General Study, General Series, General Equipment and SOP Common content."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    # Patient (synthetic identities; Type 2 attributes present, empty where unknown)
    ds.PatientName = f"PHANTOM^{case:05d}"
    ds.PatientID = f"PHANTOM-{kind.upper()}-{seed}-{case:05d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"PH{case:05d}"
    ds.AccessionNumber = f"{'X' if kind == 'cxr' else 'C'}{seed % 10**6:06d}{case:07d}"
    ds.StudyDescription = {"cxr": "XR CHEST", "bct": "CT HEAD WITHOUT CONTRAST",
                           "chestct": "CT CHEST WITHOUT CONTRAST"}[kind]
    # General Series
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = date
    ds.SeriesTime = time
    # General Equipment
    ds.Manufacturer = "triage-node synthetic phantom"
    ds.InstitutionName = institution
    ds.ManufacturerModelName = f"flows.phantoms {kind}"
    ds.SoftwareVersions = _UID_VERSION
    # General Image / SOP Common dates
    ds.ContentDate = date
    ds.ContentTime = time
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds


def _file_meta(sop_class: UID, sop_instance: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _cxr_dataset(img: np.ndarray, spacing: Sequence[float], base: Dataset, *, child: bool,
                 sop_uid: UID, when: dt.datetime) -> Dataset:
    """Digital X-Ray Image Storage - For Presentation (DX IOD, PS3.3 A.26)."""
    ds = base
    ds.SOPClassUID = DX_FOR_PRESENTATION_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "DX"
    ds.SeriesDescription = "Chest AP" if child else "Chest PA"
    # DX Series
    ds.PresentationIntentType = "FOR PRESENTATION"
    # General Image / DX Image
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.CalibrationImage = "NO"
    # DX Anatomy Imaged
    ds.BodyPartExamined = "CHEST"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([_code("51185008", "SCT", "Chest")])
    # DX Positioning
    ds.ViewPosition = "AP" if child else "PA"
    ds.ViewCodeSequence = DicomSequence(
        [_code("399348003", "SCT", "antero-posterior") if child
         else _code("399260004", "SCT", "postero-anterior")])
    ds.PatientOrientationCodeSequence = DicomSequence([_code("10904000", "SCT", "orthostatic")])
    ds.PositionerType = "COLUMN"
    ds.DistanceSourceToDetector = "1800" if not child else "1000"
    # DX Detector: the phantom spacing is at the detector and, nominally, in the patient
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorConfiguration = "AREA"
    ds.ImagerPixelSpacing = [_ds_str(float(spacing[0])), _ds_str(float(spacing[1]))]
    ds.PixelSpacing = list(ds.ImagerPixelSpacing)
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "synthetic phantom: nominal spacing"
    ds.EstimatedRadiographicMagnificationFactor = "1"
    # X-Ray Acquisition Dose (nominal)
    ds.KVP = "110" if not child else "80"
    # Acquisition Context (Type 2, empty)
    ds.AcquisitionContextSequence = DicomSequence()
    # VOI LUT: the whole 12-bit range, linear
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.VOILUTFunction = "LINEAR"
    # Image Pixel
    stored = np.rint(np.clip(img.astype(np.float64), 0.0, 1.0) * (2**_CXR_BITS - 1)).astype("<u2")
    _set_pixels(ds, stored, bits_stored=_CXR_BITS, signed=False, photometric="MONOCHROME2")
    return ds


def _ct_dataset(slice_hu: np.ndarray, k: int, n_slices: int, spacing: Sequence[float], base: Dataset, *,
                sop_uid: UID, frame_uid: UID, when: dt.datetime, chest: bool = False) -> Dataset:
    """CT Image Storage (CT IOD, PS3.3 A.3) for slice ``k`` of a head (or chest) CT."""
    ds = base
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.SeriesDescription = "Chest axial" if chest else "Head axial"
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "CHEST" if chest else "HEAD"
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    # General Image / General Acquisition
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = when.strftime("%Y%m%d")
    ds.AcquisitionTime = when.strftime("%H%M%S")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    # Image Plane: centred in-plane, slices stepping towards the head from z = 0 at the centre
    s_slice, s_row, s_col = (float(s) for s in spacing)
    rows, cols = slice_hu.shape
    x0 = -(cols - 1) / 2.0 * s_col
    y0 = -(rows - 1) / 2.0 * s_row
    z = (k - (n_slices - 1) / 2.0) * s_slice
    ds.PixelSpacing = [_ds_str(s_row), _ds_str(s_col)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [_ds_str(x0), _ds_str(y0), _ds_str(z)]
    ds.SliceThickness = _ds_str(s_slice)
    ds.SliceLocation = _ds_str(z)
    # CT Image
    ds.RescaleIntercept = _ds_str(_CT_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = "120"
    ds.DataCollectionDiameter = _ds_str(max(rows * s_row, cols * s_col))
    ds.ReconstructionDiameter = ds.DataCollectionDiameter
    ds.ConvolutionKernel = "STANDARD"
    ds.GantryDetectorTilt = "0"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "1000"
    ds.XRayTubeCurrent = "250"
    # VOI LUT: brain window
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    info = np.iinfo(np.int16)
    stored = np.clip(np.rint(slice_hu.astype(np.float64) - _CT_INTERCEPT), info.min, info.max).astype("<i2")
    _set_pixels(ds, stored, bits_stored=16, signed=True, photometric="MONOCHROME2")
    return ds


def _set_pixels(ds: Dataset, stored: np.ndarray, *, bits_stored: int, signed: bool, photometric: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(s) for s in stored.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds["PixelData"].VR = "OW"


def _write(ds: Dataset, path: Path) -> None:
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    tmp = path.with_name(path.name + ".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)


# --------------------------------------------------------------------------- writer


def write_dicom_studies(ps: PhantomLike, out_dir: Path, *, seed: int = 0,
                        institution: str = "Synthetic") -> Path:
    """Write every case of ``ps`` as one DICOM study under ``out_dir``; returns ``labels.csv``.

    Layout: ``out_dir/<case:05d>/<case:05d>-<instance:05d>.dcm`` (CT: one file per slice,
    instance = slice number from 1) and ``out_dir/labels.csv`` with the columns
    ``case,study_instance_uid,series_instance_uid,label,finding,zero_fraction`` (``case`` is
    the folder name). ``out_dir`` must be new, empty, or an earlier output of this function
    (which is then replaced). ``seed`` enters every UID: give different phantom sets
    different seeds so that their patients are told apart too.
    """
    out_dir = Path(out_dir)
    kind, images, n = _check_inputs(ps, seed, institution)
    seed = int(seed)
    _prepare_out_dir(out_dir)
    meta = ps.meta
    child = np.zeros(n, dtype=bool)
    if meta.get("child") is not None:
        child = np.atleast_1d(meta["child"]).astype(bool)
    spacing = tuple(float(s) for s in ps.spacing)
    rows: list[dict[str, str]] = []
    for case in range(n):
        img = images[case]
        # the pixels enter the UIDs, so that different data never reuse a SOP Instance UID
        digest = hashlib.sha256(np.ascontiguousarray(img, dtype="<f4").tobytes()).hexdigest()[:32]
        key = (kind, seed, case, digest, spacing)
        study_uid = phantom_uid(*key, "study")
        series_uid = phantom_uid(*key, "series")
        when = dt.datetime.combine(_BASE_DATE + dt.timedelta(days=case // 48),
                                   dt.time(8, 0)) + dt.timedelta(minutes=10 * (case % 48))
        case_dir = out_dir / f"{case:05d}"
        case_dir.mkdir()
        if kind == "cxr":
            base = _common(kind, case, seed, institution, study_uid, series_uid, when)
            ds = _cxr_dataset(img, spacing, base, child=bool(child[case]),
                              sop_uid=phantom_uid(*key, "instance", 1), when=when)
            _write(ds, case_dir / f"{case:05d}-{1:05d}.dcm")
        else:
            frame_uid = phantom_uid(*key, "frame-of-reference")
            for k in range(img.shape[0]):
                base = _common(kind, case, seed, institution, study_uid, series_uid, when)
                ds = _ct_dataset(img[k], k, img.shape[0], spacing, base,
                                 sop_uid=phantom_uid(*key, "instance", k + 1),
                                 frame_uid=frame_uid, when=when, chest=kind == "chestct")
                _write(ds, case_dir / f"{case:05d}-{k + 1:05d}.dcm")
        rows.append({
            "case": f"{case:05d}",
            "study_instance_uid": str(study_uid),
            "series_instance_uid": str(series_uid),
            "label": str(int(ps.labels[case])),
            "finding": str(ps.findings[case]),
            "zero_fraction": format(float(np.float32(ps.zero_fraction[case])), ".9g"),
        })
    labels = out_dir / "labels.csv"
    tmp = labels.with_name("labels.csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case", "study_instance_uid", "series_instance_uid",
                                                "label", "finding", "zero_fraction"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(labels)
    log.info("wrote %d %s phantom studies to %s", n, kind, out_dir)
    return labels
