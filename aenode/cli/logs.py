"""Console logging for the ``aenode`` command: text with ``key=value`` context, or JSON lines.

The CLI is the only place that configures logging.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aenode.config import Settings
from aenode.phi import install_phi_filter

__all__ = ["configure_logging"]

# "patient" is set only when logging.phi is on; nothing else in the context is PHI.
_CONTEXT_KEYS = (
    "study",
    "series",
    "sop_uid",
    "peer_ae",
    "assoc",
    "model",
    "job",
    "dest",
    "patient",
)


class _ContextFormatter(logging.Formatter):
    """Appends the structured context passed in ``extra=`` as ``key=value`` pairs."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ctx = [f"{k}={getattr(record, k)}" for k in _CONTEXT_KEYS if hasattr(record, k)]
        return f"{base} [{' '.join(ctx)}]" if ctx else base


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT_KEYS:
            if hasattr(record, key):
                obj[key] = getattr(record, key)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj)


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record comes.

    ``StreamHandler(sys.stderr)`` keeps the stream it was given; when the CLI runs inside a
    host that swaps ``sys.stderr`` (a test runner, an embedding program), a worker thread's
    late record then hits a closed file.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(settings: Settings, verbose: bool = False) -> None:
    """Send aenode's log records to stderr as text or JSON lines.

    Parameters
    ----------
    settings : Settings
        ``logging.level`` and ``logging.json`` are used.
    verbose : bool
        Force DEBUG.
    """
    handler = _StderrHandler()
    if settings.logging.json_format:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _ContextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger("aenode")
    root.handlers[:] = [handler]
    install_phi_filter(handler, settings.logging.phi)  # libraries and warnings too, scrubbed
    root.setLevel("DEBUG" if verbose else settings.logging.level)
    root.propagate = False
    # pynetdicom is chatty at INFO; keep its warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
