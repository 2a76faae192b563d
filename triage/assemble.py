"""Series completion: when has the PACS sent the whole series?

DICOM has no end-of-series message. A series is complete when either

* **early finish** — the sender released the association that carried every instance of
  the series, and the series is geometrically complete: one orientation and image size,
  positions along the slice normal with no duplicate and uniform gaps, and the count
  consistent with the headers where they say (Images in Acquisition, a contiguous run of
  Instance Numbers). Single projection images and non-image objects are complete at
  release. A sender that opens one association per instance never triggers this (its
  series span several associations) and falls back to
* **the quiet period** — no new instance for ``quiet_seconds`` (default 5 s; Orthanc and
  mercure wait 60 s).

Completion routes the series and, unless it is ignored, creates its Job in the same
transaction (the database is the outbox). A late or changed instance reopens a complete
series with ``version + 1`` (see :mod:`triage.ingest`) and it completes again, giving a
new Job and a new result version.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import AuditEvent, Instance, Job, Series, utcnow
from triage import MANUFACTURER
from triage.config import Settings
from triage.modality import PROJECTION_MODALITIES
from triage.route import Decision, SeriesFacts, route

__all__ = ["Assembler", "Geometry", "check_geometry", "complete_series", "finish_quiet", "on_release"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Geometry:
    complete: bool
    reason: str
    count: int
    spacing_mm: float | None = None
    normal: tuple[float, float, float] | None = None


def check_geometry(instances: Sequence[Instance], modality: str | None, tolerance: float = 0.05) -> Geometry:
    """Is this set of current instances one complete image series?"""
    images = [i for i in instances if i.is_image]
    n = len(images)
    if n == 0:
        return Geometry(True, "no images", len(instances))
    if (modality or "").upper() in PROJECTION_MODALITIES or any((i.frames or 1) > 1 for i in images):
        return Geometry(True, "projection or multi-frame images", n)
    if any(i.position is None or i.orientation is None for i in images):
        return Geometry(False, "slices without Image Plane geometry", n)
    if n < 2:
        return Geometry(False, "a single slice", n)
    orient = np.array([i.orientation for i in images], dtype=float)
    if np.abs(orient - orient[0]).max() > 1e-4:
        return Geometry(False, "mixed orientations", n)
    if len({(i.rows, i.columns) for i in images}) > 1:
        return Geometry(False, "mixed image sizes", n)
    normal = np.cross(orient[0, :3], orient[0, 3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return Geometry(False, "degenerate orientation", n)
    normal /= norm
    d = np.sort(np.array([i.position for i in images], dtype=float) @ normal)
    gaps = np.diff(d)
    nrm = (float(normal[0]), float(normal[1]), float(normal[2]))
    if (gaps < 1e-3).any():
        return Geometry(False, "duplicate slice positions", n, normal=nrm)
    spacing = float(np.median(gaps))
    if np.abs(gaps - spacing).max() > tolerance * spacing:
        return Geometry(False, f"non-uniform slice gaps ({gaps.min():.2f}-{gaps.max():.2f} mm)", n,
                        spacing, nrm)
    expected = {i.expected_count for i in images if i.expected_count}
    if len(expected) == 1 and n < next(iter(expected)):
        return Geometry(False, f"{n} of {next(iter(expected))} images (Images in Acquisition)", n,
                        spacing, nrm)
    numbers = [i.instance_number for i in images]
    if all(v is not None for v in numbers) and len(set(numbers)) == n:
        lo, hi = min(numbers), max(numbers)  # type: ignore[type-var]
        if hi - lo + 1 != n:  # type: ignore[operator]
            return Geometry(False, f"instance numbers {lo}..{hi} with {n} instances", n, spacing, nrm)
    return Geometry(True, f"{n} slices, uniform {spacing:.2f} mm", n, spacing, nrm)


def _current(session: Session, series_id: int) -> list[Instance]:
    return list(session.scalars(select(Instance).where(Instance.series_id == series_id,
                                                       Instance.current.is_(True))))


def facts_for(series: Series, instances: Sequence[Instance], geometry: Geometry) -> SeriesFacts:
    images = [i for i in instances if i.is_image]
    sop = (images or list(instances))[0].sop_class_uid if instances else ""
    return SeriesFacts(sop_class_uid=sop, is_image=bool(images), attributes=dict(series.attributes),
                       count=geometry.count, slice_spacing_mm=geometry.spacing_mm, normal=geometry.normal,
                       produced_here=str(series.attributes.get("Manufacturer", "")) == MANUFACTURER)


def complete_series(session: Session, series: Series, reason: str, settings: Settings,
                    geometry: Geometry | None = None) -> Decision | None:
    """Mark ``series`` complete, route it and queue its Job, in the caller's transaction.

    Returns None when another process completed this version first.
    """
    instances = _current(session, series.id)
    geometry = geometry or check_geometry(instances, series.modality, settings.assemble.spacing_tolerance)
    now = utcnow()
    stmt = (update(Series).where(Series.id == series.id, Series.state == "receiving",
                                 Series.version == series.version)
            .values(state="complete", completed_at=now, completion_reason=reason)
            .execution_options(synchronize_session=False))
    won = cast(CursorResult[Any], session.execute(stmt)).rowcount
    if won != 1:
        return None
    decision = route(facts_for(series, instances, geometry), settings.route.rules)
    state = "ignored" if decision.kind == "ignore" else "complete"
    session.execute(update(Series).where(Series.id == series.id)
                    .values(state=state, kind=decision.kind, route_reason=decision.reason)
                    .execution_options(synchronize_session=False))
    session.add(AuditEvent(actor="assembler", action="series complete", series_id=series.id,
                           detail={"why": reason, "instances": len(instances), "version": series.version,
                                   "geometry": geometry.reason}))
    session.add(AuditEvent(actor="router", action="routed", series_id=series.id,
                           detail={"kind": decision.kind, "reason": decision.reason}))
    if decision.kind != "ignore":
        session.add(Job(series_id=series.id, series_version=series.version, kind=decision.kind,
                        created_at=now))
    log.info("series %d v%d complete (%s): %s, %s", series.id, series.version, reason, decision.kind,
             decision.reason)
    return decision


def on_release(db: Database, association_id: str, settings: Settings) -> list[int]:
    """Early finish for the series an association carried, when it was released normally."""
    if not settings.assemble.early_finish:
        return []
    done = []
    with db.session() as s:
        ids = s.scalars(select(Instance.series_id).where(Instance.association_id == association_id)
                        .distinct()).all()
        now = utcnow()
        for sid in ids:
            # FOR UPDATE: an instance being indexed into this series (PostgreSQL) finishes first
            series = s.get(Series, sid, with_for_update=True)
            if series is None or series.state != "receiving":
                continue
            series.released_at = now
            instances = _current(s, sid)
            if any(i.association_id != association_id for i in instances):
                continue  # spread over associations: wait for the quiet period
            geo = check_geometry(instances, series.modality, settings.assemble.spacing_tolerance)
            if geo.complete and complete_series(s, series, f"association released; {geo.reason}",
                                                settings, geo) is not None:
                done.append(sid)
    return done


def finish_quiet(db: Database, settings: Settings, now: dt.datetime | None = None) -> list[int]:
    """Complete every receiving series that has been quiet for ``quiet_seconds``."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=settings.assemble.quiet_seconds)
    done = []
    with db.sessions() as s:
        due = s.scalars(select(Series.id).where(Series.state == "receiving",
                                                Series.last_received_at <= cutoff)).all()
    for sid in due:
        with db.session() as s:
            series = s.get(Series, sid, with_for_update=True)
            if series is None or series.state != "receiving" or series.last_received_at > cutoff:
                continue
            quiet = settings.assemble.quiet_seconds
            if complete_series(s, series, f"quiet for {quiet:g} s", settings) is not None:
                done.append(sid)
    return done


class Assembler:
    """A thread that applies the quiet period; early finishes come from the SCP."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="assembler", daemon=True)

    def start(self) -> Assembler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.assemble.poll_seconds):
            try:
                finish_quiet(self.db, self.settings)
            except Exception:  # keep assembling; the next pass retries
                log.exception("assembler pass failed")
