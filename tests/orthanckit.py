"""A real Orthanc on loopback for the tests: start, REST helpers, stop."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from nodekit import free_port, require_tool, wait_for

# Route every stable series that did not come from the triage node to it, in one association
# (so the node finishes the series early at the release).
ROUTE_LUA = """
function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality'] or ''
  if modality == 'SR' or modality == 'SEG' or modality == 'OT' then
    return
  end
  local instances = ParseJson(RestApiGet('/series/' .. seriesId .. '/instances'))
  local first = ParseJson(RestApiGet('/instances/' .. instances[1]['ID'] .. '/simplified-tags'))
  if first['Manufacturer'] == 'triage-node' then
    return
  end
  -- the REST store-to-modality call sends the whole series in one association
  RestApiPost('/modalities/triage/store',
              '{"Resources": ["' .. seriesId .. '"], "Synchronous": false}')
end
"""


class Orthanc:
    def __init__(self, root: Path, *, node_port: int | None, aet: str = "ORTHANC") -> None:
        self.exe = require_tool("Orthanc", "orthanc")
        self.root = root
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.node_port = node_port
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "route.lua").write_text(ROUTE_LUA)

    def _config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": "test-pacs", "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "StorageDirectory": str(self.root / "storage"), "IndexDirectory": str(self.root / "storage"),
            "StableAge": 1, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            "HttpServerEnabled": True, "Plugins": [], "ConcurrentJobs": 2,
            "DicomModalities": {},
        }
        if self.node_port is not None:
            cfg["DicomModalities"]["triage"] = ["TRIAGE", "127.0.0.1", self.node_port]
            cfg["LuaScripts"] = [str(self.root / "route.lua")]
        return cfg

    def start(self) -> Orthanc:
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(self._config()))
        log = (self.root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([self.exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._alive, 30, "Orthanc's REST API", interval=0.2)
        return self

    def _alive(self) -> bool:
        try:
            self.get("/system")
            return True
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def kill(self) -> None:
        """The PACS goes away at once (SIGKILL), as in a crash or a network cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def wipe(self) -> None:
        shutil.rmtree(self.root / "storage", ignore_errors=True)

    # ------------------------------------------------------------------ REST

    def _req(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self._req("GET", path)

    def get_bytes(self, path: str) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            data: bytes = resp.read()
        return data

    def upload(self, path: Path) -> dict[str, Any]:
        out: dict[str, Any] = self._req("POST", "/instances", path.read_bytes())
        return out

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        found = self._req("POST", "/tools/lookup", study_uid.encode())
        sid = next(f["ID"] for f in found if f["Type"] == "Study")
        out: list[dict[str, Any]] = self.get(f"/studies/{sid}/series")
        return out

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return out

    def has_sop(self, sop_uid: str) -> bool:
        found = self._req("POST", "/tools/lookup", sop_uid.encode())
        return any(f["Type"] == "Instance" for f in found)


def until(check: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            v = check()
        except (OSError, urllib.error.URLError, StopIteration, KeyError):
            v = None
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
