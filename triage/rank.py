"""Priority levels for the worklist: 1 is read first.

=====  ===========  ==============================================================
level  name         when (defaults; ``[rank]`` in the configuration)
=====  ===========  ==============================================================
1      urgent       abnormal, and beyond the 99th percentile of the bundle's
                    reference scores (or, for a map, abnormal volume >= 4 T)
2      abnormal     above the bundle's calibrated operating threshold
3      borderline   above the 90th percentile (or any abnormal voxel cluster)
4      routine      everything else
=====  ===========  ==============================================================

Within a level, studies are ordered by the percentile of their most abnormal series (a
percentile compares across kinds and bundles where raw scores do not; map-only results
without a percentile come after those with one), then by arrival (oldest first).

A series' level never drops on re-analysis (a late slice or a new bundle): it is the most
urgent level of its results from ``Series.priority_from_version`` on, which only an admin
moves (:func:`accept_priority`). A study takes its most urgent series.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import AuditEvent, Job, Result, Series, Study
from triage.config import RankSettings

__all__ = ["PRIORITY_NAMES", "WorklistRow", "accept_priority", "priority", "worklist"]

PRIORITY_NAMES = {1: "urgent", 2: "abnormal", 3: "borderline", 4: "routine"}


def priority(*, abnormal: bool, percentile: float | None = None, abnormal_cm3: float | None = None,
             threshold_cm3: float | None = None, levels: RankSettings | None = None) -> int:
    """The priority level of one result (see the module table; thresholds from ``levels``)."""
    lv = levels or RankSettings()
    if percentile is not None and math.isfinite(percentile):
        if abnormal and percentile >= lv.urgent_percentile:
            return 1
        if abnormal:
            return 2
        return 3 if percentile >= lv.borderline_percentile else 4
    cm3 = abnormal_cm3 or 0.0
    if abnormal and threshold_cm3 is not None and cm3 >= lv.urgent_volume_factor * max(threshold_cm3, 0.5):
        return 1
    if abnormal:
        return 2
    return 3 if cm3 > 0 else 4


@dataclass
class WorklistRow:
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None  # shown to logged-in users only; never logged
    patient_name: str | None
    study_description: str | None
    arrived: dt.datetime
    priority: int | None  # None: nothing analysed yet
    percentile: float | None
    score: float | None
    kinds: list[str] = field(default_factory=list)
    state: str = "waiting"  # waiting | analysing | analysed | failed | ignored
    series: int = 0

    @property
    def priority_name(self) -> str:
        return PRIORITY_NAMES.get(self.priority, "pending") if self.priority else "pending"


def _series_levels(session: Session) -> dict[int, tuple[int, float | None, float]]:
    """series id -> (effective level, percentile, score) of its results from its floor version."""
    q = (select(Result.series_id, func.min(Result.priority), func.max(Result.percentile),
                func.max(Result.score))
         .join(Series, Series.id == Result.series_id)
         .where(Result.version >= Series.priority_from_version)
         .group_by(Result.series_id))
    return {sid: (int(p), pct, float(sc)) for sid, p, pct, sc in session.execute(q)}


def worklist(session: Session, *, limit: int = 200, min_priority: int | None = None,
             kind: str | None = None) -> list[WorklistRow]:
    """Studies in reading order (see the module docstring)."""
    levels = _series_levels(session)
    job_states: dict[int, set[str]] = {}
    for sid, state in session.execute(select(Job.series_id, Job.state)):
        job_states.setdefault(sid, set()).add(state)
    rows: dict[int, WorklistRow] = {}
    for se, st in session.execute(select(Series, Study).join(Study, Study.id == Series.study_id)):
        row = rows.get(st.id)
        if row is None:
            row = rows[st.id] = WorklistRow(
                study_instance_uid=st.study_instance_uid, accession_number=st.accession_number,
                patient_id=st.patient_id, patient_name=st.patient_name,
                study_description=st.study_description, arrived=st.first_received_at,
                priority=None, percentile=None, score=None)
        row.series += 1
        if se.kind and se.kind != "ignore" and se.kind not in row.kinds:
            row.kinds.append(se.kind)
        lv = levels.get(se.id)
        if lv is not None:
            p, pct, sc = lv
            if row.priority is None or p < row.priority:
                row.priority = p
            if pct is not None and (row.percentile is None or pct > row.percentile):
                row.percentile = pct
            if row.score is None or sc > row.score:
                row.score = sc
        states = job_states.get(se.id, set())
        if "running" in states or "queued" in states:
            row.state = "analysing"
        elif lv is not None and row.state != "analysing":
            row.state = "analysed"
        elif "failed" in states and row.state == "waiting":
            row.state = "failed"
        elif se.state == "ignored" and row.state == "waiting":
            row.state = "ignored"
    out = [r for r in rows.values()
           if (min_priority is None or (r.priority is not None and r.priority <= min_priority))
           and (kind is None or kind in r.kinds)]
    out.sort(key=lambda r: (r.priority or 9, -(r.percentile if r.percentile is not None else -1.0),
                            r.arrived))
    return out[:limit]


def accept_priority(session: Session, series_id: int, actor: str) -> None:
    """An admin accepts the latest result's level for a series (it may then be lower)."""
    latest = session.scalar(select(func.max(Result.version)).where(Result.series_id == series_id))
    se = session.get(Series, series_id)
    if se is None or latest is None:
        raise ValueError(f"series {series_id} has no result")
    se.priority_from_version = int(latest)
    session.add(AuditEvent(actor=actor, action="priority accepted", series_id=series_id,
                           detail={"from_version": int(latest)}))
