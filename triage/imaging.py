"""DICOM series -> float32 arrays with their geometry.

Two kinds of series come out of :func:`read_series`:

* **projection** images (DX, CR, MG, ...): one single-frame instance -> a 2D ``(H, W)``
  array after the Modality LUT (Rescale or Modality LUT Sequence); MONOCHROME1, and MONOCHROME2
  shown through an INVERSE Presentation LUT Shape, are inverted within the modality LUT's output
  range, so that higher always means denser (whiter).
  Frontal images whose Patient Orientation is a pair of L/R and H/F are flipped (or
  transposed) to the display convention ``L\\F`` (rows towards the patient's left,
  columns towards the feet), the way the phantoms and most training data are stored;
* **volumes** (CT and any other series with Image Plane geometry): single-frame slices
  -> a 3D ``(D, H, W)`` array in modality units (CT: Hounsfield units), slices sorted by
  the projection of Image Position (Patient) on the slice normal (the cross product of the
  Image Orientation (Patient) cosines), the slice spacing computed from those positions
  (Slice Thickness says nothing about the gaps between slices), rows and columns as stored.
  Folders of a site's data (:class:`SeriesFiles`) come back in the models' (S, P, L) axis
  order instead (:mod:`triage.orientation`); the node scores in that order and takes its maps
  back to the stored grid.

Everything here handles untrusted input: headers are read and checked (sizes, geometry)
before any pixel data is decoded, problems raise :class:`ImagingError` with a message an
administrator can act on, and no message or log line carries a patient identifier or a
UID (only counts, attribute names and file names, which the node's storage chooses).

:func:`dicom_folder_loader` is registered with :func:`flows.train.register_loader`, so
``flows`` training accepts a folder of DICOM series (for example the phantom studies that
:mod:`triage.phantom_dicom` writes) wherever it accepts ``.npy``/``.npz`` files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from flows.train import register_loader
from triage.modality import PROJECTION_MODALITIES

__all__ = [
    "MAX_OUTPUT_BYTES",
    "MAX_SIDE",
    "PROJECTION_MODALITIES",
    "ImagingError",
    "Series",
    "SeriesFiles",
    "dicom_folder_loader",
    "read_series",
    "read_series_folder",
    "scan_series_folder",
]

log = logging.getLogger(__name__)

MAX_SIDE = 16384
"""Largest Rows / Columns / number of slices accepted."""
MAX_OUTPUT_BYTES = 2 * 1024**3
"""Largest float32 array one series may decode to."""

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFER_SIZE = 4096  # header values larger than this (pixel data) are read only when used
_ORIENT_TOL = 1e-4  # direction cosines: equal across slices within this
_UNIT_TOL = 1e-3  # direction cosines: unit length and orthogonal within this
_DUPLICATE_MM = 1e-3  # two slices closer than this along the normal share a position
_FLIP_PAIRS = {"L": ("L", False), "R": ("L", True), "F": ("F", False), "H": ("F", True)}


class ImagingError(ValueError):
    """A series cannot be turned into an array (the message says why)."""


@dataclass
class Series:
    """One DICOM series as an array plus the geometry needed to interpret it.

    ``array`` is float32, ``(H, W)`` for a projection image, ``(D, H, W)`` for a volume
    (slice 0 has the lowest position along the slice normal). ``spacing`` is in mm in the
    same axis order (``(row, col)`` or ``(slice, row, col)``; NaN when a projection image
    states no spacing). For volumes ``origin`` is the Image Position (Patient) of the
    first voxel of slice 0 and ``direction`` the row cosine, the column cosine and the
    slice normal (9 values, patient LPS coordinates); both are None for projections.
    ``sop_instance_uids`` follow the array's slice order.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    modality: str
    series_instance_uid: str
    study_instance_uid: str
    sop_instance_uids: list[str]
    origin: tuple[float, float, float] | None = None
    direction: tuple[float, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_volume(self) -> bool:
        return self.array.ndim == 3


# --------------------------------------------------------------------------- headers


@dataclass
class _Header:
    path: Path
    ds: Dataset


def _convert(ds: Dataset, depth: int = 0) -> None:
    """Convert the values now: pydicom converts a value when it is first read, so a length that
    does not fit the VR (BytesLengthException) or an unknown VR (NotImplementedError) would be
    raised wherever the value is used. Deferred (large) values and private elements are left."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if tag.is_private or (isinstance(raw, RawDataElement) and raw.value is None and raw.length):
            continue
        elem = ds[tag]
        if elem.VR == "SQ" and depth < 8:
            for item in elem.value:
                _convert(item, depth + 1)


def _read_header(path: Path) -> _Header:
    """Parse ``path`` without loading its pixel data (deferred until decoded)."""
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE)
        _convert(ds)
    except InvalidDicomError as exc:
        raise ImagingError(f"{path.name}: not a DICOM file ({exc})") from exc
    except Exception as exc:  # truncated or malformed files raise many kinds
        raise ImagingError(f"{path.name}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    return _Header(path, ds)


def _int_attr(h: _Header, name: str, default: int | None = None) -> int:
    value = h.ds.get(name, default)
    try:
        if value is None or value == "":
            raise TypeError
        return int(value)
    except (TypeError, ValueError):
        raise ImagingError(f"{h.path.name}: missing or invalid {name}") from None


def _floats(h: _Header, name: str, n: int) -> np.ndarray | None:
    """``name`` as ``n`` finite floats, None when absent or empty; raises when malformed."""
    value = h.ds.get(name)
    if value is None or value == "":
        return None
    try:
        values = [float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str)
                                     else [value])]
    except (TypeError, ValueError):
        raise ImagingError(f"{h.path.name}: {name} is not numeric") from None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise ImagingError(f"{h.path.name}: {name} must hold {n} finite numbers, got {len(values)}")
    return np.asarray(values, dtype=np.float64)


def _check_sizes(headers: Sequence[_Header]) -> tuple[int, int]:
    """Rows, Columns, frames and samples checked before anything is decoded."""
    total = 0
    shapes = set()
    for h in headers:
        if not any(tag in h.ds for tag in _PIXEL_TAGS):
            raise ImagingError(f"{h.path.name}: no pixel data (SOP class "
                               f"{h.ds.get('SOPClassUID', 'unknown')} is not an image)")
        rows, cols = _int_attr(h, "Rows"), _int_attr(h, "Columns")
        frames = _int_attr(h, "NumberOfFrames", 1)
        samples = _int_attr(h, "SamplesPerPixel", 1)
        if not (1 <= rows <= MAX_SIDE and 1 <= cols <= MAX_SIDE):
            raise ImagingError(f"{h.path.name}: image size {rows}x{cols} outside 1..{MAX_SIDE}")
        if frames < 1 or frames > MAX_SIDE:
            raise ImagingError(f"{h.path.name}: NumberOfFrames {frames} outside 1..{MAX_SIDE}")
        if frames != 1:
            raise ImagingError(f"{h.path.name}: multi-frame images ({frames} frames) are not supported; "
                               "send single-frame instances")
        if samples != 1:
            raise ImagingError(f"{h.path.name}: {samples} samples per pixel; only grayscale is supported")
        total += rows * cols * frames * 4
        if total > MAX_OUTPUT_BYTES:
            raise ImagingError(f"series would decode to more than {MAX_OUTPUT_BYTES // 1024**3} GiB "
                               f"({len(headers)} instances); refusing it")
        shapes.add((rows, cols))
    if len(shapes) > 1:
        raise ImagingError(f"inconsistent Rows/Columns across the series: {sorted(shapes)}")
    (shape,) = shapes
    return shape


def _decode(h: _Header) -> np.ndarray:
    """Stored values -> Modality LUT output (float64), decoded only now."""
    try:
        stored = h.ds.pixel_array
    # missing decoder plug-ins, corrupt or short pixel data; a decoder written in Rust panics with
    # pyo3's PanicException, a BaseException (pylibjpeg-rle: a run past the end of a segment)
    except BaseException as exc:
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        ts = getattr(getattr(h.ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ImagingError(f"{h.path.name}: cannot decode pixel data (transfer syntax {ts}): {exc}") from exc
    if stored.ndim != 2:
        raise ImagingError(f"{h.path.name}: decoded pixel data has shape {stored.shape}, expected 2D")
    try:
        out = apply_modality_lut(stored, h.ds)
    except Exception as exc:
        raise ImagingError(f"{h.path.name}: invalid Modality LUT / rescale: {exc}") from exc
    return np.asarray(out, dtype=np.float64)


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """Lowest and highest value the Modality LUT can output (for MONOCHROME1 inversion)."""
    lut_seq = ds.get("ModalityLUTSequence")
    if lut_seq:
        bits = int(lut_seq[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo, hi = 0, 2**bits - 1
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        a, b = lo * slope + icpt, hi * slope + icpt
        return min(a, b), max(a, b)
    return float(lo), float(hi)


def _first(value: Any) -> float | None:
    """First value of a possibly multi-valued numeric attribute."""
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _strings(value: Any) -> list[str]:
    """The values of a code-string attribute; one value (or one of another VR: an int) is one."""
    if value is None or value == "":
        return []
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [str(v) for v in value]
    return [str(value)]


def _common_meta(ds: Dataset, n: int) -> dict[str, Any]:
    return {
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
        "body_part_examined": str(ds.get("BodyPartExamined", "")),
        "image_type": _strings(ds.get("ImageType")),
        "window_center": _first(ds.get("WindowCenter")),
        "window_width": _first(ds.get("WindowWidth")),
        "n_instances": n,
    }


# --------------------------------------------------------------------------- projection


def _canonical_orientation(arr: np.ndarray, spacing: tuple[float, float], orientation: list[str]
                           ) -> tuple[np.ndarray, tuple[float, float], list[str], list[str]]:
    """Flip/transpose a frontal image to rows -> patient left, columns -> feet when its
    Patient Orientation is an (L|R, H|F) pair (or the transposed pair); else leave it."""
    if len(orientation) != 2 or not all(o in _FLIP_PAIRS for o in orientation):
        return arr, spacing, orientation, []
    ops: list[str] = []
    row_dir, col_dir = orientation
    if row_dir in ("H", "F") and col_dir in ("L", "R"):
        arr, spacing = arr.T, (spacing[1], spacing[0])
        row_dir, col_dir = col_dir, row_dir
        ops.append("transpose")
    if row_dir not in ("L", "R") or col_dir not in ("H", "F"):
        return arr, spacing, orientation, []  # e.g. L\R: contradictory, leave as stored
    if _FLIP_PAIRS[row_dir][1]:
        arr = arr[:, ::-1]
        ops.append("flip_columns")
    if _FLIP_PAIRS[col_dir][1]:
        arr = arr[::-1, :]
        ops.append("flip_rows")
    return np.ascontiguousarray(arr), spacing, ["L", "F"], ops


def _read_projection(headers: list[_Header], modality: str) -> Series:
    if len(headers) != 1:
        raise ImagingError(f"projection ({modality}) series holds {len(headers)} images; "
                           "expected one image per series")
    (h,) = headers
    _check_sizes(headers)
    ds = h.ds
    spacing_source = "PixelSpacing"
    ps = _floats(h, "PixelSpacing", 2)
    if ps is None:
        ps = _floats(h, "ImagerPixelSpacing", 2)
        spacing_source = "ImagerPixelSpacing"
        mag = _first(ds.get("EstimatedRadiographicMagnificationFactor"))
        if ps is not None and mag is not None and mag > 0:
            ps = ps / mag
            spacing_source = "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"
    if ps is None:
        spacing: tuple[float, float] = (math.nan, math.nan)
        spacing_source = "unknown"
    else:
        if not (ps > 0).all():
            raise ImagingError(f"{h.path.name}: zero or negative pixel spacing {ps.tolist()}")
        spacing = (float(ps[0]), float(ps[1]))
    arr = _decode(h)
    lo, hi = _modality_range(ds)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImagingError(f"{h.path.name}: PhotometricInterpretation {photometric or '(missing)'} "
                           "is not a grayscale image")
    # displayed inverted: MONOCHROME1 (with or without the INVERSE Presentation LUT Shape the DX
    # IOD pairs it with: one inversion, stated twice), or MONOCHROME2 shown through INVERSE
    inverse_lut = str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
    inverted = photometric == "MONOCHROME1" or inverse_lut
    if inverted:
        arr = (lo + hi) - arr
    orientation = _strings(ds.get("PatientOrientation"))
    arr, spacing, orientation, ops = _canonical_orientation(arr, spacing, orientation)
    meta = _common_meta(ds, 1)
    meta.update({
        "kind": "projection",
        "value_range": (lo, hi),
        "inverted": inverted,
        "spacing_source": spacing_source,
        "patient_orientation": orientation,
        "orientation_ops": ops,
        "view_position": str(ds.get("ViewPosition", "")),
    })
    return Series(
        array=np.ascontiguousarray(arr, dtype=np.float32),
        spacing=spacing,
        modality=modality,
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        sop_instance_uids=[str(ds.get("SOPInstanceUID", ""))],
        meta=meta,
    )


# --------------------------------------------------------------------------- volume


def _geometry(h: _Header) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    missing = [name for name in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
               if h.ds.get(name) in (None, "")]
    if missing:
        raise ImagingError(f"{h.path.name}: missing geometry ({', '.join(missing)}); "
                           "cannot build a volume")
    iop = _floats(h, "ImageOrientationPatient", 6)
    ipp = _floats(h, "ImagePositionPatient", 3)
    ps = _floats(h, "PixelSpacing", 2)
    assert iop is not None and ipp is not None and ps is not None
    return iop, ipp, ps


def _read_volume(headers: list[_Header], modality: str, spacing_tolerance: float) -> Series:
    rows, cols = _check_sizes(headers)
    if len(headers) > MAX_SIDE:
        raise ImagingError(f"{len(headers)} slices; at most {MAX_SIDE} are accepted")
    geo = [_geometry(h) for h in headers]
    iops = np.stack([g[0] for g in geo])
    ipps = np.stack([g[1] for g in geo])
    pss = np.stack([g[2] for g in geo])
    if not np.allclose(iops, iops[0], rtol=0.0, atol=_ORIENT_TOL):
        n_orient = len({tuple(np.round(o, 4)) for o in iops})
        raise ImagingError(f"inconsistent ImageOrientationPatient: {n_orient} different orientations "
                           "in one series (localizer or reformat mixed in?)")
    if not np.allclose(pss, pss[0], rtol=1e-4, atol=0.0):
        raise ImagingError("inconsistent PixelSpacing across the series")
    if not (pss[0] > 0).all():
        raise ImagingError(f"zero or negative PixelSpacing {pss[0].tolist()}")
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    if (abs(np.linalg.norm(row_dir) - 1) > _UNIT_TOL or abs(np.linalg.norm(col_dir) - 1) > _UNIT_TOL
            or abs(float(row_dir @ col_dir)) > _UNIT_TOL):
        raise ImagingError(f"ImageOrientationPatient {iops[0].tolist()} is not two orthogonal unit vectors")
    normal = np.cross(row_dir, col_dir)
    pos = ipps @ normal
    order = np.argsort(pos, kind="stable")
    pos, ipps = pos[order], ipps[order]
    headers = [headers[i] for i in order]
    n = len(headers)
    if n == 1:
        thick = _first(headers[0].ds.get("SpacingBetweenSlices"))
        if thick is None:
            thick = _first(headers[0].ds.get("SliceThickness"))
        if thick is None:
            raise ImagingError(f"{headers[0].path.name}: a single slice and no SpacingBetweenSlices/"
                               "SliceThickness; missing geometry for the slice axis")
        if not (math.isfinite(thick) and thick > 0):
            raise ImagingError(f"{headers[0].path.name}: zero or negative slice spacing ({thick})")
        slice_spacing = float(thick)
    else:
        diffs = np.diff(pos)
        if float(pos[-1] - pos[0]) < _DUPLICATE_MM:
            raise ImagingError(f"zero slice spacing: all {n} slices share one position along the normal")
        n_dup = int((diffs < _DUPLICATE_MM).sum())
        if n_dup:
            raise ImagingError(f"duplicate slice positions: {n_dup} of {n} slices repeat a position "
                               "(two acquisitions in one series?)")
        slice_spacing = float(pos[-1] - pos[0]) / (n - 1)
        tol = spacing_tolerance * slice_spacing + _DUPLICATE_MM
        if float(np.abs(diffs - slice_spacing).max()) > tol:
            raise ImagingError(f"non-uniform slice spacing: gaps from {diffs.min():.4g} to "
                               f"{diffs.max():.4g} mm (tolerance {spacing_tolerance:.0%}); missing slices?")
        # the slices must stack along the normal: an in-plane drift is a tilted/sheared volume
        offsets = ipps - ipps[0]
        drift = offsets - np.outer(offsets @ normal, normal)
        if float(np.linalg.norm(drift, axis=1).max()) > 0.5 * float(pss[0].min()):
            raise ImagingError("slices are not stacked along their normal (gantry tilt or shear); "
                               "resample the series before analysis")
    out = np.empty((n, rows, cols), dtype=np.float32)
    for k, h in enumerate(headers):
        out[k] = _decode(h)
    first = headers[0].ds
    meta = _common_meta(first, n)
    meta.update({
        "kind": "volume",
        "slice_thickness": _first(first.get("SliceThickness")),
        "series_description": str(first.get("SeriesDescription", "")),
    })
    return Series(
        array=out,
        spacing=(slice_spacing, float(pss[0][0]), float(pss[0][1])),
        modality=modality,
        series_instance_uid=str(first.SeriesInstanceUID),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        sop_instance_uids=[str(h.ds.get("SOPInstanceUID", "")) for h in headers],
        origin=(float(ipps[0][0]), float(ipps[0][1]), float(ipps[0][2])),
        direction=tuple(float(v) for v in (*row_dir, *col_dir, *normal)),
        meta=meta,
    )


# --------------------------------------------------------------------------- public API


def read_series(files: Sequence[Path], *, spacing_tolerance: float = 0.01) -> Series:
    """Read the instances of one series (any order) into a :class:`Series`.

    ``spacing_tolerance`` is the relative deviation of any slice gap from the mean slice
    spacing that is still accepted as uniform. Raises :class:`ImagingError` for anything
    that does not make one well-defined image or volume.
    """
    if isinstance(files, str | Path):
        raise TypeError("read_series takes a sequence of file paths, not one path")
    paths = [Path(f) for f in files]
    if not paths:
        raise ImagingError("no files given")
    if not 0 <= spacing_tolerance < 1:
        raise ValueError(f"spacing_tolerance must be in [0, 1), got {spacing_tolerance}")
    headers = [_read_header(p) for p in paths]
    series_uids = {str(h.ds.get("SeriesInstanceUID", "")) for h in headers}
    if "" in series_uids:
        missing = next(h.path.name for h in headers if not h.ds.get("SeriesInstanceUID"))
        raise ImagingError(f"{missing}: missing SeriesInstanceUID")
    if len(series_uids) > 1:
        raise ImagingError(f"mixed series: {len(paths)} files carry {len(series_uids)} different "
                           "SeriesInstanceUIDs; pass one series at a time")
    sop_uids = [str(h.ds.get("SOPInstanceUID", "")) for h in headers]
    if len(set(sop_uids)) != len(sop_uids):
        raise ImagingError("the same SOPInstanceUID occurs in more than one file of the series")
    modality = str(headers[0].ds.get("Modality", "")).upper()
    if modality in PROJECTION_MODALITIES:
        return _read_projection(headers, modality)
    return _read_volume(headers, modality, spacing_tolerance)


def _is_part10(path: Path) -> bool:
    """Cheap check for the 'DICM' magic, so non-DICOM files are never parsed."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _looks_like_bare_dicom(path: Path) -> bool:
    """A data set written without the Part 10 header: it starts with a group 0002 or 0008
    element tag in little endian (only ever used for a warning)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[:2] in (b"\x02\x00", b"\x08\x00")


def read_series_folder(folder: Path, *, spacing_tolerance: float = 0.01) -> list[Series]:
    """Every image series among the DICOM files under ``folder`` (recursively).

    Non-DICOM files (e.g. ``labels.csv``) are skipped quietly, as are DICOM objects that are
    not images (no Rows: DICOMDIR, SR, presentation states). Series come back ordered by
    the path of their first file, so a folder of ``<case>/`` studies reads in case order.
    """
    return list(iter_series_folder(folder, spacing_tolerance=spacing_tolerance))


@dataclass(frozen=True)
class SeriesFiles:
    """One series' files under a folder, known from their headers alone (no pixels read)."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    files: tuple[Path, ...]
    folder: Path

    @property
    def is_volume(self) -> bool:
        """What :func:`read_series` will make of it: projections are 2D, the rest volumes."""
        return self.modality not in PROJECTION_MODALITIES

    def read(self, *, spacing_tolerance: float = 0.01) -> Series:
        """The series as the models see a site's data: a volume in the (S, P, L) axis order of
        :func:`triage.orientation.canonical_volume` (what NIfTI files are read in), whatever
        order its slices, rows and columns were stored in."""
        from triage.orientation import canonical_volume

        try:
            s = canonical_volume(read_series(self.files, spacing_tolerance=spacing_tolerance))[0]
        except ImagingError as exc:
            raise ImagingError(f"{self.files[0].parent}: {exc}") from exc
        s.meta["source"] = self.name
        return s

    @property
    def name(self) -> str:
        """Where the series is, for messages: its folder and UID (a folder may hold several)."""
        return f"{self.files[0].parent} (series {self.series_instance_uid})"


def scan_series_folder(folder: Path) -> list[SeriesFiles]:
    """The image series among the DICOM files under ``folder``, grouped from their headers,
    ordered by the path of each series' first file; no pixel data is read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    groups: dict[str, tuple[str, str, list[Path]]] = {}
    skipped, headerless = 0, []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if not _is_part10(path):
            skipped += 1
            if _looks_like_bare_dicom(path):
                headerless.append(path)
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            rel = path.relative_to(folder)
            raise ImagingError(f"{rel}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid or "Rows" not in ds:
            skipped += 1
            continue
        study, modality = str(ds.get("StudyInstanceUID", "")), str(ds.get("Modality", "")).upper()
        groups.setdefault(uid, (study, modality, []))[2].append(path)
    if skipped:
        log.debug("skipped %d non-image or non-DICOM file(s) under %s", skipped, folder)
    if headerless:
        log.warning("%s: %d file(s) look like DICOM without the Part 10 header (128-byte preamble "
                    "and 'DICM'; first: %s) and are not read; rewrite them as DICOM files, e.g. "
                    "`dcmconv +F in out`", folder, len(headerless), headerless[0].relative_to(folder))
    return [SeriesFiles(uid, study, modality, tuple(files), folder)
            for uid, (study, modality, files) in groups.items()]


def iter_series_folder(folder: Path, *, spacing_tolerance: float = 0.01) -> Iterator[Series]:
    """:func:`read_series_folder` one series at a time: the headers of every file are read
    first (to group them), the pixels of each series only when it is reached, so a caller that
    keeps a reduced copy (a model-grid image) never holds the whole folder's pixels."""
    for group in scan_series_folder(folder):
        yield group.read(spacing_tolerance=spacing_tolerance)


def dicom_folder_loader(path: Path) -> np.ndarray | None:
    """Training-data loader: all series under ``path`` stacked as ``(N, *spatial)`` float32.

    Returns None when ``path`` is not a folder or holds no DICOM image, so that other
    loaders may try. Series must share one array shape (2D projections and 3D volumes
    do not mix).
    """
    path = Path(path)
    if not path.is_dir():
        return None
    series = read_series_folder(path)
    if not series:
        return None
    shapes = sorted({tuple(s.array.shape) for s in series})
    if len(shapes) > 1:
        raise ValueError(f"{path}: DICOM series of different shapes {shapes}; resample them to one "
                         "shape first (e.g. with flows.preprocess.resize) or use one folder per shape")
    return np.stack([s.array for s in series]).astype(np.float32, copy=False)


register_loader(dicom_folder_loader)
