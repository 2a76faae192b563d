"""Model bundles: a directory holding both models of the two-model posterior and what they need.

```
bundle/
  manifest.json     format version, kind, preset, Glow config, preprocessing, versions,
                    training-data fingerprints, training metrics, sha256 of each weight file
  m0.pt             state dict of M0 (normal images only)
  m1.pt             state dict of M1 (unlabelled mixture)
  calibration.json  reference distribution of the abnormality score, operating thresholds,
                    which score (whole-image posterior or a map score) they are for
  map_reference.npz optional: per-position median/spread of the mixture's maps (map scores)
  patchmap.json     optional: a patch bundle's map calibration (flows.patchbundle)
```
Loading verifies every hash and refuses a bundle whose format version or preprocessing
does not match what the caller will feed it. Weights are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flows.atomic import torch_save, write_bytes
from flows.densitymap import MapReference, ScoreChoice
from flows.glow import Averaged, Conditioned, FlowModel, Glow, GlowConfig, Translated
from flows.preprocess import Preprocessing

FORMAT_VERSION = 1
WEIGHT_FILES = ("m0.pt", "m1.pt")
MAP_REFERENCE = "map_reference.npz"  # per-position median/spread, when the score needs it
MAX_TEST_TIME_SHIFT = 4  # translations (2 r + 1)^ndim: 81 at r 4 in 2D, the most worth paying for


class BundleError(ValueError):
    """A bundle that cannot be used, with the reason."""


@dataclass
class Calibration:
    """Reference distribution of the abnormality score (``-log posterior``) and thresholds.

    ``reference`` are abnormality scores on the calibration set (the mixture by default), so
    a new case's percentile says where it falls among the hospital's own cases.
    """

    reference: list[float]
    threshold: float
    threshold_method: str  # "youden" (labelled validation set) or "percentile:<p>"
    youden: dict[str, float] | None = None
    auroc: dict[str, float] | None = None
    # Which abnormality score these figures are for (flows.densitymap.ScoreChoice.to_dict);
    # None: the whole-image posterior.
    score: dict[str, Any] | None = None
    # The labelled validation set's scores ({"labels": [0|1...], "scores": [...]}), kept so
    # the models page can draw the ROC the threshold was chosen on; None without one.
    validation: dict[str, list[float]] | None = None

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        ref = np.sort(np.asarray(self.reference, dtype=np.float64))
        if ref.size == 0:
            raise BundleError("calibration has an empty reference distribution")
        return 100.0 * np.searchsorted(ref, np.asarray(scores, dtype=np.float64), side="right") / ref.size

    @property
    def choice(self) -> ScoreChoice:
        return ScoreChoice.from_dict(self.score)

    @classmethod
    def from_scores(cls, reference: np.ndarray, *, labels: np.ndarray | None = None,
                    scores: np.ndarray | None = None, percentile: float = 90.0,
                    choice: ScoreChoice | None = None) -> Calibration:
        """Youden cutoff when a labelled validation set is given, else a reference percentile."""
        ref = np.asarray(reference, dtype=np.float64)
        if ref.size == 0 or not np.isfinite(ref).all():
            raise BundleError("calibration scores are empty or non-finite")
        score = choice.to_dict() if choice is not None else None
        if labels is not None and scores is not None and len(np.unique(labels)) == 2:
            from flows.evaluate import roc_auc_ci, youden_cutoff

            cut = youden_cutoff(labels, scores)
            ci = roc_auc_ci(labels, scores, n_boot=500)
            return cls(reference=ref.tolist(), threshold=float(cut.threshold),
                       threshold_method="youden", youden=asdict(cut),
                       auroc={"auc": ci.auc, "lo": ci.lo, "hi": ci.hi}, score=score,
                       validation={"labels": np.asarray(labels, dtype=float).tolist(),
                                   "scores": np.asarray(scores, dtype=float).tolist()})
        return cls(reference=ref.tolist(), threshold=float(np.percentile(ref, percentile)),
                   threshold_method=f"percentile:{percentile:g}", score=score)


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    m0: FlowModel
    m1: FlowModel
    calibration: Calibration
    map_reference: MapReference | None = None
    # extra files as verified at load: a running node keeps using what it checked, even if
    # the file on disk is rewritten (e.g. by `triage calibrate`) before it reloads
    extras: dict[str, bytes] = field(default_factory=dict)
    preprocessing: Preprocessing = field(init=False)

    def __post_init__(self) -> None:
        self.preprocessing = Preprocessing.from_dict(self.manifest["preprocessing"])
        choice = self.calibration.choice
        if choice.map is not None and choice.map.standardise and self.map_reference is None:
            raise BundleError(f"{self.path}: the calibrated map score needs {MAP_REFERENCE}")

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.path.name))

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "0"))

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    def extra(self, fname: str) -> bytes | None:
        """An extra file the bundle was saved with (verified on load), or None."""
        if fname not in self.manifest.get("files", {}):
            return None
        if fname in self.extras:
            return self.extras[fname]
        return (self.path / fname).read_bytes()

    @property
    def fingerprint(self) -> str:
        """Changes whenever any weight file changes (for device UIDs and provenance)."""
        h = hashlib.sha256()
        n = int(self.manifest.get("members", 1))
        for name in (member_file(r, k) for r in ("m0", "m1") for k in range(n)):
            h.update(self.manifest["files"][name].encode())
        return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()




def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("triage-node")
    except PackageNotFoundError:
        ours = "unknown"
    return {"triage-node": ours, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def member_file(role: str, k: int) -> str:
    """The weight file of member ``k`` of M0 or M1 (``role`` "m0" or "m1")."""
    return f"{role}.pt" if k == 0 else f"{role}.{k}.pt"


def _members(model: FlowModel) -> list[Glow | Conditioned]:
    inner = model.model if isinstance(model, Translated) else model
    return list(inner._each()) if isinstance(inner, Averaged) else [inner]


def _views(model: FlowModel) -> tuple[int, int | None]:
    """(translation radius, mirror axis) the model is averaged over."""
    return (model.radius, model.mirror_axis) if isinstance(model, Translated) else (0, None)


def save_bundle(path: str | Path, *, m0: FlowModel, m1: FlowModel, preset: str,
                preprocessing: Preprocessing,
                calibration: Calibration, name: str, version: str = "1",
                training: dict[str, Any] | None = None,
                map_reference: MapReference | None = None) -> Path:
    """Write a bundle directory (weights first, manifest last, each file atomically)."""
    if m0.config != m1.config:
        raise BundleError("M0 and M1 must share one Glow configuration")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    conditions: dict[str, int] = {}
    n0, n1 = _members(m0), _members(m1)
    if len(n0) != len(n1):
        raise BundleError(f"M0 has {len(n0)} member(s) and M1 {len(n1)}; they must match")
    shift, mirror = _views(m0)
    if _views(m1) != (shift, mirror):
        raise BundleError(f"M0 is scored over (translation radius, mirror axis) {(shift, mirror)} "
                          f"and M1 over {_views(m1)}; they must match")
    for role, nets in (("m0", n0), ("m1", n1)):
        for k, model in enumerate(nets):
            fname = member_file(role, k)
            net = model.glow if isinstance(model, Conditioned) else model
            if isinstance(model, Conditioned):
                conditions[fname] = model.condition
            torch_save({key: v.detach().cpu() for key, v in net.state_dict().items()}, out / fname)
            files[fname] = sha256_file(out / fname)
    write_bytes(out / "calibration.json", json.dumps(asdict(calibration)).encode())
    files["calibration.json"] = sha256_file(out / "calibration.json")
    if map_reference is not None:
        buf = io.BytesIO()
        np.savez(buf, median=map_reference.median, spread=map_reference.spread)
        write_bytes(out / MAP_REFERENCE, buf.getvalue())
        files[MAP_REFERENCE] = sha256_file(out / MAP_REFERENCE)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "kind": preprocessing.kind,
        "preset": preset,
        "glow": asdict(m0.config),
        "preprocessing": preprocessing.to_dict(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "training": training or {},
        "conditions": conditions,
        **({"members": len(n0)} if len(n0) > 1 else {}),
        **({"test_time_shift": shift} if shift else {}),
        **({"test_time_mirror": mirror} if mirror is not None else {}),
        "files": files,
    }
    write_bytes(out / "manifest.json", json.dumps(manifest, indent=2).encode())
    return out


def add_extra(path: str | Path, fname: str, data: bytes) -> None:
    """Add (or replace) one extra file in an existing bundle and record its hash.

    The manifest is rewritten last, so a crash leaves the old bundle or the new one.
    """
    root = Path(path)
    if Path(fname).name != fname or fname.startswith(".") or fname == "manifest.json" \
            or fname in (*WEIGHT_FILES, "calibration.json") or fname.endswith(".pt"):
        raise BundleError(f"bad extra bundle file name {fname!r}")
    manifest = json.loads((root / "manifest.json").read_text())
    write_bytes(root / fname, data)
    manifest["files"][fname] = sha256_file(root / fname)
    write_bytes(root / "manifest.json", json.dumps(manifest, indent=2).encode())


def load_bundle(path: str | Path, *, expect: Preprocessing | None = None,
                device: str | torch.device = "cpu") -> Bundle:
    """Load and verify a bundle; raise :class:`BundleError` naming what is wrong."""
    root = Path(path)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{root}: not a model bundle (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath}: manifest is not valid JSON ({e})") from e
    fv = manifest.get("format_version")
    if fv != FORMAT_VERSION:
        raise BundleError(f"{root}: bundle format version {fv!r}, this software reads "
                          f"version {FORMAT_VERSION}; re-export the bundle")
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    if expect is not None:
        diff = prep.mismatch(expect)
        if diff:
            raise BundleError(f"{root}: preprocessing does not match what the node feeds it: "
                              + "; ".join(diff))
    files = manifest.get("files", {})
    n_members = manifest.get("members", 1)
    if not isinstance(n_members, int) or not 1 <= n_members <= 64:
        raise BundleError(f"{root}: manifest 'members' must be a whole number 1-64, not {n_members!r}")
    shift = manifest.get("test_time_shift", 0)
    if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift <= MAX_TEST_TIME_SHIFT:
        raise BundleError(f"{root}: manifest 'test_time_shift' must be a whole number "
                          f"0-{MAX_TEST_TIME_SHIFT}, not {shift!r}")
    mirror = manifest.get("test_time_mirror")
    ndim = len(prep.shape)
    if mirror is not None and (isinstance(mirror, bool) or not isinstance(mirror, int)
                               or not 0 <= mirror < ndim):
        raise BundleError(f"{root}: manifest 'test_time_mirror' must be a spatial axis 0-{ndim - 1}, "
                          f"not {mirror!r}")
    weights = tuple(member_file(r, k) for r in ("m0", "m1") for k in range(n_members))
    optional = tuple(f for f in files if f not in (*weights, "calibration.json"))
    for fname in optional:
        if not isinstance(fname, str) or Path(fname).name != fname or fname.startswith("."):
            raise BundleError(f"{root}: manifest lists a file outside the bundle: {fname!r}")
    for fname in (*weights, "calibration.json", *optional):
        fp = root / fname
        if not fp.is_file():
            raise BundleError(f"{root}: missing {fname}")
        if fname not in files:
            raise BundleError(f"{root}: manifest has no hash for {fname}")
        if sha256_file(fp) != files[fname]:
            raise BundleError(f"{root}: {fname} is corrupted or was modified "
                              "(sha256 does not match the manifest)")
    # the small extra files, kept as verified (weights are loaded below)
    extras = {f: (root / f).read_bytes() for f in optional
              if f != MAP_REFERENCE and not f.endswith(".pt") and (root / f).stat().st_size <= 1 << 20}
    config = GlowConfig(**manifest["glow"])
    conditions = manifest.get("conditions") or {}
    nets: list[Glow | Conditioned] = []
    for fname in weights:
        model = Glow(config)
        try:
            state = torch.load(root / fname, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:
            raise BundleError(f"{root}: cannot load {fname}: {e}") from e
        if not model.initialized:
            raise BundleError(f"{root}: {fname} holds an uninitialised model")
        model = model.to(device).eval()
        if config.conditions:
            if fname not in conditions:
                raise BundleError(f"{root}: conditional model but no condition for {fname}")
            nets.append(Conditioned(model, int(conditions[fname])).eval())
        else:
            nets.append(model)
    models: list[FlowModel] = [nets[0], nets[n_members]] if n_members == 1 else [
        Averaged(nets[:n_members]).eval(), Averaged(nets[n_members:]).eval()]
    if shift or mirror is not None:
        models = [Translated(m, shift, mirror).eval() for m in models]
    cal = Calibration(**json.loads((root / "calibration.json").read_text()))
    ref = None
    if MAP_REFERENCE in files:
        with np.load(root / MAP_REFERENCE, allow_pickle=False) as z:
            ref = MapReference(median=z["median"], spread=z["spread"])
    return Bundle(path=root, manifest=manifest, m0=models[0], m1=models[1], calibration=cal,
                  map_reference=ref, extras=extras)
