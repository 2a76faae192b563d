"""Fault: the database (PostgreSQL) is stopped for a while under a running node.

Promise (docs/reliability.md rows 1, 2 and 11): what cannot be indexed is refused with
0xA700 (Out of Resources, "database unavailable"), never acknowledged; the SCP process and
the node's threads stay up; when PostgreSQL returns, the same node (not restarted) stores
again, the refused instances re-sent are stored, and every series is analysed once.

C-ECHO stays answered with 0x0000 during the outage, on an open association and on a new
one (docs/conformance.md: "C-ECHO is always answered 0x0000"): Verification says the DICOM
peer is there, and it is; each C-STORE then says, with a status the sender retries, that
it cannot take the instance now. Associations are not rejected for it.

The outage uses a private PostgreSQL cluster (``initdb`` into a temporary directory, trust
auth, a free port on 127.0.0.1), never the shared server on port 5432 the other tests use.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pwd
import random
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pydicom
import pytest
from nodekit import cxr_studies, echo_ok, free_port, wait_for
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from flows.bundle import Bundle
from storage.db import Database
from storage.models import Instance, Job, Result, Series
from triage.config import load_settings
from triage.serve import Node

OUT_OF_RESOURCES = 0xA700


# --------------------------------------------------------------------------- a private cluster


def _pg_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres (the newest installed server)."""
    found = shutil.which("initdb")
    if found is None:
        def version(p: str) -> tuple[int, ...]:
            return tuple(int(x) for x in re.findall(r"\d+", p.split("/")[-3]))
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
        found = candidates[-1] if candidates else None
    if found is None:
        pytest.fail("initdb is missing (neither on PATH nor in /usr/lib/postgresql/*/bin): install the "
                    "PostgreSQL server with `apt-get install postgresql` (scripts/test does this on Debian)",
                    pytrace=False)
    bindir = Path(os.path.realpath(found)).parent
    for tool in ("pg_ctl", "postgres"):
        if not (bindir / tool).is_file():
            pytest.fail(f"{tool} is missing beside {bindir / 'initdb'}: install the PostgreSQL server with "
                        "`apt-get install postgresql`", pytrace=False)
    return bindir


def _port_outside_ephemeral() -> int:
    """A free port below the ephemeral range: while the server is stopped, no client socket of
    this machine can be given it as its local port, so the restart can bind it again."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


@dataclass
class PrivatePostgres:
    """A throw-away PostgreSQL cluster that the test may stop and start at will."""

    bindir: Path
    base: Path  # owned by the server's user: data directory, socket, log
    port: int
    run_as: str | None  # "postgres" when the tests run as root (initdb/postgres refuse root)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/triage"

    def _run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.run_as is not None:
            runuser = shutil.which("runuser")
            cmd = ([runuser, "-u", self.run_as, "--", *cmd] if runuser
                   else ["su", self.run_as, "-s", "/bin/sh", "-c", shlex.join(cmd)])
        # cwd: the server's user may not be allowed into the repository's directory
        res = subprocess.run(cmd, cwd=self.base, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""
            pytest.fail(f"{shlex.join(args)} failed ({res.returncode}):\n{res.stdout[-1000:]}"
                        f"{res.stderr[-2000:]}\nserver log:\n{tail}", pytrace=False)
        return res

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")

    def start(self) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.base} "
                "-c fsync=off -c max_connections=50")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")

    def stop(self) -> None:
        """``-m fast``: open sessions are terminated, as when an operator stops the service."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test alone, with an empty database ``triage``."""
    bindir = _pg_bindir()
    run_as = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("the tests run as root, and initdb/postgres refuse to run as root; there is no "
                        "'postgres' user to run them as: create it (`apt-get install postgresql` does, or "
                        "`useradd --system postgres`) or run the tests as an ordinary user", pytrace=False)
        run_as = "postgres"
    # under the system temporary directory (pytest's tmp_path is closed to other users)
    base = Path(tempfile.mkdtemp(prefix="triage-pg-"))
    if run_as is not None:
        os.chown(base, user.pw_uid, user.pw_gid)
    pg = PrivatePostgres(bindir=bindir, base=base, port=_port_outside_ephemeral(), run_as=run_as)
    try:
        pg.init()
        pg.start()
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", autocommit=True,
                             connect_timeout=10) as conn:
            conn.execute("CREATE DATABASE triage ENCODING 'UTF8' TEMPLATE template0")
        yield pg
    finally:
        if pg.data.is_dir() and pg.running():
            res = pg._run("pg_ctl", "-D", str(pg.data), "-m", "immediate", "-w", "-t", "30", "stop",
                          check=False)
            if res.returncode != 0:
                print(f"private PostgreSQL did not stop: {res.stderr}")
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- pushing


@dataclass(frozen=True)
class Sent:
    uid: str
    series: str
    status: int
    comment: str


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def _ae(files: Sequence[Path]) -> AE:
    ae = AE(ae_title="FAULTPACS")
    contexts = set()
    for p in files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        contexts.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    for sop, ts in sorted(contexts):
        ae.add_requested_context(sop, ts)
    ae.add_requested_context(Verification)
    return ae


def _send(assoc: object, p: Path) -> Sent:
    ds = pydicom.dcmread(p, stop_before_pixels=True)
    st = assoc.send_c_store(p)  # type: ignore[attr-defined]
    assert st is not None and "Status" in st, "no C-STORE response (the association was lost)"
    return Sent(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), int(st.Status),
                str(st.get("ErrorComment", "")))


def _echo(assoc: object) -> int:
    st = assoc.send_c_echo()  # type: ignore[attr-defined]
    assert st is not None and "Status" in st, "no C-ECHO response (the association was lost)"
    return int(st.Status)


def _push(port: int, files: Sequence[Path]) -> tuple[list[Sent], list[int]]:
    """One association: C-ECHO, every file, C-ECHO, release. Returns the stores and echoes."""
    assoc = _ae(files).associate("127.0.0.1", port, ae_title="TRIAGE")
    assert assoc.is_established, "the association was not accepted"
    try:
        echoes = [_echo(assoc)]
        sent = [_send(assoc, p) for p in files]
        echoes.append(_echo(assoc))
    finally:
        assoc.release()
    assert assoc.is_released, "the association was not released cleanly"
    return sent, echoes


def _statuses(sent: Sequence[Sent]) -> list[str]:
    return sorted({f"0x{s.status:04X} {s.comment}".strip() for s in sent})


# --------------------------------------------------------------------------- the test


def _counts(db: Database) -> dict[str, int]:
    with db.sessions() as s:
        return {
            "indexed": s.scalar(select(func.count()).select_from(Instance)) or 0,
            "series": s.scalar(select(func.count()).select_from(Series)) or 0,
            "complete": s.scalar(select(func.count()).select_from(Series).where(Series.state == "complete"))
            or 0,
            "jobs done": s.scalar(select(func.count()).select_from(Job).where(Job.state == "done")) or 0,
            "results": s.scalar(select(func.count()).select_from(Result)) or 0,
        }


def _node_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.is_alive()}


@pytest.mark.faults
def test_postgres_stopped_scp_refuses_with_a700_and_recovers(
        tmp_path: Path, private_postgres: PrivatePostgres, tiny_bundle: Bundle,
        caplog: pytest.LogCaptureFixture) -> None:
    t0 = time.monotonic()
    pg = private_postgres
    # Each CXR study is one single-image series (complete at its association's release).
    before = _files(cxr_studies(tmp_path / "before", n=2, seed=81))  # stored and analysed before
    across = _files(cxr_studies(tmp_path / "across", n=4, seed=82))  # one association spans the stop
    during = _files(cxr_studies(tmp_path / "during", n=2, seed=83))  # a new association in the outage
    after = _files(cxr_studies(tmp_path / "after", n=2, seed=84))  # new studies once it is back
    everything = [*before, *across, *during, *after]
    n_series = len(everything)
    port = free_port()
    s = load_settings(node={"data_dir": str(tmp_path / "data")}, storage={"database_url": pg.url},
                      receive={"port": port}, assemble={"quiet_seconds": 3.0, "poll_seconds": 0.2},
                      executor={"poll_seconds": 0.2, "heartbeat_seconds": 1.0},
                      models={"cxr": str(tiny_bundle.path)}, web={"enabled": False})
    assert s.database_url == pg.url
    caplog.set_level("WARNING")
    node = Node(s).start()
    db = node.db
    acked: dict[str, Sent] = {}  # SOP Instance UID -> the 0x0000 answer
    outage: list[Sent] = []
    try:
        scp_pid = int(node.pid_file.read_text())
        threads = {"assembler", "executor-0", "delivery", "heartbeat", "scp-watch"}
        assert threads <= _node_threads()

        # 1. the database is up: stored, acknowledged, indexed, analysed
        sent, echoes = _push(port, before)
        assert [x.status for x in sent] == [0] * len(before) and echoes == [0, 0]
        acked |= {x.uid: x for x in sent}
        wait_for(lambda: _counts(db)["results"] == len(before) or None, 60, "the first series' results")

        # 2. an association open across the stop: acknowledged before it, refused after it
        ae = _ae(across)
        assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
        assert assoc.is_established
        try:
            first = _send(assoc, across[0])
            assert first.status == 0, first
            acked[first.uid] = first
            pg.stop()
            t_stop = time.monotonic()
            outage += [_send(assoc, p) for p in across[1:]]
            echo_open = _echo(assoc)
        finally:
            assoc.release()
        assert assoc.is_released, "the association open across the stop was not released cleanly"

        # 3. a new association during the outage: accepted, C-ECHO answered, every store refused
        sent, echoes = _push(port, during)
        outage += sent

        # ... and the outage lasts: every loop of the node meets it (assembler, executor,
        # heartbeat, delivery) for longer than the quiet period
        time.sleep(max(0.0, s.assemble.quiet_seconds + 2.0 - (time.monotonic() - t_stop)))
        seen_in_outage = _statuses(outage)
        assert not [x for x in outage if x.status == 0], f"acknowledged while PostgreSQL was down: {outage}"
        assert all(x.status == OUT_OF_RESOURCES and x.comment.startswith("database unavailable")
                   for x in outage), seen_in_outage
        assert echo_open == 0 and echoes == [0, 0], "C-ECHO not answered 0x0000 during the outage"
        assert len(outage) == len(across) - 1 + len(during)
        # the SCP process is the same one (no crash, no restart) and the node's threads live on
        assert node._scp is not None and node._scp.is_alive() and node._scp.pid == scp_pid
        assert int(node.pid_file.read_text()) == scp_pid
        assert threads <= _node_threads()
        assert echo_ok(port)
        failures = [r.getMessage() for r in caplog.records
                    if r.getMessage() in ("assembler pass failed", "executor pass failed")
                    or r.getMessage().startswith("heartbeat failed")]
        assert failures, "the node's loops never met the outage (was the database really down?)"
        t_outage = time.monotonic() - t_stop

        # 4. PostgreSQL returns; the same node, not restarted
        pg.start()
        t_back = time.monotonic()
        sent, echoes = _push(port, after)
        assert [(x.status, x.comment) for x in sent] == [(0, "")] * len(after), _statuses(sent)
        acked |= {x.uid: x for x in sent}
        resend = [*across[1:], *during]  # what the outage refused, sent again by the "PACS"
        sent, echoes = _push(port, resend)
        assert [(x.status, x.comment) for x in sent] == [(0, "")] * len(resend), _statuses(sent)
        acked |= {x.uid: x for x in sent}
        assert {x.uid for x in outage} <= set(acked)

        # every series completes and is analysed once
        wait_for(lambda: _counts(db)["results"] >= n_series or None, 90, f"{n_series} results")
        time.sleep(1.0)  # a duplicate analysis would show up now
        t_done = time.monotonic()
        counts = _counts(db)
        with db.sessions() as ss:
            rows = {r.sop_instance_uid: r for r in ss.scalars(select(Instance))}
            per_series = list(ss.execute(select(Result.series_id, func.count()).group_by(Result.series_id)))
            series = list(ss.scalars(select(Series)))
            jobs = list(ss.scalars(select(Job)))
        missing = [u for u in acked if u not in rows]
        assert not missing, f"{len(missing)} acknowledged instance(s) not indexed"
        for u in acked:
            blob = s.blob_root / rows[u].blob
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == rows[u].sha256
        assert len(acked) == counts["indexed"] == n_series
        assert counts["series"] == counts["complete"] == n_series
        assert {se.state for se in series} == {"complete"}
        assert all(se.version == 1 and se.kind == "cxr" for se in series)
        # the series acknowledged just before the stop was released during the outage (its
        # early finish failed): the quiet period completed it; every other one completed at release
        reasons = {se.series_instance_uid: se.completion_reason or "" for se in series}
        assert reasons.pop(first.series).startswith("quiet for")
        assert all("association released" in r for r in reasons.values()), reasons
        assert len(jobs) == n_series and all(j.state == "done" and j.attempts == 1 for j in jobs), \
            [(j.state, j.attempts, j.reason) for j in jobs]
        assert counts["results"] == n_series and all(n == 1 for _, n in per_series)
        assert node._scp.is_alive() and node._scp.pid == scp_pid
        assert echo_ok(port)
        print(f"\nDB outage: {t_outage:.1f} s; refused during it: {len(outage)} ({seen_in_outage}); "
              f"acknowledged {len(acked)} / indexed {counts['indexed']} / series complete "
              f"{counts['complete']} / analysed {counts['results']} (jobs done {counts['jobs done']}); "
              f"recovery to all analysed {t_done - t_back:.1f} s; total {time.monotonic() - t0:.1f} s")
    finally:
        node.stop()
        with contextlib.suppress(Exception):
            db.dispose()


@pytest.mark.faults
def test_a_job_finishing_during_the_outage_records_its_outcome_when_postgres_returns(
        tmp_path: Path, private_postgres: PrivatePostgres) -> None:
    """A worker whose analysis ends while the database is away waits to record the outcome,
    rather than leaving the job 'running' until its lease expires and the analysis is redone."""
    from storage.migrate import upgrade
    from storage.models import Study
    from worker.tasks import NodeContext, _finish_durably

    s = load_settings(node={"data_dir": str(tmp_path / "data")},
                      storage={"database_url": private_postgres.url}, executor={"lease_seconds": 120})
    ctx = NodeContext(s)
    upgrade(ctx.db)
    with ctx.db.session() as ss:
        study = Study(study_instance_uid="1.2.3")
        ss.add(study)
        ss.flush()
        se = Series(study_id=study.id, series_instance_uid="1.2.3.4", state="complete", kind="cxr")
        ss.add(se)
        ss.flush()
        job = Job(series_id=se.id, series_version=1, kind="cxr", state="running", worker="w:1", attempts=1)
        ss.add(job)
        ss.flush()
        ss.expunge(job)
    private_postgres.stop()
    out: list[int | None] = []
    t = threading.Thread(target=lambda: out.append(
        _finish_durably(ctx, job, "w:1", "failed", "the series holds no images")))
    t.start()
    time.sleep(3.0)
    assert t.is_alive() and not out, "the outcome was not waiting for the database"
    private_postgres.start()
    t.join(timeout=60)
    assert out == [0]
    with ctx.db.sessions() as ss:
        done = ss.get(Job, job.id)
        assert done is not None and (done.state, done.reason) == ("failed", "the series holds no images")
    ctx.db.dispose()
