"""The Celery executor loses no job when the broker loses its messages or is not there at all.

The Job row is the truth and a broker message only says "look at job N": the dispatcher
publishes again every job still queued ``celery.republish_seconds`` after its last
publication, and a job it could not publish stays queued (``published_at`` NULL) until the
broker answers. These tests use a real Redis (``redis://127.0.0.1:6379/14`` or
``$TRIAGE_TEST_REDIS_URL``) and a real ``triage worker`` subprocess; the second one starts a
throwaway ``redis-server`` of its own, and the third stops that server half-way through a burst.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import redis
from nodekit import Pusher, cxr_studies, free_port, require_tool, stop_process, storescu, wait_for
from sqlalchemy import func, select

from flows.bundle import Bundle
from storage.db import Database
from storage.models import Instance, Job, Result, Series
from triage.config import Settings, load_settings
from triage.serve import Node

REDIS_URL = os.environ.get("TRIAGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


def _redis_or_fail(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis does not answer at {url} ({exc}); install and start it with "
                    "`apt-get install redis-server && redis-server --daemonize yes` (scripts/test does "
                    "this) or set TRIAGE_TEST_REDIS_URL", pytrace=False)
    return client


@pytest.fixture(scope="module")
def cxr_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cxr_studies(tmp_path_factory.mktemp("cxr"), n=1)


def _settings(tmp: Path, cxr: Bundle, broker_url: str) -> Settings:
    return load_settings(node={"data_dir": str(tmp / "data")}, receive={"port": free_port()},
                         assemble={"quiet_seconds": 3.0, "poll_seconds": 0.2},
                         executor={"kind": "celery", "poll_seconds": 0.2},
                         celery={"broker_url": broker_url, "republish_seconds": 2},
                         models={"cxr": str(cxr.path)})


@contextmanager
def _worker(s: Settings, cxr: Bundle, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``triage worker --queues gpu`` for the node of ``s``; its output goes to ``log_path``."""
    env = {**os.environ, "TRIAGE_NODE__DATA_DIR": str(s.node.data_dir),
           "TRIAGE_MODELS__CXR": str(cxr.path), "TRIAGE_CELERY__BROKER_URL": s.celery.broker_url,
           "TRIAGE_EXECUTOR__KIND": "celery"}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "triage.cli", "worker", "--concurrency", "1",
                                 "--queues", "gpu"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            stop_process(proc)


def _job(db: Database) -> Job | None:
    with db.sessions() as s:
        return s.scalars(select(Job)).one_or_none()


def _describe(job: Job | None) -> str:
    if job is None:
        return "no job"
    return ", ".join(f"{c.key}={getattr(job, c.key)!r}" for c in Job.__table__.columns)


def _results(db: Database) -> list[Result]:
    with db.sessions() as s:
        return list(s.scalars(select(Result)))


def _first_result(db: Database) -> Result | None:
    results = _results(db)
    return results[0] if results else None


def _published(db: Database) -> Job | None:
    job = _job(db)
    return job if job is not None and job.published_at is not None else None


def _wait_result(db: Database, log_path: Path, timeout: float = 60) -> Result:
    try:
        return wait_for(lambda: _first_result(db), timeout, "the job's Result")
    except AssertionError as exc:
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        raise AssertionError(f"{exc}; job: {_describe(_job(db))}\nworker log:\n{tail}") from None


@pytest.mark.faults
def test_flushed_broker_loses_no_job(tmp_path: Path, cxr_study: Path, tiny_bundle: Bundle) -> None:
    broker = _redis_or_fail(REDIS_URL)
    broker.flushdb()
    s = _settings(tmp_path, tiny_bundle, REDIS_URL)
    node = Node(s).start()
    try:
        # no worker yet: the dispatcher publishes the job and the message waits in Redis
        storescu(s.receive.port, [cxr_study])
        job = wait_for(lambda: _published(node.db), 30, "the job to be published")
        first = job.published_at
        assert job.state == "queued" and job.kind == "cxr"
        assert broker.llen("gpu") >= 1, "the published message is not in Redis"

        # Redis restarts without persistence: every queued message (and binding) is gone
        broker.flushdb()
        assert broker.dbsize() == 0

        log_path = tmp_path / "worker.log"
        with _worker(s, tiny_bundle, log_path):
            res = _wait_result(node.db, log_path)
            done = _job(node.db)
            assert done is not None and res.job_id == done.id
            assert done.state == "done" and done.attempts == 1, _describe(done)
            assert done.worker and ":celery:" in done.worker, done.worker
            assert done.published_at is not None and first is not None and done.published_at > first, \
                "the job was not re-published"
            # any further copy of the message is consumed (and skipped: the job is no longer queued)
            wait_for(lambda: broker.llen("gpu") == 0 and broker.hlen("unacked") == 0, 15,
                     "the worker to consume every message")
        results = _results(node.db)
        assert len(results) == 1 and results[0].kind == "cxr"
        with node.db.sessions() as ss:
            assert ss.scalars(select(Series)).one().state == "complete"
    finally:
        node.stop()
        broker.flushdb()


@contextmanager
def _redis_server(port: int, log_path: Path) -> Iterator[redis.Redis]:
    exe = require_tool("redis-server", "redis-server")
    with log_path.open("w") as log:
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--daemonize", "no"],
                                stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        try:
            def up() -> bool:
                assert proc.poll() is None, f"redis-server exited: {log_path.read_text()[-2000:]}"
                try:
                    return bool(client.ping())
                except redis.RedisError:
                    return False

            wait_for(up, 15, f"redis-server on port {port}")
            yield client
        finally:
            client.close()
            stop_process(proc, timeout=10)


@pytest.mark.faults
def test_unreachable_broker_keeps_the_job_queued_until_redis_returns(
        tmp_path: Path, cxr_study: Path, tiny_bundle: Bundle, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="worker.celery_app")
    port = free_port()  # nothing listens here (yet)
    s = _settings(tmp_path, tiny_bundle, f"redis://127.0.0.1:{port}/0")
    node = Node(s).start()
    dispatcher = next(p for p in node._parts if type(p).__name__ == "Dispatcher")
    try:
        # reception and assembly do not need the broker
        storescu(s.receive.port, [cxr_study])
        wait_for(lambda: _job(node.db), 30, "the job")
        wait_for(lambda: "cannot publish job" in caplog.text, 30, "the dispatcher's warning")
        n_warnings = caplog.text.count("cannot publish job")
        wait_for(lambda: caplog.text.count("cannot publish job") > n_warnings, 30,
                 "the dispatcher to try again")
        job = _job(node.db)
        assert job is not None and job.state == "queued" and job.published_at is None, _describe(job)
        assert dispatcher._thread.is_alive(), "the dispatcher thread died"
        assert "dispatcher pass failed" not in caplog.text
        with node.db.sessions() as ss:
            se = ss.scalars(select(Series)).one()
            assert se.state == "complete" and se.kind == "cxr"
        assert not _results(node.db)

        # Redis "returns" (empty) and a worker starts: the dispatcher's next pass publishes the job
        worker_log = tmp_path / "worker.log"
        with _redis_server(port, tmp_path / "redis.log"), _worker(s, tiny_bundle, worker_log):
            res = _wait_result(node.db, worker_log)
            job = _job(node.db)
            assert job is not None and res.job_id == job.id and job.state == "done", _describe(job)
            assert job.published_at is not None and job.attempts == 1
            assert dispatcher._thread.is_alive()
        assert len(_results(node.db)) == 1
    finally:
        node.stop()


def _store(port: int, paths: list[Path], aet: str) -> dict[str, int | None]:
    """C-STORE ``paths`` over one association, as a PACS sends a batch of studies: SOP Instance
    UID -> the status the node answered (0: acknowledged; None: no answer)."""
    pusher = Pusher(port, paths, aet=aet)
    pusher.run()
    assert pusher.established, "the node refused the association"
    return pusher.statuses


def _jobs(db: Database) -> list[Job]:
    with db.sessions() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def _count(db: Database, model: type[Instance] | type[Series] | type[Result]) -> int:
    with db.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


@pytest.mark.faults
def test_redis_stopped_during_a_burst_jobs_wait_in_the_database(
        tmp_path: Path, tiny_bundle: Bundle, caplog: pytest.LogCaptureFixture) -> None:
    """Redis stops (its process, not a flush) half-way through a burst of 10 CXR studies.

    Counts: acknowledged, indexed, jobs (published or waiting in the database), analysed, done.
    The worker that was connected before the stop is the same process at the end, never
    restarted: Celery's consumer retries the broker by itself (``broker_connection_retry``,
    on by default: 100 tries, waiting 2, 4, 6 ... up to 30 s between them).
    """
    caplog.set_level(logging.WARNING, logger="worker.celery_app")
    started = time.monotonic()
    files = sorted(cxr_studies(tmp_path / "burst", n=10, seed=11).rglob("*.dcm"))  # 1 instance/study
    before, during = files[:5], files[5:]
    port = free_port()
    s = _settings(tmp_path, tiny_bundle, f"redis://127.0.0.1:{port}/0")
    worker_log = tmp_path / "worker.log"
    node = Node(s).start()
    assert node._scp is not None
    scp_pid = node._scp.pid
    threads = {type(p).__name__: p._thread for p in node._parts}
    first_redis = ExitStack()
    acked: dict[str, int | None] = {}

    def worker_says() -> str:
        return worker_log.read_text(errors="replace") if worker_log.exists() else ""

    try:
        broker = first_redis.enter_context(_redis_server(port, tmp_path / "redis-1.log"))
        with _worker(s, tiny_bundle, worker_log) as worker:
            worker_pid = worker.pid
            wait_for(lambda: " ready." in worker_says(), 60, "the worker to connect to Redis")

            # the first half of the burst (one association): its jobs are published together and
            # the worker takes them one by one (the first one loads the models)
            acked.update(_store(s.receive.port, before, "PACS"))
            wait_for(lambda: broker.llen("gpu") >= 2, 30, "two of the first half's jobs to wait in Redis",
                     interval=0.01)
            # Redis stops (SIGTERM, no persistence) with messages in it: they are gone
            first_redis.close()
            stopped = time.monotonic()
            at_stop = _jobs(node.db)
            # published, but the message is gone with Redis: only the re-publication brings them back
            lost = [j.id for j in at_stop if j.state == "queued" and j.published_at is not None]
            assert lost, ("the worker took every message before Redis stopped: "
                          f"{[_describe(j) for j in at_stop]}")
            taken = sum(j.state != "queued" for j in at_stop)

            # the second half arrives while Redis is down: received, indexed, assembled, queued
            acked.update(_store(s.receive.port, during, "PACS"))
            assert len(acked) == len(files) and all(st == 0 for st in acked.values()), acked
            wait_for(lambda: len(_jobs(node.db)) == len(files), 30, "a job for every series")
            n_warn = caplog.text.count("cannot publish job")
            wait_for(lambda: caplog.text.count("cannot publish job") >= n_warn + 2
                     and time.monotonic() - stopped > s.celery.republish_seconds + 1, 30,
                     "the dispatcher to fail twice more, past the re-publish time")
            waiting = [j for j in _jobs(node.db) if j.id not in {k.id for k in at_stop}]
            assert len(waiting) == len(during)
            for j in waiting:  # they wait in the database, never handed to a broker
                assert j.state == "queued" and j.published_at is None and j.attempts == 0, _describe(j)
            for j in _jobs(node.db):
                if j.id in lost:  # nothing can run them until Redis returns
                    assert j.state == "queued" and j.attempts == 0, _describe(j)
            with node.db.sessions() as ss:
                uids = set(ss.scalars(select(Instance.sop_instance_uid)))
                assert set(acked) <= uids, "an acknowledged instance is not indexed"
                assert all(se.state == "complete" for se in ss.scalars(select(Series)))
                analysed_down = {r.series_id for r in ss.scalars(select(Result))}
            assert not analysed_down & {j.series_id for j in waiting}
            # nothing died: the node's threads, its SCP process, the worker
            dead = [name for name, t in threads.items() if not t.is_alive()]
            assert not dead, f"threads died while Redis was down: {dead}"
            assert node._scp.is_alive() and node._scp.pid == scp_pid, "the SCP process died"
            assert worker.poll() is None, f"the worker exited:\n{worker_says()[-3000:]}"
            wait_for(lambda: "Connection to broker lost" in worker_says(), 15,
                     "the worker to notice that Redis is gone")
            down_counts = (len(acked), len(uids), len(lost), len(waiting), len(analysed_down))

            # Redis returns, empty, on the same port: every series is analysed exactly once
            with _redis_server(port, tmp_path / "redis-2.log") as broker:
                returned = time.monotonic()

                def all_done() -> bool:
                    return (sum(j.state == "done" for j in _jobs(node.db)) == len(files)
                            and _count(node.db, Result) == len(files))

                try:
                    wait_for(all_done, 60, "every job to be done after Redis returned")
                except AssertionError as exc:
                    rows = "\n".join(_describe(j) for j in _jobs(node.db))
                    raise AssertionError(f"{exc}\njobs:\n{rows}\nworker log:\n{worker_says()[-3000:]}") \
                        from None
                recovered = time.monotonic() - returned
                # the copies the dispatcher re-published are consumed and skipped
                wait_for(lambda: broker.llen("gpu") == 0 and broker.hlen("unacked") == 0, 15,
                         "the worker to consume every message")
                assert worker.poll() is None and worker.pid == worker_pid, "the worker was restarted"
                # (Celery masks the URL: "Connected to redis://:**@127.0.0.1:PORT/0")
                connected = re.findall(rf"Connected to redis://\S*127\.0\.0\.1:{port}/", worker_says())
                assert len(connected) >= 2, f"the worker did not reconnect:\n{worker_says()[-3000:]}"
        jobs = _jobs(node.db)
        with node.db.sessions() as ss:
            results = list(ss.scalars(select(Result)))
            n_series = _count(node.db, Series)
        assert len(jobs) == len(files) == n_series
        assert len({j.series_id for j in jobs}) == n_series, "a series has two jobs"
        assert all(j.state == "done" and j.attempts == 1 and j.worker and ":celery:" in j.worker
                   for j in jobs), [_describe(j) for j in jobs]
        assert len(results) == len(files) and len({r.series_id for r in results}) == len(files), \
            "a series was analysed twice"
        assert {r.job_id for r in results} == {j.id for j in jobs}
        assert all(t.is_alive() for t in threads.values())
        assert node._scp.is_alive() and node._scp.pid == scp_pid
        assert "dispatcher pass failed" not in caplog.text
        print(f"\nburst of {len(files)}: acknowledged {down_counts[0]}, indexed {down_counts[1]}; "
              f"at the stop {len(at_stop)} jobs ({taken} taken by the worker, {len(lost)} published with "
              f"the message lost); "
              f"{down_counts[3]} jobs created while Redis was down, unpublished; analysed while down "
              f"{down_counts[4]}; after Redis returned: {len(results)} analysed, "
              f"{sum(j.state == 'done' for j in jobs)} done in {recovered:.1f} s; "
              f"total {time.monotonic() - started:.1f} s")
    finally:
        first_redis.close()
        node.stop()
