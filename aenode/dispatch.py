"""Complete series -> jobs: the selection stage as it runs inside ``aenode serve``.

Claims each ``series.complete`` hand-over from the durable queue, reads one header of the
series, and lets the :class:`~aenode.select.studies.StudyTracker` record the jobs its rules
make (series rules at once, study rules when every role has a series or after the study
timeout). Jobs land in the store's ``jobs`` table, which is the job workers' queue.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import pydicom
from pydicom.errors import InvalidDicomError

from aenode.assemble import SERIES_TOPIC, reject_series, series_info_from_payload
from aenode.records import Job
from aenode.select.studies import StudyTracker
from aenode.store import Store

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
        series = series_info_from_payload(item.payload)
        ctx = {"study": series.study_uid, "series": series.series_uid}
        reason = "series has no spooled files"
        try:
            header = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        except IndexError:
            header = None
        except (OSError, InvalidDicomError) as exc:
            header = None
            reason = f"{series.files[0]}: cannot read header: {exc}"
        if header is None:
            # Visible in `aenode status` as a rejected series with the reason.
            self.store.nack(item.id, reason)
            reject_series(self.store, series.series_uid, series.revision, reason)
            log.error("selection skipped: %s", reason, extra=ctx)
            return jobs
        try:
            new = self.tracker.on_series(series, header, now=now)
        except sqlite3.Error as exc:
            # The store was busy or failing: hand the series out again shortly.
            self.store.nack(item.id, f"store: {exc}", retry_at=time.time() + 1.0)
            log.error("selection postponed, store error: %s", exc, extra=ctx)
            return jobs
        self.store.ack(item.id)
        return jobs + new

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set."""
        while not stop.is_set():
            try:
                jobs = self.step(time.time())
            except sqlite3.Error as exc:  # the store is busy or failing: keep trying
                log.error("dispatcher: store error, retrying: %s", exc)
                stop.wait(1.0)
                continue
            if jobs:
                self.wakeup.set()
            elif not self.store.has_ready(SERIES_TOPIC):
                stop.wait(self.poll_seconds)
