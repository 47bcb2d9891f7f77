"""``aenode status``: recent series with their state and counts (jobs come later)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from aenode.config import Settings
from aenode.store import Store

__all__ = ["command_jobs", "command_retry", "command_status", "recent_series"]

_COLUMNS = (
    "study_uid",
    "series_uid",
    "revision",
    "modality",
    "description",
    "expected",
    "instance_count",
    "state",
    "completed_by",
    "first_arrival",
    "last_arrival",
    "completed_at",
)


def recent_series(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    """The most recently active series revisions, newest first.

    Parameters
    ----------
    store : Store
        The store.
    limit : int
        At most this many rows.

    Returns
    -------
    list of dict
        One dict per series revision with the keys of the ``series`` table shown by
        ``aenode status``.
    """
    rows = store.execute(
        f"SELECT {', '.join(_COLUMNS)} FROM series ORDER BY last_arrival DESC LIMIT ?",
        (limit,),
    )
    return [{key: row[key] for key in _COLUMNS} for row in rows]


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def command_status(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode status [--json] [--limit N]``: print recent series.

    Returns
    -------
    int
        0; 1 if there is no store at ``storage.path``.
    """
    db = Path(settings.storage.path) / "aenode.db"
    if not db.is_file():
        print(f"aenode: no store at {db} (storage.path); has the node run yet?")
        return 1
    store = Store(db)
    try:
        series = recent_series(store, args.limit)
        queued = store.execute(
            "SELECT state, COUNT(*) AS n FROM queue WHERE topic='series.complete' GROUP BY state"
        )
    finally:
        store.close()
    if args.json:
        print(
            json.dumps(
                {"series": series, "handover": {r["state"]: r["n"] for r in queued}}, indent=2
            )
        )
        return 0
    if not series:
        print("no series received yet")
        return 0
    print(
        f"{'last arrival':19}  {'state':9}  {'by':8}  {'count':>9}  {'mod':4}  "
        f"{'rev':>3}  series / description"
    )
    for s in series:
        count = (
            f"{s['instance_count']}/{s['expected']}" if s["expected"] else str(s["instance_count"])
        )
        print(
            f"{_when(s['last_arrival']):19}  {s['state']:9}  {s['completed_by'] or '-':8}  "
            f"{count:>9}  {s['modality'] or '-':4}  {s['revision']:>3}  {s['series_uid']} "
            f"{s['description'] or ''}"
        )
    return 0


def command_jobs(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode jobs``: not yet available (the lead fills it in)."""
    print("aenode jobs: not yet available")
    return 1


def command_retry(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode retry``: not yet available (the lead fills it in)."""
    print("aenode retry: not yet available")
    return 1
