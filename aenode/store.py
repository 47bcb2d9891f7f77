"""The embedded store: one SQLite database (WAL) holding all state that must survive a restart.

Each table has one owning module, the only one that writes it; every other module calls
the owner's functions, which take and return dataclasses:

=============================================================  ============================
table                                                          owner
=============================================================  ============================
``instances``, ``series``, ``series_assocs``, ``associations``  :mod:`aenode.assemble`
``queue`` (durable hand-over between stages)                   this module (:class:`Store`)
``jobs`` (one per model run)                                   :mod:`aenode.jobs`
``outbox`` (result delivery with retries)                      :mod:`aenode.export.outbox`
``select_roles``, ``select_studies`` (study rules)             :mod:`aenode.select.studies`
``commitment_reports`` (storage commitment N-EVENT-REPORTs)     :mod:`aenode.export.commitment`
``audit`` (per-study trail of decisions and outcomes)           :mod:`aenode.audit`
``refusals`` (C-STOREs answered with a failure status)          :mod:`aenode.receive.refusals`
=============================================================  ============================

The schema is versioned (``meta.schema``): a store written by an older release is migrated
in place, one step at a time, when it is first opened (:data:`MIGRATIONS`). Each thread or
process opens its own :class:`Store`; ``Store(":memory:")`` is a private in-memory store
behind the same interface (``aenode run``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aenode.errors import InternalError
from aenode.states import QueueState, transition

__all__ = ["MIGRATIONS", "QueueItem", "SCHEMA_VERSION", "Store", "StoreError"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
"""Version 1: the first release. Version 2: the study-role tables belong to the store
(they were created by the study tracker) and the outbox is indexed by job. Version 3:
``associations.peer_subject`` (the TLS client certificate's subject). Version 4: storage
commitment (``outbox.commit_*`` and ``commitment_reports``). Version 5: the audit trail
(``audit``), the refused C-STOREs (``refusals``) and the end of each job's volume stage
(``jobs.t_volume``)."""

_AUDIT_TABLES = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    study_uid TEXT,
    series_uid TEXT,
    job_id INTEGER,
    event TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_study ON audit (study_uid, at);
CREATE INDEX IF NOT EXISTS audit_job ON audit (job_id);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    status INTEGER NOT NULL,
    calling_ae TEXT,
    sop_instance_uid TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS refusals_status ON refusals (status);
"""

_SCHEMA = (
    """
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
    released_at REAL,
    peer_subject TEXT
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
    t_volume REAL,
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
    commit_uid TEXT,
    commit_deadline REAL,
    committed_at REAL,
    UNIQUE (job_id, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_try_at);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox (job_id);
CREATE TABLE IF NOT EXISTS select_roles (
    rule TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    role TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    series TEXT NOT NULL,
    matched_at REAL NOT NULL,
    PRIMARY KEY (rule, study_uid, role)
);
CREATE TABLE IF NOT EXISTS select_studies (
    rule TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'waiting',
    first_match REAL NOT NULL,
    last_match REAL NOT NULL,
    reason TEXT,
    PRIMARY KEY (rule, study_uid)
);
CREATE INDEX IF NOT EXISTS select_studies_state ON select_studies (state, last_match);
CREATE TABLE IF NOT EXISTS commitment_reports (
    transaction_uid TEXT PRIMARY KEY,
    calling_ae TEXT,
    committed TEXT NOT NULL,
    failed TEXT NOT NULL,
    received_at REAL NOT NULL
);
"""
    + _AUDIT_TABLES
)

MIGRATIONS: dict[int, str] = {
    # 1 -> 2: a version-1 store may hold the study-role tables (made by the tracker) or not.
    1: """
CREATE TABLE IF NOT EXISTS select_roles (
    rule TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    role TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    series TEXT NOT NULL,
    matched_at REAL NOT NULL,
    PRIMARY KEY (rule, study_uid, role)
);
CREATE TABLE IF NOT EXISTS select_studies (
    rule TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'waiting',
    first_match REAL NOT NULL,
    last_match REAL NOT NULL,
    reason TEXT,
    PRIMARY KEY (rule, study_uid)
);
CREATE INDEX IF NOT EXISTS select_studies_state ON select_studies (state, last_match);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox (job_id);
""",
    # 2 -> 3: the subject of a TLS peer's certificate, recorded with its association.
    2: """
ALTER TABLE associations ADD COLUMN peer_subject TEXT;
""",
    # 3 -> 4: storage commitment of exported results.
    3: """
ALTER TABLE outbox ADD COLUMN commit_uid TEXT;
ALTER TABLE outbox ADD COLUMN commit_deadline REAL;
ALTER TABLE outbox ADD COLUMN committed_at REAL;
CREATE TABLE IF NOT EXISTS commitment_reports (
    transaction_uid TEXT PRIMARY KEY,
    calling_ae TEXT,
    committed TEXT NOT NULL,
    failed TEXT NOT NULL,
    received_at REAL NOT NULL
);
""",
    # 4 -> 5: the audit trail and the refused C-STOREs.
    4: _AUDIT_TABLES + "ALTER TABLE jobs ADD COLUMN t_volume REAL;",
}
"""From-version -> statements that bring a store to the next version."""


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


class StoreError(InternalError):
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
    path : pathlib.Path or str
        The database file (``<storage.path>/aenode.db``); its folder is created.
        ``":memory:"`` opens a private in-memory store (nothing survives ``close``).
    timeout : float
        Seconds to wait for a lock held by another connection or process.
    durable : bool
        ``synchronous=FULL``: each commit is on disk before it returns (the receivers use
        it so that an acknowledged instance survives a power loss); otherwise ``NORMAL``
        (survives a crash of the process).
    """

    def __init__(self, path: Path | str, timeout: float = 30.0, durable: bool = False) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
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
        # One BEGIN IMMEDIATE transaction, so that processes opening the store at once
        # migrate it once; the version is read again inside it.
        with self.transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            has_tables = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='instances'"
            ).fetchone()
            if row is None and has_tables is None:
                for statement in _statements(_SCHEMA):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
                return
            version = int(row["value"]) if row is not None else 1
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this aenode "
                    f"({SCHEMA_VERSION})"
                )
            start = version
            while version < SCHEMA_VERSION:
                for statement in _statements(MIGRATIONS[version]):
                    conn.execute(statement)
                version += 1
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(version),)
            )
        if start != version:
            log.warning("store %s migrated from schema %d to %d", self.path, start, version)

    @property
    def schema_version(self) -> int:
        """The schema version recorded in the store."""
        rows = self.execute("SELECT value FROM meta WHERE key='schema'")
        return int(rows[0]["value"])

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
                "UPDATE queue SET state=?, attempts=attempts+1, updated_at=? WHERE id=?",
                (transition(row["state"], QueueState.CLAIMED), now, row["id"]),
            )
        return QueueItem(
            id=row["id"],
            topic=row["topic"],
            key=row["key"],
            payload=json.loads(row["payload"]),
            attempts=row["attempts"] + 1,
        )

    def _move(self, item_id: int, new: QueueState, **fields: Any) -> None:
        with self.transaction() as conn:
            row = conn.execute("SELECT state FROM queue WHERE id=?", (item_id,)).fetchone()
            if row is None:
                raise StoreError(f"{self.path}: no queue item {item_id}")
            transition(row["state"], new)
            fields["updated_at"] = time.time()
            cols = ", ".join(f"{k}=?" for k in fields)
            conn.execute(
                f"UPDATE queue SET state=?, {cols} WHERE id=?", (new, *fields.values(), item_id)
            )

    def ack(self, item_id: int) -> None:
        """Mark a claimed item done."""
        self._move(item_id, QueueState.DONE)

    def nack(self, item_id: int, error: str, retry_at: float | None = None) -> None:
        """Give a claimed item back: ready again at ``retry_at``, or ``failed`` if None."""
        if retry_at is None:
            self._move(item_id, QueueState.FAILED, error=error)
        else:
            self._move(item_id, QueueState.READY, error=error, not_before=retry_at)

    def quarantine(self, item_id: int, error: str) -> None:
        """Set a claimed item aside after repeated failures (``aenode retry`` releases it)."""
        self._move(item_id, QueueState.QUARANTINED, error=error)

    def quarantined(self, topic: str) -> list[tuple[str, str | None]]:
        """The quarantined items of ``topic``: (key, error), oldest first."""
        rows = self.execute(
            "SELECT key, error FROM queue WHERE topic=? AND state=? ORDER BY id",
            (topic, QueueState.QUARANTINED),
        )
        return [(r["key"], r["error"]) for r in rows]

    def release_quarantined(self, topic: str) -> int:
        """Make the quarantined items of ``topic`` ready again, with a fresh count of tries.

        Returns
        -------
        int
            How many items were released.
        """
        ready = transition(QueueState.QUARANTINED, QueueState.READY)
        with self._lock:
            return self._conn.execute(
                "UPDATE queue SET state=?, attempts=0, not_before=0, updated_at=?"
                " WHERE topic=? AND state=?",
                (ready, time.time(), topic, QueueState.QUARANTINED),
            ).rowcount

    def has_ready(self, topic: str) -> bool:
        """True if an item of ``topic`` is ready to be claimed (now or later)."""
        return bool(
            self.execute(
                "SELECT 1 FROM queue WHERE topic=? AND state=? LIMIT 1", (topic, QueueState.READY)
            )
        )

    def counts(self, topic: str) -> dict[QueueState, int]:
        """How many items of ``topic`` are in each state (for ``aenode status``)."""
        rows = self.execute(
            "SELECT state, COUNT(*) AS n FROM queue WHERE topic=? GROUP BY state", (topic,)
        )
        return {QueueState(r["state"]): int(r["n"]) for r in rows}

    def requeue_claimed(self, topic: str | None = None) -> int:
        """After a restart, hand out again the items claimed by a process that died.

        Returns
        -------
        int
            How many items became ready again.
        """
        # CLAIMED -> READY, the one move this does (see aenode.states.TRANSITIONS).
        ready = transition(QueueState.CLAIMED, QueueState.READY)
        sql = "UPDATE queue SET state=?, updated_at=? WHERE state=?"
        args: tuple[Any, ...] = (ready, time.time(), QueueState.CLAIMED)
        if topic is not None:
            sql += " AND topic=?"
            args += (topic,)
        with self._lock:
            return self._conn.execute(sql, args).rowcount
