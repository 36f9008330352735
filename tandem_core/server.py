"""A uvicorn server on a background thread: the daemon (``tandem ask``, the demo), the gateway
started by the pipeline, and the tests all serve their ASGI app through this one class."""

from __future__ import annotations

import threading
import time
from typing import Any

from tandem_core.errors import TandemError


class ServerThread:
    """Serves an ASGI app with uvicorn on a background thread (demo, tests, ``tandem ask``)."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="tandem-http", daemon=True)
        self.host = host

    def start(self, *, timeout: float = 30.0) -> str:
        """Start serving and return the base URL once the socket listens."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise TandemError(f"the HTTP server on {self.host} did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)
