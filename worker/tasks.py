"""The task functions both executors run: claim a Job, analyse its series, store the Result.

The database decides who runs a job, not the broker. A claim is a compare-and-set from
``queued`` to ``running`` with a lease; the result is written only while the claim is
still ours, and at most one Result exists per Job (a unique key), so a message delivered
twice, a re-published job or a worker that was presumed dead and comes back cannot
produce a second result. A job whose lease expires (its worker died) is re-queued by
:func:`requeue_expired` until ``max_attempts``.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

import numpy as np
from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from storage.blobs import BlobStore
from storage.db import Database
from storage.models import AuditEvent, Instance, Job, Result, Series, utcnow
from triage.analyze import Analysis, AnalysisError, Models, analyse_series
from triage.config import Settings

__all__ = ["NodeContext", "claim", "claim_next", "count_job", "jobs_done", "requeue_expired",
           "requeue_orphans", "run_job", "worker_name"]

log = logging.getLogger(__name__)


_done = 0
_done_lock = threading.Lock()


def count_job() -> None:
    """One more job finished in this process (done or failed; the heartbeat reports it)."""
    global _done
    with _done_lock:
        _done += 1


def jobs_done() -> int:
    with _done_lock:
        return _done


def worker_name(tag: str = "") -> str:
    return f"{socket.gethostname()}:{os.getpid()}{':' + tag if tag else ''}"


@dataclass
class NodeContext:
    """Per-process handles: database, blob store, models (each created on first use).

    ``report``: what happens to a fresh result; by default its SR/SEG are built here, at once.
    A Celery GPU worker hands that to the ``io`` queue instead, so the GPU is free sooner.
    """

    settings: Settings
    report: Callable[[NodeContext, int], object] | None = None

    @cached_property
    def db(self) -> Database:
        return Database(self.settings.database_url)

    @cached_property
    def blobs(self) -> BlobStore:
        return BlobStore(self.settings.blob_root, fsync=self.settings.storage.fsync)

    @cached_property
    def models(self) -> Models:
        return Models(self.settings.models)


def _rows(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def claim(ctx: NodeContext, job_id: int, worker: str, *, takeover: str | None = None) -> bool:
    """Take ``job_id`` if it is queued.

    ``takeover``: also take it when it is running under a worker name ending in this token
    (the same broker message redelivered after its worker process died).
    """
    now = utcnow()
    mine = (Job.worker == worker) if takeover is None else Job.worker.endswith(":" + takeover)
    lease = now + dt.timedelta(seconds=ctx.settings.executor.lease_seconds)
    with ctx.db.session() as s:
        n = _rows(s.execute(
            update(Job).where(Job.id == job_id,
                              (Job.state == "queued") | ((Job.state == "running") & mine))
            .values(state="running", worker=worker, started_at=now, lease_until=lease,
                    attempts=Job.attempts + 1)
            .execution_options(synchronize_session=False)))
    return n == 1


def claim_next(ctx: NodeContext, worker: str) -> int | None:
    """The oldest queued job, claimed; None when there is none."""
    for _ in range(5):
        with ctx.db.sessions() as s:
            jid = s.scalars(select(Job.id).where(Job.state == "queued")
                            .order_by(Job.created_at, Job.id).limit(1)).first()
        if jid is None:
            return None
        if claim(ctx, jid, worker):
            return jid
    return None


def requeue_expired(ctx: NodeContext, now: dt.datetime | None = None) -> int:
    """Running jobs whose lease expired go back to the queue, or fail after max attempts."""
    now = now or utcnow()
    maxa = ctx.settings.executor.max_attempts
    with ctx.db.session() as s:
        failed = _rows(s.execute(
            update(Job).where(Job.state == "running", Job.lease_until < now, Job.attempts >= maxa)
            .values(state="failed", finished_at=now,
                    reason=f"worker lost during the analysis {maxa} times")
            .execution_options(synchronize_session=False)))
        back = _rows(s.execute(
            update(Job).where(Job.state == "running", Job.lease_until < now, Job.attempts < maxa)
            .values(state="queued", worker=None, published_at=None,
                    reason="re-queued: the worker's lease expired")
            .execution_options(synchronize_session=False)))
    if failed or back:
        log.warning("leases expired: %d job(s) re-queued, %d failed", back, failed)
    return back


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_orphans(ctx: NodeContext) -> int:
    """Re-queue running jobs whose worker process on this host no longer exists.

    After a crash of the embedded node this frees its jobs at start-up instead of after the
    lease; workers on other hosts are left to their leases.
    """
    host = socket.gethostname() + ":"
    with ctx.db.sessions() as s:
        rows = s.execute(select(Job.id, Job.worker).where(Job.state == "running")).all()
    dead = []
    for jid, w in rows:
        parts = (w or "").split(":")
        local = (w or "").startswith(host) and len(parts) >= 2 and parts[1].isdigit()
        if local and not _pid_alive(int(parts[1])):
            dead.append((jid, w))
    n = 0
    for jid, w in dead:
        with ctx.db.session() as s:
            n += _rows(s.execute(
                update(Job).where(Job.id == jid, Job.state == "running", Job.worker == w)
                .values(state="queued", worker=None, published_at=None,
                        reason="re-queued: its worker process had exited")
                .execution_options(synchronize_session=False)))
    if n:
        log.warning("%d job(s) of exited workers re-queued", n)
    return n


def _finish(ctx: NodeContext, job: Job, worker: str, state: str, reason: str | None,
            analysis: Analysis | None, map_key: str | None) -> int | None:
    """Record the outcome while the claim is still ours: the Result id (0 without a result),
    or None when the claim was lost."""
    now = utcnow()
    with ctx.db.session() as s:
        n = _rows(s.execute(
            update(Job).where(Job.id == job.id, Job.state == "running", Job.worker == worker)
            .values(state=state, reason=reason, finished_at=now if state != "queued" else None,
                    lease_until=None, worker=worker if state != "queued" else None,
                    published_at=Job.published_at if state != "queued" else None)
            .execution_options(synchronize_session=False)))
        if n != 1:
            return None
        res = None
        if analysis is not None:
            # lock the series: two workers finishing results of one series number them in turn
            s.get(Series, job.series_id, with_for_update=True)
            version = (s.scalar(select(func.max(Result.version)).where(Result.series_id == job.series_id))
                       or 0) + 1
            b = analysis.bundle
            res = Result(job_id=job.id, series_id=job.series_id, version=version, kind=analysis.kind,
                         bundle_name=b.name, bundle_version=b.version, bundle_fingerprint=b.fingerprint,
                         method=analysis.method, log_posterior=analysis.log_posterior,
                         log_p_normal=analysis.log_p_normal, score=analysis.score,
                         percentile=analysis.percentile, abnormal=analysis.abnormal,
                         priority=analysis.priority, abnormal_cm3=analysis.abnormal_cm3,
                         lesions=analysis.lesions, map_blob=map_key,
                         details={**analysis.details, "series_version": job.series_version,
                                  "worker": worker}, created_at=now)
            s.add(res)
            s.flush()
        s.add(AuditEvent(actor=worker[:64], action="analysed" if state == "done" else "analysis failed",
                         series_id=job.series_id,
                         detail={"job": job.id, "kind": job.kind, "reason": reason,
                                 **({"score": analysis.score, "priority": analysis.priority}
                                    if analysis is not None else {})}))
    return res.id if res is not None else 0


def _finish_durably(ctx: NodeContext, job: Job, worker: str, state: str, reason: str | None,
                    analysis: Analysis | None = None, map_key: str | None = None) -> int | None:
    """:func:`_finish`, waiting out a database outage (up to half the lease) instead of
    leaving the job 'running' until its lease expires and the analysis is redone."""
    deadline = time.monotonic() + ctx.settings.executor.lease_seconds / 2
    delay = 0.5
    while True:
        try:
            return _finish(ctx, job, worker, state, reason, analysis, map_key)
        except OperationalError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("job %d: cannot record its outcome (%s); retrying in %.0f s", job.id,
                        type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


def _save_map(ctx: NodeContext, job: Job, values: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, values.astype(np.float16 if np.isfinite(values).all() else np.float32), allow_pickle=False)
    key = ctx.blobs.key("map", str(job.series_id), str(job.series_version), str(job.id))
    ctx.blobs.put(key, buf.getvalue())
    return key


@contextmanager
def _lease_kept(ctx: NodeContext, job_id: int, worker: str) -> Iterator[None]:
    """Renew the job's lease every third of its length while the analysis runs, so a long
    analysis is not taken for a dead worker (a dead worker stops renewing)."""
    stop = threading.Event()
    period = ctx.settings.executor.lease_seconds / 3

    def renew() -> None:
        while not stop.wait(period):
            try:
                until = utcnow() + dt.timedelta(seconds=ctx.settings.executor.lease_seconds)
                with ctx.db.session() as s:
                    s.execute(update(Job)
                              .where(Job.id == job_id, Job.state == "running", Job.worker == worker)
                              .values(lease_until=until).execution_options(synchronize_session=False))
            except Exception:  # the next renewal tries again; the lease still has two thirds left
                log.warning("job %d: lease renewal failed", job_id, exc_info=True)

    t = threading.Thread(target=renew, name=f"lease-{job_id}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)


def run_job(ctx: NodeContext, job_id: int, worker: str, *, claimed: bool = False,
            takeover: str | None = None) -> str:
    """Run one job to its end state; returns ``done``, ``failed``, ``queued`` or ``skipped``.

    Never raises for a bad series or model: the job records why it failed and the other
    jobs go on. Unexpected errors re-queue the job (until ``max_attempts``).
    """
    if not claimed and not claim(ctx, job_id, worker, takeover=takeover):
        return "skipped"
    with ctx.db.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        keys = list(s.scalars(
            select(Instance.blob).where(Instance.series_id == job.series_id, Instance.current.is_(True),
                                        Instance.is_image.is_(True))))
        files = [ctx.blobs.path(k) for k in keys]
    try:
        if not files:
            raise AnalysisError("the series holds no images")
        with _lease_kept(ctx, job_id, worker):
            analysis = analyse_series(files, job.kind, ctx.models, ctx.settings.rank)
        analysis.details["instance_blobs"] = keys  # the report is built from exactly these
        key = _save_map(ctx, job, analysis.map) if analysis.map is not None else None
    except AnalysisError as exc:
        log.warning("job %d (%s) failed: %s", job_id, job.kind, exc)
        _finish_durably(ctx, job, worker, "failed", str(exc))
        count_job()
        return "failed"
    except Exception as exc:  # a bug or a resource problem: retry, with the reason kept
        log.exception("job %d (%s) crashed", job_id, job.kind)
        reason = f"{type(exc).__name__}: {exc}"
        final = job.attempts >= ctx.settings.executor.max_attempts
        _finish_durably(ctx, job, worker, "failed" if final else "queued", reason)
        return "failed" if final else "queued"
    try:
        rid = _finish_durably(ctx, job, worker, "done", None, analysis, key)
    except IntegrityError:  # a result for this job exists already (a duplicate run finished first)
        rid = None
    if not rid:
        log.warning("job %d: lost the claim before finishing; result discarded", job_id)
        return "skipped"
    log.info("job %d (%s) done: score %.3f, priority %d", job_id, job.kind, analysis.score,
             analysis.priority)
    if ctx.report is not None:
        ctx.report(ctx, rid)
    else:
        from worker.report import report_result  # (imports highdicom; after the analysis)

        report_result(ctx, rid)
    count_job()
    return "done"
