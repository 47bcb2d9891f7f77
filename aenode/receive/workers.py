"""Several receiving processes sharing the listening port (``SO_REUSEPORT``).

One pynetdicom process is held back by the GIL; ``node.receivers`` processes (0 = two per
CPU) each run :func:`aenode.receive.scp.serve_receiver`, and the kernel spreads incoming
associations over them. Children are forked before the parent starts any thread, die with
the parent (``PR_SET_PDEATHSIG``) and are restarted if they exit unexpectedly.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from aenode.config import Settings
from aenode.errors import AenodeError, ConfigError
from aenode.receive.guard import AssociationSlots, shared_counts
from aenode.receive.scp import serve_receiver
from aenode.supervise import Backoff

__all__ = ["ReceiverError", "ReceiverPool", "receiver_count", "set_timer_slack"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_TIMERSLACK = 29
TIMER_SLACK_NS = 1000
"""Timer slack of a receiving process: pynetdicom's two threads per association hand each
C-STORE over by polling with 1 ms sleeps, which Linux lets overrun by 50 us by default; 1 us
makes about 6% more instances per second on one association (``bench ingest``)."""


class ReceiverError(AenodeError, RuntimeError):
    """A receiving process could not start; the message says why (for example the port)."""


MAX_DEFAULT_RECEIVERS = 16


def receiver_count(settings: Settings) -> int:
    """``node.receivers``, with 0 meaning twice the number of CPUs (at most 16).

    The kernel spreads associations over the processes by a hash of the connection, not by
    load: with one process per core, four senders on two cores often land three on one
    process while the other idles. Twice as many processes as cores keeps every core busy
    (``bench ingest``: 4 senders 285 -> 362 instances/s on 2 cores, with a far smaller
    spread); each one costs about 8 MB of its own (forked, copy-on-write).
    """
    return settings.node.receivers or min(MAX_DEFAULT_RECEIVERS, 2 * (os.cpu_count() or 1))


def set_timer_slack() -> None:
    """Set this process's timer slack to :data:`TIMER_SLACK_NS` (Linux; elsewhere nothing).

    Threads started afterwards inherit it (pynetdicom starts two per association).
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_TIMERSLACK, TIMER_SLACK_NS)
    except OSError:
        pass


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: fall back to the parent check below
        pass
    if os.getppid() != parent:
        os._exit(1)


def _child(
    settings: Settings,
    receivers: int,
    parent: int,
    conn: Connection,
    counts: Any = None,
    index: int = 0,
) -> None:
    _die_with_parent(parent)
    set_timer_slack()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ready = threading.Event()

    def report_ready() -> None:
        ready.wait()
        conn.send("ok")

    threading.Thread(target=report_ready, daemon=True).start()
    try:
        slots = None
        if counts is not None:
            slots = AssociationSlots(settings.node.max_associations, counts, index)
        serve_receiver(settings, stop, receivers=receivers, ready=ready, slots=slots)
    except (OSError, ConfigError) as exc:
        conn.send(f"error: {exc}")
        raise SystemExit(3) from exc


class ReceiverPool:
    """The receiving processes of one node.

    Parameters
    ----------
    settings : Settings
        The node's settings; ``node.receivers`` processes are started.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = receiver_count(settings)
        self._procs: list[BaseProcess] = []
        self._ctx = multiprocessing.get_context("fork")
        self._stopping = False
        # The node-wide association count: one entry per process, shared with the children.
        self._counts = shared_counts(self.count)
        self._backoff: dict[int, Backoff] = {}
        self._next_try: dict[int, float] = {}

    def _spawn(self, timeout: float, index: int) -> BaseProcess:
        parent_conn, child_conn = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_child,
            args=(self.settings, self.count, os.getpid(), child_conn, self._counts, index),
            name="aenode-receiver",
        )
        self._counts[index] = 0  # a process that died held nothing any more
        proc.start()
        child_conn.close()
        if not parent_conn.poll(timeout):
            proc.kill()
            raise ReceiverError(f"receiver did not start listening within {timeout:.0f} s")
        message = parent_conn.recv()
        parent_conn.close()
        if message != "ok":
            proc.join(5)
            raise ReceiverError(f"receiver could not start: {message}")
        return proc

    def start(self, timeout: float = 30.0) -> None:
        """Start the processes and wait until each listens.

        Raises
        ------
        ReceiverError
            If one cannot bind ``node.host:node.port``; the others are stopped.
        """
        try:
            for index in range(self.count):
                self._procs.append(self._spawn(timeout, index))
        except ReceiverError:
            self.stop()
            raise
        node = self.settings.node
        log.info(
            "listening on %s port(s) %s as %s (%d receiving process(es))",
            node.host,
            ", ".join(f"{port}{' (TLS)' if tls else ''}" for port, tls in node.ports),
            node.ae_title,
            self.count,
        )
        if not node.loopback_only and node.allowed_peers is None:
            log.warning(
                "listening beyond loopback (node.host %s) and node.allowed_peers is not set: "
                "any calling AE that reaches the port may send%s",
                node.host,
                "" if node.tls is None or node.port is not None else " with a trusted certificate",
            )

    def check(self) -> int:
        """Restart receiving processes that exited; returns how many were restarted.

        A restart that fails is logged and tried again after a doubling pause (1 s up to
        30 s); it never raises, so the node's supervision loop goes on.
        """
        restarted = 0
        now = time.monotonic()
        for i, proc in enumerate(self._procs):
            if self._stopping or proc.is_alive() or self._next_try.get(i, 0.0) > now:
                continue
            log.error(
                "receiving process %s exited with code %s: restarting", proc.pid, proc.exitcode
            )
            try:
                self._procs[i] = self._spawn(30.0, i)
            except (ReceiverError, OSError) as exc:
                # The port is taken or the process cannot start: the others go on receiving
                # and this one is tried again after a doubling pause.
                delay = self._backoff.setdefault(i, Backoff(initial=1.0)).failed()
                self._next_try[i] = time.monotonic() + delay
                log.error("receiving process %d not restarted, again in %.0f s: %s", i, delay, exc)
                continue
            if i in self._backoff:
                self._backoff.pop(i).succeeded()
            self._next_try.pop(i, None)
            restarted += 1
        return restarted

    def stop(self, timeout: float = 15.0) -> None:
        """Ask every process to finish its associations and exit; kill those that do not."""
        self._stopping = True
        for proc in self._procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self._procs:
            proc.join(timeout)
            if proc.is_alive():
                log.error("receiving process %s did not stop: killed", proc.pid)
                proc.kill()
                proc.join(5)
        self._procs.clear()
