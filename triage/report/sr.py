"""The Structured Report: a highdicom Comprehensive 3D SR holding a TID 1500 Measurement Report.

Document content (``Imaging Measurement Report``):

* **Language** English; **Observation context**: the device observer (TID 1004) is the
  model bundle: Device Observer UID = :func:`triage.report.uids.device_uid` (changes with
  the bundle's name, version or training-data fingerprint), name and model name = the
  bundle name, manufacturer = :data:`triage.MANUFACTURER`.
* **Procedure reported**: the analysed imaging procedure, SNOMED CT "Plain chest X-ray"
  (399208008), "Computed tomography of head" (303653007) or "Computed tomography of chest"
  (169069000) by ``kind``.
* **Imaging measurements**:

  - one TID 1501 group for the whole series (tracking identifier "AI triage result"),
    with the algorithm identification (TID 4019: bundle name and version, manufacturer,
    family "Artificial Intelligence", the method and the fingerprint as parameters) and
    the measurements that are present and finite: "Score" (SCT 246262008), log posterior,
    log-likelihood under the normal model, abnormality percentile (%), and for CT the
    abnormal volume (cm³) and the lesion count; qualitative evaluations "Has
    interpretation" (SCT 363713009) = Normal (SCT 17621005) / Abnormal (SCT 263654008)
    and "Priority" (SCT 260870009) = the node's level (1 urgent .. 4 routine);
  - per lesion (at most :data:`MAX_LESIONS`: the largest ones, in their input order) one ROI group (tracking
    identifier "lesion N", N = the lesion's 1-based position in ``lesions``, with a
    deterministic tracking UID), finding category "Morphologically abnormal structure",
    finding type "Lesion", the algorithm identification, "Volume" (SCT 118565006, cm³; a
    radiograph: "Area", SCT 42798000, cm², from ``volume_cm3``, which for a 2D map holds the
    area), the centroid and the peak map value. With a binary SEG it is a TID 1411
    **volumetric ROI** whose region is segment 1 ("abnormal region") of that SEG (every
    lesion references the same segment; the centroid tells them apart). Radiographs use
    TID 1411 too: TID 1410's "Referenced Segmentation Frame" needs Referenced Frame Number
    beside Referenced Segment Number, which the Image Reference Macro as dciodvfy checks it
    forbids. Without a binary SEG (see :mod:`triage.report.seg`) the lesion is a TID 1501
    group with the same measurements.

Concepts without a standard code use the local coding scheme :data:`SCHEME` ("99" prefix:
a private scheme, declared in the Coding Scheme Identification Sequence): log posterior,
log-likelihood, percentile, abnormal volume, lesion count, centroid coordinates (x, y, z
in patient LPS mm for volumes; row and column index on the stored pixel grid for
radiographs), peak value and the four priority levels.

Document attributes: Completion Flag COMPLETE, Verification Flag UNVERIFIED, Preliminary
Flag PRELIMINARY (an unread machine result), a new series "AI triage report" (Series Number
:data:`SR_SERIES_NUMBER`) in the source study, evidence = every source instance and every
SEG of the result (Current Requested Procedure Evidence Sequence), the predecessor SR of a
re-analysis in the Predecessor Documents Sequence, and the IHE AIR Contributing Equipment
item built by :mod:`triage.report`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from triage import MANUFACTURER
from triage.rank import PRIORITY_NAMES
from triage.report.seg import clean_text
from triage.report.uids import device_uid, output_uid, tracking_uid

if TYPE_CHECKING:
    from triage.report import ReportInput

__all__ = [
    "CODES",
    "MAX_LESIONS",
    "PROCEDURES",
    "SCHEME",
    "SR_SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "build_sr",
    "coding_scheme",
]

SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "AI triage report"
MAX_LESIONS = 50
"""At most this many lesions get an ROI group (the largest); the note says how many more."""

SCHEME = "99TRIAGE"
"""Local coding scheme designator of this node's own concepts."""

CODES: dict[str, Code] = {
    "log_posterior": Code("LOGPOST", SCHEME, "Log posterior probability of normal"),
    "log_p_normal": Code("LOGPNORMAL", SCHEME, "Log-likelihood under the normal model"),
    "percentile": Code("PERCENTILE", SCHEME, "Abnormality percentile"),
    "abnormal_cm3": Code("ABNVOLUME", SCHEME, "Abnormal volume"),
    "lesion_count": Code("LESIONCOUNT", SCHEME, "Lesion count"),
    "centroid_x": Code("CENTROIDX", SCHEME, "Centroid x (patient LPS)"),
    "centroid_y": Code("CENTROIDY", SCHEME, "Centroid y (patient LPS)"),
    "centroid_z": Code("CENTROIDZ", SCHEME, "Centroid z (patient LPS)"),
    "centroid_row": Code("CENTROIDROW", SCHEME, "Centroid row index"),
    "centroid_column": Code("CENTROIDCOL", SCHEME, "Centroid column index"),
    "peak": Code("PEAK", SCHEME, "Peak map value"),
    **{f"priority_{k}": Code(f"PRIORITY{k}", SCHEME, f"Priority {k}: {name}")
       for k, name in PRIORITY_NAMES.items()},
}

PROCEDURES: dict[str, Code] = {
    "cxr": Code("399208008", "SCT", "Plain chest X-ray"),
    "bct": Code("303653007", "SCT", "Computed tomography of head"),
    "chestct": Code("169069000", "SCT", "Computed tomography of chest"),
}

_SCORE = codes.SCT.Score
_INTERPRETATION = codes.SCT.HasInterpretation
_PRIORITY = codes.SCT.Priority
_NORMAL = codes.SCT.Normal
_ABNORMAL = codes.SCT.Abnormal
_VOLUME = Code("118565006", "SCT", "Volume")
_AREA = codes.SCT.Area
_LESION = codes.SCT.Lesion
_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
_NO_UNITS = codes.UCUM.NoUnits
_PIXEL = Code("{pixel}", "UCUM", "pixel")


def coding_scheme() -> CodingSchemeIdentificationItem:
    return CodingSchemeIdentificationItem(
        designator=SCHEME, name="triage-node local concepts", responsible_organization=MANUFACTURER)


def _text(value: object, limit: int = 64) -> str:
    return clean_text(value, limit)


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _measurement(name: Code, value: Any, unit: Code) -> hd.sr.Measurement | None:
    v = _finite(value)
    if v is None:
        return None
    return hd.sr.Measurement(name=name, value=v, unit=unit)


def _algorithm(inp: ReportInput) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=_text(inp.bundle_name), version=_text(inp.bundle_version),
        parameters=[f"method: {_text(inp.method, 1000)}",
                    f"bundle fingerprint: {_text(inp.bundle_fingerprint, 200)}"],
        family=codes.cid7162.ArtificialIntelligence, manufacturer=MANUFACTURER)


def _series_group(inp: ReportInput, algorithm: hd.sr.AlgorithmIdentification, notes: list[str]
                  ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    wanted: list[tuple[str, Code, Any, Code]] = [
        ("score", _SCORE, inp.score, _NO_UNITS),
        ("log_posterior", CODES["log_posterior"], inp.log_posterior, _NO_UNITS),
        ("log_p_normal", CODES["log_p_normal"], inp.log_p_normal, _NO_UNITS),
        ("percentile", CODES["percentile"], inp.percentile, codes.UCUM.Percent),
    ]
    if inp.kind != "cxr" and inp.abnormal_cm3 is not None:
        wanted.append(("abnormal_cm3", CODES["abnormal_cm3"], inp.abnormal_cm3, codes.UCUM.CubicCentimeter))
    if inp.abnormal_cm3 is not None or inp.lesions:
        wanted.append(("lesion_count", CODES["lesion_count"], len(inp.lesions), _NO_UNITS))
    measurements = []
    for label, name, value, unit in wanted:
        m = _measurement(name, value, unit)
        if m is None:
            if value is not None:
                notes.append(f"SR: {label} left out: not a finite number")
            continue
        measurements.append(m)
    prio = inp.priority if inp.priority in PRIORITY_NAMES else max(PRIORITY_NAMES)
    evaluations = [
        hd.sr.QualitativeEvaluation(_INTERPRETATION, _ABNORMAL if inp.abnormal else _NORMAL),
        hd.sr.QualitativeEvaluation(_PRIORITY, CODES[f"priority_{prio}"]),
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(inp.result_id, inp.version, -1, inp.installation),
            identifier="AI triage result"),
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations)


def _lesion_measurements(lesion: dict[str, Any], planar: bool) -> list[hd.sr.Measurement]:
    out: list[hd.sr.Measurement | None] = []
    if planar:
        out.append(_measurement(_AREA, lesion.get("volume_cm3"), codes.UCUM.SquareCentimeter))
        idx = lesion.get("centroid_index") or []
        if len(idx) == 2:
            out.append(_measurement(CODES["centroid_row"], idx[0], _PIXEL))
            out.append(_measurement(CODES["centroid_column"], idx[1], _PIXEL))
    else:
        out.append(_measurement(_VOLUME, lesion.get("volume_cm3"), codes.UCUM.CubicCentimeter))
        mm = lesion.get("centroid_mm") or []
        if len(mm) == 3:
            for axis, v in zip("xyz", mm, strict=True):
                out.append(_measurement(CODES[f"centroid_{axis}"], v, codes.UCUM.Millimeter))
    out.append(_measurement(CODES["peak"], lesion.get("peak"), _NO_UNITS))
    return [m for m in out if m is not None]


def _segment_reference(binary: Dataset, headers: Sequence[Dataset]) -> hd.sr.ReferencedSegment:
    """Segment 1 of the binary SEG, all its frames, derived from the source series.

    Built with the constructor: highdicom's ``ReferencedSegment.from_segmentation`` looks for
    the Segment Identification Sequence per frame, where a one-segment SEG has it shared.
    No frame numbers: the Image Reference Macro (as dciodvfy checks it) does not allow
    Referenced Frame Number beside Referenced Segment Number."""
    return hd.sr.ReferencedSegment(
        sop_class_uid=binary.SOPClassUID, sop_instance_uid=binary.SOPInstanceUID, segment_number=1,
        source_series=hd.sr.SourceSeriesForSegmentation(str(headers[0].SeriesInstanceUID)))


def _lesion_groups(inp: ReportInput, headers: Sequence[Dataset], binary: Dataset | None,
                   algorithm: hd.sr.AlgorithmIdentification, notes: list[str]) -> list[Any]:
    if not inp.lesions:
        return []
    order = sorted(range(len(inp.lesions)), key=lambda i: -(_finite(inp.lesions[i].get("volume_cm3")) or 0.0))
    if len(order) > MAX_LESIONS:
        notes.append(f"SR: {len(order) - MAX_LESIONS} of {len(order)} lesions left out "
                     f"(only the {MAX_LESIONS} largest get an ROI)")
        order = order[:MAX_LESIONS]
    planar = inp.kind == "cxr"
    groups: list[Any] = []
    for i in sorted(order):
        lesion = inp.lesions[i]
        common = {
            "tracking_identifier": hd.sr.TrackingIdentifier(
                uid=tracking_uid(inp.result_id, inp.version, i, inp.installation),
                identifier=f"lesion {i + 1}"),
            "finding_type": _LESION, "finding_category": _CATEGORY, "algorithm_id": algorithm,
            "measurements": _lesion_measurements(lesion, planar),
        }
        if binary is None:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))
        else:
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=_segment_reference(binary, headers), **common))
    return groups


def _observation_context(inp: ReportInput) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(inp.bundle_name, inp.bundle_version, inp.bundle_fingerprint),
        name=_text(inp.bundle_name), manufacturer_name=MANUFACTURER, model_name=_text(inp.bundle_name))
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=device))


def _predecessor(inp: ReportInput, study_uid: str) -> list[Dataset] | None:
    if inp.predecessor is None:
        return None
    sop_class, sop_instance, series = (str(v) for v in inp.predecessor)
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.SeriesInstanceUID = series
    ds.StudyInstanceUID = study_uid
    return [ds]


def build_sr(headers: Sequence[Dataset], inp: ReportInput, *, segs: Sequence[Dataset], binary: Dataset | None,
             equipment: Sequence[hd.ContributingEquipment], software_version: str,
             notes: list[str]) -> hd.sr.Comprehensive3DSR:
    """The SR of one result version; ``headers`` are the source instances (metadata
    suffices, the first one gives patient and study), ``segs`` every SEG of the result
    (recorded as evidence), ``binary`` the one the lesions reference (or None)."""
    algorithm = _algorithm(inp)
    groups = [_series_group(inp, algorithm, notes), *_lesion_groups(inp, headers, binary, algorithm, notes)]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(inp),
        procedure_reported=PROCEDURES[inp.kind],
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    study_uid = str(headers[0].StudyInstanceUID)
    series_description = SR_SERIES_DESCRIPTION + (f" v{inp.version}" if inp.version > 1 else "")
    return hd.sr.Comprehensive3DSR(
        evidence=[*headers, *segs],
        content=report[0],
        series_instance_uid=output_uid(inp.result_id, inp.version, "sr-series", inp.installation),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=output_uid(inp.result_id, inp.version, "sr", inp.installation),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=_predecessor(inp, study_uid),
        contributing_equipment=list(equipment),
        series_description=series_description,
        manufacturer_model_name=MANUFACTURER,
        software_versions=_text(software_version),
        coding_schemes=[coding_scheme()],
    )
