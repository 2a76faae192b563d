"""Local PACS stand-ins for the demo (and the tests): a real Orthanc, or a storage SCP.

* :class:`Orthanc` runs Debian's Orthanc on loopback with its own configuration: studies are
  uploaded through its REST API and a Lua script routes every stable series that did not
  come from the node to the node, in one association, as a PACS routing rule would; the
  node's SR/SEG come back to it.
* :class:`StoreSCP` is an in-process pynetdicom storage SCP that keeps what it receives in a
  folder (file names from a counter, never from UIDs); studies are pushed to the node with
  a pynetdicom storage SCU.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ROUTE_LUA", "Orthanc", "StoreSCP", "free_port", "wait_until"]

T = TypeVar("T")

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """``check()`` until it returns something truthy; TimeoutError naming ``what`` otherwise."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Orthanc:
    """Debian's Orthanc (``apt-get install orthanc``) on loopback, configured from scratch."""

    def __init__(self, root: Path, *, node_port: int | None, aet: str = "ORTHANC",
                 node_ae: str = "TRIAGE") -> None:
        exe = shutil.which("Orthanc")
        if exe is None:
            raise FileNotFoundError("Orthanc is missing: install it with `apt-get install orthanc`")
        self.exe = exe
        self.root = root
        self.aet = aet
        self.node_ae = node_ae
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.node_port = node_port
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "route.lua").write_text(ROUTE_LUA)

    def _config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": "demo-pacs", "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "StorageDirectory": str(self.root / "storage"), "IndexDirectory": str(self.root / "storage"),
            "StableAge": 1, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            "HttpServerEnabled": True, "Plugins": [], "ConcurrentJobs": 2,
            "DicomModalities": {},
        }
        if self.node_port is not None:
            cfg["DicomModalities"]["triage"] = [self.node_ae, "127.0.0.1", self.node_port]
            cfg["LuaScripts"] = [str(self.root / "route.lua")]
        return cfg

    def start(self) -> Orthanc:
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(self._config()))
        log = (self.root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([self.exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._alive, 30, "Orthanc's REST API")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log = self.root / "orthanc.log"
            raise RuntimeError(f"Orthanc exited (code {self.proc.returncode}); see {log}")
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

    def modality_counts(self) -> Counter[str]:
        """Instances held, by series modality (e.g. the node's SR and SEG)."""
        out: Counter[str] = Counter()
        for sid in self.get("/series"):
            s = self.get(f"/series/{sid}")
            out[s["MainDicomTags"].get("Modality", "")] += len(s["Instances"])
        return out


class StoreSCP:
    """An in-process storage SCP that keeps every instance it receives under ``root``."""

    def __init__(self, root: Path, aet: str = "DEMOPACS") -> None:
        self.root = root
        self.aet = aet
        self.port = free_port()
        self.received: list[tuple[str, Path]] = []  # (Modality, file)
        self._lock = threading.Lock()
        self._server: Any = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> StoreSCP:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.aet)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            path = self.root / f"{len(self.received) + 1:06d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.received.append((str(ds.get("Modality", "")), path))
        return 0x0000

    def modality_counts(self) -> Counter[str]:
        with self._lock:
            return Counter(m for m, _ in self.received)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @staticmethod
    def push(files: Sequence[Path], port: int, called_ae: str = "TRIAGE", calling_ae: str = "DEMOPACS",
             per_association: Callable[[], None] | None = None) -> int:
        """Send ``files`` (one series per call, one association) to the node; returns how many
        were accepted (status 0x0000)."""
        import pydicom
        from pynetdicom import AE, StoragePresentationContexts

        ae = AE(ae_title=calling_ae)
        ae.requested_contexts = StoragePresentationContexts
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
        if not assoc.is_established:
            raise ConnectionError(f"the node on port {port} refused the association")
        ok = 0
        try:
            for f in files:
                status = assoc.send_c_store(pydicom.dcmread(f))
                ok += int(getattr(status, "Status", -1) == 0x0000)
        finally:
            assoc.release()
        if per_association is not None:
            per_association()
        return ok
