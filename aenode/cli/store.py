"""``aenode status``, ``aenode jobs`` and ``aenode retry``: what the store says."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from aenode.config import Settings
from aenode.errors import InputError
from aenode.export.outbox import Outbox, export_states
from aenode.health import read_refusal
from aenode.infer.executor import read_executor_file
from aenode.jobs import JobRecord, recent_jobs, retry_job
from aenode.quarantine import release_quarantined
from aenode.status import open_store, status_report
from aenode.store import Store

__all__ = ["command_jobs", "command_retry", "command_status", "findings_text", "with_store"]


T = TypeVar("T")


def with_store(settings: Settings, read: Callable[[Store], T]) -> T | None:
    """Open the store at ``storage.path``, call ``read`` with it, close it.

    Returns
    -------
    object or None
        What ``read`` returned; None (the reason printed) when there is no store.
    """
    try:
        store = open_store(settings)
    except InputError as exc:
        print(f"aenode: {exc}")
        return None
    try:
        return read(store)
    finally:
        store.close()


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def findings_text(findings: list[dict[str, Any]]) -> str:
    """One line for a job's findings: ``bleed 0.93 (present); fracture 0.12 (absent)``."""
    parts = []
    for f in findings:
        mark = "present" if f.get("present") else "absent"
        parts.append(f"{f.get('name')} {float(f.get('probability', 0.0)):.2f} ({mark})")
    return "; ".join(parts)


def _job_dict(job: JobRecord) -> dict[str, Any]:
    return {**asdict(job), "state": job.state.value}


def _print_quarantined(items: list[dict[str, Any]]) -> None:
    if not items:
        return
    print(f"quarantined: {len(items)} item(s) (aenode retry --quarantined takes them out)")
    for q in items:
        print(f"  {q['kind']:8}  {q['key']}: {q['reason'] or '-'}")


def _print_executor(executor: dict[str, Any] | None) -> None:
    """The executor the node last wrote (``executor.json``): its workers or actors."""
    if not executor:
        return
    kind = executor.get("executor", "?")
    if kind == "ray":
        actors = executor.get("actors", [])
        print(f"executor: ray at {executor.get('address')}, {len(actors)} actor(s)")
        for a in actors:
            print(
                f"  {a.get('name')}: {a.get('state')} on {a.get('node_ip') or '-'}, devices "
                f"{','.join(a.get('devices') or []) or '-'}, GPU ids "
                f"{','.join(a.get('gpu_ids') or []) or '-'}, in flight "
                f"{a.get('in_flight')}/{a.get('max_in_flight')}, restarts {a.get('restarts')}"
            )
        return
    workers = executor.get("workers", [])
    devices = ", ".join(str(w.get("device")) for w in workers) or "-"
    print(f"executor: {kind}, devices {devices}")


def command_status(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode status [--json] [--limit N]``: recent series (with why one was rejected) and jobs.

    Returns
    -------
    int
        0; 1 if there is no store at ``storage.path``.
    """
    report = with_store(settings, lambda store: status_report(store, args.limit))
    if report is None:
        return 1
    series = [{**asdict(s), "state": s.state.value} for s in report.series]
    jobs = [_job_dict(j) for j in report.jobs]
    refusing = read_refusal(Path(settings.storage.path))
    executor = read_executor_file(Path(settings.storage.path))
    quarantined = [asdict(q) for q in report.quarantined]
    if args.json:
        handover = {state.value: n for state, n in report.handover.items()}
        print(
            json.dumps(
                {
                    "refusing": refusing,
                    "executor": executor,
                    "series": series,
                    "handover": handover,
                    "jobs": jobs,
                    "quarantined": quarantined,
                },
                indent=2,
            )
        )
        return 0
    if refusing:
        print(f"node refusing new C-STOREs (0xA700): {refusing}")
    _print_executor(executor)
    _print_quarantined(quarantined)
    if not series and not jobs:
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
        state = s["state"]
        if state == "complete" and (s["reason"] or "").startswith("not selected:"):
            state = "unmatched"  # complete, but no rule selected it (the reason says why)
        print(
            f"{_when(s['last_arrival']):19}  {state:9}  {s['completed_by'] or '-':8}  "
            f"{count:>9}  {s['modality'] or '-':4}  {s['revision']:>3}  {s['series_uid']} "
            f"{s['description'] or ''}"
        )
        if s["reason"]:
            print(f"{'':19}  reason: {s['reason']}")
    for j in jobs:
        volumes = ", ".join(f"{k} {v:.0f} mm3" for k, v in j["volumes_mm3"].items())
        shown = j["reason"] or findings_text(j["findings"]) or volumes
        print(f"job {j['id']}: {j['model']} {j['state']} {shown}")
    return 0


def command_jobs(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode jobs [--json] [--limit N]``: jobs with their state and per-stage times.

    Returns
    -------
    int
        0; 1 if there is no store at ``storage.path``.
    """

    def read(store: Store) -> tuple[list[dict[str, Any]], dict[int, list[tuple[str, str]]]]:
        jobs = [_job_dict(j) for j in recent_jobs(store, args.limit)]
        return jobs, export_states(store, [j["id"] for j in jobs])

    found = with_store(settings, read)
    if found is None:
        return 1
    jobs, exports = found
    for j in jobs:
        # Per destination: pending, sending, sent, committing (storage commitment asked,
        # no report yet), committed, failed, quarantined.
        j["exports"] = [{"destination": d, "state": st} for d, st in exports.get(j["id"], [])]
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
        if j["exports"]:
            each = ", ".join(f"{e['destination']} {e['state']}" for e in j["exports"])
            print(f"{'':>5}  export: {each}")
        if j["findings"]:
            print(f"{'':>5}  findings: {findings_text(j['findings'])}")
    return 0


def command_retry(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode retry JOB | --quarantined``: queue a failed job again, or free the quarantine.

    A job that failed while exporting gets its outbox rows queued again; one that failed
    or was rejected before (or was quarantined) is queued to run again from its series.
    ``--quarantined`` takes every quarantined item out
    (:func:`aenode.quarantine.release_quarantined`).
    A running ``aenode serve`` picks them up.

    Returns
    -------
    int
        0 when queued; 1 when the job does not exist or is not failed or quarantined.
    """
    try:
        store = open_store(settings)
    except InputError as exc:
        print(f"aenode: {exc}")
        return 1
    outbox = Outbox(store, settings.export, settings.calling_ae)
    try:
        if args.quarantined:
            released = release_quarantined(store, outbox)
        elif args.job is None:
            print("aenode retry: give a job id or --quarantined")
            return 1
        else:
            what = retry_job(store, args.job, outbox)
    except InputError as exc:
        print(f"aenode retry: {exc}")
        return 1
    finally:
        store.close()
    if args.quarantined:
        counts = ", ".join(f"{n} {kind}" for kind, n in released.items() if n)
        print(f"out of quarantine: {counts or 'nothing was quarantined'}")
        return 0
    print(
        f"job {args.job}: " + ("export queued again" if what == "export" else "queued to run again")
    )
    return 0
