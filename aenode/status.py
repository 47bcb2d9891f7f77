"""``aenode status``, ``aenode jobs`` and ``aenode retry``: what the store says."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from aenode.config import Settings
from aenode.store import Store

__all__ = ["command_jobs", "command_retry", "command_status", "recent_jobs", "recent_series"]

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
    "reason",
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
    """``aenode status [--json] [--limit N]``: recent series (with why one was rejected) and jobs.

    Returns
    -------
    int
        0; 1 if there is no store at ``storage.path``.
    """
    store = _open(settings)
    if store is None:
        return 1
    try:
        series = recent_series(store, args.limit)
        jobs = recent_jobs(store, args.limit)
        queued = store.execute(
            "SELECT state, COUNT(*) AS n FROM queue WHERE topic='series.complete' GROUP BY state"
        )
    finally:
        store.close()
    if args.json:
        handover = {r["state"]: r["n"] for r in queued}
        print(json.dumps({"series": series, "handover": handover, "jobs": jobs}, indent=2))
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
        if s["reason"]:
            print(f"{'':19}  reason: {s['reason']}")
    for j in jobs:
        volumes = ", ".join(f"{k} {v:.0f} mm3" for k, v in j["volumes_mm3"].items())
        print(f"job {j['id']}: {j['model']} {j['state']} {j['reason'] or volumes}")
    return 0


_JOB_COLUMNS = (
    "id",
    "rule",
    "model",
    "study_uid",
    "state",
    "reason",
    "result_dir",
    "t_received",
    "t_completed",
    "t_started",
    "t_inferred",
    "t_written",
    "t_exported",
)
_STAGES = (
    ("complete", "t_received", "t_completed"),
    ("wait", "t_completed", "t_started"),
    ("infer", "t_started", "t_inferred"),
    ("write", "t_inferred", "t_written"),
    ("export", "t_written", "t_exported"),
)


def recent_jobs(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    """The most recent jobs, newest first, with per-stage seconds.

    Parameters
    ----------
    store : Store
        The store.
    limit : int
        At most this many rows.

    Returns
    -------
    list of dict
        The ``jobs`` columns shown by ``aenode jobs`` plus ``stages`` (stage -> seconds,
        for the stages that have both ends) and ``volumes_mm3`` from the findings.
    """
    rows = store.execute(
        f"SELECT {', '.join(_JOB_COLUMNS)}, findings FROM jobs ORDER BY id DESC LIMIT ?",
        (limit,),
    )
    jobs = []
    for row in rows:
        job = {key: row[key] for key in _JOB_COLUMNS}
        job["stages"] = {
            name: round(row[end] - row[start], 3)
            for name, start, end in _STAGES
            if row[start] and row[end]
        }
        findings = json.loads(row["findings"]) if row["findings"] else {}
        job["volumes_mm3"] = findings.get("volumes_mm3", {})
        jobs.append(job)
    return jobs


def _open(settings: Settings) -> Store | None:
    db = Path(settings.storage.path) / "aenode.db"
    if not db.is_file():
        print(f"aenode: no store at {db} (storage.path); has the node run yet?")
        return None
    return Store(db)


def command_jobs(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode jobs [--json] [--limit N]``: jobs with their state and per-stage times.

    Returns
    -------
    int
        0; 1 if there is no store at ``storage.path``.
    """
    store = _open(settings)
    if store is None:
        return 1
    try:
        jobs = recent_jobs(store, args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"jobs": jobs}, indent=2))
        return 0
    if not jobs:
        print("no jobs yet")
        return 0
    print(f"{'job':>5}  {'state':9}  {'model':14}  {'received':19}  stages (s) / reason")
    for j in jobs:
        stages = " ".join(f"{k}={v:.2f}" for k, v in j["stages"].items())
        print(
            f"{j['id']:>5}  {j['state']:9}  {j['model']:14}  {_when(j['t_received']):19}  {stages}"
        )
        if j["reason"]:
            print(f"{'':>5}  reason: {j['reason']}")
    return 0


def command_retry(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode retry JOB``: queue a failed job again (its export, or the whole job).

    A job that failed while exporting gets its outbox rows queued again; one that failed
    or was rejected before is queued to run again from its series. A running ``aenode serve``
    picks it up.

    Returns
    -------
    int
        0 when queued; 1 when the job does not exist or is not failed.
    """
    from aenode.export.outbox import Outbox

    store = _open(settings)
    if store is None:
        return 1
    try:
        rows = store.execute("SELECT id, state, t_written FROM jobs WHERE id=?", (args.job,))
        if not rows:
            print(f"aenode retry: no job {args.job}")
            return 1
        row = rows[0]
        if row["state"] not in ("failed", "rejected"):
            print(f"aenode retry: job {args.job} is {row['state']}, not failed")
            return 1
        calling = settings.calling_ae
        if row["t_written"] and Outbox(store, settings.export, calling).retry(args.job):
            print(f"job {args.job}: export queued again")
            return 0
        store.execute(
            "UPDATE jobs SET state='queued', reason=NULL, updated_at=? WHERE id=?",
            (time.time(), args.job),
        )
        print(f"job {args.job}: queued to run again")
        return 0
    finally:
        store.close()
