"""Network helpers shared by the benchmarks (ingest, latency)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["free_port", "listening", "run_storescu", "tcp_env"]


def tcp_env() -> dict[str, str]:
    """The environment for dcmtk tools, with TCP_NODELAY on (as the issue's runs ask)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Is something listening on ``port``? (/proc, so as not to open an association)"""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as fh:
            for line in fh.readlines()[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def run_storescu(args: list[str], log: Path) -> tuple[float, float]:
    """Run dcmtk's ``storescu args...`` (TCP_NODELAY on); returns (seconds, wall-clock time at its exit)."""
    with open(log, "ab") as fh:
        t = time.perf_counter()
        rc = subprocess.run(["storescu", *args], env=tcp_env(), stdout=fh,
                            stderr=subprocess.STDOUT).returncode
        secs, end = time.perf_counter() - t, time.time()
    if rc != 0:
        raise RuntimeError(f"storescu exited with {rc}; see {log}")
    return secs, end
