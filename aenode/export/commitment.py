"""Storage Commitment Push Model (PS3.4 Annex J) as SCU, through pynetdicom.

After the outbox has stored a job's objects at a destination with ``storage_commitment:
true``, :func:`request_commitment` sends the N-ACTION (Request Storage Commitment, SOP
Class 1.2.840.10008.1.20.1, well-known instance 1.2.840.10008.1.20.1.1) listing them under
a new Transaction UID. The destination answers with an N-EVENT-REPORT, either on the same
association or, as Orthanc does, on a new association it opens to our listener; both end in
:func:`handle_report`, which records it in the store (the receiving processes share the
store with the main process, where the outbox applies the report to its row).

This module owns the store's ``commitment_reports`` table: one row per Transaction UID,
written when a report arrives and read by :mod:`aenode.export.outbox`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.events import Event, EventHandlerType

from aenode.config import DestinationSettings
from aenode.errors import ConfigError
from aenode.export.scu import destination_tls
from aenode.store import Store

__all__ = [
    "COMMITMENT_INSTANCE",
    "STORAGE_COMMITMENT",
    "CommitmentReport",
    "get_report",
    "handle_report",
    "record_report",
    "request_commitment",
]

log = logging.getLogger(__name__)

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
"""Storage Commitment Push Model SOP Class."""
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
"""Its well-known SOP Instance."""

_FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}


@dataclass(frozen=True)
class CommitmentReport:
    """An N-EVENT-REPORT of a storage commitment transaction.

    Attributes
    ----------
    transaction_uid : str
        The Transaction UID of our N-ACTION.
    committed : tuple of str
        SOP Instance UIDs the peer committed to keep.
    failed : dict of str to str
        SOP Instance UID to the failure reason.
    calling_ae : str
        Who sent it.
    """

    transaction_uid: str
    committed: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)
    calling_ae: str = ""


def request_commitment(
    destination: DestinationSettings,
    instances: Sequence[tuple[str, str]],
    transaction_uid: str,
    *,
    calling_ae: str,
    timeout: float,
    store: Store | None = None,
) -> str | None:
    """Send the N-ACTION asking ``destination`` to commit ``instances``.

    Parameters
    ----------
    destination : aenode.config.DestinationSettings
        The peer (its ``tls`` is used as for C-STORE).
    instances : sequence of (SOP Class UID, SOP Instance UID)
        What was stored there.
    transaction_uid : str
        Names this request in the report.
    calling_ae : str
        Our AE title (the peer opens its report association back to the AE it knows
        under this title).
    timeout : float
        Seconds for the association and the N-ACTION response.
    store : Store or None
        Where a report sent on this same association is recorded.

    Returns
    -------
    str or None
        None when the peer accepted the request (the report comes later); else why not,
        naming the peer.
    """
    peer = f"{destination.ae_title}@{destination.host}:{destination.port}"
    try:
        tls = destination_tls(destination)
    except ConfigError as exc:
        return f"{peer}: {exc}"
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(STORAGE_COMMITMENT)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    handlers: list[EventHandlerType] = []
    if store is not None:
        handlers.append((evt.EVT_N_EVENT_REPORT, handle_report, [store]))
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        # We may take the report on this association: we offer the SCP role for it too.
        ext_neg=[build_role(STORAGE_COMMITMENT, scu_role=True, scp_role=True)],
        evt_handlers=handlers,
        tls_args=(tls, destination.host) if tls is not None else None,
    )
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        return f"{peer}: association for storage commitment {what}"
    try:
        action = Dataset()
        action.TransactionUID = transaction_uid
        action.ReferencedSOPSequence = [_reference(c, i) for c, i in instances]
        status, _ = assoc.send_n_action(action, 1, STORAGE_COMMITMENT, COMMITMENT_INSTANCE)
        if "Status" not in status:
            return f"{peer}: no N-ACTION response for storage commitment (timeout or aborted)"
        if int(status.Status) != 0x0000:
            return f"{peer}: storage commitment N-ACTION status 0x{int(status.Status):04X}"
    finally:
        assoc.release()
    log.info(
        "storage commitment requested for %d instance(s)",
        len(instances),
        extra={"dest": peer, "transaction": transaction_uid},
    )
    return None


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _failure(item: Dataset) -> str:
    code = int(getattr(item, "FailureReason", 0x0110))
    return f"0x{code:04X} {_FAILURE_REASONS.get(code, 'failure')}"


def handle_report(event: Event, store: Store) -> tuple[int, Dataset | None]:
    """EVT_N_EVENT_REPORT: record a storage commitment result (on any association).

    Returns
    -------
    (int, None)
        ``0x0000``; ``0x0110`` when it cannot be recorded (the peer may send it again)
        and ``0x0115`` (invalid argument) for a report without a Transaction UID.
    """
    calling = str(event.assoc.requestor.ae_title).strip()
    if str(getattr(event.request, "AffectedSOPClassUID", "")) != STORAGE_COMMITMENT:
        return 0x0112, None
    try:
        info = event.event_information
        uid = str(info.TransactionUID)
    except (AttributeError, ValueError, KeyError) as exc:
        log.warning("storage commitment report from %s unreadable: %s", calling, exc)
        return 0x0115, None
    committed = tuple(
        str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])
    )
    failed = {
        str(item.ReferencedSOPInstanceUID): _failure(item)
        for item in info.get("FailedSOPSequence", [])
    }
    report = CommitmentReport(uid, committed, failed, calling)
    try:
        record_report(store, report)
    except sqlite3.Error as exc:  # the peer learns it from the status and may send again
        log.error("storage commitment report %s not recorded: %s", uid, exc)
        return 0x0110, None
    log.info(
        "storage commitment report: %d committed, %d failed",
        len(committed),
        len(failed),
        extra={"peer_ae": calling, "transaction": uid},
    )
    return 0x0000, None


def record_report(store: Store, report: CommitmentReport) -> None:
    """Keep a report (a second one for the same transaction replaces the first)."""
    store.execute(
        "INSERT OR REPLACE INTO commitment_reports"
        " (transaction_uid, calling_ae, committed, failed, received_at) VALUES (?, ?, ?, ?, ?)",
        (
            report.transaction_uid,
            report.calling_ae,
            json.dumps(list(report.committed)),
            json.dumps(report.failed),
            time.time(),
        ),
    )


def get_report(store: Store, transaction_uid: str) -> CommitmentReport | None:
    """The report recorded for ``transaction_uid``, or None."""
    rows = store.execute(
        "SELECT * FROM commitment_reports WHERE transaction_uid=?", (transaction_uid,)
    )
    if not rows:
        return None
    row = rows[0]
    return CommitmentReport(
        transaction_uid=row["transaction_uid"],
        committed=tuple(json.loads(row["committed"])),
        failed=dict(json.loads(row["failed"])),
        calling_ae=row["calling_ae"] or "",
    )
