"""The embedded executor: threads in the serve process claim jobs from the database.

No broker at all; the same :func:`worker.tasks.run_job` as the Celery workers.
"""

from __future__ import annotations

import logging
import threading

from worker.tasks import NodeContext, claim_next, requeue_expired, requeue_orphans, run_job, worker_name

__all__ = ["LocalExecutor"]

log = logging.getLogger(__name__)


class LocalExecutor:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self._stop = threading.Event()
        n = ctx.settings.executor.threads
        self._threads = [threading.Thread(target=self._run, args=(worker_name(f"local{i}"),),
                                          name=f"executor-{i}", daemon=True) for i in range(n)]

    def start(self) -> LocalExecutor:
        requeue_orphans(self.ctx)  # jobs a crashed earlier run left "running"
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def run_pending(self, worker: str = "local") -> int:
        """Run queued jobs until none is left (tests and one-shot use); returns how many."""
        n = 0
        while (jid := claim_next(self.ctx, worker)) is not None:
            run_job(self.ctx, jid, worker, claimed=True)
            n += 1
        return n

    def _run(self, worker: str) -> None:
        poll = self.ctx.settings.executor.poll_seconds
        while not self._stop.is_set():
            try:
                requeue_expired(self.ctx)
                jid = claim_next(self.ctx, worker)
                if jid is None:
                    self._stop.wait(poll)
                    continue
                run_job(self.ctx, jid, worker, claimed=True)
            except Exception:  # the database may be briefly unavailable; keep going
                log.exception("executor pass failed")
                self._stop.wait(poll)
