"""Labelled DICOM folders: a site's own validation or test set, as DICOM plus ``labels.csv``.

The layout ``triage synth --dicom`` writes and a site can export from its PACS: any tree of
DICOM files under one folder, and at its top a ``labels.csv`` with a ``label`` column (0 normal,
1 abnormal), an optional ``finding`` column, and the series each row labels, named by
``series_instance_uid`` (or, where a study holds one image series, by ``study_instance_uid``).
Rows are matched by UID, not by order, so the folder's layout does not matter.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triage.imaging import Series, read_series_folder

LABELS_CSV = "labels.csv"
UID_COLUMNS = ("series_instance_uid", "study_instance_uid")


@dataclass
class LabelledSeries:
    """The image series of a labelled folder in reading order, with their labels."""

    series: list[Series]
    labels: np.ndarray  # int64, 0 normal / 1 abnormal
    findings: list[str]  # "normal" for every normal case


def has_labels(folder: Path) -> bool:
    return Path(folder).is_dir() and (Path(folder) / LABELS_CSV).is_file()


def _read_rows(path: Path) -> tuple[str, dict[str, tuple[int, str]]]:
    with path.open(encoding="utf-8-sig", newline="") as f:  # a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        cols = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = cols
        rows = list(reader)
    if "label" not in cols:
        raise ValueError(f"{path}: no 'label' column (columns: {', '.join(cols) or 'none'})")
    key = next((c for c in UID_COLUMNS if c in cols), None)
    if key is None:
        raise ValueError(f"{path}: name each row's series in a {' or '.join(UID_COLUMNS)} column")
    table: dict[str, tuple[int, str]] = {}
    for line, row in enumerate(rows, start=2):
        uid, label = (row.get(key) or "").strip(), (row.get("label") or "").strip()
        if not uid:
            raise ValueError(f"{path}, line {line}: empty {key}")
        if label not in ("0", "1"):
            raise ValueError(f"{path}, line {line}: label must be 0 (normal) or 1 (abnormal), got {label!r}")
        finding = (row.get("finding") or "").strip()
        if label == "1" and finding.lower() == "normal":
            raise ValueError(f"{path}, line {line}: label 1 (abnormal) but finding 'normal'")
        if uid in table:
            raise ValueError(f"{path}, line {line}: {key} {uid} is labelled twice")
        table[uid] = (int(label), "normal" if label == "0" else finding or "abnormal")
    if not table:
        raise ValueError(f"{path}: no rows")
    return key, table


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
                         f"{' or '.join(UID_COLUMNS)})")
    key, table = _read_rows(path)
    found = [s for s in read_series_folder(folder) if volumes is None or s.is_volume == volumes]
    if not found:
        raise ValueError(f"{folder}: no DICOM {'volumes' if volumes else 'images'} found")
    labels, findings, seen = [], [], set()
    for s in found:
        uid = s.series_instance_uid if key == "series_instance_uid" else s.study_instance_uid
        if uid not in table:
            raise ValueError(f"{path}: no row for {key} {uid} ({len(found)} series in the folder)")
        if uid in seen:
            raise ValueError(f"{path}: study {uid} holds more than one image series; label "
                             "each by series_instance_uid")
        seen.add(uid)
        labels.append(table[uid][0])
        findings.append(table[uid][1])
    unused = sorted(set(table) - seen)
    if unused:
        raise ValueError(f"{path}: {len(unused)} row(s) name no series in the folder (first: {unused[0]})")
    return LabelledSeries(found, np.asarray(labels, dtype=np.int64), findings)
