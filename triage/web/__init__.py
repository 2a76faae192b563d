"""The node's web side: the JSON API, /metrics and the admin pages."""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["WebServer", "server_config"]


def server_config(app: Any, host: str, port: int, log_level: str = "warning") -> Any:
    """uvicorn's settings for ``triage serve`` and ``triage web`` alike.

    No access log: its request lines would carry patient names (``/worklist?q=DOE^JANE``) and
    study UIDs (``/api/studies/1.2.…``). ``log_config=None`` keeps uvicorn's own handlers out,
    so its records reach the process's logging set-up (``triage.serve._configure_logging``)
    in the project's format.
    """
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, log_config=None)


class WebServer:
    """uvicorn in a background thread (``triage serve``); ``triage web`` runs it in front."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        # uvicorn installs no signal handlers outside the main thread; the node owns them
        self.server = uvicorn.Server(server_config(app, host, port))
        self._thread = threading.Thread(target=self.server.run, name="web", daemon=True)

    def start(self) -> WebServer:
        self._thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        return self

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
