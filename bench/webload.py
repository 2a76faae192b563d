"""The worklist page and API with 10 000 studies in the database.

    .venv/bin/python bench/webload.py [--studies 10000] [--requests 30] [--postgres]

Seeds a fresh database with ``--studies`` studies (one CXR series each, a job and a result
with a random priority and percentile), serves the web app with uvicorn on loopback, logs
in, and times full HTTP round trips of ``GET /worklist`` (the HTML page, 500 rows rendered)
and ``GET /api/worklist?limit=200`` (JSON), the filtered page (``?priority=2&state=analysed``)
and the dashboard's figures (``GET /dashboard.json``, polled every 5 s by the page). Goal
(issue 6): the worklist page in <= 200 ms on a 2-core machine. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.db import Database  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.models import Instance, Job, Result, Series, Study  # noqa: E402
from triage.config import load_settings  # noqa: E402
from triage.web import WebServer  # noqa: E402
from triage.web.api import create_app  # noqa: E402
from triage.web.security import create_token, create_user  # noqa: E402

PASSWORD = "benchmark password"


def seed(db: Database, n: int) -> float:
    t = time.perf_counter()
    rng = random.Random(0)
    t0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    with db.session() as s:
        for i in range(n):
            st = Study(study_instance_uid=f"2.25.{i + 1}", accession_number=f"A{i:06d}", patient_name="DOE^J",
                       patient_id=f"P{i}", study_description="XR CHEST",
                       first_received_at=t0 + dt.timedelta(minutes=i))
            s.add(st)
            s.flush()
            se = Series(study_id=st.id, series_instance_uid=f"2.25.{i + 1}.1", modality="DX", kind="cxr",
                        state="complete", instance_count=1)
            s.add(se)
            s.flush()
            s.add(Instance(series_id=se.id, sop_instance_uid=f"2.25.{i + 1}.1.1", sop_class_uid="1.2",
                           transfer_syntax_uid="1.2.840.10008.1.2.1", blob=f"b{i}", sha256="0" * 64, size=1,
                           is_image=True, received_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=i)))
            done = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=i)  # the last 24 h: latency figures
            job = Job(series_id=se.id, series_version=1, kind="cxr", state="done",
                      created_at=done - dt.timedelta(seconds=rng.uniform(1, 5)), finished_at=done)
            s.add(job)
            s.flush()
            p = rng.choice([1, 2, 3, 4, 4, 4, 4])
            s.add(Result(job_id=job.id, series_id=se.id, version=1, kind="cxr", bundle_name="cpu-cxr",
                         bundle_version="1", bundle_fingerprint="f" * 64, method="whole", score=rng.random(),
                         percentile=100 * rng.random(), abnormal=p <= 2, priority=p))
    return time.perf_counter() - t


def timed(client: httpx.Client, url: str, n: int, headers: dict[str, str] | None = None) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.get(url, headers=headers)
        out.append(time.perf_counter() - t)
        r.raise_for_status()
    return out


def run(url: str, label: str, studies: int, requests: int) -> dict[str, object]:
    db = Database(url)
    upgrade(db)
    seconds = seed(db, studies)
    with db.session() as s:
        u = create_user(s, "bench", PASSWORD, "viewer")
        token = create_token(s, u, "bench")
    tmp = Path(tempfile.mkdtemp(prefix="webload-"))
    settings = load_settings(node={"data_dir": str(tmp)}, storage={"database_url": url})
    web = WebServer(create_app(settings, db), "127.0.0.1", 0).start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{web.port}", follow_redirects=True, timeout=30) as c:
            form = c.get("/login").text
            csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
            login = {"username": "bench", "password": PASSWORD, "csrf": csrf}
            c.post("/login", data=login).raise_for_status()
            timed(c, "/worklist", 3)  # warm-up
            page = timed(c, "/worklist", requests)
            api = timed(c, "/api/worklist?limit=200", requests, {"Authorization": f"Bearer {token}"})
            filtered = timed(c, "/worklist?priority=2&state=analysed", requests)
            dash = timed(c, "/dashboard.json", requests)
            rows = c.get("/worklist").text.count("<tr data-study=")
    finally:
        web.stop()
        db.dispose()

    def q(v: list[float], p: float) -> float:
        return round(1000 * sorted(v)[min(len(v) - 1, int(p * len(v)))], 1)

    return {"database": label, "studies": studies, "seed_s": round(seconds, 1), "page_rows": rows,
            "page_median_ms": round(1000 * statistics.median(page), 1), "page_p95_ms": q(page, 0.95),
            "api_median_ms": round(1000 * statistics.median(api), 1), "api_p95_ms": q(api, 0.95),
            "filtered_median_ms": round(1000 * statistics.median(filtered), 1),
            "dashboard_median_ms": round(1000 * statistics.median(dash), 1),
            "dashboard_p95_ms": q(dash, 0.95)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--postgres", action="store_true", help="also PostgreSQL (a fresh database on 127.0.0.1)")
    ap.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as d:
        results.append(run(f"sqlite:///{d}/bench.db", "sqlite", args.studies, args.requests))
    if args.postgres:
        name = f"bench_web_{uuid.uuid4().hex[:8]}"
        admin = args.postgres_url
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            url = admin.rsplit("/", 1)[0] + f"/{name}"
            results.append(run(url, "postgresql", args.studies, args.requests))
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    print("| database | studies | page rows | page median | page p95 | API median | API p95 | filtered page "
          "median | dashboard.json median | p95 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['database']} | {r['studies']} | {r['page_rows']} | {r['page_median_ms']} ms | "
              f"{r['page_p95_ms']} ms | {r['api_median_ms']} ms | {r['api_p95_ms']} ms | "
              f"{r['filtered_median_ms']} ms | {r['dashboard_median_ms']} ms | {r['dashboard_p95_ms']} ms |")
    print(json.dumps({"bench": "webload", "goal_page_ms": 200, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
