"""Complete series -> jobs: the selection stage as it runs inside ``aenode serve``.

Claims each ``series.complete`` hand-over from the durable queue, reads one header of the
series, and lets the :class:`~aenode.select.studies.StudyTracker` record the jobs its rules
make (series rules at once, study rules when every role has a series or after the study
timeout). Jobs land in the store's ``jobs`` table, which is the job workers' queue.

A hand-over whose selection raises unexpectedly is handed out again later (1 s, 2 s, ...)
and quarantined after :data:`aenode.supervise.QUARANTINE_AFTER` tries (the queue counts
them); the series behind it go on. A store error postpones it without counting.
"""

from __future__ import annotations

import logging
import threading
import time

import pydicom
from pydicom.errors import InvalidDicomError

from aenode.assemble import SERIES_TOPIC, reject_series, series_info_from_payload
from aenode.records import Job
from aenode.select.studies import StudyTracker
from aenode.store import QueueItem, Store
from aenode.supervise import Failures, describe, is_resource_error, supervise

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)


class Dispatcher:
    """Turns complete series into recorded jobs.

    Parameters
    ----------
    store : Store
        The node's store.
    tracker : StudyTracker
        Compiled rules and study-role state.
    poll_seconds : float
        Wait between empty polls of the queue.
    """

    def __init__(self, store: Store, tracker: StudyTracker, poll_seconds: float) -> None:
        self.store = store
        self.tracker = tracker
        self.poll_seconds = poll_seconds
        self.wakeup = threading.Event()
        self.failures = Failures()

    def step(self, now: float | None = None) -> list[Job]:
        """Handle one queued series (if any) and the study timeouts that are due.

        Returns
        -------
        list of Job
            The jobs recorded in this step.
        """
        jobs = self.tracker.due(now)
        item = self.store.claim(SERIES_TOPIC, now)
        if item is None:
            return jobs
        try:
            series = series_info_from_payload(item.payload)
        except Exception as exc:  # a malformed hand-over: that item only
            self._failed(item, exc, {"series": item.key})
            return jobs
        ctx = {"study": series.study_uid, "series": series.series_uid}
        reason = "series has no spooled files"
        try:
            header = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        except IndexError:
            header = None
        except (OSError, InvalidDicomError) as exc:
            header = None
            reason = f"{series.files[0]}: cannot read header: {exc}"
        except Exception as exc:  # pydicom on a malformed file: bad input, not a bug
            header = None
            reason = f"{series.files[0]}: cannot read header: {describe(exc)}"
        if header is None:
            # Visible in `aenode status` as a rejected series with the reason.
            self.store.nack(item.id, reason)
            reject_series(self.store, series.series_uid, series.revision, reason)
            log.error("selection skipped: %s", reason, extra=ctx)
            return jobs
        try:
            new = self.tracker.on_series(series, header, now=now)
        except Exception as exc:
            self._failed(item, exc, ctx)
            return jobs
        self.store.ack(item.id)
        return jobs + new

    def _failed(self, item: QueueItem, exc: Exception, ctx: dict[str, str]) -> None:
        if is_resource_error(exc):
            # The store was busy or failing: hand the series out again shortly.
            self.store.nack(item.id, f"store: {exc}", retry_at=time.time() + 1.0)
            log.error("selection postponed, store error: %s", exc, extra=ctx)
            return
        tries = self.failures.failed(
            item.key, exc, log, f"selection of series {item.key}", ctx, tries=item.attempts
        )
        reason = f"selection: internal error: {describe(exc)}"
        if self.failures.exhausted(tries):
            self.store.quarantine(item.id, f"quarantined after {tries} tries: {reason}")
            log.error("series hand-over %s quarantined", item.key, extra=ctx)
        else:
            delay = backoff_delay(tries)
            self.store.nack(item.id, f"try {tries}: {reason}", retry_at=time.time() + delay)

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set; no series and no store error ends it."""

        def step() -> bool:
            jobs = self.step(time.time())
            if jobs:
                self.wakeup.set()
            return bool(jobs) or self.store.has_ready(SERIES_TOPIC)

        def resume() -> None:
            # This thread is the only consumer: what it had claimed goes back.
            self.store.requeue_claimed(SERIES_TOPIC)

        supervise(
            "dispatcher",
            step,
            stop,
            idle=lambda: stop.wait(self.poll_seconds),
            on_resume=resume,
        )


def backoff_delay(tries: int) -> float:
    """Seconds before an item that failed ``tries`` times is handed out again (1, 2, 4 ...)."""
    return float(min(2.0 ** (tries - 1), 60.0))
