"""Wiring of the stages for ``aenode serve``: one process by default.

Start-up: recover the spool, the store's half-done work and the outbox; load and validate
the model packages and the rules (a bad one stops start-up before anything is accepted);
fork the receiving processes; then run, each in its own thread, the assembler (series
completion), the dispatcher (selection: complete series -> jobs), the job workers
(volume -> inference -> result objects -> outbox; they start after one synthetic warm-up
job per model, so the first study does not pay for cold caches) and the outbox (C-STORE
with retries).
Stages talk only through the store, so each could later run on another machine.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from aenode.assemble import SERIES_TOPIC, Assembler, close_stale_associations
from aenode.config import Settings
from aenode.dispatch import Dispatcher
from aenode.export.outbox import Outbox
from aenode.infer.registry import Registry
from aenode.infer.runtime import Runtime
from aenode.jobs import JobRunner, requeue_interrupted
from aenode.receive.spool import recover_spool
from aenode.receive.workers import ReceiverPool
from aenode.select.rules import compile_rules
from aenode.select.studies import StudyTracker, role_requirements
from aenode.store import Store
from aenode.warmup import warm_up

__all__ = ["JOB_WORKERS", "Node"]

JOB_WORKERS = 2
"""Job threads: one builds volumes or writes results while another waits on inference."""

log = logging.getLogger(__name__)


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
        self._runtime: Runtime | None = None

    def start(self) -> None:
        """Recover from a previous run, start listening, then assembly and hand-over.

        Raises
        ------
        ReceiverError
            If the port cannot be bound.
        RegistryError
            If a model package is invalid (missing file, checksum, card field).
        aenode.config.ConfigError
            If a selection rule names a model that is not loaded.
        """
        settings = self.settings
        # Models and rules first: a node that cannot run its models accepts nothing.
        registry = Registry.load(settings.models)
        rules = compile_rules(settings.selection.rules, known_models=registry.names())
        log.info("models loaded: %s; %d selection rule(s)", registry.names(), len(rules))
        self.root.mkdir(parents=True, exist_ok=True)
        store = Store(self.db)
        calling_ae = settings.calling_ae
        try:
            report = recover_spool(store, settings)
            closed = close_stale_associations(store)
            requeued = store.requeue_claimed(SERIES_TOPIC)
            jobs_again = requeue_interrupted(store)
            sending_again = Outbox(store, settings.export, calling_ae).recover()
        finally:
            store.close()
        if report.recovered or report.quarantined or closed or requeued or jobs_again:
            log.warning(
                "start-up recovery: %d spool file(s) recorded, %d quarantined, %d temporary "
                "file(s) removed, %d association(s) closed, %d series hand-over(s) requeued, "
                "%d job(s) and %d export(s) resumed",
                report.recovered,
                report.quarantined,
                report.removed_temporary,
                closed,
                requeued,
                jobs_again,
                sending_again,
            )
        # Fork the receivers before this process opens connections or starts threads.
        self.receivers.start()
        self._store = store = Store(self.db)
        cards = {name: registry.card(name) for name in registry.names()}
        tracker = StudyTracker(
            store,
            rules,
            role_requirements(cards),
            timeout=settings.selection.study_timeout_seconds,
        )
        self._runtime = Runtime(registry, settings.runtime)
        outbox = Outbox(store, settings.export, calling_ae)
        runner = JobRunner(settings, store, registry, self._runtime, outbox)
        assembler = Assembler(store, settings)
        poll = settings.series.poll_seconds
        dispatcher = Dispatcher(store, tracker, poll)
        stop = self.stop_event
        self._threads = [
            threading.Thread(target=assembler.run, args=(stop,), name="assembler"),
            threading.Thread(target=dispatcher.run, args=(stop,), name="dispatcher"),
            threading.Thread(target=outbox.run, args=(stop, poll), name="outbox"),
        ]
        runtime = self._runtime

        def warm_then_run_jobs() -> None:
            # Receiving, assembly and selection already run; jobs start once models are warm.
            warm_up(registry, runtime, settings.results)
            workers = [
                threading.Thread(
                    target=runner.run_forever,
                    args=(stop, dispatcher.wakeup, poll),
                    name=f"job-{i}",
                )
                for i in range(JOB_WORKERS)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()

        self._threads.append(threading.Thread(target=warm_then_run_jobs, name="jobs"))
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
            thread.join(30)
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
        if self._store is not None:
            self._store.close()
            self._store = None
