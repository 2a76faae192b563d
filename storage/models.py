"""The node's tables (SQLAlchemy 2 declarative models).

Every value that came from the wire is stored as data only: UIDs are checked for syntax
before they get here, and no file name or path is ever derived from them (blob paths come
from :mod:`storage.blobs`). Times are UTC.

State machines (strings, so that both SQLite and PostgreSQL store them the same way):

* ``Series.state``: ``receiving`` -> ``complete`` (then routed: a Job exists, or
  ``ignored``); a late or changed instance reopens it (``receiving``, ``version + 1``).
* ``Job.state``: ``queued`` -> ``running`` -> ``done`` | ``failed``; a running job whose
  lease expires goes back to ``queued`` (its worker died) until ``max_attempts``; a queued
  job becomes ``superseded`` when its series is reopened before it ran.
* ``Delivery.state``: ``pending`` -> ``sending`` -> ``sent``, or back to ``pending`` with
  a backoff, or ``dead`` after ``dispatch.max_age_seconds``; an admin may ``cancel`` (``cancelled``).
* ``Notification.state``: ``pending`` -> ``sent`` | ``dead`` | ``cancelled`` (webhooks and
  HL7 messages for urgent results).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

UID = String(64)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in Python on every backend (SQLite keeps no time zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    # none_as_null: a Python None is SQL NULL (not JSON null), so IS NULL finds it.
    # JSON values are replaced, never edited in place (no MutableDict tracking).
    type_annotation_map = {dict[str, Any]: JSON(none_as_null=True),  # noqa: RUF012
                           list[Any]: JSON(none_as_null=True), dt.datetime: UTCDateTime}


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    # Patient identifiers: shown to logged-in users only, never logged.
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    # What routing looks at, captured from the first instance's header.
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    version: Mapped[int] = mapped_column(default=1)
    changed: Mapped[bool] = mapped_column(Boolean, default=False)  # an instance came with new bytes
    instance_count: Mapped[int] = mapped_column(default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    released_at: Mapped[dt.datetime | None]  # the sender released the association after sending
    completed_at: Mapped[dt.datetime | None]
    completion_reason: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str | None] = mapped_column(String(16))
    route_reason: Mapped[str | None] = mapped_column(Text)
    # The worklist priority never drops on re-analysis: it is the most urgent level of the
    # results from this version on; an admin who accepts a lower level moves it forward.
    priority_from_version: Mapped[int] = mapped_column(default=1, server_default="1")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "revision"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    # 1 for the first bytes received; a re-send with different bytes is kept as revision 2...
    revision: Mapped[int] = mapped_column(default=1)
    current: Mapped[bool] = mapped_column(Boolean, default=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    blob: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    is_image: Mapped[bool] = mapped_column(Boolean)
    # Geometry for the completeness check (None where the header does not say).
    rows: Mapped[int | None]
    columns: Mapped[int | None]
    frames: Mapped[int | None]
    instance_number: Mapped[int | None]
    position: Mapped[list[Any] | None]  # ImagePositionPatient
    orientation: Mapped[list[Any] | None]  # ImageOrientationPatient
    expected_count: Mapped[int | None]  # ImagesInAcquisition, where the header says
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    association_id: Mapped[str | None] = mapped_column(String(64), index=True)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)  # the dashboard's rate

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "job"
    __table_args__ = (UniqueConstraint("series_id", "series_version"),
                      Index("ix_job_state_created", "state", "created_at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    series_version: Mapped[int]
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(default=0)
    reason: Mapped[str | None] = mapped_column(Text)  # why it failed
    worker: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    published_at: Mapped[dt.datetime | None]  # last handed to the broker
    started_at: Mapped[dt.datetime | None]
    lease_until: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    series: Mapped[Series] = relationship()


class Result(Base):
    __tablename__ = "result"
    __table_args__ = (UniqueConstraint("series_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    version: Mapped[int]  # 1, 2, ... per series: each re-analysis is a new version
    kind: Mapped[str] = mapped_column(String(16))
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    bundle_fingerprint: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(64))  # which score the bundle uses
    # Whole-image terms (None for a patch-map-only bundle)
    log_posterior: Mapped[float | None] = mapped_column(Float)
    log_p_normal: Mapped[float | None] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float)  # higher = more abnormal
    percentile: Mapped[float | None] = mapped_column(Float)  # of score in the bundle's reference
    abnormal: Mapped[bool] = mapped_column(Boolean)
    priority: Mapped[int]  # 1 (read first) .. 4
    abnormal_cm3: Mapped[float | None] = mapped_column(Float)
    lesions: Mapped[list[Any]] = mapped_column(default=list)
    map_blob: Mapped[str | None] = mapped_column(String(200))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)  # timings, geometry, versions
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # SR/SEG objects for the PACS: "pending" until built and their Delivery rows exist,
    # then "ready"; "failed" with the reason when they cannot be built.
    report_state: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending",
                                              index=True)
    report_error: Mapped[str | None] = mapped_column(Text)
    # the built objects: [{"what", "sop_class", "sop_instance", "series", "blob"}]
    outputs: Mapped[list[Any] | None] = mapped_column(default=list)  # NULL for results before 0002

    series: Mapped[Series] = relationship()


class Delivery(Base):
    __tablename__ = "delivery"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination"),
                      Index("ix_delivery_state_next", "state", "next_attempt_at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("result.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    blob: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[dt.datetime | None]


class Notification(Base):
    """One message about a result to one configured receiver (webhook or HL7 v2 over MLLP).

    Created in the same transaction that records the result's report, so a result at or
    above the configured priority is never left unannounced; sent with retries like a
    :class:`Delivery`."""

    __tablename__ = "notification"
    __table_args__ = (UniqueConstraint("result_id", "channel", "target"),
                      Index("ix_notification_state_next", "state", "next_attempt_at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("result.id"), index=True)
    channel: Mapped[str] = mapped_column(String(16))  # "webhook" | "hl7"
    target: Mapped[str] = mapped_column(String(64))  # the receiver's name in the configuration
    message_id: Mapped[str] = mapped_column(String(64))  # idempotency key the receiver sees
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]


class WorkerBeat(Base):
    """A worker's heartbeat: the dashboard lists workers and when each was last seen."""

    __tablename__ = "worker_beat"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)  # e.g. "celery@gpu1:4711"
    kind: Mapped[str] = mapped_column(String(16))  # "local" | "celery" | "node"
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int]
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    jobs_done: Mapped[int] = mapped_column(default=0)
    bundles: Mapped[dict[str, Any]] = mapped_column(default=dict)  # kind -> "name version", loaded


class NodeInfo(Base):
    """Facts about this installation, e.g. ``installation_id`` (random, set by migration 0003):
    it enters every output UID, so two nodes (or a reinstalled one) never reuse each other's."""

    __tablename__ = "node_info"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class User(Base):
    """A person who logs in to the web page (roles ``viewer`` and ``admin``)."""

    __tablename__ = "user_account"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))  # scrypt, with its parameters and salt
    role: Mapped[str] = mapped_column(String(16), default="viewer")
    failed_logins: Mapped[int] = mapped_column(default=0)
    locked_until: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiToken(Base):
    """A machine client's bearer token; only its SHA-256 is stored."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[dt.datetime | None]
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)

    user: Mapped[User] = relationship()


class WebSession(Base):
    """A logged-in browser: the cookie holds a random token, the database only its SHA-256."""

    __tablename__ = "web_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]

    user: Mapped[User] = relationship()


class AuditEvent(Base):
    """What happened, for the timeline and the audit log (never patient identifiers)."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))  # "scp", "assembler", a user name...
    action: Mapped[str] = mapped_column(String(64), index=True)
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id"), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


__all__ = ["ApiToken", "AuditEvent", "Base", "Delivery", "Instance", "Job", "NodeInfo", "Notification",
           "Result", "Series", "Study", "User", "WebSession", "WorkerBeat", "utcnow"]
