"""Labelled sets that are not phantom ``.npz`` files: a site's own validation or test data.

* **A folder with a ``labels.csv``** at its top: a ``label`` column (0 normal, 1 abnormal), an
  optional ``finding`` column, and what each row labels:

  - ``series_instance_uid`` (or, where a study holds one image series, ``study_instance_uid``):
    any tree of DICOM files, the layout ``triage synth --format dicom`` writes and a site can export
    from its PACS. Rows are matched by UID, so the folder's layout does not matter, and every
    series must have a row;
  - ``file``: a path relative to the folder of a PNG/JPEG/TIFF/BMP radiograph, a NIfTI
    volume or a ``.npy`` array (:mod:`triage.imagefiles`), with an optional ``mask`` column
    naming a lesion mask of the same size (nonzero = lesion), which gives the evaluation its
    hit rates. The rows are the set, in their order.

* **An ``.npz`` file** with an ``images`` array ``(N, *spatial)`` (or ``(N, 1, *spatial)``) and
  a ``labels`` array of 0/1; optional ``findings`` (N strings), ``masks`` (lesion masks, the
  shape of ``images``) and ``spacing`` (mm, one value per spatial axis, needed by the chest-CT
  patch maps). The phantom sets ``triage synth`` writes are such files with more arrays.
"""

from __future__ import annotations

import csv
import logging
import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import overload

import numpy as np

from triage.imaging import Series, SeriesFiles, scan_series_folder

log = logging.getLogger(__name__)

LABELS_CSV = "labels.csv"
UID_COLUMNS = ("series_instance_uid", "study_instance_uid")
FILE_COLUMN = "file"
KEY_COLUMNS = (*UID_COLUMNS, FILE_COLUMN)


@dataclass
class LabelledSeries:
    """The cases of a labelled set in reading order: labels and findings at once, the pixels
    of each case only when it is reached (:meth:`cases`), so a caller that keeps a reduced copy
    never holds the whole set's full-size images."""

    labels: np.ndarray  # int64, 0 normal / 1 abnormal
    findings: list[str]  # "normal" for every normal case
    readers: list[Callable[[], Series]]
    mask_readers: list[Callable[[Series], np.ndarray]] | None = None  # lesion masks, when given

    def __len__(self) -> int:
        return len(self.readers)

    @property
    def has_masks(self) -> bool:
        return self.mask_readers is not None

    def cases(self) -> Iterator[tuple[Series, np.ndarray | None]]:
        """Each case's series and its lesion mask (bool, the series' shape; None without)."""
        for i, read in enumerate(self.readers):
            s = read()
            yield s, self.mask_readers[i](s) if self.mask_readers is not None else None

    def __iter__(self) -> Iterator[Series]:
        return (read() for read in self.readers)


@dataclass(frozen=True)
class NamedReader:
    """Reads one case when called; ``name`` says where it is (its file, or its DICOM folder and
    series), so that a problem found later, in preprocessing or training, can name it."""

    name: str
    read: Callable[[], Series]

    def __call__(self) -> Series:
        return self.read()


def _series_reader(g: SeriesFiles) -> NamedReader:
    return NamedReader(g.name, g.read)


def folder_readers(folder: Path, *, volumes: bool | None = None) -> list[Callable[[], Series]]:
    """One reader per image series under ``folder``, nothing read yet but DICOM headers: its
    DICOM series (grouped from their headers), then its picture and NIfTI files. With
    ``volumes=True`` only what reads as a 3D volume (DICOM CT/MR/..., NIfTI), with ``False``
    only 2D images (projection radiographs, pictures)."""
    from triage.imagefiles import image_file_paths, read_image_file

    readers: list[Callable[[], Series]] = [_series_reader(g) for g in scan_series_folder(folder)
                                           if _kind_ok(g, volumes)]
    kinds = {None: {"picture", "nifti"}, True: {"nifti"}, False: {"picture"}}[volumes]
    paths = image_file_paths(folder, kinds=frozenset(kinds))
    _warn_same_names(folder, paths)
    readers += [NamedReader(str(p.relative_to(folder)), partial(read_image_file, p, root=folder))
                for p in paths]
    return readers


def _warn_same_names(folder: Path, paths: Sequence[Path]) -> None:
    """Two files of one name but for the format (a.nii and a.nii.gz, a.png and a.tif) are
    usually one image saved twice: read both, but say so (it weighs that case twice)."""
    from triage.imagefiles import NIFTI_SUFFIXES, PICTURE_SUFFIXES

    def stem(p: Path) -> str:
        name = p.name.lower()
        for suffix in (*NIFTI_SUFFIXES[::-1], *PICTURE_SUFFIXES, ".npy"):
            if name.endswith(suffix):
                return str(p.parent / name[: -len(suffix)])
        return str(p)

    seen: dict[str, Path] = {}
    twice = []
    for p in paths:
        if stem(p) in seen:
            twice.append((seen[stem(p)], p))
        seen.setdefault(stem(p), p)
    if twice:
        a, b = twice[0]
        log.warning("%s: %d image(s) stored twice under one name (first: %s and %s); both are read",
                    folder, len(twice), a.relative_to(folder), b.relative_to(folder))


class Volumes(Sequence[tuple[np.ndarray, tuple[float, float, float]]]):
    """CT volumes with their spacing, each read from disk when it is indexed and not kept:
    what :mod:`flows.patchbundle` trains and calibrates on (a ``VolumeSet``), so a training
    set of hundreds of full-size CTs needs the memory of one."""

    def __init__(self, readers: Sequence[Callable[[], Series]]) -> None:
        self.readers = list(readers)

    def __len__(self) -> int:
        return len(self.readers)

    def describe(self, i: int) -> str:
        """Where case ``i`` comes from (read nothing): for flows.patchbundle's messages."""
        return str(getattr(self.readers[i], "name", f"case {i + 1}"))

    @overload
    def __getitem__(self, i: int) -> tuple[np.ndarray, tuple[float, float, float]]: ...
    @overload
    def __getitem__(self, i: slice) -> Volumes: ...

    def __getitem__(self, i: int | slice) -> tuple[np.ndarray, tuple[float, float, float]] | Volumes:
        if isinstance(i, slice):
            return Volumes(self.readers[i])
        s = self.readers[i]()  # flows checks the HU and names the volume (describe)
        if not s.is_volume:
            raise ValueError(f"{case_name(s)} is not a volume (shape {s.array.shape})")
        sz, sy, sx = (float(x) for x in s.spacing)
        return s.array, (sz, sy, sx)


def _upright_by_shape(image: tuple[int, ...], mask: tuple[int, ...], orientation: int) -> bool:
    """Whether an image and its mask read upright must line up although only one carried an EXIF
    Orientation: a quarter turn (5-8) of a non-square picture changes its shape, so equal shapes
    after reading mean both are upright."""
    return orientation in (5, 6, 7, 8) and len(set(image)) > 1 and tuple(image) == tuple(mask)


def _same_geometry(a: Series, b: Series, tol_mm: float = 0.01) -> bool | None:
    """Whether two volumes' voxels lie at the same patient positions; True when neither says
    (pictures, .npy arrays), None when only one does."""
    from triage.orientation import volume_affine

    known = [s.origin is not None and s.direction is not None for s in (a, b)]
    if not all(known):
        return True if not any(known) else None
    return bool(np.allclose(volume_affine(a), volume_affine(b), rtol=0.0, atol=tol_mm))


def case_name(s: Series) -> str:
    """Where a case of a site's set came from, for messages: its file, or its DICOM folder and
    series (one folder may hold several)."""
    return str(s.meta.get("source_file") or s.meta.get("source") or f"series {s.series_instance_uid}")


def has_labels(path: Path) -> bool:
    """A folder with a labels.csv, or an .npz with a labels array."""
    path = Path(path)
    if path.is_dir():
        return (path / LABELS_CSV).is_file()
    if path.is_file() and path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return "labels" in z.files
    return False


@dataclass
class _Row:
    label: int
    finding: str
    mask: str


def _read_rows(path: Path) -> tuple[str, dict[str, _Row]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:  # a spreadsheet's byte-order mark
            reader = csv.DictReader(f)
            cols = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = cols
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start}); save it as UTF-8 (CSV UTF-8 in a spreadsheet)") from exc
    if "label" not in cols:
        raise ValueError(f"{path}: no 'label' column (columns: {', '.join(cols) or 'none'})")
    key = next((c for c in KEY_COLUMNS if c in cols), None)
    if key is None:
        raise ValueError(f"{path}: name each row's series in a {' or '.join(UID_COLUMNS)} column, "
                         f"or its image file in a '{FILE_COLUMN}' column")
    if "mask" in cols and key != FILE_COLUMN:
        raise ValueError(f"{path}: a 'mask' column goes with a '{FILE_COLUMN}' column")
    table: dict[str, _Row] = {}
    relabelled: list[tuple[int, str]] = []
    for line, row in enumerate(rows, start=2):
        uid, label = (row.get(key) or "").strip(), (row.get("label") or "").strip()
        if not uid:
            raise ValueError(f"{path}, line {line}: empty {key}")
        if label not in ("0", "1"):
            raise ValueError(f"{path}, line {line}: label must be 0 (normal) or 1 (abnormal), got {label!r}")
        finding = (row.get("finding") or "").strip()
        if label == "1" and finding.lower() == "normal":
            raise ValueError(f"{path}, line {line}: label 1 (abnormal) but finding 'normal'")
        if label == "0" and finding.lower() not in ("", "normal"):
            relabelled.append((line, finding))  # "No Finding", "negative": label 0 decides
        if key == FILE_COLUMN:  # one file, one key: ./a.png and a.png are the same image
            uid = posixpath.normpath(uid)
        if uid in table:
            raise ValueError(f"{path}, line {line}: {key} {uid} is labelled twice")
        table[uid] = _Row(int(label), "normal" if label == "0" else finding or "abnormal",
                          (row.get("mask") or "").strip())
    if not table:
        raise ValueError(f"{path}: no rows")
    if relabelled:
        names = sorted({f for _, f in relabelled})
        log.warning("%s: %d row(s) with label 0 name a finding (%s; first on line %d); label 0 is "
                    "read as normal", path, len(relabelled), ", ".join(repr(n) for n in names[:3]),
                    relabelled[0][0])
    return key, table


def _kind_ok(s: Series | SeriesFiles, volumes: bool | None) -> bool:
    return volumes is None or s.is_volume == volumes


def _what(volumes: bool | None) -> str:
    return "volumes" if volumes else "images" if volumes is False else "images or volumes"


def read_labelled(path: Path, *, volumes: bool | None = None) -> LabelledSeries:
    """A labelled folder (:func:`read_labelled_folder`) or a labelled ``.npz``
    (:func:`read_labelled_npz`)."""
    path = Path(path)
    if path.is_dir():
        return read_labelled_folder(path, volumes=volumes)
    if path.is_file() and path.suffix == ".npz":
        return read_labelled_npz(path, volumes=volumes)
    raise ValueError(f"{path}: not a labelled set (a folder with a {LABELS_CSV}, or an .npz with "
                     "images and labels arrays)")


def read_labelled_folder(folder: Path, *, volumes: bool | None = None) -> LabelledSeries:
    """The image series under ``folder`` (only 3D volumes with ``volumes=True``, only 2D images
    with ``False``) and their labels from its ``labels.csv``.

    Every series kept must have a row and every row a series, else a ValueError names the
    first one missing: a test set that silently loses cases would report a wrong AUROC.
    """
    folder = Path(folder)
    path = folder / LABELS_CSV
    if not path.is_file():
        raise ValueError(f"{folder}: no {LABELS_CSV} (columns label, finding and "
                         f"{' or '.join(KEY_COLUMNS)})")
    key, table = _read_rows(path)
    if key == FILE_COLUMN:
        return _read_file_rows(folder, table, volumes)
    every = scan_series_folder(folder)
    found = [g for g in every if _kind_ok(g, volumes)]
    if not found:
        other = (f" ({len(every)} series of modality {', '.join(sorted({g.modality or '?' for g in every}))} "
                 f"read as {_what(not volumes)})" if every and volumes is not None else "")
        raise ValueError(f"{folder}: no DICOM {_what(volumes)} found{other}")
    labels, findings, seen = [], [], set()
    for g in found:
        uid = g.series_instance_uid if key == "series_instance_uid" else g.study_instance_uid
        if uid not in table:
            raise ValueError(f"{path}: no row for {key} {uid} ({len(found)} series in the folder)")
        if uid in seen:
            raise ValueError(f"{path}: study {uid} holds more than one image series; label "
                             "each by series_instance_uid")
        seen.add(uid)
        labels.append(table[uid].label)
        findings.append(table[uid].finding)
    unused = sorted(set(table) - seen)
    if unused:
        raise ValueError(f"{path}: {len(unused)} row(s) name no series in the folder (first: {unused[0]})")
    return LabelledSeries(np.asarray(labels, dtype=np.int64), findings, [_series_reader(g) for g in found])


def _inside(folder: Path, rel: str, line: str) -> Path:
    p = (folder / rel).resolve()
    if not p.is_relative_to(folder.resolve()):
        raise ValueError(f"{folder / LABELS_CSV}, {line}: {rel} is outside the folder")
    return p


def _read_file_rows(folder: Path, table: dict[str, _Row], volumes: bool | None) -> LabelledSeries:
    from triage.imagefiles import image_file_kind, image_file_paths, read_image_file

    csv_path = folder / LABELS_CSV
    with_masks = sum(bool(r.mask) for r in table.values())
    if with_masks not in (0, len(table)):
        raise ValueError(f"{csv_path}: {with_masks} of {len(table)} rows name a mask; "
                         "give every row one (an all-zero mask for a normal case) or none")
    root = folder.resolve()
    for rel, row in table.items():  # every file there and readable by name, before any pixels
        for name in (rel, row.mask) if row.mask else (rel,):
            p = _inside(folder, name, f"row {rel}")
            if not p.is_file():
                raise ValueError(f"{csv_path}, row {rel}: {name}: no such file")
            if image_file_kind(p) is None:
                raise ValueError(f"{csv_path}, row {rel}: {name}: not an image file this node reads "
                                 "(PNG, JPEG, TIFF, BMP, NIfTI, .npy)")

    named = {(root / r).resolve() for rel, row in table.items() for r in (rel, row.mask) if r}
    kinds = {None: {"picture", "nifti", "npy"}, True: {"nifti", "npy"}, False: {"picture", "npy"}}[volumes]
    unlisted = [p for p in image_file_paths(folder, kinds=frozenset(kinds)) if p.resolve() not in named]
    if unlisted:  # a subset of a folder is a set; say so, so that no case is lost unseen
        log.warning("%s lists %d image file(s); %d other(s) in the folder are not in the set "
                    "(first: %s)", csv_path, len(table), len(unlisted), unlisted[0].relative_to(folder))

    def reader(rel: str) -> Callable[[], Series]:
        def read() -> Series:
            s = read_image_file(root / rel, root=root)
            if not _kind_ok(s, volumes):
                raise ValueError(f"{csv_path}: {rel} is a {s.array.ndim}D array; this set needs "
                                 f"{_what(volumes)}")
            return s
        return NamedReader(rel, read)

    def mask_reader(rel: str, mask: str) -> Callable[[Series], np.ndarray]:
        def read(s: Series) -> np.ndarray:
            ms = read_image_file(root / mask, root=root, mask=True)
            m = ms.array
            turned = (s.meta.get("exif_orientation", 1), ms.meta.get("exif_orientation", 1))
            # one of the two was turned upright on reading: fine only where the shapes prove the
            # other was stored upright (a quarter turn of a non-square image)
            if turned[0] != turned[1] and not _upright_by_shape(s.array.shape, m.shape, max(turned)):
                raise ValueError(f"{csv_path}: {rel} carries EXIF Orientation {turned[0]} and its mask "
                                 f"{mask} {turned[1]}: they may not line up; save both upright")
            if m.shape != s.array.shape:
                raise ValueError(f"{csv_path}: the mask {mask} has shape {m.shape}, its image "
                                 f"{rel} {s.array.shape}")
            same = _same_geometry(ms, s)
            if same is False:  # same shape, another place: a mirrored mask, say
                raise ValueError(f"{csv_path}: the mask {mask} lies elsewhere in the patient than "
                                 f"its image {rel} (their affines differ); save the mask with the "
                                 "image's affine")
            if same is None:
                log.warning("%s: only one of %s and its mask %s says where it lies in the patient; "
                            "taken as aligned voxel for voxel", csv_path, rel, mask)
            return m != 0
        return read

    rows = list(table.items())
    return LabelledSeries(np.asarray([r.label for _, r in rows], dtype=np.int64),
                          [r.finding for _, r in rows], [reader(rel) for rel, _ in rows],
                          [mask_reader(rel, r.mask) for rel, r in rows] if with_masks else None)


def read_labelled_npz(path: Path, *, volumes: bool | None = None) -> LabelledSeries:
    """An ``.npz`` with ``images`` and ``labels`` (and optionally ``findings``, ``masks``,
    ``spacing``) as a labelled set."""
    from triage.imagefiles import make_series

    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("images", "labels") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: no {' or '.join(missing)} array "
                             f"(arrays: {', '.join(z.files) or 'none'})")
        images, labels = np.asarray(z["images"]), np.asarray(z["labels"])
        findings = [str(f) for f in z["findings"].tolist()] if "findings" in z.files else None
        masks = np.asarray(z["masks"]) if "masks" in z.files else None
        spacing = np.asarray(z["spacing"], dtype=np.float64).ravel() if "spacing" in z.files else None
    if images.ndim >= 3 and images.shape[1] == 1 and images.ndim in (4, 5):
        images = images[:, 0]
    if images.ndim not in (3, 4):
        raise ValueError(f"{path}: images of shape {images.shape}; expected (N, H, W) or (N, D, H, W)")
    n = images.shape[0]
    if labels.shape != (n,) or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{path}: labels must be {n} values of 0 (normal) or 1 (abnormal), "
                         f"got shape {labels.shape}")
    if findings is not None and len(findings) != n:
        raise ValueError(f"{path}: {len(findings)} findings for {n} images")
    if findings is None:
        findings = ["abnormal" if v else "normal" for v in labels]
    bad = [i for i, (v, f) in enumerate(zip(labels, findings, strict=True)) if (f == "normal") == bool(v)]
    if bad:
        i = bad[0]
        raise ValueError(f"{path}: image {i} has label {labels[i]} but finding {findings[i]!r}")
    nd = images.ndim - 1
    if spacing is not None and (spacing.size != nd or not np.all(np.isfinite(spacing))
                                or np.any(spacing <= 0)):
        raise ValueError(f"{path}: spacing must be {nd} positive values in mm, got {spacing.tolist()}")
    sp = tuple(float(v) for v in spacing) if spacing is not None else (float("nan"),) * nd
    if masks is not None:
        if masks.ndim == images.ndim + 1 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.shape != images.shape:
            raise ValueError(f"{path}: masks of shape {masks.shape} for images of shape {images.shape}")
    if volumes is not None and (nd == 3) != volumes:
        raise ValueError(f"{path}: {nd}D images; this set needs {_what(volumes)}")

    def reader(i: int) -> Callable[[], Series]:
        return lambda: make_series(images[i], sp, f"{path.name}[{i}]", "OT")

    def mask_reader(i: int) -> Callable[[Series], np.ndarray]:
        assert masks is not None
        return lambda _s: np.asarray(masks[i]) != 0

    return LabelledSeries(labels.astype(np.int64), findings, [reader(i) for i in range(n)],
                          [mask_reader(i) for i in range(n)] if masks is not None else None)
