"""Image files that are not DICOM: what an ML engineer's exported data set is usually made of.

* **Radiographs** as PNG, JPEG, TIFF or BMP (8- or 16-bit greyscale; an RGB file is accepted
  only when its three channels are the same grey, since a colour picture is not a radiograph),
  turned upright by their EXIF Orientation where they carry one.
  Higher values are denser (whiter), as in a display-ready export; the spacing is unknown (NaN).
* **Volumes** as NIfTI (``.nii``, ``.nii.gz``): the voxel values after the header's scaling
  (CT in Hounsfield units, as dcm2niix writes them), brought onto the axis convention of an
  axial DICOM series as :mod:`triage.imaging` reads it: ``(D, H, W)`` with slices from feet to
  head, rows from anterior to posterior and columns from the patient's right to left, the
  spacing from the header's zooms and the origin and direction cosines in patient LPS
  coordinates. A NIfTI whose third axis has one voxel is a 2D image.
* One image per ``.npy`` file, taken as stored (no spacing). A *folder* of ``.npy``/``.npz``
  batches is :func:`flows.train.load_images`' business, not this module's.

Each file becomes a :class:`triage.imaging.Series` whose UIDs are the file's path relative to
the folder it was listed from (no DICOM UIDs exist), so callers treat DICOM series and image
files alike.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from triage.imaging import MAX_OUTPUT_BYTES, MAX_SIDE, ImagingError, Series
from triage.orientation import canonical_volume

__all__ = ["PICTURE_SUFFIXES", "image_file_kind", "image_file_paths", "make_series", "read_image_file"]

log = logging.getLogger(__name__)

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_GREY_TOLERANCE = 0.02  # RGB channels within 2 % of the range count as one grey
_EXIF_ORIENTATION = 0x0112  # EXIF tag: how the stored pixels are turned for display
_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "RGB", "RGBA"}  # PIL modes read


def image_file_kind(path: Path) -> str | None:
    """"picture", "nifti", "npy" or None (not an image file this module reads)."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(PICTURE_SUFFIXES):
        return "picture"
    if name.endswith(".npy"):
        return "npy"
    return None


def make_series(arr: np.ndarray, spacing: tuple[float, ...], name: str, modality: str,
            origin: tuple[float, float, float] | None = None,
            direction: tuple[float, ...] | None = None) -> Series:
    if arr.ndim not in (2, 3):
        raise ImagingError(f"{name}: {arr.ndim}D array of shape {arr.shape}; expected a 2D image "
                           "or a 3D volume")
    if any(s < 1 or s > MAX_SIDE for s in arr.shape):
        raise ImagingError(f"{name}: size {arr.shape} outside 1..{MAX_SIDE} per axis")
    if arr.size * 4 > MAX_OUTPUT_BYTES:
        raise ImagingError(f"{name}: {arr.size} voxels exceed the {MAX_OUTPUT_BYTES >> 30} GiB limit")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ImagingError(f"{name}: {int((~np.isfinite(out)).sum())} NaN/inf value(s)")
    return Series(array=out, spacing=spacing, modality=modality, series_instance_uid=name,
                  study_instance_uid=name, sop_instance_uids=[], origin=origin,
                  direction=direction, meta={"source_file": name})


def _read_picture(path: Path, name: str, binary_ok: bool = False) -> Series:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as f:
            frames = int(getattr(f, "n_frames", 1))
            if frames > 1:
                raise ImagingError(f"{name}: {frames} pages; store one image per file")
            im: Image.Image = f
            turned = int(im.getexif().get(_EXIF_ORIENTATION, 1))
            if turned != 1:  # a camera or phone export: stored turned
                im = ImageOps.exif_transpose(im)
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            mode = im.mode
            if mode not in _MODES:
                raise ImagingError(f"{name}: {mode} pixels; store radiographs as greyscale (L, I;16) "
                                   "or grey RGB")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise ImagingError(f"{name}: unreadable image file ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 3:  # L+alpha, RGB(A): the alpha channel carries no anatomy
        colour = arr[..., :3] if arr.shape[2] >= 3 else arr[..., :1]
        span = float(np.ptp(colour)) or 1.0
        spread = float(np.ptp(colour.astype(np.float32), axis=2).max())  # between channels
        if colour.shape[2] == 3 and spread > _GREY_TOLERANCE * span:
            raise ImagingError(f"{name}: a colour image ({mode}); radiographs must be greyscale")
        arr = colour.astype(np.float32).mean(axis=2)
    if mode == "1" and not binary_ok:
        raise ImagingError(f"{name}: a 1-bit image; radiographs need grey levels")
    s = make_series(arr, (float("nan"), float("nan")), name, "OT")
    s.meta["exif_orientation"] = turned
    return s


def _read_nifti(path: Path, name: str) -> Series:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img: Any = nib.load(str(path))
        shape = img.shape
        if len(shape) == 4 and shape[3] == 1:
            img = img.slicer[..., 0]
        elif len(shape) not in (2, 3):
            raise ImagingError(f"{name}: NIfTI of shape {shape}; one 2D image or 3D volume per file")
        data = np.asarray(img.get_fdata(dtype=np.float32))
        if data.ndim == 2:
            data = data[..., None]
        affine = np.asarray(img.affine, dtype=np.float64)
    except (ImageFileError, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, ImagingError):
            raise
        raise ImagingError(f"{name}: unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # voxel size along i, j, k
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise ImagingError(f"{name}: the header's voxel size {zooms.tolist()} is not positive")
    # as stored: (k, j, i) as (slice, row, column), the affine's RAS turned into DICOM's LPS; then
    # the one axis order every volume reaches the models in (triage.orientation)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    cosines = [lps[:3, a] / zooms[a] for a in (0, 1, 2)]  # column (i), row (j), slice (k) directions
    stored = make_series(data.transpose(2, 1, 0), (float(zooms[2]), float(zooms[1]), float(zooms[0])),
                         name, "OT", origin=(float(lps[0, 3]), float(lps[1, 3]), float(lps[2, 3])),
                         direction=tuple(float(v) for v in np.concatenate(cosines)))
    s = canonical_volume(stored)[0]
    if s.array.shape[0] == 1:  # one axial slice: a 2D image
        return make_series(s.array[0], (float(s.spacing[1]), float(s.spacing[2])), name, "OT")
    s.meta = {"source_file": name}
    return s


def _read_npy(path: Path, name: str) -> Series:
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise ImagingError(f"{name}: unreadable .npy file ({exc})") from exc
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ImagingError(f"{name}: array of dtype {arr.dtype}; images must be real numbers")
    arr = np.squeeze(arr)
    nan = float("nan")
    return make_series(np.asarray(arr), (nan,) * arr.ndim, name, "OT")


def read_image_file(path: Path, *, root: Path | None = None, mask: bool = False) -> Series:
    """One image file as a :class:`Series`; ``root`` makes its name (and UIDs) relative.
    ``mask``: a lesion mask, which may be a 1-bit picture."""
    path = Path(path)
    name = str(path.relative_to(root)) if root is not None else path.name
    if not path.is_file():
        raise ImagingError(f"{name}: no such file")
    kind = image_file_kind(path)
    if kind == "picture":
        return _read_picture(path, name, binary_ok=mask)
    if kind == "nifti":
        return _read_nifti(path, name)
    if kind == "npy":
        return _read_npy(path, name)
    raise ImagingError(f"{name}: not an image file this node reads (PNG, JPEG, TIFF, BMP, NIfTI, .npy)")


def image_file_paths(folder: Path, *, kinds: frozenset[str] = frozenset({"picture", "nifti"})
                     ) -> list[Path]:
    """The image files under ``folder`` of the given kinds ("picture", "nifti", "npy"), in
    sorted path order; nothing is read but their names."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and image_file_kind(p) in kinds)
