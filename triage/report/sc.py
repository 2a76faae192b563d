"""Optional key images: the map as a colour overlay on the source image, as Secondary Capture.

For PACS viewers that do not display SEG (``dispatch.key_images = true``). A radiograph
gives one image; a volume gives up to :data:`MAX_IMAGES` axial slices, those through the
largest lesions' centroids (or the slice holding the map's maximum when there is no
lesion). The grey image is the source slice after its modality LUT, windowed for the kind
(head CT 0-80 HU, chest CT -1350-150 HU, radiographs the 1st-99th percentile), MONOCHROME1
inverted; the overlay is the normalised map (:func:`triage.report.seg.normalise_map`)
where it is at least 0.2, in matplotlib's ``inferno`` colours, half transparent. These are
pictures for orientation, labelled "not for diagnosis"; the SEG and SR carry the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian

from triage import MANUFACTURER
from triage.report.seg import normalise_map
from triage.report.uids import output_uid

__all__ = ["MAX_IMAGES", "build_key_images", "render"]

MAX_IMAGES = 4
SERIES_NUMBER = 9903
_WINDOWS = {"bct": (0.0, 80.0), "chestct": (-1350.0, 150.0)}


def render(pixels: np.ndarray, overlay01: np.ndarray, kind: str, monochrome1: bool = False) -> np.ndarray:
    """RGB uint8 of ``pixels`` (modality units) with ``overlay01`` (0..1) blended in."""
    img = np.asarray(pixels, dtype=np.float32)
    lo, hi = _WINDOWS.get(kind) or tuple(float(v) for v in np.percentile(img, (1, 99)))
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if monochrome1:
        grey = 1.0 - grey
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    colour = colormaps["inferno"](np.clip(overlay01, 0, 1))[..., :3]
    alpha = np.where(overlay01 >= 0.2, 0.5, 0.0)[..., None]
    out = rgb * (1 - alpha) + colour * alpha
    return np.round(out * 255).astype(np.uint8)


def _slices(inp_map: np.ndarray, lesions: Sequence[dict[str, object]]) -> list[int]:
    if inp_map.ndim == 2:
        return [0]
    picks: list[int] = []
    for le in sorted(lesions, key=lambda d: -float(d.get("volume_cm3", 0.0))):  # type: ignore[arg-type]
        ci = le.get("centroid_index")
        if isinstance(ci, list | tuple) and ci:
            k = int(np.clip(round(float(ci[0])), 0, inp_map.shape[0] - 1))
            if k not in picks:
                picks.append(k)
        if len(picks) == MAX_IMAGES:
            break
    if not picks:
        filled = np.where(np.isfinite(inp_map), inp_map, -np.inf)
        picks = [int(np.unravel_index(np.argmax(filled), filled.shape)[0])]
    return sorted(picks)


def build_key_images(ordered_sources: Sequence[Dataset], values: np.ndarray, *, kind: str, result_id: int,
                     version: int, lesions: Sequence[dict[str, object]],
                     equipment: Sequence[hd.ContributingEquipment], installation: str = "") -> list[Dataset]:
    """Secondary Capture images; ``ordered_sources`` in map order (with pixel data)."""
    norm, _, _ = normalise_map(values)
    series_uid = output_uid(result_id, version, "sc-series", installation)
    out: list[Dataset] = []
    for n, k in enumerate(_slices(np.asarray(values), lesions), 1):
        src = ordered_sources[k]
        pixels = apply_modality_lut(src.pixel_array, src)
        overlay = norm if norm.ndim == 2 else norm[k]
        rgb = render(pixels, overlay, kind, str(src.get("PhotometricInterpretation", "")) == "MONOCHROME1")
        po = src.get("PatientOrientation")
        orientation = (str(po[0]), str(po[1])) if po is not None and len(po) == 2 else _orientation(src)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=src, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SERIES_NUMBER,
            sop_instance_uid=output_uid(result_id, version, f"sc{n}", installation), instance_number=n,
            manufacturer=MANUFACTURER, patient_orientation=orientation or ("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian, contributing_equipment=list(equipment))
        sc.SeriesDescription = "AI triage key images (not for diagnosis)"
        sc.BurnedInAnnotation = "NO"
        if "Laterality" not in sc:
            sc.Laterality = ""  # Type 2C (General Series): unknown for an unpaired body part
        ref = Dataset()  # the slice it was made from
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        sc.SourceImageSequence = [ref]
        out.append(sc)
    return out


def _orientation(src: Dataset) -> tuple[str, str] | None:
    """Patient Orientation (row, column directions) from Image Orientation (Patient), LPS:
    the dominant axis of each direction cosine (an axial CT slice: ``L\\P``)."""
    iop = src.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    out = []
    for v in (iop[:3], iop[3:]):
        axis = int(np.argmax(np.abs(np.asarray(v, dtype=float))))
        out.append(letters[axis][int(float(v[axis]) > 0)])
    return out[0], out[1]
