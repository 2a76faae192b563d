"""Results -> SR and SEG objects in the blob store -> Delivery rows; and the delivery loop.

A Result is written first (``report_state = "pending"``); its reports are built outside any
database transaction (highdicom takes a while on a CT and must not hold SQLite's write
lock), stored as blobs, and then one transaction marks the result ``ready`` and creates
its Delivery rows and, for a result at or above ``notify.min_priority``, its Notification
rows (a result whose reports failed is still notified: its score and priority stand). A
worker that dies in between leaves the result pending, and :class:`DeliveryLoop` builds it
later: the output UIDs depend only on the result id and version, so a rebuild makes the
same objects.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pydicom
from sqlalchemy import select

from storage.models import AuditEvent, Instance, NodeInfo, Result, utcnow
from triage.dispatch import Sender, plan_deliveries
from triage.notify import Notifier, plan_notifications
from worker.tasks import NodeContext

__all__ = ["DeliveryLoop", "report_result"]

log = logging.getLogger(__name__)

WAKE = threading.Event()
"""Set when a result's deliveries or notifications were queued in this process: the loop
sends at once instead of at its next poll (other processes' results wait for the poll)."""


def software_version() -> str:
    try:
        return version("triage-node")
    except PackageNotFoundError:
        return "0+unknown"


def installation_id(ctx: NodeContext) -> str:
    """This node's random identity (created by migration 0003), cached per process."""
    cached = getattr(ctx, "_installation", None)
    if cached is None:
        with ctx.db.sessions() as s:
            cached = s.scalar(select(NodeInfo.value).where(NodeInfo.key == "installation_id"))
        if not cached:
            raise RuntimeError("the database has no installation_id; run `triage db upgrade`")
        ctx._installation = cached  # type: ignore[attr-defined]
    return str(cached)


def _predecessor(ctx: NodeContext, r: Result) -> tuple[str, str, str] | None:
    with ctx.db.sessions() as s:
        prev = s.scalars(select(Result).where(Result.series_id == r.series_id, Result.version < r.version,
                                              Result.report_state == "ready")
                         .order_by(Result.version.desc()).limit(1)).first()
    if prev is None:
        return None
    sr = next((o for o in prev.outputs or [] if o.get("what") == "sr"), None)
    return None if sr is None else (sr["sop_class"], sr["sop_instance"], sr["series"])


def report_result(ctx: NodeContext, result_id: int) -> str:
    """Build and store the result's SR/SEG, queue their deliveries and its notifications;
    ``ready`` or ``failed``."""
    from triage.report import ReportInput, build_reports

    with ctx.db.sessions() as s:
        r = s.get(Result, result_id)
        if r is None or r.report_state != "pending":
            return "skipped"
        # the instances that were analysed (a changed instance arriving since must not mix in)
        keys = list((r.details or {}).get("instance_blobs") or s.scalars(
            select(Instance.blob).where(Instance.series_id == r.series_id, Instance.current.is_(True),
                                        Instance.is_image.is_(True))))
    try:
        # pixel data only for key images: the SR and SEGs need the headers alone
        with_pixels = ctx.settings.dispatch.key_images
        source = [pydicom.dcmread(ctx.blobs.path(k), stop_before_pixels=not with_pixels) for k in keys]
        values = None
        if r.map_blob:
            values = np.load(io.BytesIO(ctx.blobs.get(r.map_blob)), allow_pickle=False).astype(np.float32)
        d = r.details or {}
        inp = ReportInput(
            result_id=r.id, version=r.version, kind=r.kind, bundle_name=r.bundle_name,
            bundle_version=r.bundle_version, bundle_fingerprint=r.bundle_fingerprint, method=r.method,
            score=r.score, abnormal=r.abnormal, priority=r.priority, log_posterior=r.log_posterior,
            log_p_normal=r.log_p_normal, percentile=r.percentile, abnormal_cm3=r.abnormal_cm3,
            lesions=list(r.lesions or []), map=values, threshold=d.get("map_threshold"),
            slice_order=list(d.get("slice_order") or []), predecessor=_predecessor(ctx, r),
            installation=installation_id(ctx))
        objects = build_reports(source, inp, software_version=software_version(),
                                key_images=ctx.settings.dispatch.key_images)
        outputs: list[dict[str, Any]] = []
        for what, ds in [("sr", objects.sr), *((f"seg{i}", seg) for i, seg in enumerate(objects.segs)),
                         *((f"sc{i}", sc) for i, sc in enumerate(objects.key_images))]:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            key = ctx.blobs.key("output", str(ds.SOPInstanceUID))
            ctx.blobs.put(key, buf.getvalue())
            outputs.append({"what": what, "sop_class": str(ds.SOPClassUID),
                            "sop_instance": str(ds.SOPInstanceUID), "series": str(ds.SeriesInstanceUID),
                            "blob": key})
    except Exception as exc:  # a report that cannot be built is visible, never silent
        log.exception("reports for result %d failed", result_id)
        with ctx.db.session() as s:
            row = s.get(Result, result_id)
            if row is None or row.report_state != "pending":
                return "failed"
            row.report_state, row.report_error = "failed", f"{type(exc).__name__}: {exc}"[:2000]
            m = plan_notifications(s, row, ctx.settings.notify)
        if m:
            WAKE.set()
        return "failed"
    with ctx.db.session() as s:
        row = s.get(Result, result_id, with_for_update=True)
        if row is None or row.report_state != "pending":
            return "skipped"
        row.report_state, row.outputs, row.report_error = "ready", outputs, None
        n = plan_deliveries(s, row, outputs, ctx.settings.dispatch)
        m = plan_notifications(s, row, ctx.settings.notify)
        s.add(AuditEvent(actor="reporter", action="reports built", series_id=row.series_id,
                         detail={"result": row.id, "objects": [o["what"] for o in outputs],
                                 "deliveries": n, "notifications": m, "notes": objects.notes}))
    if n or m:
        WAKE.set()
    return "ready"


class DeliveryLoop:
    """A thread: builds reports left pending, sends due deliveries and notifications."""

    def __init__(self, ctx: NodeContext, *, stale_seconds: float | None = None) -> None:
        if stale_seconds is None:  # with Celery an io worker builds them; only take over the lost ones
            stale_seconds = 600.0 if ctx.settings.executor.kind == "celery" else 30.0
        self.ctx = ctx
        self.sender = Sender(ctx.db, ctx.blobs, ctx.settings.dispatch)
        self.notifier = Notifier(ctx.db, ctx.settings)
        self.stale = dt.timedelta(seconds=stale_seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delivery", daemon=True)

    def start(self) -> DeliveryLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        WAKE.set()
        self._thread.join(timeout=30)

    def _pending_reports(self) -> list[int]:
        cutoff = utcnow() - self.stale
        with self.ctx.db.sessions() as s:
            return list(s.scalars(select(Result.id).where(Result.report_state == "pending",
                                                          Result.created_at < cutoff).limit(20)))

    def _run(self) -> None:
        self.sender.echo_all()
        while not self._stop.is_set():
            WAKE.wait(self.ctx.settings.dispatch.poll_seconds)
            WAKE.clear()
            if self._stop.is_set():
                break
            try:
                for rid in self._pending_reports():
                    report_result(self.ctx, rid)
                self.sender.run_once()
            except Exception:
                log.exception("delivery pass failed")
            try:  # (its own try: a failing delivery pass must not hold back notifications)
                self.notifier.send_due()
            except Exception as exc:  # no traceback: it could quote a patient identifier
                log.error("notification pass failed: %s", type(exc).__name__)
