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
percentile compares across kinds and bundles where raw scores do not), then by arrival
(oldest first). A whole-image score's percentile is read against the bundle's reference
scores; a patch map's, its abnormal volume against the validation normals' (bundles
calibrated before that reference existed give none, and come after those that do). A map
result's level still comes from its abnormal volume, not from that percentile.

A series' level never drops on re-analysis (a late slice or a new bundle): it is the most
urgent level of its results from ``Series.priority_from_version`` on, which only an admin
moves (:func:`accept_priority`). A study takes its most urgent series.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from storage.models import AuditEvent, Job, Result, Series, Study
from triage.config import RankSettings

__all__ = ["PRIORITY_NAMES", "STATES", "WorklistRow", "accept_priority", "priority", "worklist"]

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


STATES = ("waiting", "analysing", "analysed", "failed", "ignored")


def worklist(session: Session, *, limit: int = 200, min_priority: int | None = None,
             kind: str | None = None, state: str | None = None, text: str | None = None,
             since: dt.datetime | None = None) -> list[WorklistRow]:
    """Studies in reading order (see the module docstring), ranked by the database.

    One query: each series' level (the most urgent of its results from its floor version on),
    its active and failed jobs, then per study the most urgent level, the highest percentile
    and the kinds; ordered and limited in SQL, so a worklist of 10 000 studies costs one
    indexed aggregation, not 10 000 Python objects. Filters: ``state`` (one of
    :data:`STATES`), ``text`` (accession number or patient ID, exact, or the start of the
    patient name, case-insensitive), ``since`` (first instance received at or after).
    """
    if state is not None and state not in STATES:
        raise ValueError(f"unknown worklist state {state!r}; one of {', '.join(STATES)}")
    lv = (select(Result.series_id.label("sid"), func.min(Result.priority).label("p"),
                 func.max(Result.percentile).label("pct"), func.max(Result.score).label("sc"))
          .join(Series, Series.id == Result.series_id)
          .where(Result.version >= Series.priority_from_version)
          .group_by(Result.series_id).subquery())
    jobs = (select(Job.series_id.label("sid"),
                   func.sum(case((Job.state.in_(("queued", "running")), 1), else_=0)).label("active"),
                   func.sum(case((Job.state == "failed", 1), else_=0)).label("failed"))
            .group_by(Job.series_id).subquery())
    prio = func.min(lv.c.p)
    pct = func.max(lv.c.pct)
    active = func.coalesce(func.sum(jobs.c.active), 0)
    failed = func.coalesce(func.sum(jobs.c.failed), 0)
    n_ignored = func.sum(case((Series.state == "ignored", 1), else_=0))
    q = (select(Study, prio, pct, func.max(lv.c.sc), func.count(Series.id),
                func.aggregate_strings(case((Series.kind != "ignore", Series.kind)), ","),
                active, failed, n_ignored)
         .join(Series, Series.study_id == Study.id)
         .outerjoin(lv, lv.c.sid == Series.id)
         .outerjoin(jobs, jobs.c.sid == Series.id)
         .group_by(Study.id)
         .order_by(func.coalesce(prio, 9), func.coalesce(pct, -1.0).desc(), Study.first_received_at, Study.id)
         .limit(limit))
    if min_priority is not None:
        q = q.having(prio <= min_priority)
    if kind is not None:
        q = q.having(func.sum(case((Series.kind == kind, 1), else_=0)) > 0)
    if since is not None:
        q = q.where(Study.first_received_at >= since)
    if text:
        t = text.strip()
        q = q.where((Study.accession_number == t) | (Study.patient_id == t)
                    | func.lower(Study.patient_name).startswith(t.lower(), autoescape=True))
    idle = active == 0
    if state == "analysing":
        q = q.having(active > 0)
    elif state == "analysed":
        q = q.having(idle, prio.is_not(None))
    elif state == "failed":
        q = q.having(idle, prio.is_(None), failed > 0)
    elif state == "ignored":
        q = q.having(idle, prio.is_(None), failed == 0, n_ignored == func.count(Series.id))
    elif state == "waiting":
        q = q.having(idle, prio.is_(None), failed == 0, n_ignored < func.count(Series.id))
    out = []
    for st, p, pc, sc, n, kinds, active, failed, ignored in session.execute(q):
        state = ("analysing" if active else "analysed" if p is not None else "failed" if failed
                 else "ignored" if ignored == n else "waiting")
        out.append(WorklistRow(
            study_instance_uid=st.study_instance_uid, accession_number=st.accession_number,
            patient_id=st.patient_id, patient_name=st.patient_name, study_description=st.study_description,
            arrived=st.first_received_at, priority=None if p is None else int(p),
            percentile=None if pc is None else float(pc), score=None if sc is None else float(sc),
            kinds=list(dict.fromkeys(k for k in (kinds or "").split(",") if k)), state=state, series=int(n)))
    return out


def accept_priority(session: Session, series_id: int, actor: str) -> None:
    """An admin accepts the latest result's level for a series (it may then be lower)."""
    latest = session.scalar(select(func.max(Result.version)).where(Result.series_id == series_id))
    se = session.get(Series, series_id)
    if se is None or latest is None:
        raise ValueError(f"series {series_id} has no result")
    se.priority_from_version = int(latest)
    session.add(AuditEvent(actor=actor, action="priority accepted", series_id=series_id,
                           detail={"from_version": int(latest)}))
