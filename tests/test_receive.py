"""The storage SCP on the network: statuses for bad input, access control, and no loss on SIGKILL."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from nodekit import Pusher, echo_ok, free_port, storescu, wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from flows.bundle import Bundle
from storage.db import Database
from storage.migrate import upgrade
from storage.models import Instance, Job, Result, Series
from triage.config import Settings, load_settings
from triage.identity import IMPLEMENTATION_CLASS_UID
from triage.receive import StorageSCP
from triage.serve import Node


def ct_slice(k: int, n: int, *, series: str, study: str, size: int = 32, spacing: float = 1.0,
             frame: str | None = None) -> Dataset:
    """One valid CT Image Storage slice (chest, axial) as a Part 10 dataset."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series, str(k)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = frame or generate_uid(entropy_srcs=[series, "for"])
    ds.Modality, ds.BodyPartExamined, ds.StudyDescription = "CT", "CHEST", "CT CHEST"
    ds.PatientName, ds.PatientID = "TEST^RECEIVE", "RCV-1"
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [-64.0, -64.0, float(k * spacing)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [128 / size, 128 / size]
    ds.SliceThickness = spacing
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    rng = np.random.default_rng(k)
    img = (rng.normal(-700, 30, (size, size))).astype(np.int16)
    img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 40  # mediastinum-ish block
    ds.PixelData = img.tobytes()
    return ds


def write_series(folder: Path, n: int, **kw: object) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        p = folder / f"{k:05d}.dcm"
        ct_slice(k, n, series=series, study=study, **kw).save_as(p, enforce_file_format=True)  # type: ignore[arg-type]
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- bad input


@pytest.fixture()
def scp(tmp_path: Path) -> Iterator[tuple[StorageSCP, Settings]]:
    s = load_settings(node={"data_dir": str(tmp_path / "data")},
                      receive={"port": 0, "allowed_calling_aes": ["GOODPACS"], "max_side": 16384})
    db = Database(s.database_url)
    upgrade(db)
    scp = StorageSCP(s, db)
    scp.start()
    yield scp, s
    scp.stop()
    db.dispose()


def _assoc(port: int, aet: str = "GOODPACS", contexts: tuple[str, ...] = (CTImageStorage,)) -> object:
    ae = AE(ae_title=aet)
    for c in contexts:
        ae.add_requested_context(c, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="TRIAGE")


def _store(port: int, what: Dataset | Path) -> tuple[int, str]:
    assoc = _assoc(port)
    assert assoc.is_established  # type: ignore[attr-defined]
    try:
        st = assoc.send_c_store(what)  # type: ignore[attr-defined]
        return int(st.Status), str(st.get("ErrorComment", ""))
    finally:
        assoc.release()  # type: ignore[attr-defined]


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=False)
    return path


def test_bad_input_gets_the_right_status_and_the_node_keeps_serving(
        scp: tuple[StorageSCP, Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    node, s = scp
    port = node.port
    series, study = generate_uid(), generate_uid()
    good = ct_slice(0, 1, series=series, study=study)
    caplog.set_level(logging.WARNING, logger="triage")

    # truncated in the pixel data: pynetdicom sends the file's bytes as they are (chunked)
    full = tmp_path / "full.dcm"
    good.save_as(full, enforce_file_format=True)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(full.read_bytes()[:-700])
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    status, comment = _store(port, cut)
    assert status == 0xA900 and "pixel data has" in comment
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)

    nopix = ct_slice(1, 1, series=series, study=study)
    del nopix.PixelData
    assert _store(port, nopix) == (0xA900, "image SOP class without pixel data")

    ds = ct_slice(2, 1, series=series, study=study)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../../../etc/passwd"  # type: ignore[assignment]
    status, comment = _store(port, ds)
    assert status == 0xC002 and "malformed" in comment and "SOP" in comment
    ds = ct_slice(2, 1, series=series, study=study)
    ds.StudyInstanceUID = "1." * 100 + "1"  # 201 characters (the SCU refuses such an Affected UID)
    status, comment = _store(port, ds)
    assert status == 0xC002 and "malformed StudyInstanceUID (201 characters)" in comment
    assert not any(p.name == "passwd" for p in (s.blob_root).rglob("*"))

    huge = ct_slice(3, 1, series=series, study=study)
    huge.Rows = huge.Columns = 60000  # header only: 7 GB if it were decoded
    status, comment = _store(port, huge)
    assert status == 0xC003 and "60000" in comment

    # an unknown SOP class is refused at negotiation (abstract syntax not supported)
    assoc = _assoc(port, contexts=("1.2.826.0.1.3680043.99999.1",))
    assert assoc.is_established  # type: ignore[attr-defined]
    rejected = [cx for cx in assoc.rejected_contexts]  # type: ignore[attr-defined]
    assert [cx.abstract_syntax for cx in rejected] == ["1.2.826.0.1.3680043.99999.1"]
    assert rejected[0].result == 0x03
    assoc.release()  # type: ignore[attr-defined]

    # a calling AE title that is not allowed: the association is rejected
    bad = _assoc(port, aet="EVILPACS")
    assert bad.is_rejected  # type: ignore[attr-defined]

    # every refusal was logged with its reason, and the node still answers
    text = caplog.text
    for reason in ("pixel data has", "without pixel data", "malformed", "exceeds the limit"):
        assert reason in text, reason
    assert _store(port, good) == (0x0000, "")
    ok = _assoc(port)
    assert int(ok.send_c_echo().Status) == 0  # type: ignore[attr-defined]
    ok.release()  # type: ignore[attr-defined]
    with node.db.sessions() as ss:
        assert ss.scalar(select(func.count()).select_from(Instance)) == 1


def test_network_allow_list_closes_other_clients(tmp_path: Path) -> None:
    s = load_settings(node={"data_dir": str(tmp_path / "d")},
                      receive={"port": 0, "allowed_networks": ["10.99.0.0/16"]})
    db = Database(s.database_url)
    upgrade(db)
    node = StorageSCP(s, db)
    node.start()
    try:
        assoc = _assoc(node.port)
        assert not assoc.is_established  # type: ignore[attr-defined]
        # readiness still sees the SCP: it answers (by refusing), which is what the probe asks
        from triage.web.api import _scp_check

        ready = s.model_copy(update={"receive": s.receive.model_copy(update={"port": node.port})})
        assert _scp_check(ready) == "ok"
    finally:
        node.stop()
    assert "nothing" in _scp_check(ready) or "no C-ECHO answer" in _scp_check(ready)


def test_deflated_syntaxes_are_never_accepted(tmp_path: Path) -> None:
    """A few MB of deflated zeros inflate to gigabytes before any size check: no Deflate of any
    kind is accepted, JPIP's referenced-deflate syntaxes included (pydicom does not flag them)."""
    s = load_settings(node={"data_dir": str(tmp_path / "d")}, receive={"port": 0})
    db = Database(s.database_url)
    upgrade(db)
    node = StorageSCP(s, db)
    deflated = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
    accepted = {str(t) for cx in node.ae.supported_contexts for t in cx.transfer_syntax}
    assert "1.2.840.10008.1.2.1" in accepted and not accepted & deflated
    node.start()
    try:  # a sender proposing only Deflate gets no usable presentation context
        ae = AE(ae_title="DEFLATER")
        ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1.99"])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="TRIAGE")
        assert not assoc.is_established or not assoc.accepted_contexts
        if assoc.is_established:
            assoc.release()
        # the node names itself, not the network library, in the association
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="TRIAGE")
        assert assoc.is_established
        assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert assoc.acceptor.implementation_version_name == "TRIAGE_NODE_1"
        assoc.release()
    finally:
        node.stop()


@pytest.mark.faults
def test_disk_above_high_water_answers_a700_and_loses_nothing(tmp_path: Path) -> None:
    s = load_settings(node={"data_dir": str(tmp_path / "d")}, receive={"port": 0},
                      storage={"high_water": 0.0001})
    db = Database(s.database_url)
    upgrade(db)
    node = StorageSCP(s, db)
    node.start()
    try:
        ds = ct_slice(0, 1, series=generate_uid(), study=generate_uid())
        status, comment = _store(node.port, ds)
        assert status == 0xA700 and "high-water" in comment
        node.ingest.high_water = 0.9999  # space "returns": it recovers by itself
        assert _store(node.port, ds)[0] == 0x0000
    finally:
        node.stop()


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.faults
def test_sigkill_mid_push_loses_no_acknowledged_instance(tmp_path: Path, ct_bundle: Bundle) -> None:
    """SIGKILL of the SCP process while 4 senders push 1 000 instances (4 series of 250)."""
    folders = [tmp_path / f"series{i}" for i in range(4)]
    pushers_files = [write_series(f, 250, size=32, spacing=1.0) for f in folders]
    port = free_port()
    s = load_settings(node={"data_dir": str(tmp_path / "data")}, receive={"port": port},
                      # long enough that a partial series never completes on a busy machine;
                      # the re-push's release finishes it early (duplicates count as carried)
                      assemble={"quiet_seconds": 120.0, "poll_seconds": 0.2},
                      executor={"poll_seconds": 0.2}, models={"chestct": str(ct_bundle.path)})
    node = Node(s).start()
    try:
        pushers = [Pusher(port, files, aet=f"PUSHER{i}") for i, files in enumerate(pushers_files)]
        for p in pushers:
            p.start()

        def acked() -> list[str]:
            return [u for p in pushers for u in p.acked]

        wait_for(lambda: len(acked()) >= 300, 60, "300 acknowledged instances", interval=0.01)
        old = int(Path(node.pid_file).read_text())
        os.kill(old, signal.SIGKILL)
        for p in pushers:
            p.join(timeout=60)
            assert not p.is_alive(), "a sender hangs after the SCP died"
        sent = acked()
        assert 300 <= len(sent) < 1000, len(sent)
        assert all(len(p.acked) < 250 for p in pushers), "a sender finished before the kill"
        # the node restarts its SCP process
        wait_for(lambda: node.pid_file.is_file() and int(node.pid_file.read_text()) != old, 30,
                 "the SCP process to be restarted")
        db = node.db
        with db.sessions() as ss:
            rows = {r.sop_instance_uid: r for r in ss.scalars(select(Instance))}
        missing = [u for u in sent if u not in rows]
        assert not missing, f"{len(missing)} of {len(sent)} acknowledged instance(s) not indexed"
        for u in sent:
            blob = s.blob_root / rows[u].blob
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == rows[u].sha256
        # the senders re-push (dcmtk, one association each) and every series is analysed once
        wait_for(lambda: echo_ok(port), 30, "the restarted SCP to answer")
        for f in folders:
            storescu(port, [f])
        wait_for(lambda: _count(db, Result) == 4, 180, "the 4 series' results")
        time.sleep(1.0)
        with db.sessions() as ss:
            series = ss.scalars(select(Series)).all()
            jobs = ss.scalars(select(Job)).all()
            assert ss.scalar(select(func.count()).select_from(Instance)) == 1000
            assert sorted(se.instance_count for se in series) == [250] * 4
            assert {(se.version, se.kind) for se in series} == {(1, "chestct")}
            assert all((se.completion_reason or "").startswith("association released") for se in series)
            assert [j.state for j in jobs] == ["done"] * 4
        assert _count(db, Result) == 4
    finally:
        node.stop()


def _count(db: Database, table: type) -> int:
    with db.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def _one_result(db: Database) -> Result | None:
    with db.sessions() as s:
        return s.scalars(select(Result)).first()
