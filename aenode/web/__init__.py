"""The operations web server of ``aenode serve``: dashboard, ``/healthz``, ``/metrics``.

``app`` holds the routes (Starlette), ``pages`` the server-rendered HTML, ``checks`` the
health checks, ``prom`` the Prometheus collector reading the store at scrape time and
``server`` the uvicorn thread.
"""

from __future__ import annotations

from aenode.web.app import build_app
from aenode.web.checks import Health, check_health
from aenode.web.server import WebError, WebServer

__all__ = ["Health", "WebError", "WebServer", "build_app", "check_health"]
