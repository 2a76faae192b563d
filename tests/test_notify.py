"""Notifications against local listeners: an HTTP server that checks the signature, and an
MLLP server that parses the ORU^R01 with python-hl7 and answers AA, AE or nothing."""

from __future__ import annotations

import datetime as dt
import json
import logging
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hl7
import pytest
from nodekit import wait_for
from sqlalchemy import select
from test_dispatch import _result

from storage.blobs import BlobStore
from storage.db import Database
from storage.models import AuditEvent, NodeInfo, Notification, Result, Study
from triage.config import ConfigError, Settings, load_settings
from triage.notify import (
    MESSAGE_ID_HEADER,
    SIGNATURE_HEADER,
    Notifier,
    hl7_escape,
    message_id,
    plan_notifications,
    sign,
    verify_signature,
)

SECRET = "s3cret-key"
PATIENT_ID = "PID^7|X"
PATIENT_NAME = "Smith|Jones^Ann&Marie"
ACCESSION = "ACC|1~2"


# --------------------------------------------------------------------------- listeners


@dataclass
class Http:
    port: int
    answers: list[tuple[int, str]]  # (status, body), one per request; the last one repeats
    got: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture()
def http() -> Iterator[Http]:
    state = Http(0, [(200, "ok")])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.got.append({"headers": dict(self.headers), "body": body,
                              "valid": verify_signature(SECRET, self.headers[SIGNATURE_HEADER], body)})
            code, text = state.answers.pop(0) if len(state.answers) > 1 else state.answers[0]
            self.send_response(code)
            self.end_headers()
            self.wfile.write(text.encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield state
    server.shutdown()
    server.server_close()


@dataclass
class Mllp:
    port: int
    answers: list[str]  # "AA", "AE" or "silent", one per message; the last one repeats
    got: list[hl7.Message] = field(default_factory=list)


@pytest.fixture()
def mllp() -> Iterator[Mllp]:
    state = Mllp(0, ["AA"])

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            buf = b""
            while b"\x1c\x0d" not in buf:
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                buf += chunk
            msg = hl7.parse(buf[buf.index(b"\x0b") + 1: buf.index(b"\x1c")].decode())
            state.got.append(msg)
            answer = state.answers.pop(0) if len(state.answers) > 1 else state.answers[0]
            if answer == "silent":  # hold the connection until the sender gives up
                self.request.settimeout(10)
                self.request.recv(1)
                return
            control = str(msg.segment("MSH")[10])
            text = f"|Patient {hl7_escape(PATIENT_NAME)} {hl7_escape(PATIENT_ID)} unknown"
            ack = (f"MSH|^~\\&|RIS|HOSP|TRIAGE||20250101120000||ACK^R01^ACK|A1|P|2.5.1\r"
                   f"MSA|{answer}|{control}{text if answer == 'AE' else ''}\r")
            self.request.sendall(b"\x0b" + ack.encode() + b"\x1c\x0d")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield state
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- helpers


@pytest.fixture()
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def _settings(db: Database, blobs: BlobStore, *, http: Http | None = None, mllp: Mllp | None = None,
              **notify: Any) -> Settings:
    cfg: dict[str, Any] = {"min_priority": 2, "base_url": "https://triage.example.org/", **notify}
    if http is not None:
        cfg["webhooks"] = [{"name": "hook", "url": f"http://127.0.0.1:{http.port}/events", "secret": SECRET,
                            "timeout_seconds": 5}]
    if mllp is not None:
        cfg["hl7"] = [{"name": "ris", "host": "127.0.0.1", "port": mllp.port, "sending_facility": "NODE",
                       "receiving_application": "RIS", "receiving_facility": "HOSP", "timeout_seconds": 5}]
    return load_settings(storage={"database_url": db.url, "blob_root": str(blobs.root)}, notify=cfg,
                         dispatch={"backoff_initial_seconds": 1, "jitter": 0.1, "poll_seconds": 0.1})


def _urgent(db: Database, blobs: BlobStore, priority: int = 1, **result: Any) -> Result:
    """A result (test_dispatch's, three CT slices) with a study that has patient identifiers."""
    r, _ = _result(db, blobs, n_objects=3, priority=priority)
    with db.session() as s:
        row = s.get(Result, r.id)
        assert row is not None
        for k, v in {"percentile": 99.5, "abnormal_cm3": 12.25, "lesions": [{}, {}], "score": 3.5,
                     **result}.items():
            setattr(row, k, v)
        st = s.get(Study, row.series.study_id)
        assert st is not None
        st.patient_id, st.patient_name, st.accession_number = PATIENT_ID, PATIENT_NAME, ACCESSION
        st.study_date = "20250102"
        return row


def _plan(db: Database, settings: Settings, result_id: int) -> int:
    with db.session() as s:
        row = s.get(Result, result_id)
        assert row is not None
        return plan_notifications(s, row, settings.notify)


def _rows(db: Database) -> list[Notification]:
    with db.sessions() as s:
        return list(s.scalars(select(Notification).order_by(Notification.id)))


def _later(seconds: float = 120) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


def _no_phi(text: str | None) -> None:
    for v in (PATIENT_ID, PATIENT_NAME, "Smith", "Marie", hl7_escape(PATIENT_ID)):
        assert v not in (text or ""), text


# --------------------------------------------------------------------------- planning


def test_planning_is_idempotent_and_respects_min_priority(db: Database, blobs: BlobStore) -> None:
    settings = load_settings(notify={
        "webhooks": [{"name": "hook", "url": "http://127.0.0.1:9/x", "secret": SECRET}],
        "hl7": [{"name": "ris", "host": "127.0.0.1", "port": 9}]})
    routine = _urgent(db, blobs, priority=3)
    abnormal = _urgent(db, blobs, priority=2)
    assert _plan(db, settings, routine.id) == 0  # below min_priority (2): nothing
    assert _plan(db, settings, abnormal.id) == 2
    assert _plan(db, settings, abnormal.id) == 0  # a rebuild adds nothing
    rows = _rows(db)
    with db.sessions() as s:
        inst = s.scalar(select(NodeInfo.value).where(NodeInfo.key == "installation_id"))
    assert inst
    assert sorted((r.result_id, r.channel, r.target, r.state) for r in rows) == [
        (abnormal.id, "hl7", "ris", "pending"), (abnormal.id, "webhook", "hook", "pending")]
    for r in rows:  # deterministic: a retried send carries the same id
        assert r.message_id == message_id(inst, abnormal.id, 1, r.channel, r.target)
    assert len({r.message_id for r in rows}) == 2


# --------------------------------------------------------------------------- webhooks


def test_webhook_retried_then_sent_once_with_the_same_message_id(sqlite_db: Database, blobs: BlobStore,
                                                                  http: Http) -> None:
    db = sqlite_db
    http.answers = [(500, "busy"), (200, "ok")]
    settings = _settings(db, blobs, http=http)
    r = _urgent(db, blobs)
    assert _plan(db, settings, r.id) == 1
    notifier = Notifier(db, settings)
    assert notifier.send_due() == {"dead": 0, "sent": 0, "failed": 1}
    (n,) = _rows(db)
    assert (n.state, n.attempts, n.last_error) == ("pending", 1, "HTTP 500: busy")
    assert n.next_attempt_at > dt.datetime.now(dt.UTC)
    assert notifier.send_due() == {"dead": 0, "sent": 0, "failed": 0}  # backing off
    assert notifier.send_due(now=_later()) == {"dead": 0, "sent": 1, "failed": 0}
    assert notifier.send_due(now=_later()) == {"dead": 0, "sent": 0, "failed": 0}  # sent once
    (n,) = _rows(db)
    assert (n.state, n.attempts, n.last_error) == ("sent", 2, None) and n.sent_at is not None
    assert len(http.got) == 2 and all(g["valid"] for g in http.got)
    assert {g["headers"][MESSAGE_ID_HEADER] for g in http.got} == {n.message_id}
    assert http.got[0]["body"] == http.got[1]["body"]
    assert http.got[0]["headers"]["Content-Type"] == "application/json"
    raw = http.got[1]["body"]
    body = json.loads(raw)
    assert body["event"] == "triage.result" and body["message_id"] == n.message_id
    assert (body["priority"], body["priority_name"], body["abnormal"]) == (1, "urgent", True)
    assert (body["score"], body["percentile"], body["abnormal_cm3"], body["lesions"]) == (3.5, 99.5, 12.25, 2)
    assert body["accession_number"] == ACCESSION and body["kind"] == "chestct"
    assert body["study_url"] == f"https://triage.example.org/studies/{body['study_instance_uid']}"
    assert body["node"]["installation_id"] and body["series_instance_uid"]
    assert "patient_id" not in body  # only with include_patient_id
    _no_phi(raw.decode())
    with db.sessions() as s:
        assert s.scalar(select(AuditEvent).where(AuditEvent.action == "notification sent")) is not None


def test_webhook_400_is_a_dead_letter_without_patient_identifiers(sqlite_db: Database, blobs: BlobStore,
                                                                   http: Http,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from triage.cli import app

    db = sqlite_db
    http.answers = [(400, f"no such patient {PATIENT_ID}")]
    settings = _settings(db, blobs, http=http, include_patient_id=True)
    r = _urgent(db, blobs)
    _plan(db, settings, r.id)
    notifier = Notifier(db, settings)
    assert notifier.send_due() == {"dead": 1, "sent": 0, "failed": 0}
    (n,) = _rows(db)
    assert n.state == "dead" and n.last_error == "HTTP 400: no such patient ***"
    assert json.loads(http.got[0]["body"])["patient_id"] == PATIENT_ID
    assert notifier.send_due(now=_later()) == {"dead": 0, "sent": 0, "failed": 0}  # not retried by itself
    # the CLI lists, retries and cancels it
    monkeypatch.setenv("TRIAGE_STORAGE__DATABASE_URL", db.url)
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    res = runner.invoke(app, ["notifications", "list", "--state", "dead"])
    assert res.exit_code == 0 and "hook" in res.output and "HTTP 400" in res.output, res.output
    res = runner.invoke(app, ["notifications", "retry", str(n.id)])
    assert res.exit_code == 0, res.output
    assert _rows(db)[0].state == "pending"
    res = runner.invoke(app, ["notifications", "cancel", str(n.id)])
    assert res.exit_code == 0 and _rows(db)[0].state == "cancelled"
    res = runner.invoke(app, ["notifications", "cancel", "999"])
    assert res.exit_code == 2 and "cannot cancel notifications [999]" in res.output
    with db.sessions() as s:
        actions = set(s.scalars(select(AuditEvent.action)))
    assert {"notification refused", "notification retried", "notification cancelled"} <= actions


def test_old_notifications_become_dead_letters(sqlite_db: Database, blobs: BlobStore) -> None:
    db = sqlite_db
    hook = {"name": "hook", "url": "http://127.0.0.1:9/", "secret": SECRET}
    settings = _settings(db, blobs, webhooks=[hook])
    _plan(db, settings, _urgent(db, blobs).id)
    counts = Notifier(db, settings).send_due(now=_later(settings.notify.max_age_seconds + 1))
    assert counts == {"dead": 1, "sent": 0, "failed": 0} and _rows(db)[0].state == "dead"


def test_signature() -> None:
    body = b'{"a":1}'
    header = sign(SECRET.encode(), body)
    assert verify_signature(SECRET, header, body)
    assert not verify_signature(SECRET, header, body + b" ")  # tampered
    assert not verify_signature("other", header, body)
    old = sign(SECRET.encode(), body, t=int(time.time()) - 301)
    assert not verify_signature(SECRET, old, body)  # replayed too late
    assert verify_signature(SECRET, old, body, tolerance=600)
    rotated = header + ",v1=" + "0" * 64  # a second signature (another secret) does not hurt
    assert verify_signature(SECRET, rotated, body)
    assert not verify_signature(SECRET, "v1=abc", body) and not verify_signature(SECRET, "", body)


# --------------------------------------------------------------------------- HL7 over MLLP


def test_hl7_oru_r01(sqlite_db: Database, blobs: BlobStore, mllp: Mllp) -> None:
    db = sqlite_db
    settings = _settings(db, blobs, mllp=mllp)
    r = _urgent(db, blobs)
    _plan(db, settings, r.id)
    assert Notifier(db, settings).send_due() == {"dead": 0, "sent": 1, "failed": 0}
    (n,) = _rows(db)
    assert (n.state, n.attempts) == ("sent", 1)
    (msg,) = mllp.got
    assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert str(msg.segment("MSH")[10]) == n.message_id[:20]
    assert [str(msg.segment("MSH")[i]) for i in (3, 4, 5, 6, 11, 12)] == [
        "TRIAGE", "NODE", "RIS", "HOSP", "P", "2.5.1"]
    assert msg["PID.F3.R1.C1"] == PATIENT_ID  # (the accessor unescapes)
    assert (msg["PID.F5.R1.C1"], msg["PID.F5.R1.C2"]) == ("Smith|Jones", "Ann&Marie")
    assert "\\F\\" in str(msg.segment("PID")[5]) and "\\T\\" in str(msg.segment("PID")[5])
    obr = msg.segment("OBR")
    assert msg["OBR.F2.R1.C1"] == ACCESSION and msg["OBR.F3.R1.C1"] == ACCESSION
    assert str(obr[7]) == "20250102" and str(obr[25]) == "F"
    assert str(msg.segment("OBR")[4]).startswith("TRIAGE-CHESTCT^")
    obx = {str(s[3][0][0]): s for s in msg.segments("OBX")}
    assert str(obx["PRIORITY"][2]) == "CWE" and str(obx["PRIORITY"][5]) == "1^urgent^L"
    assert (str(obx["SCORE"][2]), float(str(obx["SCORE"][5])), str(obx["SCORE"][8])) == ("NM", 3.5, "A")
    assert float(str(obx["PERCENTILE"][5])) == 99.5
    assert float(str(obx["VOLUME"][5])) == 12.25 and str(obx["VOLUME"][6]).startswith("cm3^")
    assert str(obx["LESIONS"][5]) == "2"
    with db.sessions() as s:
        uid = s.scalar(select(Study.study_instance_uid))
    assert str(obx["110180"][2]) == "ST" and str(obx["110180"][5]) == uid
    assert all(str(s[11]) == "F" for s in msg.segments("OBX"))
    assert [int(str(s[1])) for s in msg.segments("OBX")] == list(range(1, len(obx) + 1))


def test_hl7_ae_is_retried(sqlite_db: Database, blobs: BlobStore, mllp: Mllp) -> None:
    db = sqlite_db
    mllp.answers = ["AE", "AA"]
    settings = _settings(db, blobs, mllp=mllp)
    _plan(db, settings, _urgent(db, blobs).id)
    notifier = Notifier(db, settings)
    assert notifier.send_due()["failed"] == 1
    (n,) = _rows(db)
    assert n.state == "pending" and n.last_error == "ACK AE: Patient *** *** unknown"
    assert notifier.send_due(now=_later())["sent"] == 1
    assert _rows(db)[0].state == "sent"
    assert [str(m.segment("MSH")[10]) for m in mllp.got] == [n.message_id[:20]] * 2


def test_hl7_no_ack_times_out_and_is_retried(sqlite_db: Database, blobs: BlobStore, mllp: Mllp,
                                             caplog: pytest.LogCaptureFixture) -> None:
    db = sqlite_db
    mllp.answers = ["silent"]
    settings = _settings(db, blobs, mllp=mllp)
    settings.notify.hl7[0].timeout_seconds = 0.5
    _plan(db, settings, _urgent(db, blobs).id)
    with caplog.at_level(logging.DEBUG):
        t0 = time.monotonic()
        assert Notifier(db, settings).send_due()["failed"] == 1
        assert time.monotonic() - t0 < 5
    (n,) = _rows(db)
    assert n.state == "pending" and n.attempts == 1 and n.last_error == "no ACK within 0.5 s"
    assert n.next_attempt_at > dt.datetime.now(dt.UTC)
    _no_phi(caplog.text)
    assert len(mllp.got) == 1


def test_hl7_refused_connection_is_retried(sqlite_db: Database, blobs: BlobStore) -> None:
    db = sqlite_db
    settings = _settings(db, blobs, hl7=[{"name": "ris", "host": "127.0.0.1", "port": 9,
                                          "timeout_seconds": 2}])
    _plan(db, settings, _urgent(db, blobs).id)
    assert Notifier(db, settings).send_due()["failed"] == 1
    (n,) = _rows(db)
    assert n.state == "pending" and n.last_error


# --------------------------------------------------------------------------- end to end


def test_report_result_queues_and_the_delivery_loop_sends(sqlite_db: Database, blobs: BlobStore,
                                                          http: Http) -> None:
    from worker.report import DeliveryLoop, report_result
    from worker.tasks import NodeContext

    db = sqlite_db
    ctx = NodeContext(_settings(db, blobs, http=http))
    urgent, routine = _urgent(db, blobs, priority=1), _urgent(db, blobs, priority=4)
    with db.session() as s:  # back to "pending", with the stored CT slices as the analysed series
        for rid in (urgent.id, routine.id):
            row = s.get(Result, rid)
            assert row is not None
            outs = row.outputs or []
            row.details = {"instance_blobs": [o["blob"] for o in outs],
                           "slice_order": [o["sop_instance"] for o in outs]}
            row.report_state, row.outputs = "pending", []
    loop = DeliveryLoop(ctx).start()
    try:
        assert report_result(ctx, urgent.id) == "ready"
        assert report_result(ctx, routine.id) == "ready"
        assert report_result(ctx, urgent.id) == "skipped"
        wait_for(lambda: [n for n in _rows(db) if n.state == "sent"], 15, "the webhook sent by the loop")
    finally:
        loop.stop()
    (n,) = _rows(db)
    assert (n.result_id, n.channel, n.target) == (urgent.id, "webhook", "hook")
    assert len(http.got) == 1 and http.got[0]["valid"]
    assert json.loads(http.got[0]["body"])["report_state"] == "ready"


def test_a_result_whose_reports_failed_is_still_notified(sqlite_db: Database, blobs: BlobStore) -> None:
    from worker.report import report_result
    from worker.tasks import NodeContext

    db = sqlite_db
    ctx = NodeContext(_settings(db, blobs, hl7=[{"name": "ris", "host": "127.0.0.1", "port": 9}]))
    r = _urgent(db, blobs)
    with db.session() as s:
        row = s.get(Result, r.id)
        assert row is not None
        row.details, row.report_state = {"instance_blobs": ["output/missing"]}, "pending"
    assert report_result(ctx, r.id) == "failed"
    assert [(n.result_id, n.channel) for n in _rows(db)] == [(r.id, "hl7")]


# --------------------------------------------------------------------------- configuration


def test_config_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hook = {"name": "a", "url": "https://h.example/x", "secret": SECRET}
    with pytest.raises(ConfigError, match=r"notify \(TRIAGE_NOTIFY\).*used twice: a"):
        load_settings(notify={"webhooks": [hook], "hl7": [{"name": "a", "host": "ris", "port": 2575}]})
    with pytest.raises(ConfigError, match=r"notify\.webhooks\.0\.url \(TRIAGE_NOTIFY__WEBHOOKS\).*http"):
        load_settings(notify={"webhooks": [{**hook, "url": "ftp://h.example/x"}]})
    with pytest.raises(ConfigError, match="exactly one of secret and secret_file"):
        load_settings(notify={"webhooks": [{"name": "a", "url": "https://h.example/"}]})
    with pytest.raises(ConfigError, match="cannot read secret_file"):
        load_settings(notify={"webhooks": [{**hook, "secret": None, "secret_file": str(tmp_path / "no")}]})
    with pytest.raises(ConfigError, match=r"notify\.min_priority"):
        load_settings(notify={"min_priority": 5})
    with pytest.raises(ConfigError, match=r"notify\.base_url"):
        load_settings(notify={"base_url": "triage.example.org"})
    (tmp_path / "key").write_text("from-a-file\n")
    monkeypatch.setenv("TRIAGE_NOTIFY__WEBHOOKS", json.dumps(
        [{"name": "a", "url": "https://h.example/x", "secret_file": str(tmp_path / "key")}]))
    s = load_settings()
    assert s.notify.webhooks[0].key() == b"from-a-file" and s.notify.min_priority == 2
    assert "from-a-file" not in repr(s.notify)
