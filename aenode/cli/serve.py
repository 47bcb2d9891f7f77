"""``aenode serve``: run the node until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from types import FrameType

from aenode.config import Settings
from aenode.infer.registry import RegistryError
from aenode.pipeline import Node
from aenode.process import apply_process_settings
from aenode.receive.workers import ReceiverError

__all__ = ["command_serve"]

log = logging.getLogger(__name__)


def command_serve(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode serve``.

    Returns
    -------
    int
        0 after a graceful stop, 1 if the node could not start, 2 for a bad model package.
    """
    apply_process_settings(settings.runtime)
    node = Node(settings)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        node.stop_event.set()

    # Before start: a SIGTERM while models load or receivers fork must stop gracefully too.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node.start()
    except ReceiverError as exc:
        log.error("cannot start: %s", exc)
        node.stop()
        return 1
    except RegistryError as exc:
        print(f"aenode: cannot start: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        node.wait()
    finally:
        node.stop()
    log.info("stopped after %.0f s", time.monotonic() - started)
    return 0
