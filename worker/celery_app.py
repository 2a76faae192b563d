"""The scale-out executor: Celery workers on a Redis broker, fed from the database.

The Job row is the truth; a Celery message only says "look at job N". The dispatcher
(:class:`Dispatcher`, in the node's serve process) publishes queued jobs and publishes
again any job still queued ``republish_seconds`` later, so a Redis restart or a lost
message delays a job but never loses it. Workers acknowledge late
(``task_acks_late``), a message whose worker process died is redelivered
(``task_reject_on_worker_lost``) and taken over through the message's task id, each
worker prefetches one message, analyses go to queue ``gpu`` and deliveries (next
stage) to queue ``io``. The Redis visibility timeout is longer than the longest analysis.

Start a worker with ``triage worker`` (``celery -A worker.celery_app worker -Q gpu`` is
the same thing).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy import or_, select, update

from storage.models import Job, utcnow
from triage.config import Settings, load_settings
from worker.heartbeat import Heartbeat
from worker.tasks import NodeContext, requeue_expired, requeue_orphans, run_job, worker_name

__all__ = ["ANALYSE", "REPORT", "Dispatcher", "make_app"]

log = logging.getLogger(__name__)

ANALYSE = "triage.analyse"
REPORT = "triage.report"
_ctx: NodeContext | None = None
_ctx_lock = threading.Lock()


def context() -> NodeContext:
    """This process's node context (settings from TRIAGE_* / TRIAGE_CONFIG)."""
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            _ctx = NodeContext(load_settings(), report=_report_on_io)
        return _ctx


def _report_on_io(ctx: NodeContext, result_id: int) -> None:
    """Hand the SR/SEG build to an ``io`` worker; build here if the broker will not take it.

    Either way nothing is lost: the result stays ``pending`` until built, and the node's
    delivery loop builds any result left pending (an io worker that died, a lost message).
    """
    try:
        app.send_task(REPORT, args=[result_id], queue="io")
    except Exception as exc:
        log.warning("cannot publish the report of result %d (%s); building it here", result_id,
                    type(exc).__name__)
        from worker.report import report_result

        report_result(ctx, result_id)


_beat: Heartbeat | None = None


@worker_process_init.connect
def _fresh_context(**_: Any) -> None:
    # A forked child must not reuse the parent's database connections (or anything else).
    global _ctx, _beat
    _ctx = None
    _beat = Heartbeat(context(), "celery").start()


@worker_process_shutdown.connect
def _last_beat(**_: Any) -> None:
    if _beat is not None:
        _beat.stop()


def make_app(settings: Settings) -> Celery:
    c = settings.celery
    app = Celery("triage", broker=c.broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="io",
        task_routes={ANALYSE: {"queue": "gpu"}, REPORT: {"queue": "io"}},
        broker_transport_options={"visibility_timeout": c.visibility_timeout},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # A worker outlives any broker outage (Celery's default gives up after 100 tries,
        # about 45 minutes), reconnecting every 30 s at most.
        broker_connection_max_retries=None,
        # Publishing gives up quickly: the dispatcher's next pass is the retry.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0.5},
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_serializer="json",
        accept_content=["json"],
    )

    @app.task(name=ANALYSE, bind=True)
    def analyse(self: Task, job_id: int) -> str:
        ctx = context()
        tid = str(self.request.id)
        return run_job(ctx, int(job_id), worker_name(f"celery:{tid}"), takeover=f"celery:{tid}")

    @app.task(name=REPORT)
    def report(result_id: int) -> str:
        """Build a result's SR/SEG (queue ``io``); a no-op when already built."""
        from worker.report import report_result

        return report_result(context(), int(result_id))

    return app


app = make_app(load_settings())  # for ``celery -A worker.celery_app``


class Dispatcher:
    """Publishes queued jobs to Celery; re-publishes those not picked up in time."""

    def __init__(self, ctx: NodeContext, celery_app: Celery | None = None) -> None:
        self.ctx = ctx
        self.app = celery_app or make_app(ctx.settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)

    def start(self) -> Dispatcher:
        requeue_orphans(self.ctx)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def publish_due(self, now: dt.datetime | None = None) -> int:
        """Publish every queued job never published or published too long ago."""
        now = now or utcnow()
        stale = now - dt.timedelta(seconds=self.ctx.settings.celery.republish_seconds)
        with self.ctx.db.sessions() as s:
            due = s.scalars(select(Job.id).where(Job.state == "queued",
                                                 or_(Job.published_at.is_(None), Job.published_at < stale))
                            .order_by(Job.created_at, Job.id).limit(500)).all()
        n = 0
        for jid in due:
            try:
                self.app.send_task(ANALYSE, args=[jid], queue="gpu")
            except Exception as exc:  # broker down: the job stays queued and is retried next pass
                log.warning("cannot publish job %d (%s); will retry", jid, type(exc).__name__)
                break
            with self.ctx.db.session() as s:
                s.execute(update(Job).where(Job.id == jid, Job.state == "queued")
                          .values(published_at=utcnow()).execution_options(synchronize_session=False))
            n += 1
        return n

    def _run(self) -> None:
        poll = self.ctx.settings.executor.poll_seconds
        while not self._stop.wait(poll):
            try:
                requeue_expired(self.ctx)
                self.publish_due()
            except Exception:
                log.exception("dispatcher pass failed")
