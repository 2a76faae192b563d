"""Write a phantom set (``flows.phantoms``) as the image files a site's data often come in.

Radiographs as PNG (16- or 8-bit) or JPEG pictures, CT volumes as NIfTI files, each case with
its lesion mask beside it and a ``labels.csv`` naming both: the labelled-folder form
:mod:`triage.labelled` reads (``file,label,finding,mask``). So the file paths of the node
(``triage train`` from folders, ``triage evaluate`` with a site's own lesion outlines) can be
tried, tested and benchmarked on phantoms exactly as a site's export would be.

* pictures hold display intensity (higher = whiter = denser), [0, 1] → 0..65535 (``png``),
  0..255 (``png8``, ``jpeg`` at ``quality``); masks are 8-bit PNG, 255 = lesion;
* NIfTI volumes hold Hounsfield units as float32 (lossless: a set trains and evaluates from
  them exactly as from its ``.npz``), stored (column, row, slice) with an affine to RAS as a
  converter writes an axial series (:mod:`triage.imagefiles` reorients them back); masks are
  uint8 NIfTI on the same grid.

Files are named by case number only (``00000.png``, ``00000-mask.png``), so writing the same
set twice gives the same names; a folder holding anything else is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from flows.phantoms import PhantomSet

PICTURE_FORMATS = ("png", "png8", "jpeg")
FILE_FORMATS = (*PICTURE_FORMATS, "nifti")
_EXT = {"png": ".png", "png8": ".png", "jpeg": ".jpg", "nifti": ".nii.gz"}
_OURS = re.compile(r"^(\d{5}(-mask)?\.(png|jpg|nii\.gz)|labels\.csv)$")


def _prepare(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list(out_dir.iterdir())
    foreign = sorted(e.name for e in entries if not (e.is_file() and _OURS.match(e.name)))
    if foreign:
        raise FileExistsError(f"{out_dir} is not empty and is not an earlier phantom file output "
                              f"({', '.join(foreign[:5])}); choose an empty or new folder")
    for e in entries:  # an earlier output: replaced, so no stale case survives
        e.unlink()


def _picture(img01: np.ndarray, fmt: str) -> np.ndarray:
    x = np.clip(img01, 0.0, 1.0)
    if fmt == "png":
        return np.round(x * 65535).astype(np.uint16)
    return np.round(x * 255).astype(np.uint8)


def _ras_affine(spacing: tuple[float, ...]) -> np.ndarray:
    """Array axes (slice feet → head, row anterior → posterior, column right → left), stored
    transposed as (column, row, slice): x runs R → L and y A → P, i.e. −RAS x and y."""
    sz, sy, sx = (float(s) for s in spacing)
    return np.diag([-sx, -sy, sz, 1.0])


def write_image_files(ps: PhantomSet, out_dir: Path, fmt: str, *, quality: int = 90,
                      labelled: bool = True) -> Path:
    """Every case of ``ps`` as one ``fmt`` file and its mask under ``out_dir``, and a
    ``labels.csv`` naming both; with ``labelled=False`` the images alone, as a site's training
    folder holds them. Returns ``out_dir``."""
    if fmt not in FILE_FORMATS:
        raise ValueError(f"unknown image file format {fmt!r}; use one of {', '.join(FILE_FORMATS)}")
    volumes = ps.images.ndim == 5
    if volumes != (fmt == "nifti"):
        what = "CT volumes" if volumes else "radiographs"
        raise ValueError(f"{what} cannot be written as {fmt}: NIfTI is for volumes, "
                         f"{'/'.join(PICTURE_FORMATS)} for radiographs")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1-100, got {quality}")
    out_dir = Path(out_dir)
    _prepare(out_dir)
    rows = ["file,label,finding,mask"]
    ext = _EXT[fmt]
    for i in range(len(ps)):
        name, mask = f"{i:05d}{ext}", f"{i:05d}-mask{ext if volumes else '.png'}"
        if volumes:
            import nibabel as nib

            aff = _ras_affine(ps.spacing)
            vol = np.ascontiguousarray(ps.images[i, 0].transpose(2, 1, 0), dtype=np.float32)
            nib.save(nib.Nifti1Image(vol, aff), out_dir / name)
            if not labelled:
                continue
            m = np.ascontiguousarray(ps.masks[i, 0].transpose(2, 1, 0), dtype=np.uint8)
            nib.save(nib.Nifti1Image(m, aff), out_dir / mask)
        else:
            from PIL import Image

            pic = Image.fromarray(_picture(ps.images[i, 0], fmt))
            if fmt == "jpeg":
                pic.save(out_dir / name, quality=quality)
            else:
                pic.save(out_dir / name)
            if not labelled:
                continue
            Image.fromarray(ps.masks[i, 0].astype(np.uint8) * 255).save(out_dir / mask)
        rows.append(f"{name},{int(ps.labels[i])},{ps.findings[i]},{mask}")
    if labelled:
        (out_dir / "labels.csv").write_text("\n".join(rows) + "\n")
    return out_dir
