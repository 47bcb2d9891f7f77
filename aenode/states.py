"""The states of series, jobs, outbox rows, queue items and study roles, with their transitions.

Each state is a :class:`enum.StrEnum` (stored as its value in the store) and the legal
transitions are written once, in :data:`TRANSITIONS`; :func:`transition` raises
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


class JobState(StrEnum):
    """One model run."""

    QUEUED = "queued"
    RUNNING = "running"
    INFERRED = "inferred"
    EXPORTING = "exporting"
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"


class OutboxState(StrEnum):
    """One (job, destination) delivery."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


class QueueState(StrEnum):
    """An item of the durable queue between stages."""

    READY = "ready"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"


class StudyRuleState(StrEnum):
    """A study rule waiting for its roles in one study."""

    WAITING = "waiting"
    STARTED = "started"
    MISSING = "missing"


S = SeriesState
J = JobState
O = OutboxState  # noqa: E741
Q = QueueState
R = StudyRuleState

TRANSITIONS: Mapping[type[StrEnum], Mapping[StrEnum, frozenset[StrEnum]]] = {
    SeriesState: {
        S.RECEIVING: frozenset({S.COMPLETE}),
        # A complete series whose header or geometry cannot be used.
        S.COMPLETE: frozenset({S.REJECTED}),
        S.REJECTED: frozenset(),
    },
    JobState: {
        # QUEUED -> REJECTED: a study rule's required role never came (recorded, never run).
        J.QUEUED: frozenset({J.RUNNING, J.REJECTED}),
        # RUNNING -> QUEUED and INFERRED -> QUEUED: a restart resumes a half-done job.
        J.RUNNING: frozenset({J.INFERRED, J.REJECTED, J.FAILED, J.QUEUED}),
        J.INFERRED: frozenset({J.EXPORTING, J.DONE, J.FAILED, J.QUEUED}),
        J.EXPORTING: frozenset({J.DONE, J.FAILED}),
        J.DONE: frozenset(),
        # `aenode retry`: the export again, or the whole job.
        J.REJECTED: frozenset({J.QUEUED}),
        J.FAILED: frozenset({J.QUEUED, J.EXPORTING}),
    },
    OutboxState: {
        O.PENDING: frozenset({O.SENDING}),
        # SENDING -> PENDING: a retry later, or a restart after a process died mid-send.
        O.SENDING: frozenset({O.PENDING, O.SENT, O.FAILED}),
        O.SENT: frozenset(),
        O.FAILED: frozenset({O.PENDING}),
    },
    QueueState: {
        Q.READY: frozenset({Q.CLAIMED}),
        Q.CLAIMED: frozenset({Q.DONE, Q.FAILED, Q.READY}),
        Q.DONE: frozenset(),
        Q.FAILED: frozenset(),
    },
    StudyRuleState: {
        R.WAITING: frozenset({R.STARTED, R.MISSING}),
        R.STARTED: frozenset(),
        # A late series of the missing role still starts the rule.
        R.MISSING: frozenset({R.STARTED}),
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
