"""Report: one analysis result -> the DICOM objects that go back to the PACS (highdicom).

:func:`build_reports` turns a :class:`ReportInput` (a stored ``Result`` plus its map) and
the full source datasets of the analysed series into

* an **SR** (:mod:`triage.report.sr`): Comprehensive 3D SR, TID 1500 measurement report;
* up to two **SEGs** (:mod:`triage.report.seg`): the fractional abnormality map and the
  binary abnormal regions, on the source pixel grid;

all in the source study (its Study Instance UID, patient and study attributes copied from
the first source instance), each kind in a new series, Manufacturer
:data:`triage.MANUFACTURER`.

**Identity and versions.** Series and SOP Instance UIDs come from
:func:`triage.report.uids.output_uid` (result id, version, output kind): building the same
version twice gives the same UIDs, so a resend is idempotent at the PACS; a re-analysis is
a new version, i.e. new UIDs in new series, and its SR lists the previous version's SR
(``ReportInput.predecessor``) in the Predecessor Documents Sequence.

**Contributing Equipment** (IHE AI Results): every object carries, besides highdicom's own
item and (when the source names its manufacturer) the source's acquisition equipment, an
item for the algorithm: Purpose of Reference DCM 109102 "Processing Equipment" (the
Contributing Equipment purposes, CID 7005, have no "Processing Algorithm" concept; this is
the closest, and the only processing one highdicom accepts), Manufacturer
:data:`triage.MANUFACTURER`, Manufacturer's Model Name = the bundle name, Software Versions
= the bundle version, Device Serial Number = the first 16 digits of the bundle fingerprint,
Device UID = :func:`triage.report.uids.device_uid` (changes whenever the bundle's name,
version or fingerprint does) and a Contribution Description. (dciodvfy of 2022 does not
know Device UID in this sequence yet and warns about it.)

**Anonymised sources.** highdicom reads the Type 2 patient and study attributes
(PatientName, PatientID, PatientBirthDate, PatientSex, StudyDate, StudyTime, StudyID,
AccessionNumber, ReferringPhysicianName) of the first source; data sets that lack them
(de-identified data) get them *empty* in a private copy of their header (the caller's
data sets are never modified, and pixel data is never copied).

What is left out and why (no map, no threshold, no abnormal voxel, no Frame of Reference,
too many lesions, non-finite values) is listed in ``ReportObjects.notes`` (and logged,
without UIDs or patient identifiers); the rules are in :mod:`triage.report.seg` and
:mod:`triage.report.sr`. Inconsistent input (a map that does not fit the source grid,
sources from several series, a ``slice_order`` naming an instance that is not among the
sources) raises :class:`ReportError`; sources that ``slice_order`` does not name (images
that arrived after the analysis) are left out of the report, with a note.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from triage import MANUFACTURER
from triage.report.seg import build_segmentations, clean_text
from triage.report.sr import build_sr
from triage.report.uids import device_uid, output_uid

__all__ = [
    "KINDS",
    "ReportError",
    "ReportInput",
    "ReportObjects",
    "algorithm_equipment",
    "build_reports",
    "output_uid",
]

log = logging.getLogger(__name__)

KINDS = ("cxr", "bct", "chestct")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Rows", "Columns")
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "StudyID", "AccessionNumber", "ReferringPhysicianName")


class ReportError(ValueError):
    """The input cannot be reported (the message says why; the checks here name no patient
    or UID in it; a highdicom error is passed on with its own message)."""


@dataclass
class ReportInput:
    """What the report needs of a stored result (``storage.models.Result``) and its map."""

    result_id: int
    version: int  # Result.version: 1, 2, ...
    kind: str  # "cxr" | "bct" | "chestct"
    bundle_name: str
    bundle_version: str
    bundle_fingerprint: str  # hex sha256: the device UID changes with it
    method: str
    score: float
    abnormal: bool
    priority: int  # 1 (urgent) .. 4 (routine), triage.rank.PRIORITY_NAMES
    log_posterior: float | None = None
    log_p_normal: float | None = None
    percentile: float | None = None
    abnormal_cm3: float | None = None
    # each {"volume_cm3", "centroid_mm" [x, y, z patient LPS], "centroid_index", "peak", "bbox"}
    lesions: list[dict[str, Any]] = field(default_factory=list)
    # float32 on the stored pixel grid: (rows, cols) for a radiograph as stored; (slices, rows,
    # cols) for a volume, slice k = the instance slice_order[k]; higher = more abnormal; NaN allowed
    map: np.ndarray | None = None
    threshold: float | None = None  # map >= threshold is "abnormal" (binary SEG); None: no binary SEG
    slice_order: list[str] = field(default_factory=list)  # SOPInstanceUIDs in map order
    # (SOPClassUID, SOPInstanceUID, SeriesInstanceUID) of the previous version's SR
    predecessor: tuple[str, str, str] | None = None
    installation: str = ""  # the node's installation_id: part of every output UID


@dataclass
class ReportObjects:
    sr: Dataset
    segs: list[Dataset]  # fractional first, binary second when present
    notes: list[str]  # why something was left out
    key_images: list[Dataset] = field(default_factory=list)  # Secondary Capture, when asked for


def algorithm_equipment(inp: ReportInput) -> hd.ContributingEquipment:
    """The IHE AIR Contributing Equipment item of the algorithm (see the module docstring)."""
    serial = "".join(c for c in inp.bundle_fingerprint if c.isascii() and c.isalnum())[:16] or "unknown"
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=clean_text(inp.bundle_name),
        software_versions=clean_text(inp.bundle_version),
        device_serial_number=serial,
        contribution_description=clean_text(f"AI triage processing algorithm: {inp.method} ({inp.kind})",
                                            1024),
    )
    item.DeviceUID = device_uid(inp.bundle_name, inp.bundle_version, inp.bundle_fingerprint)
    return item


# --------------------------------------------------------------------------- checks


def _check_input(inp: ReportInput) -> None:
    if inp.kind not in KINDS:
        raise ReportError(f"kind must be one of {KINDS}, got {inp.kind!r}")
    for name in ("bundle_name", "bundle_version", "bundle_fingerprint", "method"):
        if not isinstance(getattr(inp, name), str):
            raise ReportError(f"{name} must be a string")
    output_uid(inp.result_id, inp.version, "sr", inp.installation)  # ValueError for a bad identity
    prio = inp.priority
    if isinstance(prio, bool) or not isinstance(prio, int | np.integer) or not 1 <= prio <= 4:
        raise ReportError(f"priority must be an integer 1..4, got {inp.priority!r}")
    if not isinstance(inp.lesions, list) or not all(isinstance(le, dict) for le in inp.lesions):
        raise ReportError("lesions must be a list of dicts")
    if inp.threshold is not None and not math.isfinite(float(inp.threshold)):
        raise ReportError(f"threshold must be finite, got {inp.threshold!r}")
    if inp.predecessor is not None and (len(inp.predecessor) != 3 or not all(inp.predecessor)):
        raise ReportError("predecessor must be (SOPClassUID, SOPInstanceUID, SeriesInstanceUID)")


def _header(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without pixel data, with the Type 2 attributes highdicom reads."""
    out = Dataset()
    for tag in list(ds.keys()):  # by tag: iterating elements would load deferred pixel data
        if tag in _PIXEL_TAGS:
            continue
        out.add(copy.deepcopy(ds[tag]))
    for name in _TYPE2:
        if name not in out:
            setattr(out, name, None)
    # Text is decoded with the source's character set (pydicom falls back to the default
    # repertoire for an unknown or broken one) and the outputs are written in UTF-8: highdicom
    # would otherwise copy the source's Specific Character Set and refuse, e.g., 'ISO_IR 999'
    # or the standard '\ISO 2022 IR 87' with its empty first value.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unknown character set: pydicom says so, we go on
        out.decode()
    out.SpecificCharacterSet = "ISO_IR 192"
    return out


def _source_headers(source: Sequence[Dataset], inp: ReportInput, notes: list[str]) -> list[Dataset]:
    if not source:
        raise ReportError("no source instances given")
    for i, ds in enumerate(source):
        missing = [k for k in _REQUIRED if not str(ds.get(k, "") or "")]
        if missing:
            raise ReportError(f"source instance {i + 1} of {len(source)} lacks {', '.join(missing)}")
    if len({(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)) for ds in source}) != 1:
        raise ReportError(f"the {len(source)} source instances are not all of one series of one study")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source}
    if len(by_uid) != len(source):
        raise ReportError("the same SOPInstanceUID occurs more than once among the sources")
    order = [str(u) for u in inp.slice_order]
    if not order and len(source) == 1:
        order = list(by_uid)
    if len(set(order)) != len(order):
        raise ReportError("slice_order names an instance more than once")
    unknown = sum(1 for u in order if u not in by_uid)
    if unknown or not order:
        raise ReportError(f"slice_order names {len(order)} instance(s), {unknown} of them not among the "
                          f"{len(by_uid)} source instance(s) given")
    extra = len(by_uid) - len(order)
    if extra:  # e.g. a late image: it was not analysed, so the report does not cover it
        notes.append(f"{extra} source instance(s) not in slice_order (not analysed) left out")
    return [_header(by_uid[u]) for u in order]


def _check_map(headers: Sequence[Dataset], inp: ReportInput) -> None:
    if inp.map is None:
        return
    values = np.asarray(inp.map)
    if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype, np.integer):
        raise ReportError(f"map must be numeric, got dtype {values.dtype}")
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    if any((int(h.Rows), int(h.Columns)) != (rows, cols) for h in headers):
        raise ReportError("the source instances differ in Rows/Columns")
    if inp.kind == "cxr":
        if len(headers) != 1:
            raise ReportError(f"a radiograph report needs one source instance, got {len(headers)}")
        if int(headers[0].get("NumberOfFrames", 1) or 1) != 1:
            raise ReportError("multi-frame source instances are not supported")
        want: tuple[int, ...] = (rows, cols)
    else:
        if any(int(h.get("NumberOfFrames", 1) or 1) != 1 for h in headers):
            raise ReportError("multi-frame source instances are not supported")
        want = (len(headers), rows, cols)
    if values.shape != want:
        raise ReportError(f"map shape {values.shape} does not fit the source grid {want} "
                          f"({len(headers)} instance(s) of {rows}x{cols})")


# --------------------------------------------------------------------------- entry point


def build_reports(source: Sequence[Dataset], inp: ReportInput, *, software_version: str,
                  key_images: bool = False) -> ReportObjects:
    """The SR and SEGs of one result version (see the module docstring).

    ``source``: the full source data sets of the analysed series, any order (pixel data is
    not needed and never copied). ``software_version``: this node's version (General
    Equipment Software Versions). Raises :class:`ReportError` for inconsistent input;
    highdicom's own errors propagate as :class:`ReportError` too.
    """
    _check_input(inp)
    notes: list[str] = []
    headers = _source_headers(source, inp, notes)
    _check_map(headers, inp)
    equipment = [algorithm_equipment(inp)]
    try:
        fractional, binary = build_segmentations(headers, inp, equipment=equipment,
                                                 software_version=software_version, notes=notes)
        segs: list[Dataset] = [s for s in (fractional, binary) if s is not None]
        sr = build_sr(headers, inp, segs=segs, binary=binary, equipment=equipment,
                      software_version=software_version, notes=notes)
    except (ValueError, TypeError, AttributeError) as exc:
        if isinstance(exc, ReportError):
            raise
        raise ReportError(f"cannot build the {inp.kind} report: {type(exc).__name__}: {exc}") from exc
    keys: list[Dataset] = []
    if key_images and inp.map is not None:
        from triage.report.sc import build_key_images

        by_uid = {str(ds.SOPInstanceUID): ds for ds in source}
        ordered = [by_uid[str(h.SOPInstanceUID)] for h in headers]
        try:
            keys = build_key_images(ordered, inp.map, kind=inp.kind, result_id=inp.result_id,
                                    version=inp.version, lesions=inp.lesions, equipment=equipment,
                                    installation=inp.installation)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ReportError(f"cannot build the key images: {type(exc).__name__}: {exc}") from exc
    elif key_images:
        notes.append("no key images: the result has no map")
    for note in notes:
        log.info("report for result %d version %d: %s", inp.result_id, inp.version, note)
    log.info("report for result %d version %d (%s): SR with %d lesion(s), %d SEG(s)",
             inp.result_id, inp.version, inp.kind, len(inp.lesions), len(segs))
    return ReportObjects(sr=sr, segs=segs, notes=notes, key_images=keys)
