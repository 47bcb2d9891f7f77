"""``aenode run PATH... --out DIR``: the whole pipeline on folders, without networking.

DICOM files are grouped into series, the selection rules pick the jobs (study rules decide
at once with the series present), each job's volumes are built and inferred with the same
runtime as ``aenode serve``, and the result objects are written under ``DIR/job-NNNNNN/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aenode.config import Settings
from aenode.infer.registry import Registry, RegistryError
from aenode.infer.runtime import Runtime
from aenode.jobs import JobOutcome, JobRunner
from aenode.records import Job, SeriesInfo
from aenode.select.explain import scan
from aenode.select.rules import compile_rules
from aenode.select.studies import StudyTracker, role_requirements
from aenode.store import Store

__all__ = ["command_run", "run_offline"]

log = logging.getLogger(__name__)


def run_offline(settings: Settings, paths: list[Path], out: Path) -> list[JobOutcome]:
    """Select, infer and write results for the DICOM files under ``paths``.

    Parameters
    ----------
    settings : Settings
        Rules, models, runtime and result settings.
    paths : list of pathlib.Path
        DICOM files or folders (searched recursively).
    out : pathlib.Path
        Output folder; one sub-folder per job.

    Returns
    -------
    list of JobOutcome
        One per job, in the order they ran.

    Raises
    ------
    aenode.config.ConfigError
        If a rule names a model that is not loaded.
    RegistryError
        If a model package is invalid.
    """
    registry = Registry.load(settings.models)
    rules = compile_rules(settings.selection.rules, known_models=registry.names())
    reports, skipped = scan(paths)
    for line in skipped:
        log.warning("skipped %s", line)
    out.mkdir(parents=True, exist_ok=True)
    outcomes: list[JobOutcome] = []
    with tempfile.TemporaryDirectory(prefix="aenode-run-") as tmp:
        store = Store(Path(tmp) / "run.db")
        cards = {name: registry.card(name) for name in registry.names()}
        timeout = settings.selection.study_timeout_seconds
        tracker = StudyTracker(store, rules, role_requirements(cards), timeout=timeout)
        now = time.time()
        jobs: list[Job] = []
        for report in reports:
            series = SeriesInfo(
                study_uid=report.study_uid,
                series_uid=report.series_uid,
                revision=0,
                modality=report.modality,
                description=report.description,
                files=tuple(report.files),
                completed_by="offline",
                first_arrival=now,
                last_arrival=now,
                completed_at=now,
            )
            jobs.extend(tracker.on_series(series, report.header, now=now))
        # Every series on disk is here: study rules decide now rather than after a timeout.
        jobs.extend(tracker.due(now + timeout + 1))
        with Runtime(registry, settings.runtime) as runtime:
            runner = JobRunner(settings, store, registry, runtime, outbox=None, results_root=out)
            for job in jobs:
                outcomes.append(runner.run(job))
        store.close()
    return outcomes


def _summary(outcome: JobOutcome) -> dict[str, Any]:
    job = outcome.job
    res = outcome.results
    return {
        "job": job.id,
        "rule": job.rule,
        "model": job.model,
        "inputs": {
            role: {"series_uid": s.series_uid, "description": s.description}
            for role, s in job.inputs.items()
        },
        "state": outcome.state,
        "reason": outcome.reason,
        "volumes_mm3": res.volumes_mm3 if res else {},
        "files": [str(p) for p in res.files] if res else [],
        "report_png": str(res.report_png) if res and res.report_png else None,
        "notes": res.notes if res else [],
        "seconds": outcome.timings,
    }


def command_run(args: argparse.Namespace, settings: Settings) -> int:
    """The ``aenode run`` command: 0 when every job succeeded, 1 otherwise (or no job)."""
    try:
        outcomes = run_offline(settings, list(args.paths), args.out)
    except RegistryError as exc:
        print(f"aenode run: {exc}", file=sys.stderr)
        return 2
    summaries = [_summary(o) for o in outcomes]
    if args.json:
        print(json.dumps({"out": str(args.out), "jobs": summaries}, indent=2))
    else:
        if not summaries:
            print("no series matched a selection rule (see `aenode select PATH`)")
        for s in summaries:
            inputs = ", ".join(f"{r}='{i['description']}'" for r, i in s["inputs"].items())
            print(f"job {s['job']}: model {s['model']} on {inputs}: {s['state']}")
            if s["reason"]:
                print(f"  reason: {s['reason']}")
            for label, mm3 in s["volumes_mm3"].items():
                print(f"  {label:28} {mm3:10.1f} mm3  ({mm3 / 1000:.2f} mL)")
            for path in s["files"]:
                print(f"  wrote {path}")
            if s["report_png"]:
                print(f"  report page {s['report_png']}")
    ok = bool(outcomes) and all(o.state == "done" for o in outcomes)
    return 0 if ok else 1
