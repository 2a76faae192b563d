"""The audit log: reading it (pages and API), a series' timeline, and recording
configuration changes.

Each start of ``triage serve`` compares the effective configuration (file, environment and
defaults together) with the one recorded at the previous start and writes what changed as
an audit event, so "who changed the threshold, and when" has an answer. Secrets never
reach the log: secret fields, keys that name a secret and passwords inside URLs are
replaced by a marker. Not even a digest is kept (a short hash of a weak password can be
brute-forced), so a change of a secret alone is not recorded.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import AuditEvent, Series
from triage.config import Settings
from triage.rank import PRIORITY_NAMES

__all__ = ["audit_events", "flatten", "object_name", "record_configuration", "series_timeline"]

HIDDEN = "(hidden)"
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|key_file|private)", re.IGNORECASE)
ACTIONS = ("configuration recorded", "configuration changed")


def _hide_url_password(value: str) -> str:
    if "://" not in value or "@" not in value:
        return value
    parts = urlsplit(value)
    if parts.password is None:
        return value
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:{HIDDEN}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _leaf(key: str, value: Any, raw: Any) -> Any:
    if isinstance(raw, SecretStr) or (_SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in (None, "")):
        return HIDDEN
    return _hide_url_password(value) if isinstance(value, str) else value


def flatten(settings: Settings) -> dict[str, Any]:
    """Dotted keys -> JSON values with secrets hidden (lists are kept whole, each item hidden)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, model: Any) -> None:
        for name in type(model).model_fields:
            key = f"{prefix}{name}"
            raw = getattr(model, name)
            if hasattr(type(raw), "model_fields"):
                walk(key + ".", raw)
            elif isinstance(raw, list):
                out[key] = [_item(key, x) for x in raw]
            else:
                out[key] = _leaf(key, _json(raw), raw)

    def _item(key: str, x: Any) -> Any:
        if hasattr(type(x), "model_fields"):
            return {n: _leaf(f"{key}.{n}", _json(getattr(x, n)), getattr(x, n)) for n in type(x).model_fields}
        return _leaf(key, _json(x), x)

    walk("", settings)
    return out


def _json(v: Any) -> Any:
    if isinstance(v, SecretStr):
        return HIDDEN
    return json.loads(json.dumps(v, default=str))


def record_configuration(db: Database, settings: Settings, actor: str = "serve") -> dict[str, Any]:
    """Audit the configuration if it differs from the last recorded one; returns the changes."""
    now = flatten(settings)
    with db.session() as s:
        last = s.scalars(select(AuditEvent).where(AuditEvent.action.in_(ACTIONS))
                         .order_by(AuditEvent.id.desc()).limit(1)).first()
        before = (last.detail or {}).get("settings", {}) if last is not None else None
        if before == now:
            return {}
        if before is None:
            s.add(AuditEvent(actor=actor, action=ACTIONS[0], detail={"settings": now}))
            return {}
        changes = {k: {"from": before.get(k), "to": now.get(k)}
                   for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}
        s.add(AuditEvent(actor=actor, action=ACTIONS[1], detail={"changes": changes, "settings": now}))
        return changes


def audit_events(session: Session, *, actor: str | None = None, action: str | None = None,
                 before: int | None = None, limit: int = 100) -> list[AuditEvent]:
    """Newest first; page with ``before`` = the last id seen."""
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if actor:
        q = q.where(AuditEvent.actor == actor)
    if action:
        q = q.where(AuditEvent.action == action)
    if before:
        q = q.where(AuditEvent.id < before)
    return list(session.scalars(q))


_OBJECTS = {"1.2.840.10008.5.1.4.1.1.66.4": "SEG", "1.2.840.10008.5.1.4.1.1.7": "key image"}


def _object(sop_class: str | None) -> str:
    if sop_class is None:
        return "object"
    return "SR" if sop_class.startswith("1.2.840.10008.5.1.4.1.1.88.") else _OBJECTS.get(sop_class, sop_class)


def _note(action: str, d: dict[str, Any]) -> str:
    """One line about an event for the timeline (its detail holds no patient identifier)."""
    if action == "received":
        return f"{d['instances']} instance(s), the last at {d['last_received_at']:%H:%M:%S}"
    if action == "series complete":
        return f"{d.get('why', '')}, {d.get('instances', '?')} instance(s)"
    if action == "routed":
        return f"{d.get('kind')}: {d.get('reason')}"
    if action == "analysed":
        score = d.get("score")
        return (f"{d.get('kind')}, score {score:.3g}, {PRIORITY_NAMES.get(d.get('priority', 0), '?')}"
                if score is not None else str(d.get("kind", "")))
    if action == "reports built":
        return ", ".join(object_name(o) for o in d.get("objects", []))
    if action == "delivered":
        return f"{_object(d.get('sop_class'))} to {d.get('destination')}, attempt {d.get('attempts')}"
    if action.startswith("delivery "):
        return f"to {d.get('destination')}"
    if action.startswith("notification "):
        return " ".join(str(x) for x in (d.get("channel"), d.get("target"), d.get("error")) if x)
    return str(d.get("reason") or d.get("why") or "")


def object_name(what: str) -> str:
    """A result's output as people call it ("sr", "seg0", "sc1" in ``Result.outputs``)."""
    if what == "sr":
        return "SR"
    if what.startswith("seg"):
        return "SEG"
    return "key image" if what.startswith("sc") else what


def series_timeline(session: Session, series: Series) -> list[dict[str, Any]]:
    """The series' story, oldest first: "received" (its first instance; the SCP records no event
    per instance, so this one comes from the series row), then its audit events: complete,
    routed (with the rule that decided), analysed, reports built, delivered, admin actions.
    Each entry: ``at``, ``actor``, ``action``, ``detail`` and a one-line ``note``."""
    received: dict[str, Any] = {"at": series.first_received_at, "actor": "scp", "action": "received",
                                "detail": {"instances": series.instance_count,
                                           "last_received_at": series.last_received_at}}
    events = session.scalars(select(AuditEvent).where(AuditEvent.series_id == series.id)
                             .order_by(AuditEvent.at, AuditEvent.id))
    out = [received, *({"at": e.at, "actor": e.actor, "action": e.action, "detail": e.detail or {}}
                       for e in events)]
    out.sort(key=lambda e: e["at"])  # stable: "received" stays ahead of an event in the same instant
    for e in out:
        e["note"] = _note(e["action"], e["detail"])
    return out
