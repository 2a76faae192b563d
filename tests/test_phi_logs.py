"""No patient identifier (nor secret) in any log line of a full run (issue 8 E).

A node at DEBUG level (as `triage serve -v` configures logging) receives studies whose
patient names and IDs are distinctive, refuses one instance of the same patient (so the
refusal path logs too), analyses the rest, builds and delivers SR/SEG to a PACS stand-in and
sends notifications (a webhook and an HL7 message, both refused once so their error paths
log too). The webhook's key and a password in its URL and in the broker URL are distinctive
as well. Everything logged by this process and by the SCP process is scanned.
"""

from __future__ import annotations

import http.server
import logging
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pydicom
import pytest
from nodekit import cxr_studies, storescu, wait_for
from pydicom.uid import generate_uid
from sqlalchemy import select
from test_node import _settings

from flows.bundle import Bundle
from storage.models import AuditEvent, Delivery, Notification, Result
from triage.serve import Node, _configure_logging
from triage.standin import StoreSCP

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
