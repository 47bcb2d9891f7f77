"""Jobs: run a recorded job through volume -> infer -> results -> outbox.

Every state change and stage time is written to the ``jobs`` table, so ``aenode jobs`` shows
where each job is and a restart resumes it. A job that fails ends in a visible state
(``rejected`` for a volume that cannot be trusted, ``failed`` otherwise) with the reason.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aenode.assemble import reject_series
from aenode.records import Job, Volume
from aenode.select.studies import job_from_row
from aenode.store import Store

if TYPE_CHECKING:
    from aenode.config import Settings
    from aenode.export.outbox import Outbox
    from aenode.infer.registry import Registry
    from aenode.infer.runtime import Runtime
    from aenode.results import ResultSet

__all__ = ["JobOutcome", "JobRunner", "claim_job", "requeue_interrupted"]

logger = logging.getLogger(__name__)


def claim_job(store: Store, now: float | None = None) -> Job | None:
    """Take the oldest ``queued`` job (it becomes ``running``), or None.

    Parameters
    ----------
    store : Store
        The store; the ``jobs`` table is the job queue.
    now : float or None
        Epoch seconds for ``t_started``.

    Returns
    -------
    Job or None
    """
    now = time.time() if now is None else now
    with store.transaction() as conn:
        row = conn.execute("SELECT * FROM jobs WHERE state='queued' ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return None
        conn.execute(
            "UPDATE jobs SET state='running', t_started=?, updated_at=? WHERE id=?",
            (now, now, row["id"]),
        )
    return job_from_row(row)


def requeue_interrupted(store: Store) -> int:
    """After a restart, queue again the jobs a previous process left half done.

    Returns
    -------
    int
        How many jobs were queued again.
    """
    rows = store.execute(
        "UPDATE jobs SET state='queued', updated_at=? WHERE state IN ('running', 'inferred')"
        " RETURNING id",
        (time.time(),),
    )
    return len(rows)


@dataclass
class JobOutcome:
    """What happened to one job."""

    job: Job
    state: str
    reason: str | None = None
    results: ResultSet | None = None
    timings: dict[str, float] = field(default_factory=dict)


class JobRunner:
    """Runs recorded jobs: volumes, inference, result objects, outbox.

    Parameters
    ----------
    settings : Settings
        All settings (``results``, ``storage``).
    store : Store
        Where job states and times are written.
    registry : Registry
        Loaded model packages (cards).
    runtime : Runtime
        Warm inference workers.
    outbox : Outbox or None
        Where result files are queued for export; None writes files only.
    results_root : pathlib.Path or None
        Folder for result objects; defaults to ``<storage.path>/results``.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: Registry,
        runtime: Runtime,
        outbox: Outbox | None = None,
        results_root: Path | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.runtime = runtime
        self.outbox = outbox
        self.results_root = results_root or Path(settings.storage.path) / "results"

    def _set(self, job: Job, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        self.store.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), job.id))

    def run(self, job: Job) -> JobOutcome:
        """Run one recorded job to the outbox; never raises for a job's own failure.

        Parameters
        ----------
        job : Job
            A job recorded by the study tracker (``id`` set).

        Returns
        -------
        JobOutcome
            The final state (``exporting``, ``done``, ``rejected`` or ``failed``) and reason.
        """
        from aenode.infer.runtime import InferenceError
        from aenode.results import write_results
        from aenode.volume import VolumeError, build_volume

        ctx = {"job": job.id, "model": job.model, "study": job.study_uid}
        timings: dict[str, float] = {}
        t0 = time.time()
        self._set(job, state="running", reason=None)
        volumes: dict[str, Volume] = {}
        for role, series in job.inputs.items():
            try:
                volumes[role] = build_volume(
                    series,
                    spacing_tolerance=self.settings.volume.spacing_tolerance,
                    allow=self.settings.volume.allow,
                )
            except VolumeError as exc:
                reason = f"role {role}: series {series.series_uid}: {exc}"
                logger.warning("volume rejected: %s", reason, extra=ctx)
                reject_series(self.store, series.series_uid, series.revision, str(exc))
                self._set(job, state="rejected", reason=reason)
                return JobOutcome(job, "rejected", reason)
        timings["volume"] = time.time() - t0
        t1 = time.time()
        try:
            prediction = self.runtime.predict(
                job.model, volumes, fractional=self.settings.results.fractional
            )
        except InferenceError as exc:
            logger.error("inference failed: %s", exc, extra=ctx)
            self._set(job, state="failed", reason=f"inference: {exc}")
            return JobOutcome(job, "failed", f"inference: {exc}")
        timings["infer"] = time.time() - t1
        self._set(job, state="inferred", t_inferred=time.time())
        t2 = time.time()
        out_dir = self.results_root / f"job-{job.id:06d}"
        card = self.registry.card(job.model)
        try:
            results = write_results(job, volumes, prediction, card, self.settings.results, out_dir)
        except (ValueError, AttributeError, OSError) as exc:
            logger.error("writing results failed: %s", exc, extra=ctx)
            self._set(job, state="failed", reason=f"results: {type(exc).__name__}: {exc}")
            return JobOutcome(job, "failed", f"results: {exc}")
        timings["write"] = time.time() - t2
        findings = json.dumps({"volumes_mm3": results.volumes_mm3, "notes": results.notes})
        if self.outbox is not None and self.settings.export.destinations and results.files:
            with self.store.transaction() as conn:
                self.outbox.add(job.id or 0, results.files, conn=conn)
                conn.execute(
                    "UPDATE jobs SET state='exporting', t_written=?, result_dir=?, findings=?,"
                    " updated_at=? WHERE id=?",
                    (time.time(), str(out_dir), findings, time.time(), job.id),
                )
            state = "exporting"
        else:
            now = time.time()
            self._set(
                job,
                state="done",
                t_written=now,
                result_dir=str(out_dir),
                findings=findings,
            )
            state = "done"
        logger.info(
            "job %s: %s (volume %.2fs, infer %.2fs, write %.2fs)",
            job.id,
            state,
            timings["volume"],
            timings["infer"],
            timings["write"],
            extra=ctx,
        )
        return JobOutcome(job, state, None, results, timings)

    def run_forever(self, stop: threading.Event, wakeup: threading.Event, poll: float) -> None:
        """Run queued jobs until ``stop`` is set; a job's unexpected error fails that job only.

        Parameters
        ----------
        stop : threading.Event
            Set to end the loop (after the job in hand).
        wakeup : threading.Event
            Set by the dispatcher when it records jobs.
        poll : float
            Seconds between looks at an empty queue.
        """
        while not stop.is_set():
            try:
                job = claim_job(self.store)
            except sqlite3.Error as exc:  # the store is busy or failing: keep trying
                logger.error("job worker: store error, retrying: %s", exc)
                stop.wait(1.0)
                continue
            if job is None:
                wakeup.wait(poll)
                wakeup.clear()
                continue
            try:
                self.run(job)
            except Exception as exc:  # a bug must fail the job visibly, not the node
                logger.exception(
                    "job %s failed unexpectedly", job.id, extra={"job": job.id, "model": job.model}
                )
                self._set(
                    job, state="failed", reason=f"internal error: {type(exc).__name__}: {exc}"
                )
