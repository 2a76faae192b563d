"""The node's web side: the JSON API, /metrics and (next) the admin pages."""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["WebServer"]


class WebServer:
    """uvicorn in a background thread (``triage serve``); ``triage web`` runs it in front."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        # uvicorn installs no signal handlers outside the main thread; the node owns them
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False))
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
