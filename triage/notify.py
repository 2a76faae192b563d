"""Notifications: a signed JSON webhook and an HL7 v2.5.1 ORU^R01 over MLLP per urgent result.

One :class:`storage.models.Notification` row per result and configured receiver, created
(by :func:`plan_notifications`) in the transaction that makes the result final when its
priority is at or above ``notify.min_priority``. :class:`Notifier` sends what is due, one row
at a time under a lease (``state = "sending"``, ``lease_until``), so two processes never send
the same row at once and a crashed sender's row is taken up again when its lease passes.
Failures back off like deliveries (:func:`triage.dispatch.backoff_seconds`, dispatch's
settings); permanent refusals (HTTP 4xx other than 408/429, HL7 AR/CR) and rows older than
``notify.max_age_seconds`` become ``dead`` (dead letters an admin can retry).

The message id is derived from the installation, result, version, channel and receiver, so a
retried message carries the same id and a receiver can drop duplicates.

Webhook signature: ``X-Triage-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
"<t>.<raw body>")>``. A receiver recomputes the HMAC over the raw body bytes as received,
compares in constant time, and refuses a ``t`` more than a few minutes from its clock (a
replayed request is then too old; the message id catches replays inside the window). See
:func:`verify_signature`.

PHI: HL7 messages carry the patient id and name (the RIS needs them); webhook bodies carry
the patient id only with ``notify.include_patient_id``, never the name. Neither ever goes
into logs or ``last_error`` (receivers' error texts are scrubbed of them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import random
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

import hl7
import httpx
from sqlalchemy import CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import AuditEvent, NodeInfo, Notification, Result, Series, Study, utcnow
from triage.config import Hl7Receiver, NotifySettings, Settings, Webhook
from triage.dispatch import backoff_seconds, outbox_action, series_of
from triage.rank import PRIORITY_NAMES

__all__ = ["EVENT", "MESSAGE_ID_HEADER", "SIGNATURE_HEADER", "Facts", "Notifier", "hl7_escape",
           "message_id", "mllp_exchange", "oru_r01", "plan_notifications", "sign", "verify_signature",
           "webhook_body"]

log = logging.getLogger(__name__)

EVENT = "triage.result"
SIGNATURE_HEADER = "X-Triage-Signature"
MESSAGE_ID_HEADER = "X-Triage-Message-Id"
_NAMESPACE = uuid.UUID("6f0f3b1e-4c1a-5d0e-9a57-7c1b8e0a2d42")  # message ids: UUID5 in this namespace
_RETRY_STATUS = {408, 429}
_KIND_TEXT = {"cxr": "chest radiograph", "bct": "head CT", "chestct": "chest CT"}

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"  # MLLP frame: <SB> message <EB><CR>
_MAX_ACK = 1 << 20


# --------------------------------------------------------------------------- planning


def receivers(cfg: NotifySettings) -> list[tuple[str, str]]:
    """(channel, name) of every configured receiver."""
    return [*(("webhook", w.name) for w in cfg.webhooks), *(("hl7", h.name) for h in cfg.hl7)]


def message_id(installation: str, result_id: int, version: int, channel: str, target: str) -> str:
    """The idempotency key a receiver sees: the same for every attempt of one notification."""
    return uuid.uuid5(_NAMESPACE, f"{installation}/{result_id}/{version}/{channel}/{target}").hex


def plan_notifications(session: Session, result: Result, cfg: NotifySettings) -> int:
    """Notification rows for ``result`` to every receiver, when its priority is at or above the
    configured one; planning again adds nothing."""
    if result.priority > cfg.min_priority or not (wanted := receivers(cfg)):
        return 0
    have = {(c, t) for c, t in session.execute(select(Notification.channel, Notification.target)
                                               .where(Notification.result_id == result.id))}
    installation = session.scalar(select(NodeInfo.value).where(NodeInfo.key == "installation_id")) or ""
    n = 0
    for channel, target in wanted:
        if (channel, target) not in have:
            session.add(Notification(result_id=result.id, channel=channel, target=target,
                                     message_id=message_id(installation, result.id, result.version,
                                                           channel, target)))
            n += 1
    return n


# --------------------------------------------------------------------------- what a message says


@dataclass(frozen=True)
class Facts:
    """A result and its study, as plain values (read once per send)."""

    result_id: int
    version: int
    created_at: dt.datetime
    kind: str
    bundle_name: str
    bundle_version: str
    method: str
    score: float
    percentile: float | None
    abnormal: bool
    priority: int
    abnormal_cm3: float | None
    lesions: int
    report_state: str
    study_uid: str
    series_uid: str
    accession: str | None
    patient_id: str | None
    patient_name: str | None
    study_date: str | None

    @classmethod
    def read(cls, s: Session, result_id: int) -> Facts | None:
        r = s.get(Result, result_id)
        se = s.get(Series, r.series_id) if r is not None else None
        st = s.get(Study, se.study_id) if se is not None else None
        if r is None or se is None or st is None:
            return None
        return cls(result_id=r.id, version=r.version, created_at=r.created_at, kind=r.kind,
                   bundle_name=r.bundle_name, bundle_version=r.bundle_version, method=r.method,
                   score=r.score, percentile=r.percentile, abnormal=r.abnormal, priority=r.priority,
                   abnormal_cm3=r.abnormal_cm3, lesions=len(r.lesions or []), report_state=r.report_state,
                   study_uid=st.study_instance_uid, series_uid=se.series_instance_uid,
                   accession=st.accession_number, patient_id=st.patient_id, patient_name=st.patient_name,
                   study_date=st.study_date)

    def scrub(self, text: str) -> str:
        """``text`` (e.g. a receiver's error message) without this patient's identifiers."""
        names = re.split(r"[\^=]", self.patient_name or "")
        for v in sorted({x.strip() for x in [self.patient_id or "", self.patient_name or "", *names]},
                        key=len, reverse=True):
            if len(v) >= 2:
                text = text.replace(v, "***").replace(hl7_escape(v), "***")
        return text

    def study_url(self, base_url: str | None) -> str | None:
        return None if not base_url else f"{base_url.rstrip('/')}/studies/{quote(self.study_uid, safe='')}"


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def webhook_body(f: Facts, mid: str, cfg: NotifySettings, node: dict[str, str]) -> bytes:
    """The JSON body (compact, keys sorted): the same bytes on every attempt."""
    body: dict[str, Any] = {
        "event": EVENT, "message_id": mid, "time": _iso(f.created_at), "node": node,
        "result_id": f.result_id, "result_version": f.version,
        "study_instance_uid": f.study_uid, "series_instance_uid": f.series_uid,
        "accession_number": f.accession, "kind": f.kind,
        "bundle": {"name": f.bundle_name, "version": f.bundle_version}, "method": f.method,
        "score": _finite(f.score), "percentile": _finite(f.percentile), "abnormal": f.abnormal,
        "priority": f.priority, "priority_name": PRIORITY_NAMES.get(f.priority, str(f.priority)),
        "abnormal_cm3": _finite(f.abnormal_cm3), "lesions": f.lesions, "report_state": f.report_state,
    }
    if (url := f.study_url(cfg.base_url)) is not None:
        body["study_url"] = url
    if cfg.include_patient_id:
        body["patient_id"] = f.patient_id
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret: bytes, body: bytes, t: int | None = None) -> str:
    """The ``X-Triage-Signature`` value for ``body`` sent at unix time ``t`` (default: now)."""
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(secret: str | bytes, header: str, body: bytes, tolerance: float = 300.0,
                     now: float | None = None) -> bool:
    """Does ``header`` sign ``body`` (the raw bytes received) with ``secret``, within ``tolerance``
    seconds of ``now``? Several ``v1=`` values are accepted (a sender between two secrets)."""
    key = secret.encode() if isinstance(secret, str) else secret
    t: int | None = None
    macs = []
    for part in header.split(","):
        k, _, v = part.strip().partition("=")
        if k == "t" and v.isdigit():
            t = int(v)
        elif k == "v1":
            macs.append(v)
    if t is None or not macs or abs((time.time() if now is None else now) - t) > tolerance:
        return False
    want = hmac.new(key, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(want, m) for m in macs)


_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}


def hl7_escape(text: str | None) -> str:
    """Free text for an HL7 field: delimiters escaped, control characters made spaces."""
    return "".join(_ESCAPES.get(c, " " if ord(c) < 0x20 else c) for c in text or "")


def _nm(x: float) -> str:
    """An HL7 NM value (no exponent)."""
    return f"{x:.6f}".rstrip("0").rstrip(".")


def _ts(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S+0000")


def _segment(name: str, fields: dict[int, str]) -> str:
    """A segment from {field number: encoded value}; MSH counts its field separator as MSH-1."""
    shift = 1 if name == "MSH" else 0
    values = [""] * (max(fields) + 1 - shift)
    for i, v in fields.items():
        values[i - shift] = v
    values[0] = name
    return "|".join(values)


def _xpn(dicom_name: str | None) -> str:
    """DICOM PN (family^given^middle^prefix^suffix, alphabetic group) as HL7 XPN
    (family^given^middle^suffix^prefix), each component escaped."""
    parts = [*(dicom_name or "").split("=")[0].split("^"), "", "", "", "", ""][:5]
    family, given, middle, prefix, suffix = (hl7_escape(p) for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def oru_r01(f: Facts, control_id: str, rcv: Hl7Receiver, cfg: NotifySettings,
            now: dt.datetime | None = None) -> str:
    """The HL7 v2.5.1 ORU^R01 message (segments separated by CR) for ``f``."""
    e = hl7_escape
    acc = e(f.accession)
    when = _ts(f.created_at)
    service = e("AI triage, " + _KIND_TEXT.get(f.kind, f.kind))
    study_date = f.study_date if f.study_date and re.fullmatch(r"\d{8}", f.study_date) else when
    segs = [
        _segment("MSH", {2: "^~\\&", 3: e(rcv.sending_application), 4: e(rcv.sending_facility),
                         5: e(rcv.receiving_application), 6: e(rcv.receiving_facility),
                         7: _ts(now or utcnow()), 9: "ORU^R01^ORU_R01", 10: e(control_id), 11: "P",
                         12: "2.5.1", 18: "UNICODE UTF-8"}),
        _segment("PID", {1: "1", 3: e(f.patient_id), 5: _xpn(f.patient_name)}),
        _segment("OBR", {1: "1", 2: acc, 3: acc, 4: f"TRIAGE-{e(f.kind.upper())}^{service}^L",
                         7: study_date, 22: when, 25: "F"}),
    ]
    flag = "A" if f.abnormal else "N"
    obx: list[tuple[str, str, str, str, str]] = [  # (type, observation id, value, units, flag)
        ("CWE", "PRIORITY^Triage priority^L",
         f"{f.priority}^{e(PRIORITY_NAMES.get(f.priority, str(f.priority)))}^L", "", ""),
    ]
    if (score := _finite(f.score)) is not None:
        obx.append(("NM", "SCORE^Abnormality score^L", _nm(score), "", flag))
    if (pct := _finite(f.percentile)) is not None:
        obx.append(("NM", "PERCENTILE^Score percentile in the reference^L", _nm(pct), "", ""))
    if (cm3 := _finite(f.abnormal_cm3)) is not None:
        obx.append(("NM", "VOLUME^Abnormal volume^L", _nm(cm3), "cm3^cubic centimeter^UCUM", flag))
        obx.append(("NM", "LESIONS^Abnormal regions^L", str(f.lesions), "", ""))
    obx.append(("ST", "MODEL^Model^L", e(f"{f.bundle_name} {f.bundle_version} ({f.method})"), "", ""))
    obx.append(("ST", "110180^Study Instance UID^DCM", e(f.study_uid), "", ""))
    obx.append(("ST", "112002^Series Instance UID^DCM", e(f.series_uid), "", ""))
    if (url := f.study_url(cfg.base_url)) is not None:
        obx.append(("ST", "LINK^Study page^L", e(url), "", ""))
    for i, (vt, ident, value, units, fl) in enumerate(obx, start=1):
        segs.append(_segment("OBX", {1: str(i), 2: vt, 3: ident, 5: value, 6: units, 8: fl, 11: "F",
                                     14: when}))
    return "\r".join(segs) + "\r"


# --------------------------------------------------------------------------- sending


@dataclass
class Outcome:
    ok: bool
    error: str | None = None
    permanent: bool = False  # a retry cannot help: dead letter at once
    retry_after: float | None = None  # the receiver asked for this delay
    # What may go into a log line or an audit event: the error without any text the receiver
    # wrote (a RIS may quote any patient's identifiers, which scrubbing by this message's
    # patient cannot catch). ``error`` (scrubbed) is kept for the admin pages only.
    summary: str | None = None

    @property
    def loggable(self) -> str:
        return self.summary or self.error or "failed"


_ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")


def _excerpt(text: str, n: int = 200) -> str:
    return " ".join(text.split())[:n]


def post_webhook(wh: Webhook, body: bytes, mid: str, f: Facts) -> Outcome:
    headers = {"Content-Type": "application/json", MESSAGE_ID_HEADER: mid,
               SIGNATURE_HEADER: sign(wh.key(), body)}
    # A user name and password in the URL go as basic auth, not in the URL: httpx logs each
    # request's URL (INFO), which would put the password into the node's log.
    url = httpx.URL(wh.url)
    auth = httpx.BasicAuth(url.username, url.password) if url.userinfo else None
    try:
        resp = httpx.post(url.copy_with(userinfo=b""), content=body, headers=headers, auth=auth,
                          timeout=wh.timeout_seconds, verify=wh.verify_tls)
    except httpx.HTTPError as exc:
        return Outcome(False, f"{type(exc).__name__}: {f.scrub(str(exc)) or 'no detail'}")
    code = resp.status_code
    if 200 <= code < 300:
        return Outcome(True)
    error = f"HTTP {code}: {f.scrub(_excerpt(resp.text))}".rstrip(": ")
    if code >= 500 or code in _RETRY_STATUS:
        after = resp.headers.get("Retry-After", "")
        return Outcome(False, error, retry_after=float(after) if after.isdigit() else None,
                       summary=f"HTTP {code}")
    if 300 <= code < 400:
        error += " (redirects are not followed: fix the webhook URL)"
    return Outcome(False, error, permanent=True, summary=f"HTTP {code}")


def mllp_exchange(host: str, port: int, message: bytes, timeout: float) -> bytes:
    """Send one MLLP-framed message and return the reply's payload (raises OSError, TimeoutError)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(SB + message + EB + CR)
        buf = bytearray()
        while (end := buf.find(EB + CR)) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no ACK within {timeout:g} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"no ACK within {timeout:g} s") from None
            if not chunk:
                raise ConnectionError("connection closed before the ACK")
            buf += chunk
            if len(buf) > _MAX_ACK:
                raise ConnectionError("reply too large for an ACK")
    start = buf.find(SB)
    return bytes(buf[start + 1 if 0 <= start < end else 0:end])


def send_hl7(rcv: Hl7Receiver, message: str, control_id: str, f: Facts) -> Outcome:
    try:
        reply = mllp_exchange(rcv.host, rcv.port, message.encode(), rcv.timeout_seconds)
    except OSError as exc:  # (TimeoutError and ConnectionError are OSErrors)
        return Outcome(False, f.scrub(str(exc)) or type(exc).__name__)
    try:
        msa = hl7.parse(reply.decode("utf-8", errors="replace")).segment("MSA")
        code, ref = str(msa[1]), str(msa[2])
        text = str(msa[3]) if len(msa) > 3 else ""
    except (KeyError, IndexError, ValueError):
        return Outcome(False, f"unreadable ACK: {f.scrub(_excerpt(reply.decode('latin-1'), 80))}",
                       summary="unreadable ACK")
    if ref != control_id:
        return Outcome(False, f"ACK for another message (MSA-2 {f.scrub(ref)[:20]!r})",
                       summary="ACK for another message")
    if code in ("AA", "CA"):
        return Outcome(True)
    error = f"ACK {code}" + (f": {f.scrub(_excerpt(text))}" if text else "")
    summary = f"ACK {code[:2]!r}" if code not in _ACK_CODES else f"ACK {code}"
    if code in ("AR", "CR"):
        return Outcome(False, error, permanent=True, summary=summary)
    return Outcome(False, error if code in ("AE", "CE") else f"unknown ACK code: {error}", summary=summary)


class Notifier:
    """Sends due notifications; safe to run in several processes (rows are claimed)."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.cfg = settings.notify
        self.retry_cfg = settings.dispatch  # backoff settings shared with deliveries
        self.node_name = settings.node.name
        self.webhooks = {w.name: w for w in self.cfg.webhooks}
        self.hl7 = {h.name: h for h in self.cfg.hl7}
        self.rng = random.Random()
        self._installation: str | None = None

    def _node(self) -> dict[str, str]:
        if self._installation is None:
            with self.db.sessions() as s:
                self._installation = s.scalar(select(NodeInfo.value)
                                              .where(NodeInfo.key == "installation_id")) or ""
        return {"name": self.node_name, "installation_id": self._installation}

    def _lease(self, row: Notification) -> dt.timedelta:
        rcv = self.webhooks.get(row.target) if row.channel == "webhook" else self.hl7.get(row.target)
        return dt.timedelta(seconds=2 * (rcv.timeout_seconds if rcv else 30.0) + 60)

    # ------------------------------------------------------------------ rows

    def _expire(self, now: dt.datetime) -> int:
        cutoff = now - dt.timedelta(seconds=self.cfg.max_age_seconds)
        with self.db.session() as s:
            n = cast(CursorResult[Any], s.execute(
                update(Notification)
                .where(Notification.state == "pending", Notification.created_at < cutoff)
                .values(state="dead", next_attempt_at=now)
                .execution_options(synchronize_session=False))).rowcount
        if n:
            log.error("%d notifications gave up after %.0f h (dead letters: `triage notifications retry`)",
                      n, self.cfg.max_age_seconds / 3600)
        return int(n)

    def _claim(self, now: dt.datetime, skip: set[int]) -> Notification | None:
        """The next due row, now ``sending`` under this process's lease; None when none is due."""
        with self.db.sessions() as s:
            due = list(s.scalars(
                select(Notification)
                .where(or_(and_(Notification.state == "pending", Notification.next_attempt_at <= now),
                           and_(Notification.state == "sending", Notification.lease_until <= now)),
                       Notification.id.not_in(skip))
                .order_by(Notification.next_attempt_at, Notification.id).limit(10)))
        for n in due:
            with self.db.session() as s:
                won = cast(CursorResult[Any], s.execute(
                    update(Notification).where(Notification.id == n.id, Notification.state == n.state,
                                               Notification.lease_until == n.lease_until)
                    .values(state="sending", lease_until=now + self._lease(n))
                    .execution_options(synchronize_session=False))).rowcount
            if won == 1:
                return n
        return None

    def _record(self, n: Notification, out: Outcome) -> None:
        now = utcnow()
        with self.db.session() as s:
            row = s.get(Notification, n.id)
            if row is None or row.state != "sending":
                return
            row.attempts += 1
            row.lease_until = None
            detail = {"notification": row.id, "channel": row.channel, "target": row.target,
                      "attempts": row.attempts}
            if out.ok:
                row.state, row.sent_at, row.last_error = "sent", now, None
                s.add(AuditEvent(actor="notify", action="notification sent",
                                 series_id=series_of(s, row.result_id), detail=detail))
                return
            row.last_error = (out.error or "failed")[:2000]
            if out.permanent:
                row.state, row.next_attempt_at = "dead", now
                s.add(AuditEvent(actor="notify", action="notification refused",
                                 series_id=series_of(s, row.result_id),
                                 detail={**detail, "error": out.loggable}))
                log.error("notification %d (%s %s) refused: %s; dead letter", row.id, row.channel,
                          row.target, out.loggable)
                return
            delay = backoff_seconds(row.attempts, self.retry_cfg, self.rng)
            if out.retry_after is not None:
                delay = max(delay, min(out.retry_after, self.retry_cfg.backoff_max_seconds))
            row.state, row.next_attempt_at = "pending", now + dt.timedelta(seconds=delay)
            log.warning("notification %d (%s %s) failed (attempt %d): %s; next try in %.0f s", row.id,
                        row.channel, row.target, row.attempts, out.loggable, delay)

    # ------------------------------------------------------------------ sending

    def _send(self, n: Notification) -> Outcome:
        with self.db.sessions() as s:
            f = Facts.read(s, n.result_id)
        if f is None:
            return Outcome(False, f"result {n.result_id} not found", permanent=True)
        try:
            if n.channel == "webhook" and (wh := self.webhooks.get(n.target)) is not None:
                body = webhook_body(f, n.message_id, self.cfg, self._node())
                return post_webhook(wh, body, n.message_id, f)
            if n.channel == "hl7" and (rcv := self.hl7.get(n.target)) is not None:
                control_id = n.message_id[:20]  # MSH-10 is at most 20 characters in v2.5.1
                return send_hl7(rcv, oru_r01(f, control_id, rcv, self.cfg), control_id, f)
        except Exception as exc:  # a bug must not stop the other rows; no traceback (it may hold PHI)
            log.error("notification %d: %s", n.id, f.scrub(f"{type(exc).__name__}: {exc}"))
            return Outcome(False, f.scrub(f"{type(exc).__name__}: {exc}"))
        return Outcome(False, f"{n.channel} receiver {n.target!r} is not configured")

    def send_due(self, now: dt.datetime | None = None, limit: int = 100) -> dict[str, int]:
        """One pass: expire old rows, then claim, send and record due rows one at a time."""
        now = now or utcnow()
        counts = {"dead": self._expire(now), "sent": 0, "failed": 0}
        seen: set[int] = set()
        while len(seen) < limit and (n := self._claim(now, seen)) is not None:
            seen.add(n.id)
            out = self._send(n)
            self._record(n, out)
            counts["sent" if out.ok else "dead" if out.permanent else "failed"] += 1
        return counts

    # ------------------------------------------------------------------ admin actions

    def retry(self, notification_id: int, actor: str = "admin") -> bool:
        """A dead (or waiting, or cancelled) notification is sent at the next pass, its age counted anew."""
        return outbox_action(self.db, Notification, notification_id, "retry", actor, _detail)

    def cancel(self, notification_id: int, actor: str = "admin") -> bool:
        return outbox_action(self.db, Notification, notification_id, "cancel", actor, _detail)


def _detail(row: Any) -> dict[str, Any]:
    return {"notification": row.id, "channel": row.channel, "target": row.target}
