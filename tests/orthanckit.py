"""A real Orthanc on loopback for the tests (triage.standin.Orthanc), and a poll helper."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from nodekit import require_tool

from triage.standin import Orthanc as _Orthanc


class Orthanc(_Orthanc):
    """The product's Orthanc stand-in; a missing Orthanc fails the test with how to get it."""

    def __init__(self, root: Path, *, node_port: int | None, aet: str = "ORTHANC") -> None:
        require_tool("Orthanc", "orthanc")
        super().__init__(root, node_port=node_port, aet=aet)


def until(check: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            v = check()
        except (OSError, urllib.error.URLError, StopIteration, KeyError):
            v = None
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
