"""``/healthz``: is the node able to take in and process studies right now?

Each part is checked for real at every request: the receivers by the listening sockets on
``node.port`` (``/proc/net/tcp``; a TCP connect where that is missing), the store by a
file written and fsynced into ``storage.path`` plus a query, the disk against
``storage.min_free_mb``, the models by what start-up loaded and the refusal flag
(:mod:`aenode.health`). Destinations are reported (last success, last failure) but do not
make the node unhealthy: a PACS that is down is retried by the outbox.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aenode.audit import export_outcomes
from aenode.config import Settings
from aenode.export.outbox import destination_key, destination_loads
from aenode.health import read_refusal
from aenode.infer.executor import read_executor_file
from aenode.store import Store

__all__ = ["Health", "check_health", "free_disk_mb", "listening_sockets"]

PROBE = ".healthz-probe"
"""The file ``/healthz`` writes, fsyncs and removes under ``storage.path``."""


@dataclass
class Health:
    """The outcome of one ``/healthz``.

    Attributes
    ----------
    ok : bool
        True when every part is healthy.
    failing : list of str
        The failing parts, each naming what and why (``store: ... read-only``).
    checks : dict
        Every part's figures (JSON-ready).
    """

    ok: bool
    failing: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The response body."""
        return {
            "status": "ok" if self.ok else "failing",
            "failing": self.failing,
            **self.checks,
        }


def listening_sockets(port: int) -> int | None:
    """How many sockets listen on TCP ``port`` (one per receiving process), None if unknown."""
    count = 0
    seen = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        seen = True
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count if seen else None


def free_disk_mb(path: Path) -> float:
    """Free megabytes on the file system of ``path`` (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 1e6


def _write_probe(root: Path) -> None:
    probe = root / PROBE
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"ok\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    probe.unlink()


def check_health(
    settings: Settings,
    store: Store,
    models: list[str],
    receivers: int,
) -> Health:
    """Check every part of the node.

    Parameters
    ----------
    settings : Settings
        The node's settings (``node.port``, ``storage``, ``export.destinations``).
    store : Store
        The web server's store connection.
    models : list of str
        The models start-up loaded and warmed.
    receivers : int
        How many receiving processes the node runs.

    Returns
    -------
    Health
    """
    failing: list[str] = []
    checks: dict[str, Any] = {}
    root = Path(settings.storage.path)

    # every listening port (plain and TLS) has one socket per receiving process
    host = "127.0.0.1" if settings.node.host in ("0.0.0.0", "") else settings.node.host
    ports: dict[str, Any] = {}
    for port, is_tls in settings.node.ports:
        listening = listening_sockets(port)
        if listening is None:  # no /proc: try a connection
            try:
                socket.create_connection((host, port), timeout=1).close()
                listening = receivers
            except OSError:
                listening = 0
        ports[str(port)] = {"listening": listening, "tls": is_tls}
        if listening < receivers:
            kind = "TLS port" if is_tls else "port"
            failing.append(f"receivers: {listening} of {receivers} listening on {kind} {port}")
    least = min((p["listening"] for p in ports.values()), default=0)
    checks["receivers"] = {"listening": least, "expected": receivers, "ports": ports}

    try:
        _write_probe(root)
        store.execute("SELECT COUNT(*) FROM meta")
        checks["store"] = {"writable": True, "path": str(root)}
    except (OSError, sqlite3.Error) as exc:
        checks["store"] = {"writable": False, "path": str(root), "error": str(exc)}
        failing.append(f"store: {root} not writable: {exc}")

    free = free_disk_mb(root)
    floor = settings.storage.min_free_mb
    checks["disk"] = {"free_mb": round(free, 1), "min_free_mb": floor}
    if free < floor:
        failing.append(f"disk: {free:.0f} MB free under {root}, below storage.min_free_mb {floor}")

    refusal = read_refusal(root)
    checks["models"] = {"loaded": models, "refusing": refusal}
    if not models:
        failing.append("models: none loaded")
    if refusal is not None:
        failing.append(f"models: the node refuses C-STOREs: {refusal}")

    # the executor and its workers (Ray actors with their devices), as the node last wrote
    checks["executor"] = read_executor_file(root) or {"executor": settings.runtime.executor}

    loads = destination_loads(store)
    outcomes = export_outcomes(store)
    destinations = []
    for dest in settings.export.destinations:
        key = destination_key(dest)
        load = loads.get(key)
        outcome = outcomes.get(key)
        destinations.append(
            {
                "destination": key,
                "pending": load.depth if load else 0,
                "retries": load.retries if load else 0,
                "last_success_at": outcome.last_success_at if outcome else None,
                "last_failure_at": outcome.last_failure_at if outcome else None,
                "last_error": outcome.last_error if outcome else None,
            }
        )
    checks["destinations"] = destinations
    return Health(ok=not failing, failing=failing, checks=checks)
