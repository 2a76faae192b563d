"""The delivery outbox: SR and SEG objects to the PACS by C-STORE, until they arrive.

One :class:`storage.models.Delivery` row per object and destination (unique), created in
the transaction that marks a result's reports ready. :class:`Sender` sends what is due:
one association per destination and pass, proposing only the SOP classes being sent. A
success (or a warning status) marks the row ``sent``; a refused association, a timeout or
a failure status puts it back to ``pending`` with an exponential backoff with jitter; a
row older than ``max_age_seconds`` becomes ``dead`` (a visible dead letter an admin can
retry). Everything is in rows, so a restart of the node resumes where it stopped, and the
deterministic SOP Instance UIDs make a resend harmless at the PACS.

A row being sent is ``sending`` with a lease (``next_attempt_at`` in the future), so two
senders never send the same row at once; a sender that dies leaves it to be retried when
the lease passes.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import ssl
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from storage.blobs import BlobStore
from storage.db import Database
from storage.models import AuditEvent, Delivery, Notification, Result, utcnow
from triage.config import Destination, DispatchSettings
from triage.identity import node_ae

__all__ = ["Sender", "backoff_seconds", "c_echo", "plan_deliveries"]

log = logging.getLogger(__name__)

_SUCCESS = {0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}  # success and warnings


def backoff_seconds(attempts: int, cfg: DispatchSettings, rng: random.Random | None = None) -> float:
    """Delay before attempt ``attempts + 1``: doubling from the initial delay, capped, jittered."""
    base = min(cfg.backoff_max_seconds, cfg.backoff_initial_seconds * 2 ** max(attempts - 1, 0))
    j = (rng or random).uniform(-cfg.jitter, cfg.jitter)
    return max(0.1, base * (1 + j))


REJECTED = "association rejected or aborted"


def c_echo(host: str, port: int, called_ae: str, *, calling_ae: str = "TRIAGE", timeout: float = 5.0,
           tls_args: tuple[ssl.SSLContext, str] | None = None) -> str | None:
    """C-ECHO a DICOM node: None when it answers with success, else why not (for logs and probes)."""
    ae = node_ae(ae_title=calling_ae)
    ae.add_requested_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    try:
        assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    except OSError as exc:
        return str(exc)
    if not assoc.is_established:
        return (REJECTED if assoc.is_rejected or assoc.is_aborted
                else "no association (connection refused or timed out)")
    try:
        st = assoc.send_c_echo()
        code = st.get("Status") if st else None
        return None if code == 0 else f"C-ECHO status {code if code is not None else 'none'}"
    finally:
        assoc.release()


def plan_deliveries(session: Session, result: Result, outputs: Sequence[dict[str, Any]],
                    cfg: DispatchSettings) -> int:
    """Delivery rows for ``outputs`` to every destination whose priority filter admits the result."""
    n = 0
    for dest in cfg.destinations:
        if dest.min_priority is not None and result.priority > dest.min_priority:
            continue
        for o in outputs:
            exists = session.scalar(select(Delivery.id).where(Delivery.sop_instance_uid == o["sop_instance"],
                                                              Delivery.destination == dest.name))
            if exists is None:
                session.add(Delivery(result_id=result.id, destination=dest.name, sop_class_uid=o["sop_class"],
                                     sop_instance_uid=o["sop_instance"], blob=o["blob"]))
                n += 1
    return n


@dataclass
class _Outcome:
    ok: bool
    error: str | None = None


def _tls(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    if dest.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(dest.tls.client_ca)
                                     if dest.tls.client_ca else None)
    ctx.load_cert_chain(str(dest.tls.certificate), str(dest.tls.key))
    return ctx, dest.host


class Sender:
    """Sends due deliveries; safe to run in several processes (rows are claimed)."""

    def __init__(self, db: Database, blobs: BlobStore, cfg: DispatchSettings) -> None:
        self.db = db
        self.blobs = blobs
        self.cfg = cfg
        self.destinations = {d.name: d for d in cfg.destinations}
        self.rng = random.Random()

    def _ae(self, contexts: Sequence[str]) -> AE:
        ae = node_ae(ae_title=self.cfg.calling_ae_title)
        for sop in contexts:
            ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        t = self.cfg.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = t
        ae.connection_timeout = t
        return ae

    def echo(self, dest: Destination) -> str | None:
        """None when ``dest`` answers C-ECHO, else why not."""
        return c_echo(dest.host, dest.port, dest.ae_title, calling_ae=self.cfg.calling_ae_title,
                      timeout=self.cfg.timeout_seconds, tls_args=_tls(dest))

    def echo_all(self) -> dict[str, str | None]:
        out = {}
        for d in self.cfg.destinations:
            why = self.echo(d)
            out[d.name] = why
            if why is None:
                log.info("destination %s (%s@%s:%d) answers C-ECHO", d.name, d.ae_title, d.host, d.port)
            else:
                log.warning("destination %s (%s@%s:%d) does not answer C-ECHO: %s; deliveries to it "
                            "will be retried", d.name, d.ae_title, d.host, d.port, why)
        return out

    # ------------------------------------------------------------------ rows

    def _expire(self, now: dt.datetime) -> int:
        cutoff = now - dt.timedelta(seconds=self.cfg.max_age_seconds)
        with self.db.session() as s:
            n = cast(CursorResult[Any], s.execute(
                update(Delivery)
                .where(Delivery.state == "pending", Delivery.created_at < cutoff)
                .values(state="dead", next_attempt_at=now)
                .execution_options(synchronize_session=False))).rowcount
        if n:
            log.error("%d deliveries gave up after %.0f h (dead letters: retry them from the status page "
                      "or `triage deliveries retry`)", n, self.cfg.max_age_seconds / 3600)
        return int(n)

    def _claim(self, now: dt.datetime, limit: int = 100) -> list[Delivery]:
        lease = now + dt.timedelta(seconds=4 * self.cfg.timeout_seconds + 60)
        with self.db.sessions() as s:
            due = list(s.scalars(
                select(Delivery)
                .where(Delivery.state.in_(("pending", "sending")), Delivery.next_attempt_at <= now)
                .order_by(Delivery.next_attempt_at, Delivery.id).limit(limit)))
        mine = []
        for d in due:
            with self.db.session() as s:
                won = cast(CursorResult[Any], s.execute(
                    update(Delivery).where(Delivery.id == d.id, Delivery.state == d.state,
                                           Delivery.next_attempt_at == d.next_attempt_at)
                    .values(state="sending", next_attempt_at=lease)
                    .execution_options(synchronize_session=False))).rowcount
            if won == 1:
                mine.append(d)
        return mine

    def _record(self, d: Delivery, out: _Outcome, now: dt.datetime) -> None:
        with self.db.session() as s:
            row = s.get(Delivery, d.id)
            if row is None or row.state != "sending":
                return
            row.attempts += 1
            if out.ok:
                row.state, row.delivered_at, row.last_error = "sent", now, None
                s.add(AuditEvent(actor="dispatch", action="delivered", series_id=series_of(s, row.result_id),
                                 detail={"destination": row.destination, "sop_class": row.sop_class_uid,
                                         "attempts": row.attempts}))
            else:
                delay = backoff_seconds(row.attempts, self.cfg, self.rng)
                row.state, row.last_error = "pending", (out.error or "failed")[:2000]
                row.next_attempt_at = now + dt.timedelta(seconds=delay)
                log.warning("delivery %d to %s failed (attempt %d): %s; next try in %.0f s", row.id,
                            row.destination, row.attempts, row.last_error, delay)

    # ------------------------------------------------------------------ sending

    def _send(self, dest: Destination, rows: list[Delivery]) -> list[_Outcome]:
        contexts = sorted({r.sop_class_uid for r in rows})
        ae = self._ae(contexts)
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=_tls(dest))
        except OSError as exc:
            return [_Outcome(False, f"cannot connect: {exc}")] * len(rows)
        if not assoc.is_established:
            why = ("association rejected" if assoc.is_rejected
                   else "no association (refused, aborted or timed out)")
            return [_Outcome(False, why)] * len(rows)
        outs = []
        try:
            for r in rows:
                if not assoc.is_established:
                    outs.append(_Outcome(False, "association lost"))
                    continue
                try:
                    ds = pydicom.dcmread(self.blobs.path(r.blob))
                except Exception as exc:  # missing, truncated, not DICOM: this row fails, not the pass
                    outs.append(_Outcome(False, f"stored object unreadable: {type(exc).__name__}: {exc}"))
                    continue
                try:
                    st = assoc.send_c_store(ds)
                except Exception as exc:
                    outs.append(_Outcome(False, f"C-STORE not sent: {type(exc).__name__}: {exc}"))
                    continue
                code = int(st.Status) if st and "Status" in st else None
                if code in _SUCCESS:
                    outs.append(_Outcome(True))
                else:
                    comment = f" ({st.get('ErrorComment')})" if st and st.get("ErrorComment") else ""
                    outs.append(_Outcome(False, "no response (timeout)" if code is None
                                         else f"C-STORE status 0x{code:04X}{comment}"))
        finally:
            if assoc.is_established:
                assoc.release()
        return outs

    def run_once(self, now: dt.datetime | None = None) -> dict[str, int]:
        """One pass: expire, claim what is due, send per destination, record. Returns counts."""
        now = now or utcnow()
        counts = {"dead": self._expire(now), "sent": 0, "failed": 0}
        rows = self._claim(now)
        by_dest: dict[str, list[Delivery]] = defaultdict(list)
        for r in rows:
            by_dest[r.destination].append(r)
        for name, group in by_dest.items():
            dest = self.destinations.get(name)
            if dest is None:
                outs = [_Outcome(False, f"destination {name!r} is not configured")] * len(group)
            else:
                outs = self._send(dest, group)
            done = utcnow()
            for r, o in zip(group, outs, strict=True):
                self._record(r, o, done)
                counts["sent" if o.ok else "failed"] += 1
        return counts

    # ------------------------------------------------------------------ admin actions

    def retry(self, delivery_id: int, actor: str = "admin") -> bool:
        """A dead (or waiting) delivery is sent again at the next pass, its age counted anew."""
        return outbox_action(self.db, Delivery, delivery_id, "retry", actor, _delivery_detail)

    def cancel(self, delivery_id: int, actor: str = "admin") -> bool:
        return outbox_action(self.db, Delivery, delivery_id, "cancel", actor, _delivery_detail)


def _delivery_detail(row: Any) -> dict[str, Any]:
    return {"delivery": row.id, "destination": row.destination}


def outbox_action(db: Database, model: type[Delivery] | type[Notification], row_id: int,
                  action: Literal["retry", "cancel"], actor: str,
                  detail: Callable[[Any], dict[str, Any]]) -> bool:
    """Retry or cancel one outbox row (a delivery or a notification), with an audit event.

    Retry: a dead, waiting or cancelled row is due at once and its age counts anew (so the
    dead-letter limit does not strike again at once). Cancel: a dead or waiting row stops.
    A row being sent right now is left alone (False).
    """
    now = utcnow()
    with db.session() as s:
        row = cast(Delivery | Notification | None, s.get(model, row_id))
        allowed = ("dead", "pending", "cancelled") if action == "retry" else ("dead", "pending")
        if row is None or row.state not in allowed:
            return False
        if action == "retry":
            row.state, row.next_attempt_at, row.created_at = "pending", now, now
            if isinstance(row, Notification):
                row.lease_until = None
        else:
            row.state = "cancelled"
        what = "delivery" if model is Delivery else "notification"
        s.add(AuditEvent(actor=actor, action=f"{what} {'retried' if action == 'retry' else 'cancelled'}",
                         series_id=series_of(s, row.result_id), detail=detail(row)))
    return True


def series_of(s: Session, result_id: int) -> int | None:
    return s.scalar(select(Result.series_id).where(Result.id == result_id))
