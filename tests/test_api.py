"""The JSON API, its authorisation, readiness, and /metrics (parsed by prometheus_client)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from test_dispatch import _result
from test_rank import _study

from storage.blobs import BlobStore
from storage.db import Database
from storage.models import ApiToken, AuditEvent, Delivery, Notification, Result
from triage.config import Settings, load_settings
from triage.receive import StorageSCP
from triage.web.api import create_app
from triage.web.security import create_token, create_user, hash_password, verify_password


@pytest.fixture()
def node(tmp_path: Path, sqlite_db: Database) -> Iterator[tuple[Settings, Database, StorageSCP]]:
    s = load_settings(node={"data_dir": str(tmp_path / "d")}, receive={"port": 0},
                      storage={"database_url": sqlite_db.url})
    scp = StorageSCP(s, sqlite_db)
    scp.start()
    s = load_settings(node={"data_dir": str(tmp_path / "d")}, receive={"port": scp.port},
                      storage={"database_url": sqlite_db.url})
    yield s, sqlite_db, scp
    scp.stop()


@pytest.fixture()
def client(node: tuple[Settings, Database, StorageSCP]) -> TestClient:
    s, db, _ = node
    return TestClient(create_app(s, db))


@pytest.fixture()
def tokens(node: tuple[Settings, Database, StorageSCP]) -> dict[str, str]:
    _, db, _ = node
    out = {}
    with db.session() as s:
        for name, role in (("ann", "admin"), ("vic", "viewer")):
            u = create_user(s, name, "correct horse battery", role)
            out[role] = create_token(s, u, "tests")
    return out


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_passwords_are_scrypt_hashed() -> None:
    h = hash_password("correct horse battery")
    assert h.startswith("scrypt$32768$8$1$") and "correct" not in h
    assert verify_password("correct horse battery", h) and not verify_password("wrong horse battery", h)
    assert hash_password("correct horse battery") != h  # salted
    assert not verify_password("x", "md5$abc")
    with pytest.raises(ValueError, match="at least 10"):
        hash_password("short")


def test_health_and_readiness(client: TestClient, node: tuple[Settings, Database, StorageSCP]) -> None:
    assert client.get("/api/health").json() == {"status": "ok"}
    r = client.get("/api/health/ready")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "disk": "ok", "scp": "ok"}
    node[2].stop()  # the SCP goes away: not ready, and the reason says so
    r = client.get("/api/health/ready")
    assert r.status_code == 503 and "nothing listens on port" in r.json()["checks"]["scp"]


def test_readiness_names_the_broker(node: tuple[Settings, Database, StorageSCP], tmp_path: Path) -> None:
    """With Celery the broker is checked: a dead Redis port gives 503 that names it; the live
    Redis the tests use gives "ok" (so the check is a real PING, not a fixed answer)."""
    from nodekit import free_port
    from test_node import REDIS_URL, _redis_or_fail

    _, db, scp = node
    checks = {}
    for name, url in (("dead", f"redis://127.0.0.1:{free_port()}/0"), ("live", REDIS_URL)):
        if name == "live":
            _redis_or_fail()
        cs = load_settings(node={"data_dir": str(tmp_path / "d")}, receive={"port": scp.port},
                           storage={"database_url": db.url}, executor={"kind": "celery"},
                           celery={"broker_url": url})
        r = TestClient(create_app(cs, db)).get("/api/health/ready")
        checks[name] = (r.status_code, r.json())
    code, body = checks["dead"]
    assert code == 503 and body["status"] == "failing"
    assert body["checks"]["broker"] == "unavailable (ConnectionError)"
    assert {k: v for k, v in body["checks"].items() if k != "broker"} == {"database": "ok", "disk": "ok",
                                                                          "scp": "ok"}
    assert checks["live"] == (200, {"status": "ok", "checks": {"database": "ok", "broker": "ok", "disk": "ok",
                                                                 "scp": "ok"}})


@pytest.mark.parametrize("path", ["/api/worklist", "/api/studies/1.2.3", "/api/jobs", "/api/deliveries",
                                  "/api/status", "/api/models", "/api/notifications"])
def test_reading_needs_a_valid_token(client: TestClient, tokens: dict[str, str], path: str) -> None:
    assert client.get(path).status_code == 401
    assert client.get(path, headers=_h("trg_not-a-token")).status_code == 401
    assert client.get(path, headers={"Authorization": "Basic YTpi"}).status_code == 401
    assert client.get(path, headers=_h(tokens["viewer"])).status_code in (200, 404)


def _dead_outbox_rows(db: Database, tmp_path: Path) -> dict[str, int]:
    """A dead delivery and a dead notification of one stored result: {"deliveries": id, ...}."""
    res, outputs = _result(db, BlobStore(tmp_path / "b"), n_objects=1)
    with db.session() as s:
        d = Delivery(result_id=res.id, destination="pacs", sop_class_uid=outputs[0]["sop_class"],
                     sop_instance_uid=outputs[0]["sop_instance"], blob=outputs[0]["blob"], state="dead",
                     attempts=7, last_error="C-STORE status 0xA700")
        n = Notification(result_id=res.id, channel="webhook", target="hook", message_id="m1", state="dead",
                         attempts=3, last_error="HTTP 503")
        s.add_all([d, n])
        s.flush()
        return {"deliveries": d.id, "notifications": n.id}


@pytest.mark.parametrize("action", ["retry", "cancel"])
@pytest.mark.parametrize("what", ["deliveries", "notifications"])
def test_outbox_actions_need_a_token_and_the_admin_role(client: TestClient, tokens: dict[str, str],
                                                        node: tuple[Settings, Database, StorageSCP],
                                                        tmp_path: Path, what: str, action: str) -> None:
    db = node[1]
    row_id = _dead_outbox_rows(db, tmp_path)[what]
    path = f"/api/{what}/{row_id}/{action}"

    def state() -> tuple[object, ...]:
        with db.sessions() as s:
            row = s.get(Delivery, row_id) if what == "deliveries" else s.get(Notification, row_id)
            assert row is not None
            return row.state, row.attempts, row.next_attempt_at, len(list(s.scalars(select(AuditEvent))))

    before = state()
    assert client.post(path).status_code == 401
    assert client.post(path, headers=_h("trg_not-a-token")).status_code == 401
    assert client.post(path, headers=_h(tokens["viewer"])).status_code == 403
    assert state() == before  # refused, and nothing changed (no audit event either)
    r = client.post(path, headers=_h(tokens["admin"]))
    assert r.status_code == 200 and r.json() == {"id": row_id,
                                                 "state": "pending" if action == "retry" else "cancelled"}
    assert state()[0] == r.json()["state"]


def test_audit_api_needs_an_admin_token(client: TestClient, tokens: dict[str, str]) -> None:
    assert client.get("/api/audit").status_code == 401
    assert client.get("/api/audit", headers=_h("trg_not-a-token")).status_code == 401
    assert client.get("/api/audit", headers=_h(tokens["viewer"])).status_code == 403
    r = client.get("/api/audit", headers=_h(tokens["admin"]), params={"action": "user created"})
    assert r.status_code == 200 and {e["detail"]["user"] for e in r.json()} == {"ann", "vic"}


def test_revoked_token_is_refused(client: TestClient, tokens: dict[str, str],
                                  node: tuple[Settings, Database, StorageSCP]) -> None:
    with node[1].session() as s:
        for t in s.scalars(select(ApiToken)):
            t.revoked = True
    assert client.get("/api/jobs", headers=_h(tokens["admin"])).status_code == 401


def test_worklist_study_jobs_and_deliveries(client: TestClient, tokens: dict[str, str],
                                            node: tuple[Settings, Database, StorageSCP],
                                            tmp_path: Path) -> None:
    _, db, _ = node
    _study(db, "ROUTINE", 0, [(4, 30.0, 1.0)])
    _study(db, "URGENT", 5, [(1, 99.9, 9.0)])
    r = client.get("/api/worklist", headers=_h(tokens["viewer"]))
    assert r.status_code == 200
    rows = r.json()
    assert [x["accession_number"] for x in rows] == ["URGENT", "ROUTINE"]
    assert rows[0]["priority_name"] == "urgent" and rows[0]["patient_name"] == "DOE^J"
    assert client.get("/api/worklist?min_priority=1", headers=_h(tokens["viewer"])).json()[0]["priority"] == 1
    assert client.get("/api/worklist?min_priority=9", headers=_h(tokens["viewer"])).status_code == 422

    st = client.get(f"/api/studies/{rows[0]['study_instance_uid']}", headers=_h(tokens["viewer"])).json()
    (se,) = st["series"]
    assert se["results"][0]["priority_name"] == "urgent" and se["jobs"][0]["state"] == "done"
    assert client.get("/api/studies/9.9.9", headers=_h(tokens["viewer"])).status_code == 404
    assert len(client.get("/api/jobs?state=done", headers=_h(tokens["viewer"])).json()) == 2

    blobs = BlobStore(tmp_path / "b")
    res, outputs = _result(db, blobs, n_objects=1)
    with db.session() as s:
        s.add(Delivery(result_id=res.id, destination="pacs", sop_class_uid=outputs[0]["sop_class"],
                       sop_instance_uid=outputs[0]["sop_instance"], blob=outputs[0]["blob"], state="dead",
                       attempts=7, last_error="C-STORE status 0xA700"))
    dl = client.get("/api/deliveries?state=dead", headers=_h(tokens["viewer"])).json()
    assert len(dl) == 1 and dl[0]["last_error"] == "C-STORE status 0xA700"
    did = dl[0]["id"]
    assert client.post(f"/api/deliveries/{did}/retry").status_code == 401
    assert client.post(f"/api/deliveries/{did}/retry", headers=_h(tokens["viewer"])).status_code == 403
    r = client.post(f"/api/deliveries/{did}/retry", headers=_h(tokens["admin"]))
    assert r.status_code == 200 and r.json()["state"] == "pending"
    assert client.post("/api/deliveries/999/retry", headers=_h(tokens["admin"])).status_code == 409
    r = client.post(f"/api/deliveries/{did}/cancel", headers=_h(tokens["admin"]))
    assert r.json()["state"] == "cancelled"
    # the admin's action is in the study's timeline
    with db.sessions() as s:
        sid = s.scalar(select(Result.series_id).where(Result.id == res.id))
    assert sid is not None
    st = client.get("/api/studies/" + _study_uid_of(db, sid), headers=_h(tokens["viewer"])).json()
    actions = [e["action"] for e in st["series"][0]["timeline"]]
    assert "delivery retried" in actions and "delivery cancelled" in actions


def _study_uid_of(db: Database, series_id: int) -> str:
    from storage.models import Series, Study

    with db.sessions() as s:
        return str(s.scalar(select(Study.study_instance_uid).join(Series, Series.study_id == Study.id)
                            .where(Series.id == series_id)))


def test_metrics_parse(client: TestClient, node: tuple[Settings, Database, StorageSCP],
                       tmp_path: Path) -> None:
    _, db, _ = node
    _study(db, "A", 0, [(2, 97.0, 3.0)])
    res, outputs = _result(db, BlobStore(tmp_path / "b"), n_objects=1)
    now = dt.datetime.now(dt.UTC)
    with db.session() as s:
        s.add(Delivery(result_id=res.id, destination="pacs", sop_class_uid=outputs[0]["sop_class"],
                       sop_instance_uid=outputs[0]["sop_instance"], blob=outputs[0]["blob"], state="sent",
                       created_at=now - dt.timedelta(seconds=2.5), delivered_at=now))
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams: dict[str, Any] = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert {"triage_instances_received", "triage_series", "triage_jobs", "triage_results",
            "triage_deliveries", "triage_delivery_latency_seconds", "triage_disk_used_ratio"} <= set(fams)
    jobs = {(smp.labels["state"], smp.labels["kind"]): smp.value for smp in fams["triage_jobs"].samples}
    assert jobs[("done", "cxr")] == 1
    lat = {(smp.name, smp.labels.get("le")): smp.value
           for smp in fams["triage_delivery_latency_seconds"].samples}
    assert lat[("triage_delivery_latency_seconds_bucket", "2.0")] == 0
    assert lat[("triage_delivery_latency_seconds_bucket", "3.0")] == 1
    assert "DOE" not in r.text  # no patient data in metrics


def test_analysis_latency_histogram(client: TestClient, node: tuple[Settings, Database, StorageSCP]) -> None:
    """triage_analysis_latency_seconds: per kind, from a done job's created_at to finished_at;
    absent while no job has finished."""
    from storage.models import Job

    db = node[1]
    _study(db, "A", 0, [(2, 97.0, 3.0)])
    _study(db, "B", 5, [(4, 30.0, 1.0)], kind="chestct")

    def families() -> dict[str, Any]:
        return {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}

    assert "triage_analysis_latency_seconds" not in families()  # done, but no finished_at yet
    now = dt.datetime.now(dt.UTC)
    with db.session() as s:
        jobs = {j.kind: j for j in s.scalars(select(Job))}
        jobs["cxr"].created_at, jobs["cxr"].finished_at = now - dt.timedelta(seconds=4), now
        jobs["chestct"].created_at, jobs["chestct"].finished_at = now - dt.timedelta(seconds=45), now
        s.add(Job(series_id=jobs["cxr"].series_id, series_version=2, kind="cxr", state="failed",
                  created_at=now - dt.timedelta(seconds=1), finished_at=now))  # failures are not latency
    samples = {(smp.name, smp.labels.get("kind"), smp.labels.get("le")): smp.value
               for smp in families()["triage_analysis_latency_seconds"].samples}
    b = "triage_analysis_latency_seconds_bucket"
    assert samples[(b, "cxr", "3.0")] == 0 and samples[(b, "cxr", "5.0")] == 1
    assert samples[(b, "cxr", "+Inf")] == 1
    assert samples[("triage_analysis_latency_seconds_count", "cxr", None)] == 1
    assert samples[("triage_analysis_latency_seconds_sum", "cxr", None)] == pytest.approx(4.0)
    assert samples[(b, "chestct", "30.0")] == 0 and samples[(b, "chestct", "60.0")] == 1


def test_openapi_lists_every_endpoint(client: TestClient) -> None:
    paths = set(client.get("/api/openapi.json").json()["paths"])
    assert {"/api/worklist", "/api/studies/{study_uid}", "/api/jobs", "/api/deliveries",
            "/api/deliveries/{delivery_id}/retry", "/api/deliveries/{delivery_id}/cancel", "/api/health",
            "/api/health/ready", "/api/status", "/api/models", "/api/audit", "/api/notifications",
            "/api/notifications/{notification_id}/retry",
            "/api/notifications/{notification_id}/cancel"} <= paths
