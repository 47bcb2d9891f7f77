"""``aenode run PATH... --out DIR``: the whole pipeline on folders, without networking."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from aenode.cli.store import findings_text
from aenode.config import Settings
from aenode.infer.registry import RegistryError
from aenode.jobs import JobOutcome
from aenode.offline import run_offline
from aenode.process import apply_process_settings
from aenode.states import JobState

__all__ = ["command_run"]


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
        "state": str(outcome.state),
        "reason": outcome.reason,
        "volumes_mm3": res.volumes_mm3 if res else {},
        "files": [str(p) for p in res.files] if res else [],
        "report_png": str(res.report_png) if res and res.report_png else None,
        "findings": outcome.findings.get("findings", []),
        "class_probabilities": outcome.findings.get("class_probabilities"),
        "measurements": outcome.findings.get("measurements", []),
        "notes": res.notes if res else [],
        "seconds": outcome.timings,
    }


def command_run(args: argparse.Namespace, settings: Settings) -> int:
    """Print what each job did: 0 when every job succeeded, 1 otherwise (or no job)."""
    apply_process_settings(settings.runtime)
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
            if s["findings"]:
                print(f"  findings: {findings_text(s['findings'])}")
            for label, mm3 in s["volumes_mm3"].items():
                print(f"  {label:28} {mm3:10.1f} mm3  ({mm3 / 1000:.2f} mL)")
            for path in s["files"]:
                print(f"  wrote {path}")
            if s["report_png"]:
                print(f"  report page {s['report_png']}")
    ok = bool(outcomes) and all(o.state == JobState.DONE for o in outcomes)
    return 0 if ok else 1
