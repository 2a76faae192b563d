"""The HTML pages: login with lock-out, sessions, CSRF, the worklist (browser tests follow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_rank import _study

from storage.db import Database
from storage.models import AuditEvent, User
from triage.config import load_settings
from triage.web.api import create_app
from triage.web.pages import LOCK_MINUTES, MAX_FAILURES, SESSION_COOKIE
from triage.web.security import create_user

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
