"""Worker heartbeats: each analysing process says every few seconds that it is alive.

One row per process in ``worker_beat`` (upserted), with the bundles it has loaded and the
jobs it has finished. The dashboard shows each worker's age; a worker whose last beat is
older than three intervals is shown as silent (killed, hung or cut off from the database).
A worker that stops cleanly removes its row; rows silent for a day are pruned.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading

from sqlalchemy import delete

from storage.models import WorkerBeat, utcnow
from worker.tasks import NodeContext, jobs_done

__all__ = ["Heartbeat"]

log = logging.getLogger(__name__)
PRUNE_AFTER = dt.timedelta(days=1)

class Heartbeat:
    def __init__(self, ctx: NodeContext, kind: str, name: str | None = None) -> None:
        self.ctx = ctx
        self.kind = kind
        self.name = name or f"{kind}@{socket.gethostname()}:{os.getpid()}"
        self.started = utcnow()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def beat(self) -> None:
        now = utcnow()
        # only bundles already loaded: a heartbeat never loads a model
        models = self.ctx.__dict__.get("models")
        bundles = models.loaded() if models is not None else {}
        with self.ctx.db.session() as s:
            s.merge(WorkerBeat(name=self.name, kind=self.kind, host=socket.gethostname(), pid=os.getpid(),
                               started_at=self.started, last_seen=now, jobs_done=jobs_done(),
                               bundles=bundles))
            s.execute(delete(WorkerBeat).where(WorkerBeat.last_seen < now - PRUNE_AFTER))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            with self.ctx.db.session() as s:
                s.execute(delete(WorkerBeat).where(WorkerBeat.name == self.name))
        except Exception:  # the database may be gone at shutdown; the row then ages out
            log.warning("could not remove heartbeat row %s", self.name)

    def _run(self) -> None:
        interval = self.ctx.settings.executor.heartbeat_seconds
        while True:
            try:
                self.beat()
            except Exception as exc:  # the database may be briefly unavailable
                log.warning("heartbeat failed (%s)", type(exc).__name__)
            if self._stop.wait(interval):
                return
