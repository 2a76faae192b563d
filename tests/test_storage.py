"""storage/: migrations, models, the job claim and the blob store (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import CursorResult, inspect, select, text, update
from sqlalchemy.exc import IntegrityError, StatementError

from storage.blobs import BlobStore
from storage.db import Database
from storage.migrate import current_revision, head_revision, upgrade
from storage.models import AuditEvent, Base, Delivery, Instance, Job, Result, Series, Study

# An aware time away from UTC, with microseconds: what comes back must be the same instant, in UTC.
IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
T0 = dt.datetime(2024, 3, 1, 18, 4, 56, 789012, tzinfo=IST)


def _is_utc(value: dt.datetime | None) -> bool:
    return value is not None and value.tzinfo is not None and value.utcoffset() == dt.timedelta(0)


def _series(s: Any, uid: str = "1.2.826.0.1.3680043.2.1125.2", study_uid: str = "1.2.826.0.1.3680043.2.1125.1"
            ) -> Series:
    study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        study = Study(study_instance_uid=study_uid)
        s.add(study)
        s.flush()
    series = Series(study_id=study.id, series_instance_uid=uid, modality="CT")
    s.add(series)
    s.flush()
    return series


def _instance(series_id: int, uid: str, revision: int = 1) -> Instance:
    return Instance(series_id=series_id, sop_instance_uid=uid, revision=revision,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                    blob=BlobStore.key("instance", uid, revision=revision), sha256="0" * 64, size=10,
                    is_image=True)


def _job(db: Database) -> int:
    with db.session() as s:
        series = _series(s)
        job = Job(series_id=series.id, series_version=1, kind="ct")
        s.add(job)
        s.flush()
        return job.id


# --- migrations ---------------------------------------------------------------------------------

def test_migrations_upgrade_from_empty_and_are_idempotent(blank_db: Database) -> None:
    head = head_revision(blank_db)
    assert head is not None
    assert current_revision(blank_db) is None
    assert not set(inspect(blank_db.engine).get_table_names()) & set(Base.metadata.tables)

    upgrade(blank_db)
    assert current_revision(blank_db) == head
    assert set(Base.metadata.tables) <= set(inspect(blank_db.engine).get_table_names())

    with blank_db.session() as s:  # a row that a second upgrade must leave alone
        s.add(Study(study_instance_uid="1.2.3"))
    upgrade(blank_db)
    assert current_revision(blank_db) == head
    with blank_db.session() as s:
        assert s.scalars(select(Study.study_instance_uid)).all() == ["1.2.3"]


def test_migrated_schema_equals_the_models(db: Database) -> None:
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


# --- models -------------------------------------------------------------------------------------

def test_round_trip_of_every_model(db: Database) -> None:
    attributes = {"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "SliceThickness": 1.25,
                  "BodyPartExamined": None, "nested": {"flag": True, "n": 3}, "text": "Jörg ✓"}
    lesions = [{"centre_mm": [-12.5, 40.0, 101.25], "volume_cm3": 0.8, "peak": 7.5}]
    details = {"timings_s": {"load": 0.25, "score": 1.5}, "geometry": [512, 512, 120], "versions": {}}
    with db.session() as s:
        study = Study(study_instance_uid="1.2.3", patient_id="PID-1", patient_name="Müller^Jörg",
                      accession_number="ACC1", study_date="20240301", first_received_at=T0)
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid="1.2.3.4", modality="CT",
                        attributes=attributes, first_received_at=T0, last_received_at=T0,
                        released_at=T0 + dt.timedelta(seconds=1), completed_at=T0 + dt.timedelta(minutes=1))
        s.add(series)
        s.flush()
        inst = _instance(series.id, "1.2.3.4.5")
        inst.size = 5 * 2**32  # BigInteger
        inst.position = [-125.0, -130.5, 42.25]
        inst.orientation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        inst.received_at = T0
        s.add(inst)
        job = Job(series_id=series.id, series_version=1, kind="ct", created_at=T0,
                  lease_until=T0 + dt.timedelta(minutes=5))
        s.add(job)
        s.flush()
        result = Result(job_id=job.id, series_id=series.id, version=1, kind="ct", bundle_name="head-ct",
                        bundle_version="1.0", bundle_fingerprint="f" * 64, method="posterior",
                        log_posterior=-1.5, log_p_normal=-0.25, score=0.1, percentile=99.5, abnormal=True,
                        priority=1, abnormal_cm3=2.5, lesions=lesions, details=details, created_at=T0)
        s.add(result)
        s.flush()
        s.add(Delivery(result_id=result.id, destination="PACS", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                       sop_instance_uid="1.2.3.4.6", blob="results/ab/cd/x", next_attempt_at=T0))
        s.add(AuditEvent(actor="scp", action="received", series_id=series.id, at=T0,
                         detail={"instances": 1, "from": ["MODALITY", "10.0.0.1"]}))
        ids = {"study": study.id, "series": series.id, "instance": inst.id, "job": job.id,
               "result": result.id}

    with db.session() as s:  # a new session: everything below comes from the database
        study = s.get_one(Study, ids["study"])
        assert (study.patient_name, study.first_received_at) == ("Müller^Jörg", T0)
        assert study.first_received_at.tzinfo is dt.UTC

        series = s.get_one(Series, ids["series"])
        assert series.attributes == attributes
        assert (series.state, series.version, series.changed) == ("receiving", 1, False)
        assert series.instance_count == 0
        assert series.completed_at == T0 + dt.timedelta(minutes=1)
        for when in (series.first_received_at, series.last_received_at, series.released_at,
                     series.completed_at):
            assert _is_utc(when)
        assert series.study.study_instance_uid == "1.2.3"

        inst = s.get_one(Instance, ids["instance"])
        assert inst.size == 5 * 2**32
        assert inst.position == [-125.0, -130.5, 42.25]
        assert inst.orientation == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert (inst.revision, inst.current, inst.is_image) == (1, True, True)
        assert inst.received_at == T0 and _is_utc(inst.received_at)
        assert [i.id for i in series.instances] == [inst.id]

        job = s.get_one(Job, ids["job"])
        assert (job.state, job.attempts) == ("queued", 0)
        assert job.created_at == T0 and job.lease_until == T0 + dt.timedelta(minutes=5)
        assert _is_utc(job.created_at) and _is_utc(job.lease_until)
        assert job.started_at is None

        result = s.get_one(Result, ids["result"])
        assert result.lesions == lesions and result.details == details
        assert (result.score, result.percentile, result.abnormal_cm3) == (0.1, 99.5, 2.5)
        assert result.abnormal is True and result.map_blob is None
        assert result.created_at == T0 and _is_utc(result.created_at)

        delivery = s.scalars(select(Delivery)).one()
        assert (delivery.result_id, delivery.state, delivery.attempts) == (ids["result"], "pending", 0)
        assert delivery.next_attempt_at == T0 and _is_utc(delivery.next_attempt_at)
        # Defaults are aware UTC "now" as well.
        assert _is_utc(delivery.created_at)
        assert abs(delivery.created_at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)

        event = s.scalars(select(AuditEvent)).one()
        assert event.detail == {"instances": 1, "from": ["MODALITY", "10.0.0.1"]}
        assert event.at == T0 and _is_utc(event.at)

        # Comparisons in SQL see the same instants, whatever zone the parameter is given in.
        assert s.scalar(select(Job.id).where(Job.created_at == T0.astimezone(dt.UTC))) == ids["job"]
        assert s.scalar(select(Job.id).where(Job.lease_until > T0)) == ids["job"]
        assert s.scalar(select(Job.id).where(Job.lease_until > T0 + dt.timedelta(minutes=6))) is None


def test_naive_datetime_is_refused(db: Database) -> None:
    job_id = _job(db)
    naive = dt.datetime(2024, 3, 1, 12, 0)
    with pytest.raises(StatementError, match="naive datetime"), db.session() as s:
        s.add(Study(study_instance_uid="9.9", first_received_at=naive))
    with pytest.raises(StatementError, match="naive datetime"), db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_until=naive))
    with pytest.raises(StatementError, match="naive datetime"), db.session() as s:
        s.execute(select(Job).where(Job.created_at < naive)).all()
    with db.session() as s:  # nothing of the above was written
        assert s.scalar(select(Study).where(Study.study_instance_uid == "9.9")) is None
        assert s.get_one(Job, job_id).lease_until is None


def test_unique_series_instance_uid(db: Database) -> None:
    with db.session() as s:
        _series(s, uid="1.2.3.4")
    with pytest.raises(IntegrityError), db.session() as s:
        _series(s, uid="1.2.3.4")
    with db.session() as s:
        _series(s, uid="1.2.3.5")
        assert len(s.scalars(select(Series)).all()) == 2


def test_unique_instance_uid_and_revision(db: Database) -> None:
    with db.session() as s:
        series_id = _series(s).id
        s.add(_instance(series_id, "1.2.3.4.5"))
    with pytest.raises(IntegrityError), db.session() as s:
        s.add(_instance(series_id, "1.2.3.4.5"))
    with db.session() as s:  # the same UID with new bytes is a new revision
        s.add(_instance(series_id, "1.2.3.4.5", revision=2))
        s.add(_instance(series_id, "1.2.3.4.6"))
    with db.session() as s:
        rows = s.execute(select(Instance.sop_instance_uid, Instance.revision)
                         .order_by(Instance.sop_instance_uid, Instance.revision)).all()
        assert [tuple(r) for r in rows] == [("1.2.3.4.5", 1), ("1.2.3.4.5", 2), ("1.2.3.4.6", 1)]


def test_unique_job_per_series_version(db: Database) -> None:
    job_id = _job(db)
    with db.session() as s:
        series_id = s.get_one(Job, job_id).series_id
    with pytest.raises(IntegrityError), db.session() as s:
        s.add(Job(series_id=series_id, series_version=1, kind="ct"))
    with db.session() as s:  # a re-opened series (version 2) gets a new job
        s.add(Job(series_id=series_id, series_version=2, kind="ct"))
    with db.session() as s:
        assert sorted(s.scalars(select(Job.series_version)).all()) == [1, 2]


# --- the job claim --------------------------------------------------------------------------------

def _claim(db: Database, job_id: int, worker: str, hold: threading.Event | None = None,
           claimed: threading.Event | None = None) -> int:
    with db.session() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.state == "queued")
                        .values(state="running", worker=worker))
        n = cast(CursorResult[Any], res).rowcount
        if claimed is not None:
            claimed.set()
        if hold is not None:
            hold.wait(10)
    return n


def test_job_claim_overlapping_transactions(db: Database) -> None:
    """B claims while A's claim is still uncommitted: B waits for A, then sees 'running'."""
    job_id = _job(db)
    claimed, release = threading.Event(), threading.Event()
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(_claim, db, job_id, "a", release, claimed)
        assert claimed.wait(10)
        b = pool.submit(_claim, db, job_id, "b")
        time.sleep(0.3)  # B is now blocked on A (SQLite: BEGIN IMMEDIATE; PostgreSQL: the row lock)
        assert not b.done()
        release.set()
        assert (a.result(timeout=30), b.result(timeout=30)) == (1, 0)
    with db.session() as s:
        job = s.get_one(Job, job_id)
        assert (job.state, job.worker) == ("running", "a")


def test_job_claim_race(db: Database) -> None:
    """Claims started at the same moment: exactly one wins."""
    job_id = _job(db)
    n = 6
    start = threading.Barrier(n)

    def claim(i: int) -> int:
        start.wait(10)
        return _claim(db, job_id, f"w{i}")

    with ThreadPoolExecutor(n) as pool:
        counts = list(pool.map(claim, range(n)))
    assert sorted(counts) == [0] * (n - 1) + [1]
    with db.session() as s:
        assert s.get_one(Job, job_id).worker == f"w{counts.index(1)}"


def test_sqlite_is_wal_and_synchronous_full(sqlite_db: Database) -> None:
    with sqlite_db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with pytest.raises(IntegrityError), sqlite_db.session() as s:
        s.add(Series(study_id=12345, series_instance_uid="1.2"))  # no such study
    with sqlite_db.session() as s:
        assert s.execute(text("SELECT count(*) FROM series")).scalar() == 0


def test_sqlite_read_then_write_transactions_serialise(sqlite_db: Database) -> None:
    """BEGIN IMMEDIATE: a transaction that reads, then writes, never fails with a stale snapshot."""
    with sqlite_db.session() as s:
        series_id = _series(s).id

    def bump(_: int) -> None:
        for _i in range(10):
            with sqlite_db.session() as s:
                n = s.scalar(select(Series.instance_count).where(Series.id == series_id))
                s.execute(update(Series).where(Series.id == series_id).values(instance_count=n + 1))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(bump, range(4)))
    with sqlite_db.session() as s:
        assert s.get_one(Series, series_id).instance_count == 40


# --- blob store -----------------------------------------------------------------------------------

KEY_RE = re.compile(r"instance/[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}(\.r[0-9]+)?")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("uid", ["1.2.840.113619.2.55.3.604688119.971.1", "../../etc/passwd",
                                 "1.2/../../../x", "/abs/olute", "9" * 200, "1.2\x00.3", "ünïcode"])
def test_blob_path_is_derived_from_a_hash(tmp_path: Path, uid: str) -> None:
    store = BlobStore(tmp_path / "blobs")
    key = store.key("instance", uid)
    assert KEY_RE.fullmatch(key), key
    h = key.rsplit("/", 1)[1]
    assert key == f"instance/{h[:2]}/{h[2:4]}/{h}"
    for part in re.split(r"[./\x00]+", uid):  # no piece of the UID's text is in the key
        if len(part) >= 3:
            assert part not in key
    assert store.key("instance", uid) == key  # deterministic
    assert store.key("instance", uid + "1") != key
    path = store.put(key, b"data")
    assert store.root.resolve() in path.parents
    assert _files(tmp_path) == [path]


def test_blob_identifiers_and_kind(tmp_path: Path) -> None:
    assert BlobStore.key("instance", "1.2", "3") != BlobStore.key("instance", "1.2.3")
    assert BlobStore.key("instance", "1.2").split("/")[1:] == BlobStore.key("result", "1.2").split("/")[1:]
    for kind in ("../x", "a/b", "", "x y"):
        with pytest.raises(ValueError):
            BlobStore.key(kind, "1.2")


def test_blob_put_get_round_trip(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    key = store.key("instance", "1.2.3")
    assert not store.exists(key)
    data = bytes(range(256)) * 1000
    path = store.put(key, data)
    assert path == store.path(key) and path.is_file()
    assert store.exists(key) and store.get(key) == data
    store.put(key, memoryview(b"replaced"))
    assert store.get(key) == b"replaced"
    assert _files(tmp_path) == [path]  # no temporary files left
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting what is not there is fine
    with pytest.raises(FileNotFoundError):
        store.get(key)
    assert store.put(store.key("instance", "empty"), b"").stat().st_size == 0


def test_blob_revision_suffix(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    k1, k2, k3 = (store.key("instance", "1.2.3", revision=r) for r in (1, 2, 3))
    assert k2 == k1 + ".r2" and k3 == k1 + ".r3"
    assert all(KEY_RE.fullmatch(k) for k in (k1, k2, k3))
    store.put(k1, b"one")
    store.put(k2, b"two")
    assert (store.get(k1), store.get(k2)) == (b"one", b"two")
    assert not store.exists(k3)
    assert [p.name for p in _files(tmp_path)] == [Path(k1).name, Path(k2).name]


def test_blob_path_refuses_keys_outside_the_root(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    (tmp_path / "x").write_bytes(b"outside")
    for key in ("../x", "instance/../../x", str(tmp_path / "x"), "", "."):
        with pytest.raises(ValueError):
            store.path(key)
    with pytest.raises(ValueError):
        store.put("../x", b"overwritten")
    with pytest.raises(ValueError):
        store.delete("../x")
    assert (tmp_path / "x").read_bytes() == b"outside"


class _Unwritable:
    """Not bytes: the file's write() raises part-way through put()."""


def test_blob_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    key = store.key("instance", "1.2.3")
    with pytest.raises(TypeError):
        store.put(key, _Unwritable())  # type: ignore[arg-type]
    assert not store.exists(key)
    assert _files(tmp_path) == []


def _fsync_fails_for_files(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_blob_failed_fsync_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path)
    key = store.key("instance", "1.2.3")
    _fsync_fails_for_files(monkeypatch)
    with pytest.raises(OSError, match="Input/output"):
        store.put(key, b"data")
    assert not store.exists(key)
    assert _files(tmp_path) == []


def test_blob_failed_replace_keeps_the_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path)
    key = store.key("instance", "1.2.3")
    path = store.put(key, b"old")
    _fsync_fails_for_files(monkeypatch)
    with pytest.raises(OSError):
        store.put(key, b"new")
    assert store.get(key) == b"old"
    assert _files(tmp_path) == [path]


def test_blob_usage(tmp_path: Path) -> None:
    u = BlobStore(tmp_path).usage()
    assert u.total > 0 and 0 <= u.free <= u.total and u.used == u.total - u.free
    assert 0.0 <= u.used_fraction <= 1.0
