"""Server-rendered pages (Jinja2; no CDN, no front-end build): login, the dashboard, the
worklist and study pages, deliveries, models and the audit log.

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
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import delete, select

from storage.blobs import BlobStore
from storage.db import Database
from storage.models import (
    AuditEvent,
    Delivery,
    Notification,
    Result,
    Series,
    Study,
    User,
    WebSession,
    utcnow,
)
from triage.audit import audit_events, object_name, series_timeline
from triage.bundles import configured_bundles, find_bundle
from triage.config import Settings
from triage.dispatch import Sender
from triage.notify import Notifier
from triage.rank import PRIORITY_NAMES, STATES, worklist
from triage.status import node_status
from triage.web.charts import calibration_png, overlay_png, reference_png
from triage.web.security import verify_password

__all__ = ["SESSION_COOKIE", "LoginRequired", "login_redirect", "pages_router"]

SESSION_COOKIE = "triage_session"
LOGIN_COOKIE = "triage_login"
SESSION_HOURS = 12
MAX_FAILURES = 5
LOCK_MINUTES = 15
DASHBOARD_REFRESH_SECONDS = 5
AUDIT_PAGE = 100
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


def pages_router(settings: Settings, db: Database, blobs: BlobStore, sender: Sender,
                 notifier: Notifier) -> APIRouter:
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

    def require_admin(user: User) -> None:
        if user.role != "admin":
            raise HTTPException(403, "this needs the admin role")

    @r.get("/")
    def root() -> RedirectResponse:
        return RedirectResponse("/worklist", status_code=303)

    @r.get("/dashboard")
    def dashboard(request: Request) -> HTMLResponse:
        user, ws = current(request)
        with db.sessions() as s:
            st = node_status(s, settings, blobs)
        return page(request, "dashboard.html", st=st, user=user, csrf=ws.csrf_token,
                    refresh=DASHBOARD_REFRESH_SECONDS)

    @r.get("/dashboard.json")
    def dashboard_json(request: Request) -> JSONResponse:
        """The dashboard's figures for its own polling (the session cookie, not a token)."""
        current(request)
        with db.sessions() as s:
            return JSONResponse(node_status(s, settings, blobs), headers={"Cache-Control": "no-store"})

    @r.get("/models")
    def models_page(request: Request) -> HTMLResponse:
        user, ws = current(request)
        return page(request, "models.html", bundles=configured_bundles(settings), user=user,
                    csrf=ws.csrf_token)

    @r.get("/models/{role}/calibration.png")
    def calibration_plot(request: Request, role: str) -> Response:
        current(request)
        b = next((b for b in configured_bundles(settings) if b.role == role and b.ok), None)
        if b is None or not b.calibration.get("reference"):
            raise HTTPException(404, "no usable bundle with a calibration for this role")
        png = calibration_png(b.calibration, f"{b.name} {b.version}: score distributions")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    @r.get("/audit")
    def audit_page(request: Request, actor: str | None = None, action: str | None = None,
                   before: int | None = None) -> HTMLResponse:
        user, ws = current(request)
        require_admin(user)
        with db.sessions() as s:
            rows = audit_events(s, actor=actor, action=action, before=before, limit=AUDIT_PAGE)
            actions = list(s.scalars(select(AuditEvent.action).distinct().order_by(AuditEvent.action)))
        nxt = rows[-1].id if len(rows) == AUDIT_PAGE else None
        return page(request, "audit.html", rows=rows, actions=actions, actor=actor or "", action=action or "",
                    next_before=nxt, user=user, csrf=ws.csrf_token)

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
    def worklist_page(request: Request, kind: str = "", priority: str = "", state: str = "", q: str = "",
                      since: str = "") -> HTMLResponse:
        user, ws = current(request)
        try:
            min_p = int(priority) if priority else None
            start = dt.datetime.fromisoformat(since).replace(tzinfo=dt.UTC) if since else None
            if state and state not in STATES:
                raise ValueError(state)
        except ValueError as exc:
            raise HTTPException(422, "bad worklist filter (priority 1-4, a known state, since "
                                     "as YYYY-MM-DD)") from exc
        with db.sessions() as s:
            rows = worklist(s, limit=500, kind=kind or None, min_priority=min_p, state=state or None,
                            text=q or None, since=start)
        filters = {"kind": kind, "priority": priority, "state": state, "q": q, "since": since}
        return page(request, "worklist.html", rows=rows, user=user, csrf=ws.csrf_token, f=filters,
                    kinds=("cxr", "bct", "chestct"), states=STATES, priority_names=PRIORITY_NAMES)

    @r.get("/studies/{study_uid}")
    def study_page(request: Request, study_uid: str) -> HTMLResponse:
        user, ws = current(request)
        with db.sessions() as s:
            st = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            if st is None:
                raise HTTPException(404, "no such study")
            series = []
            for se in s.scalars(select(Series).where(Series.study_id == st.id).order_by(Series.id)):
                results = list(s.scalars(select(Result).where(Result.series_id == se.id)
                                         .order_by(Result.version.desc())))
                deliveries = {}
                for res in results:
                    what = {o["sop_instance"]: o["what"] for o in res.outputs or []}
                    deliveries[res.id] = [
                        {"id": d.id, "destination": d.destination, "state": d.state, "attempts": d.attempts,
                         "last_error": d.last_error, "what": object_name(what.get(d.sop_instance_uid, ""))}
                        for d in s.scalars(select(Delivery).where(Delivery.result_id == res.id)
                                           .order_by(Delivery.id))]
                    for n in s.scalars(select(Notification).where(Notification.result_id == res.id)
                                       .order_by(Notification.id)):
                        deliveries[res.id].append(
                            {"id": None, "destination": n.target, "state": n.state, "attempts": n.attempts,
                             "last_error": n.last_error, "what": "webhook" if n.channel == "webhook"
                             else "HL7 ORU^R01"})
                series.append({"row": se, "results": results, "deliveries": deliveries,
                               "events": series_timeline(s, se),
                               "reference": {x.id: find_bundle(settings, x.bundle_name, x.bundle_version)
                                             is not None for x in results}})
        return page(request, "study.html", study=st, series=series, user=user, csrf=ws.csrf_token,
                    priority_names=PRIORITY_NAMES)

    @r.get("/results/{result_id}/overlay.png")
    def overlay(request: Request, result_id: int) -> Response:
        current(request)
        try:
            png = overlay_png(db, blobs, result_id)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from exc
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @r.get("/results/{result_id}/reference.png")
    def reference_plot(request: Request, result_id: int) -> Response:
        current(request)
        with db.sessions() as s:
            res = s.get(Result, result_id)
            if res is None:
                raise HTTPException(404, "no such result")
            b = find_bundle(settings, res.bundle_name, res.bundle_version)
            if b is None or not b.calibration.get("reference"):
                raise HTTPException(404, "the bundle that scored this result is no longer configured")
            png = reference_png(b.calibration["reference"], res.score, b.calibration.get("threshold"),
                                res.percentile)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @r.get("/deliveries")
    def deliveries_page(request: Request) -> HTMLResponse:
        user, ws = current(request)
        with db.sessions() as s:
            rows = list(s.scalars(select(Delivery).where(Delivery.state.in_(("pending", "sending", "dead")))
                                  .order_by(Delivery.id.desc()).limit(500)))
            notes = list(s.scalars(select(Notification)
                                   .where(Notification.state.in_(("pending", "sending", "dead")))
                                   .order_by(Notification.id.desc()).limit(500)))
        return page(request, "deliveries.html", rows=rows, notifications=notes, user=user, csrf=ws.csrf_token)

    def _admin_action(request: Request, row_id: int, csrf: str, back: str, action: str,
                      outbox: Sender | Notifier = sender) -> Response:
        user, ws = current(request)
        check_csrf(ws, csrf)
        require_admin(user)
        if not getattr(outbox, action)(row_id, actor=user.username):
            what = "delivery" if outbox is sender else "notification"
            done = {"retry": "retried", "cancel": "cancelled"}[action]
            raise HTTPException(409, f"this {what} cannot be {done} now")
        return RedirectResponse(_safe_next(back) if back else "/deliveries", status_code=303)

    @r.post("/notifications/{notification_id}/retry")
    def retry_notification(request: Request, notification_id: int, csrf: Annotated[str, Form()] = "",
                           back: Annotated[str, Form()] = "") -> Response:
        return _admin_action(request, notification_id, csrf, back, "retry", notifier)

    @r.post("/notifications/{notification_id}/cancel")
    def cancel_notification(request: Request, notification_id: int, csrf: Annotated[str, Form()] = "",
                            back: Annotated[str, Form()] = "") -> Response:
        return _admin_action(request, notification_id, csrf, back, "cancel", notifier)

    @r.post("/deliveries/{delivery_id}/retry")
    def retry(request: Request, delivery_id: int, csrf: Annotated[str, Form()] = "",
              back: Annotated[str, Form()] = "") -> Response:
        return _admin_action(request, delivery_id, csrf, back, "retry")

    @r.post("/deliveries/{delivery_id}/cancel")
    def cancel(request: Request, delivery_id: int, csrf: Annotated[str, Form()] = "",
               back: Annotated[str, Form()] = "") -> Response:
        return _admin_action(request, delivery_id, csrf, back, "cancel")

    return r


def login_redirect(request: Request, exc: Exception) -> RedirectResponse:
    """The exception handler for :class:`LoginRequired`."""
    return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
