"""Series assembly: which instances form a series, and when a series is complete.

A series is complete at the first of:

``count``
    the number of instances the data announces has arrived (:func:`expected_count`),
    decided by the receiving process in the transaction that stores the last instance;
``release``
    every association that delivered to it has been released (or aborted) and nothing
    more arrived for ``series.release_grace_seconds``;
``quiet``
    nothing arrived for ``series.quiet_seconds`` (a PACS sending each instance in its own
    association, or a sender that died);
``max_wait``
    ``series.max_wait_seconds`` passed since its first instance.

Completion marks the ``series`` row complete and puts ``series.complete`` on the durable
queue in the same transaction, so a completed series is handed on exactly once. An
instance arriving after completion opens revision ``n + 1`` holding all instances so far
(``series.late_instances: revise``), or is stored without re-opening (``ignore``).
The :class:`Assembler` applies the time-based conditions, polling the store.

This module owns the ledger: the store's ``instances``, ``series``, ``series_assocs`` and
``associations`` tables. The receiver records through :func:`admit`, :func:`touch`,
:func:`stored_instance` and :func:`record_association_end`; ``status`` reads
:func:`recent_series`; series states move only as :data:`aenode.states.TRANSITIONS` allows.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import Dataset

from aenode import audit
from aenode.config import SeriesSettings, Settings
from aenode.records import SeriesInfo
from aenode.states import SeriesState, transition
from aenode.store import Store
from aenode.supervise import Backoff, Failures, Quarantined, describe, is_resource_error, supervise

if TYPE_CHECKING:
    from aenode.receive.header import InstanceHeader

__all__ = [
    "SERIES_TOPIC",
    "Admission",
    "Assembler",
    "AssociationReceipt",
    "SeriesRecord",
    "StoredInstance",
    "admit",
    "close_stale_associations",
    "complete_series",
    "completion_counts",
    "expected_count",
    "note_series",
    "quarantine_series",
    "quarantined_series",
    "received_by_association",
    "received_totals",
    "recent_series",
    "record_association_end",
    "reject_series",
    "release_quarantined_series",
    "series_info_from_payload",
    "spooled_paths",
    "stored_instance",
    "touch",
]

log = logging.getLogger(__name__)

SERIES_TOPIC = "series.complete"

# Multi-frame objects that hold a whole series in one instance.
_WHOLE_SERIES_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
        "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
        "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET
        "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
        "1.2.840.10008.5.1.4.1.1.20",  # NM
        "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    }
)


def _positive_int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        number = int(value) if value not in (None, "") else 0
    except (TypeError, ValueError):
        return None
    except Exception:  # a malformed optional element says nothing
        return None
    return number if number > 0 else None


def expected_count(ds: Dataset) -> int | None:
    """How many instances the series of ``ds`` will have, when its header says so.

    Read from elements only (no pixel data): a whole-series multi-frame object
    (Enhanced CT/MR/PET, NM, SEG, ... with ``NumberOfFrames``) gives 1;
    ``ImagesInAcquisition`` (0020,1002) gives its value; ``NumberOfSlices`` (0054,0081)
    times ``NumberOfTimeSlices`` (0054,0101) when present. ``NumberOfTemporalPositions``
    alone does not say how many instances there are and is not used.

    Parameters
    ----------
    ds : pydicom.Dataset
        The header of one instance.

    Returns
    -------
    int or None
        The expected instance count, or None when the data does not say.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in _WHOLE_SERIES_CLASSES and _positive_int(ds, "NumberOfFrames"):
        return 1
    images = _positive_int(ds, "ImagesInAcquisition")
    if images is not None:
        return images
    slices = _positive_int(ds, "NumberOfSlices")
    if slices is not None:
        return slices * (_positive_int(ds, "NumberOfTimeSlices") or 1)
    return None


@dataclass(frozen=True)
class Admission:
    """Where an admitted instance went.

    Attributes
    ----------
    revision : int
        The series revision the instance belongs to.
    opened : bool
        True if the instance opened a new series or revision.
    completed : bool
        True if it completed the series by count.
    ignored_late : bool
        True if it arrived after completion and ``late_instances`` is ``ignore``.
    """

    revision: int
    opened: bool = False
    completed: bool = False
    ignored_late: bool = False


def _latest(conn: sqlite3.Connection, series_uid: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(
        "SELECT * FROM series WHERE series_uid=? ORDER BY revision DESC LIMIT 1", (series_uid,)
    ).fetchone()
    return row


def admit(
    conn: sqlite3.Connection,
    store: Store,
    header: InstanceHeader,
    *,
    path: str,
    sha256: str,
    size: int,
    calling_ae: str | None,
    assoc_id: str | None,
    now: float,
    settings: SeriesSettings,
    root: Path,
    replace: bool = False,
) -> Admission:
    """Record an instance and update its series, inside an open transaction.

    Parameters
    ----------
    conn : sqlite3.Connection
        The connection of an open :meth:`Store.transaction`.
    store : Store
        The store (for :meth:`Store.enqueue` on completion by count).
    header : InstanceHeader
        The instance's identifying elements.
    path : str
        The spool file, relative to ``root``.
    sha256 : str
        Hex digest of the encoded data set (without file meta).
    size : int
        Bytes of the data set.
    calling_ae, assoc_id : str or None
        Who delivered it and over which association (None for recovered files).
    now : float
        Arrival time, epoch seconds.
    settings : SeriesSettings
        ``late_instances`` decides what a late instance does.
    root : pathlib.Path
        ``storage.path``; payload file paths are made absolute against it.
    replace : bool
        True if the instance replaces an existing row with the same SOP Instance UID
        (duplicate policy ``replace``): the series count does not grow.

    Returns
    -------
    Admission
    """
    latest = _latest(conn, header.series_uid)
    admission: Admission
    if latest is None:
        revision = 0
        conn.execute(
            "INSERT INTO series (series_uid, revision, study_uid, modality, description,"
            " expected, instance_count, first_arrival, last_arrival, last_assoc_id, state)"
            " VALUES (?, 0, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
            (
                header.series_uid,
                header.study_uid,
                header.modality,
                header.description,
                header.expected,
                now,
                now,
                assoc_id,
                SeriesState.RECEIVING,
            ),
        )
        admission = Admission(revision=0, opened=True)
    elif latest["state"] == SeriesState.RECEIVING:
        revision = latest["revision"]
        conn.execute(
            "UPDATE series SET instance_count=instance_count+?, last_arrival=MAX(last_arrival, ?),"
            " last_assoc_id=COALESCE(?, last_assoc_id), expected=COALESCE(expected, ?)"
            " WHERE series_uid=? AND revision=?",
            (0 if replace else 1, now, assoc_id, header.expected, header.series_uid, revision),
        )
        admission = Admission(revision=revision)
    elif settings.late_instances == "ignore":
        revision = latest["revision"] + 1
        admission = Admission(revision=revision, ignored_late=True)
    else:
        revision = latest["revision"] + 1
        (held,) = conn.execute(
            "SELECT COUNT(*) FROM instances WHERE series_uid=?", (header.series_uid,)
        ).fetchone()
        conn.execute(
            "INSERT INTO series (series_uid, revision, study_uid, modality, description,"
            " expected, instance_count, first_arrival, last_arrival, last_assoc_id, state)"
            " VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?)",
            (
                header.series_uid,
                revision,
                header.study_uid,
                latest["modality"] or header.modality,
                latest["description"] or header.description,
                held + (0 if replace else 1),
                now,
                now,
                assoc_id,
                SeriesState.RECEIVING,
            ),
        )
        admission = Admission(revision=revision, opened=True)

    values = (
        header.sop_class_uid,
        header.study_uid,
        header.series_uid,
        revision,
        path,
        sha256,
        size,
        header.transfer_syntax,
        calling_ae,
        assoc_id,
        now,
        header.sop_instance_uid,
    )
    if replace:
        conn.execute(
            "UPDATE instances SET sop_class_uid=?, study_uid=?, series_uid=?, revision=?, path=?,"
            " sha256=?, size=?, transfer_syntax=?, calling_ae=?, assoc_id=?, received_at=?"
            " WHERE sop_instance_uid=?",
            values,
        )
    else:
        conn.execute(
            "INSERT INTO instances (sop_class_uid, study_uid, series_uid, revision, path, sha256,"
            " size, transfer_syntax, calling_ae, assoc_id, received_at, sop_instance_uid)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )
    if admission.ignored_late:
        return admission
    if assoc_id is not None:
        conn.execute(
            "INSERT OR IGNORE INTO series_assocs (series_uid, revision, assoc_id) VALUES (?, ?, ?)",
            (header.series_uid, revision, assoc_id),
        )
    row = conn.execute(
        "SELECT expected, instance_count FROM series WHERE series_uid=? AND revision=?",
        (header.series_uid, revision),
    ).fetchone()
    if row["expected"] is not None and row["instance_count"] >= row["expected"]:
        done = complete_series(conn, store, header.series_uid, revision, "count", now, root)
        return Admission(revision=revision, opened=admission.opened, completed=done)
    return admission


def touch(conn: sqlite3.Connection, series_uid: str, assoc_id: str | None, now: float) -> None:
    """Note that a series still being received got a duplicate (delays release and quiet).

    Parameters
    ----------
    conn : sqlite3.Connection
        The connection of an open transaction.
    series_uid : str
        The series the duplicate belongs to.
    assoc_id : str or None
        The delivering association.
    now : float
        Epoch seconds.
    """
    latest = _latest(conn, series_uid)
    if latest is None or latest["state"] != SeriesState.RECEIVING:
        return
    conn.execute(
        "UPDATE series SET last_arrival=MAX(last_arrival, ?) WHERE series_uid=? AND revision=?",
        (now, series_uid, latest["revision"]),
    )
    if assoc_id is not None:
        conn.execute(
            "INSERT OR IGNORE INTO series_assocs (series_uid, revision, assoc_id) VALUES (?, ?, ?)",
            (series_uid, latest["revision"], assoc_id),
        )


def complete_series(
    conn: sqlite3.Connection,
    store: Store,
    series_uid: str,
    revision: int,
    completed_by: str,
    now: float,
    root: Path,
) -> bool:
    """Mark a series revision complete and hand it on, inside an open transaction.

    Parameters
    ----------
    conn : sqlite3.Connection
        The connection of an open :meth:`Store.transaction`.
    store : Store
        Used for :meth:`Store.enqueue` on the same connection.
    series_uid : str
        Series Instance UID.
    revision : int
        The revision to complete.
    completed_by : str
        ``count``, ``release``, ``quiet`` or ``max_wait``.
    now : float
        Epoch seconds.
    root : pathlib.Path
        ``storage.path``; the payload lists absolute spool paths.

    Returns
    -------
    bool
        False if the revision was not in state ``receiving`` (already complete).
    """
    complete = transition(SeriesState.RECEIVING, SeriesState.COMPLETE)
    changed = conn.execute(
        "UPDATE series SET state=?, completed_at=?, completed_by=?"
        " WHERE series_uid=? AND revision=? AND state=?",
        (complete, now, completed_by, series_uid, revision, SeriesState.RECEIVING),
    ).rowcount
    if changed != 1:
        return False
    row = conn.execute(
        "SELECT * FROM series WHERE series_uid=? AND revision=?", (series_uid, revision)
    ).fetchone()
    base = Path(root).resolve()
    files = sorted(
        str(base / r["path"])
        for r in conn.execute(
            "SELECT path FROM instances WHERE series_uid=? AND revision<=?",
            (series_uid, revision),
        )
    )
    payload: dict[str, Any] = {
        "study_uid": row["study_uid"],
        "series_uid": series_uid,
        "revision": revision,
        "modality": row["modality"] or "",
        "description": row["description"] or "",
        "files": files,
        "completed_by": completed_by,
        "first_arrival": row["first_arrival"],
        "last_arrival": row["last_arrival"],
        "completed_at": now,
    }
    store.enqueue(SERIES_TOPIC, f"{series_uid}:{revision}", payload, conn=conn)
    audit.record(
        conn,
        audit.AuditEvent.SERIES_COMPLETE,
        row["study_uid"],
        series_uid=series_uid,
        at=now,
        completed_by=completed_by,
        instances=len(files),
        revision=revision,
        expected=row["expected"],
    )
    log.info(
        "series complete by %s: %d instance(s), revision %d",
        completed_by,
        len(files),
        revision,
        extra={"study": row["study_uid"], "series": series_uid},
    )
    return True


def series_info_from_payload(payload: dict[str, Any]) -> SeriesInfo:
    """Rebuild the :class:`~aenode.records.SeriesInfo` of a ``series.complete`` queue item.

    Parameters
    ----------
    payload : dict
        The queue item's payload as written by :func:`complete_series`.

    Returns
    -------
    SeriesInfo
        With ``files`` the sorted absolute spool paths of all instances of that revision.

    Raises
    ------
    ValueError
        If a key is missing or has the wrong type; the message names the key.
    """
    for key in ("study_uid", "series_uid", "revision", "files"):
        if key not in payload:
            raise ValueError(f"series.complete payload: key {key!r} is missing")
    files = payload["files"]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError("series.complete payload: key 'files' must be a list of paths")
    return SeriesInfo(
        study_uid=str(payload["study_uid"]),
        series_uid=str(payload["series_uid"]),
        revision=int(payload["revision"]),
        modality=str(payload.get("modality", "")),
        description=str(payload.get("description", "")),
        files=tuple(Path(f) for f in sorted(files)),
        completed_by=str(payload.get("completed_by", "")),
        first_arrival=float(payload.get("first_arrival", 0.0)),
        last_arrival=float(payload.get("last_arrival", 0.0)),
        completed_at=float(payload.get("completed_at", 0.0)),
    )


_Fetch = Callable[[str, tuple[Any, ...]], list[sqlite3.Row]]


def _due(
    fetch: _Fetch, row: sqlite3.Row, now: float, s: SeriesSettings, since: float = 0.0
) -> str | None:
    """The condition that completed ``row`` first, if any is met at ``now``.

    ``since`` is when this node started listening: the release grace and the quiet timer
    count from then at the earliest, since a sender cut off by a restart could not send while
    the node was down (its association, closed at start-up, is no release of the sender's).
    """
    candidates: list[tuple[float, str]] = []
    if row["expected"] is not None and row["instance_count"] >= row["expected"]:
        candidates.append((row["last_arrival"], "count"))
    n, still_open, released = fetch(
        "SELECT COUNT(*), SUM(a.released_at IS NULL), MAX(a.released_at)"
        " FROM series_assocs sa LEFT JOIN associations a ON a.assoc_id = sa.assoc_id"
        " WHERE sa.series_uid=? AND sa.revision=?",
        (row["series_uid"], row["revision"]),
    )[0]
    if n and not still_open:
        heard = max(released, row["last_arrival"], since)
        candidates.append((heard + s.release_grace_seconds, "release"))
    candidates.append((max(row["last_arrival"], since) + s.quiet_seconds, "quiet"))
    candidates.append((row["first_arrival"] + s.max_wait_seconds, "max_wait"))
    due = [c for c in candidates if c[0] <= now]
    return min(due)[1] if due else None


def reject_series(store: Store, series_uid: str, revision: int, reason: str) -> None:
    """Mark a complete series revision ``rejected`` with the reason ``aenode status`` shows.

    A revision already rejected (by another job on the same series) keeps its first reason.

    Parameters
    ----------
    store : Store
        The store.
    series_uid : str
        The Series Instance UID.
    revision : int
        The revision that cannot be used.
    reason : str
        What is wrong, naming the tag or file.

    Raises
    ------
    aenode.states.IllegalTransition
        If the revision is still receiving.
    """
    with store.transaction() as conn:
        row = conn.execute(
            "SELECT state, study_uid FROM series WHERE series_uid=? AND revision=?",
            (series_uid, revision),
        ).fetchone()
        if row is None or row["state"] == SeriesState.REJECTED:
            return
        conn.execute(
            "UPDATE series SET state=?, reason=? WHERE series_uid=? AND revision=?",
            (transition(row["state"], SeriesState.REJECTED), reason, series_uid, revision),
        )
        audit.record(
            conn,
            audit.AuditEvent.SERIES_REJECTED,
            row["study_uid"],
            series_uid=series_uid,
            revision=revision,
            reason=reason,
        )


def quarantine_series(store: Store, series_uid: str, revision: int, reason: str) -> None:
    """Set a receiving series revision aside after repeated failures to complete it.

    Later instances of the series open a new revision; ``aenode retry --quarantined``
    (:func:`release_quarantined_series`) hands this one back to the assembler.
    """
    with store.transaction() as conn:
        row = conn.execute(
            "SELECT state FROM series WHERE series_uid=? AND revision=?", (series_uid, revision)
        ).fetchone()
        if row is None:
            return
        conn.execute(
            "UPDATE series SET state=?, reason=? WHERE series_uid=? AND revision=?",
            (transition(row["state"], SeriesState.QUARANTINED), reason, series_uid, revision),
        )


def quarantined_series(store: Store) -> list[Quarantined]:
    """Series revisions set aside after repeated failures (``aenode status``)."""
    rows = store.execute(
        "SELECT series_uid, revision, reason FROM series WHERE state=? ORDER BY last_arrival",
        (SeriesState.QUARANTINED,),
    )
    return [Quarantined("series", f"{r['series_uid']}:{r['revision']}", r["reason"]) for r in rows]


def release_quarantined_series(store: Store) -> int:
    """``aenode retry --quarantined``: quarantined series revisions are receiving again.

    Returns
    -------
    int
        How many were released.
    """
    receiving = transition(SeriesState.QUARANTINED, SeriesState.RECEIVING)
    with store.transaction() as conn:
        return conn.execute(
            "UPDATE series SET state=?, reason=NULL WHERE state=?",
            (receiving, SeriesState.QUARANTINED),
        ).rowcount


@dataclass(frozen=True)
class StoredInstance:
    """What the ledger holds of one received instance (for duplicate handling)."""

    sop_instance_uid: str
    sha256: str
    path: str


def stored_instance(db: Store | sqlite3.Connection, sop_uid: str) -> StoredInstance | None:
    """The ledger's row of an instance, or None.

    Parameters
    ----------
    db : Store or sqlite3.Connection
        The store, or a connection inside one of its open transactions.
    sop_uid : str
        SOP Instance UID.
    """
    sql = "SELECT sop_instance_uid, sha256, path FROM instances WHERE sop_instance_uid=?"
    result = db.execute(sql, (sop_uid,))
    rows = result if isinstance(result, list) else result.fetchall()
    row = rows[0] if rows else None
    if row is None:
        return None
    return StoredInstance(row["sop_instance_uid"], row["sha256"], row["path"])


def spooled_paths(store: Store) -> set[str]:
    """Spool paths (relative to ``storage.path``) of every instance in the ledger."""
    return {r["path"] for r in store.execute("SELECT path FROM instances")}


def record_association_end(
    store: Store,
    assoc_id: str,
    calling_ae: str | None,
    peer_host: str | None,
    started_at: float,
    ended_at: float,
    peer_subject: str | None = None,
) -> None:
    """Note that an association that delivered instances was released or aborted.

    Parameters
    ----------
    store : Store
        The store.
    assoc_id : str
        Our id of the association.
    calling_ae, peer_host : str or None
        Who it was.
    started_at, ended_at : float
        Epoch seconds.
    peer_subject : str or None
        The subject of the peer's TLS client certificate; None over plain TCP.
    """
    store.execute(
        "INSERT INTO associations"
        " (assoc_id, calling_ae, peer_host, started_at, released_at, peer_subject)"
        " VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (assoc_id) DO UPDATE SET released_at=excluded.released_at",
        (assoc_id, calling_ae, peer_host, started_at, ended_at, peer_subject),
    )


@dataclass(frozen=True)
class SeriesRecord:
    """A series revision as ``aenode status`` shows it."""

    study_uid: str
    series_uid: str
    revision: int
    modality: str | None
    description: str | None
    expected: int | None
    instance_count: int
    state: SeriesState
    completed_by: str | None
    first_arrival: float
    last_arrival: float
    completed_at: float | None
    reason: str | None


def recent_series(store: Store, limit: int = 50) -> list[SeriesRecord]:
    """The most recently active series revisions, newest first.

    Parameters
    ----------
    store : Store
        The store.
    limit : int
        At most this many rows.

    Returns
    -------
    list of SeriesRecord
    """
    names = [f.name for f in SeriesRecord.__dataclass_fields__.values()]
    rows = store.execute(
        f"SELECT {', '.join(names)} FROM series ORDER BY last_arrival DESC LIMIT ?", (limit,)
    )
    return [
        SeriesRecord(**{**{k: row[k] for k in names}, "state": SeriesState(row["state"])})
        for row in rows
    ]


@dataclass(frozen=True)
class AssociationReceipt:
    """What one association delivered of one study (the audit trail's ``received``)."""

    assoc_id: str
    calling_ae: str | None
    peer_host: str | None
    count: int
    series: int
    bytes: int
    first_at: float
    last_at: float


def received_by_association(store: Store, study_uid: str) -> list[AssociationReceipt]:
    """The instances of a study per delivering association, oldest first.

    Parameters
    ----------
    store : Store
        The store.
    study_uid : str
        The Study Instance UID.

    Returns
    -------
    list of AssociationReceipt
    """
    rows = store.execute(
        "SELECT i.assoc_id AS assoc_id, MAX(i.calling_ae) AS calling_ae,"
        " MAX(a.peer_host) AS peer_host, COUNT(*) AS n, COUNT(DISTINCT i.series_uid) AS s,"
        " SUM(i.size) AS b, MIN(i.received_at) AS t0, MAX(i.received_at) AS t1"
        " FROM instances i LEFT JOIN associations a ON a.assoc_id = i.assoc_id"
        " WHERE i.study_uid=? GROUP BY i.assoc_id ORDER BY t0",
        (study_uid,),
    )
    return [
        AssociationReceipt(
            str(r["assoc_id"]),
            r["calling_ae"],
            r["peer_host"],
            int(r["n"]),
            int(r["s"]),
            int(r["b"] or 0),
            float(r["t0"]),
            float(r["t1"]),
        )
        for r in rows
    ]


def received_totals(store: Store) -> tuple[dict[str, int], int]:
    """Instances in the ledger per calling AE, and their bytes (for ``/metrics``)."""
    rows = store.execute(
        "SELECT COALESCE(calling_ae, '') AS ae, COUNT(*) AS n, SUM(size) AS b"
        " FROM instances GROUP BY calling_ae"
    )
    return {r["ae"]: int(r["n"]) for r in rows}, sum(int(r["b"] or 0) for r in rows)


def completion_counts(store: Store) -> dict[str, int]:
    """Series revisions completed, per completion condition (for ``/metrics``)."""
    rows = store.execute(
        "SELECT completed_by, COUNT(*) AS n FROM series"
        " WHERE completed_by IS NOT NULL GROUP BY completed_by"
    )
    return {str(r["completed_by"]): int(r["n"]) for r in rows}


def note_series(store: Store, series_uid: str, revision: int, reason: str) -> None:
    """Record why a series revision made no job, keeping its state (``aenode status``).

    Parameters
    ----------
    store : Store
        The store.
    series_uid : str
        The Series Instance UID.
    revision : int
        The revision.
    reason : str
        What the rules could not read or did not find, naming the tags.
    """
    store.execute(
        "UPDATE series SET reason=? WHERE series_uid=? AND revision=?",
        (reason, series_uid, revision),
    )


def close_stale_associations(store: Store, now: float | None = None) -> int:
    """At start-up, mark associations left open by a previous run as ended now.

    Parameters
    ----------
    store : Store
        The store.
    now : float or None
        Epoch seconds (default: the current time).

    Returns
    -------
    int
        How many associations were closed.
    """
    now = time.time() if now is None else now
    with store.transaction() as conn:
        closed = conn.execute(
            "UPDATE associations SET released_at=? WHERE released_at IS NULL", (now,)
        ).rowcount
        closed += conn.execute(
            "INSERT OR IGNORE INTO associations (assoc_id, started_at, released_at)"
            " SELECT DISTINCT sa.assoc_id, ?, ? FROM series_assocs sa"
            " JOIN series s ON s.series_uid = sa.series_uid AND s.revision = sa.revision"
            " WHERE s.state = ?",
            (now, now, SeriesState.RECEIVING),
        ).rowcount
    return int(closed)


class Assembler:
    """Completes series by release, quiet and max-wait, polling the store.

    Parameters
    ----------
    store : Store
        The store (its own connection, owned by the caller).
    settings : Settings
        ``series`` and ``storage.path`` are used.
    since : float
        When the node started listening (epoch seconds); release and quiet count from then
        at the earliest (0: no such floor, as in ``aenode run`` and unit tests).
    """

    def __init__(self, store: Store, settings: Settings, since: float = 0.0) -> None:
        self.store = store
        self.since = since
        self.series = settings.series
        self.root = Path(settings.storage.path)
        self.failures = Failures()

    def poll(self, now: float | None = None) -> list[tuple[str, int, str]]:
        """Complete every series revision whose time has come.

        Parameters
        ----------
        now : float or None
            Epoch seconds (default: the current time).

        Returns
        -------
        list of (series_uid, revision, completed_by)
            The revisions completed by this call.
        """
        now = time.time() if now is None else now
        done: list[tuple[str, int, str]] = []
        rows = self.store.execute("SELECT * FROM series WHERE state=?", (SeriesState.RECEIVING,))
        for row in rows:
            key = (row["series_uid"], row["revision"])
            try:
                by = self._complete(row, now)
            except Exception as exc:
                if is_resource_error(exc):
                    raise
                self._failed(row, exc)
                continue
            self.failures.clear(key)
            if by is not None:
                done.append((row["series_uid"], row["revision"], by))
        return done

    def _complete(self, row: sqlite3.Row, now: float) -> str | None:
        if _due(self.store.execute, row, now, self.series, self.since) is None:
            return None
        with self.store.transaction() as conn:
            fresh = conn.execute(
                "SELECT * FROM series WHERE series_uid=? AND revision=?",
                (row["series_uid"], row["revision"]),
            ).fetchone()
            if fresh is None or fresh["state"] != SeriesState.RECEIVING:
                return None
            fetch: _Fetch = lambda sql, args: conn.execute(sql, args).fetchall()  # noqa: E731
            by = _due(fetch, fresh, now, self.series, self.since)
            if by is not None and complete_series(
                conn, self.store, fresh["series_uid"], fresh["revision"], by, now, self.root
            ):
                return by
        return None

    def _failed(self, row: sqlite3.Row, exc: Exception) -> None:
        uid, revision = row["series_uid"], row["revision"]
        ctx = {"study": row["study_uid"], "series": uid}
        tries = self.failures.failed((uid, revision), exc, log, f"series {uid}", ctx)
        if self.failures.exhausted(tries):
            reason = f"quarantined after {tries} tries: internal error: {describe(exc)}"
            quarantine_series(self.store, uid, revision, reason)
            self.failures.clear((uid, revision))
            log.error("series quarantined: %s", reason, extra=ctx)

    def run(self, stop: threading.Event) -> None:
        """Poll every ``series.poll_seconds`` until ``stop`` is set.

        A store error (for example a lock held too long) is retried with back-off; the
        state it would have changed stays in the store. A series whose completion raises
        is quarantined after :data:`aenode.supervise.QUARANTINE_AFTER` tries.

        Parameters
        ----------
        stop : threading.Event
            Set to end the loop.
        """

        def step() -> bool:
            self.poll()
            return False

        supervise(
            "assembler",
            step,
            stop,
            idle=lambda: stop.wait(self.series.poll_seconds),
            backoff=Backoff(initial=1.0),
        )
