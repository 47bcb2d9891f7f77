"""The owner of the ``refusals`` table: C-STOREs answered with a failure status.

A refusal is rare and already costs the sender a retry, so the receiving process records it
in the store (status, calling AE, SOP Instance UID, reason) for ``/metrics``
(``aenode_instances_refused_total``) and the dashboard. A store that cannot take the write
(the disk is what failed) only loses the count: the refusal is logged either way.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass

from aenode.store import Store

__all__ = ["Refusal", "record_refusal", "recent_refusals", "refusal_counts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """One refused C-STORE."""

    at: float
    status: int
    calling_ae: str | None
    sop_instance_uid: str | None
    reason: str | None


def record_refusal(
    store: Store | None,
    status: int,
    calling_ae: str | None,
    sop_instance_uid: str | None,
    reason: str | None,
) -> None:
    """Record one refused C-STORE; never raises for a store that fails (the disk may be full).

    Parameters
    ----------
    store : Store or None
        The receiving process's store; None records nothing.
    status : int
        The DIMSE status answered (``0xA700``, ``0xA900``, ``0xC000``...).
    calling_ae, sop_instance_uid, reason : str or None
        Who sent what, and why it was refused (no PHI: the reasons name tags and UIDs).
    """
    if store is None:
        return
    try:
        store.execute(
            "INSERT INTO refusals (at, status, calling_ae, sop_instance_uid, reason)"
            " VALUES (?, ?, ?, ?, ?)",
            (time.time(), int(status), calling_ae, sop_instance_uid, (reason or "")[:500]),
        )
    except sqlite3.Error as exc:
        log.warning("refusal not recorded (store: %s)", exc)


def refusal_counts(store: Store) -> dict[int, int]:
    """Refused C-STOREs per DIMSE status, since the store was made."""
    rows = store.execute("SELECT status, COUNT(*) AS n FROM refusals GROUP BY status")
    return {int(r["status"]): int(r["n"]) for r in rows}


def recent_refusals(store: Store, limit: int = 20) -> list[Refusal]:
    """The most recent refusals, newest first."""
    rows = store.execute("SELECT * FROM refusals ORDER BY id DESC LIMIT ?", (limit,))
    return [
        Refusal(r["at"], int(r["status"]), r["calling_ae"], r["sop_instance_uid"], r["reason"])
        for r in rows
    ]
