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

import numpy as np
import pytest
from pydicom.uid import generate_uid
from test_receive import ct_slice

from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Delivery, Job, Result, Series, Study
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


def _seed(db: Database, blobs: BlobStore) -> None:
    """Two studies; the urgent one has a result with a map over a real image and a dead delivery."""
    for acc, prio, pct, minutes in (("ACC-ROUTINE", 4, 35.0, 0), ("ACC-URGENT", 1, 99.7, 5)):
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
        with db.session() as s:
            import datetime as dt

            st = Study(study_instance_uid=study_uid, accession_number=acc, patient_name="DOE^JANE",
                       study_description="CT CHEST",
                       first_received_at=dt.datetime(2026, 11, 30, 8, minutes, tzinfo=dt.UTC))
            s.add(st)
            s.flush()
            se = Series(study_id=st.id, series_instance_uid=series_uid, modality="CT", kind="chestct",
                        state="complete", series_description="Chest axial", instance_count=1,
                        route_reason="rule 'chest CT, axial, <= 3 mm'")
            s.add(se)
            s.flush()
            job = Job(series_id=se.id, series_version=1, kind="chestct", state="done")
            s.add(job)
            s.flush()
            sr_uid = generate_uid()
            res = Result(job_id=job.id, series_id=se.id, version=1, kind="chestct", bundle_name="cpu-chestct",
                         bundle_version="1", bundle_fingerprint="f" * 64, method="patch map", score=4.2,
                         percentile=pct, abnormal=prio <= 2, priority=prio, abnormal_cm3=4.2,
                         map_blob=map_key, report_state="ready",
                         details={"instance_blobs": [inst_key], "slice_order": [str(ds.SOPInstanceUID)]},
                         outputs=[{"what": "sr", "sop_instance": sr_uid, "sop_class": SR_CLASS,
                                   "series": generate_uid(), "blob": "x"}])
            s.add(res)
            s.flush()
            s.add(Delivery(result_id=res.id, destination="pacs", sop_class_uid=SR_CLASS,
                           sop_instance_uid=sr_uid, blob="x", state="dead" if prio == 1 else "sent",
                           attempts=12 if prio == 1 else 1,
                           last_error="C-STORE status 0xA700 (disk full)" if prio == 1 else None))


@pytest.fixture()
def site(tmp_path: Path, sqlite_db: Database) -> Iterator[str]:
    s = load_settings(node={"data_dir": str(tmp_path / "d")}, storage={"database_url": sqlite_db.url})
    _seed(sqlite_db, BlobStore(s.blob_root))
    with sqlite_db.session() as ss:
        create_user(ss, "ann", PASSWORD, "admin")
    web = WebServer(create_app(s, sqlite_db), "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{web.port}"
    web.stop()


def _shot(page: object, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.png"
    page.screenshot(path=str(out), full_page=True)  # type: ignore[attr-defined]
    if os.environ.get("TRIAGE_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, DOCS_IMG / f"{name}.png")


def test_browser_login_worklist_study_retry_and_refusals(site: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            # refused without login: sent to the login form
            page.goto(f"{site}/worklist")
            assert "/login" in page.url
            _shot(page, tmp_path, "web-login")
            page.fill("input[name=username]", "ann")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{site}/worklist")
            rows = page.locator("#worklist tbody tr")
            assert rows.count() == 2
            assert "ACC-URGENT" in rows.nth(0).inner_text() and "urgent" in rows.nth(0).inner_text()
            assert "ACC-ROUTINE" in rows.nth(1).inner_text()
            _shot(page, tmp_path, "web-worklist")
            # the study: overlay thumbnail and delivery status; retry the dead letter
            page.click("text=ACC-URGENT")
            page.wait_for_selector("img.overlay")
            assert page.eval_on_selector("img.overlay", "img => img.complete && img.naturalWidth > 0")
            assert page.locator("table.deliveries td.state").first.inner_text() == "dead"
            _shot(page, tmp_path, "web-study")
            page.click("text=Retry")
            page.wait_for_load_state()
            assert page.locator("table.deliveries td.state").first.inner_text() == "pending"
            page.goto(f"{site}/deliveries")
            _shot(page, tmp_path, "web-deliveries")
            # a POST without the CSRF token is refused, even with the session cookie
            r = page.request.post(f"{site}/deliveries/1/cancel", form={"back": "/deliveries"})
            assert r.status == 403
        finally:
            browser.close()
