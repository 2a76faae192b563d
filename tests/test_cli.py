"""The CLI end to end on toy sizes: synth -> train (bundle and single model) -> evaluate -> sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

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
    _ok(["sample", "--bundle", str(d / "bundle"), "--out", str(d / "s.png"), "--n", "4"])
    assert (d / "s.png").stat().st_size > 500
    _ok(["train", "--preset", "tiny-cxr", "--data", str(d / "normal.npz"), "--out",
         str(d / "one"), "--epochs", "1"])
    assert (d / "one" / "model.pt").exists()


@pytest.mark.parametrize(
    "args,msg",
    [
        (["synth", "cxr", "x.npz", "--n", "0"], "n must be"),
        (["synth", "cxr", "x.npz", "--abnormal-fraction", "2"], "abnormal-fraction"),
        (["train", "--preset", "nope", "--data", "x.npz"], "unknown preset"),
        (["train", "--preset", "tiny-cxr"], "--normal and --mixture"),
        (["train", "--preset", "tiny-cxr", "--data", "missing.npz"], "not found"),
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
         "--dicom"])
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
         str(d / "m.npz"), "--validation", str(d / "v.npz"), "--out", str(d / "b")])
    _ok(["evaluate", "--bundle", str(d / "b"), "--data", str(d / "v.npz"), "--out",
         str(d / "e"), "--n-boot", "20"])
    summary = json.loads((d / "e" / "summary.json").read_text())
    assert summary["map"].split(":")[0] in ("likelihood", "posterior")
    assert "auroc_abnormal_volume" in summary and "f1" in summary and "lesion_hit_rate" in summary
    assert summary["overlays"] and (d / "e" / summary["overlays"][0]).stat().st_size > 2000
