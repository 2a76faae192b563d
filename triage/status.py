"""The dashboard's figures: what arrived, what waits, what failed, who works, what is loaded.

Read from the database (every process writes there), so one web process sees the SCP,
the executors and the Celery workers on other machines alike. Each figure is one indexed
query; the dashboard polls this every few seconds.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import numpy as np
from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from storage.blobs import BlobStore
from storage.models import Delivery, Instance, Job, Notification, Series, WorkerBeat, utcnow
from triage.bundles import configured_bundles
from triage.config import Settings

__all__ = ["node_status"]

RATE_MINUTES = 15
LATENCY_WINDOW = dt.timedelta(hours=24)
LATENCY_JOBS = 1000


def _by(session: Session, col: Any, *group: Any) -> dict[str, int]:
    rows = session.execute(select(col, func.count()).group_by(col, *group))
    return {str(k): int(n) for k, n in rows}


def instance_rate(session: Session, now: dt.datetime, minutes: int = RATE_MINUTES) -> list[int]:
    """Instances received in each of the last ``minutes`` whole minutes, oldest first (one scan)."""
    end = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    edges = [end - dt.timedelta(minutes=minutes - i) for i in range(minutes + 1)]
    cols = [func.sum(case((and_(Instance.received_at >= a, Instance.received_at < b), 1), else_=0))
            for a, b in itertools.pairwise(edges)]
    row = session.execute(select(*cols).where(Instance.received_at >= edges[0])).one()
    return [int(v or 0) for v in row]


def analysis_latency(session: Session, now: dt.datetime) -> dict[str, Any]:
    """p50/p95 seconds from job queued (series complete) to result, per kind, last 24 h."""
    rows = session.execute(select(Job.kind, Job.created_at, Job.finished_at)
                           .where(Job.state == "done", Job.finished_at >= now - LATENCY_WINDOW)
                           .order_by(Job.id.desc()).limit(LATENCY_JOBS)).all()
    by_kind: dict[str, list[float]] = {}
    for kind, a, b in rows:
        if b is not None:
            by_kind.setdefault(kind, []).append((b - a).total_seconds())
    out = {}
    for kind, vals in sorted(by_kind.items()):
        p50, p95 = np.percentile(vals, [50, 95])
        out[kind] = {"n": len(vals), "p50": round(float(p50), 2), "p95": round(float(p95), 2)}
    return out


def node_status(session: Session, settings: Settings, blobs: BlobStore,
                now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    rate = instance_rate(session, now)
    series = _by(session, Series.state)
    deliveries = _by(session, Delivery.state)
    notifications = _by(session, Notification.state)
    silent_after = 3 * settings.executor.heartbeat_seconds
    workers = []
    for w in session.scalars(select(WorkerBeat).order_by(WorkerBeat.kind, WorkerBeat.name)):
        age = (now - w.last_seen).total_seconds()
        workers.append({"name": w.name, "kind": w.kind, "host": w.host, "pid": w.pid,
                        "started_at": w.started_at.isoformat(), "last_seen_seconds": round(age, 1),
                        "alive": age <= silent_after, "jobs_done": w.jobs_done, "bundles": w.bundles})
    u = blobs.usage()
    return {
        "at": now.isoformat(),
        "instances_per_minute": rate,
        "instances_last_minute": rate[-1],
        "series": series,
        "assembling": series.get("receiving", 0),
        "jobs": _by(session, Job.state),
        "latency": analysis_latency(session, now),
        "deliveries": deliveries,
        "delivery_backlog": deliveries.get("pending", 0) + deliveries.get("sending", 0),
        "dead_letters": deliveries.get("dead", 0),
        "notifications": notifications,
        "disk": {"used_fraction": round(u.used_fraction, 4), "high_water": settings.storage.high_water,
                 "free_bytes": u.free, "total_bytes": u.total,
                 "above_high_water": u.used_fraction > settings.storage.high_water},
        "workers": workers,
        "bundles": [b.summary() for b in configured_bundles(settings)],
    }
