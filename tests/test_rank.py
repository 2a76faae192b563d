"""Priority levels and the worklist order; a study's level never drops on re-analysis."""

from __future__ import annotations

import datetime as dt

import pytest
from typer.testing import CliRunner

from storage.db import Database
from storage.models import Job, Result, Series, Study
from triage.cli import app
from triage.rank import accept_priority, priority, worklist


def test_priority_levels() -> None:
    assert priority(abnormal=True, percentile=99.5) == 1
    assert priority(abnormal=True, percentile=95.0) == 2
    assert priority(abnormal=False, percentile=92.0) == 3
    assert priority(abnormal=False, percentile=50.0) == 4
    assert priority(abnormal=True, abnormal_cm3=9.0, threshold_cm3=2.0) == 1
    assert priority(abnormal=True, abnormal_cm3=3.0, threshold_cm3=2.0) == 2
    assert priority(abnormal=False, abnormal_cm3=0.4, threshold_cm3=2.0) == 3
    assert priority(abnormal=False, abnormal_cm3=0.0, threshold_cm3=2.0) == 4


T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)


def _study(db: Database, name: str, minutes: int, results: list[tuple[int, float | None, float]],
           kind: str = "cxr") -> int:
    """A study with one series and one Result per (priority, percentile, score) version."""
    with db.session() as s:
        st = Study(study_instance_uid=f"1.2.3.{minutes}", accession_number=name, patient_name="DOE^J",
                   first_received_at=T0 + dt.timedelta(minutes=minutes))
        s.add(st)
        s.flush()
        se = Series(study_id=st.id, series_instance_uid=f"1.2.3.{minutes}.1", kind=kind, state="complete",
                    version=len(results))
        s.add(se)
        s.flush()
        for v, (p, pct, score) in enumerate(results, 1):
            job = Job(series_id=se.id, series_version=v, kind=kind, state="done")
            s.add(job)
            s.flush()
            s.add(Result(job_id=job.id, series_id=se.id, version=v, kind=kind, bundle_name="b",
                         bundle_version="1", bundle_fingerprint="f", method="whole", score=score,
                         percentile=pct, abnormal=p <= 2, priority=p))
        return se.id


def test_worklist_order_and_priority_that_never_drops(db: Database) -> None:
    _study(db, "routine-old", 0, [(4, 40.0, 1.0)])
    _study(db, "abnormal", 5, [(2, 97.0, 5.0)])
    _study(db, "urgent", 10, [(1, 99.9, 9.0)])
    _study(db, "abnormal-higher", 15, [(2, 98.5, 6.0)])
    _study(db, "routine-new", 20, [(4, 40.0, 1.0)])
    reanalysed = _study(db, "reanalysed", 25, [(1, 99.5, 8.0), (3, 91.0, 2.0)])  # v2 is milder
    _study(db, "map-only", 30, [(2, None, 4.0)], kind="chestct")
    with db.sessions() as s:
        order = [r.accession_number for r in worklist(s)]
    # the re-analysed study keeps level 1 from its first result
    assert order == ["urgent", "reanalysed", "abnormal-higher", "abnormal", "map-only", "routine-old",
                     "routine-new"]
    with db.session() as s:
        accept_priority(s, reanalysed, actor="admin")
    with db.sessions() as s:
        rows = worklist(s)
        assert [r.accession_number for r in rows][:2] == ["urgent", "abnormal-higher"]
        assert next(r for r in rows if r.accession_number == "reanalysed").priority == 3
        assert [r.accession_number for r in worklist(s, min_priority=1)] == ["urgent"]
        assert [r.accession_number for r in worklist(s, kind="chestct")] == ["map-only"]
        top = rows[0]
        assert (top.priority_name, top.state, top.kinds) == ("urgent", "analysed", ["cxr"])


def test_accept_priority_without_result_is_an_error(db: Database) -> None:
    with db.session() as s:
        st = Study(study_instance_uid="1.9")
        s.add(st)
        s.flush()
        se = Series(study_id=st.id, series_instance_uid="1.9.1")
        s.add(se)
        s.flush()
        with pytest.raises(ValueError, match="has no result"):
            accept_priority(s, se.id, actor="admin")


def test_cli_worklist(sqlite_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    _study(sqlite_db, "ACC-URGENT", 0, [(1, 99.9, 9.0)])
    _study(sqlite_db, "ACC-ROUTINE", 1, [(4, 10.0, 1.0)])
    monkeypatch.setenv("TRIAGE_STORAGE__DATABASE_URL", sqlite_db.url)
    monkeypatch.setenv("COLUMNS", "200")
    res = CliRunner().invoke(app, ["worklist"])
    assert res.exit_code == 0, res.output
    assert res.output.index("ACC-URGENT") < res.output.index("ACC-ROUTINE")
    assert "urgent" in res.output and "DOE^J" not in res.output  # no patient names unless asked
    res = CliRunner().invoke(app, ["worklist", "--phi"])
    assert "DOE^J" in res.output


def test_priority_thresholds_come_from_the_configuration() -> None:
    from triage.config import load_settings

    levels = load_settings(rank={"urgent_percentile": 95, "borderline_percentile": 80}).rank
    assert priority(abnormal=True, percentile=96.0, levels=levels) == 1
    assert priority(abnormal=False, percentile=85.0, levels=levels) == 3
    assert priority(abnormal=True, percentile=96.0) == 2  # the defaults
