"""``triage serve``: the node on one machine.

Processes: the storage SCP runs in its own process (reception never waits for an
analysis, and an analysis that crashes the interpreter cannot stop reception); the main
process runs the assembler's quiet-period pass and either the local executor or, with
``executor.kind = "celery"``, the dispatcher that feeds Celery workers. The main process
restarts the SCP process if it dies.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from storage.db import Database
from storage.migrate import current_revision, head_revision, upgrade
from triage.assemble import Assembler
from triage.config import Settings

__all__ = ["Node", "prepare_database", "run_scp", "stop_on_signals"]

log = logging.getLogger(__name__)


def prepare_database(settings: Settings, *, migrate: bool = True) -> Database:
    """Open the database and bring its schema to the current revision."""
    db = Database(settings.database_url)
    if migrate:
        upgrade(db)
    elif current_revision(db) != head_revision(db):
        raise RuntimeError("the database schema is not current; run `triage db upgrade`")
    return db


def _configure_logging(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines name source UIDs


def run_scp(settings: Settings, level: int = logging.INFO, ready: Any = None) -> None:
    """The SCP process's main function: listen until SIGTERM."""
    from triage.receive import StorageSCP

    _configure_logging(level)
    scp = StorageSCP(settings)
    server = scp.start()
    if ready is not None:
        ready.put(int(server.server_address[1]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent = os.getppid()
    # If the serve process is killed (SIGKILL, OOM), stop too: an orphan SCP would keep the
    # port and acknowledge instances that nothing completes or analyses.
    while not stop.wait(1.0):
        if os.getppid() != parent:
            logging.getLogger(__name__).error("the serve process is gone; the SCP stops")
            break
    scp.stop()


class Node:
    """The SCP process plus the assembler and an executor in this process."""

    def __init__(self, settings: Settings, *, log_level: int = logging.INFO) -> None:
        self.settings = settings
        self.log_level = log_level
        self.db = prepare_database(settings)
        self._mp = mp.get_context("spawn")  # never fork a process that may hold CUDA or threads
        self._scp: BaseProcess | None = None
        self.port: int | None = None
        self._stop = threading.Event()
        self._parts: list[Any] = []
        self.web: Any = None

    @property
    def pid_file(self) -> Path:
        return self.settings.node.data_dir / "scp.pid"

    def _start_scp(self) -> None:
        ready = self._mp.Queue()
        p = self._mp.Process(target=run_scp, args=(self.settings, self.log_level, ready), name="scp",
                             daemon=True)
        p.start()
        try:
            self.port = ready.get(timeout=60)
        except Exception as exc:
            p.terminate()
            raise RuntimeError("the SCP process did not start (see its log above)") from exc
        self._scp = p
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(f"{p.pid}\n")
        log.info("SCP process %d listening on port %d", p.pid, self.port)

    def start(self) -> Node:
        from triage.audit import record_configuration
        from worker.tasks import NodeContext

        changes = record_configuration(self.db, self.settings)
        if changes:
            log.info("configuration changed since the last start: %s", ", ".join(changes))
        self._start_scp()
        self._parts.append(Assembler(self.db, self.settings).start())
        ctx = NodeContext(self.settings)
        if self.settings.executor.kind == "celery":
            from worker.celery_app import Dispatcher

            self._parts.append(Dispatcher(ctx).start())
        else:
            from worker.local import LocalExecutor

            self._parts.append(LocalExecutor(ctx).start())
        from worker.heartbeat import Heartbeat
        from worker.report import DeliveryLoop

        self._parts.append(DeliveryLoop(ctx).start())
        # the serve process analyses itself with the local executor; with Celery it dispatches
        kind = "local" if self.settings.executor.kind == "local" else "node"
        self._parts.append(Heartbeat(ctx, kind).start())
        if self.settings.web.enabled:
            from triage.web import WebServer
            from triage.web.api import create_app

            w = self.settings.web
            self.web = WebServer(create_app(self.settings, ctx.db), w.host, w.port).start()
            self._parts.append(self.web)
            log.info("web page and API on http://%s:%d/", w.host, self.web.port)
        threading.Thread(target=self._watch, name="scp-watch", daemon=True).start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            p = self._scp
            if p is not None and not p.is_alive() and not self._stop.is_set():
                log.error("the SCP process exited (code %s); restarting it", p.exitcode)
                try:
                    self._start_scp()
                except Exception:
                    log.exception("SCP restart failed; retrying")
                    time.sleep(2)

    def stop(self) -> None:
        self._stop.set()
        for part in reversed(self._parts):
            part.stop()
        p = self._scp
        if p is not None and p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGTERM)
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.pid_file.unlink(missing_ok=True)
        self.db.dispose()

    def wait(self, stop: threading.Event | None = None) -> None:
        """Block until ``stop`` is set (by default: SIGTERM or SIGINT), then stop."""
        stop = stop or stop_on_signals()
        stop.wait()
        self.stop()


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (install it before starting, so that a signal that
    arrives during start-up is not lost)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop
