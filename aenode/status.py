"""What the store says, for ``aenode status`` and ``aenode jobs`` (and later a dashboard).

Read-only: every figure comes from a query function of the table's owner
(:func:`aenode.assemble.recent_series`, :func:`aenode.jobs.recent_jobs`,
:meth:`aenode.store.Store.counts`, :func:`aenode.audit.recorded_events`); nothing here
runs SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aenode.assemble import (
    SERIES_TOPIC,
    SeriesRecord,
    received_by_association,
    recent_series,
)
from aenode.audit import AuditEvent, AuditRecord, recorded_events
from aenode.config import Settings
from aenode.errors import InputError
from aenode.jobs import JobRecord, recent_jobs
from aenode.quarantine import quarantined_items
from aenode.states import QueueState
from aenode.store import Store
from aenode.supervise import Quarantined

__all__ = ["StatusReport", "open_store", "status_report", "study_trail"]


@dataclass(frozen=True)
class StatusReport:
    """Recent series revisions, the series hand-over queue and recent jobs.

    Attributes
    ----------
    series : list of SeriesRecord
        Newest first.
    handover : dict of QueueState to int
        ``series.complete`` queue items per state.
    jobs : list of JobRecord
        Newest first.
    quarantined : list of Quarantined
        Every item set aside after repeated failures (series, hand-overs, study rules,
        jobs, exports), with the reason; ``aenode retry`` takes them out.
    """

    series: list[SeriesRecord]
    handover: dict[QueueState, int]
    jobs: list[JobRecord]
    quarantined: list[Quarantined] = field(default_factory=list)


def open_store(settings: Settings) -> Store:
    """Open the node's existing store (``<storage.path>/aenode.db``).

    Raises
    ------
    aenode.errors.InputError
        If there is none (the node has not run with this ``storage.path``).
    """
    db = Path(settings.storage.path) / "aenode.db"
    if not db.is_file():
        raise InputError(f"no store at {db} (storage.path); has the node run yet?")
    return Store(db)


def status_report(store: Store, limit: int = 50) -> StatusReport:
    """Recent series and jobs, and the hand-over queue's counts.

    Parameters
    ----------
    store : Store
        The store.
    limit : int
        At most this many series and this many jobs.

    Returns
    -------
    StatusReport
    """
    return StatusReport(
        series=recent_series(store, limit),
        handover=store.counts(SERIES_TOPIC),
        jobs=recent_jobs(store, limit),
        quarantined=quarantined_items(store),
    )


def study_trail(store: Store, study_uid: str) -> list[AuditRecord]:
    """Every event of one study, oldest first: ``received`` (one per delivering association,
    derived from the ledger) merged with the events the stages recorded (:mod:`aenode.audit`).

    Parameters
    ----------
    store : Store
        The store.
    study_uid : str
        The Study Instance UID.

    Returns
    -------
    list of AuditRecord
        Empty if the node never saw the study.
    """
    events = [
        AuditRecord(
            at=r.first_at,
            event=AuditEvent.RECEIVED,
            study_uid=study_uid,
            series_uid=None,
            job_id=None,
            detail={
                "count": r.count,
                "series": r.series,
                "bytes": r.bytes,
                "calling_ae": r.calling_ae,
                "peer_host": r.peer_host,
                "assoc_id": r.assoc_id,
                "last_at": r.last_at,
            },
        )
        for r in received_by_association(store, study_uid)
    ]
    events += recorded_events(store, study_uid)
    order = list(AuditEvent)
    return sorted(events, key=lambda e: (e.at, order.index(e.event)))
