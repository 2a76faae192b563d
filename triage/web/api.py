"""The JSON API (FastAPI; OpenAPI at ``/api/openapi.json``, no docs page) and ``/metrics``.

Machine clients authenticate with ``Authorization: Bearer <token>`` (``triage user
token``); roles: ``viewer`` reads, ``admin`` also acts (retry or cancel a delivery).
Patient identifiers appear in responses to authenticated clients only and never in logs.
``/api/health`` (liveness) and ``/api/health/ready`` (database, broker when Celery is
configured, disk below the high-water mark, the SCP answering C-ECHO) and ``/metrics`` need
no token: probes and Prometheus scrape them, and they carry no patient data.
"""

# No "from __future__ import annotations": FastAPI resolves the dependency aliases defined
# inside create_app from the live annotations.

import datetime as dt
import socket
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Delivery, Job, Notification, Result, Series, Study, User
from triage.audit import audit_events, series_timeline
from triage.bundles import configured_bundles
from triage.config import Settings
from triage.dispatch import REJECTED, Sender, c_echo
from triage.notify import Notifier
from triage.rank import PRIORITY_NAMES, STATES, worklist
from triage.status import node_status
from triage.web.metrics import registry
from triage.web.pages import LoginRequired, login_redirect, pages_router
from triage.web.security import token_user

__all__ = ["create_app"]

_bearer = HTTPBearer(auto_error=False)


class WorklistItem(BaseModel):
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    study_description: str | None
    arrived: dt.datetime
    priority: int | None
    priority_name: str
    percentile: float | None
    score: float | None
    kinds: list[str]
    state: str
    series: int


class JobItem(BaseModel):
    id: int
    series_id: int
    series_version: int
    kind: str
    state: str
    attempts: int
    reason: str | None
    worker: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None


class DeliveryItem(BaseModel):
    id: int
    result_id: int
    destination: str
    sop_class_uid: str
    sop_instance_uid: str
    state: str
    attempts: int
    last_error: str | None
    created_at: dt.datetime
    next_attempt_at: dt.datetime
    delivered_at: dt.datetime | None


class NotificationItem(BaseModel):
    id: int
    result_id: int
    channel: str
    target: str
    message_id: str
    state: str
    attempts: int
    last_error: str | None
    created_at: dt.datetime
    next_attempt_at: dt.datetime
    sent_at: dt.datetime | None


def create_app(settings: Settings, db: Database | None = None) -> FastAPI:
    db = db or Database(settings.database_url)
    blobs = BlobStore(settings.blob_root, fsync=settings.storage.fsync)
    # no Swagger UI or ReDoc page: FastAPI loads them from a CDN, and the node works offline
    app = FastAPI(title="triage node", version="1", openapi_url="/api/openapi.json", docs_url=None,
                  redoc_url=None)
    app.state.db, app.state.settings = db, settings
    metrics = registry(db, blobs, settings.executor.heartbeat_seconds)

    def session() -> Iterator[Session]:
        with db.sessions() as s:
            yield s

    def user(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> User:
        if cred is None or cred.scheme.lower() != "bearer":
            raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        with db.session() as s:
            u = token_user(s, cred.credentials)
            if u is None:
                raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
            s.expunge(u)
        return u

    def admin(u: Annotated[User, Depends(user)]) -> User:
        if u.role != "admin":
            raise HTTPException(403, "this needs the admin role")
        return u

    Viewer = Annotated[User, Depends(user)]
    Admin = Annotated[User, Depends(admin)]
    DB = Annotated[Session, Depends(session)]
    api = APIRouter(prefix="/api")

    @api.get("/health")
    def health() -> dict[str, str]:
        """Liveness: the web process answers."""
        return {"status": "ok"}

    @api.get("/health/ready")
    def ready(response: Response) -> dict[str, Any]:
        """Readiness: every part the node needs, with the reason for each that fails."""
        checks = readiness(settings, db, blobs)
        ok = all(v == "ok" for v in checks.values())
        response.status_code = 200 if ok else 503
        return {"status": "ok" if ok else "failing", "checks": checks}

    @api.get("/status")
    def get_status(_: Viewer, s: DB) -> dict[str, Any]:
        """The dashboard's figures: arrivals per minute, assembling series, jobs by state,
        latency p50/p95, delivery backlog, disk, worker heartbeats and bundles."""
        return node_status(s, settings, blobs)

    @api.get("/models")
    def get_models(_: Viewer) -> list[dict[str, Any]]:
        """The configured bundles, each verified against its manifest's hashes."""
        return [b.summary() for b in configured_bundles(settings)]

    @api.get("/audit")
    def get_audit(_: Admin, s: DB, actor: str | None = None, action: str | None = None,
                  before: int | None = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        """Audit events, newest first; page with ``before`` = the last id seen."""
        return [{"id": e.id, "at": e.at, "actor": e.actor, "action": e.action, "series_id": e.series_id,
                 "detail": e.detail}
                for e in audit_events(s, actor=actor, action=action, before=before, limit=limit)]

    @api.get("/worklist", response_model=list[WorklistItem])
    def get_worklist(_: Viewer, s: DB, limit: Annotated[int, Query(ge=1, le=1000)] = 200,
                     kind: str | None = None,
                     min_priority: Annotated[int | None, Query(ge=1, le=4)] = None,
                     state: Annotated[str | None, Query(pattern="^(" + "|".join(STATES) + ")$")] = None,
                     q: Annotated[str | None, Query(description="accession number or patient ID (exact), "
                                                                "or the start of the patient name")] = None,
                     since: dt.datetime | None = None) -> list[WorklistItem]:
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=dt.UTC)
        return [WorklistItem(**{k: getattr(r, k) for k in WorklistItem.model_fields if k != "priority_name"},
                             priority_name=r.priority_name)
                for r in worklist(s, limit=limit, kind=kind, min_priority=min_priority, state=state,
                                  text=q, since=since)]

    @api.get("/studies/{study_uid}")
    def get_study(study_uid: str, _: Viewer, s: DB) -> dict[str, Any]:
        st = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        if st is None:
            raise HTTPException(404, "no such study")
        out: dict[str, Any] = {"study_instance_uid": st.study_instance_uid, "patient_id": st.patient_id,
                               "patient_name": st.patient_name, "accession_number": st.accession_number,
                               "study_date": st.study_date, "study_description": st.study_description,
                               "arrived": st.first_received_at, "series": []}
        for se in s.scalars(select(Series).where(Series.study_id == st.id).order_by(Series.id)):
            results = list(s.scalars(select(Result).where(Result.series_id == se.id)
                                     .order_by(Result.version)))
            deliveries = {r.id: [DeliveryItem.model_validate(d, from_attributes=True).model_dump()
                                 for d in s.scalars(select(Delivery).where(Delivery.result_id == r.id))]
                          for r in results}
            out["series"].append({
                "series_instance_uid": se.series_instance_uid, "modality": se.modality,
                "description": se.series_description, "state": se.state, "version": se.version,
                "instances": se.instance_count, "kind": se.kind, "route_reason": se.route_reason,
                "completion_reason": se.completion_reason,
                "jobs": [JobItem.model_validate(j, from_attributes=True).model_dump()
                         for j in s.scalars(select(Job).where(Job.series_id == se.id).order_by(Job.id))],
                "results": [{
                    "version": r.version, "kind": r.kind, "bundle": f"{r.bundle_name} {r.bundle_version}",
                    "method": r.method, "score": r.score, "log_posterior": r.log_posterior,
                    "log_p_normal": r.log_p_normal, "percentile": r.percentile, "abnormal": r.abnormal,
                    "priority": r.priority, "priority_name": PRIORITY_NAMES.get(r.priority),
                    "abnormal_cm3": r.abnormal_cm3, "lesions": r.lesions, "report_state": r.report_state,
                    "report_error": r.report_error, "outputs": r.outputs or [], "created_at": r.created_at,
                    "deliveries": deliveries[r.id]} for r in results],
                "timeline": series_timeline(s, se),
            })
        return out

    @api.get("/jobs", response_model=list[JobItem])
    def get_jobs(_: Viewer, s: DB, state: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[JobItem]:
        q = select(Job).order_by(Job.id.desc()).limit(limit)
        rows = s.scalars(q if state is None else q.where(Job.state == state))
        return [JobItem.model_validate(j, from_attributes=True) for j in rows]

    @api.get("/deliveries", response_model=list[DeliveryItem])
    def get_deliveries(_: Viewer, s: DB, state: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[DeliveryItem]:
        q = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
        rows = s.scalars(q if state is None else q.where(Delivery.state == state))
        return [DeliveryItem.model_validate(d, from_attributes=True) for d in rows]

    sender = Sender(db, blobs, settings.dispatch)

    @api.post("/deliveries/{delivery_id}/retry")
    def retry(delivery_id: int, who: Admin) -> dict[str, Any]:
        return _outbox_action(sender, "delivery", delivery_id, "retry", who)

    @api.post("/deliveries/{delivery_id}/cancel")
    def cancel(delivery_id: int, who: Admin) -> dict[str, Any]:
        return _outbox_action(sender, "delivery", delivery_id, "cancel", who)

    notifier = Notifier(db, settings)

    @api.get("/notifications", response_model=list[NotificationItem])
    def get_notifications(_: Viewer, s: DB, state: str | None = None,
                          limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[NotificationItem]:
        q = select(Notification).order_by(Notification.id.desc()).limit(limit)
        rows = s.scalars(q if state is None else q.where(Notification.state == state))
        return [NotificationItem.model_validate(n, from_attributes=True) for n in rows]

    @api.post("/notifications/{notification_id}/retry")
    def retry_notification(notification_id: int, who: Admin) -> dict[str, Any]:
        return _outbox_action(notifier, "notification", notification_id, "retry", who)

    @api.post("/notifications/{notification_id}/cancel")
    def cancel_notification(notification_id: int, who: Admin) -> dict[str, Any]:
        return _outbox_action(notifier, "notification", notification_id, "cancel", who)

    app.include_router(api)
    app.include_router(pages_router(settings, db, blobs, sender, notifier))
    app.add_exception_handler(LoginRequired, login_redirect)

    @app.get("/metrics", include_in_schema=False)
    def get_metrics(_: Request) -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return app


def _outbox_action(outbox: Sender | Notifier, what: str, row_id: int, action: str,
                   who: User) -> dict[str, Any]:
    """Retry or cancel a delivery or a notification for an admin; 409 when it cannot be."""
    if not getattr(outbox, action)(row_id, actor=who.username):
        done = {"retry": "retried", "cancel": "cancelled"}[action]
        raise HTTPException(409, f"this {what} cannot be {done} (unknown, sending or sent)")
    return {"id": row_id, "state": "pending" if action == "retry" else "cancelled"}


def readiness(settings: Settings, db: Database, blobs: BlobStore) -> dict[str, str]:
    """Each check's status: "ok" or why not."""
    checks: dict[str, str] = {}
    try:
        with db.sessions() as s:
            s.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable ({type(exc).__name__})"
    if settings.executor.kind == "celery":
        try:
            import redis

            redis.Redis.from_url(settings.celery.broker_url, socket_connect_timeout=2).ping()
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = f"unavailable ({type(exc).__name__})"
    u = blobs.usage()
    hw = settings.storage.high_water
    checks["disk"] = ("ok" if u.used_fraction <= hw
                      else f"{100 * u.used_fraction:.1f}% used, above {100 * hw:.0f}%")
    checks["scp"] = _scp_check(settings)
    return checks


def _scp_check(settings: Settings) -> str:
    """The SCP answers: the port accepts a connection, and then a C-ECHO succeeds or the SCP
    refuses the probe's association (allow-lists, association limit: it is listening and
    deciding). With TLS the probe, which has no client certificate, stops at the connection."""
    r = settings.receive
    host = "127.0.0.1" if r.host in ("0.0.0.0", "::", "") else r.host
    try:
        socket.create_connection((host, r.port), timeout=3).close()
    except OSError as exc:
        return f"nothing listens on port {r.port} ({exc})"
    if r.tls is not None:
        return "ok"
    why = c_echo(host, r.port, r.ae_title, calling_ae="TRIAGE-PROBE", timeout=3)
    if why is None or why == REJECTED:
        return "ok"
    return f"no C-ECHO answer from {r.ae_title} on port {r.port} ({why})"
