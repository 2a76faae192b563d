"""The demo bundles in models/ (synthetic data, not for clinical use) and their recipe.

(a) every bundle committed under models/ loads hash-verified, the node's bundle listing
reports it ok, the files are plain (no LFS pointers), not git-ignored, and all of it fits
in 20 MB; (b) the recorded recipe, ``scripts/train-demo-models``, run end to end at a toy
size (synth -> train -> evaluate) gives a bundle that loads and records its seed and the
fingerprint of the data it was trained on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flows.build import BuildOptions, split_reference
from flows.bundle import load_bundle
from flows.phantoms import PhantomSet
from flows.presets import get_preset
from flows.rows import fingerprint
from triage.bundles import configured_bundles
from triage.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SCRIPT = ROOT / "scripts" / "train-demo-models"
TRIAGE = Path(sys.executable).parent / "triage"
MAX_BYTES = 20 * 1024 * 1024
# role in the node's [models] section -> (bundle folder, preset the recipe uses)
BUNDLES = {"cxr": ("cxr", "cpu-cxr"), "bct": ("bct", "cpu-bct-patch"),
           "chestct": ("chestct", "cpu-chestct")}


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def test_models_fit_in_20_mb_as_plain_files() -> None:
    files = _files(MODELS)
    assert files, "models/ is empty"
    assert not [p for p in files if p.is_symlink()], "bundle files must be plain files"
    total = sum(p.stat().st_size for p in files)
    assert total <= MAX_BYTES, f"models/ holds {total / 2**20:.1f} MB (limit 20 MB)"
    for p in files:
        with p.open("rb") as f:
            head = f.read(64)
        assert not head.startswith(b"version https://git-lfs"), f"{p} is a Git LFS pointer"
        if p.suffix in (".pt", ".npz"):
            assert head.startswith(b"PK"), f"{p} is not a zip archive (torch.save / np.savez)"


def test_models_are_not_git_ignored() -> None:
    if shutil.which("git") is None:
        pytest.fail("git is missing: install it with `apt-get install git`", pytrace=False)
    paths = [str(p.relative_to(ROOT)) for p in _files(MODELS)]
    r = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and not r.stdout.strip(), f"git-ignored: {r.stdout}"


@pytest.mark.parametrize("role", sorted(BUNDLES))
def test_demo_bundle_loads_verified(role: str) -> None:
    folder, preset = BUNDLES[role]
    b = load_bundle(MODELS / folder)  # raises on a missing file or a hash mismatch
    assert b.kind == role
    assert b.manifest["preset"] == preset
    assert b.manifest["training"]["seed"] == 0
    for part in ("normal", "mixture", "reference"):  # reference: held-out mixture (percentiles)
        assert len(b.manifest["training"][part]["sha256"]) == 64
    if b.extra("patchmap.json") is None:  # whole-image bundle: Youden threshold on validation
        assert b.calibration.threshold_method == "youden"
    else:  # patch bundle: map, voxel threshold and T chosen on the labelled validation set
        assert json.loads(b.extra("patchmap.json") or b"{}")["validation"]


def test_node_reports_demo_bundles_ok(tmp_path: Path) -> None:
    s = load_settings(node={"data_dir": str(tmp_path)},
                      models={role: str(MODELS / folder) for role, (folder, _) in BUNDLES.items()})
    infos = configured_bundles(s)
    assert sorted(i.role for i in infos) == sorted(BUNDLES)
    for i in infos:
        assert i.ok, f"{i.role}: {i.error}"
        assert i.name == f"demo-{i.role}"
    patch = {i.role for i in infos if i.patchmap is not None}
    assert patch == {"bct", "chestct"}


def test_readme_says_demo_not_clinical() -> None:
    text = (MODELS / "README.md").read_text()
    assert "not for clinical use" in text.lower()
    assert "scripts/train-demo-models" in text


def test_recipe_end_to_end_at_toy_size(tmp_path: Path) -> None:
    """The recorded recipe, scaled down: tiny-cxr preset, 40 + 40 training images."""
    env = {**os.environ, "TRIAGE": str(TRIAGE), "KINDS": "cxr", "PRESET": "tiny-cxr",
           "N": "40", "NV": "20", "NT": "20", "NBOOT": "50", "SEED": "3",
           "DATA": str(tmp_path / "data"), "OUT": str(tmp_path / "models"),
           "EVAL": str(tmp_path / "eval"), "COLUMNS": "120"}
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "models" / "cxr"
    b = load_bundle(out)
    assert {p.name for p in out.iterdir()} == {*b.manifest["files"], "manifest.json"}, \
        "only the bundle's own files (training checkpoints removed)"
    assert b.name == "demo-cxr" and b.manifest["preset"] == "tiny-cxr"
    training = b.manifest["training"]
    assert training["seed"] == 3
    prep = get_preset("tiny-cxr").preprocessing

    def images(part: str) -> np.ndarray:
        return prep.apply(PhantomSet.load_npz(tmp_path / "data" / "cxr" / f"{part}.npz").images)

    def same(fp: dict[str, object], imgs: np.ndarray) -> bool:
        want = json.loads(json.dumps(fingerprint(imgs)))
        return {k: fp.get(k) for k in want} == want

    assert same(training["normal"], images("normal"))
    # the mixture minus the part held out for the reference distribution, split on the seed
    o = BuildOptions()
    trained, held = split_reference(images("mixture"), o.reference_holdout, o.min_reference, 3)
    assert held is not None
    assert same(training["mixture"], trained) and same(training["reference"], held)
    assert b.calibration.threshold_method == "youden"
    summary = json.loads((tmp_path / "eval" / "cxr" / "summary.json").read_text())
    assert 0.0 <= summary["scores"]["posterior"]["overall"]["auc"] <= 1.0


def test_worker_keeps_one_patch_scorer_per_bundle() -> None:
    """The traced patch model is made once per worker, not once per series."""
    from triage.analyze import Models
    from triage.config import ModelSettings

    m = Models(ModelSettings(chestct=MODELS / BUNDLES["chestct"][0]))
    a = m.patch_scorer("chestct")
    assert m.patch_scorer("chestct") is a and a.bundle is m.get("chestct")
