"""The states of series, jobs, outbox rows, queue items and study roles, with their transitions.

Each state is a :class:`enum.StrEnum` (stored as its value in the store) and the legal
transitions are written once, in :data:`TRANSITIONS`; every kind has a ``quarantined``
state for an item that failed the same way repeatedly (see :mod:`aenode.supervise`), left
only by ``aenode retry``; :func:`transition` raises
:class:`IllegalTransition` for any other move, so no code path (or test) can write a state
production never writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from aenode.errors import InternalError

__all__ = [
    "TRANSITIONS",
    "IllegalTransition",
    "JobState",
    "OutboxState",
    "QueueState",
    "SeriesState",
    "StudyRuleState",
    "transition",
]


class SeriesState(StrEnum):
    """A series revision in the ledger."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    REJECTED = "rejected"
    QUARANTINED = "quarantined"


class JobState(StrEnum):
    """One model run."""

    QUEUED = "queued"
    RUNNING = "running"
    INFERRED = "inferred"
    EXPORTING = "exporting"
    DONE = "done"
    COMMITTED = "committed"
    REJECTED = "rejected"
    FAILED = "failed"
    QUARANTINED = "quarantined"


class OutboxState(StrEnum):
    """One (job, destination) delivery."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    COMMITTING = "committing"
    COMMITTED = "committed"
    FAILED = "failed"
    QUARANTINED = "quarantined"


class QueueState(StrEnum):
    """An item of the durable queue between stages."""

    READY = "ready"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    QUARANTINED = "quarantined"


class StudyRuleState(StrEnum):
    """A study rule waiting for its roles in one study."""

    WAITING = "waiting"
    STARTED = "started"
    MISSING = "missing"
    QUARANTINED = "quarantined"


S = SeriesState
J = JobState
O = OutboxState  # noqa: E741
Q = QueueState
R = StudyRuleState

TRANSITIONS: Mapping[type[StrEnum], Mapping[StrEnum, frozenset[StrEnum]]] = {
    SeriesState: {
        # RECEIVING -> QUARANTINED: completing it failed the same way repeatedly.
        S.RECEIVING: frozenset({S.COMPLETE, S.QUARANTINED}),
        # A complete series whose header or geometry cannot be used.
        S.COMPLETE: frozenset({S.REJECTED}),
        S.REJECTED: frozenset(),
        # `aenode retry --quarantined`: back to the assembler.
        S.QUARANTINED: frozenset({S.RECEIVING}),
    },
    JobState: {
        # QUEUED -> REJECTED: a study rule's required role never came (recorded, never run).
        J.QUEUED: frozenset({J.RUNNING, J.REJECTED}),
        # RUNNING -> QUEUED and INFERRED -> QUEUED: a restart resumes a half-done job.
        # -> QUARANTINED: the same unexpected error on every try (a dead letter).
        J.RUNNING: frozenset({J.INFERRED, J.REJECTED, J.FAILED, J.QUEUED, J.QUARANTINED}),
        J.INFERRED: frozenset(
            {J.EXPORTING, J.DONE, J.COMMITTED, J.FAILED, J.QUEUED, J.QUARANTINED}
        ),
        # EXPORTING -> COMMITTED: every storage commitment destination reported success.
        J.EXPORTING: frozenset({J.DONE, J.COMMITTED, J.FAILED}),
        J.DONE: frozenset(),
        J.COMMITTED: frozenset(),
        # `aenode retry`: the export again, or the whole job.
        J.REJECTED: frozenset({J.QUEUED}),
        J.FAILED: frozenset({J.QUEUED, J.EXPORTING}),
        J.QUARANTINED: frozenset({J.QUEUED}),
    },
    OutboxState: {
        O.PENDING: frozenset({O.SENDING}),
        # SENDING -> PENDING: a retry later, or a restart after a process died mid-send.
        # SENDING -> COMMITTING: stored, the storage commitment request is out.
        O.SENDING: frozenset({O.PENDING, O.SENT, O.COMMITTING, O.FAILED, O.QUARANTINED}),
        O.SENT: frozenset(),
        # COMMITTING -> PENDING: failed instances to send again, or no report in time.
        O.COMMITTING: frozenset({O.COMMITTED, O.PENDING, O.FAILED}),
        O.COMMITTED: frozenset(),
        O.FAILED: frozenset({O.PENDING}),
        O.QUARANTINED: frozenset({O.PENDING}),
    },
    QueueState: {
        Q.READY: frozenset({Q.CLAIMED}),
        Q.CLAIMED: frozenset({Q.DONE, Q.FAILED, Q.READY, Q.QUARANTINED}),
        Q.DONE: frozenset(),
        Q.FAILED: frozenset(),
        Q.QUARANTINED: frozenset({Q.READY}),
    },
    StudyRuleState: {
        R.WAITING: frozenset({R.STARTED, R.MISSING, R.QUARANTINED}),
        R.STARTED: frozenset(),
        # A late series of the missing role still starts the rule.
        R.MISSING: frozenset({R.STARTED}),
        R.QUARANTINED: frozenset({R.WAITING}),
    },
}

E = TypeVar("E", bound=StrEnum)


class IllegalTransition(InternalError):
    """A state change that :data:`TRANSITIONS` does not allow."""


def transition(old: E | str, new: E) -> E:
    """Check that ``old -> new`` is a legal move and return ``new``.

    Parameters
    ----------
    old : StrEnum or str
        The current state (a stored string is normalised with ``type(new)(old)``).
    new : StrEnum
        The state to move to.

    Returns
    -------
    StrEnum
        ``new``.

    Raises
    ------
    IllegalTransition
        If the move is not in :data:`TRANSITIONS` (or ``old`` is no state of that kind).
    """
    kind = type(new)
    try:
        current = kind(old)
    except ValueError:
        raise IllegalTransition(f"{kind.__name__}: unknown state {old!r}") from None
    if new not in TRANSITIONS[kind][current]:
        raise IllegalTransition(f"{kind.__name__}: {current.value} -> {new.value} is not allowed")
    return new
