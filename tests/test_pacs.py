"""End to end with a real PACS: Orthanc routes studies to the node; SR and SEG come back."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from nodekit import chest_ct_study, cxr_studies, free_port, wait_for
from orthanckit import Orthanc, until
from sqlalchemy import select

from flows.bundle import Bundle
from storage.models import Delivery, Job, Series
from triage.config import Settings, load_settings
from triage.serve import Node


def _settings(tmp: Path, node_port: int, pacs: Orthanc, cxr: Bundle, ct: Bundle) -> Settings:
    return load_settings(
        node={"data_dir": str(tmp / "node")}, receive={"port": node_port},
        assemble={"quiet_seconds": 3.0, "poll_seconds": 0.2}, executor={"poll_seconds": 0.2},
        models={"cxr": str(cxr.path), "chestct": str(ct.path)},
        dispatch={"destinations": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                                    "port": pacs.dicom_port}],
                  "poll_seconds": 0.3, "backoff_initial_seconds": 1.0, "backoff_max_seconds": 4.0,
                  "timeout_seconds": 5})


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[tuple[Orthanc, int]]:
    node_port = free_port()
    o = Orthanc(tmp_path / "orthanc", node_port=node_port)
    yield o, node_port
    o.stop()


def _upload(pacs: Orthanc, folder: Path) -> dict[str, list[str]]:
    """Upload every .dcm under ``folder``; returns study UID -> the SOP Instance UIDs sent."""
    sent: dict[str, list[str]] = {}
    for f in sorted(folder.rglob("*.dcm")):
        pacs.upload(f)
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sent.setdefault(str(ds.StudyInstanceUID), []).append(str(ds.SOPInstanceUID))
    return sent


def _results_in(pacs: Orthanc, study_uid: str) -> dict[str, list[str]] | None:
    """Modality -> Orthanc instance ids of the study's SR and SEG series, once both are there."""
    out: dict[str, list[str]] = {}
    for se in pacs.series_of_study(study_uid):
        mod = se["MainDicomTags"].get("Modality")
        if mod in ("SR", "SEG"):
            out.setdefault(mod, []).extend(se["Instances"])
    return out if "SR" in out and "SEG" in out else None


def _check_sr(pacs: Orthanc, sr_id: str, sources: list[str]) -> None:
    ds = pydicom.dcmread(io.BytesIO(pacs.get_bytes(f"/instances/{sr_id}/file")))
    refs = [str(r.ReferencedSOPInstanceUID) for st in ds.CurrentRequestedProcedureEvidenceSequence
            for se in st.ReferencedSeriesSequence for r in se.ReferencedSOPSequence]
    assert sorted(set(sources)) == sorted(set(refs) & set(sources))
    assert all(pacs.has_sop(u) for u in sources)  # the references resolve in the PACS
    assert ds.VerificationFlag == "UNVERIFIED"


def test_orthanc_routes_to_the_node_and_gets_sr_and_seg_back(
        tmp_path: Path, pacs: tuple[Orthanc, int], tiny_bundle: Bundle, ct_bundle: Bundle) -> None:
    orthanc, node_port = pacs
    s = _settings(tmp_path, node_port, orthanc, tiny_bundle, ct_bundle)
    node = Node(s).start()
    orthanc.start()
    try:
        sent = _upload(orthanc, cxr_studies(tmp_path / "cxr", n=1))
        sent |= _upload(orthanc, chest_ct_study(tmp_path / "ct"))
        for study_uid, sops in sent.items():
            got = until(lambda u=study_uid: _results_in(orthanc, u), 120, f"SR and SEG in study {study_uid}")
            assert len(got["SR"]) == 1
            _check_sr(orthanc, got["SR"][0], sops)
            seg = orthanc.instance_tags(got["SEG"][0])
            assert seg["StudyInstanceUID"] == study_uid and seg["Manufacturer"] == "triage-node"
        rows = wait_for(lambda: _all_sent(node), 60, "every delivery recorded as sent")
        assert len({d.sop_instance_uid for d in rows}) == len(rows)
        with node.db.sessions() as ss:
            assert all(j.state == "done" for j in ss.scalars(select(Job)))
        _check_study_page(node, next(iter(sent)))
    finally:
        node.stop()


def _check_study_page(node: Node, study_uid: str) -> None:
    """The node's own web page (served by triage serve) shows the study, its overlay and deliveries."""
    import re

    import httpx

    from triage.web.security import create_user

    with node.db.session() as ss:
        create_user(ss, "reader", "correct horse battery", "viewer")
    base = f"http://127.0.0.1:{node.web.port}"
    with httpx.Client(base_url=base, follow_redirects=True) as c:
        form = c.get("/login").text
        token = re.search(r'name="csrf" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
        r = c.post("/login", data={"username": "reader", "password": "correct horse battery", "csrf": token,
                                   "next": f"/studies/{study_uid}"})
        assert r.status_code == 200 and "Timeline" in r.text and "sent" in r.text
        img = re.search(r'src="(/results/\d+/overlay.png)"', r.text)
        assert img, r.text
        png = c.get(img.group(1))
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.faults
def test_pacs_down_then_back_across_a_node_restart(
        tmp_path: Path, pacs: tuple[Orthanc, int], tiny_bundle: Bundle, ct_bundle: Bundle) -> None:
    orthanc, node_port = pacs
    s = _settings(tmp_path, node_port, orthanc, tiny_bundle, ct_bundle)
    orthanc.start()
    node = Node(s).start()
    sent = _upload(orthanc, cxr_studies(tmp_path / "cxr", n=2, seed=11))
    # the node has both series: the PACS goes away before the results can be sent back
    wait_for(lambda: _complete_series(node) >= 2, 120, "both series at the node", interval=0.05)
    orthanc.kill()
    down_at = time.monotonic()
    try:
        wait_for(lambda: _failed_attempts(node) >= 2, 60, "failed delivery attempts")
    finally:
        node.stop()
    before = _failed_attempts(node)
    node = Node(s).start()  # a restart of the node while the PACS is still down
    try:
        wait_for(lambda: _failed_attempts(node) > before, 60, "more failed attempts after the restart")
        # a longer outage on request (the default keeps CI short): TRIAGE_TEST_PACS_OUTAGE_S=180
        time.sleep(max(0.0, float(os.environ.get("TRIAGE_TEST_PACS_OUTAGE_S", "0"))
                       - (time.monotonic() - down_at)))
        print(f"PACS down for {time.monotonic() - down_at:.0f} s, {_failed_attempts(node)} failed attempts")
        orthanc.start()
        for study_uid in sent:
            got = until(lambda u=study_uid: _results_in(orthanc, u), 120, f"SR and SEG in {study_uid}")
            assert len(got["SR"]) == 1
        # the PACS may hold an object a moment before the node has recorded its answer
        rows = wait_for(lambda: _all_sent(node), 60, "every delivery recorded as sent")
        assert min(d.attempts for d in rows) >= 2
        uids = [d.sop_instance_uid for d in rows]
        assert len(uids) == len(set(uids))
        for study_uid in sent:  # exactly one copy of each result object in the PACS
            for se in orthanc.series_of_study(study_uid):
                if se["MainDicomTags"].get("Modality") in ("SR", "SEG"):
                    assert len(se["Instances"]) == 1
    finally:
        node.stop()


def _all_sent(node: Node) -> list[Delivery] | None:
    with node.db.sessions() as s:
        rows = list(s.scalars(select(Delivery)))
    return rows if rows and all(d.state == "sent" for d in rows) else None


def _complete_series(node: Node) -> int:
    with node.db.sessions() as s:
        return len(list(s.scalars(select(Series).where(Series.state == "complete"))))


def _failed_attempts(node: Node) -> int:
    with node.db.sessions() as s:
        return sum(d.attempts for d in s.scalars(select(Delivery)) if d.state != "sent")
