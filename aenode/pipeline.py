"""Wiring of the stages for ``aenode serve``.

For now: start-up recovery, the receiving processes, the assembler and a stub consumer
of ``series.complete`` that logs each handed-on series and acknowledges it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from aenode.assemble import SERIES_TOPIC, Assembler, close_stale_associations
from aenode.assemble import series_info_from_payload as _series_info
from aenode.config import Settings
from aenode.receive.spool import recover_spool
from aenode.receive.workers import ReceiverError, ReceiverPool
from aenode.store import Store

__all__ = ["Node", "command_serve", "consume_series_stub"]

log = logging.getLogger(__name__)


def consume_series_stub(store: Store, stop: threading.Event, poll_seconds: float) -> None:
    """Claim ``series.complete`` items, log them and acknowledge them (until later stages exist).

    Parameters
    ----------
    store : Store
        The store.
    stop : threading.Event
        Set to end the loop.
    poll_seconds : float
        Wait between empty polls.
    """
    while not stop.is_set():
        item = store.claim(SERIES_TOPIC)
        if item is None:
            stop.wait(poll_seconds)
            continue
        info = _series_info(item.payload)
        log.info(
            "series handed on: %s, %d instance(s), revision %d, completed by %s",
            info.modality or "?",
            len(info.files),
            info.revision,
            info.completed_by,
            extra={"study": info.study_uid, "series": info.series_uid},
        )
        store.ack(item.id)


class Node:
    """A running node: receivers, assembler and the series consumer.

    Parameters
    ----------
    settings : Settings
        The node's settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = Path(settings.storage.path)
        self.db = self.root / "aenode.db"
        self.receivers = ReceiverPool(settings)
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._store: Store | None = None

    def start(self) -> None:
        """Recover from a previous run, start listening, then assembly and hand-over.

        Raises
        ------
        ReceiverError
            If the port cannot be bound.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        store = Store(self.db)
        try:
            report = recover_spool(store, self.settings)
            closed = close_stale_associations(store)
            requeued = store.requeue_claimed(SERIES_TOPIC)
        finally:
            store.close()
        if report.recovered or report.quarantined or closed or requeued:
            log.warning(
                "start-up recovery: %d spool file(s) recorded, %d quarantined, %d temporary "
                "file(s) removed, %d association(s) closed, %d series hand-over(s) requeued",
                report.recovered,
                report.quarantined,
                report.removed_temporary,
                closed,
                requeued,
            )
        # Fork the receivers before this process opens connections or starts threads.
        self.receivers.start()
        self._store = Store(self.db)
        assembler = Assembler(self._store, self.settings)
        poll = self.settings.series.poll_seconds
        self._threads = [
            threading.Thread(target=assembler.run, args=(self.stop_event,), name="assembler"),
            threading.Thread(
                target=consume_series_stub,
                args=(self._store, self.stop_event, poll),
                name="series-consumer",
            ),
        ]
        for thread in self._threads:
            thread.start()

    def wait(self, interval: float = 1.0) -> None:
        """Block until :attr:`stop_event` is set, restarting receivers that died."""
        while not self.stop_event.wait(interval):
            self.receivers.check()

    def stop(self) -> None:
        """Stop receiving (letting running associations finish), then the workers."""
        self.stop_event.set()
        self.receivers.stop()
        for thread in self._threads:
            thread.join(10)
        if self._store is not None:
            self._store.close()
            self._store = None


def command_serve(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode serve``: run until SIGTERM or SIGINT.

    Returns
    -------
    int
        0 after a graceful stop, 1 if the node could not start.
    """
    node = Node(settings)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        node.stop_event.set()

    try:
        node.start()
    except ReceiverError as exc:
        log.error("cannot start: %s", exc)
        return 1
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    try:
        node.wait()
    finally:
        node.stop()
    log.info("stopped after %.0f s", time.monotonic() - started)
    return 0
