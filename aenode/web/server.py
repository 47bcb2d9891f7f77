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

    :meth:`bind` takes the port first (``aenode serve`` does it before loading models, so
    a taken port stops start-up before anything is accepted); :meth:`start` serves.

    Parameters
    ----------
    settings : Settings
        ``http.host`` and ``http.port`` (not None), and what the app reads.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: Store | None = None
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def bind(self) -> None:
        """Take ``http.host:http.port``.

        Raises
        ------
        WebError
            If it cannot be bound (in use, or not an address of this host).
        """
        http = self.settings.http
        if http.port is None:
            raise WebError("http.port: null, the web server is turned off")
        family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((http.host, http.port))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise WebError(f"http.port: cannot listen on {http.host}:{http.port}: {exc}") from exc
        self._sock = sock
        self.port = sock.getsockname()[1]

    def start(
        self,
        store: Store,
        cards: Sequence[ModelCard],
        receivers: int,
        timeout: float = 10.0,
    ) -> None:
        """Serve (binding first if :meth:`bind` was not called).

        Parameters
        ----------
        store : Store
            A store connection of the server's own (closed by :meth:`stop`).
        cards : sequence of ModelCard
            The loaded models.
        receivers : int
            Receiving processes on ``node.port``.
        timeout : float
            Seconds to wait for uvicorn to start.

        Raises
        ------
        WebError
            If the port cannot be bound or the server does not start.
        """
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        self.store = store
        app = build_app(self.settings, store, cards, receivers)
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False, log_config=None
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._sock]}, name="http", daemon=True
        )
        self._thread.start()
        http = self.settings.http
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise WebError(
                    f"http.port: the web server on {http.host}:{self.port} did not start"
                )
            time.sleep(0.02)
        log.info("web server on http://%s:%d (dashboard, /healthz, /metrics)", http.host, self.port)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, wait for the thread (at most ``timeout`` seconds), release the port."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None
        if self.store is not None:
            self.store.close()
            self.store = None
