"""The durable outbox: a job's result files go to every destination, retried until sent.

This module owns the store's ``outbox`` table (the job rows it finishes are changed through
:mod:`aenode.jobs`). All state is in the table, so retries survive restarts: one row per
(job, destination) with the files and which of them the destination already holds (a
retry sends only the rest, so no object is sent twice), the number of tries, when the
next is due and the last error. Back-off doubles from ``retry.initial_seconds`` up to
``retry.max_interval_seconds``; ``retry.give_up_after_seconds`` after the first try the
row and its job become ``failed`` with the reason, which ``aenode retry`` can reset.
A row whose handling raises unexpectedly is due again later and ``quarantined`` after
:data:`aenode.supervise.QUARANTINE_AFTER` tries (its job ``failed``, retried the same way);
a store error ends the round, the loop backs off and hands the claimed rows back.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from aenode import audit, jobs
from aenode.config import DestinationSettings, ExportSettings
from aenode.errors import InputError
from aenode.export.commitment import get_report, request_commitment
from aenode.export.scu import SendOutcome, send_files
from aenode.states import JobState, OutboxState, transition
from aenode.store import Store
from aenode.supervise import Failures, Quarantined, describe, is_resource_error, supervise

__all__ = [
    "DestinationLoad",
    "Outbox",
    "OutboxError",
    "backoff_seconds",
    "destination_loads",
    "destination_key",
    "export_states",
    "parse_destination",
    "quarantined_exports",
]

log = logging.getLogger(__name__)


class OutboxError(InputError):
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
        entries.append(
            {
                "path": str(Path(path).resolve()),
                "sop_uid": uid,
                "sop_class": str(ds.file_meta.MediaStorageSOPClassUID),
                "sent": False,
            }
        )
    return entries


def _open_rows(conn: sqlite3.Connection, job_id: int) -> int:
    """A job's rows not yet delivered (sent, or committed where commitment is asked)."""
    (n,) = conn.execute(
        "SELECT COUNT(*) FROM outbox WHERE job_id=? AND state NOT IN (?, ?)",
        (job_id, OutboxState.SENT, OutboxState.COMMITTED),
    ).fetchone()
    return int(n)


def export_states(store: Store, job_ids: Sequence[int]) -> dict[int, list[tuple[str, str]]]:
    """Per job, its (destination, outbox state) pairs (``aenode jobs`` shows commitment)."""
    out: dict[int, list[tuple[str, str]]] = {}
    if not job_ids:
        return out
    marks = ",".join("?" * len(job_ids))
    rows = store.execute(
        f"SELECT job_id, destination, state FROM outbox WHERE job_id IN ({marks}) ORDER BY id",
        tuple(job_ids),
    )
    for r in rows:
        out.setdefault(int(r["job_id"]), []).append((r["destination"], r["state"]))
    return out


def _sop_class(entry: dict[str, Any]) -> str:
    """An entry's SOP Class UID (rows queued before it was recorded: from the file)."""
    if entry.get("sop_class"):
        return str(entry["sop_class"])
    ds = dcmread(entry["path"], stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return str(ds.file_meta.MediaStorageSOPClassUID)


def quarantined_exports(store: Store) -> list[Quarantined]:
    """Outbox rows set aside after repeated unexpected failures (``aenode status``)."""
    rows = store.execute(
        "SELECT id, job_id, destination, last_error FROM outbox WHERE state=? ORDER BY id",
        (OutboxState.QUARANTINED,),
    )
    return [
        Quarantined("export", f"job {r['job_id']} -> {r['destination']}", r["last_error"])
        for r in rows
    ]


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
        self.failures = Failures()

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
            The job's rows still to be sent (0 when no destination is configured: the
            caller decides that the job is done).

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
        for destination in self.settings.destinations:
            conn.execute(
                "INSERT OR IGNORE INTO outbox (job_id, destination, files, state, next_try_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (job_id, destination_key(destination), entries, OutboxState.PENDING, now),
            )
        return _open_rows(conn, job_id)

    @staticmethod
    def _move(conn: sqlite3.Connection, row_id: int, new: OutboxState, **fields: Any) -> None:
        row = conn.execute("SELECT state FROM outbox WHERE id=?", (row_id,)).fetchone()
        transition(row["state"], new)
        cols = "".join(f", {k}=?" for k in fields)
        conn.execute(f"UPDATE outbox SET state=?{cols} WHERE id=?", (new, *fields.values(), row_id))

    def recover(self) -> int:
        """After a restart, make rows claimed by a process that died due again.

        Returns
        -------
        int
            Rows handed back.
        """
        with self.store.transaction() as conn:
            rows = conn.execute(
                "SELECT id FROM outbox WHERE state=?", (OutboxState.SENDING,)
            ).fetchall()
            for row in rows:
                self._move(conn, row["id"], OutboxState.PENDING)
        return len(rows)

    def retry(self, job_id: int) -> bool:
        """Queue a job's failed (or quarantined) rows again, with a fresh retry budget.

        Returns
        -------
        bool
            True if any row was queued again (the job's state becomes ``exporting``).
        """
        now = time.time()
        with self.store.transaction() as conn:
            rows = conn.execute(
                "SELECT id FROM outbox WHERE job_id=? AND state IN (?, ?)",
                (job_id, OutboxState.FAILED, OutboxState.QUARANTINED),
            ).fetchall()
            for row in rows:
                self._move(
                    conn,
                    row["id"],
                    OutboxState.PENDING,
                    attempts=0,
                    first_try_at=None,
                    next_try_at=now,
                )
            count = len(rows)
            if count:
                jobs.move(conn, job_id, JobState.EXPORTING, reason=None)
        if count:
            log.info("export queued again (%d destination(s))", count, extra={"job": job_id})
        return count > 0

    def release_quarantined(self) -> int:
        """``aenode retry --quarantined``: queue every quarantined row again (see :meth:`retry`).

        Returns
        -------
        int
            How many jobs had rows queued again.
        """
        rows = self.store.execute(
            "SELECT DISTINCT job_id FROM outbox WHERE state=?", (OutboxState.QUARANTINED,)
        )
        return sum(1 for r in rows if self.retry(int(r["job_id"])))

    # -- sending ----------------------------------------------------------------------

    def destination(self, key: str) -> DestinationSettings:
        """The configured destination of an outbox row (with its ``tls`` and commitment
        settings), else the one its key names (a row that outlived a configuration change).
        """
        for destination in self.settings.destinations:
            if destination_key(destination) == key:
                return destination
        return parse_destination(key)

    def _claim(self, now: float) -> list[sqlite3.Row]:
        with self.store.transaction() as conn:
            rows = conn.execute(
                "SELECT * FROM outbox WHERE state=? AND next_try_at<=? ORDER BY next_try_at, id",
                (OutboxState.PENDING, now),
            ).fetchall()
            for row in rows:
                self._move(conn, row["id"], OutboxState.SENDING)
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
        handled = self.check_commitments(clock)
        rows = self._claim(clock)
        for row in rows:
            t = clock if now is not None else time.time()
            try:
                self._handle(row, t)
            except Exception as exc:
                if is_resource_error(exc):
                    raise  # the loop backs off; recover() hands the claimed rows back
                self._unexpected(row, t, exc)
        return handled + len(rows)

    def _unexpected(self, row: sqlite3.Row, now: float, exc: Exception) -> None:
        """A row whose handling raised: due again later, quarantined after a few tries."""
        ctx = {"job": row["job_id"], "dest": row["destination"]}
        attempts = int(row["attempts"] or 0) + 1
        tries = self.failures.failed(
            row["id"], exc, log, f"export row {row['id']}", ctx, tries=attempts
        )
        reason = f"internal error: {describe(exc)}"
        with self.store.transaction() as conn:
            if not self.failures.exhausted(tries):
                retry = self.settings.retry
                delay = backoff_seconds(tries, retry.initial_seconds, retry.max_interval_seconds)
                self._move(
                    conn,
                    row["id"],
                    OutboxState.PENDING,
                    attempts=attempts,
                    next_try_at=now + delay,
                    last_error=reason,
                )
                return
            why = f"export to {row['destination']} quarantined after {tries} tries: {reason}"
            self._move(conn, row["id"], OutboxState.QUARANTINED, attempts=attempts, last_error=why)
            # The job shows it as failed: `aenode retry JOB` queues the row again.
            if jobs.get_state(conn, row["job_id"]) == JobState.EXPORTING:
                jobs.move(conn, row["job_id"], JobState.FAILED, reason=why)
            else:
                jobs.note(conn, row["job_id"], why)
        log.error("export row quarantined: %s", why, extra=ctx)

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
            destination = self.destination(key)
            outcome = send_files(
                destination,
                [Path(e["path"]) for e in todo],
                calling_ae=self.calling_ae,
                timeout=self.settings.retry.timeout_seconds,
            )
        except (OutboxError, OSError, RuntimeError, ValueError) as exc:
            outcome = SendOutcome(ok=False, error=f"{key}: {exc}")
        sent = set(outcome.sent)
        audit.record_export(
            self.store,
            row["job_id"],
            key,
            row["attempts"] + 1,
            len(sent),
            len(todo),
            None if len(sent) >= len(todo) else (outcome.error or "not all sent"),
        )
        for entry in entries:
            if entry["sop_uid"] in sent:
                entry["sent"] = True
        files = json.dumps(entries)
        if all(e["sent"] for e in entries):
            if destination.storage_commitment:
                self._request_commitment(row, now, entries, destination, ctx)
            else:
                self._finish_sent(row, now, files, ctx)
            return
        reason = outcome.error or next(iter(outcome.failed.values()), f"{key}: not all sent")
        self._reschedule(row, now, files, reason, ctx)

    def _reschedule(
        self, row: sqlite3.Row, now: float, files: str, reason: str, ctx: dict[str, Any]
    ) -> None:
        """A failed try: due again after the back-off, or failed for good past the budget."""
        attempts = row["attempts"] + 1
        first = row["first_try_at"] if row["first_try_at"] is not None else now
        retry = self.settings.retry
        if now - first >= retry.give_up_after_seconds:
            self._finish_failed(row, now, reason, ctx, files=files, attempts=attempts)
            return
        delay = backoff_seconds(attempts, retry.initial_seconds, retry.max_interval_seconds)
        next_try = min(now + delay, first + retry.give_up_after_seconds)
        with self.store.transaction() as conn:
            self._move(
                conn,
                row["id"],
                OutboxState.PENDING,
                files=files,
                attempts=attempts,
                first_try_at=first,
                next_try_at=next_try,
                last_error=reason,
            )
            jobs.note(conn, row["job_id"], f"export retrying ({attempts} tries): {reason}")
        log.warning(
            "export try %d failed, next in %.1f s: %s",
            attempts,
            next_try - now,
            reason,
            extra=ctx,
        )

    # -- storage commitment -----------------------------------------------------------

    def _request_commitment(
        self,
        row: sqlite3.Row,
        now: float,
        entries: list[dict[str, Any]],
        destination: DestinationSettings,
        ctx: dict[str, Any],
    ) -> None:
        """Everything is stored: record the transaction (durably, first), then ask for it."""
        uid = generate_uid()
        files = json.dumps(entries)
        timeout = self.settings.commitment_timeout_seconds
        with self.store.transaction() as conn:
            self._move(
                conn,
                row["id"],
                OutboxState.COMMITTING,
                files=files,
                commit_uid=uid,
                commit_deadline=now + timeout,
                sent_at=now,
                first_try_at=row["first_try_at"] if row["first_try_at"] is not None else now,
            )
            jobs.note(
                conn,
                row["job_id"],
                f"stored at {row['destination']}, waiting for its storage commitment report",
            )
            audit.record_commitment(
                conn,
                row["job_id"],
                row["destination"],
                "requested",
                transaction_uid=uid,
                instances=len(entries),
            )
        instances = [(_sop_class(e), e["sop_uid"]) for e in entries]
        why = request_commitment(
            destination,
            instances,
            uid,
            calling_ae=self.calling_ae,
            timeout=self.settings.retry.timeout_seconds,
            store=self.store,
        )
        if why is None:
            return
        claimed = self.store.execute("SELECT * FROM outbox WHERE id=?", (row["id"],))[0]
        if claimed["state"] == OutboxState.COMMITTING and claimed["commit_uid"] == uid:
            self._reschedule(claimed, time.time(), files, why, ctx)

    def check_commitments(self, now: float | None = None) -> int:
        """Apply the storage commitment reports that arrived; time out those that did not.

        A report committing every instance makes the row ``committed``; instances reported
        failed (or missing from the report) are marked unsent and the row is due again
        after the back-off, as is a row whose report did not come within
        ``export.commitment_timeout_seconds`` (the request is then sent again).

        Returns
        -------
        int
            Rows changed.
        """
        clock = time.time() if now is None else now
        rows = self.store.execute("SELECT * FROM outbox WHERE state=?", (OutboxState.COMMITTING,))
        changed = 0
        for row in rows:
            ctx = {"job": row["job_id"], "dest": row["destination"]}
            report = get_report(self.store, row["commit_uid"]) if row["commit_uid"] else None
            entries: list[dict[str, Any]] = json.loads(row["files"])
            if report is None:
                if clock < (row["commit_deadline"] or 0):
                    continue
                why = (
                    f"{row['destination']}: no storage commitment report within "
                    f"{self.settings.commitment_timeout_seconds:g} s"
                )
                audit.record_commitment(
                    self.store, row["job_id"], row["destination"], "timed out", reason=why
                )
                self._reschedule(row, clock, row["files"], why, ctx)
                changed += 1
                continue
            committed = set(report.committed)
            missing = {
                e["sop_uid"]: report.failed.get(e["sop_uid"], "not in the report")
                for e in entries
                if e["sop_uid"] not in committed
            }
            if not missing:
                self._finish_committed(row, clock, ctx)
                changed += 1
                continue
            for entry in entries:
                if entry["sop_uid"] in missing:
                    entry["sent"] = False
            uid, reason = next(iter(missing.items()))
            why = (
                f"{row['destination']}: storage commitment failed for {len(missing)} of "
                f"{len(entries)} instance(s) ({uid}: {reason}); sending them again"
            )
            audit.record_commitment(
                self.store,
                row["job_id"],
                row["destination"],
                "failed",
                failed=len(missing),
                instances=len(entries),
                reason=why,
            )
            self._reschedule(row, clock, json.dumps(entries), why, ctx)
            changed += 1
        return changed

    def _finish_committed(self, row: sqlite3.Row, now: float, ctx: dict[str, Any]) -> None:
        with self.store.transaction() as conn:
            self._move(conn, row["id"], OutboxState.COMMITTED, committed_at=now, last_error=None)
            audit.record_commitment(
                conn,
                row["job_id"],
                row["destination"],
                "committed",
                transaction_uid=row["commit_uid"],
            )
            self._job_delivered(conn, row["job_id"], now)
        log.info("storage commitment confirmed", extra=ctx)

    def _job_delivered(self, conn: sqlite3.Connection, job_id: int, now: float) -> None:
        """When no row of the job is open: ``committed`` if any row was, else ``done``."""
        if _open_rows(conn, job_id):
            return
        (committed,) = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE job_id=? AND state=?",
            (job_id, OutboxState.COMMITTED),
        ).fetchone()
        state = JobState.COMMITTED if committed else JobState.DONE
        jobs.move(conn, job_id, state, reason=None, t_exported=now)

    def _finish_sent(self, row: sqlite3.Row, now: float, files: str, ctx: dict[str, Any]) -> None:
        with self.store.transaction() as conn:
            self._move(
                conn,
                row["id"],
                OutboxState.SENT,
                files=files,
                attempts=row["attempts"] + 1,
                sent_at=now,
                first_try_at=row["first_try_at"] if row["first_try_at"] is not None else now,
                last_error=None,
            )
            self._job_delivered(conn, row["job_id"], now)
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
            self._move(
                conn,
                row["id"],
                OutboxState.FAILED,
                files=files or row["files"],
                attempts=attempts,
                last_error=reason,
                first_try_at=row["first_try_at"] if row["first_try_at"] is not None else now,
            )
            why = f"export to {row['destination']} failed after {attempts} tries: {reason}"
            if jobs.get_state(conn, row["job_id"]) == JobState.FAILED:
                jobs.note(conn, row["job_id"], why)  # another destination failed first
            else:
                jobs.move(conn, row["job_id"], JobState.FAILED, reason=why)
        log.error("export failed for good after %d tries: %s", attempts, reason, extra=ctx)

    def next_due(self) -> float | None:
        """Epoch seconds of the earliest pending row, or None."""
        rows = self.store.execute(
            "SELECT MIN(CASE WHEN state=? THEN next_try_at ELSE commit_deadline END) AS t"
            " FROM outbox WHERE state IN (?, ?)",
            (OutboxState.PENDING, OutboxState.PENDING, OutboxState.COMMITTING),
        )
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

        def step() -> bool:
            return self.run_due() > 0

        def idle() -> None:
            due = self.next_due()
            wait = poll_seconds if due is None else min(poll_seconds, due - time.time())
            stop.wait(max(wait, 0.01))

        # After a store error, the rows this loop had claimed are handed back (recover).
        supervise("outbox", step, stop, idle=idle, on_resume=self.recover)


@dataclass(frozen=True)
class DestinationLoad:
    """The outbox of one destination (``/metrics``, ``/healthz``, the dashboard).

    Attributes
    ----------
    destination : str
        ``AE@host:port``.
    states : dict of OutboxState to int
        Rows per state.
    retries : int
        Tries beyond the first, summed over the rows.
    last_sent_at : float or None
        When the last row was sent.
    last_error : str or None
        The error of the most recent row that has one.
    """

    destination: str
    states: dict[OutboxState, int]
    retries: int
    last_sent_at: float | None
    last_error: str | None

    @property
    def depth(self) -> int:
        """Rows still to send (pending)."""
        return self.states.get(OutboxState.PENDING, 0)


def destination_loads(store: Store) -> dict[str, DestinationLoad]:
    """Each destination's outbox: rows per state, retries, last success and error."""
    rows = store.execute(
        "SELECT destination, state, COUNT(*) AS n, SUM(MAX(attempts - 1, 0)) AS r,"
        " MAX(sent_at) AS sent FROM outbox GROUP BY destination, state"
    )
    errors = {
        r["destination"]: r["last_error"]
        for r in store.execute(
            "SELECT destination, last_error FROM outbox WHERE last_error IS NOT NULL ORDER BY id"
        )
    }
    acc: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = acc.setdefault(r["destination"], {"states": {}, "retries": 0, "sent": None})
        entry["states"][OutboxState(r["state"])] = int(r["n"])
        entry["retries"] += int(r["r"] or 0)
        if r["sent"] is not None:
            entry["sent"] = max(entry["sent"] or 0.0, float(r["sent"]))
    return {
        key: DestinationLoad(key, e["states"], e["retries"], e["sent"], errors.get(key))
        for key, e in acc.items()
    }
