"""Synthetic DICOM instances built in memory (Part 10 bytes with file meta), for ingest tests.

Everything is deterministic: UIDs are name-based ``2.25.`` UIDs of the names given, so a
test that builds the same slice twice gets identical bytes.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pydicom
from pydicom import config as dicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

_NS = uuid.UUID("3f7c1d52-0b8e-4d0c-9a51-6b2f1e7a9c10")


def uid(*parts: object) -> str:
    """A deterministic, valid UID (at most 64 characters) named by ``parts``."""
    return f"2.25.{uuid.uuid5(_NS, '/'.join(str(p) for p in parts)).int}"


@contextmanager
def lenient_values() -> Iterator[None]:
    """Let pydicom write values that are invalid for their VR (malformed UIDs on purpose)."""
    s = dicom_config.settings
    old = (s.reading_validation_mode, s.writing_validation_mode)
    s.reading_validation_mode = s.writing_validation_mode = dicom_config.IGNORE
    try:
        yield
    finally:
        s.reading_validation_mode, s.writing_validation_mode = old


def to_bytes(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file (preamble, file meta, explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(ds.get("SOPClassUID") or CT_IMAGE))
    meta.MediaStorageSOPInstanceUID = UID(str(ds.get("SOPInstanceUID") or "1.2.3"))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    ds.file_meta = meta
    buf = io.BytesIO()
    with lenient_values():
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _pixels(rows: int, cols: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()


def _image_pixel_module(ds: Dataset, rows: int, cols: int, pixel_data: bytes | None, seed: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if pixel_data is not None:
        ds.PixelData = pixel_data
    elif rows * cols <= 4096:
        ds.PixelData = _pixels(rows, cols, seed)
    else:
        raise ValueError("give pixel_data explicitly for large headers")


def ct_slice(series: str, index: int, *, z: float | None = None, spacing: float = 2.0,
             instance_number: int | None = None, orientation: Sequence[float] = AXIAL,
             position: Sequence[float] | None = None, rows: int = 8, cols: int = 8,
             images_in_acquisition: int | None = None, study: str | None = None,
             study_description: str = "CT CHEST", body_part: str = "CHEST",
             sop_instance_uid: str | None = None, sop_class: str = CT_IMAGE,
             pixel_data: bytes | None = None, with_pixels: bool = True, pixel_seed: int | None = None,
             extra: dict[str, Any] | None = None) -> bytes:
    """Slice ``index`` (0-based) of the CT series named ``series``.

    By default it lies at z = index * spacing with InstanceNumber index + 1.
    """
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid or uid(series, "slice", index)
    ds.StudyInstanceUID = study or uid(series, "study")
    ds.SeriesInstanceUID = uid(series)
    ds.PatientID = "SYNTH-1"
    ds.PatientName = "SYNTH^ONE"
    ds.AccessionNumber = "A1"
    ds.StudyDate = "20240301"
    ds.Modality = "CT"
    ds.StudyDescription = study_description
    ds.BodyPartExamined = body_part
    ds.SeriesNumber = 2
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = index + 1 if instance_number is None else instance_number
    pos = list(position) if position is not None else [-4.0, -4.0, index * spacing if z is None else z]
    ds.ImagePositionPatient = [f"{v:g}" for v in pos]
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.PixelSpacing = ["1", "1"]
    ds.SliceThickness = f"{spacing:g}"
    if images_in_acquisition is not None:
        ds.ImagesInAcquisition = images_in_acquisition
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    if with_pixels:
        _image_pixel_module(ds, rows, cols, pixel_data, index if pixel_seed is None else pixel_seed)
    else:
        ds.Rows, ds.Columns = rows, cols
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    return to_bytes(ds)


def ct_series(series: str, n: int = 25, *, skip: Sequence[int] = (), **kw: Any) -> list[bytes]:
    """Slices 0..n-1 of ``series`` except those in ``skip``."""
    return [ct_slice(series, i, **kw) for i in range(n) if i not in skip]


def cr_image(series: str, *, view: str = "PA", body_part: str = "CHEST", modality: str = "CR",
             sop_class: str = CR_IMAGE, rows: int = 8, cols: int = 8) -> bytes:
    """One chest radiograph (a single projection image)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(series, "image")
    ds.StudyInstanceUID = uid(series, "study")
    ds.SeriesInstanceUID = uid(series)
    ds.PatientID = "SYNTH-2"
    ds.Modality = modality
    ds.StudyDescription = "CHEST PA"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    _image_pixel_module(ds, rows, cols, None, 0)
    return to_bytes(ds)
