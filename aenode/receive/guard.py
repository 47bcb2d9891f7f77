"""Network hygiene at the listener: what a stalled or hostile peer may hold, and for how long.

- :class:`ConnectionGuard` admits a new connection only once its whole A-ASSOCIATE-RQ has
  arrived within ``node.artim_timeout`` (an ARTIM-like timer) and declares no more than
  :data:`MAX_RQ_BYTES`; idle, half-sent or bare connections are closed without ever
  becoming a pynetdicom association, so they hold no association slot.
- :class:`GuardedSocket` is the admitted connection: it follows the PDU framing of what it
  reads, aborts the association (A-ABORT, then a closed connection) when a PDU declares
  more than ``node.max_pdu_accept_mb``, and when a started PDU stalls for
  ``node.pdu_timeout`` or arrives slower than :data:`MIN_RATE` bytes/s. Idle associations
  between PDUs end after ``node.network_timeout`` (pynetdicom's idle timer).
- :class:`AssociationSlots` counts associations for the node as a whole, across the
  receiving processes (one shared integer per process, each written only by its owner, so
  a killed process never leaves a lock held), and refuses beyond ``node.max_associations``
  plus a small margin (see :attr:`AssociationSlots.ceiling`).
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
import struct
import threading
import time
from collections.abc import MutableSequence
from typing import Any

from pynetdicom.events import Event

from aenode.config import NodeSettings

__all__ = [
    "LISTEN_BACKLOG",
    "MAX_RQ_BYTES",
    "MIN_RATE",
    "AssociationSlots",
    "ConnectionGuard",
    "GuardedSocket",
    "refuse_over_limit",
    "shared_counts",
]

log = logging.getLogger(__name__)

MAX_RQ_BYTES = 1 << 20
"""An A-ASSOCIATE-RQ declaring more than 1 MiB is not a real one (a large one is ~40 kB)."""
MIN_RATE = 64 * 1024
"""Bytes per second a started PDU must average, beyond ``node.pdu_timeout``."""
LISTEN_BACKLOG = 128
"""Default listen backlog: a burst of senders connecting at once is queued, not refused."""

_HEADER = struct.Struct(">BBL")
# A-ABORT: type 7, source 2 (service provider), reason 6 (invalid PDU parameter value)
_ABORT_INVALID = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])


class GuardedSocket(socket.socket):
    """A connected socket that checks the PDU lengths and timing of what it reads.

    Parameters
    ----------
    sock : socket.socket
        The accepted connection (detached: this object takes over its descriptor).
    max_pdu : int
        The largest PDU length (bytes after the 6-byte header) a peer may declare.
    pdu_timeout : float
        Seconds a started PDU may go without a byte (and the base of its deadline).
    """

    def __init__(self, sock: socket.socket, max_pdu: int, pdu_timeout: float) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.max_pdu = max_pdu
        self.pdu_timeout = pdu_timeout
        # The timeout lives in the kernel (SO_RCVTIMEO/SO_SNDTIMEO) and the socket stays in
        # blocking mode: a Python-level timeout costs a poll() before every read, and
        # pynetdicom reads a PDU 4 kB at a time (about 130 reads per CT slice).
        self.settimeout(None)
        seconds = int(pdu_timeout)
        timeval = struct.pack("@ll", seconds, int((pdu_timeout - seconds) * 1e6))
        self.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._header = bytearray()
        self._left = 0  # bytes of the current PDU's body still to come
        self._deadline = 0.0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Read as :meth:`socket.socket.recv`; raise ``OSError`` for a PDU beyond the limits.

        ``TimeoutError`` when nothing arrived for ``pdu_timeout`` seconds.
        """
        if (self._left or self._header) and time.monotonic() > self._deadline:
            self._abort("the PDU did not arrive in time")
        try:
            data = super().recv(bufsize, flags)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise TimeoutError(f"no data for {self.pdu_timeout:g} s") from None
        if flags & socket.MSG_PEEK:
            return data
        if len(data) <= self._left:  # inside a PDU's body: the common case
            self._left -= len(data)
        else:
            self._follow(data)
        return data

    def _follow(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._left:
                step = min(self._left, len(view))
                self._left -= step
                view = view[step:]
                continue
            if not self._header:
                self._deadline = time.monotonic() + self.pdu_timeout
            need = 6 - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == 6:
                _, _, length = _HEADER.unpack(self._header)
                self._header.clear()
                if length > self.max_pdu:
                    self._abort(f"a PDU declares {length} bytes, more than {self.max_pdu}")
                self._left = length
                self._deadline = time.monotonic() + self.pdu_timeout + length / MIN_RATE

    def _abort(self, why: str) -> None:
        try:
            self.settimeout(1.0)
            super().sendall(_ABORT_INVALID)
        except OSError:
            pass
        log.warning("association aborted: %s (peer %s)", why, _peer(self))
        raise ConnectionAbortedError(why)


def _peer(sock: socket.socket) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return str(name) or "?"


class ConnectionGuard:
    """Admits a connection once its A-ASSOCIATE-RQ is complete; wraps it in a GuardedSocket.

    Parameters
    ----------
    node : NodeSettings
        ``artim_timeout``, ``pdu_timeout`` and ``max_pdu_accept_mb`` are used.
    """

    def __init__(self, node: NodeSettings) -> None:
        self.artim = node.artim_timeout
        self.pdu_timeout = node.pdu_timeout
        self.max_pdu = node.max_pdu_accept_mb * 1024 * 1024

    def _refuse(self, sock: socket.socket, why: str, level: int = logging.WARNING) -> None:
        log.log(level, "connection closed before association: %s (peer %s)", why, _peer(sock))
        try:
            sock.close()
        except OSError:
            pass

    def admit(self, sock: socket.socket) -> socket.socket | None:
        """Wait (at most ``artim_timeout``) for a whole A-ASSOCIATE-RQ; None if refused.

        Parameters
        ----------
        sock : socket.socket
            A connection just accepted.

        Returns
        -------
        socket.socket or None
            A :class:`GuardedSocket` holding the same connection with the request still
            unread, or None when the connection was closed (the reason is logged).
        """
        deadline = time.monotonic() + self.artim
        want = 6
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._refuse(sock, f"no complete A-ASSOCIATE-RQ within {self.artim:g} s")
                return None
            try:
                sock.settimeout(left)
                got = sock.recv(want, socket.MSG_PEEK)
            except TimeoutError:
                continue
            except OSError as exc:
                self._refuse(sock, f"connection failed: {exc}", logging.INFO)
                return None
            if not got:
                self._refuse(sock, "closed by the peer", logging.DEBUG)
                return None
            if want == 6 and len(got) >= 6:
                pdu_type, _, length = _HEADER.unpack_from(got)
                if pdu_type != 0x01:
                    self._refuse(sock, f"first PDU is of type 0x{pdu_type:02X}, not A-ASSOCIATE-RQ")
                    return None
                if length > MAX_RQ_BYTES:
                    self._refuse(sock, f"A-ASSOCIATE-RQ declares {length} bytes")
                    return None
                want = 6 + length
                continue
            if len(got) >= want:
                break
            # Part of it has arrived: wait for more without spinning.
            time.sleep(min(0.02, max(0.0, left)))
        return GuardedSocket(sock, self.max_pdu, self.pdu_timeout)


def shared_counts(processes: int) -> Any:
    """One shared integer per receiving process (made before forking them)."""
    return multiprocessing.get_context("fork").Array("i", max(1, processes), lock=False)


class AssociationSlots:
    """The node-wide association count, shared by the receiving processes.

    Parameters
    ----------
    limit : int
        ``node.max_associations``.
    counts : sequence of int
        From :func:`shared_counts` (shared across processes), or a plain list in one
        process.
    index : int
        This process's entry in ``counts``.
    """

    def __init__(self, limit: int, counts: MutableSequence[int] | Any, index: int = 0) -> None:
        self.limit = limit
        self.counts = counts
        self.index = index
        self._held: set[int] = set()
        self._lock = threading.Lock()

    @property
    def ceiling(self) -> int:
        """Associations at once from which a request is refused: the limit plus a margin.

        The margin (the number of processes, at least 2) covers an association that has
        answered its release but not yet given its slot back, and the lock-free count
        across processes; ``limit`` senders in parallel are never refused.
        """
        return self.limit + max(2, len(self.counts))

    def total(self) -> int:
        """Associations holding a slot now, in every process."""
        return int(sum(self.counts[i] for i in range(len(self.counts))))

    def acquire(self, key: int) -> bool:
        """Take a slot for association ``key``; False when the node is full."""
        with self._lock:
            if key in self._held:
                return True
            if self.total() >= self.ceiling:
                return False
            self._held.add(key)
            self.counts[self.index] += 1
            return True

    def release(self, key: int) -> None:
        """Give back the slot of association ``key`` (no-op if it held none)."""
        with self._lock:
            if key in self._held:
                self._held.discard(key)
                self.counts[self.index] -= 1


def refuse_over_limit(event: Event, slots: AssociationSlots) -> bool:
    """EVT_REQUESTED helper: take a slot or reject (transient, local limit exceeded).

    Returns
    -------
    bool
        True when the association was rejected.
    """
    if slots.acquire(id(event.assoc)):
        return False
    log.warning(
        "association rejected: %d association(s) open, node.max_associations is %d",
        slots.total(),
        slots.limit,
    )
    # transient, service provider (presentation), local limit exceeded
    event.assoc.acse.send_reject(0x02, 0x03, 0x02)
    event.assoc.kill()
    return True
