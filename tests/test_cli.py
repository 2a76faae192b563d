"""The CLI end to end on toy sizes: synth -> train (bundle and single model) -> evaluate -> sample."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from storage.db import Database
from triage.cli import app

runner = CliRunner()


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


def test_help_lists_commands() -> None:
    out = _ok(["--help"])
    for cmd in ("synth", "train", "evaluate", "sample", "presets", "demo", "serve", "worker"):
        assert cmd in out


def test_every_subcommand_explains_itself() -> None:
    """`triage X --help` works for every command and sub-command, each with a description and
    a help text for every option."""
    import typer

    def walk(cmd: object, path: list[str]) -> list[tuple[list[str], object]]:
        subs = getattr(cmd, "commands", None)
        if subs is None:
            return [(path, cmd)]
        out = [(path, cmd)]
        for name, sub in subs.items():
            out += walk(sub, [*path, name])
        return out

    commands = walk(typer.main.get_command(app), [])
    assert len(commands) > 20
    for path, cmd in commands:
        text = _ok([*path, "--help"])
        assert "Usage" in text
        assert (getattr(cmd, "help", None) or "").strip(), f"`triage {' '.join(path)}` has no description"
        for p in getattr(cmd, "params", []):
            if getattr(p, "param_type_name", "") == "option" and p.name not in ("help",):
                assert (getattr(p, "help", None) or "").strip() or p.name in ("config", "verbose"), \
                    f"`triage {' '.join(path)}` option --{p.name} has no help"


def test_synth_train_evaluate_sample(tmp_path: Path) -> None:
    d = tmp_path
    _ok(["synth", "cxr", str(d / "normal.npz"), "--n", "48", "--size", "32", "--seed", "1"])
    _ok(["synth", "cxr", str(d / "mix.npz"), "--n", "48", "--size", "32", "--seed", "2",
         "--abnormal-fraction", "0.5"])
    _ok(["synth", "cxr", str(d / "test.npz"), "--n", "24", "--size", "32", "--seed", "3",
         "--abnormal-fraction", "0.5"])
    _ok(["train", "--preset", "tiny-cxr", "--normal", str(d / "normal.npz"), "--mixture",
         str(d / "mix.npz"), "--validation", str(d / "test.npz"), "--out", str(d / "bundle")])
    manifest = json.loads((d / "bundle" / "manifest.json").read_text())
    assert manifest["preset"] == "tiny-cxr"
    _ok(["evaluate", "--bundle", str(d / "bundle"), "--data", str(d / "test.npz"), "--out",
         str(d / "eval"), "--n-boot", "50"])
    summary = json.loads((d / "eval" / "summary.json").read_text())
    assert "posterior" in summary["scores"] and "likelihood" in summary["scores"]
    assert (d / "eval" / "roc.png").stat().st_size > 1000
    assert (d / "eval" / "overlays_most_abnormal.png").stat().st_size > 2000
    loc = json.loads((d / "eval" / "localisation.json").read_text())  # the map against the lesion masks
    assert set(loc["findings"]) <= {"opacity", "nodule", "effusion", "cardiomegaly"} and loc["findings"]
    assert all(0 <= e["pointing"] <= 1 and 0 < e["chance"] < 1 for e in loc["findings"].values())
    assert "## Localisation" in (d / "eval" / "summary.md").read_text()
    _ok(["sample", "--bundle", str(d / "bundle"), "--out", str(d / "s.png"), "--n", "4"])
    assert (d / "s.png").stat().st_size > 500
    _ok(["train", "--preset", "tiny-cxr", "--data", str(d / "normal.npz"), "--out",
         str(d / "one"), "--epochs", "1"])
    assert (d / "one" / "model.pt").exists()


def test_head_ct_bundle_with_mirror_views_and_foreground_crop(tmp_path: Path) -> None:
    d = tmp_path
    _ok(["synth", "bct", str(d / "n.npz"), "--n", "12", "--seed", "1"])
    _ok(["synth", "bct", str(d / "m.npz"), "--n", "12", "--seed", "2", "--abnormal-fraction", "0.5"])
    _ok(["train", "--preset", "tiny-bct", "--normal", str(d / "n.npz"), "--mixture", str(d / "m.npz"),
         "--out", str(d / "b"), "--epochs", "1", "--finetune-epochs", "1", "--mirror",
         "--crop-above", "-300"])
    manifest = json.loads((d / "b" / "manifest.json").read_text())
    assert manifest["test_time_mirror"] == 2
    assert manifest["preprocessing"]["crop_above"] == -300.0
    trained = [v for v in manifest["training"].values() if isinstance(v, dict) and "options" in v]
    assert trained and all(v["options"]["augment_mirror"] == 2 for v in trained)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["synth", "cxr", "x.npz", "--n", "0"], "n must be"),
        (["synth", "cxr", "x.npz", "--abnormal-fraction", "2"], "abnormal-fraction"),
        (["train", "--preset", "nope", "--data", "x.npz"], "unknown preset"),
        (["train", "--preset", "tiny-cxr"], "--normal and --mixture"),
        (["train", "--preset", "tiny-cxr", "--data", "missing.npz"], "not found"),
        (["train", "--preset", "tiny-cxr", "--normal", "a.npz", "--mixture", "b.npz", "--mirror"],
         "no mirror axis"),
        (["train", "--preset", "tiny-cxr", "--normal", "a.npz", "--mixture", "b.npz", "--crop-above", "-300"],
         "whole-image CT presets"),
        (["train", "--preset", "tiny-chestct", "--normal", "a.npz", "--mixture", "b.npz", "--crop-above",
          "-300"], "whole-image CT presets"),
        (["evaluate", "--bundle", "nowhere", "--data", "x.npz"], "not a model bundle"),
    ],
)
def test_bad_input_gives_clear_errors(args: list[str], msg: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert msg in res.output


def test_synth_dicom_then_train_from_the_dicom_folder(tmp_path: Path) -> None:
    d = tmp_path / "ct"
    _ok(["synth", "bct", str(d), "--n", "3", "--abnormal-fraction", "0.5", "--shape", "8,32,32",
         "--format", "dicom"])
    rows = (d / "labels.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("case,")
    _ok(["train", "--preset", "tiny-bct", "--data", str(d), "--out", str(tmp_path / "m"),
         "--epochs", "1"])
    assert (tmp_path / "m" / "model.pt").exists()


def test_chest_ct_patch_bundle_synth_train_evaluate(tmp_path: Path) -> None:
    d = tmp_path
    shape = ["--shape", "16,24,32", "--spacing", "8"]
    _ok(["synth", "chestct", str(d / "n.npz"), "--n", "5", "--seed", "1", *shape])
    _ok(["synth", "chestct", str(d / "m.npz"), "--n", "5", "--seed", "2", "--abnormal-fraction",
         "0.6", *shape])
    _ok(["synth", "chestct", str(d / "v.npz"), "--n", "6", "--seed", "3", "--abnormal-fraction",
         "0.5", *shape])
    res = runner.invoke(app, ["train", "--preset", "tiny-chestct", "--normal", str(d / "n.npz"),
                              "--mixture", str(d / "m.npz"), "--out", str(d / "b")])
    assert res.exit_code == 2 and "--validation" in res.output
    _ok(["train", "--preset", "tiny-chestct", "--normal", str(d / "n.npz"), "--mixture",
         str(d / "m.npz"), "--validation", str(d / "v.npz"), "--out", str(d / "b"),
         "--noise-floor", "95"])
    floor = json.loads((d / "b" / "manifest.json").read_text())["preprocessing"]["noise_floor"]
    assert floor > 0  # chosen on the training volumes, recorded for inference
    res = runner.invoke(app, ["train", "--preset", "tiny-cxr", "--normal", str(d / "n.npz"),
                              "--mixture", str(d / "m.npz"), "--noise-floor", "95"])
    assert res.exit_code == 2 and "--noise-floor" in res.output
    _ok(["evaluate", "--bundle", str(d / "b"), "--data", str(d / "v.npz"), "--out",
         str(d / "e"), "--n-boot", "20"])
    summary = json.loads((d / "e" / "summary.json").read_text())
    assert summary["map"].split(":")[0] in ("likelihood", "posterior")
    assert "auroc_abnormal_volume" in summary and "f1" in summary and "lesion_hit_rate" in summary
    assert summary["overlays"] and (d / "e" / summary["overlays"][0]).stat().st_size > 2000
    # every calibrated map side by side, from the same pass; the chosen one is the report's
    maps = summary["maps"]
    assert set(maps) == {"likelihood", "posterior", "likelihood:voxel", "posterior:voxel"}
    assert [k for k, e in maps.items() if e["chosen"]] == [summary["map"]]
    assert maps[summary["map"]]["auc"] == summary["auroc_abnormal_volume"]["auc"]
    assert all("minus_chosen" in e for k, e in maps.items() if k != summary["map"])
    assert "| posterior:voxel |" in (d / "e" / "summary.md").read_text()
    # the same volumes as DICOM studies + labels.csv: evaluated alike, without lesion masks
    _ok(["synth", "chestct", str(d / "vdcm"), "--n", "6", "--seed", "3", "--abnormal-fraction",
         "0.5", *shape, "--format", "dicom"])
    _ok(["evaluate", "--bundle", str(d / "b"), "--data", str(d / "vdcm"), "--out", str(d / "e2"),
         "--n-boot", "20"])
    dicom = json.loads((d / "e2" / "summary.json").read_text())
    assert (dicom["n"], dicom["n_abnormal"]) == (summary["n"], summary["n_abnormal"]) == (6, 3)
    assert "auc" in dicom["auroc_abnormal_volume"]
    assert summary.get("lesion_hit_rate") and not dicom.get("lesion_hit_rate")
    # as NIfTI files with mask files named in a labels.csv: the same figures, hit rates included
    _ok(["synth", "chestct", str(d / "nii"), "--n", "6", "--seed", "3", "--abnormal-fraction",
         "0.5", *shape, "--format", "nifti"])
    _ok(["evaluate", "--bundle", str(d / "b"), "--data", str(d / "nii"), "--out", str(d / "e3"),
         "--n-boot", "20"])
    nii = json.loads((d / "e3" / "summary.json").read_text())
    for key in ("auroc_abnormal_volume", "f1", "lesion_hit_rate"):
        assert nii[key] == summary[key], key
    # re-calibration on another labelled set rewrites the map calibration and keeps the bundle valid
    _ok(["synth", "chestct", str(d / "v2.npz"), "--n", "6", "--seed", "9", "--abnormal-fraction",
         "0.5", *shape])
    before = json.loads((d / "b" / "patchmap.json").read_text())
    _ok(["calibrate", "--bundle", str(d / "b"), "--validation", str(d / "v2.npz")])
    after = json.loads((d / "b" / "patchmap.json").read_text())
    assert after["validation"] != before["validation"] and after["reference_cm3"]
    from flows.bundle import load_bundle

    load_bundle(d / "b")  # hashes re-checked
    res = runner.invoke(app, ["calibrate", "--bundle", str(d / "b"), "--validation", str(d / "n.npz")])
    assert res.exit_code == 2 and "normal and abnormal" in res.output


def test_chest_ct_patch_bundle_trained_from_nifti_folders_is_the_npz_bundle(tmp_path: Path) -> None:
    """Training and calibration read a site's CT folders one volume at a time
    (triage.labelled.Volumes): from NIfTI files the bundle is bit for bit the one the same
    volumes give from a phantom .npz: the same patches, weights and map calibration."""
    d = tmp_path
    shape = ["--shape", "16,24,32", "--spacing", "8"]
    from flows.phantoms import PhantomSet
    from triage.phantom_files import write_image_files

    for name, seed, af in (("n", 1, "0"), ("m", 2, "0.6"), ("v", 3, "0.5")):
        _ok(["synth", "chestct", str(d / f"{name}.npz"), "--n", "5", "--seed", str(seed),
             "--abnormal-fraction", af, *shape])
        # training folders as a site has them: the volumes alone, no table, no masks
        write_image_files(PhantomSet.load_npz(d / f"{name}.npz"), d / name, "nifti",
                          labelled=name == "v")
    common = ["--preset", "tiny-chestct", "--noise-floor", "95", "--epochs", "1"]
    _ok(["train", *common, "--normal", str(d / "n.npz"), "--mixture", str(d / "m.npz"),
         "--validation", str(d / "v.npz"), "--out", str(d / "from-npz")])
    _ok(["train", *common, "--normal", str(d / "n"), "--mixture", str(d / "m"),
         "--validation", str(d / "v"), "--out", str(d / "from-nifti")])
    a, b = (json.loads((d / x / "manifest.json").read_text()) for x in ("from-npz", "from-nifti"))
    assert a["files"] == b["files"] and a["preprocessing"] == b["preprocessing"]
    assert ((d / "from-npz" / "patchmap.json").read_text()
            == (d / "from-nifti" / "patchmap.json").read_text())


def test_user_add_and_token_then_log_in_and_call_the_api(tmp_path: Path, sqlite_db: Database,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`triage user add` (password asked twice, or from TRIAGE_NEW_PASSWORD) and `triage user
    token`: the user logs in to the pages with that password, the token opens the API with the
    user's role."""
    from fastapi.testclient import TestClient

    from triage.config import load_settings
    from triage.web.api import create_app

    for k in list(os.environ):
        if k.startswith("TRIAGE_"):
            monkeypatch.delenv(k)
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "d"}"\n[storage]\ndatabase_url = "{sqlite_db.url}"\n')
    c = ["--config", str(cfg)]
    pw = "correct horse battery"
    res = runner.invoke(app, ["user", "add", "ann", "--role", "admin", *c], input=f"{pw}\n{pw}\n")
    assert res.exit_code == 0 and "user ann (admin) created" in res.output, res.output
    res = runner.invoke(app, ["user", "add", "vic", *c], env={"TRIAGE_NEW_PASSWORD": "viewer password 1"})
    assert res.exit_code == 0 and "user vic (viewer) created" in res.output, res.output
    for args, msg in ((["user", "add", "ann", "--password", "another password"], "exists already"),
                      (["user", "add", "bob", "--password", "short"], "at least 10"),
                      (["user", "add", "bob", "--role", "root", "--password", pw], "role must be"),
                      (["user", "token", "nobody"], "no user 'nobody'")):
        res = runner.invoke(app, [*args, *c])
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
    tokens = {}
    for user in ("ann", "vic"):
        res = runner.invoke(app, ["user", "token", user, "--name", "ris", *c])
        assert res.exit_code == 0, res.output
        tokens[user] = res.stdout.strip()
        assert re.fullmatch(r"trg_[A-Za-z0-9_-]{43}", tokens[user]), res.stdout  # printed once, alone

    web = TestClient(create_app(load_settings(cfg)), follow_redirects=False)
    for user, password in (("ann", pw), ("vic", "viewer password 1")):
        web.cookies.clear()
        form = web.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf
        r = web.post("/login", data={"username": user, "password": password, "csrf": csrf.group(1)})
        assert r.status_code == 303 and web.get("/worklist").status_code == 200, user
    # the tokens carry the users' roles: the audit log is for admins
    assert web.get("/api/audit", headers={"Authorization": f"Bearer {tokens['ann']}"}).status_code == 200
    assert web.get("/api/audit", headers={"Authorization": f"Bearer {tokens['vic']}"}).status_code == 403
    assert web.get("/api/worklist", headers={"Authorization": f"Bearer {tokens['vic']}"}).status_code == 200
