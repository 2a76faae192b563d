"""A full disk: the node refuses with 0xA700, loses nothing it acknowledged, and recovers by itself.

The node's data directory (SQLite index and blobs) lives on a small tmpfs mounted by the
test, so the disk really fills: another process takes every free byte while four senders
push, then frees it again. Mounting needs root (CAP_SYS_ADMIN); elsewhere the test is
skipped with that reason (the README lists it as optional).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodekit import Pusher, echo_ok, free_port, storescu, wait_for
from sqlalchemy import func, select
from test_receive import write_series

from flows.bundle import Bundle
from storage.models import Instance, Job, Result, Series
from triage.config import load_settings
from triage.serve import Node


@contextlib.contextmanager
def _tmpfs(where: Path, size_mb: int) -> Iterator[Path]:
    where.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting the small file system this test fills needs root (optional test)")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}): needs CAP_SYS_ADMIN (optional test)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(path: Path) -> int:
    """Take every free byte of the file system, as a runaway process would; returns bytes taken."""
    n = 0
    with path.open("wb", buffering=0) as fh:
        for chunk in (1 << 20, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    n += fh.write(block) or 0
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return n


@pytest.mark.faults
def test_full_disk_answers_a700_loses_nothing_and_recovers(tmp_path: Path, ct_bundle: Bundle) -> None:
    folders = [tmp_path / f"series{i}" for i in range(4)]
    files = [write_series(f, 120, size=32, spacing=1.0) for f in folders]
    with _tmpfs(tmp_path / "small", 24) as mnt:
        port = free_port()
        s = load_settings(node={"data_dir": str(mnt / "data")}, receive={"port": port},
                          # high_water 1.0: the disk itself says when it is full, not the guard
                          storage={"high_water": 1.0},
                          assemble={"quiet_seconds": 120.0, "poll_seconds": 0.2},
                          executor={"poll_seconds": 0.2}, models={"chestct": str(ct_bundle.path)})
        node = Node(s).start()
        filler = mnt / "runaway.bin"
        try:
            scp_pid = node.pid_file.read_text()
            pushers = [Pusher(port, f, aet=f"PUSHER{i}") for i, f in enumerate(files)]
            for p in pushers:
                p.start()
            wait_for(lambda: sum(len(p.acked) for p in pushers) >= 120, 60, "120 acknowledged instances",
                     interval=0.01)
            taken = _fill(filler)
            for p in pushers:
                p.join(timeout=120)
                assert not p.is_alive(), "a sender hangs on the full disk"
            statuses = [st for p in pushers for st in p.statuses.values()]
            acked = [u for p in pushers for u in p.acked]
            refused = [st for st in statuses if st != 0]
            assert len(statuses) == 480, "a sender lost its association on the full disk"
            assert 120 <= len(acked) < 480 and refused, (len(acked), taken)
            assert set(refused) == {0xA700}, {f"0x{st or 0:04X}" for st in refused}
            # the SCP kept running and answers; nothing acknowledged is missing or damaged
            assert node.pid_file.read_text() == scp_pid
            assert echo_ok(port)
            with node.db.sessions() as ss:
                rows = {r.sop_instance_uid: r for r in ss.scalars(select(Instance))}
            missing = [u for u in acked if u not in rows]
            assert not missing, f"{len(missing)} of {len(acked)} acknowledged instance(s) not indexed"
            for u in acked:
                assert hashlib.sha256((s.blob_root / rows[u].blob).read_bytes()).hexdigest() == rows[u].sha256
            orphans = {p.name for p in s.blob_root.rglob("*") if p.is_file()} - {
                Path(r.blob).name for r in rows.values()}
            assert not orphans, f"files without an index row: {sorted(orphans)[:3]}"

            # space returns: with no restart, the senders' re-push is taken and analysed once
            filler.unlink()
            for f in folders:
                storescu(port, [f])
            wait_for(lambda: _count(node, Result) == 4, 180, "the 4 series' results")
            assert node.pid_file.read_text() == scp_pid
            with node.db.sessions() as ss:
                assert ss.scalar(select(func.count()).select_from(Instance)) == 480
                series = ss.scalars(select(Series)).all()
                assert sorted(se.instance_count for se in series) == [120] * 4
                assert {(se.version, se.kind, se.state) for se in series} == {(1, "chestct", "complete")}
                assert [j.state for j in ss.scalars(select(Job))] == ["done"] * 4
            db_file = Path(s.database_url.removeprefix("sqlite:///"))
            with contextlib.closing(sqlite3.connect(db_file)) as con:
                assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        finally:
            node.stop()
            filler.unlink(missing_ok=True)


def _count(node: Node, table: type) -> int:
    with node.db.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)
