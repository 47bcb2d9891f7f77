"""Loops that outlive one item: store-error back-off, per-item failure accounting, quarantine.

Every long-lived loop of ``aenode serve`` (assembler, dispatcher with the study tracker,
job workers, outbox) runs its step function under :func:`supervise`:

- a *resource* error (:func:`is_resource_error`: the store is locked, busy, read-only or
  full, or the disk is full) is retried with a doubling back-off (:class:`Backoff`), logged
  once per outage, and the loop resumes by itself when the cause is gone (``on_resume``
  hands back what the outage left claimed);
- any other exception that escapes a step is a bug: logged with its traceback once per
  distinct message, and the loop goes on after a pause.

Inside a step, the owner of an item catches per item and asks :class:`Failures` how many
times it has failed: the traceback is logged on the first failure only, and after
:data:`QUARANTINE_AFTER` tries the owner moves the item to its ``quarantined`` state
(:mod:`aenode.states`) with the reason, where it stays (visible in ``aenode status``)
until ``aenode retry`` takes it out. The items behind it are never blocked.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from aenode.errors import AenodeError

__all__ = [
    "QUARANTINE_AFTER",
    "Backoff",
    "Failures",
    "Quarantined",
    "Unavailable",
    "describe",
    "is_resource_error",
    "supervise",
]

log = logging.getLogger(__name__)

QUARANTINE_AFTER = 3
"""Tries of one item that failed with an unexpected error before it is quarantined."""

_RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class Unavailable(AenodeError):
    """The store or the disk cannot take the work now (full, locked, read-only); retry later."""


@dataclass(frozen=True)
class Quarantined:
    """An item in a ``quarantined`` state, for ``aenode status``.

    Attributes
    ----------
    kind : str
        ``series``, ``handover``, ``job``, ``export`` or ``study``.
    key : str
        The item within its kind (series UID and revision, job id, ...).
    reason : str or None
        Why, with the number of tries.
    """

    kind: str
    key: str
    reason: str | None


def is_resource_error(exc: BaseException) -> bool:
    """True for errors that go away by themselves: the store busy or failing, the disk full.

    Parameters
    ----------
    exc : BaseException
        What a step raised.

    Returns
    -------
    bool
        For :class:`sqlite3.OperationalError` (``database is locked``, ``database or disk is
        full``, ``attempt to write a readonly database``, ``disk I/O error``), an
        :class:`OSError` with ``ENOSPC``, ``EDQUOT`` or ``EROFS``, and :class:`Unavailable`.
    """
    if isinstance(exc, (sqlite3.OperationalError, Unavailable)):
        return True
    return isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS


def describe(exc: BaseException) -> str:
    """``Type: message``: the reason recorded for an unexpected error."""
    return f"{type(exc).__name__}: {exc}"


class Backoff:
    """A doubling delay for a loop whose store or disk is failing.

    Parameters
    ----------
    initial : float
        Seconds after the first failure.
    maximum : float
        The longest delay.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def failed(self) -> float:
        """Count one failure and return the seconds to wait before the next try."""
        self.failures += 1
        return float(min(self.initial * 2.0 ** (self.failures - 1), self.maximum))

    def succeeded(self) -> int:
        """Reset after a success; returns how many failures in a row it ended (0: none)."""
        failures, self.failures = self.failures, 0
        return failures


class Failures:
    """Failures of items in a row, per item key, for the items a loop holds in memory.

    Thread-safe (the job workers share one). Counts start again after a restart, which
    gives a quarantined-before item at most :attr:`limit` more tries per process.

    Parameters
    ----------
    limit : int
        Tries before an item is quarantined.
    """

    def __init__(self, limit: int = QUARANTINE_AFTER) -> None:
        self.limit = limit
        self._counts: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def failed(
        self,
        key: Hashable,
        exc: BaseException,
        logger: logging.Logger,
        what: str,
        extra: Mapping[str, Any] | None = None,
        tries: int | None = None,
    ) -> int:
        """Count a failure of ``key`` and log it: with the traceback the first time only.

        Parameters
        ----------
        key : hashable
            The item (job id, series UID and revision, ...).
        exc : BaseException
            The unexpected error.
        logger : logging.Logger
            The owner's logger.
        what : str
            The item in words, for the log line (``"job 7"``).
        extra : mapping or None
            Structured context for the log line.
        tries : int or None
            The count when the store keeps it (a queue item's attempts); otherwise this
            object counts.

        Returns
        -------
        int
            Tries that failed so far (the item is to be quarantined when ``>= limit``).
        """
        with self._lock:
            count = self._counts.get(key, 0) + 1 if tries is None else tries
            self._counts[key] = count
        message = "%s failed (try %d of %d): %s"
        args = (what, count, self.limit, describe(exc))
        if count == 1:
            logger.error(message, *args, exc_info=exc, extra=dict(extra or {}))
        else:
            logger.error(message, *args, extra=dict(extra or {}))
        return count

    def exhausted(self, count: int) -> bool:
        """True when ``count`` failed tries mean quarantine."""
        return count >= self.limit

    def clear(self, key: Hashable) -> None:
        """Forget ``key`` (it succeeded or was quarantined)."""
        with self._lock:
            self._counts.pop(key, None)


def supervise(
    name: str,
    step: Callable[[], bool],
    stop: threading.Event,
    *,
    idle: Callable[[], object],
    on_resume: Callable[[], object] | None = None,
    backoff: Backoff | None = None,
) -> None:
    """Run ``step`` until ``stop`` is set; no exception from it ends the loop.

    Parameters
    ----------
    name : str
        The loop, for log lines (``"dispatcher"``).
    step : callable
        Does one round of work; returns True if there may be more at once, False to
        call ``idle`` before the next round.
    stop : threading.Event
        Set to end the loop after the current round.
    idle : callable
        Waits for work (an event, a poll interval).
    on_resume : callable or None
        Called before the first step after a resource error (hands back claimed items).
    backoff : Backoff or None
        The delay policy after resource errors (default: 0.5 s doubling up to 30 s).
    """
    backoff = backoff or Backoff()
    seen: set[str] = set()
    outage = False
    while not stop.is_set():
        try:
            if outage and on_resume is not None:
                on_resume()
            busy = step()
        except Exception as exc:
            delay = backoff.failed()
            if is_resource_error(exc):
                if not outage:
                    log.error(
                        "%s: store or disk unavailable, retrying with back-off: %s", name, exc
                    )
                outage = True
            else:
                signature = describe(exc)
                if signature not in seen:
                    seen.add(signature)
                    log.exception("%s: unexpected error, the loop goes on: %s", name, signature)
                else:
                    log.error("%s: unexpected error again: %s", name, signature)
            stop.wait(delay)
            continue
        failures = backoff.succeeded()
        if outage:
            outage = False
            log.warning("%s: resumed after %d failed round(s)", name, failures)
        if not busy:
            idle()
