"""The dashboard, models and audit pages, worklist filters, the reference plot, heartbeats."""

from __future__ import annotations

import datetime as dt
import io
import re
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select, update
from test_pages import _dead_letter, _login
from test_rank import T0, _study

from flows.bundle import Bundle
from storage.db import Database
from storage.models import AuditEvent, Instance, Job, Result, Series, Study, User, WorkerBeat, utcnow
from triage.config import Settings, load_settings
from triage.rank import worklist
from triage.status import instance_rate, node_status
from triage.web.api import create_app
from triage.web.security import create_token, create_user
from worker.heartbeat import Heartbeat
from worker.tasks import NodeContext

PASSWORD = "correct horse battery"


@pytest.fixture()
def settings(tmp_path: Path, sqlite_db: Database, tiny_bundle: Bundle, ct_bundle: Bundle) -> Settings:
    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle.path, bundle)  # a copy: one test corrupts it
    return load_settings(node={"data_dir": str(tmp_path / "d")}, storage={"database_url": sqlite_db.url},
                         models={"cxr": str(bundle), "chestct": str(ct_bundle.path)})


@pytest.fixture()
def client(settings: Settings, sqlite_db: Database) -> TestClient:
    with sqlite_db.session() as s:
        for name, role in (("ann", "admin"), ("vic", "viewer")):
            create_token(s, create_user(s, name, PASSWORD, role), "t")
    return TestClient(create_app(settings, sqlite_db), follow_redirects=False)


def _png(data: bytes) -> tuple[int, int]:
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG"
    return im.size


def _as(c: TestClient, user: str) -> None:
    form = c.get("/login")
    import re

    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token
    r = c.post("/login", data={"username": user, "password": PASSWORD, "csrf": token.group(1)})
    assert r.status_code == 303


def _instances(db: Database, series_id: int, ages_s: list[float], now: dt.datetime) -> None:
    with db.session() as s:
        for i, age in enumerate(ages_s):
            s.add(Instance(series_id=series_id, sop_instance_uid=f"9.{series_id}.{i}", sop_class_uid="1.2",
                           transfer_syntax_uid="1.2.840.10008.1.2.1", blob=f"b{series_id}.{i}",
                           sha256="0" * 64, size=1, is_image=True,
                           received_at=now - dt.timedelta(seconds=age)))


def test_status_figures(settings: Settings, sqlite_db: Database) -> None:
    from storage.blobs import BlobStore

    now = dt.datetime(2026, 11, 30, 12, 0, 30, tzinfo=dt.UTC)
    sid = _study(sqlite_db, "A", 0, [(2, 97.0, 5.0)])
    # this minute: 3; the minute before: 2; 20 minutes ago: outside the window
    _instances(sqlite_db, sid, [1, 5, 20, 40, 70, 1200], now)
    with sqlite_db.session() as s:
        s.execute(update(Job).values(created_at=now - dt.timedelta(seconds=10), finished_at=now))
        s.add(Series(study_id=s.scalar(select(Study.id)), series_instance_uid="1.9", state="receiving"))
        for name, age in (("w1", 5), ("w2", 300)):
            s.add(WorkerBeat(name=name, kind="celery", host="gpu", pid=7,
                             last_seen=now - dt.timedelta(seconds=age)))
    with sqlite_db.sessions() as s:
        rate = instance_rate(s, now)
        st = node_status(s, settings, BlobStore(settings.blob_root), now=now)
    assert len(rate) == 15 and rate[-1] == 3 and rate[-2] == 2 and sum(rate) == 5
    assert st["assembling"] == 1 and st["jobs"] == {"done": 1}
    assert st["latency"]["cxr"] == {"n": 1, "p50": 10.0, "p95": 10.0}
    assert [(w["name"], w["alive"]) for w in st["workers"]] == [("w1", True), ("w2", False)]
    assert st["bundles"][0]["name"] == "tiny" and st["bundles"][0]["ok"]
    assert 0 < st["disk"]["used_fraction"] < 1 and st["delivery_backlog"] == 0


def test_disk_against_the_high_water_mark(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard's disk figure (what its page polls) next to ``storage.high_water`` (0.95):
    below it, and above it, where readiness fails too (the SCP refuses images then)."""
    from storage.blobs import BlobStore, DiskUsage

    used = {"gib": 900}
    monkeypatch.setattr(BlobStore, "usage", lambda self: DiskUsage(
        total=1000 * 2**30, used=used["gib"] * 2**30, free=(1000 - used["gib"]) * 2**30))
    _as(client, "vic")
    disk = client.get("/dashboard.json").json()["disk"]
    assert disk == {"used_fraction": 0.9, "high_water": 0.95, "free_bytes": 100 * 2**30,
                    "total_bytes": 1000 * 2**30, "above_high_water": False}
    assert client.get("/api/health/ready").json()["checks"]["disk"] == "ok"
    used["gib"] = 960
    disk = client.get("/dashboard.json").json()["disk"]
    assert (disk["used_fraction"], disk["high_water"], disk["above_high_water"]) == (0.96, 0.95, True)
    assert client.get("/api/health/ready").json()["checks"]["disk"] == "96.0% used, above 95%"
    page = client.get("/dashboard")  # the page draws the bar and the mark from these figures
    assert 'id="hwmark"' in page.text and "d.above_high_water" in page.text


def test_heartbeat_rows(settings: Settings, sqlite_db: Database) -> None:
    ctx = NodeContext(settings)
    ctx.__dict__["db"] = sqlite_db
    hb = Heartbeat(ctx, "local", name="local@test")
    hb.beat()
    with sqlite_db.sessions() as s:
        first = s.get(WorkerBeat, "local@test")
        assert first is not None and first.kind == "local" and first.bundles == {}
    ctx.models.get("cxr")  # a loaded bundle is reported by the next beat
    hb.beat()
    with sqlite_db.sessions() as s:
        row = s.get(WorkerBeat, "local@test")
        assert row is not None and row.bundles == {"cxr": "tiny 1"} and row.last_seen >= first.last_seen
    hb.stop()  # a clean stop removes the row
    with sqlite_db.sessions() as s:
        assert s.get(WorkerBeat, "local@test") is None


def test_dashboard_page_and_its_json(client: TestClient, sqlite_db: Database) -> None:
    assert client.get("/dashboard").status_code == 303
    assert client.get("/dashboard.json").status_code == 303
    _as(client, "vic")
    page = client.get("/dashboard")
    assert page.status_code == 200 and 'id="workers"' in page.text and '"bundles"' in page.text
    j = client.get("/dashboard.json")
    assert j.status_code == 200 and j.headers["cache-control"] == "no-store"
    assert {"instances_per_minute", "assembling", "jobs", "latency", "delivery_backlog", "dead_letters",
            "disk", "workers", "bundles"} <= set(j.json())


def test_models_page_shows_calibration(client: TestClient, settings: Settings) -> None:
    _as(client, "vic")
    page = client.get("/models")
    assert page.status_code == 200 and "tiny 1" in page.text and "verified" in page.text
    assert "Validation AUROC" in page.text and "youden" in page.text
    # a patch bundle: every map's validation figures, and what it takes to replace the default
    assert "map likelihood:voxel" in page.text
    assert page.text.count("lower bound on its gain over the posterior map") == 3
    w, h = _png(client.get("/models/cxr/calibration.png").content)
    assert w > h > 100  # ROC and histograms side by side
    assert client.get("/models/bct/calibration.png").status_code == 404
    # a modified weight file is shown, not hidden
    assert settings.models.cxr is not None
    (Path(settings.models.cxr) / "m1.pt").write_bytes(b"tampered")
    import os

    os.utime(Path(settings.models.cxr) / "manifest.json")  # (the check is cached per manifest mtime)
    page = client.get("/models")
    assert "unusable" in page.text and "m1.pt is corrupted" in page.text


def test_audit_page_is_for_admins(client: TestClient, sqlite_db: Database) -> None:
    _as(client, "vic")
    assert client.get("/audit").status_code == 403
    client.cookies.clear()
    _as(client, "ann")
    with sqlite_db.session() as s:
        for i in range(120):
            s.add(AuditEvent(actor="scp", action="association refused", detail={"n": i}))
    page = client.get("/audit")
    assert page.status_code == 200 and page.text.count("association refused") >= 100
    assert "older events" in page.text
    only = client.get("/audit", params={"actor": "ann", "action": "login"})
    assert "association refused</td>" not in only.text and ">login</td>" in only.text


def test_worklist_filters(client: TestClient, sqlite_db: Database) -> None:
    _study(sqlite_db, "ROUTINE", 0, [(4, 30.0, 1.0)])
    _study(sqlite_db, "URGENT", 5, [(1, 99.9, 9.0)])
    _study(sqlite_db, "CT", 10, [(2, 97.0, 5.0)], kind="chestct")
    sid = _study(sqlite_db, "RUNNING", 15, [])
    with sqlite_db.session() as s:
        s.add(Job(series_id=sid, series_version=1, kind="cxr", state="running"))
        s.execute(update(Study).where(Study.accession_number == "CT").values(patient_name="O'BRIEN^PAT",
                                                                            patient_id="PID-7"))
    with sqlite_db.sessions() as s:
        def acc(**kw: object) -> list[str | None]:
            return [r.accession_number for r in worklist(s, **kw)]  # type: ignore[arg-type]

        assert acc(min_priority=2) == ["URGENT", "CT"]
        assert acc(kind="chestct") == ["CT"]
        assert acc(state="analysing") == ["RUNNING"]
        assert acc(state="analysed") == ["URGENT", "CT", "ROUTINE"]
        assert acc(text="o'b") == ["CT"] and acc(text="PID-7") == ["CT"] and acc(text="%") == []
        assert acc(since=T0 + dt.timedelta(minutes=7)) == ["CT", "RUNNING"]
        with pytest.raises(ValueError, match="unknown worklist state"):
            worklist(s, state="done")
    _login(client)
    page = client.get("/worklist", params={"priority": "1"})
    assert "URGENT" in page.text and "ROUTINE" not in page.text
    assert client.get("/worklist", params={"since": "yesterday"}).status_code == 422


def test_reference_plot_on_the_study_page(client: TestClient, sqlite_db: Database) -> None:
    _study(sqlite_db, "TINY", 0, [(2, 97.0, 1.5)])
    with sqlite_db.session() as s:
        s.execute(update(Result).values(bundle_name="tiny", bundle_version="1"))
        rid = s.scalar(select(Result.id))
    assert rid is not None
    _study(sqlite_db, "OLD", 5, [(4, 30.0, 0.1)])  # scored by bundle "b", not configured
    _as(client, "vic")
    page = client.get("/studies/1.2.3.0")
    assert f'src="/results/{rid}/reference.png"' in page.text
    _png(client.get(f"/results/{rid}/reference.png").content)
    assert "reference.png" not in client.get("/studies/1.2.3.5").text
    assert client.get(f"/results/{rid + 1}/reference.png").status_code == 404


def test_api_status_models_audit(client: TestClient, sqlite_db: Database) -> None:
    with sqlite_db.session() as s:
        users = {u.username: u for u in s.scalars(select(User))}
        viewer = create_token(s, users["vic"], "monitor")
        admin = create_token(s, users["ann"], "ops")
    h = {"Authorization": f"Bearer {viewer}"}
    assert client.get("/api/status").status_code == 401
    assert client.get("/api/status", headers=h).json()["bundles"][0]["name"] == "tiny"
    assert client.get("/api/models", headers=h).json()[0]["threshold_method"] == "youden"
    assert client.get("/api/audit", headers=h).status_code == 403
    with sqlite_db.session() as s:
        s.add(AuditEvent(actor="ann", action="delivery retried", detail={}, at=utcnow()))
    ev = client.get("/api/audit", headers={"Authorization": f"Bearer {admin}"},
                    params={"action": "delivery retried"}).json()
    assert [e["actor"] for e in ev] == ["ann"]
    assert client.get("/api/worklist", headers=h, params={"state": "nonsense"}).status_code == 422


def test_configuration_changes_are_audited_without_secrets(tmp_path: Path, sqlite_db: Database) -> None:
    from triage.audit import record_configuration

    node = {"data_dir": str(tmp_path / "d")}
    # webhook keys: one given inline (a SecretStr), one read from a file (secret_file); the
    # file's name is distinctive too, as a path that names a secret is hidden by its key's name
    key_files = [tmp_path / f"hookkey-{n}-PATHMARK.txt" for n in (1, 2)]
    for f, text in zip(key_files, ("filekey-OKAPI-1", "filekey-OKAPI-2"), strict=True):
        f.write_text(f"{text}\n")

    def webhooks(n: int) -> dict[str, object]:
        return {"webhooks": [
            {"name": "inline", "url": "http://127.0.0.1:9/hook", "secret": f"inlinekey-LYNX-{n}"},
            {"name": "fromfile", "url": "http://127.0.0.1:9/hook", "secret_file": str(key_files[n - 1])}]}

    first = load_settings(node=node, celery={"broker_url": "redis://:hunter2@127.0.0.1:6379/0"},
                          notify=webhooks(1))
    assert record_configuration(sqlite_db, first) == {}
    assert record_configuration(sqlite_db, first) == {}  # unchanged: nothing new
    changed = load_settings(node=node, rank={"urgent_percentile": 98.0},
                            celery={"broker_url": "redis://:swordfish@127.0.0.1:6379/0"}, notify=webhooks(2))
    changes = record_configuration(sqlite_db, changed)
    with sqlite_db.sessions() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.action.like("configuration%"))))
    assert [e.action for e in events] == ["configuration recorded", "configuration changed"]
    dumped = repr([e.detail for e in events])
    leaks = [w for w in ("hunter2", "swordfish", "LYNX", "OKAPI", "PATHMARK") if w in dumped]
    assert not leaks, f"secrets in the audit log: {leaks}"
    assert changes["rank.urgent_percentile"] == {"from": 99.0, "to": 98.0}
    assert set(changes) == {"rank.urgent_percentile"}  # (a changed secret alone is not visible)
    hooks = events[-1].detail["settings"]["notify.webhooks"]
    assert [(h["name"], h["secret"], h["secret_file"]) for h in hooks] == [
        ("inline", "(hidden)", None), ("fromfile", "(hidden)", "(hidden)")]


def test_notifications_api_page_and_metrics(client: TestClient, sqlite_db: Database) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from storage.models import Notification

    _study(sqlite_db, "URGENT", 0, [(1, 99.9, 9.0)])
    with sqlite_db.session() as s:
        rid = s.scalar(select(Result.id))
        assert rid is not None
        n = Notification(result_id=rid, channel="hl7", target="ris", message_id="m1", state="dead",
                         attempts=4, last_error="no ACK within 10 s")
        s.add(n)
        s.flush()
        nid = n.id
        users = {u.username: u for u in s.scalars(select(User))}
        viewer, admin = create_token(s, users["vic"], "v"), create_token(s, users["ann"], "a")
    rows = client.get("/api/notifications", headers={"Authorization": f"Bearer {viewer}"}).json()
    assert [(r["id"], r["state"], r["target"]) for r in rows] == [(nid, "dead", "ris")]
    assert client.post(f"/api/notifications/{nid}/retry",
                       headers={"Authorization": f"Bearer {viewer}"}).status_code == 403
    fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert [(x.labels, x.value) for x in fams["triage_notifications"].samples] == [
        ({"state": "dead", "channel": "hl7", "target": "ris"}, 1.0)]
    # the deliveries page lists it; an admin retries it there (with the CSRF token)
    _as(client, "ann")
    page = client.get("/deliveries")
    assert f'data-notification="{nid}"' in page.text and "no ACK within 10 s" in page.text
    import re

    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf
    assert client.post(f"/notifications/{nid}/retry", data={}).status_code == 403
    assert client.post(f"/notifications/{nid}/retry", data={"csrf": csrf.group(1)}).status_code == 303
    with sqlite_db.sessions() as s:
        assert s.get(Notification, nid).state == "pending"  # type: ignore[union-attr]
    r = client.post(f"/api/notifications/{nid}/cancel", headers={"Authorization": f"Bearer {admin}"})
    assert r.json() == {"id": nid, "state": "cancelled"}
    assert client.post(f"/api/notifications/{nid}/cancel",
                       headers={"Authorization": f"Bearer {admin}"}).status_code == 409
    with sqlite_db.sessions() as s:
        acts = [e.action for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert "notification retried" in acts and "notification cancelled" in acts


# a reference to another host: an attribute that loads or links (src, href, action, srcset,
# poster), a CSS url() or @import, or a script's fetch/import, to http(s):// or protocol-relative //
_EXTERNAL = re.compile(r"""(?:\b(?:src|href|action|srcset|poster)\s*=\s*["']?|url\(\s*["']?|@import\s+["']?"""
                       r"""|\b(?:fetch|import)\(\s*["'`])\s*(?:https?:)?//""", re.IGNORECASE)


def test_no_page_loads_anything_from_another_host(client: TestClient, sqlite_db: Database,
                                                  tmp_path: Path) -> None:
    """Every page, as an admin with something on each, and the URLs where FastAPI would serve
    its docs pages: no script, style, image, form or link points to another host. The node
    runs offline (issue 6: no CDN); FastAPI's Swagger UI and ReDoc load theirs from
    cdn.jsdelivr.net, so they are off (a docs page served from local files would pass)."""
    from storage.models import Notification

    _study(sqlite_db, "TINY", 0, [(2, 97.0, 1.5)])
    with sqlite_db.session() as s:
        s.execute(update(Result).values(bundle_name="tiny", bundle_version="1"))
        rid = s.scalar(select(Result.id))
        assert rid is not None
        s.add(Notification(result_id=rid, channel="webhook", target="hook", message_id="m1", state="dead",
                           attempts=2, last_error="HTTP 503"))
    _dead_letter(sqlite_db, tmp_path)
    _as(client, "ann")
    pages = ["/login", "/dashboard", "/worklist", "/studies/1.2.3.0", "/deliveries", "/models", "/audit"]
    docs = ["/api/docs", "/api/redoc", "/docs", "/redoc", "/api/docs/oauth2-redirect"]
    texts = {}
    for path in pages + docs:
        r = client.get(path)
        assert r.status_code == 200 if path in pages else r.status_code in (200, 404), (path, r.status_code)
        if r.status_code == 200:
            assert r.headers["content-type"].startswith("text/html"), path
            texts[path] = r.text
            found = [m.group(0) for m in _EXTERNAL.finditer(r.text)]
            assert not found, f"{path} refers to another host: {found}"
    # each page had its content (so there was something to check): pictures, outbox rows
    assert '/reference.png"' in texts["/studies/1.2.3.0"] and "TINY" in texts["/worklist"]
    assert "HTTP 503" in texts["/deliveries"] and "0xA700" in texts["/deliveries"]
    assert "/calibration.png" in texts["/models"] and "<script" in texts["/dashboard"]
    assert client.get("/api/openapi.json").json()["info"]["title"] == "triage node"
