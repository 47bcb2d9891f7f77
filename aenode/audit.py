"""The audit trail: what happened to each study, in order, as an operator asks about it.

The owner of the ``audit`` table. The stages call one function per event, most of them
inside the transaction that makes the change, so the trail and the state never disagree:

==================  =======================================================================
event               written by
==================  =======================================================================
``received``        not written: derived from the ``instances`` and ``associations`` rows
                    (count, calling AE, host, association), so the C-STORE hot path pays
                    nothing for it (:func:`aenode.status.study_trail` merges them in)
``series_complete`` :func:`aenode.assemble.complete_series` (``completed_by``: count,
                    release, quiet or max_wait)
``series_rejected`` :func:`aenode.assemble.reject_series` (the reason)
``selected``        :func:`aenode.jobs.record_job` (rule, model, job)
``not_selected``    :meth:`aenode.select.studies.StudyTracker.on_series` (each rule's reason)
``job``             :func:`aenode.jobs.move`: every state change of a job (start, end, and
                    the retries between), with the reason
``results``         :class:`aenode.jobs.JobRunner` (the result objects' SOP Instance UIDs)
``export``          :class:`aenode.export.outbox.Outbox` (each attempt: destination, sent,
                    outcome)
==================  =======================================================================

No patient name, ID or birth date is ever written here: events name UIDs, rules, models,
AE titles and reasons (which name tags, not their values).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from aenode.store import Store

__all__ = [
    "AuditEvent",
    "AuditRecord",
    "ExportOutcomes",
    "export_outcomes",
    "job_state_counts",
    "record",
    "record_commitment",
    "record_export",
    "record_results",
    "recorded_events",
]


class AuditEvent(StrEnum):
    """The kinds of events in the trail."""

    RECEIVED = "received"
    SERIES_COMPLETE = "series_complete"
    SERIES_REJECTED = "series_rejected"
    SELECTED = "selected"
    NOT_SELECTED = "not_selected"
    JOB = "job"
    RESULTS = "results"
    EXPORT = "export"
    COMMITMENT = "commitment"


@dataclass(frozen=True)
class AuditRecord:
    """One event of a study's trail.

    Attributes
    ----------
    at : float
        Epoch seconds.
    event : AuditEvent
    study_uid : str
    series_uid : str or None
    job_id : int or None
    detail : dict
        Event-specific fields (JSON-ready).
    """

    at: float
    event: AuditEvent
    study_uid: str
    series_uid: str | None
    job_id: int | None
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the event as its string)."""
        data = asdict(self)
        data["event"] = self.event.value
        return data

    def describe(self) -> str:
        """The event in one line, as ``aenode audit`` prints it."""
        d = self.detail
        e = self.event
        if e is AuditEvent.RECEIVED:
            return (
                f"received {d['count']} instance(s) of {d['series']} series from "
                f"{d.get('calling_ae') or '?'} at {d.get('peer_host') or '?'} "
                f"(association {d['assoc_id']})"
            )
        if e is AuditEvent.SERIES_COMPLETE:
            return (
                f"series {self.series_uid} complete by {d['completed_by']}: "
                f"{d['instances']} instance(s), revision {d['revision']}"
            )
        if e is AuditEvent.SERIES_REJECTED:
            return f"series {self.series_uid} rejected: {d['reason']}"
        if e is AuditEvent.SELECTED:
            return f"series {self.series_uid} selected: rule {d['rule']}, model {d['model']}"
        if e is AuditEvent.NOT_SELECTED:
            return f"series {self.series_uid} {d['reason']}"
        if e is AuditEvent.JOB:
            why = f": {d['reason']}" if d.get("reason") else ""
            return f"job {self.job_id} ({d['model']}) {d['from']} -> {d['to']}{why}"
        if e is AuditEvent.RESULTS:
            return f"job {self.job_id} wrote {len(d['sop_uids'])} object(s): " + ", ".join(
                d["sop_uids"]
            )
        if e is AuditEvent.COMMITMENT:
            extra = f" ({d['reason']})" if d.get("reason") else ""
            uid = f", transaction {d['transaction_uid']}" if d.get("transaction_uid") else ""
            return (
                f"job {self.job_id} storage commitment at {d['destination']}: "
                f"{d['outcome']}{uid}{extra}"
            )
        outcome = "sent" if d["ok"] else f"failed: {d.get('error')}"
        return (
            f"job {self.job_id} export to {d['destination']} attempt {d['attempt']}: "
            f"{d['sent']} of {d['files']} file(s) {outcome}"
        )


def record(
    db: Store | sqlite3.Connection,
    event: AuditEvent,
    study_uid: str | None,
    *,
    series_uid: str | None = None,
    job_id: int | None = None,
    at: float | None = None,
    **detail: Any,
) -> None:
    """Append one event to the trail.

    Parameters
    ----------
    db : Store or sqlite3.Connection
        The store, or a connection inside an open :meth:`Store.transaction` (the event is
        then committed with the change it describes).
    event : AuditEvent
        What happened.
    study_uid, series_uid : str or None
        Which study and series.
    job_id : int or None
        Which job.
    at : float or None
        Epoch seconds (default: now).
    **detail
        JSON-serialisable fields of the event (never patient name, ID or birth date).
    """
    args = (
        time.time() if at is None else at,
        study_uid,
        series_uid,
        job_id,
        AuditEvent(event).value,
        json.dumps(detail, default=str),
    )
    sql = (
        "INSERT INTO audit (at, study_uid, series_uid, job_id, event, detail)"
        " VALUES (?, ?, ?, ?, ?, ?)"
    )
    db.execute(sql, args)


def _job_study(db: Store | sqlite3.Connection, job_id: int) -> str | None:
    # The study of a job, from an earlier event of that job (the jobs table is not ours).
    rows = list(
        db.execute(
            "SELECT study_uid FROM audit WHERE job_id=? AND study_uid IS NOT NULL LIMIT 1",
            (job_id,),
        )
    )
    return str(rows[0]["study_uid"]) if rows else None


def record_results(
    db: Store | sqlite3.Connection, job_id: int, study_uid: str, files: Sequence[Path]
) -> None:
    """Record the SOP Instance UIDs of the result objects a job wrote.

    Parameters
    ----------
    db : Store or sqlite3.Connection
        As for :func:`record`.
    job_id : int
        The job.
    study_uid : str
        Its study.
    files : sequence of pathlib.Path
        The Part 10 files written (an unreadable one is listed by its file name).
    """
    uids = []
    for path in files:
        try:
            uids.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        except (OSError, InvalidDicomError, AttributeError):
            uids.append(f"unreadable:{Path(path).name}")
    record(db, AuditEvent.RESULTS, study_uid, job_id=job_id, sop_uids=uids)


def record_export(
    store: Store,
    job_id: int,
    destination: str,
    attempt: int,
    sent: int,
    files: int,
    error: str | None,
) -> None:
    """Record one export attempt of a job's results and its outcome.

    Parameters
    ----------
    store : Store
        The store.
    job_id : int
        The job.
    destination : str
        ``AE@host:port``.
    attempt : int
        1 for the first try.
    sent, files : int
        Files sent in this attempt, files to send in all.
    error : str or None
        Why it failed; None when every file is sent.
    """
    record(
        store,
        AuditEvent.EXPORT,
        _job_study(store, job_id),
        job_id=job_id,
        destination=destination,
        attempt=attempt,
        sent=sent,
        files=files,
        ok=error is None,
        error=error,
    )


def record_commitment(
    db: Store | sqlite3.Connection,
    job_id: int,
    destination: str,
    outcome: str,
    **detail: Any,
) -> None:
    """Record a storage commitment step of a job's results at one destination.

    Parameters
    ----------
    db : Store or sqlite3.Connection
        The store, or a connection inside an open transaction.
    job_id : int
        The job.
    destination : str
        ``AE@host:port``.
    outcome : str
        ``requested``, ``committed``, ``failed`` (some instances; they are sent again) or
        ``timed out`` (no report; asked again).
    **detail
        The transaction UID, instance counts, the reason.
    """
    record(
        db,
        AuditEvent.COMMITMENT,
        _job_study(db, job_id),
        job_id=job_id,
        destination=destination,
        outcome=outcome,
        **detail,
    )


def recorded_events(store: Store, study_uid: str) -> list[AuditRecord]:
    """The events written for one study, oldest first (``received`` is derived elsewhere:
    :func:`aenode.status.study_trail` merges both).

    Parameters
    ----------
    store : Store
        The store.
    study_uid : str
        The Study Instance UID.

    Returns
    -------
    list of AuditRecord
    """
    rows = store.execute("SELECT * FROM audit WHERE study_uid=? ORDER BY at, id", (study_uid,))
    return [
        AuditRecord(
            at=float(r["at"]),
            event=AuditEvent(r["event"]),
            study_uid=study_uid,
            series_uid=r["series_uid"],
            job_id=r["job_id"],
            detail=json.loads(r["detail"]),
        )
        for r in rows
    ]


@dataclass(frozen=True)
class ExportOutcomes:
    """The last successful and the last failed export attempt to one destination."""

    last_success_at: float | None
    last_failure_at: float | None
    last_error: str | None


def export_outcomes(store: Store) -> dict[str, ExportOutcomes]:
    """Per destination, when the last export attempt succeeded and when one last failed."""
    rows = store.execute(
        "SELECT at, detail FROM audit WHERE event=? ORDER BY at, id", (AuditEvent.EXPORT.value,)
    )
    acc: dict[str, dict[str, Any]] = {}
    for r in rows:
        d = json.loads(r["detail"])
        entry = acc.setdefault(d["destination"], {"ok": None, "bad": None, "error": None})
        if d.get("ok"):
            entry["ok"] = float(r["at"])
        else:
            entry["bad"] = float(r["at"])
            entry["error"] = d.get("error")
    return {k: ExportOutcomes(e["ok"], e["bad"], e["error"]) for k, e in acc.items()}


def job_state_counts(store: Store) -> dict[tuple[str, str], int]:
    """Jobs that ever reached each state, per (model, state) (``aenode_jobs_total``).

    Monotonic: a job is counted once in every state it entered (``queued`` from its
    ``selected`` event); a job retried after ``failed`` stays counted there.
    """
    rows = store.execute(
        "SELECT json_extract(detail, '$.model') AS model, json_extract(detail, '$.to') AS st,"
        " COUNT(DISTINCT job_id) AS n FROM audit"
        " WHERE event=? AND json_extract(detail, '$.to') != 'queued' GROUP BY 1, 2"
        " UNION ALL SELECT json_extract(detail, '$.model'), 'queued', COUNT(DISTINCT job_id)"
        " FROM audit WHERE event=? GROUP BY 1",
        (AuditEvent.JOB.value, AuditEvent.SELECTED.value),
    )
    out: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (str(r["model"]), str(r["st"]))
        out[key] = out.get(key, 0) + int(r["n"])
    return out
