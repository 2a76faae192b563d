"""The pages in a real browser: Playwright driving Debian's Chromium (it cannot download one).

Screenshots go to the test's folder; with TRIAGE_UPDATE_SCREENSHOTS=1 they also replace the
ones in docs/img that the README shows.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from test_receive import ct_slice

from flows.bundle import Bundle
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import AuditEvent, Delivery, Instance, Job, Result, Series, Study, WorkerBeat, utcnow
from triage.config import load_settings
from triage.web import WebServer
from triage.web.api import create_app
from triage.web.security import create_user

DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
PASSWORD = "correct horse battery"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("Chromium is missing: install it with `apt-get install chromium` "
                    "(scripts/test does this)", pytrace=False)
    return exe


# accession, priority, percentile, score (and abnormal cm3), arrival minute, the SR's delivery
STUDIES = [("ACC-ROUTINE", 4, 35.0, 0.3, 0, "sent"),
           ("ACC-ALSO-URGENT", 1, 99.2, 3.1, 2, "sent"),  # urgent too, earlier, but a lower score
           ("ACC-URGENT", 1, 99.7, 4.2, 5, "dead")]


def _seed(db: Database, blobs: BlobStore) -> None:
    """Three chest-CT studies, each a result with a map over a real image, its SR's delivery
    and the audit events the node writes on the way (complete, routed, analysed, reports
    built, delivered); the urgent one's delivery is a dead letter."""
    import datetime as dt

    for acc, prio, pct, score, minutes, delivery in STUDIES:
        study_uid, series_uid = generate_uid(), generate_uid()
        ds = ct_slice(0, 1, series=series_uid, study=study_uid, size=64)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        inst_key = blobs.key("instance", str(ds.SOPInstanceUID), group=series_uid)
        blobs.put(inst_key, buf.getvalue())
        yy, xx = np.mgrid[0:64, 0:64]
        values = np.exp(-((yy - 40) ** 2 + (xx - 22) ** 2) / 40.0).astype(np.float32)
        mbuf = io.BytesIO()
        np.save(mbuf, values)
        map_key = blobs.key("map", acc)
        blobs.put(map_key, mbuf.getvalue())
        arrived = dt.datetime(2026, 11, 30, 8, minutes, tzinfo=dt.UTC)

        def at(seconds: float, t0: dt.datetime = arrived) -> dt.datetime:
            return t0 + dt.timedelta(seconds=seconds)

        with db.session() as s:
            st = Study(study_instance_uid=study_uid, accession_number=acc, patient_name="DOE^JANE",
                       study_description="CT CHEST", first_received_at=arrived)
            s.add(st)
            s.flush()
            se = Series(study_id=st.id, series_instance_uid=series_uid, modality="CT", kind="chestct",
                        state="complete", series_description="Chest axial", instance_count=1,
                        route_reason="rule 'chest CT, axial, <= 3 mm'", first_received_at=arrived,
                        last_received_at=arrived, completion_reason="quiet for 30 s", completed_at=at(30))
            s.add(se)
            s.flush()
            job = Job(series_id=se.id, series_version=1, kind="chestct", state="done")
            s.add(job)
            s.flush()
            sr_uid = generate_uid()
            res = Result(job_id=job.id, series_id=se.id, version=1, kind="chestct", bundle_name="cpu-chestct",
                         bundle_version="1", bundle_fingerprint="f" * 64, method="patch map", score=score,
                         percentile=pct, abnormal=prio <= 2, priority=prio, abnormal_cm3=score,
                         map_blob=map_key, report_state="ready",
                         details={"instance_blobs": [inst_key], "slice_order": [str(ds.SOPInstanceUID)]},
                         outputs=[{"what": "sr", "sop_instance": sr_uid, "sop_class": SR_CLASS,
                                   "series": generate_uid(), "blob": "x"}])
            s.add(res)
            s.flush()
            s.add(Delivery(result_id=res.id, destination="pacs", sop_class_uid=SR_CLASS,
                           sop_instance_uid=sr_uid, blob="x", state=delivery,
                           attempts=12 if delivery == "dead" else 1,
                           last_error="C-STORE status 0xA700 (disk full)" if delivery == "dead" else None))
            # the events, with the details triage.assemble, worker.tasks, worker.report and
            # triage.dispatch record (tests/test_pages.py drives those for real)
            events = [
                (at(30), "assembler", "series complete", {"why": "quiet for 30 s", "instances": 1,
                                                          "version": 1, "geometry": "1 slice"}),
                (at(30), "router", "routed", {"kind": "chestct", "reason": se.route_reason}),
                (at(41), "gpu1:4711:celery", "analysed", {"job": job.id, "kind": "chestct", "reason": None,
                                                          "score": score, "priority": prio}),
                (at(44), "reporter", "reports built", {"result": res.id, "objects": ["sr"], "deliveries": 1,
                                                       "notifications": 0, "notes": []})]
            if delivery == "sent":
                events.append((at(45), "dispatch", "delivered", {"destination": "pacs", "sop_class": SR_CLASS,
                                                                 "attempts": 1}))
            s.add_all(AuditEvent(at=when, actor=actor, action=action, series_id=se.id, detail=detail)
                      for when, actor, action, detail in events)


def _seed_cxr(db: Database, bundle: Bundle) -> None:
    """A radiograph scored by the configured bundle (its study page shows the reference plot),
    a live worker's heartbeat and a few instances for the dashboard."""
    import datetime as dt

    score = float(np.percentile(bundle.calibration.reference, 97))
    with db.session() as s:
        st = Study(study_instance_uid=generate_uid(), accession_number="ACC-CXR", patient_name="ROE^RICHARD",
                   study_description="CHEST PA",
                   first_received_at=dt.datetime(2026, 11, 30, 8, 9, tzinfo=dt.UTC))
        s.add(st)
        s.flush()
        se = Series(study_id=st.id, series_instance_uid=generate_uid(), modality="DX", kind="cxr",
                    state="complete", series_description="PA", instance_count=1,
                    route_reason="rule 'chest radiograph'")
        s.add(se)
        s.flush()
        job = Job(series_id=se.id, series_version=1, kind="cxr", state="done",
                  created_at=utcnow() - dt.timedelta(seconds=2), finished_at=utcnow())
        s.add(job)
        s.flush()
        s.add(Result(job_id=job.id, series_id=se.id, version=1, kind="cxr", bundle_name=bundle.name,
                     bundle_version=bundle.version, bundle_fingerprint="f" * 64, method="two-model posterior",
                     score=score, percentile=97.0, abnormal=True, priority=2, report_state="ready"))
        s.add(WorkerBeat(name="celery@gpu1:4711", kind="celery", host="gpu1", pid=4711, jobs_done=3,
                         bundles={"cxr": f"{bundle.name} {bundle.version}"}))
        for i in range(7):
            s.add(Instance(series_id=se.id, sop_instance_uid=f"1.2.9.{i}", sop_class_uid="1.2",
                           transfer_syntax_uid="1.2.840.10008.1.2.1", blob=f"b{i}", sha256="0" * 64, size=1,
                           is_image=True, current=i == 0))


@pytest.fixture()
def site(tmp_path: Path, sqlite_db: Database, tiny_bundle: Bundle) -> Iterator[tuple[str, Database]]:
    s = load_settings(node={"data_dir": str(tmp_path / "d")}, storage={"database_url": sqlite_db.url},
                      models={"cxr": str(tiny_bundle.path)})
    _seed(sqlite_db, BlobStore(s.blob_root))
    _seed_cxr(sqlite_db, tiny_bundle)
    with sqlite_db.session() as ss:
        create_user(ss, "ann", PASSWORD, "admin")
    web = WebServer(create_app(s, sqlite_db), "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{web.port}", sqlite_db
    web.stop()


def _shot(page: object, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.png"
    page.screenshot(path=str(out), full_page=True)  # type: ignore[attr-defined]
    if os.environ.get("TRIAGE_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, DOCS_IMG / f"{name}.png")


def test_browser_login_worklist_study_retry_and_refusals(site: tuple[str, Database], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, db = site

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            # refused without login: sent to the login form
            page.goto(f"{url}/worklist")
            assert "/login" in page.url
            _shot(page, tmp_path, "web-login")
            page.fill("input[name=username]", "ann")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/worklist")
            # by priority, then within a priority by the higher percentile, not by arrival
            rows = [r.split("\t") for r in page.locator("#worklist tbody tr").all_inner_texts()]
            assert [(r[6], r[1], r[2]) for r in rows] == [
                ("ACC-URGENT", "urgent", "99.7"), ("ACC-ALSO-URGENT", "urgent", "99.2"),
                ("ACC-CXR", "abnormal", "97.0"), ("ACC-ROUTINE", "routine", "35.0")]
            _shot(page, tmp_path, "web-worklist")
            # filters: urgent and abnormal only
            page.select_option("select[name=priority]", "2")
            page.click("form.filters button[type=submit]")
            page.wait_for_load_state()
            assert page.locator("#worklist tbody tr").count() == 3
            # the study: overlay thumbnail and delivery status; retry the dead letter
            page.goto(f"{url}/worklist")
            page.click("text=ACC-URGENT")
            page.wait_for_selector("img.overlay")
            assert page.eval_on_selector("img.overlay", "img => img.complete && img.naturalWidth > 0")
            assert page.locator("table.deliveries td.state").first.inner_text() == "dead"
            timeline = page.locator("table.timeline tr")
            assert [timeline.nth(i).get_attribute("data-action") for i in range(timeline.count())] == [
                "received", "series complete", "routed", "analysed", "reports built"]
            assert "chestct: rule 'chest CT, axial, <= 3 mm'" in page.inner_text("tr[data-action=routed]")
            _shot(page, tmp_path, "web-study")
            page.click("text=Retry")
            page.wait_for_load_state()
            assert page.locator("table.deliveries td.state").first.inner_text() == "pending"
            assert "to pacs" in page.inner_text("tr[data-action='delivery retried']")
            page.goto(f"{url}/deliveries")
            _shot(page, tmp_path, "web-deliveries")
            # a POST without the CSRF token is refused, even with the session cookie
            _forged_cancel(page, url, db)
            _pages_for_admins(page, url, db, tmp_path)
        finally:
            browser.close()


def _forged_cancel(page: object, site: str, db: Database) -> None:
    """A cancel without the CSRF token (the session cookie goes along) is refused, and the row
    stays as it was. It aims at the retried delivery: pending, so a cancel would succeed."""
    def row() -> tuple[object, ...]:
        with db.sessions() as s:
            d = s.scalar(select(Delivery).where(Delivery.last_error.is_not(None)))
            assert d is not None
            return d.id, d.state, d.attempts, d.next_attempt_at, d.last_error

    pg: Any = page
    before = row()
    assert before[1] == "pending"
    r = pg.request.post(f"{site}/deliveries/{before[0]}/cancel", form={"back": "/deliveries"})
    assert row() == before  # checked first: a refusal that still changed the row is no refusal
    assert r.status == 403


def _loaded(page: object, selector: str) -> bool:
    return bool(page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0"))  # type: ignore[attr-defined]


def _pages_for_admins(page: object, site: str, db: Database, tmp_path: Path) -> None:
    """The dashboard (and its live refresh), a study's reference plot, models and audit log."""
    pg: Any = page
    pg.goto(f"{site}/worklist")
    pg.click("text=ACC-CXR")
    pg.wait_for_selector("img.reference")
    assert _loaded(pg, "img.reference")
    pg.goto(f"{site}/dashboard")
    pg.wait_for_selector("#workers tbody tr")
    assert "celery@gpu1:4711" in pg.inner_text("#workers") and "tiny 1" in pg.inner_text("#workers")
    assert "verified" in pg.inner_text("#bundles")
    assert pg.inner_text("#jobs").count("done") == 1 and "p50" in pg.inner_text("#latency")
    # the dead letter retried above is pending again: backlog 1, no dead letters
    assert pg.inner_text("#backlog") == "1" and pg.inner_text("#dead").startswith("0 dead letters")
    assert pg.inner_text("#assembling") == "0"
    _shot(pg, tmp_path, "web-dashboard")
    pg.evaluate("window.__sameDocument = true")  # set on this document: a reload would drop it
    _forged_cancel(pg, site, db)  # (the figures must not move)
    # a series starts arriving: the page shows it by itself (the rate is per rolling minute, so
    # the assembling count, which only grows here, is the stable thing to wait for)
    with db.session() as s:
        st = s.scalar(select(Study.id))
        se = Series(study_id=st, series_instance_uid="1.2.8", kind=None, state="receiving")
        s.add(se)
        s.flush()
        arrived = utcnow()
        for i in range(5):
            s.add(Instance(series_id=se.id, sop_instance_uid=f"1.2.8.{i}", sop_class_uid="1.2",
                           transfer_syntax_uid="1.2.840.10008.1.2.1", blob=f"c{i}", sha256="0" * 64, size=1,
                           is_image=True, received_at=arrived))
    pg.wait_for_function("document.getElementById('assembling').textContent === '1'", timeout=20000)
    rate = int(pg.inner_text("#rate"))
    # the card shows the current whole minute: it holds the five unless the minute turned since
    if utcnow().replace(second=0, microsecond=0) == arrived.replace(second=0, microsecond=0):
        assert rate >= 5
    assert pg.evaluate("window.__sameDocument === true")  # refreshed in place, not reloaded
    pg.goto(f"{site}/models")
    pg.wait_for_selector("img.calibration")
    assert _loaded(pg, "img.calibration") and "youden" in pg.inner_text("section.bundle")
    _shot(pg, tmp_path, "web-models")
    pg.goto(f"{site}/audit")
    text = pg.inner_text("#audit")
    assert "login" in text and "delivery retried" in text
    _shot(pg, tmp_path, "web-audit")

