"""Server-rendered pages (Jinja2; no CDN, no front-end build): login and the worklist so far.

Sessions live in the database (:class:`storage.models.WebSession`): the cookie carries 256
random bits, the table their SHA-256, so logging out or disabling a user ends the session
everywhere. Cookies are HttpOnly and SameSite=Strict, and Secure when the request came over
HTTPS (directly or through a proxy that says so in ``X-Forwarded-Proto``). Every POST from a
page carries the session's CSRF token in a form field; the login form carries a token bound
to a short-lived cookie (double submit). After ``MAX_FAILURES`` wrong passwords an account
is locked for ``LOCK_MINUTES``; logins, failures and lock-outs are audited.
"""

# No "from __future__ import annotations": FastAPI reads the parameter annotations live.

import datetime as dt
import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import delete, select

from storage.db import Database
from storage.models import AuditEvent, User, WebSession, utcnow
from triage.rank import worklist
from triage.web.security import verify_password

__all__ = ["SESSION_COOKIE", "LoginRequired", "login_redirect", "pages_router"]

SESSION_COOKIE = "triage_session"
LOGIN_COOKIE = "triage_login"
SESSION_HOURS = 12
MAX_FAILURES = 5
LOCK_MINUTES = 15
templates = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"


def _safe_next(target: str) -> str:
    """Only local paths: never redirect to another site after login."""
    return target if target.startswith("/") and not target.startswith("//") else "/worklist"


class LoginRequired(Exception):  # noqa: N818 (a redirect, not an error)
    """Not logged in: the page redirects to the login form."""


def pages_router(db: Database) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    def current(request: Request) -> tuple[User, WebSession]:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            raise LoginRequired()
        with db.session() as s:
            ws = s.scalar(select(WebSession).where(WebSession.token_sha256 == _sha(token)))
            if ws is None or ws.expires_at < utcnow() or ws.user.disabled:
                raise LoginRequired()
            user = ws.user
            s.expunge(user)
            s.expunge(ws)
        return user, ws

    def page(request: Request, name: str, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, ctx)

    def check_csrf(ws: WebSession, token: str) -> None:
        if not token or not hmac.compare_digest(token, ws.csrf_token):
            raise HTTPException(403, "missing or wrong CSRF token")

    @r.get("/")
    def root() -> RedirectResponse:
        return RedirectResponse("/worklist", status_code=303)

    @r.get("/login")
    def login_form(request: Request, next: str = "/worklist") -> HTMLResponse:
        token = secrets.token_urlsafe(24)
        resp = page(request, "login.html", login_csrf=token, next=_safe_next(next), error=None, user=None)
        resp.set_cookie(LOGIN_COOKIE, token, max_age=900, httponly=True, samesite="strict",
                        secure=_secure(request))
        return resp

    @r.post("/login")
    def login(request: Request, username: Annotated[str, Form()], password: Annotated[str, Form()],
              csrf: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/worklist") -> Response:
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        if not csrf or not cookie or not hmac.compare_digest(csrf, cookie):
            raise HTTPException(403, "missing or wrong CSRF token")
        now = utcnow()

        def refuse(msg: str) -> HTMLResponse:
            resp = page(request, "login.html", login_csrf=cookie, next=_safe_next(next), error=msg, user=None)
            resp.status_code = 401
            return resp

        with db.session() as s:
            user = s.scalar(select(User).where(User.username == username).with_for_update())
            if user is None or user.disabled:
                verify_password(password, "scrypt$32768$8$1$AAAA$AAAA")  # same time as a real check
                s.add(AuditEvent(actor="web", action="login failed", detail={"reason": "unknown user"}))
                return refuse("Wrong user name or password.")
            if user.locked_until is not None and user.locked_until > now:
                s.add(AuditEvent(actor=user.username, action="login refused", detail={"reason": "locked"}))
                return refuse(f"Too many failed logins: try again after {user.locked_until:%H:%M} UTC.")
            if not verify_password(password, user.password_hash):
                user.failed_logins += 1
                detail: dict[str, Any] = {"failures": user.failed_logins}
                if user.failed_logins >= MAX_FAILURES:
                    user.locked_until = now + dt.timedelta(minutes=LOCK_MINUTES)
                    user.failed_logins = 0
                    detail["locked_minutes"] = LOCK_MINUTES
                s.add(AuditEvent(actor=user.username, action="login failed", detail=detail))
                return refuse("Wrong user name or password.")
            user.failed_logins, user.locked_until = 0, None
            token = secrets.token_urlsafe(32)
            s.execute(delete(WebSession).where(WebSession.expires_at < now))
            s.add(WebSession(token_sha256=_sha(token), user_id=user.id, csrf_token=secrets.token_urlsafe(32),
                             expires_at=now + dt.timedelta(hours=SESSION_HOURS)))
            s.add(AuditEvent(actor=user.username, action="login", detail={"role": user.role}))
        resp = RedirectResponse(_safe_next(next), status_code=303)
        resp.set_cookie(SESSION_COOKIE, token, max_age=SESSION_HOURS * 3600, httponly=True, samesite="strict",
                        secure=_secure(request))
        resp.delete_cookie(LOGIN_COOKIE)
        return resp

    @r.post("/logout")
    def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
        user, ws = current(request)
        check_csrf(ws, csrf)
        with db.session() as s:
            s.execute(delete(WebSession).where(WebSession.id == ws.id))
            s.add(AuditEvent(actor=user.username, action="logout", detail={}))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    @r.get("/worklist")
    def worklist_page(request: Request, kind: str | None = None) -> HTMLResponse:
        user, ws = current(request)
        with db.sessions() as s:
            rows = worklist(s, limit=500, kind=kind)
        return page(request, "worklist.html", rows=rows, user=user, csrf=ws.csrf_token)

    return r


def login_redirect(request: Request, exc: Exception) -> RedirectResponse:
    """The exception handler for :class:`LoginRequired`."""
    return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
