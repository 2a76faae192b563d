"""Image files that are not DICOM (PNG/JPEG/TIFF radiographs, NIfTI volumes) and labelled sets
made of them: the exports an ML engineer trains and evaluates on."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.bundle import Bundle
from flows.phantoms import PhantomSet, make_cxr
from tests import dicomgen
from triage.cli import app
from triage.imagefiles import read_image_file
from triage.imaging import ImagingError, read_series_folder
from triage.labelled import LABELS_CSV, read_labelled
from triage.phantom_files import write_image_files

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_greyscale_pictures_keep_their_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    a16 = rng.integers(0, 4096, (20, 30), dtype=np.uint16)
    Image.fromarray(a8).save(tmp_path / "a.png")
    Image.fromarray(a16).save(tmp_path / "b.png")
    Image.fromarray(a16).save(tmp_path / "c.tif")
    Image.fromarray(np.stack([a8] * 3, axis=-1)).save(tmp_path / "d.png")  # grey stored as RGB
    for name, want in (("a.png", a8), ("b.png", a16), ("c.tif", a16), ("d.png", a8)):
        s = read_image_file(tmp_path / name)
        assert s.array.dtype == np.float32 and s.array.shape == (20, 30) and not s.is_volume, name
        assert np.array_equal(s.array, want.astype(np.float32)), name
        assert np.isnan(s.spacing).all()
    from triage.labelled import folder_readers

    assert [r().series_instance_uid for r in folder_readers(tmp_path)] == ["a.png", "b.png", "c.tif", "d.png"]


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_picture_turned_by_its_exif_orientation_reads_upright(tmp_path: Path, suffix: str) -> None:
    upright = np.kron(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, np.ones((8, 8), np.uint8))
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright)))  # a phone's portrait shot
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    stored.save(tmp_path / f"turned{suffix}", exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    got = read_image_file(tmp_path / f"turned{suffix}").array
    assert got.shape == upright.shape
    np.testing.assert_allclose(got, upright, atol=0 if suffix == ".png" else 12)


def test_pictures_that_are_not_radiographs_are_refused(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(ImagingError, match="colour image"):
        read_image_file(tmp_path / "colour.png")
    Image.fromarray(np.ones((8, 8), dtype=bool)).save(tmp_path / "bits.png")
    with pytest.raises(ImagingError, match="1-bit"):
        read_image_file(tmp_path / "bits.png")
    pages = [Image.fromarray(np.full((8, 8), v, dtype=np.uint8)) for v in (1, 2)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(ImagingError, match="2 pages"):
        read_image_file(tmp_path / "pages.tif")
    Image.new("CMYK", (8, 8), (0, 0, 0, 128)).save(tmp_path / "cmyk.jpg")
    with pytest.raises(ImagingError, match="CMYK pixels"):
        read_image_file(tmp_path / "cmyk.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImagingError, match=r"broken\.png: unreadable image file"):
        read_image_file(tmp_path / "broken.png")
    np.save(tmp_path / "nan.npy", np.full((4, 4), np.nan))
    with pytest.raises(ImagingError, match="NaN"):
        read_image_file(tmp_path / "nan.npy")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImagingError, match="not an image file"):
        read_image_file(tmp_path / "notes.txt")


def _dicom_volume(tmp_path: Path) -> object:
    """A 5-slice axial CT (2 mm slices, 1 mm pixels, origin (-4, -4, 0)) read as DICOM."""
    folder = tmp_path / "dcm"
    folder.mkdir()
    for i, raw in enumerate(dicomgen.ct_series("nifti", 5, rows=6, cols=7)):
        (folder / f"{i}.dcm").write_bytes(raw)
    (s,) = read_series_folder(folder)
    return s


def _affine_from_dicom(s: object) -> np.ndarray:
    """The NIfTI (RAS) affine of an array stored as data[column j, row i, slice k]."""
    d = np.asarray(s.direction).reshape(3, 3)  # type: ignore[attr-defined]
    dz, dy, dx = s.spacing  # type: ignore[attr-defined]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = d[0] * dx, d[1] * dy, d[2] * dz
    lps[:3, 3] = s.origin  # type: ignore[attr-defined]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_a_nifti_volume_reads_like_the_dicom_series_it_came_from(tmp_path: Path) -> None:
    s = _dicom_volume(tmp_path)
    arr = s.array  # type: ignore[attr-defined]
    aff = _affine_from_dicom(s)
    nib.save(nib.Nifti1Image(arr.transpose(2, 1, 0).copy(), aff), tmp_path / "plain.nii.gz")
    # the same volume stored slice-reversed, with the affine that says so (as some converters do)
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, arr.shape[0] - 1
    nib.save(nib.Nifti1Image(arr.transpose(2, 1, 0)[:, :, ::-1].copy(), aff @ flip), tmp_path / "rev.nii")
    for name in ("plain.nii.gz", "rev.nii"):
        n = read_image_file(tmp_path / name)
        assert n.is_volume and np.array_equal(n.array, arr), name
        assert np.allclose(n.spacing, s.spacing), name  # type: ignore[attr-defined]
        assert np.allclose(n.origin, s.origin), name  # type: ignore[attr-defined,arg-type]
        assert np.allclose(n.direction, s.direction), name  # type: ignore[attr-defined,arg-type]


def test_a_nifti_that_is_not_one_image_is_refused(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), tmp_path / "t.nii")
    with pytest.raises(ImagingError, match="one 2D image or 3D volume per file"):
        read_image_file(tmp_path / "t.nii")
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(ImagingError, match="unreadable NIfTI"):
        read_image_file(tmp_path / "bad.nii.gz")


@pytest.fixture(scope="module")
def cxr_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The same 16 phantom radiographs as a phantom .npz, as 16-bit PNGs with masks and a
    labels.csv naming files, and as a bare .npz of images, labels and masks."""
    root = tmp_path_factory.mktemp("files")
    ps = make_cxr(16, size=32, abnormal_fraction=0.5, seed=5)
    ps.save_npz(root / "set.npz")
    folder = root / "png"
    write_image_files(ps, folder, "png")
    np.savez(root / "bare.npz", images=ps.images, labels=ps.labels, masks=ps.masks,
             findings=np.asarray(ps.findings))
    return root / "set.npz", folder, root / "bare.npz"


def test_a_labels_csv_can_name_image_files_and_their_masks(cxr_files: tuple[Path, Path, Path]) -> None:
    npz, folder, bare = cxr_files
    ps = PhantomSet.load_npz(npz)
    for data in (folder, bare):
        ls = read_labelled(data, volumes=False)
        assert ls.labels.tolist() == ps.labels.tolist() and ls.findings == ps.findings, data
        assert ls.has_masks and len(ls) == len(ps)
        cases = list(ls.cases())
        assert all(np.array_equal(m, t[0]) for (_, m), t in zip(cases, ps.masks, strict=True)), data
    with pytest.raises(ValueError, match="needs volumes"):
        next(read_labelled(folder, volumes=True).cases())


@pytest.mark.parametrize("table, msg", [
    ("file,label\n00000.png,1\nimg/99.png,0\n", "img/99.png: no such file"),
    ("file,label\n../set.npz,0\n", "outside the folder"),
    ("file,label,mask\n00000.png,1,00000-mask.png\n00001.png,0,\n", "1 of 2 rows name a mask"),
    ("series_instance_uid,label,mask\n1.2,1,m.png\n", "'mask' column goes with a 'file' column"),
    ("file,label\n00000.png,1\n./00000.png,1\n", "00000.png is labelled twice"),
    ("file,label,finding\n00000.png,1,épanchement\n".encode("latin-1"), "not UTF-8 text .*save it as UTF-8"),
])
def test_a_file_table_that_does_not_match_the_folder_is_refused(
        cxr_files: tuple[Path, Path, Path], tmp_path: Path, table: str | bytes, msg: str) -> None:
    import shutil

    copy = tmp_path / "png"
    shutil.copytree(cxr_files[1], copy)
    (copy / LABELS_CSV).write_bytes(table if isinstance(table, bytes) else table.encode())
    with pytest.raises(ValueError, match=msg):
        read_labelled(copy)


def test_image_files_a_labels_csv_leaves_out_are_named(cxr_files: tuple[Path, Path, Path], tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    copy = tmp_path / "png"
    shutil.copytree(cxr_files[1], copy)
    (copy / LABELS_CSV).write_text("file,label,finding,mask\n00001.png,0,normal,00001-mask.png\n")
    with caplog.at_level("WARNING", logger="triage.labelled"):
        assert len(read_labelled(copy)) == 1
    n_files = len(list(copy.glob("*.png")))
    assert f"lists 1 image file(s); {n_files - 2} other(s) in the folder are not in the set " \
           "(first: 00000-mask.png)" in caplog.text


def test_label_0_decides_over_a_finding_and_says_so(cxr_files: tuple[Path, Path, Path], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    copy = tmp_path / "png"
    shutil.copytree(cxr_files[1], copy)
    rows = "".join(f"{p.name},0,No Finding\n" for p in sorted(copy.glob("0000?.png")))
    (copy / LABELS_CSV).write_text("file,label,finding\n" + rows)
    with caplog.at_level("WARNING", logger="triage.labelled"):
        ls = read_labelled(copy)
    assert set(ls.findings) == {"normal"} and not ls.labels.any()
    assert f"{len(ls)} row(s) with label 0 name a finding ('No Finding'; first on line 2)" in caplog.text


def test_a_mask_must_be_turned_as_its_image_and_may_be_1_bit(tmp_path: Path) -> None:
    upright = np.kron(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20 + 10, np.ones((8, 8), np.uint8))
    lesion = np.zeros_like(upright, dtype=bool)
    lesion[8:16, 8:24] = True
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(tmp_path / "a.png", exif=exif)
    (tmp_path / LABELS_CSV).write_text("file,label,finding,mask\na.png,1,nodule,a-mask.png\n")
    # the mask drawn on the upright picture: the shapes show it, so it is read as it is (1-bit)
    Image.fromarray(lesion).save(tmp_path / "a-mask.png")
    ((s, m),) = list(read_labelled(tmp_path).cases())
    assert np.array_equal(s.array, upright) and np.array_equal(m, lesion)
    # stored turned, as the picture's pixels are, but without the tag: it would not line up
    Image.fromarray(np.ascontiguousarray(np.rot90(lesion))).save(tmp_path / "a-mask.png")
    with pytest.raises(ValueError, match=r"EXIF Orientation 6 and its mask a-mask\.png 1"):
        list(read_labelled(tmp_path).cases())
    # turned and tagged like its picture
    Image.fromarray(np.ascontiguousarray(np.rot90(lesion))).save(tmp_path / "a-mask.png", exif=exif)
    ((s, m),) = list(read_labelled(tmp_path).cases())
    assert np.array_equal(s.array, upright) and np.array_equal(m, lesion)


@pytest.mark.parametrize("arrays, msg", [
    ({"images": np.zeros((3, 8, 8))}, "no labels array"),
    ({"images": np.zeros((3, 8, 8)), "labels": np.array([0, 1, 2])}, "0 \\(normal\\) or 1"),
    ({"images": np.zeros((3, 8, 8)), "labels": np.array([0, 1, 1]),
      "findings": np.array(["normal", "normal", "nodule"])}, "image 1 has label 1 but finding 'normal'"),
    ({"images": np.zeros((2, 4, 8, 8)), "labels": np.array([0, 1]), "spacing": np.array([1.0, 0.0, 1.0])},
     "spacing must be 3 positive values"),
    ({"images": np.zeros((2, 8, 8)), "labels": np.array([0, 1]), "masks": np.zeros((2, 4, 4))},
     "masks of shape"),
])
def test_a_bare_npz_is_checked(tmp_path: Path, arrays: dict[str, np.ndarray], msg: str) -> None:
    np.savez(tmp_path / "x.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=msg):
        read_labelled(tmp_path / "x.npz")


def test_evaluate_reads_png_files_and_a_bare_npz_like_the_phantom_set(
        cxr_files: tuple[Path, Path, Path], tiny_bundle: Bundle, tmp_path: Path) -> None:
    results = {}
    for name, data in zip(("npz", "png", "bare"), cxr_files, strict=True):
        out = tmp_path / name
        res = runner.invoke(app, ["evaluate", "--bundle", str(tiny_bundle.path), "--data", str(data),
                                  "--out", str(out), "--n-boot", "50"])
        assert res.exit_code == 0, (name, res.output, res.exception)
        results[name] = json.loads((out / "summary.json").read_text())["scores"]
        assert "ocalisation" in (out / "summary.md").read_text(), name  # masks given: hit rates
    for name in results["npz"]:  # 16-bit PNGs against float pixels: the same ranking
        a = results["npz"][name]["overall"]["auc"]
        assert np.isclose(a, results["png"][name]["overall"]["auc"], atol=0.02), name
        assert np.isclose(a, results["bare"][name]["overall"]["auc"], atol=0.02), name


def test_training_reads_a_folder_of_pictures(cxr_files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from flows.presets import get_preset
    from triage.cli import _load_set

    img = tmp_path / "img"  # pictures alone, as a site's export folder holds them
    write_image_files(PhantomSet.load_npz(cxr_files[0]), img, "png", labelled=False)
    imgs, labels, _ = _load_set(img, get_preset("tiny-cxr").preprocessing)
    assert np.asarray(imgs).shape == (16, 1, 16, 16) and labels is None
    res = runner.invoke(app, ["train", "--preset", "tiny-cxr", "--data", str(img),
                              "--out", str(tmp_path / "m"), "--epochs", "1"])
    assert res.exit_code == 0, (res.output, res.exception)


@pytest.mark.parametrize("preset", ["tiny-cxr", "tiny-chestct"])
def test_a_normal_set_with_abnormal_labels_is_refused(cxr_files: tuple[Path, Path, Path], tmp_path: Path,
                                                      preset: str) -> None:
    labelled = cxr_files[1]  # half of its rows are abnormal
    res = runner.invoke(app, ["train", "--preset", preset, "--normal", str(labelled), "--mixture",
                              str(labelled), "--validation", str(labelled), "--out", str(tmp_path / "b")])
    assert res.exit_code != 0
    n_abnormal = int(PhantomSet.load_npz(cxr_files[0]).labels.sum())
    assert f"--normal holds {n_abnormal} of 16 cases labelled abnormal" in " ".join(res.output.split())
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("preset", ["tiny-bct", "tiny-chestct"])
def test_ct_in_stored_values_instead_of_hounsfield_units_is_refused(preset: str) -> None:
    from flows.patchbundle import _prepared
    from flows.phantoms import make_headct
    from flows.phantoms.chestct import make_chestct
    from flows.presets import get_preset

    p = get_preset(preset)
    if preset == "tiny-bct":  # the whole-volume model
        vol = make_headct(1, shape=(16, 32, 32), seed=1).images[0, 0]

        def prepare(v: np.ndarray) -> object:
            return p.preprocessing.apply(v[None])
    else:  # the patch model, which checks before resampling
        vol = make_chestct(1, shape=(16, 24, 32), spacing_mm=8.0, seed=1).images[0, 0]

        def prepare(v: np.ndarray) -> object:
            return _prepared(p, v, (8.0, 8.0, 8.0), "none")
    prepare(vol)  # in HU: fine
    with pytest.raises(ValueError, match=r"do not look like Hounsfield units.*usually 1024"):
        prepare(vol + 1024.0)
    prepare(np.where(vol > 0, np.clip(vol, 0, 80), 0.0))  # skull-stripped, background 0: still HU


def test_phantoms_written_as_files_read_back_as_the_set(tmp_path: Path) -> None:
    """triage.phantom_files: the labelled-folder form, read back by triage.labelled: labels,
    findings and masks exactly; pixels to the format's precision (NIfTI: exactly)."""
    from flows.phantoms.chestct import make_chestct

    cxr = make_cxr(6, size=32, abnormal_fraction=0.5, seed=2)
    for fmt, tol in (("png", 1 / 65535), ("png8", 1 / 255), ("jpeg", 0.1)):
        write_image_files(cxr, tmp_path / fmt, fmt)
        ls = read_labelled(tmp_path / fmt, volumes=False)
        assert ls.labels.tolist() == cxr.labels.tolist() and ls.findings == cxr.findings
        for (s, m), img, mask in zip(ls.cases(), cxr.images[:, 0], cxr.masks[:, 0], strict=True):
            assert np.array_equal(m, mask)
            assert np.abs(s.array / (65535 if fmt == "png" else 255) - img).max() <= tol, fmt
    ct = make_chestct(3, shape=(16, 24, 32), spacing_mm=8.0, abnormal_fraction=0.7, seed=1)
    write_image_files(ct, tmp_path / "nii", "nifti")
    ls = read_labelled(tmp_path / "nii", volumes=True)
    for (s, m), vol, mask in zip(ls.cases(), ct.images[:, 0], ct.masks[:, 0], strict=True):
        assert np.array_equal(s.array, vol) and np.array_equal(m, mask)
        assert s.spacing == (8.0, 8.0, 8.0)
    write_image_files(ct, tmp_path / "nii", "nifti")  # an earlier output is replaced
    (tmp_path / "nii" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        write_image_files(ct, tmp_path / "nii", "nifti")
    with pytest.raises(ValueError, match="NIfTI is for volumes"):
        write_image_files(cxr, tmp_path / "x", "nifti")
    with pytest.raises(ValueError, match="cannot be written as png"):
        write_image_files(ct, tmp_path / "y", "png")
    res = runner.invoke(app, ["synth", "cxr", str(tmp_path / "z"), "--n", "2", "--format", "nifti"])
    assert res.exit_code == 2 and "NIfTI is for volumes" in res.output


def test_a_set_too_large_for_memory_trains_from_disk_as_from_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """triage.cli keeps a training set's model-grid copies in a memory-mapped file when they
    would exceed a quarter of the free memory: the bundle is the one trained in memory, and
    the file is gone afterwards."""
    import triage.cli

    for name, seed, af in (("n", 1, 0.0), ("m", 2, 0.5)):
        write_image_files(make_cxr(24, size=32, abnormal_fraction=af, seed=seed), tmp_path / name,
                          "png", labelled=False)
    args = ["train", "--preset", "tiny-cxr", "--normal", str(tmp_path / "n"), "--mixture",
            str(tmp_path / "m"), "--epochs", "1", "--finetune-epochs", "1"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "ram")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "kept on disk" not in res.output
    monkeypatch.setattr(triage.cli, "_memory_budget", lambda: 0.0)
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "disk")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "kept on disk" in " ".join(res.output.split())
    assert not (tmp_path / "disk" / "work" / "sets").exists()
    ram, disk = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("ram", "disk"))
    assert ram["files"] == disk["files"] and ram["training"]["normal"] == disk["training"]["normal"]


def test_a_bad_case_is_named_and_a_normal_set_gets_its_specificity(tmp_path: Path) -> None:
    from flows.phantoms.chestct import make_chestct

    chest = ROOT / "models" / "chestct"
    ps = make_chestct(3, abnormal_fraction=0.0, seed=8)
    folder = write_image_files(ps, tmp_path / "normals", "nifti")
    res = runner.invoke(app, ["evaluate", "--bundle", str(chest), "--data", str(folder), "--out",
                              str(tmp_path / "o1")])
    assert res.exit_code == 0, (res.output, res.exception)
    summary = json.loads((tmp_path / "o1" / "summary.json").read_text())
    assert summary["n_abnormal"] == 0 and "auroc_abnormal_volume" not in summary
    assert 0.0 <= summary["specificity"] <= 1.0

    mixed = write_image_files(make_chestct(4, abnormal_fraction=0.5, seed=9), tmp_path / "mixed", "nifti")
    stored = next(p for p in sorted(mixed.glob("*.nii.gz")) if "mask" not in p.name)
    img = nib.load(stored)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1024.0, img.affine), stored)  # no intercept
    res = runner.invoke(app, ["evaluate", "--bundle", str(chest), "--data", str(mixed), "--out",
                              str(tmp_path / "o2")])
    assert res.exit_code != 0
    out = " ".join(res.output.split())
    assert f"{stored.name}: chestct: the values do not look like Hounsfield units" in out


def test_one_image_saved_in_two_formats_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from triage.labelled import folder_readers

    img = nib.Nifti1Image(np.full((8, 8, 8), -500.0, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    nib.save(img, tmp_path / "case1.nii.gz")
    nib.save(img, tmp_path / "case1.nii")
    nib.save(img, tmp_path / "case2.nii.gz")
    with caplog.at_level("WARNING", logger="triage.labelled"):
        assert len(folder_readers(tmp_path, volumes=True)) == 3
    assert "1 image(s) stored twice under one name (first: case1.nii and case1.nii.gz)" in caplog.text


def test_a_mask_saved_with_another_affine_is_refused(tmp_path: Path) -> None:
    from flows.phantoms.chestct import make_chestct

    folder = write_image_files(make_chestct(2, abnormal_fraction=0.5, shape=(16, 32, 32), spacing_mm=8.0,
                                            seed=3), tmp_path / "ct", "nifti")
    ls = read_labelled(folder, volumes=True)
    assert len(list(ls.cases())) == 2  # as written: image and mask share the affine
    mask = sorted(folder.glob("*mask*.nii.gz"))[0]
    m = nib.load(mask)
    # float32 rounding of the same affine (what another tool may write back): the same place
    nib.save(nib.Nifti1Image(np.asarray(m.dataobj), m.affine.astype(np.float32) + 1e-4), mask)
    assert len(list(read_labelled(folder, volumes=True).cases())) == 2
    # the same voxel size, mirrored left to right: another place
    nib.save(nib.Nifti1Image(np.asarray(m.dataobj), m.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])), mask)
    with pytest.raises(ValueError, match=f"the mask {mask.name} lies elsewhere in the patient"):
        list(read_labelled(folder, volumes=True).cases())


def test_evaluate_names_the_volumes_outside_the_bundles_domain(tmp_path: Path) -> None:
    from flows.phantoms.chestct import make_chestct

    folder = write_image_files(make_chestct(4, abnormal_fraction=0.5, seed=13), tmp_path / "ct", "nifti")
    noisy = sorted(p for p in folder.glob("*.nii.gz") if "mask" not in p.name)[1]
    img = nib.load(noisy)  # a sharp kernel or a low dose: far noisier than the validation scans
    hu = np.asarray(img.dataobj) + np.random.default_rng(0).normal(0, 80, img.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, img.affine), noisy)
    res = runner.invoke(app, ["evaluate", "--bundle", str(ROOT / "models" / "chestct"), "--data", str(folder),
                              "--out", str(tmp_path / "o"), "--n-boot", "20"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert f"1 of 4 volumes lie outside the bundle's validation volumes (first: {noisy.name}: noise_hu" \
        in " ".join(res.output.split())
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [o["case"] for o in summary["outside_domain"]] == [noisy.name]


def test_a_training_volume_that_cannot_be_used_is_named(tmp_path: Path) -> None:
    from flows.phantoms.chestct import make_chestct

    normal = write_image_files(make_chestct(2, shape=(16, 24, 32), spacing_mm=8.0, seed=1), tmp_path / "n",
                               "nifti", labelled=False)
    nib.save(nib.Nifti1Image(np.full((4, 6, 6), -800.0, np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
             normal / "fragment.nii.gz")
    ps = make_chestct(4, shape=(16, 24, 32), spacing_mm=8.0, abnormal_fraction=0.5, seed=2)
    val = write_image_files(ps, tmp_path / "v", "nifti")
    res = runner.invoke(app, ["train", "--preset", "tiny-chestct", "--normal", str(normal), "--mixture",
                              str(val), "--validation", str(val), "--out", str(tmp_path / "b")])
    assert res.exit_code != 0
    out = " ".join(res.output.split())
    assert "normal volume 3 of 3 (fragment.nii.gz): chestct: the volume covers" in out
