"""The HTML pages: login with lock-out, sessions, CSRF, the worklist (browser tests follow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_rank import _study

from flows.bundle import Bundle
from storage.db import Database
from storage.models import AuditEvent, Job, User, utcnow
from triage.config import load_settings
from triage.web.api import create_app
from triage.web.pages import LOCK_MINUTES, MAX_FAILURES, SESSION_COOKIE
from triage.web.security import create_token, create_user

PASSWORD = "correct horse battery"


@pytest.fixture()
def client(tmp_path: Path, sqlite_db: Database) -> TestClient:
    s = load_settings(node={"data_dir": str(tmp_path / "d")}, storage={"database_url": sqlite_db.url})
    with sqlite_db.session() as ss:
        create_user(ss, "ann", PASSWORD, "admin")
    return TestClient(create_app(s, sqlite_db), follow_redirects=False)


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html
    return m.group(1)


def _login(c: TestClient, password: str = PASSWORD, csrf: str | None = None, username: str = "ann") -> object:
    form = c.get("/login")
    return c.post("/login", data={"username": username, "password": password,
                                  "csrf": _csrf(form.text) if csrf is None else csrf, "next": "/worklist"})


def test_pages_need_a_login(client: TestClient) -> None:
    r = client.get("/worklist")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/worklist"
    client.cookies.set(SESSION_COOKIE, "forged")
    assert client.get("/worklist").status_code == 303


def test_login_worklist_logout(client: TestClient, sqlite_db: Database) -> None:
    _study(sqlite_db, "ACC-ROUTINE", 0, [(4, 20.0, 1.0)])
    _study(sqlite_db, "ACC-URGENT", 3, [(1, 99.9, 9.0)])
    r = _login(client)
    assert r.status_code == 303 and r.headers["location"] == "/worklist"  # type: ignore[attr-defined]
    cookie = r.headers["set-cookie"]  # type: ignore[attr-defined]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = client.get("/worklist")
    assert page.status_code == 200
    assert page.text.index("ACC-URGENT") < page.text.index("ACC-ROUTINE")
    assert "DOE^J" in page.text and 'class="badge p1"' in page.text
    # a POST without the session's CSRF token is refused; with it, the session ends
    assert client.post("/logout", data={}).status_code == 403
    assert client.post("/logout", data={"csrf": "wrong"}).status_code == 403
    r = client.post("/logout", data={"csrf": _csrf(page.text)})
    assert r.status_code == 303 and client.get("/worklist").status_code == 303
    with sqlite_db.sessions() as s:
        actions = [e.action for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert "login" in actions and "logout" in actions


@pytest.mark.parametrize("how", ["http", "https", "forwarded"])
def test_cookies_are_secure_behind_tls(client: TestClient, how: str) -> None:
    """Secure on both cookies when the request came over HTTPS, directly or through a proxy that
    says so (X-Forwarded-Proto); not over plain HTTP, where a browser would drop a Secure one."""
    if how == "https":
        client.base_url = client.base_url.copy_with(scheme="https")
    if how == "forwarded":
        client.headers["X-Forwarded-Proto"] = "https"
    form = client.get("/login")
    if how == "forwarded":  # the client speaks plain HTTP to us, so its jar keeps the Secure cookie back
        client.cookies.set("triage_login", form.cookies["triage_login"])
    r = client.post("/login", data={"username": "ann", "password": PASSWORD, "csrf": _csrf(form.text)})
    assert r.status_code == 303
    for resp, name in ((form, "triage_login"), (r, SESSION_COOKIE)):
        cookie = next(c for c in resp.headers.get_list("set-cookie") if c.startswith(f"{name}="))
        assert "HttpOnly" in cookie
        assert ("Secure" in cookie) == (how != "http"), (how, cookie)


def test_login_needs_the_form_token(client: TestClient) -> None:
    client.get("/login")
    r = client.post("/login", data={"username": "ann", "password": PASSWORD, "csrf": "forged"})
    assert r.status_code == 403


def test_wrong_passwords_lock_the_account(client: TestClient, sqlite_db: Database) -> None:
    for _ in range(MAX_FAILURES):
        r = _login(client, password="wrong horse battery")
        assert r.status_code == 401 and "Wrong user name or password" in r.text  # type: ignore[attr-defined]
    r = _login(client)  # the right password no longer helps
    assert r.status_code == 401 and "Too many failed logins" in r.text  # type: ignore[attr-defined]
    r = _login(client, username="nobody")  # an unknown user name is a failed login too
    assert r.status_code == 401 and "Wrong user name or password" in r.text  # type: ignore[attr-defined]
    with sqlite_db.sessions() as s:
        assert s.scalar(select(User.locked_until).where(User.username == "ann")) is not None
        events = [(e.actor, e.action, e.detail)
                  for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    # every wrong password is audited with the count so far; the last one records the lock-out
    failed = [(actor, detail) for actor, action, detail in events if action == "login failed"]
    assert failed == [("ann", {"failures": n}) for n in range(1, MAX_FAILURES)] + [
        ("ann", {"failures": MAX_FAILURES, "locked_minutes": LOCK_MINUTES}),
        ("web", {"reason": "unknown user"})]
    assert ("ann", "login refused", {"reason": "locked"}) in events  # the right password, while locked
    assert "login" not in [action for _, action, _ in events]


def test_no_open_redirect_after_login(client: TestClient) -> None:
    form = client.get("/login?next=https://evil.example/")
    r = client.post("/login", data={"username": "ann", "password": PASSWORD, "csrf": _csrf(form.text),
                                    "next": "//evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/worklist"


def _dead_letter(db: Database, tmp_path: Path) -> int:
    """A dead delivery (9 attempts, last error 0xA700) of a stored result; returns its id."""
    from test_dispatch import _result

    from storage.blobs import BlobStore
    from storage.models import Delivery

    res, outputs = _result(db, BlobStore(tmp_path / "b"), n_objects=1)
    with db.session() as s:
        d = Delivery(result_id=res.id, destination="pacs", sop_class_uid=outputs[0]["sop_class"],
                     sop_instance_uid=outputs[0]["sop_instance"], blob=outputs[0]["blob"], state="dead",
                     attempts=9, last_error="C-STORE status 0xA700")
        s.add(d)
        s.flush()
        return d.id


# every state-changing page route but /login (whose token is bound to a cookie: tested above)
PAGE_POSTS = ["/logout", "/deliveries/{delivery_id}/retry", "/deliveries/{delivery_id}/cancel",
              "/notifications/{notification_id}/retry", "/notifications/{notification_id}/cancel"]


def test_page_posts_are_all_listed(tmp_path: Path, sqlite_db: Database) -> None:
    """PAGE_POSTS is complete: a new POST route on the pages must join the CSRF test below."""
    from fastapi.routing import APIRoute

    from storage.blobs import BlobStore
    from triage.dispatch import Sender
    from triage.notify import Notifier
    from triage.web.pages import pages_router

    s = load_settings(node={"data_dir": str(tmp_path / "d")}, storage={"database_url": sqlite_db.url})
    blobs = BlobStore(s.blob_root)
    router = pages_router(s, sqlite_db, blobs, Sender(sqlite_db, blobs, s.dispatch), Notifier(sqlite_db, s))
    posts = {r.path for r in router.routes if isinstance(r, APIRoute) and "POST" in (r.methods or ())}
    assert posts == {"/login", *PAGE_POSTS}


@pytest.mark.parametrize("route", PAGE_POSTS)
def test_every_page_post_needs_the_csrf_token(client: TestClient, sqlite_db: Database, tmp_path: Path,
                                              route: str) -> None:
    """Logged in as an admin (the session cookie goes along): without the session's CSRF token,
    or with a wrong one, each POST is refused and changes nothing; with it, it acts."""
    from storage.models import Delivery, Notification, Result, WebSession

    did = _dead_letter(sqlite_db, tmp_path)
    with sqlite_db.session() as s:
        rid = s.scalar(select(Result.id))
        n = Notification(result_id=rid, channel="hl7", target="ris", message_id="m1", state="dead",
                         attempts=4)
        s.add(n)
        s.flush()
        nid = n.id
    path = route.format(delivery_id=did, notification_id=nid)

    def snapshot() -> tuple[object, ...]:
        with sqlite_db.sessions() as s:
            d, n = s.get(Delivery, did), s.get(Notification, nid)
            assert d is not None and n is not None
            return (d.state, d.next_attempt_at, n.state, n.next_attempt_at,
                    len(list(s.scalars(select(WebSession)))), len(list(s.scalars(select(AuditEvent)))))

    _login(client)
    csrf = _csrf(client.get("/deliveries").text)
    before = snapshot()
    for data in ({}, {"csrf": ""}, {"csrf": "forged"}, {"csrf": csrf[:-1]}, {"back": "/deliveries"}):
        r = client.post(path, data=data)
        assert r.status_code == 403 and "CSRF" in r.text, (data, r.status_code)
        assert snapshot() == before, data
    r = client.post(path, data={"csrf": csrf})  # the same request with the token goes through
    assert r.status_code == 303 and snapshot() != before


def test_retry_a_dead_letter_from_the_page(client: TestClient, sqlite_db: Database, tmp_path: Path) -> None:
    from storage.models import Delivery

    did = _dead_letter(sqlite_db, tmp_path)
    _login(client)
    page = client.get("/deliveries")
    assert page.status_code == 200 and "0xA700" in page.text and f'data-delivery="{did}"' in page.text
    assert client.post(f"/deliveries/{did}/retry", data={}).status_code == 403  # no CSRF token
    r = client.post(f"/deliveries/{did}/retry", data={"csrf": _csrf(page.text)})
    assert r.status_code == 303
    with sqlite_db.sessions() as s:
        assert s.get(Delivery, did).state == "pending"  # type: ignore[union-attr]


def test_a_viewer_cannot_retry_or_cancel_from_the_page(client: TestClient, sqlite_db: Database,
                                                       tmp_path: Path) -> None:
    from storage.models import Delivery

    did = _dead_letter(sqlite_db, tmp_path)
    with sqlite_db.session() as s:
        create_user(s, "vic", PASSWORD, "viewer")

    def row() -> tuple[object, ...]:
        with sqlite_db.sessions() as s:
            d = s.get(Delivery, did)
            assert d is not None
            return d.state, d.attempts, d.last_error, d.next_attempt_at, d.created_at

    before = row()
    assert _login(client, username="vic").status_code == 303  # type: ignore[attr-defined]
    page = client.get("/deliveries")  # a viewer may look at the outbox ...
    assert page.status_code == 200 and f'data-delivery="{did}"' in page.text
    csrf = _csrf(page.text)
    for action in ("retry", "cancel"):  # ... but not act on it, even with the session's CSRF token
        r = client.post(f"/deliveries/{did}/{action}", data={"csrf": csrf, "back": "/deliveries"})
        assert r.status_code == 403, (action, r.status_code, r.text)
        assert row() == before, action
    with sqlite_db.sessions() as s:
        actions = [e.action for e in s.scalars(select(AuditEvent))]
    assert not [a for a in actions if a.startswith("delivery ")], actions
    # an admin may cancel the same row (so the refusals above were about the role)
    client.cookies.clear()
    _login(client)
    r = client.post(f"/deliveries/{did}/cancel", data={"csrf": _csrf(client.get("/deliveries").text)})
    assert r.status_code == 303 and row()[0] == "cancelled"


def test_study_timeline_from_receipt_to_delivery(tmp_path: Path, sqlite_db: Database,
                                                 tiny_bundle: Bundle) -> None:
    """A radiograph goes the node's whole way, each step done by the code the node runs (ingest,
    the quiet period, the executor with report building, the delivery outbox to a PACS
    stand-in); the study page and /api/studies/{uid} tell the story in order, routing reason
    included."""
    import datetime as dt

    import dicomgen

    from storage.blobs import BlobStore
    from triage.assemble import finish_quiet
    from triage.dispatch import Sender
    from triage.ingest import Ingest
    from triage.standin import StoreSCP
    from worker.tasks import NodeContext, run_job

    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        pacs_dest = {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}
        s = load_settings(node={"data_dir": str(tmp_path / "d")}, storage={"database_url": sqlite_db.url},
                          models={"cxr": str(tiny_bundle.path)}, dispatch={"destinations": [pacs_dest]})
        ctx = NodeContext(s)
        ctx.__dict__["db"] = sqlite_db
        blobs = BlobStore(s.blob_root)
        out = Ingest(sqlite_db, blobs).store(dicomgen.cr_image("tl", rows=64, cols=64), association_id="a1",
                                             transfer_syntax="1.2.840.10008.1.2.1")
        assert out.status == 0
        assert finish_quiet(sqlite_db, s, now=utcnow() + dt.timedelta(minutes=5))
        with sqlite_db.sessions() as ss:
            job = ss.scalar(select(Job.id))
        assert job is not None and run_job(ctx, job, "local@test") == "done"
        assert Sender(sqlite_db, blobs, s.dispatch).run_once()["sent"] == 2  # the SR and a SEG
    finally:
        pacs.stop()
    study = dicomgen.uid("tl", "study")
    with sqlite_db.session() as ss:
        create_user(ss, "vic", PASSWORD, "viewer")
        token = create_token(ss, ss.scalars(select(User).where(User.username == "vic")).one(), "t")
    c = TestClient(create_app(s, sqlite_db), follow_redirects=False)
    want = ["received", "series complete", "routed", "analysed", "reports built", "delivered", "delivered"]
    timeline = c.get(f"/api/studies/{study}", headers={"Authorization": f"Bearer {token}"}).json()[
        "series"][0]["timeline"]
    assert [e["action"] for e in timeline] == want
    at = [dt.datetime.fromisoformat(e["at"]) for e in timeline]
    assert at == sorted(at)
    notes = [e["note"] for e in timeline]
    assert notes[0].startswith("1 instance(s), the last at ") and notes[1].startswith("quiet for 5 s")
    assert notes[2] == "cxr: rule 'chest radiograph, frontal'"
    assert re.fullmatch(r"cxr, score \S+, (urgent|abnormal|borderline|routine)", notes[3]), notes[3]
    assert notes[4:] == ["SR, SEG", "SR to pacs, attempt 1", "SEG to pacs, attempt 1"]
    # the page: the same rows, in the same order, with the routing reason
    _login(c, username="vic")
    page = c.get(f"/studies/{study}")
    assert page.status_code == 200
    rows = re.findall(r'<tr data-action="([^"]+)"><td>[^<]+</td><th>[^<]+</th><td>([^<]*)</td>', page.text)
    assert [a for a, _ in rows] == want
    assert [n.replace("&#39;", "'") for _, n in rows] == notes
    assert 'data-domain="outside"' not in page.text
    # a result unlike the bundle's validation scans says so on the page
    from storage.models import Result

    why = "noise_hu 80 outside the validation volumes' 11.8-29.1"
    with sqlite_db.session() as ss:
        res = ss.scalars(select(Result)).one()
        res.details = {**res.details, "domain": {"noise_hu": 80.0, "outside": [why]}}
    page = c.get(f"/studies/{study}")
    assert re.search(r'data-domain="outside">[^<]*' + re.escape(why.replace("'", "&#39;")), page.text)
