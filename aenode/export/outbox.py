"""The durable outbox: a job's result files go to every destination, retried until sent.

All state is in the store's ``outbox`` table, so retries survive restarts: one row per
(job, destination) with the files and which of them the destination already holds (a
retry sends only the rest, so no object is sent twice), the number of tries, when the
next is due and the last error. Back-off doubles from ``retry.initial_seconds`` up to
``retry.max_interval_seconds``; ``retry.give_up_after_seconds`` after the first try the
row and its job become ``failed`` with the reason, which ``aenode retry`` can reset.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from aenode.config import DestinationSettings, ExportSettings
from aenode.export.scu import SendOutcome, send_files
from aenode.store import Store

__all__ = ["Outbox", "OutboxError", "backoff_seconds", "destination_key", "parse_destination"]

log = logging.getLogger(__name__)


class OutboxError(ValueError):
    """Files that cannot be queued, or a destination key that cannot be parsed."""


def destination_key(destination: DestinationSettings) -> str:
    """The outbox's name for a destination: ``AE@host:port``."""
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def parse_destination(key: str) -> DestinationSettings:
    """Inverse of :func:`destination_key` (rows outlive configuration changes).

    Raises
    ------
    OutboxError
        If ``key`` is not of the form ``AE@host:port``.
    """
    ae, sep, address = key.rpartition("@")
    host, colon, port = address.rpartition(":")
    if not sep or not colon or not ae or not host or not port.isdigit():
        raise OutboxError(f"outbox destination {key!r}: expected AE@host:port")
    return DestinationSettings(ae_title=ae, host=host, port=int(port))


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Delay after the ``attempts``-th failed try: ``initial * 2**(attempts-1)``, capped.

    Parameters
    ----------
    attempts : int
        Failed tries so far (1 after the first failure).
    initial, maximum : float
        ``retry.initial_seconds`` and ``retry.max_interval_seconds``.
    """
    return float(min(initial * 2.0 ** max(attempts - 1, 0), maximum))


def _file_entries(files: Sequence[Path]) -> list[dict[str, Any]]:
    entries = []
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            uid = str(ds.file_meta.MediaStorageSOPInstanceUID)
        except (OSError, InvalidDicomError, AttributeError) as exc:
            raise OutboxError(f"{path}: cannot queue for export: {exc}") from exc
        entries.append({"path": str(Path(path).resolve()), "sop_uid": uid, "sent": False})
    return entries


class Outbox:
    """Durable delivery of result files to the configured destinations.

    Parameters
    ----------
    store : aenode.store.Store
        Holds the ``outbox`` and ``jobs`` tables.
    settings : aenode.config.ExportSettings
        Destinations and retry policy.
    calling_ae : str
        Our AE title in the associations.
    """

    def __init__(self, store: Store, settings: ExportSettings, calling_ae: str) -> None:
        self.store = store
        self.settings = settings
        self.calling_ae = calling_ae

    # -- queueing ---------------------------------------------------------------------

    def add(
        self, job_id: int, files: Sequence[Path], conn: sqlite3.Connection | None = None
    ) -> int:
        """Queue a job's files for every destination (one row each).

        Parameters
        ----------
        job_id : int
            The job's row id.
        files : sequence of pathlib.Path
            Part 10 files; each must be readable now.
        conn : sqlite3.Connection or None
            A connection inside the caller's :meth:`Store.transaction` to queue atomically
            with it; otherwise a transaction of its own.

        Returns
        -------
        int
            Rows added (0 when already queued, or when no destination is configured, in
            which case the job is marked ``done`` at once).

        Raises
        ------
        OutboxError
            If a file cannot be read as DICOM (nothing is queued then).
        """
        entries = json.dumps(_file_entries(files))
        now = time.time()
        if conn is not None:
            return self._add(conn, job_id, entries, now)
        with self.store.transaction() as own:
            return self._add(own, job_id, entries, now)

    def _add(self, conn: sqlite3.Connection, job_id: int, entries: str, now: float) -> int:
        if not self.settings.destinations:
            conn.execute(
                "UPDATE jobs SET state='done', reason=?, t_exported=?, updated_at=? WHERE id=?",
                ("no export destinations configured", now, now, job_id),
            )
            return 0
        added = 0
        for destination in self.settings.destinations:
            added += conn.execute(
                "INSERT OR IGNORE INTO outbox (job_id, destination, files, next_try_at)"
                " VALUES (?, ?, ?, ?)",
                (job_id, destination_key(destination), entries, now),
            ).rowcount
        return added

    def recover(self) -> int:
        """After a restart, make rows claimed by a process that died due again.

        Returns
        -------
        int
            Rows handed back.
        """
        return len(
            self.store.execute(
                "UPDATE outbox SET state='pending' WHERE state='sending' RETURNING id"
            )
        )

    def retry(self, job_id: int) -> bool:
        """Queue a job's failed rows again, with a fresh retry budget.

        Returns
        -------
        bool
            True if any row was queued again (the job's state becomes ``exporting``).
        """
        now = time.time()
        with self.store.transaction() as conn:
            count = conn.execute(
                "UPDATE outbox SET state='pending', attempts=0, first_try_at=NULL, next_try_at=?"
                " WHERE job_id=? AND state='failed'",
                (now, job_id),
            ).rowcount
            if count:
                conn.execute(
                    "UPDATE jobs SET state='exporting', reason=NULL, updated_at=? WHERE id=?",
                    (now, job_id),
                )
        if count:
            log.info("export queued again (%d destination(s))", count, extra={"job": job_id})
        return count > 0

    # -- sending ----------------------------------------------------------------------

    def _claim(self, now: float) -> list[sqlite3.Row]:
        with self.store.transaction() as conn:
            rows = conn.execute(
                "SELECT * FROM outbox WHERE state='pending' AND next_try_at<=?"
                " ORDER BY next_try_at, id",
                (now,),
            ).fetchall()
            for row in rows:
                conn.execute("UPDATE outbox SET state='sending' WHERE id=?", (row["id"],))
        return rows

    def run_due(self, now: float | None = None) -> int:
        """Send every row that is due, and record the outcomes.

        Parameters
        ----------
        now : float or None
            Epoch seconds used for due times and back-off; defaults to the clock.

        Returns
        -------
        int
            How many rows were handled (sent, rescheduled or failed).
        """
        clock = time.time() if now is None else now
        rows = self._claim(clock)
        for row in rows:
            self._handle(row, clock if now is not None else time.time())
        return len(rows)

    def _handle(self, row: sqlite3.Row, now: float) -> None:
        key = row["destination"]
        ctx = {"job": row["job_id"], "dest": key}
        entries: list[dict[str, Any]] = json.loads(row["files"])
        todo = [e for e in entries if not e["sent"]]
        missing = [e["path"] for e in todo if not Path(e["path"]).is_file()]
        if missing:
            self._finish_failed(row, now, f"result file missing: {missing[0]}", ctx)
            return
        try:
            destination = parse_destination(key)
            outcome = send_files(
                destination,
                [Path(e["path"]) for e in todo],
                calling_ae=self.calling_ae,
                timeout=self.settings.retry.timeout_seconds,
            )
        except (OutboxError, OSError, RuntimeError, ValueError) as exc:
            outcome = SendOutcome(ok=False, error=f"{key}: {exc}")
        sent = set(outcome.sent)
        for entry in entries:
            if entry["sop_uid"] in sent:
                entry["sent"] = True
        files = json.dumps(entries)
        if all(e["sent"] for e in entries):
            self._finish_sent(row, now, files, ctx)
            return
        reason = outcome.error or next(iter(outcome.failed.values()), f"{key}: not all sent")
        attempts = row["attempts"] + 1
        first = row["first_try_at"] if row["first_try_at"] is not None else now
        retry = self.settings.retry
        if now - first >= retry.give_up_after_seconds:
            self._finish_failed(row, now, reason, ctx, files=files, attempts=attempts)
            return
        delay = backoff_seconds(attempts, retry.initial_seconds, retry.max_interval_seconds)
        next_try = min(now + delay, first + retry.give_up_after_seconds)
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE outbox SET state='pending', files=?, attempts=?, first_try_at=?,"
                " next_try_at=?, last_error=? WHERE id=?",
                (files, attempts, first, next_try, reason, row["id"]),
            )
            conn.execute(
                "UPDATE jobs SET reason=?, updated_at=? WHERE id=?",
                (f"export retrying ({attempts} tries): {reason}", now, row["job_id"]),
            )
        log.warning(
            "export try %d failed, next in %.1f s: %s",
            attempts,
            next_try - now,
            reason,
            extra=ctx,
        )

    def _finish_sent(self, row: sqlite3.Row, now: float, files: str, ctx: dict[str, Any]) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE outbox SET state='sent', files=?, attempts=attempts+1, sent_at=?,"
                " first_try_at=COALESCE(first_try_at, ?), last_error=NULL WHERE id=?",
                (files, now, now, row["id"]),
            )
            open_rows = conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE job_id=? AND state!='sent'", (row["job_id"],)
            ).fetchone()[0]
            if open_rows == 0:
                conn.execute(
                    "UPDATE jobs SET state='done', reason=NULL, t_exported=?, updated_at=?"
                    " WHERE id=?",
                    (now, now, row["job_id"]),
                )
        log.info("export sent", extra=ctx)

    def _finish_failed(
        self,
        row: sqlite3.Row,
        now: float,
        reason: str,
        ctx: dict[str, Any],
        *,
        files: str | None = None,
        attempts: int | None = None,
    ) -> None:
        attempts = row["attempts"] + 1 if attempts is None else attempts
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE outbox SET state='failed', files=?, attempts=?, last_error=?,"
                " first_try_at=COALESCE(first_try_at, ?) WHERE id=?",
                (files or row["files"], attempts, reason, now, row["id"]),
            )
            conn.execute(
                "UPDATE jobs SET state='failed', reason=?, updated_at=? WHERE id=?",
                (
                    f"export to {row['destination']} failed after {attempts} tries: {reason}",
                    now,
                    row["job_id"],
                ),
            )
        log.error("export failed for good after %d tries: %s", attempts, reason, extra=ctx)

    def next_due(self) -> float | None:
        """Epoch seconds of the earliest pending row, or None."""
        rows = self.store.execute("SELECT MIN(next_try_at) AS t FROM outbox WHERE state='pending'")
        value = rows[0]["t"] if rows else None
        return float(value) if value is not None else None

    def run(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        """Send due rows until ``stop`` is set (the export worker's loop).

        Parameters
        ----------
        stop : threading.Event
            Set to end the loop after the current round.
        poll_seconds : float
            Longest sleep between rounds (new rows are picked up within it).
        """
        self.recover()
        while not stop.is_set():
            try:
                handled = self.run_due()
            except sqlite3.Error:
                # The store is busy or failing: the rows stay in it; hand back those this
                # loop had claimed and try again after a pause.
                log.exception("export round failed on the store; retrying")
                stop.wait(poll_seconds)
                self.recover()
                continue
            if handled:
                continue
            due = self.next_due()
            wait = poll_seconds if due is None else min(poll_seconds, due - time.time())
            stop.wait(max(wait, 0.01))
