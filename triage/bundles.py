"""What the configured model bundles are, for the dashboard, the models page and the plots.

Reads each bundle's JSON files and checks every file's sha256 against the manifest,
without importing torch or loading weights (the web process may run without either). The
check is cached per manifest modification time, so a page view hashes nothing twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from triage.config import Settings

__all__ = ["BundleInfo", "configured_bundles", "find_bundle"]

ROLES = ("cxr", "bct", "chestct", "bct_patch")
PATCHMAP_FILE = "patchmap.json"  # flows.patchbundle.PATCHMAP_FILE (not imported: it pulls torch)


@dataclass
class BundleInfo:
    role: str  # the configuration key: models.cxr, models.bct, ...
    path: Path
    error: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    patchmap: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.path.name))

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", ""))

    def summary(self) -> dict[str, Any]:
        m, c = self.manifest, self.calibration
        return {"role": self.role, "path": str(self.path), "ok": self.ok, "error": self.error,
                "name": self.name, "version": self.version, "kind": m.get("kind"), "preset": m.get("preset"),
                "created": m.get("created"), "threshold": c.get("threshold"),
                "threshold_method": c.get("threshold_method"), "auroc": c.get("auroc"),
                "score": (c.get("score") or {}).get("name", "whole-image posterior"),
                "patch_map": None if self.patchmap is None else {
                    k: self.patchmap.get(k) for k in ("source", "per_voxel", "voxel_threshold",
                                                      "size_threshold_cm3", "validation")}}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=32)
def _read(path: Path, role: str, _mtime_ns: int) -> BundleInfo:
    info = BundleInfo(role=role, path=path)
    try:
        info.manifest = json.loads((path / "manifest.json").read_text())
        for fname, want in (info.manifest.get("files") or {}).items():
            fp = path / fname
            if Path(fname).name != fname or not fp.is_file():
                info.error = f"missing {fname}"
                return info
            if _sha256(fp) != want:
                info.error = f"{fname} is corrupted or was modified (sha256 does not match the manifest)"
                return info
        info.calibration = json.loads((path / "calibration.json").read_text())
        if (path / PATCHMAP_FILE).is_file():
            info.patchmap = json.loads((path / PATCHMAP_FILE).read_text())
    except (OSError, ValueError) as exc:
        info.error = f"{type(exc).__name__}: {exc}"
    return info


def configured_bundles(settings: Settings) -> list[BundleInfo]:
    out = []
    for role in ROLES:
        path = getattr(settings.models, role)
        if path is None:
            continue
        path = Path(path)
        try:
            mtime = (path / "manifest.json").stat().st_mtime_ns
        except OSError:
            out.append(BundleInfo(role=role, path=path, error="not a model bundle (no manifest.json)"))
            continue
        out.append(_read(path, role, mtime))
    return out


def find_bundle(settings: Settings, name: str, version: str) -> BundleInfo | None:
    """The configured bundle that produced a result, if it is still configured."""
    for b in configured_bundles(settings):
        if b.ok and b.name == name and b.version == version:
            return b
    return None
