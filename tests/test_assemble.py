"""triage.ingest + triage.assemble on a real SQLite database and blob store.

Synthetic CT slices and radiographs are built in memory (tests/dicomgen.py) and stored
through ``Ingest.store`` exactly as the SCP does; then series completion is driven by
``on_release`` (early finish) and ``finish_quiet`` (quiet period) with explicit times.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dicomgen as g
import pytest
from sqlalchemy import func, select

from storage.blobs import BlobStore
from storage.db import Database
from storage.models import AuditEvent, Instance, Job, Series, Study
from triage.assemble import Geometry, check_geometry, complete_series, finish_quiet, on_release
from triage.config import Settings, default_rules, load_settings
from triage.ingest import Ingest, StoreOutcome, dataset_offset, same_dataset
from triage.route import route

CHESTCT_RULE = "rule 'chest CT, axial, <= 3 mm'"
QUIET = 5.0


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    for k in list(os.environ):
        if k.startswith("TRIAGE_"):
            monkeypatch.delenv(k)
    return load_settings(node={"data_dir": str(tmp_path)}, assemble={"quiet_seconds": QUIET})


@pytest.fixture
def db(sqlite_db: Database) -> Database:
    """Assembly is tested on SQLite (the storage tests cover PostgreSQL)."""
    return sqlite_db


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def ingest(db: Database, blobs: BlobStore) -> Ingest:
    return Ingest(db, blobs)


# ------------------------------------------------------------------------------------- helpers


def send(ingest: Ingest, items: Sequence[bytes], aid: str) -> list[StoreOutcome]:
    out = [ingest.store(data, association_id=aid, transfer_syntax="1.2.840.10008.1.2.1") for data in items]
    for o in out:
        assert o.status == 0, o
    return out


def series_of(db: Database, name: str) -> Series:
    with db.sessions() as s:
        row = s.scalars(select(Series).where(Series.series_instance_uid == g.uid(name))).one()
        s.expunge(row)
        return row


def jobs(db: Database) -> list[Job]:
    with db.sessions() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def events(db: Database, action: str) -> list[AuditEvent]:
    with db.sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def count(db: Database, model: Any) -> int:
    with db.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def geometry_now(db: Database, series_id: int, settings: Settings) -> Geometry:
    with db.sessions() as s:
        inst = list(s.scalars(select(Instance).where(Instance.series_id == series_id,
                                                     Instance.current.is_(True))))
        modality = s.get(Series, series_id).modality  # type: ignore[union-attr]
    return check_geometry(inst, modality, settings.assemble.spacing_tolerance)


def after_quiet(series: Series, extra: float) -> dt.datetime:
    return series.last_received_at + dt.timedelta(seconds=QUIET + extra)


def assert_chestct_complete(db: Database, name: str, reason: str, version: int = 1) -> Series:
    ser = series_of(db, name)
    assert (ser.state, ser.kind, ser.version) == ("complete", "chestct", version)
    assert ser.route_reason == CHESTCT_RULE
    assert ser.completion_reason == reason
    assert ser.completed_at is not None
    job = [j for j in jobs(db) if j.series_id == ser.id and j.series_version == version]
    assert len(job) == 1
    assert (job[0].state, job[0].kind) == ("queued", "chestct")
    return ser


# ---------------------------------------------------------------------------------- early finish


def test_early_finish_at_release(ingest: Ingest, db: Database, settings: Settings) -> None:
    slices = g.ct_series("ct1", 25)
    random.Random(1).shuffle(slices)  # the order of arrival does not matter
    out = send(ingest, slices, "assoc-1")
    sid = out[0].series_id
    assert {o.series_id for o in out} == {sid}
    assert series_of(db, "ct1").state == "receiving"

    assert on_release(db, "assoc-1", settings) == [sid]
    ser = assert_chestct_complete(db, "ct1", "association released; 25 slices, uniform 2.00 mm")
    assert ser.instance_count == 25
    assert ser.released_at is not None
    assert "association released" in (ser.completion_reason or "")
    (job,) = jobs(db)
    assert (job.series_id, job.series_version, job.attempts) == (sid, 1, 0)
    (done,) = events(db, "series complete")
    assert done.detail["instances"] == 25 and done.detail["version"] == 1
    (routed,) = events(db, "routed")
    assert routed.detail == {"kind": "chestct", "reason": CHESTCT_RULE}

    # nothing more happens: a second release event, a later quiet pass
    assert on_release(db, "assoc-1", settings) == []
    assert finish_quiet(db, settings, now=after_quiet(ser, 60)) == []
    assert len(jobs(db)) == 1


def test_release_of_an_unknown_association_does_nothing(ingest: Ingest, db: Database,
                                                        settings: Settings) -> None:
    send(ingest, g.ct_series("ct1", 25), "assoc-1")
    assert on_release(db, "someone-else", settings) == []
    assert series_of(db, "ct1").state == "receiving"


def test_early_finish_can_be_turned_off(ingest: Ingest, db: Database, settings: Settings) -> None:
    send(ingest, g.ct_series("ct1", 25), "assoc-1")
    no_early = settings.assemble.model_copy(update={"early_finish": False})
    off = settings.model_copy(update={"assemble": no_early})
    assert on_release(db, "assoc-1", off) == []
    ser = series_of(db, "ct1")
    assert ser.state == "receiving"
    assert finish_quiet(db, off, now=after_quiet(ser, 0.5)) == [ser.id]
    assert_chestct_complete(db, "ct1", "quiet for 5 s")


def _two_associations(ingest: Ingest, name: str) -> list[str]:
    slices = g.ct_series(name, 25)
    send(ingest, slices[:12], "assoc-a")
    send(ingest, slices[12:], "assoc-b")
    return ["assoc-a", "assoc-b"]


def _instance_gap(ingest: Ingest, name: str) -> list[str]:
    # positions uniform, but InstanceNumber 13 never came (numbers 1..12, 14..26)
    send(ingest, [g.ct_slice(name, i, instance_number=i + 1 if i < 12 else i + 2) for i in range(25)], "a1")
    return ["a1"]


def _missing_middle(ingest: Ingest, name: str) -> list[str]:
    send(ingest, g.ct_series(name, 25, skip=[12]), "a1")
    return ["a1"]


def _short_of_images_in_acquisition(ingest: Ingest, name: str) -> list[str]:
    send(ingest, g.ct_series(name, 25, images_in_acquisition=30), "a1")
    return ["a1"]


@pytest.mark.parametrize(("sender", "geometry_reason", "count"), [
    (_missing_middle, "non-uniform slice gaps (2.00-4.00 mm)", 24),
    (_short_of_images_in_acquisition, "25 of 30 images (Images in Acquisition)", 25),
    (_instance_gap, "instance numbers 1..26 with 25 instances", 25),
    (_two_associations, "25 slices, uniform 2.00 mm", 25),  # complete, but over two associations
], ids=["missing-middle-slice", "images-in-acquisition", "instance-number-gap", "two-associations"])
def test_no_early_finish_then_quiet_period(ingest: Ingest, db: Database, settings: Settings, sender: Any,
                                           geometry_reason: str, count: int) -> None:
    aids = sender(ingest, "ct1")
    for aid in aids:
        assert on_release(db, aid, settings) == []
    ser = series_of(db, "ct1")
    assert ser.state == "receiving"
    assert ser.released_at is not None  # the release was noted
    assert ser.instance_count == count
    assert geometry_now(db, ser.id, settings).reason == geometry_reason
    assert jobs(db) == []

    # not before the quiet period ...
    assert finish_quiet(db, settings, now=after_quiet(ser, -0.5)) == []
    assert finish_quiet(db, settings, now=ser.last_received_at) == []
    assert series_of(db, "ct1").state == "receiving"
    assert jobs(db) == []
    # ... but after it
    assert finish_quiet(db, settings, now=after_quiet(ser, 0.5)) == [ser.id]
    assert_chestct_complete(db, "ct1", "quiet for 5 s")
    (done,) = events(db, "series complete")
    assert done.detail["geometry"] == geometry_reason
    assert finish_quiet(db, settings, now=after_quiet(ser, 60)) == []
    assert len(jobs(db)) == 1


def test_quiet_period_counts_from_the_last_instance(ingest: Ingest, db: Database,
                                                    settings: Settings) -> None:
    send(ingest, g.ct_series("ct1", 25, skip=[24]), "a1")
    first = series_of(db, "ct1")
    send(ingest, [g.ct_slice("ct1", 24)], "a2")
    last = series_of(db, "ct1")
    assert last.last_received_at >= first.last_received_at
    assert last.first_received_at == first.first_received_at
    assert finish_quiet(db, settings, now=after_quiet(last, -0.5)) == []
    assert finish_quiet(db, settings, now=after_quiet(last, 0.5)) == [last.id]


def test_cr_completes_at_release(ingest: Ingest, db: Database, settings: Settings) -> None:
    (o,) = send(ingest, [g.cr_image("cr1")], "a-cr")
    assert on_release(db, "a-cr", settings) == [o.series_id]
    ser = series_of(db, "cr1")
    assert (ser.state, ser.kind, ser.modality) == ("complete", "cxr", "CR")
    assert ser.route_reason == "rule 'chest radiograph, frontal'"
    assert ser.completion_reason == "association released; projection or multi-frame images"
    (job,) = jobs(db)
    assert (job.kind, job.series_version, job.state) == ("cxr", 1, "queued")


def test_lateral_radiograph_is_complete_but_ignored(ingest: Ingest, db: Database, settings: Settings) -> None:
    (o,) = send(ingest, [g.cr_image("dx1", view="LL", modality="DX", sop_class=g.DX_PRESENTATION)], "a")
    assert on_release(db, "a", settings) == [o.series_id]
    ser = series_of(db, "dx1")
    assert (ser.state, ser.kind) == ("ignored", "ignore")
    assert "view position LL" in (ser.route_reason or "")
    assert ser.completed_at is not None
    assert jobs(db) == []


def test_one_association_per_instance_completes_once_quiet(
        ingest: Ingest, db: Database, settings: Settings) -> None:
    # a sender that opens one association per instance never triggers an early finish
    slices = g.ct_series("ct1", 25)
    for k in range(25):
        send(ingest, [slices[k]], f"a{k}")
        assert on_release(db, f"a{k}", settings) == []
    ser = series_of(db, "ct1")
    assert ser.state == "receiving"
    assert finish_quiet(db, settings, now=after_quiet(ser, 1)) == [ser.id]
    assert_chestct_complete(db, "ct1", "quiet for 5 s")


# ------------------------------------------------------------------------- reopening, revisions


def _complete_ct(ingest: Ingest, db: Database, settings: Settings, name: str = "ct1") -> Series:
    out = send(ingest, g.ct_series(name, 25), "a1")
    assert on_release(db, "a1", settings) == [out[0].series_id]
    return series_of(db, name)


def test_late_instance_reopens_and_completes_again(ingest: Ingest, db: Database, settings: Settings) -> None:
    ser = _complete_ct(ingest, db, settings)
    (late,) = send(ingest, [g.ct_slice("ct1", 25)], "a2")  # the 26th slice, z = 50 mm
    assert late.reopened and late.series_id == ser.id and not late.duplicate

    again = series_of(db, "ct1")
    assert (again.state, again.version, again.instance_count) == ("receiving", 2, 26)
    assert again.completed_at is None and again.released_at is None
    assert not again.changed
    (ev,) = events(db, "series reopened")
    assert ev.series_id == ser.id
    assert ev.detail == {"why": "late instance", "version": 2}

    # the series now spans two associations: no early finish, the quiet period completes it
    assert on_release(db, "a2", settings) == []
    assert finish_quiet(db, settings, now=after_quiet(again, -0.5)) == []
    assert finish_quiet(db, settings, now=after_quiet(again, 0.5)) == [ser.id]
    assert_chestct_complete(db, "ct1", "quiet for 5 s", version=2)
    assert [(j.series_id, j.series_version) for j in jobs(db)] == [(ser.id, 1), (ser.id, 2)]
    # version 1 was still queued when the late slice came: it is not analysed
    assert [j.state for j in jobs(db)] == ["superseded", "queued"]
    assert "reopened as version 2" in (jobs(db)[0].reason or "")
    assert [e.detail["instances"] for e in events(db, "series complete")] == [25, 26]


def test_identical_resend_is_idempotent(ingest: Ingest, db: Database, settings: Settings,
                                        blobs: BlobStore) -> None:
    ser = _complete_ct(ingest, db, settings)
    data = g.ct_slice("ct1", 3)
    n_files = len(files_under(blobs.root))
    with db.sessions() as s:
        original = s.scalars(select(Instance)
                             .where(Instance.sop_instance_uid == g.uid("ct1", "slice", 3))).one()

    o = ingest.store(data, association_id="a-resend")
    assert (o.status, o.duplicate, o.revision, o.reopened) == (0, True, 1, False)
    assert (o.instance_id, o.series_id) == (original.id, ser.id)
    assert count(db, Instance) == 25
    assert len(files_under(blobs.root)) == n_files
    now = series_of(db, "ct1")
    assert (now.state, now.version, now.changed, now.instance_count) == ("complete", 1, False, 25)
    assert now.last_received_at == ser.last_received_at
    assert events(db, "series reopened") == []
    assert on_release(db, "a-resend", settings) == []
    assert len(jobs(db)) == 1


def test_resend_of_the_same_data_set_from_another_ae_is_a_duplicate(ingest: Ingest, db: Database,
                                                                   blobs: BlobStore) -> None:
    """The stored file's meta names the sender's AE; the same data set from another AE (say
    a re-push by a different tool after a crash) is no change: no revision, no extra file."""
    part10 = g.ct_slice("ct1", 3)
    body = part10[dataset_offset(part10):]
    kw = {"sop_class": g.CT_IMAGE, "sop_instance": g.uid("ct1", "slice", 3),
          "transfer_syntax": "1.2.840.10008.1.2.1"}
    first = ingest.store_dataset(body, calling_ae="MODALITY", association_id="a1", **kw)
    n_files = len(files_under(blobs.root))
    again = ingest.store_dataset(body, calling_ae="STORESCU", association_id="a2", **kw)
    assert (again.status, again.duplicate, again.revision) == (0, True, 1)
    assert again.instance_id == first.instance_id
    assert len(files_under(blobs.root)) == n_files and count(db, Instance) == 1
    changed = g.ct_slice("ct1", 3, pixel_seed=5)
    other = ingest.store_dataset(changed[dataset_offset(changed):], calling_ae="STORESCU", **kw)
    assert (other.duplicate, other.revision) == (False, 2)
    assert dataset_offset(body) == 0 and same_dataset(part10, body) and not same_dataset(part10, changed)


def test_re_push_after_an_aborted_association_finishes_early(ingest: Ingest, db: Database,
                                                             settings: Settings) -> None:
    # the first association dies after 15 slices (no release); the sender re-sends all 25
    slices = g.ct_series("ct1", 25)
    send(ingest, slices[:15], "a-dead")
    out = send(ingest, slices, "a-again")
    assert [o.duplicate for o in out] == [True] * 15 + [False] * 10
    assert on_release(db, "a-again", settings) == [out[0].series_id]
    assert_chestct_complete(db, "ct1", "association released; 25 slices, uniform 2.00 mm")
    assert count(db, Instance) == 25


def test_changed_bytes_make_a_revision_and_reopen(ingest: Ingest, db: Database, settings: Settings,
                                                  blobs: BlobStore) -> None:
    ser = _complete_ct(ingest, db, settings)
    sop = g.uid("ct1", "slice", 3)
    o = ingest.store(g.ct_slice("ct1", 3, pixel_seed=999), association_id="a-fix")
    assert (o.status, o.duplicate, o.revision, o.reopened) == (0, False, 2, True)

    with db.sessions() as s:
        rows = list(s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)
                              .order_by(Instance.revision)))
    assert [(r.revision, r.current) for r in rows] == [(1, False), (2, True)]
    assert rows[0].blob != rows[1].blob and rows[0].sha256 != rows[1].sha256
    assert blobs.exists(rows[0].blob) and blobs.exists(rows[1].blob)  # stored exactly as received, both
    assert rows[1].id == o.instance_id
    assert count(db, Instance) == 26

    now = series_of(db, "ct1")
    assert (now.state, now.version, now.changed, now.instance_count) == ("receiving", 2, True, 25)
    (ev,) = events(db, "series reopened")
    assert ev.detail == {"why": "changed instance", "version": 2}

    assert finish_quiet(db, settings, now=after_quiet(now, 0.5)) == [ser.id]
    assert_chestct_complete(db, "ct1", "quiet for 5 s", version=2)
    assert [e.detail["instances"] for e in events(db, "series complete")] == [25, 25]  # current ones


def test_changed_bytes_while_receiving_do_not_reopen(ingest: Ingest, db: Database) -> None:
    send(ingest, g.ct_series("ct1", 5), "a1")
    o = ingest.store(g.ct_slice("ct1", 2, pixel_seed=77), association_id="a1")
    assert (o.status, o.revision, o.reopened) == (0, 2, False)
    ser = series_of(db, "ct1")
    assert (ser.state, ser.version, ser.changed, ser.instance_count) == ("receiving", 1, True, 5)
    assert events(db, "series reopened") == []


def test_same_sop_instance_in_another_series_is_refused(ingest: Ingest, db: Database) -> None:
    send(ingest, [g.ct_slice("ct1", 0)], "a1")
    other = g.ct_slice("ct2", 0, sop_instance_uid=g.uid("ct1", "slice", 0))
    o = ingest.store(other, association_id="a1")
    assert o.status == 0xA900
    assert o.reason == "the SOP instance already belongs to another series"
    assert count(db, Instance) == 1


def test_series_in_another_study_is_refused(ingest: Ingest, db: Database) -> None:
    send(ingest, [g.ct_slice("ct1", 0)], "a1")
    o = ingest.store(g.ct_slice("ct1", 1, study=g.uid("another study")), association_id="a1")
    assert (o.status, o.reason) == (0xA900, "the series already belongs to another study")
    assert count(db, Instance) == 1
    assert count(db, Study) == 1


# ---------------------------------------------------------------------------- compare-and-set


def test_two_concurrent_completions_make_one_job(ingest: Ingest, db: Database, settings: Settings) -> None:
    send(ingest, g.ct_series("ct1", 25), "a1")
    sid = series_of(db, "ct1").id
    barrier = threading.Barrier(2)
    results: list[Any] = []
    errors: list[BaseException] = []

    def worker(tag: str) -> None:
        try:
            barrier.wait(timeout=5)
            with db.session() as s:
                ser = s.get(Series, sid)
                assert ser is not None
                results.append(complete_series(s, ser, tag, settings))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"caller {k}",)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert errors == []
    assert len(results) == 2
    assert sum(r is not None for r in results) == 1
    (job,) = jobs(db)
    assert (job.series_id, job.series_version) == (sid, 1)
    assert len(events(db, "series complete")) == 1
    assert len(events(db, "routed")) == 1


def test_a_stale_series_object_cannot_complete_again(ingest: Ingest, db: Database,
                                                     settings: Settings) -> None:
    send(ingest, g.ct_series("ct1", 25), "a1")
    stale = series_of(db, "ct1")  # read by two processes while receiving
    with db.session() as s:
        first = complete_series(s, stale, "first", settings)
    assert first is not None and first.kind == "chestct"
    with db.session() as s:
        assert complete_series(s, stale, "second", settings) is None
    assert len(jobs(db)) == 1
    assert series_of(db, "ct1").completion_reason == "first"

    # reopened to version 2: the version-1 object still cannot complete it
    send(ingest, [g.ct_slice("ct1", 25)], "a2")
    assert series_of(db, "ct1").version == 2
    with db.session() as s:
        assert complete_series(s, stale, "stale", settings) is None
    assert series_of(db, "ct1").state == "receiving"
    assert len(jobs(db)) == 1


def test_concurrent_quiet_passes_make_one_job(ingest: Ingest, db: Database, settings: Settings) -> None:
    send(ingest, g.ct_series("ct1", 25, skip=[12]), "a1")
    ser = series_of(db, "ct1")
    when = after_quiet(ser, 1)
    barrier = threading.Barrier(3)
    done: list[list[int]] = []

    def quiet_pass() -> None:
        barrier.wait(timeout=5)
        done.append(finish_quiet(db, settings, now=when))

    threads = [threading.Thread(target=quiet_pass) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(done) == [[], [], [ser.id]]
    assert len(jobs(db)) == 1


# ------------------------------------------------------------------------------ check_geometry


def _inst(pos: Sequence[float] | None, orientation: Sequence[float] | None = g.AXIAL,
          number: int | None = None, rows: int = 8, cols: int = 8, expected: int | None = None,
          frames: int | None = None, is_image: bool = True) -> Instance:
    return Instance(is_image=is_image, position=None if pos is None else list(pos),
                    orientation=None if orientation is None else list(orientation), instance_number=number,
                    rows=rows, columns=cols, expected_count=expected, frames=frames,
                    sop_class_uid=g.CT_IMAGE)


def _stack(n: int, spacing: float = 2.0, **kw: Any) -> list[Instance]:
    return [_inst([0.0, 0.0, k * spacing], number=k + 1, **kw) for k in range(n)]


def test_geometry_uniform_stack() -> None:
    geo = check_geometry(_stack(10), "CT")
    assert geo == Geometry(True, "10 slices, uniform 2.00 mm", 10, 2.0, (0.0, 0.0, 1.0))


def test_geometry_order_and_direction_do_not_matter() -> None:
    stack = _stack(10)[::-1]
    random.Random(3).shuffle(stack)
    assert check_geometry(stack, "CT").complete
    down = [_inst([0.0, 0.0, -2.0 * k], number=k + 1) for k in range(10)]
    assert check_geometry(down, "CT").spacing_mm == pytest.approx(2.0)


def test_geometry_duplicate_positions() -> None:
    stack = [*_stack(10), _inst([0.0, 0.0, 8.0], number=11)]
    geo = check_geometry(stack, "CT")
    assert (geo.complete, geo.reason, geo.count) == (False, "duplicate slice positions", 11)
    assert geo.spacing_mm is None


def test_geometry_mixed_orientations() -> None:
    stack = _stack(10)
    stack[4] = _inst([0.0, 0.0, 8.0], orientation=(1, 0, 0, 0, 0, -1), number=5)
    assert check_geometry(stack, "CT") == Geometry(False, "mixed orientations", 10)


def test_geometry_mixed_image_sizes() -> None:
    stack = _stack(10)
    stack[0] = _inst([0.0, 0.0, 0.0], number=1, rows=16)
    assert check_geometry(stack, "CT") == Geometry(False, "mixed image sizes", 10)


def test_geometry_single_slice() -> None:
    assert check_geometry(_stack(1), "CT") == Geometry(False, "a single slice", 1)


def test_geometry_without_image_plane() -> None:
    stack = [*_stack(5), _inst(None, number=6)]
    assert check_geometry(stack, "CT") == Geometry(False, "slices without Image Plane geometry", 6)


def test_geometry_degenerate_orientation() -> None:
    stack = [_inst([0.0, 0.0, 2.0 * k], orientation=(1, 0, 0, 1, 0, 0)) for k in range(5)]
    assert check_geometry(stack, "CT") == Geometry(False, "degenerate orientation", 5)


def test_geometry_oblique_uniform_is_complete() -> None:
    a = math.radians(20)
    orient = (1.0, 0.0, 0.0, 0.0, math.cos(a), math.sin(a))
    normal = (0.0, -math.sin(a), math.cos(a))
    # slices step along the normal, and the table also shifts in-plane: only the normal counts
    stack = [_inst([3.0 * k, 2.5 * k * normal[1], 2.5 * k * normal[2]], orientation=orient, number=k + 1)
             for k in range(12)]
    geo = check_geometry(stack, "CT")
    assert geo.complete and geo.reason == "12 slices, uniform 2.50 mm"
    assert geo.spacing_mm == pytest.approx(2.5)
    assert geo.normal == pytest.approx(normal)
    # complete, but not axial: routing says so
    facts_attrs = {"Modality": "CT", "BodyPartExamined": "HEAD"}
    from triage.route import SeriesFacts

    d = route(SeriesFacts(g.CT_IMAGE, True, facts_attrs, geo.count, geo.spacing_mm, geo.normal),
              default_rules())
    assert d.kind == "ignore" and "head CT, axial, 2.5-7 mm: not axial" in d.reason


def test_geometry_gap_tolerance() -> None:
    zs = [0.0, 2.0, 4.05, 6.05, 8.0]  # gaps 2.0/2.05/2.0/1.95: within 5 %
    assert check_geometry([_inst([0, 0, z], number=k + 1) for k, z in enumerate(zs)], "CT").complete
    zs = [0.0, 2.0, 4.3, 6.3, 8.3]  # a 2.3 mm gap: not uniform
    geo = check_geometry([_inst([0, 0, z], number=k + 1) for k, z in enumerate(zs)], "CT")
    assert not geo.complete and geo.reason.startswith("non-uniform slice gaps")
    assert check_geometry([_inst([0, 0, z], number=k + 1) for k, z in enumerate(zs)], "CT",
                          tolerance=0.2).complete


def test_geometry_images_in_acquisition() -> None:
    assert check_geometry(_stack(10, expected=10), "CT").complete
    assert check_geometry(_stack(10, expected=12), "CT").reason == "10 of 12 images (Images in Acquisition)"


def test_geometry_instance_numbers_missing_are_not_checked() -> None:
    stack = [_inst([0.0, 0.0, 2.0 * k]) for k in range(6)]
    assert check_geometry(stack, "CT").complete


def test_geometry_projection_multiframe_and_non_images() -> None:
    assert check_geometry([_inst(None, None)], "CR") == Geometry(True, "projection or multi-frame images", 1)
    assert check_geometry([_inst(None, None, frames=40)], "US").complete
    assert check_geometry([_inst(None, None, is_image=False)], "SR") == Geometry(True, "no images", 1)
    assert check_geometry([], "CT") == Geometry(True, "no images", 0)


# ------------------------------------------------------------------------------ ingest refusals


def _offset(data: bytes, group: int, element: int) -> int:
    tag = group.to_bytes(2, "little") + element.to_bytes(2, "little")
    at = data.find(tag, 132)
    assert at > 0
    return at


def assert_refused(o: StoreOutcome, status: int, reason: str, db: Database, blobs: BlobStore) -> None:
    assert (o.status, o.reason) == (status, reason)
    assert o.series_id is None and o.instance_id is None
    assert count(db, Instance) == 0 and count(db, Series) == 0 and count(db, Study) == 0
    assert files_under(blobs.root) == []


def test_not_dicom(ingest: Ingest, db: Database, blobs: BlobStore) -> None:
    o = ingest.store(b"GET / HTTP/1.1\r\n" * 20, association_id="a")
    assert_refused(o, 0xC001, "cannot parse the data set (InvalidDicomError)", db, blobs)


def test_truncated_before_the_dicm_prefix(ingest: Ingest, db: Database, blobs: BlobStore) -> None:
    o = ingest.store(g.ct_slice("ct1", 0)[:100], association_id="a")
    assert_refused(o, 0xC001, "cannot parse the data set (InvalidDicomError)", db, blobs)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(("cut", "status", "reason"), [
    # pydicom stops quietly at the end of the bytes: what is missing decides the status
    (lambda d: 200, 0xC002, "missing SOPClassUID"),  # inside the file meta
    # in the SOP Class UID value: its declared length runs past the end of the bytes
    (lambda d: _offset(d, 0x0008, 0x0016) + 12, 0xC001,
     "the data set is truncated (its last element is cut short)"),
    (lambda d: _offset(d, 0x0020, 0x000D), 0xC002, "missing SeriesInstanceUID"),
    (lambda d: _offset(d, 0x7FE0, 0x0010), 0xA900, "image SOP class without pixel data"),
    (lambda d: _offset(d, 0x7FE0, 0x0010) + 12 + 100, 0xA900,
     "pixel data has 100 bytes, the header needs 128"),
], ids=["file-meta", "sop-class-value", "before-study-uid", "before-pixel-data", "in-pixel-data"])
def test_truncated_instance(ingest: Ingest, db: Database, blobs: BlobStore, cut: Any, status: int,
                            reason: str) -> None:
    data = g.ct_slice("ct1", 0)
    o = ingest.store(data[:cut(data)], association_id="a")
    assert_refused(o, status, reason, db, blobs)


def test_pixel_data_shorter_than_the_header_says(ingest: Ingest, db: Database, blobs: BlobStore) -> None:
    o = ingest.store(g.ct_slice("ct1", 0, pixel_data=bytes(64)), association_id="a")
    assert_refused(o, 0xA900, "pixel data has 64 bytes, the header needs 128", db, blobs)


def test_image_without_pixel_data(ingest: Ingest, db: Database, blobs: BlobStore) -> None:
    o = ingest.store(g.ct_slice("ct1", 0, with_pixels=False), association_id="a")
    assert_refused(o, 0xA900, "image SOP class without pixel data", db, blobs)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize(("bad", "reason"), [
    ("1.2.3/../../../../etc/passwd", "malformed SOPInstanceUID (characters other than digits and dots)"),
    ("../../x", "malformed SOPInstanceUID (characters other than digits and dots)"),
    ("1." + "2" * 198, "malformed SOPInstanceUID (200 characters)"),
    ("", "missing SOPInstanceUID"),
], ids=["dotdot", "relative", "200-chars", "empty"])
def test_malformed_sop_instance_uid(ingest: Ingest, db: Database, blobs: BlobStore, bad: str,
                                    reason: str) -> None:
    data = g.ct_slice("ct1", 0, extra={"SOPInstanceUID": bad})
    o = ingest.store(data, association_id="a")
    assert_refused(o, 0xC002, reason, db, blobs)
    assert [p for p in blobs.root.rglob("*")] == []  # not even a folder
    assert not (blobs.root.parent / "etc").exists()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_malformed_series_uid(ingest: Ingest, db: Database, blobs: BlobStore) -> None:
    o = ingest.store(g.ct_slice("ct1", 0, extra={"SeriesInstanceUID": "1.2.x"}), association_id="a")
    assert_refused(o, 0xC002, "malformed SeriesInstanceUID (characters other than digits and dots)", db,
                   blobs)


def test_huge_dimensions_are_refused_before_decoding(ingest: Ingest, db: Database, blobs: BlobStore) -> None:
    data = g.ct_slice("ct1", 0, rows=60000, cols=60000, pixel_data=bytes(128))
    o = ingest.store(data, association_id="a")
    assert_refused(o, 0xC003, "image 60000 x 60000 exceeds the limit of 16384 per side", db, blobs)


@pytest.mark.parametrize("frames", ["0", "5000"])
def test_frame_count_outside_limits(ingest: Ingest, db: Database, blobs: BlobStore, frames: str) -> None:
    o = ingest.store(g.ct_slice("ct1", 0, extra={"NumberOfFrames": frames}), association_id="a")
    assert_refused(o, 0xC003, f"NumberOfFrames {frames} outside 1..4096", db, blobs)


def test_sop_class_differs_from_the_negotiated_one(ingest: Ingest, db: Database, blobs: BlobStore) -> None:
    o = ingest.store(g.ct_slice("ct1", 0), negotiated_sop_class=g.CR_IMAGE, association_id="a")
    assert_refused(o, 0xA900, "SOP Class UID in the data set differs from the negotiated one", db, blobs)
    ok = ingest.store(g.ct_slice("ct1", 0), negotiated_sop_class=g.CT_IMAGE, association_id="a")
    assert ok.status == 0


def test_disk_above_the_high_water_mark(db: Database, blobs: BlobStore) -> None:
    full = Ingest(db, blobs, high_water=0.000001)
    o = full.store(g.ct_slice("ct1", 0), association_id="a")
    assert o.status == 0xA700
    assert o.reason is not None and "high-water mark" in o.reason
    assert count(db, Instance) == 0 and count(db, Series) == 0
    assert files_under(blobs.root) == []
    # with room again, the retry is stored
    assert Ingest(db, blobs).store(g.ct_slice("ct1", 0), association_id="a").status == 0
    assert count(db, Instance) == 1


def test_a_stored_instance_is_indexed_as_received(ingest: Ingest, db: Database, blobs: BlobStore) -> None:
    data = g.ct_slice("ct1", 4, images_in_acquisition=25)
    (o,) = send(ingest, [data], "assoc-x")
    with db.sessions() as s:
        inst = s.get(Instance, o.instance_id)
        assert inst is not None
        assert blobs.get(inst.blob) == data
        assert g.uid("ct1", "slice", 4) not in inst.blob
        assert (inst.rows, inst.columns, inst.instance_number, inst.expected_count) == (8, 8, 5, 25)
        assert inst.position == [-4.0, -4.0, 8.0]
        assert inst.orientation == list(g.AXIAL)
        assert (inst.association_id, inst.transfer_syntax_uid, inst.is_image) == (
            "assoc-x", "1.2.840.10008.1.2.1", True)
        study = s.scalars(select(Study)).one()
        assert study.study_description == "CT CHEST"


# ------------------------------------------------------------------ compressed and truncated objects


def test_encapsulated_pixel_data_is_accepted(ingest: Ingest) -> None:
    import io

    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(io.BytesIO(g.ct_slice("ct1", 0)))
    ds.PixelData = encapsulate([bytes(200)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = RLELossless
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    o = ingest.store(buf.getvalue(), transfer_syntax=RLELossless, association_id="a")
    assert o.status == 0, o.reason
    # the same object cut inside its fragments (no sequence delimiter) is refused
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = g.uid("ct1", "cut")
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    o = ingest.store(buf.getvalue()[:-60], transfer_syntax=RLELossless, association_id="a")
    assert (o.status, o.reason) == (0xA900, "encapsulated pixel data is truncated (no sequence delimiter)")


def test_truncated_non_image_is_refused(ingest: Ingest) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    ds = Dataset()
    ds.SOPClassUID = g.BASIC_TEXT_SR
    ds.SOPInstanceUID = g.uid("sr", 1)
    ds.StudyInstanceUID = g.uid("sr", "study")
    ds.SeriesInstanceUID = g.uid("sr")
    ds.Modality = "SR"
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = "x" * 400
    ds.ContentSequence = DicomSequence([item])
    data = g.to_bytes(ds)
    o = ingest.store(data[:-300], association_id="a")
    assert o.status == 0xC001
