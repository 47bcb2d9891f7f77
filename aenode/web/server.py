"""The web server's thread inside ``aenode serve``: uvicorn on ``http.host:http.port``.

The socket is bound in the caller's thread, so a port in use fails start-up with a
:class:`WebError` naming ``http.port``; uvicorn then serves on it in a thread of its own
(it installs no signal handler outside the main thread) and stops when asked.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence

import uvicorn

from aenode.config import Settings
from aenode.errors import AenodeError
from aenode.infer.cards import ModelCard
from aenode.store import Store
from aenode.web.app import build_app

__all__ = ["WebError", "WebServer"]

log = logging.getLogger(__name__)


class WebError(AenodeError, RuntimeError):
    """The web server cannot start (the port is taken); the message names ``http.port``."""


class WebServer:
    """The dashboard, ``/healthz`` and ``/metrics`` of one node, served from a thread.

    Parameters
    ----------
    settings : Settings
        ``http.host`` and ``http.port`` (not None), and what the app reads.
    store : Store
        A store connection of the server's own.
    cards : sequence of ModelCard
        The loaded models.
    receivers : int
        Receiving processes on ``node.port``.
    """

    def __init__(
        self, settings: Settings, store: Store, cards: Sequence[ModelCard], receivers: int
    ) -> None:
        self.settings = settings
        self.store = store
        self.app = build_app(settings, store, cards, receivers)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Bind and serve.

        Raises
        ------
        WebError
            If ``http.host:http.port`` cannot be bound or the server does not start.
        """
        http = self.settings.http
        assert http.port is not None
        family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((http.host, http.port))
        except OSError as exc:
            sock.close()
            raise WebError(f"http.port: cannot listen on {http.host}:{http.port}: {exc}") from exc
        sock.listen(64)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", access_log=False, log_config=None
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise WebError(
                    f"http.port: the web server on {http.host}:{http.port} did not start"
                )
            time.sleep(0.02)
        log.info("web server on http://%s:%d (dashboard, /healthz, /metrics)", http.host, self.port)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and wait for the thread (at most ``timeout`` seconds)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None
        self.store.close()
