"""The Celery executor loses no job when the broker loses its messages or is not there at all.

The Job row is the truth and a broker message only says "look at job N": the dispatcher
publishes again every job still queued ``celery.republish_seconds`` after its last
publication, and a job it could not publish stays queued (``published_at`` NULL) until the
broker answers. These tests use a real Redis (``redis://127.0.0.1:6379/14`` or
``$TRIAGE_TEST_REDIS_URL``) and a real ``triage worker`` subprocess; the second one starts a
throwaway ``redis-server`` of its own.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from nodekit import cxr_studies, free_port, require_tool, stop_process, storescu, wait_for
from sqlalchemy import select

from flows.bundle import Bundle
from storage.db import Database
from storage.models import Job, Result, Series
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
