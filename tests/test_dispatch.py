"""The delivery outbox against real peers: dcmtk's storescp, and pynetdicom SCPs that misbehave."""

from __future__ import annotations

import datetime as dt
import io
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nodekit import free_port, require_tool, wait_for
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from sqlalchemy import select
from test_receive import ct_slice

from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Delivery, Job, Result, Series, Study
from triage.config import DispatchSettings, load_settings
from triage.dispatch import Sender, backoff_seconds, plan_deliveries


def _cfg(**dests: int) -> DispatchSettings:
    s = load_settings(dispatch={
        "destinations": [{"name": n, "ae_title": "PEER", "host": "127.0.0.1", "port": p}
                         for n, p in dests.items()],
        "backoff_initial_seconds": 2, "timeout_seconds": 3, "jitter": 0.2})
    return s.dispatch


def _result(db: Database, blobs: BlobStore, n_objects: int = 2, priority: int = 3
            ) -> tuple[Result, list[dict[str, Any]]]:
    """A Result row with ``n_objects`` stored output objects (CT slices stand in for SR/SEG)."""
    series, study = generate_uid(), generate_uid()
    outputs = []
    for k in range(n_objects):
        ds = ct_slice(k, n_objects, series=series, study=study)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        key = blobs.key("output", str(ds.SOPInstanceUID))
        blobs.put(key, buf.getvalue())
        outputs.append({"what": f"o{k}", "sop_class": CTImageStorage, "sop_instance": str(ds.SOPInstanceUID),
                        "series": series, "blob": key})
    with db.session() as s:
        st = Study(study_instance_uid=study)
        s.add(st)
        s.flush()
        se = Series(study_id=st.id, series_instance_uid=series, modality="CT")
        s.add(se)
        s.flush()
        job = Job(series_id=se.id, series_version=1, kind="chestct", state="done")
        s.add(job)
        s.flush()
        r = Result(job_id=job.id, series_id=se.id, version=1, kind="chestct", bundle_name="b",
                   bundle_version="1", bundle_fingerprint="f" * 64, method="m", score=1.0, abnormal=True,
                   priority=priority, report_state="ready", outputs=outputs)
        s.add(r)
        s.flush()
    return r, outputs


@pytest.fixture()
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture()
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    exe = require_tool("storescp", "dcmtk")
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    proc = subprocess.Popen([exe, "-aet", "PEER", "-od", str(out), "+B", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    yield port, out
    proc.terminate()
    proc.wait(timeout=10)


def _rows(db: Database) -> list[Delivery]:
    with db.sessions() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def test_delivers_to_storescp_once(db: Database, blobs: BlobStore, storescp: tuple[int, Path]) -> None:
    port, out = storescp
    cfg = _cfg(pacs=port)
    r, outputs = _result(db, blobs)
    with db.session() as s:
        assert plan_deliveries(s, s.get(Result, r.id), outputs, cfg) == 2  # type: ignore[arg-type]
    with db.session() as s:  # planning again adds nothing (unique per object and destination)
        assert plan_deliveries(s, s.get(Result, r.id), outputs, cfg) == 0  # type: ignore[arg-type]
    sender = Sender(db, blobs, cfg)
    assert sender.echo_all() == {"pacs": None}
    assert sender.run_once() == {"dead": 0, "sent": 2, "failed": 0}
    assert [(d.state, d.attempts) for d in _rows(db)] == [("sent", 1), ("sent", 1)]
    assert len(list(out.iterdir())) == 2
    assert sender.run_once()["sent"] == 0  # nothing is sent twice


def _bad_scp(handler: Any, *, require_called: str | None = None) -> tuple[AE, int]:
    ae = AE(ae_title="PEER")
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    if require_called is not None:
        ae.require_called_aet = True
        ae.ae_title = require_called
    port = free_port()
    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)])
    return ae, port


@pytest.mark.parametrize(("mode", "error"), [
    ("refuses", "association rejected"),
    ("failure", "C-STORE status 0xA700 (disk full)"),
    ("timeout", "no response (timeout)"),
    ("down", "no association"),
])
def test_failures_back_off_then_arrive(sqlite_db: Database, blobs: BlobStore, mode: str, error: str) -> None:
    db = sqlite_db

    def failing(event: Any) -> Any:
        if mode == "timeout":
            time.sleep(6)
            return 0
        from pydicom.dataset import Dataset
        st = Dataset()
        st.Status, st.ErrorComment = 0xA700, "disk full"
        return st

    ae, port = (None, free_port()) if mode == "down" else _bad_scp(
        failing, require_called="OTHER" if mode == "refuses" else None)
    cfg = _cfg(pacs=port)
    r, outputs = _result(db, blobs, n_objects=1)
    with db.session() as s:
        plan_deliveries(s, s.get(Result, r.id), outputs, cfg)  # type: ignore[arg-type]
    sender = Sender(db, blobs, cfg)
    t0 = time.monotonic()
    assert sender.run_once()["failed"] == 1
    assert time.monotonic() - t0 < 15
    (d,) = _rows(db)
    assert (d.state, d.attempts) == ("pending", 1) and error in (d.last_error or "")
    wait = (d.next_attempt_at - d.created_at).total_seconds()
    assert 1.0 < wait < 15
    assert sender.run_once()["failed"] == 0  # not due yet: nothing is tried
    if ae is not None:
        ae.shutdown()
    # the destination comes back (a good SCP on the same port): the next due pass delivers it
    got: list[str] = []

    def ok(event: Any) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    good = AE(ae_title="PEER")
    good.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    good.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, ok)])
    try:
        sender2 = Sender(db, blobs, cfg)  # e.g. after a restart of the node: rows, not memory
        wait_for(lambda: sender2.run_once()["sent"] == 1, 30, "the retried delivery", interval=0.5)
        (d,) = _rows(db)
        assert (d.state, d.attempts) == ("sent", 2) and got == [d.sop_instance_uid]
    finally:
        good.shutdown()


def test_dead_letter_and_retry(sqlite_db: Database, blobs: BlobStore) -> None:
    db = sqlite_db
    cfg = _cfg(pacs=free_port())
    r, outputs = _result(db, blobs, n_objects=1)
    with db.session() as s:
        plan_deliveries(s, s.get(Result, r.id), outputs, cfg)  # type: ignore[arg-type]
    sender = Sender(db, blobs, cfg)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=cfg.max_age_seconds + 1)
    assert sender.run_once(now=later)["dead"] == 1
    (d,) = _rows(db)
    assert d.state == "dead"
    assert sender.run_once()["failed"] == 0  # a dead letter is not retried by itself
    assert sender.retry(d.id)
    (d,) = _rows(db)
    assert d.state == "pending" and d.next_attempt_at <= dt.datetime.now(dt.UTC)
    assert sender.cancel(d.id) and _rows(db)[0].state == "cancelled"


def test_urgent_destination_gets_only_high_priority(sqlite_db: Database, blobs: BlobStore) -> None:
    db = sqlite_db
    s0 = load_settings(dispatch={"destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        {"name": "urgent", "ae_title": "WS", "host": "127.0.0.1", "port": 105, "min_priority": 1}]})
    low, lo_out = _result(db, blobs, n_objects=1, priority=3)
    high, hi_out = _result(db, blobs, n_objects=1, priority=1)
    with db.session() as s:
        assert plan_deliveries(s, s.get(Result, low.id), lo_out, s0.dispatch) == 1  # type: ignore[arg-type]
        assert plan_deliveries(s, s.get(Result, high.id), hi_out, s0.dispatch) == 2  # type: ignore[arg-type]
    assert sorted((d.result_id, d.destination) for d in _rows(db)) == [
        (low.id, "pacs"), (high.id, "pacs"), (high.id, "urgent")]


def test_backoff_doubles_with_jitter_and_a_cap() -> None:
    cfg = _cfg()
    rng = random.Random(0)
    delays = [[backoff_seconds(a, cfg, rng) for _ in range(200)] for a in (1, 2, 3, 10, 20)]
    for a, ds in zip((1, 2, 3), delays, strict=False):
        base = 2 * 2 ** (a - 1)
        assert base * 0.8 <= min(ds) and max(ds) <= base * 1.2
        assert max(ds) - min(ds) > 0.2 * base  # spread out, not all at once
    assert max(delays[-1]) <= cfg.backoff_max_seconds * 1.2


def test_cli_lists_and_retries_dead_letters(sqlite_db: Database, blobs: BlobStore,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from triage.cli import app

    db = sqlite_db
    cfg = _cfg(pacs=free_port())
    r, outputs = _result(db, blobs, n_objects=1)
    with db.session() as s:
        plan_deliveries(s, s.get(Result, r.id), outputs, cfg)  # type: ignore[arg-type]
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=cfg.max_age_seconds + 1)
    Sender(db, blobs, cfg).run_once(now=later)
    monkeypatch.setenv("TRIAGE_STORAGE__DATABASE_URL", db.url)
    monkeypatch.setenv("TRIAGE_STORAGE__BLOB_ROOT", str(blobs.root))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    res = runner.invoke(app, ["deliveries", "list", "--state", "dead"])
    assert res.exit_code == 0 and "dead" in res.output and "CT Image Storage" in res.output
    (d,) = _rows(db)
    res = runner.invoke(app, ["deliveries", "retry", str(d.id)])
    assert res.exit_code == 0, res.output
    assert _rows(db)[0].state == "pending"
    res = runner.invoke(app, ["deliveries", "retry", "999"])
    assert res.exit_code == 2 and "cannot retry deliveries [999]" in res.output
