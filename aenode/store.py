"""The embedded store: one SQLite database (WAL) holding all state that must survive a restart.

Tables: ``instances`` (the spool ledger), ``series`` (assembly and completion, one row per
revision), ``series_assocs`` (which associations delivered to a series revision),
``associations`` (when each delivering association was released), ``queue`` (a
durable work queue between stages), ``jobs`` (one per model run) and ``outbox`` (result
delivery with retries). Each thread or process opens its own :class:`Store`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["QueueItem", "Store", "StoreError", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    transfer_syntax TEXT NOT NULL,
    calling_ae TEXT,
    assoc_id TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid, revision);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    study_uid TEXT NOT NULL,
    modality TEXT,
    description TEXT,
    expected INTEGER,
    instance_count INTEGER NOT NULL DEFAULT 0,
    first_arrival REAL NOT NULL,
    last_arrival REAL NOT NULL,
    last_assoc_id TEXT,
    state TEXT NOT NULL DEFAULT 'receiving',
    completed_at REAL,
    completed_by TEXT,
    reason TEXT,
    PRIMARY KEY (series_uid, revision)
);
CREATE INDEX IF NOT EXISTS series_state ON series (state);
CREATE INDEX IF NOT EXISTS series_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS series_assocs (
    series_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    assoc_id TEXT NOT NULL,
    PRIMARY KEY (series_uid, revision, assoc_id)
);
CREATE TABLE IF NOT EXISTS associations (
    assoc_id TEXT PRIMARY KEY,
    calling_ae TEXT,
    peer_host TEXT,
    started_at REAL NOT NULL,
    released_at REAL
);
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'ready',
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    error TEXT,
    UNIQUE (topic, key)
);
CREATE INDEX IF NOT EXISTS queue_ready ON queue (topic, state, not_before);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rule TEXT NOT NULL,
    model TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    inputs TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    reason TEXT,
    result_dir TEXT,
    findings TEXT,
    t_received REAL,
    t_completed REAL,
    t_started REAL,
    t_inferred REAL,
    t_written REAL,
    t_exported REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (rule, model, inputs)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    files TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    first_try_at REAL,
    next_try_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at REAL,
    UNIQUE (job_id, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_try_at);
"""


class StoreError(RuntimeError):
    """The store cannot be opened or is of an unknown schema; the message names the file."""


@dataclass(frozen=True)
class QueueItem:
    """A claimed item of the durable queue."""

    id: int
    topic: str
    key: str
    payload: dict[str, Any]
    attempts: int


class Store:
    """One connection to the SQLite store; safe to share between threads (serialised).

    Parameters
    ----------
    path : pathlib.Path
        The database file (``<storage.path>/aenode.db``); its folder is created.
    timeout : float
        Seconds to wait for a lock held by another connection or process.
    durable : bool
        ``synchronous=FULL``: each commit is on disk before it returns (the receivers use
        it so that an acknowledged instance survives a power loss); otherwise ``NORMAL``
        (survives a crash of the process).
    """

    def __init__(self, path: Path, timeout: float = 30.0, durable: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(
                str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the store: {exc}") from exc
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        self._migrate()

    def _migrate(self) -> None:
        # executescript commits on its own, so it runs outside an explicit transaction.
        with self._lock:
            self._conn.executescript(_SCHEMA)
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif int(row["value"]) > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {row['value']} is newer than this aenode "
                    f"({SCHEMA_VERSION})"
                )

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run statements in one ``BEGIN IMMEDIATE`` transaction, committed on success."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run one statement in autocommit mode and return all rows."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- the durable queue -------------------------------------------------------------

    def enqueue(
        self,
        topic: str,
        key: str,
        payload: dict[str, Any],
        *,
        not_before: float = 0.0,
        conn: sqlite3.Connection | None = None,
    ) -> bool:
        """Put an item on the queue once; a second put of the same ``(topic, key)`` is ignored.

        Parameters
        ----------
        topic : str
            The consuming stage, for example ``"series.complete"``.
        key : str
            Identity of the item within its topic (makes hand-over idempotent).
        payload : dict
            JSON-serialisable content.
        not_before : float
            Epoch seconds before which the item is not handed out.
        conn : sqlite3.Connection or None
            A connection inside an open :meth:`transaction`, to enqueue atomically with it.

        Returns
        -------
        bool
            True if the item was added, False if it was already there.
        """
        now = time.time()
        sql = (
            "INSERT OR IGNORE INTO queue (topic, key, payload, not_before, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)"
        )
        args = (topic, key, json.dumps(payload), not_before, now, now)
        if conn is not None:
            return conn.execute(sql, args).rowcount == 1
        with self._lock:
            return self._conn.execute(sql, args).rowcount == 1

    def claim(self, topic: str, now: float | None = None) -> QueueItem | None:
        """Take the oldest ready item of ``topic`` (state becomes ``claimed``), or None."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT * FROM queue WHERE topic=? AND state='ready' AND not_before<=?"
                " ORDER BY id LIMIT 1",
                (topic, now),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE queue SET state='claimed', attempts=attempts+1, updated_at=? WHERE id=?",
                (now, row["id"]),
            )
        return QueueItem(
            id=row["id"],
            topic=row["topic"],
            key=row["key"],
            payload=json.loads(row["payload"]),
            attempts=row["attempts"] + 1,
        )

    def ack(self, item_id: int) -> None:
        """Mark a claimed item done."""
        self.execute(
            "UPDATE queue SET state='done', updated_at=? WHERE id=?", (time.time(), item_id)
        )

    def nack(self, item_id: int, error: str, retry_at: float | None = None) -> None:
        """Give a claimed item back: ready again at ``retry_at``, or ``failed`` if None."""
        now = time.time()
        if retry_at is None:
            self.execute(
                "UPDATE queue SET state='failed', error=?, updated_at=? WHERE id=?",
                (error, now, item_id),
            )
        else:
            self.execute(
                "UPDATE queue SET state='ready', error=?, not_before=?, updated_at=? WHERE id=?",
                (error, retry_at, now, item_id),
            )

    def requeue_claimed(self, topic: str | None = None) -> int:
        """After a restart, hand out again the items claimed by a process that died.

        Returns
        -------
        int
            How many items became ready again.
        """
        sql = "UPDATE queue SET state='ready', updated_at=? WHERE state='claimed'"
        args: tuple[Any, ...] = (time.time(),)
        if topic is not None:
            sql += " AND topic=?"
            args += (topic,)
        with self._lock:
            return self._conn.execute(sql, args).rowcount
