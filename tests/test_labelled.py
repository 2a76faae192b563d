"""Labelled DICOM folders (DICOM studies + labels.csv) as validation and test sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.bundle import Bundle
from flows.phantoms import make_cxr
from triage.cli import app
from triage.labelled import LABELS_CSV, read_labelled_folder
from triage.phantom_dicom import write_dicom_studies

runner = CliRunner()


@pytest.fixture(scope="module")
def cxr_studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same 16 phantom radiographs as a .npz and as DICOM studies + labels.csv."""
    root = tmp_path_factory.mktemp("labelled")
    ps = make_cxr(16, size=32, abnormal_fraction=0.5, seed=5)
    ps.save_npz(root / "set.npz")
    write_dicom_studies(ps, root / "dicom", seed=5)
    return root / "set.npz", root / "dicom"


def _rewrite(folder: Path, rows: list[dict[str, str]], cols: list[str]) -> None:
    with (folder / LABELS_CSV).open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _rows(folder: Path) -> tuple[list[dict[str, str]], list[str]]:
    with (folder / LABELS_CSV).open(encoding="utf-8", newline="") as f:
        r = csv.DictReader(f)
        return list(r), list(r.fieldnames or [])


def test_labels_follow_the_series_not_the_row_order(cxr_studies: tuple[Path, Path], tmp_path: Path) -> None:
    from flows.phantoms import PhantomSet

    npz, folder = cxr_studies
    ps = PhantomSet.load_npz(npz)
    ls = read_labelled_folder(folder, volumes=False)
    assert ls.labels.tolist() == ps.labels.tolist() and ls.findings == ps.findings
    copy = tmp_path / "shuffled"
    import shutil

    shutil.copytree(folder, copy)
    rows, _ = _rows(copy)
    _rewrite(copy, rows[::-1], ["series_instance_uid", "finding", "label"])  # another order, no case
    again = read_labelled_folder(copy, volumes=False)
    assert again.labels.tolist() == ls.labels.tolist() and again.findings == ls.findings


@pytest.mark.parametrize("edit, msg", [
    (lambda rows: rows[1:], "no row for series_instance_uid"),
    (lambda rows: [*rows, {**rows[0], "series_instance_uid": "1.2.3"}], "name no series in the folder"),
    (lambda rows: [{**rows[0], "label": "2"}, *rows[1:]], r"label must be 0 \(normal\) or 1"),
    (lambda rows: [*rows, rows[0]], "labelled twice"),
])
def test_a_label_table_that_does_not_match_the_folder_is_refused(
        cxr_studies: tuple[Path, Path], tmp_path: Path, edit: object, msg: str) -> None:
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(cxr_studies[1], copy)
    rows, cols = _rows(copy)
    _rewrite(copy, edit(rows), cols)  # type: ignore[operator]
    with pytest.raises(ValueError, match=msg):
        read_labelled_folder(copy)


def test_a_label_table_needs_uids_and_labels(tmp_path: Path) -> None:
    tmp_path.joinpath(LABELS_CSV).write_text("case,label\n0,1\n")
    with pytest.raises(ValueError, match="series_instance_uid or study_instance_uid column"):
        read_labelled_folder(tmp_path)
    tmp_path.joinpath(LABELS_CSV).write_text("series_instance_uid,finding\n1.2,normal\n")
    with pytest.raises(ValueError, match="no 'label' column"):
        read_labelled_folder(tmp_path)
    tmp_path.joinpath(LABELS_CSV).write_text("\ufeffseries_instance_uid,label\n1.2,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no DICOM images or volumes found"):  # header read despite the BOM
        read_labelled_folder(tmp_path)
    tmp_path.joinpath(LABELS_CSV).unlink()
    with pytest.raises(ValueError, match=r"no labels\.csv"):
        read_labelled_folder(tmp_path)


def test_evaluate_reads_a_labelled_dicom_folder_like_its_npz(
        cxr_studies: tuple[Path, Path], tiny_bundle: Bundle, tmp_path: Path) -> None:
    npz, folder = cxr_studies
    for data, out in ((npz, tmp_path / "npz"), (folder, tmp_path / "dicom")):
        res = runner.invoke(app, ["evaluate", "--bundle", str(tiny_bundle.path), "--data", str(data),
                                  "--out", str(out), "--n-boot", "50"])
        assert res.exit_code == 0, (res.output, res.exception)
    a = json.loads((tmp_path / "npz" / "summary.json").read_text())["scores"]
    b = json.loads((tmp_path / "dicom" / "summary.json").read_text())["scores"]
    assert set(a) == set(b)
    for name in a:  # 12-bit DICOM pixels against float ones: the same cases, the same ranking
        assert np.isclose(a[name]["overall"]["auc"], b[name]["overall"]["auc"], atol=0.02), name
    assert "Localisation" not in (tmp_path / "dicom" / "summary.md").read_text()  # no lesion masks


def test_evaluate_reports_a_class_too_small_for_an_auroc(tiny_bundle: Bundle, tmp_path: Path) -> None:
    from tests.conftest import blobs

    imgs, _ = blobs(6, (16, 16), seed=7)
    labels = np.array([0, 0, 0, 0, 0, 1])
    np.savez(tmp_path / "one_abnormal.npz", images=imgs, labels=labels)
    res = runner.invoke(app, ["evaluate", "--bundle", str(tiny_bundle.path), "--n-boot", "20",
                              "--data", str(tmp_path / "one_abnormal.npz"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "n/a (1 abnormal, 5 normal)" in " ".join(res.output.split())
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["scores"]["posterior"]["overall"]["auc"] is None
    np.savez(tmp_path / "normals.npz", images=imgs, labels=np.zeros(6, dtype=int))
    res = runner.invoke(app, ["evaluate", "--bundle", str(tiny_bundle.path), "--data",
                              str(tmp_path / "normals.npz"), "--out", str(tmp_path / "o2")])
    assert res.exit_code != 0
    assert "all 6 cases are label 0 (normal); this report needs both classes" in " ".join(res.output.split())


def test_training_reads_dicom_radiographs_of_different_sizes(tmp_path: Path) -> None:
    from flows.presets import get_preset
    from triage.cli import _load_set

    for size, seed in ((32, 1), (48, 2)):
        write_dicom_studies(make_cxr(3, size=size, seed=seed), tmp_path / "set" / str(size), seed=seed)
    imgs, labels, _ = _load_set(tmp_path / "set", get_preset("tiny-cxr").preprocessing)
    assert np.asarray(imgs).shape == (6, 1, 16, 16) and labels is None
    res = runner.invoke(app, ["train", "--preset", "tiny-cxr", "--data", str(tmp_path / "set"),
                              "--out", str(tmp_path / "m"), "--epochs", "1"])
    assert res.exit_code == 0, (res.output, res.exception)


def test_a_labelled_folder_reads_pixels_one_case_at_a_time(
        cxr_studies: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels are matched from the headers; each case's pixels are read only when reached, so
    evaluating thousands of full-size radiographs never holds more than one at a time."""
    import triage.imaging as imaging

    calls: list[int] = []
    real = imaging.read_series
    monkeypatch.setattr(imaging, "read_series",
                        lambda files, **kw: calls.append(len(files)) or real(files, **kw))
    ls = read_labelled_folder(cxr_studies[1], volumes=False)
    assert len(ls) == 16 and calls == []
    it = ls.cases()
    series, mask = next(it)
    assert calls == [1] and series.array.ndim == 2 and mask is None
    assert sum(1 for _ in it) == 15 and len(calls) == 16
