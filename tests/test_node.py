"""The node end to end: storescu -> SCP process -> assembly -> routing -> executor -> Result rows."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from nodekit import (
    chest_ct_study,
    cxr_studies,
    free_port,
    storescu,
    wait_for,
)
from sqlalchemy import select

from flows.bundle import Bundle
from storage.db import Database
from storage.models import Job, Result, Series, WorkerBeat
from triage.config import Settings, load_settings
from triage.serve import Node

REDIS_URL = os.environ.get("TRIAGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("studies")
    from flows.phantoms import make_headct
    from triage.phantom_dicom import write_dicom_studies

    write_dicom_studies(make_headct(1, shape=(16, 64, 64), seed=3), root / "head", seed=3)
    return {"cxr": cxr_studies(root / "cxr"), "chestct": chest_ct_study(root / "ct"), "bct": root / "head"}


def _settings(tmp: Path, cxr: Bundle, ct: Bundle, **extra: object) -> Settings:
    base: dict[str, object] = {
        "node": {"data_dir": str(tmp / "data")}, "receive": {"port": free_port()},
        "assemble": {"quiet_seconds": 3.0, "poll_seconds": 0.2}, "executor": {"poll_seconds": 0.2},
        "models": {"cxr": str(cxr.path), "chestct": str(ct.path)}}
    return load_settings(None, **{**base, **extra})


def _results(db: Database) -> list[tuple[Series, Result]]:
    with db.sessions() as s:
        q = select(Series, Result).join(Result, Result.series_id == Series.id)
        return [(a, b) for a, b in s.execute(q)]


def _all_ready(db: Database, n: int) -> bool:
    with db.sessions() as s:
        states = list(s.scalars(select(Result.report_state)))
    return len(states) >= n and all(x == "ready" for x in states)


def _beats(db: Database) -> list[WorkerBeat] | None:
    with db.sessions() as s:
        rows = list(s.scalars(select(WorkerBeat)))
    return rows if {"node", "celery"} <= {b.kind for b in rows} else None


def _check_results(db: Database, n_cxr: int, failed_bct: bool = False) -> None:
    def every() -> list[tuple[Series, Result]] | None:
        r = _results(db)
        return r if len(r) >= n_cxr + 1 else None

    rows = wait_for(every, 120, "a Result for every series")
    if failed_bct:  # routed to bct, but no bct bundle is configured: the job fails with the reason
        def bct_job() -> Job | None:
            with db.sessions() as s:
                return s.scalars(select(Job).where(Job.kind == "bct", Job.state == "failed")).first()
        job = wait_for(bct_job, 60, "the head-CT job to fail")
        assert "no model bundle configured for 'bct'" in (job.reason or "")
        assert job.attempts == 1
    kinds = sorted(se.kind or "" for se, _ in rows)
    assert kinds == ["chestct"] + ["cxr"] * n_cxr
    for se, res in rows:
        assert se.state == "complete" and "association released" in (se.completion_reason or "")
        assert math.isfinite(res.score) and 1 <= res.priority <= 4 and res.map_blob
        assert res.bundle_name in ("tiny", "tiny-chestct")
        if se.kind == "cxr":
            assert res.log_posterior is not None and res.percentile is not None
        else:
            assert res.abnormal_cm3 is not None and res.method.startswith("patch map")
    with db.sessions() as s:
        jobs = s.scalars(select(Job).where(Job.kind != "bct")).all()
    assert len(jobs) == n_cxr + 1 and all(j.state == "done" and j.attempts == 1 for j in jobs)


def test_serve_local_executor_analyses_what_storescu_sends(tmp_path: Path, studies: dict[str, Path],
                                                           tiny_bundle: Bundle, ct_bundle: Bundle) -> None:
    s = _settings(tmp_path, tiny_bundle, ct_bundle, web={"port": 0})
    node = Node(s).start()
    try:
        # the web side runs in the node: liveness on its port, and readiness finds the SCP process
        web = f"http://127.0.0.1:{node.web.port}"
        assert httpx.get(f"{web}/api/health", timeout=10).json() == {"status": "ok"}
        assert httpx.get(f"{web}/api/health/ready", timeout=30).json()["checks"]["scp"] == "ok"
        storescu(s.receive.port, [studies["cxr"], studies["chestct"], studies["bct"]])
        _check_results(node.db, 2, failed_bct=True)
        # the map of the chest CT lies on the source grid
        db = node.db
        with db.sessions() as ss:
            res = ss.scalars(select(Result).where(Result.kind == "chestct")).one()
        assert res.map_blob is not None
        arr = np.load((s.blob_root / res.map_blob).open("rb"))
        assert arr.shape == (60, 64, 64)
    finally:
        node.stop()


def _redis_or_fail() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis does not answer at {REDIS_URL} ({exc}); install and start it with "
                    "`apt-get install redis-server && redis-server --daemonize yes` (scripts/test does "
                    "this) or set TRIAGE_TEST_REDIS_URL", pytrace=False)


def test_serve_celery_executor_against_real_redis(tmp_path: Path, studies: dict[str, Path],
                                                  tiny_bundle: Bundle, ct_bundle: Bundle) -> None:
    _redis_or_fail()
    redis.Redis.from_url(REDIS_URL).flushdb()
    s = _settings(tmp_path, tiny_bundle, ct_bundle, executor={"kind": "celery", "poll_seconds": 0.2},
                  celery={"broker_url": REDIS_URL})
    node = Node(s).start()
    env = {**os.environ, "TRIAGE_NODE__DATA_DIR": str(s.node.data_dir),
           "TRIAGE_MODELS__CXR": str(tiny_bundle.path), "TRIAGE_MODELS__CHESTCT": str(ct_bundle.path),
           "TRIAGE_CELERY__BROKER_URL": REDIS_URL, "TRIAGE_EXECUTOR__KIND": "celery"}
    log = (tmp_path / "worker.log").open("w")
    # one worker on both queues: analyses (gpu), then the SR/SEG builds they hand over (io)
    worker = subprocess.Popen([sys.executable, "-m", "triage.cli", "worker", "--concurrency", "1",
                               "--queues", "gpu,io"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        storescu(s.receive.port, [studies["cxr"], studies["chestct"]])
        _check_results(node.db, 2)
        with node.db.sessions() as ss:
            workers = {j.worker for j in ss.scalars(select(Job))}
        assert all(w and ":celery:" in w for w in workers), workers
        # built by the io task well before the node's loop would take over stale ones (30 s)
        wait_for(lambda: _all_ready(node.db, 3), 25, "every result's reports built by the io queue")
        beats = wait_for(lambda: _beats(node.db), 15, "heartbeats from the node and the worker")
        assert {"node", "celery"} <= {b.kind for b in beats}
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        node.stop()
        log.close()


@pytest.mark.faults
def test_celery_worker_killed_mid_analysis_completes_once(tmp_path: Path, studies: dict[str, Path],
                                                          tiny_bundle: Bundle, ct_bundle: Bundle) -> None:
    """SIGKILL the Celery worker while it analyses: the job's lease expires, the dispatcher
    re-publishes it, a new worker completes it once, and exactly one SR reaches the PACS."""
    import json
    import signal

    from triage.standin import StoreSCP

    _redis_or_fail()
    redis.Redis.from_url(REDIS_URL).flushdb()
    pacs = StoreSCP(tmp_path / "pacs").start()
    dest = [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}]
    s = _settings(tmp_path, tiny_bundle, ct_bundle,
                  executor={"kind": "celery", "poll_seconds": 0.2, "lease_seconds": 4},
                  celery={"broker_url": REDIS_URL, "republish_seconds": 2},
                  dispatch={"destinations": dest, "poll_seconds": 0.3})
    node = Node(s).start()
    env = {**os.environ, "TRIAGE_NODE__DATA_DIR": str(s.node.data_dir),
           "TRIAGE_MODELS__CXR": str(tiny_bundle.path), "TRIAGE_MODELS__CHESTCT": str(ct_bundle.path),
           "TRIAGE_CELERY__BROKER_URL": REDIS_URL, "TRIAGE_EXECUTOR__KIND": "celery",
           "TRIAGE_EXECUTOR__LEASE_SECONDS": "4", "TRIAGE_DISPATCH__DESTINATIONS": json.dumps(dest)}

    def start_worker(name: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{name}.log").open("wb")
        return subprocess.Popen([sys.executable, "-m", "triage.cli", "worker", "--concurrency", "1",
                                 "--queues", "gpu,io"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    first = start_worker("worker1")
    second = None
    try:
        storescu(s.receive.port, [studies["chestct"]])

        def running() -> Job | None:
            with node.db.sessions() as ss:
                return ss.scalars(select(Job).where(Job.state == "running")).first()
        job = wait_for(running, 120, "the analysis to start on the worker", interval=0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the worker and its pool process, mid-analysis
        first.wait(timeout=10)
        with node.db.sessions() as ss:
            assert ss.get(Job, job.id).state == "running"  # type: ignore[union-attr]  # killed before it finished
            assert not list(ss.scalars(select(Result)))
        second = start_worker("worker2")
        wait_for(lambda: _all_ready(node.db, 1), 120, "the job completed by the second worker")
        wait_for(lambda: pacs.modality_counts().get("SR"), 60, "the SR at the PACS")
        import time

        time.sleep(3)  # a duplicate would arrive within a few delivery passes
        with node.db.sessions() as ss:
            jobs = list(ss.scalars(select(Job)))
            results = list(ss.scalars(select(Result)))
        assert len(jobs) == 1 and jobs[0].state == "done" and jobs[0].attempts == 2
        assert len(results) == 1
        assert pacs.modality_counts()["SR"] == 1
    finally:
        for w in (first, second):
            if w is not None and w.poll() is None:
                os.killpg(w.pid, signal.SIGTERM)
                w.wait(timeout=30)
        node.stop()
        pacs.stop()
