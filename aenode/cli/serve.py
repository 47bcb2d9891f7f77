"""``aenode serve``: run the node until SIGTERM or SIGINT.

Start-up fails fast: models, rules, ``runtime.device`` and a warm-up job per model are
checked before the node listens, so a node that cannot process a study never accepts one.
A stop signal ends the node within ``node.stop_timeout_seconds`` in every state: while the
models load (start-up is interrupted), while receiving, and with a job running (the job is
left ``running`` and resumes at the next start).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

from aenode.config import Settings
from aenode.errors import ConfigError
from aenode.infer.registry import RegistryError
from aenode.pipeline import Node
from aenode.process import apply_process_settings
from aenode.receive.workers import ReceiverError
from aenode.web.server import WebError

__all__ = ["command_serve"]

log = logging.getLogger(__name__)


class _StopDuringStart(BaseException):
    """Raised by the signal handler to interrupt a start-up in progress."""


def _watchdog(seconds: float) -> None:
    """Exit the process if the graceful stop takes longer than ``seconds``."""

    def expire() -> None:
        time.sleep(seconds)
        log.error(
            "not stopped within node.stop_timeout_seconds (%g s): exiting now; unfinished "
            "jobs resume at the next start",
            seconds,
        )
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=expire, name="stop-watchdog", daemon=True).start()


def command_serve(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode serve``.

    Returns
    -------
    int
        0 after a graceful stop (also when stopped during start-up), 1 if the node could
        not start (port), 2 for a bad model package or configuration (runtime.device).
    """
    apply_process_settings(settings.runtime)
    node = Node(settings)
    starting = [True]
    bound = settings.node.stop_timeout_seconds

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if node.stop_event.is_set():
            return
        log.info("stopping on %s (at most %g s)", signal.Signals(signum).name, bound)
        node.stop_event.set()
        _watchdog(bound)
        if starting[0]:
            raise _StopDuringStart

    # Before start: a SIGTERM while models load or receivers fork must stop in bound too.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node.start()
        starting[0] = False
    except _StopDuringStart:
        node.stop()
        log.info("stopped during start-up")
        return 0
    except (ReceiverError, WebError) as exc:
        log.error("cannot start: %s", exc)
        node.stop()
        return 1
    except (RegistryError, ConfigError) as exc:
        node.stop()
        log.error("cannot start: %s", exc)
        print(f"aenode: cannot start: {exc}", file=sys.stderr)
        return 2
    if node.stop_event.is_set():  # a signal between start's end and the flag
        node.stop()
        return 0
    started = time.monotonic()
    try:
        node.wait()
    finally:
        node.stop()
    log.info("stopped after %.0f s", time.monotonic() - started)
    return 0
