"""The overlays: DICOM Segmentations (highdicom) of the abnormality map on the source grid.

Two Segmentation instances per result, both in one new series of the source study
(Series Number :data:`SEG_SERIES_NUMBER`, "AI triage map"), both with one frame for every
source instance (``omit_empty_frames=False``: viewers misplace SEGs with omitted frames).
Map slice ``k`` becomes the frame derived from the instance ``slice_order[k]`` (its Derivation
Image Sequence names that instance, its Plane Position is that instance's Image Position);
highdicom stores the frames of a volume in its own spatial order (Dimension Organization
Type 3D, sorted along the slice normal), so find a slice's frame through those references
(:func:`frame_for_source`), not by its index:

* **fractional** (instance 1, always when there is a map): segment 1 "abnormality map",
  Segmentation Fractional Type PROBABILITY, 8 bits (Maximum Fractional Value 255). The
  map is *normalised*, not a calibrated probability: with ``lo`` the median and ``hi`` the
  99.9th percentile of the map's finite values, a value ``v`` becomes
  ``clip((v - lo) / (hi - lo), 0, 1)``; NaN (outside the analysed mask) becomes 0, so the
  typical half of the image shows nothing and the most abnormal 0.1 % is at full
  strength. A flat map (``hi <= lo``) gives an all-zero segment. ``lo`` and ``hi`` are
  written into the Algorithm Parameters.
* **binary** (instance 2): segment 1 "abnormal region", the voxels with
  ``map >= threshold`` (NaN never). The lesions of the SR reference this segment.

Rules for what is left out (each adds a line to ``notes``, which
:func:`triage.report.build_reports` logs; notes never hold a UID or patient identifier):

* **no map** (``inp.map is None``): no SEG at all.
* **no threshold** (``inp.threshold is None``): no binary SEG.
* **no lesion / no abnormal voxel**: when no map value reaches the threshold the binary SEG
  is *left out* (an empty overlay would show nothing and no lesion could reference it);
  the fractional SEG is still produced.
* **no Frame of Reference**: a volume (CT) whose instances lack FrameOfReferenceUID cannot
  carry plane positions, and highdicom (rightly: the CT IOD requires the module) refuses
  a multi-frame SEG without one; both SEGs are then left out and the SR reports the
  lesions without a segment reference. A single-frame projection image (DX/CR) needs no
  Frame of Reference: its SEG is aligned pixel for pixel with the one source frame (and
  carries no Pixel Measures, see :func:`_projection_header`).

Segment descriptions carry the algorithm identification (bundle name and version, family
"Artificial Intelligence", the normalisation or threshold as parameters); the General and
Enhanced General Equipment modules name this node; the Contributing Equipment Sequence
holds the IHE AIR algorithm item built by :mod:`triage.report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from triage import MANUFACTURER
from triage.report.uids import output_uid

if TYPE_CHECKING:
    from triage.report import ReportInput

__all__ = [
    "BINARY_SEGMENT_LABEL",
    "FRACTIONAL_SEGMENT_LABEL",
    "NORMALISATION_PERCENTILES",
    "SEG_SERIES_DESCRIPTION",
    "SEG_SERIES_NUMBER",
    "abnormal_mask",
    "build_segmentations",
    "clean_text",
    "frame_for_source",
    "normalise_map",
]

SEG_SERIES_NUMBER = 9902
SEG_SERIES_DESCRIPTION = "AI triage map"
FRACTIONAL_SEGMENT_LABEL = "abnormality map"
BINARY_SEGMENT_LABEL = "abnormal region"
NORMALISATION_PERCENTILES = (50.0, 99.9)
"""``lo`` and ``hi`` of the fractional SEG's normalisation, as percentiles of finite values."""
MAX_FRACTIONAL_VALUE = 255

_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
_TYPE = codes.SCT.Lesion


def clean_text(value: object, limit: int = 64) -> str:
    """``value`` as text safe in any DICOM string VR and character set: printable ASCII
    without backslash, at most ``limit`` characters, never empty ("unknown")."""
    clean = "".join(c if (" " <= c <= "~" and c != "\\") else "?" for c in str(value)).strip()
    return clean[:limit] or "unknown"


def _lo(text: object) -> str:
    return clean_text(text, 64)


def normalise_map(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The map as float32 in [0, 1] (see the module docstring) and its ``lo``, ``hi``."""
    v = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(v)
    if not finite.any():
        return np.zeros(v.shape, dtype=np.float32), 0.0, 0.0
    lo, hi = (float(x) for x in np.percentile(v[finite], NORMALISATION_PERCENTILES))
    if not hi > lo:
        return np.zeros(v.shape, dtype=np.float32), lo, hi
    out = np.where(finite, v, np.float32(lo))  # float32 throughout: a CT map is hundreds of MB
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    return out, lo, hi


def abnormal_mask(values: np.ndarray, threshold: float) -> np.ndarray:
    """``values >= threshold``; NaN is never abnormal."""
    v = np.asarray(values, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        return np.isfinite(v) & (v >= np.float32(threshold))


def _algorithm(inp: ReportInput, parameters: dict[str, str]) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=_lo(inp.bundle_name), family=codes.cid7162.ArtificialIntelligence,
        version=_lo(inp.bundle_version), source=MANUFACTURER, parameters=parameters)


def _description(inp: ReportInput, label: str, text: str, parameters: dict[str, str]
                 ) -> hd.seg.SegmentDescription:
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label, segmented_property_category=_CATEGORY,
        segmented_property_type=_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(inp, parameters))
    desc.SegmentDescription = clean_text(f"{text} ({inp.bundle_name} {inp.bundle_version})", 1024)
    return desc


def _needs_frame_of_reference(headers: Sequence[Dataset], values: np.ndarray) -> bool:
    return len(headers) > 1 or values.ndim == 3


def _projection_header(header: Dataset) -> Dataset:
    """``header`` without Pixel Spacing, for the SEG of a projection image.

    Given a source with Pixel Spacing but no Slice Thickness (any radiograph), highdicom
    writes a Pixel Measures item with Pixel Spacing alone, which is valid, but which its own
    ``segread`` then rejects (it wants Slice Thickness there too). Pixel Measures is not
    required without a Frame of Reference, and the SEG matches its one source frame pixel for
    pixel, so the radiograph's SEG carries none rather than a made-up slice thickness."""
    out = Dataset()
    for elem in header:
        if elem.keyword != "PixelSpacing":
            out.add(elem)
    return out


def _segmentation(headers: Sequence[Dataset], pixels: np.ndarray, seg_type: str,
                  desc: hd.seg.SegmentDescription, *, inp: ReportInput, what: str, instance_number: int,
                  content_label: str, content_description: str, equipment: Sequence[hd.ContributingEquipment],
                  software_version: str) -> hd.seg.Segmentation:
    series_description = SEG_SERIES_DESCRIPTION + (f" v{inp.version}" if inp.version > 1 else "")
    seg = hd.seg.Segmentation(
        source_images=list(headers),
        pixel_array=pixels,
        segmentation_type=seg_type,
        segment_descriptions=[desc],
        series_instance_uid=output_uid(inp.result_id, inp.version, "seg-series", inp.installation),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=output_uid(inp.result_id, inp.version, what, inp.installation),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=_lo(software_version),
        device_serial_number=_serial(inp),
        content_label=content_label,
        content_description=_lo(content_description),
        omit_empty_frames=False,
        series_description=series_description,
        contributing_equipment=list(equipment),
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,  # used by FRACTIONAL only
        max_fractional_value=MAX_FRACTIONAL_VALUE,
    )
    if "PlaneOrientationSequence" not in seg.SharedFunctionalGroupsSequence[0]:
        # General Image: Patient Orientation is Type 2C when there is no plane orientation (a
        # projection image); highdicom leaves it out, so copy the source's (or leave it empty)
        seg.PatientOrientation = headers[0].get("PatientOrientation") or None
    return seg


def _serial(inp: ReportInput) -> str:
    """Device Serial Number (Type 1 in the SEG's Enhanced General Equipment): the model
    bundle is the algorithm instance, so the first 16 digits of its fingerprint."""
    fp = "".join(c for c in inp.bundle_fingerprint if c.isascii() and c.isalnum())[:16]
    return fp or "unknown"


def build_segmentations(headers: Sequence[Dataset], inp: ReportInput, *,
                        equipment: Sequence[hd.ContributingEquipment], software_version: str,
                        notes: list[str]) -> tuple[hd.seg.Segmentation | None, hd.seg.Segmentation | None]:
    """The fractional and the binary SEG (either may be None, with the reason in ``notes``).

    ``headers`` are the source instances (metadata suffices) in map order: ``headers[k]``
    is the instance of map slice ``k`` (a projection image: the single instance).
    """
    if inp.map is None:
        _note(notes, "no SEG: the analysis produced no map")
        return None, None
    values = np.asarray(inp.map)
    if _needs_frame_of_reference(headers, values):
        missing = sum(1 for h in headers if not str(h.get("FrameOfReferenceUID", "") or ""))
        if missing:
            _note(notes, f"no SEG: {missing} of {len(headers)} source instances lack FrameOfReferenceUID, "
                         "which a multi-frame segmentation of a volume needs; lesions are reported "
                         "without a segment reference")
            return None, None
    elif "SliceThickness" not in headers[0]:
        headers = [_projection_header(headers[0])]
    norm, lo, hi = normalise_map(values)
    p_lo, p_hi = NORMALISATION_PERCENTILES
    frac_params = {"normalisation": f"clip((v - lo) / (hi - lo), 0, 1), NaN -> 0; "
                                    f"lo = p{p_lo:g} = {lo:.6g}, hi = p{p_hi:g} = {hi:.6g}",
                   "kind": clean_text(inp.kind)}
    fractional = _segmentation(
        headers, norm, "FRACTIONAL",
        _description(inp, FRACTIONAL_SEGMENT_LABEL, "AI triage abnormality map, normalised to [0, 1]",
                     frac_params),
        inp=inp, what="seg-fractional", instance_number=1, content_label="TRIAGE_MAP",
        content_description=f"AI triage abnormality map ({inp.bundle_name} {inp.bundle_version})",
        equipment=equipment, software_version=software_version)
    if inp.threshold is None:
        _note(notes, "no binary SEG: no threshold was given")
        return fractional, None
    mask = abnormal_mask(values, float(inp.threshold))
    if not mask.any():
        _note(notes, "no binary SEG: no map value reaches the threshold (no abnormal region)")
        return fractional, None
    bin_params = {"threshold": f"map >= {float(inp.threshold):.6g}", "kind": clean_text(inp.kind)}
    binary = _segmentation(
        headers, mask.astype(np.uint8), "BINARY",
        _description(inp, BINARY_SEGMENT_LABEL, "AI triage abnormal region (map at or above the threshold)",
                     bin_params),
        inp=inp, what="seg-binary", instance_number=2, content_label="TRIAGE_ABNORMAL",
        content_description=f"AI triage abnormal regions ({inp.bundle_name} {inp.bundle_version})",
        equipment=equipment, software_version=software_version)
    return fractional, binary


def frame_for_source(seg: Dataset) -> dict[str, int]:
    """SOP Instance UID of the source -> 1-based frame number of ``seg`` derived from it."""
    out: dict[str, int] = {}
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        for der in item.get("DerivationImageSequence", []):
            for src in der.get("SourceImageSequence", []):
                out.setdefault(str(src.ReferencedSOPInstanceUID), i)
    return out


def _note(notes: list[str], text: str) -> None:
    notes.append(text)  # triage.report.build_reports logs every note
