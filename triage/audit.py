"""The audit log: reading it (pages and API) and recording configuration changes.

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
from storage.models import AuditEvent
from triage.config import Settings

__all__ = ["audit_events", "flatten", "record_configuration"]

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
