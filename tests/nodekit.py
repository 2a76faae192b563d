"""Helpers for the node's integration tests: peers, data and waiting."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
import pytest

from flows.build import BuildOptions
from flows.bundle import Bundle
from flows.patchbundle import build_patch_bundle
from flows.phantoms.chestct import make_chestct
from flows.presets import get_preset
from triage.phantom_dicom import write_dicom_studies

T = TypeVar("T")


def require_tool(name: str, package: str) -> str:
    """The tool's path, or a test failure that says how to get it (never a skip)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install it with `apt-get install {package}` "
                    "(scripts/test does this on Debian)", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_ok(port: int, called_ae: str = "TRIAGE") -> bool:
    """Does the node on ``port`` answer C-ECHO?"""
    from triage.dispatch import c_echo

    return c_echo("127.0.0.1", port, called_ae, calling_ae="PROBE", timeout=5) is None


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Terminate ``proc``, and kill it if it does not exit in ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def storescu(port: int, paths: Sequence[Path], *, aec: str = "TRIAGE", aet: str = "STORESCU",
             check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Send files or folders (recursively, *.dcm) with dcmtk's storescu."""
    exe = require_tool("storescu", "dcmtk")
    cmd = [exe, "-aet", aet, "-aec", aec, "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(port),
           *map(str, paths)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"storescu failed ({res.returncode}): {res.stderr[-2000:]}")
    return res


class Pusher(threading.Thread):
    """Sends files (explicit VR little endian) over one pynetdicom association, recording each
    instance's status; ``run()`` sends them in the caller's thread, ``start()`` in its own.

    ``statuses`` maps SOP Instance UID to the C-STORE status (None: no answer). The thread
    stops at the first lost association, as a sender whose peer vanished does.
    """

    def __init__(self, port: int, paths: Sequence[Path], *, aet: str = "PUSHER", aec: str = "TRIAGE") -> None:
        super().__init__(daemon=True)
        self.port, self.aet, self.aec = port, aet, aec
        self.paths = list(paths)
        heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in self.paths]
        self.uids = [str(h.SOPInstanceUID) for h in heads]
        self.sop_classes = sorted({str(h.SOPClassUID) for h in heads})
        self.established = False
        self.statuses: dict[str, int | None] = {}

    @property
    def acked(self) -> list[str]:
        return [u for u, st in list(self.statuses.items()) if st == 0]

    def run(self) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=self.aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class in self.sop_classes:
            ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.aec)
        self.established = bool(assoc.is_established)
        if not assoc.is_established:
            return
        try:
            for uid, p in zip(self.uids, self.paths, strict=True):
                try:
                    st = assoc.send_c_store(p)
                except Exception:  # the peer vanished mid-message
                    self.statuses[uid] = None
                    return
                self.statuses[uid] = int(st.Status) if st and "Status" in st else None
                if not assoc.is_established:
                    return
        finally:
            if assoc.is_established:
                assoc.release()


CHEST_SHAPE = (60, 64, 64)  # 2 mm slices: routed as chest CT (<= 3 mm), >= 120 mm field of view


def chest_ct_patch_bundle(out: Path) -> Bundle:
    """A tiny chest-CT patch bundle (tiny-chestct preset) trained on a few phantoms (~10 s)."""
    n = make_chestct(4, shape=CHEST_SHAPE, spacing_mm=2.0, seed=1)
    m = make_chestct(4, shape=CHEST_SHAPE, spacing_mm=2.0, abnormal_fraction=0.5, seed=2)
    v = make_chestct(6, shape=CHEST_SHAPE, spacing_mm=2.0, abnormal_fraction=0.5, seed=3)
    return build_patch_bundle(out, preset=get_preset("tiny-chestct"), normal=n.volumes(),
                              mixture=m.volumes(), validation=(v.volumes(), np.asarray(v.labels)),
                              name="tiny-chestct", options=BuildOptions(progress=False), log=lambda s: None)


def chest_ct_study(out: Path, seed: int = 7, abnormal: float = 0.0) -> Path:
    ps = make_chestct(1, shape=CHEST_SHAPE, spacing_mm=2.0, abnormal_fraction=abnormal, seed=seed)
    write_dicom_studies(ps, out, seed=seed)
    return out


def cxr_studies(out: Path, n: int = 2, seed: int = 5) -> Path:
    from flows.phantoms import make_cxr

    ps = make_cxr(n, size=64, abnormal_fraction=0.5, seed=seed)
    write_dicom_studies(ps, out, seed=seed)
    return out
