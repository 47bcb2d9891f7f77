"""``aenode run PATH... --out DIR``: the whole pipeline on folders, without networking.

DICOM files are grouped into series, the selection rules pick the jobs (study rules decide
at once with the series present), each job's volumes are built and inferred with the same
runtime as ``aenode serve``, and the result objects are written under ``DIR/job-NNNNNN/``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from aenode.config import Settings
from aenode.infer.registry import Registry
from aenode.infer.runtime import Runtime
from aenode.jobs import JobOutcome, JobRunner
from aenode.records import Job, SeriesInfo
from aenode.select.explain import scan
from aenode.select.rules import compile_rules
from aenode.select.studies import StudyTracker, role_requirements
from aenode.store import Store

__all__ = ["run_offline"]

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
    # The same interfaces as `aenode serve`, behind a private in-memory store.
    store = Store(":memory:")
    try:
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
    finally:
        store.close()
    return outcomes
