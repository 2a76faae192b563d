"""No patient identifier (nor secret) in any log line of a full run (issue 8 E).

A node at DEBUG level (as `triage serve -v` configures logging) receives studies whose
patient names and IDs are distinctive, refuses one instance of the same patient (so the
refusal path logs too), analyses the rest, builds and delivers SR/SEG to a PACS stand-in and
sends notifications (a webhook and an HL7 message, both refused once so their error paths
log too). The webhook's key and a password in its URL and in the broker URL are distinctive
as well. Everything logged by this process and by the SCP process is scanned.

``triage web`` (the web side alone) runs as its own process, the way an operator starts it,
and is asked for those patients by name and ID, pages and API; its output is scanned too.
"""

from __future__ import annotations

import http.server
import logging
import os
import re
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pydicom
import pytest
from nodekit import cxr_studies, stop_process, storescu, wait_for
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from test_node import _settings
from test_rank import _study

from flows.bundle import Bundle
from storage.db import Database
from storage.models import AuditEvent, Delivery, Notification, Result, Study
from triage.serve import Node, _configure_logging
from triage.standin import StoreSCP
from triage.web.security import create_token, create_user

NAMES = ["SECRETSURNAME^ALICE", "OTHERSECRET^BOB^Q"]
IDS = ["MRN-7734-SECRET", "MRN-9921-SECRET"]
HOOK_KEY = "hookkey-QUOKKA-5531"  # the webhook's HMAC key
URL_PASSWORD = "urlpass-WOMBAT-8812"  # the password in the webhook's URL (HTTP basic auth)
BROKER_PASSWORD = "brokerpass-NUMBAT-4471"  # the password in celery.broker_url (configured, unused)
FORBIDDEN = ["SECRETSURNAME", "OTHERSECRET", "ALICE", "MRN-7734", "MRN-9921", "QUOKKA", "WOMBAT", "NUMBAT"]


class _Refusing(http.server.BaseHTTPRequestHandler):
    seen = 0
    auth: ClassVar[list[str | None]] = []  # each POST's Authorization header

    def do_POST(self) -> None:
        type(self).seen += 1
        type(self).auth.append(self.headers.get("Authorization"))
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(503 if type(self).seen == 1 else 200)  # once refused, then taken
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


class _Mllp(socketserver.BaseRequestHandler):
    def handle(self) -> None:  # echoes the patient's ID back in an AE, the worst case for logs
        data = b""
        while not data.endswith(b"\x1c\x0d"):
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        control = data.split(b"\r")[0].split(b"|")[9]
        ack = (b"MSH|^~\\&|RIS|H|TRIAGE||20260101||ACK^R01^ACK|1|P|2.5.1\rMSA|AE|" + control
               + b"|unknown patient " + IDS[0].encode() + b" " + NAMES[0].encode() + b"\r")
        self.request.sendall(b"\x0b" + ack + b"\x1c\x0d")


@pytest.fixture()
def listeners() -> Iterator[tuple[int, int]]:
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    mllp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Mllp)
    for srv in (web, mllp):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield web.server_address[1], mllp.server_address[1]
    web.shutdown()
    mllp.shutdown()


def test_no_patient_identifier_in_any_log(tmp_path: Path, tiny_bundle: Bundle, ct_bundle: Bundle,
                                          listeners: tuple[int, int], caplog: pytest.LogCaptureFixture,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    studies = cxr_studies(tmp_path / "cxr", n=2, seed=11)
    for i, f in enumerate(sorted(studies.rglob("*.dcm"))):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID = NAMES[i % 2], IDS[i % 2]
        ds.save_as(f, enforce_file_format=True)
    # an instance of the first patient that the node refuses from its header (60000 x 60000)
    refused = pydicom.dcmread(sorted(studies.rglob("*.dcm"))[0])
    refused.SOPInstanceUID = refused.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    refused.Rows = refused.Columns = 60000
    pacs = StoreSCP(tmp_path / "pacs").start()
    web_port, mllp_port = listeners
    s = _settings(tmp_path, tiny_bundle, ct_bundle,
                  celery={"broker_url": f"redis://:{BROKER_PASSWORD}@127.0.0.1:9/0"},
                  dispatch={"destinations": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                                              "port": pacs.port}],
                            "poll_seconds": 0.2, "backoff_initial_seconds": 0.2, "jitter": 0},
                  notify={"min_priority": 4, "include_patient_id": False,
                          "webhooks": [{"name": "hook", "secret": HOOK_KEY,
                                        "url": f"http://hook:{URL_PASSWORD}@127.0.0.1:{web_port}/"}],
                          "hl7": [{"name": "ris", "host": "127.0.0.1", "port": mllp_port,
                                   "timeout_seconds": 2}]})
    _configure_logging(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    node = Node(s, log_level=logging.DEBUG).start()
    try:
        assert _send(s.receive.port, refused) == 0xC003
        storescu(s.receive.port, [studies])
        wait_for(lambda: _done(node), 120, "both results delivered and notified")
    finally:
        node.stop()
        pacs.stop()
    logged = caplog.text + "\n".join(capfd.readouterr())
    assert "job" in logged and len(logged) > 2000  # the run was logged at all (not a vacuous pass)
    assert "refused an instance" in logged and "60000 x 60000" in logged  # the refusal path logged
    # the URL's password was used (basic auth), so it was live in this run
    assert _Refusing.auth and all(a and a.startswith("Basic ") for a in _Refusing.auth)
    leaks = [w for w in FORBIDDEN if w in logged]
    assert not leaks, f"patient identifiers or secrets in the logs: {leaks}"
    with node.db.sessions() as ss:  # nor in stored error texts shown to admins
        errors = " ".join(n.last_error or "" for n in ss.scalars(select(Notification)))
    # last_error is shown to logged-in admins (who may see PHI); the message's own patient is
    # scrubbed from it, a RIS quoting another patient is not recognisable, so that text never
    # reaches a log line or an audit event (checked above and here)
    assert "unknown patient" in errors
    with node.db.sessions() as ss:
        audit = " ".join(str(e.detail) for e in ss.scalars(select(AuditEvent)))
    leaks = [w for w in FORBIDDEN if w in audit]
    assert not leaks, f"patient identifiers or secrets in the audit log: {leaks}"


def _send(port: int, ds: pydicom.Dataset) -> int:
    """One C-STORE with pynetdicom (its statuses per instance, unlike dcmtk's storescu)."""
    from pynetdicom import AE

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _done(node: Node) -> bool:
    with node.db.sessions() as s:
        results = list(s.scalars(select(Result)))
        if len(results) < 2 or any(r.report_state != "ready" for r in results):
            return False
        states = [d.state for d in s.scalars(select(Delivery))]
        notes = list(s.scalars(select(Notification)))
    webhook_sent = [n for n in notes if n.channel == "webhook" and n.state == "sent"]
    hl7_tried = [n for n in notes if n.channel == "hl7" and n.attempts >= 1]
    delivered = bool(states) and all(x == "sent" for x in states)
    return delivered and len(webhook_sent) == 2 and len(hl7_tried) == 2


STUDY_UID = "1.2.826.0.1.3680043.9.7734.5531"  # distinctive: a study UID must not be logged either
WEB_PASSWORD = "webpass-DINGO-6620"


def test_triage_web_logs_no_patient_identifier(tmp_path: Path, sqlite_db: Database) -> None:
    """`triage web -v` in its own process: log in, search the worklist by name and ID, open the
    study (page and API); its whole output (uvicorn's records included) holds none of them."""
    _study(sqlite_db, "ACC-PHI", 0, [(1, 99.9, 9.0)])
    with sqlite_db.session() as s:
        s.execute(update(Study).values(patient_name=NAMES[0], patient_id=IDS[0],
                                       study_instance_uid=STUDY_UID))
        token = create_token(s, create_user(s, "ann", WEB_PASSWORD, "admin"), "tests")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(TRIAGE_STORAGE__DATABASE_URL=sqlite_db.url, TRIAGE_NODE__DATA_DIR=str(tmp_path / "d"),
               TRIAGE_WEB__PORT="0")
    out = tmp_path / "web.log"
    with out.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "triage.cli", "web", "-v"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        m = wait_for(lambda: re.search(r"running on http://127\.0\.0\.1:(\d+)", out.read_text()), 60,
                     "`triage web` listening")
        with httpx.Client(base_url=f"http://127.0.0.1:{m.group(1)}", timeout=30) as c:
            form = c.get("/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert csrf
            r = c.post("/login", data={"username": "ann", "password": WEB_PASSWORD, "csrf": csrf.group(1)})
            assert r.status_code == 303
            for q in (NAMES[0], IDS[0]):  # the patient's data was live in this run
                page = c.get("/worklist", params={"q": q})
                assert page.status_code == 200 and NAMES[0] in page.text
            assert IDS[0] in c.get(f"/studies/{STUDY_UID}").text
            h = {"Authorization": f"Bearer {token}"}
            assert c.get("/api/worklist", params={"q": NAMES[0]}, headers=h).json()[0]["patient_id"] == IDS[0]
            assert c.get(f"/api/studies/{STUDY_UID}", headers=h).json()["patient_name"] == NAMES[0]
            assert c.get(f"/api/studies/{STUDY_UID}").status_code == 401  # a refusal logs nothing either
            assert c.get("/api/health").json() == {"status": "ok"}
    finally:
        stop_process(proc)
    logged = out.read_text()
    # logged at all, in the project's format (asctime processName name levelname message)
    assert re.search(r"^\d{4}-\d\d-\d\d [\d:,]+ MainProcess uvicorn\.error INFO Application startup complete",
                     logged, re.MULTILINE), logged
    assert "Shutting down" in logged
    leaks = [w for w in [*FORBIDDEN, STUDY_UID, "DINGO", "/api/studies/", "/worklist?"] if w in logged]
    assert not leaks, f"patient identifiers, UIDs or request paths in the log of `triage web`: {leaks}"
