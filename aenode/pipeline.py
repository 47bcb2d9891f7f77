"""Wiring of the stages for ``aenode serve``: one process by default.

Start-up fails fast: load and validate the model packages and the rules (role names
against the cards), check ``runtime.device``, recover the spool, the store's half-done work
and the outbox, load every model on its device and run one synthetic warm-up job per model
(so the first study does not pay for cold caches); only then fork the receiving processes
and listen. A problem at any step stops start-up before anything is accepted. Then run,
each in its own thread, the assembler (series completion), the dispatcher (selection:
complete series -> jobs), the job workers (volume -> inference -> result objects -> outbox)
and the outbox (C-STORE with retries). If a stage stops for good later, the node refuses
new C-STOREs (:mod:`aenode.health`) instead of taking in data it would never process.
Last, unless ``http.port`` is null, the web server (:mod:`aenode.web`: dashboard,
``/healthz``, ``/metrics``) starts in a thread of its own.
Stages talk only through the store, so each could later run on another machine.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from aenode.assemble import SERIES_TOPIC, Assembler, close_stale_associations
from aenode.config import Settings
from aenode.dispatch import Dispatcher
from aenode.export.outbox import Outbox
from aenode.health import clear_refusal, refuse
from aenode.infer.executor import Executor, write_executor_file
from aenode.infer.registry import Registry, RegistryError
from aenode.infer.runtime import resolve_devices
from aenode.infer.start import open_executor
from aenode.jobs import JobRunner, requeue_interrupted
from aenode.receive.spool import recover_spool
from aenode.receive.workers import ReceiverPool
from aenode.select.rules import compile_rules
from aenode.select.studies import (
    StudyTracker,
    check_rule_roles,
    role_requirements,
    role_waits,
)
from aenode.store import Store
from aenode.warmup import warm_up
from aenode.web.server import WebServer

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
        self._runtime: Executor | None = None
        self.web: WebServer | None = None
        self.refusal: str | None = None

    def start(self) -> None:
        """Recover from a previous run, start listening, then assembly and hand-over.

        Raises
        ------
        ReceiverError
            If the port cannot be bound.
        aenode.web.WebError
            If ``http.port`` cannot be bound (checked first, before the models load).
        RegistryError
            If a model package is invalid (missing file, checksum, card field).
        aenode.config.ConfigError
            If a selection rule names a model that is not loaded.
        """
        settings = self.settings
        if settings.http.port is not None:  # a taken port stops start-up at once
            self.web = WebServer(settings)
            self.web.bind()
        # Models, rules and devices first: a node that cannot run its models accepts nothing.
        registry = Registry.load(settings.models)
        rules = compile_rules(settings.selection.rules, known_models=registry.names())
        cards = {name: registry.card(name) for name in registry.names()}
        check_rule_roles(settings.selection.rules, cards)
        if settings.runtime.executor == "local":  # Ray's actors check their own devices
            resolve_devices(settings.runtime.device)  # ConfigError naming runtime.device
        log.info("models loaded: %s; %d selection rule(s)", registry.names(), len(rules))
        self.root.mkdir(parents=True, exist_ok=True)
        clear_refusal(self.root)
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
        # Every model loaded on its device and warm (one synthetic job each) before the
        # node listens: a model that cannot run stops start-up instead of taking in studies.
        # runtime.executor: local (device threads here) or ray (warm actors on a cluster);
        # a ConfigError names runtime.executor or runtime.ray.address.
        self._runtime = runtime = open_executor(settings, registry)
        write_executor_file(self.root, runtime.describe())
        failures: dict[str, str] = {}
        warm_up(registry, runtime, settings.results, failures)
        fatal = {
            name: why
            for name, why in failures.items()
            if registry.card(name).runtime.format in ("torchscript", "state_dict")
        }
        if fatal:
            raise RegistryError(
                "; ".join(f"model {name}: warm-up failed: {why}" for name, why in fatal.items())
            )
        # The receivers fork now; they use neither torch nor the runtime's threads.
        self.receivers.start()
        listening_since = time.time()
        self._store = store = Store(self.db)
        tracker = StudyTracker(
            store,
            rules,
            role_requirements(cards),
            timeout=settings.selection.study_timeout_seconds,
            waits=role_waits(cards),
        )
        outbox = Outbox(store, settings.export, calling_ae)
        runner = JobRunner(settings, store, registry, runtime, outbox)
        assembler = Assembler(store, settings, since=listening_since)
        poll = settings.series.poll_seconds
        dispatcher = Dispatcher(store, tracker, poll)
        stop = self.stop_event
        self._threads = [
            threading.Thread(target=assembler.run, args=(stop,), name="assembler"),
            threading.Thread(target=dispatcher.run, args=(stop,), name="dispatcher"),
            threading.Thread(target=outbox.run, args=(stop, poll), name="outbox"),
        ]
        self._threads += [
            threading.Thread(
                target=runner.run_forever,
                args=(stop, dispatcher.wakeup, poll),
                name=f"job-{i}",
            )
            for i in range(JOB_WORKERS)
        ]
        for thread in self._threads:
            thread.start()
        if self.web is not None:
            # The dashboard, /healthz and /metrics, on a store connection of their own.
            self.web.start(Store(self.db), list(cards.values()), self.receivers.count)

    def fail(self, reason: str) -> None:
        """Refuse new C-STOREs from now on, with ``reason`` (a model or stage failed for good).

        The flag (:mod:`aenode.health`) is seen by every receiving process within a second
        and by ``aenode status``; a restart checks everything again and clears it.
        """
        if self.refusal is None:
            self.refusal = reason
            refuse(self.root, reason)

    def check_health(self) -> str | None:
        """Refuse C-STOREs once a stage's thread has died; returns the refusal reason or None."""
        if not self.stop_event.is_set():
            for thread in self._threads:
                if not thread.is_alive():
                    self.fail(
                        f"the {thread.name} worker stopped; nothing received would be "
                        "processed (see the log, then restart the node)"
                    )
                    break
        return self.refusal

    def wait(self, interval: float = 1.0) -> None:
        """Block until :attr:`stop_event` is set, restarting receivers that died and
        refusing C-STOREs once a stage has stopped for good (:meth:`check_health`)."""
        while not self.stop_event.wait(interval):
            self.receivers.check()
            self.check_health()
            if self._runtime is not None:  # actors restarted, jobs in flight: aenode status
                try:
                    write_executor_file(self.root, self._runtime.describe())
                except OSError as exc:  # a full disk: the store's owners report it
                    log.debug("executor.json not written: %s", exc)

    def stop(self) -> None:
        """Stop receiving (letting running associations finish), then the workers.

        Waits at most ``node.stop_timeout_seconds`` in all; a job still running then is
        left ``running`` and resumes at the next start (``aenode serve`` exits anyway).
        """
        self.stop_event.set()
        deadline = time.monotonic() + self.settings.node.stop_timeout_seconds
        if self.web is not None:
            web, self.web = self.web, None
            web.stop(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
        self.receivers.stop(timeout=max(1.0, min(15.0, deadline - time.monotonic())))
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._runtime is not None:
            runtime, self._runtime = self._runtime, None
            closer = threading.Thread(target=runtime.close, name="runtime-close", daemon=True)
            closer.start()
            closer.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            log.warning(
                "stopped with work in flight after node.stop_timeout_seconds (%g s); "
                "unfinished jobs resume at the next start",
                self.settings.node.stop_timeout_seconds,
            )
            return  # the store stays open for the threads still using it; the process exits
        if self._store is not None:
            self._store.close()
            self._store = None
