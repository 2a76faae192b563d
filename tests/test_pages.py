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
from triage.web.pages import MAX_FAILURES, SESSION_COOKIE
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


def _login(c: TestClient, password: str = PASSWORD, csrf: str | None = None) -> object:
    form = c.get("/login")
    return c.post("/login", data={"username": "ann", "password": password,
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
    with sqlite_db.sessions() as s:
        assert s.scalar(select(User.locked_until).where(User.username == "ann")) is not None
        assert "login refused" in [e.action for e in s.scalars(select(AuditEvent))]


def test_no_open_redirect_after_login(client: TestClient) -> None:
    form = client.get("/login?next=https://evil.example/")
    r = client.post("/login", data={"username": "ann", "password": PASSWORD, "csrf": _csrf(form.text),
                                    "next": "//evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/worklist"


def test_retry_a_dead_letter_from_the_page(client: TestClient, sqlite_db: Database, tmp_path: Path) -> None:
    from test_dispatch import _result

    from storage.blobs import BlobStore
    from storage.models import Delivery

    res, outputs = _result(sqlite_db, BlobStore(tmp_path / "b"), n_objects=1)
    with sqlite_db.session() as s:
        d = Delivery(result_id=res.id, destination="pacs", sop_class_uid=outputs[0]["sop_class"],
                     sop_instance_uid=outputs[0]["sop_instance"], blob=outputs[0]["blob"], state="dead",
                     attempts=9, last_error="C-STORE status 0xA700")
        s.add(d)
        s.flush()
        did = d.id
    _login(client)
    page = client.get("/deliveries")
    assert page.status_code == 200 and "0xA700" in page.text and f'data-delivery="{did}"' in page.text
    assert client.post(f"/deliveries/{did}/retry", data={}).status_code == 403  # no CSRF token
    r = client.post(f"/deliveries/{did}/retry", data={"csrf": _csrf(page.text)})
    assert r.status_code == 303
    with sqlite_db.sessions() as s:
        assert s.get(Delivery, did).state == "pending"  # type: ignore[union-attr]
