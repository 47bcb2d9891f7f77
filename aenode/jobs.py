"""Jobs: the owner of the ``jobs`` table, and the runner (volume -> infer -> results -> outbox).

Only this module writes ``jobs`` rows. Others call its functions: the study tracker
:func:`record_job`, the workers :func:`claim_job`, the outbox :func:`move` (exporting ->
done or failed), ``aenode retry`` :func:`retry_job`; ``status`` reads :func:`recent_jobs`.
Every state change is checked against :data:`aenode.states.TRANSITIONS` and every stage
time written, so ``aenode jobs`` shows where each job is and a restart resumes it.

A job that fails ends in a visible state with its reason: ``rejected`` for a volume that
cannot be trusted; ``failed`` for other bad input or a peer's failure (the reason names
the stage); ``failed`` with ``internal error: ...`` for a bug, logged with its traceback.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aenode import audit
from aenode.assemble import reject_series
from aenode.errors import InputError, PeerError
from aenode.infer.executor import Executor, Predictor, WorkerLost, as_executor
from aenode.records import Job, Prediction, SeriesInfo, Volume
from aenode.states import IllegalTransition, JobState, transition
from aenode.store import Store, StoreError
from aenode.supervise import (
    QUARANTINE_AFTER,
    Backoff,
    Failures,
    Quarantined,
    Unavailable,
    describe,
    is_resource_error,
    supervise,
)

if TYPE_CHECKING:
    from aenode.config import Settings
    from aenode.export.outbox import Outbox
    from aenode.infer.registry import Registry
    from aenode.results import ResultSet

__all__ = [
    "JobOutcome",
    "JobRecord",
    "JobRunner",
    "STAGE_COLUMNS",
    "claim_job",
    "findings_record",
    "get_job",
    "get_state",
    "job_counts",
    "job_from_row",
    "move",
    "note",
    "quarantined_jobs",
    "recent_jobs",
    "record_job",
    "requeue_interrupted",
    "retry_job",
    "series_from_json",
    "series_to_json",
    "stage_seconds",
]

logger = logging.getLogger(__name__)

_STAGES = (
    ("complete", "t_received", "t_completed"),
    ("wait", "t_completed", "t_started"),
    ("infer", "t_started", "t_inferred"),
    ("write", "t_inferred", "t_written"),
    ("export", "t_written", "t_exported"),
)


# -- records -----------------------------------------------------------------------------


def series_to_json(series: SeriesInfo) -> dict[str, Any]:
    """A JSON-ready dict of a :class:`SeriesInfo` (paths as strings)."""
    data = asdict(series)
    data["files"] = [str(p) for p in series.files]
    return data


def series_from_json(data: Mapping[str, Any]) -> SeriesInfo:
    """The inverse of :func:`series_to_json`."""
    fields = dict(data)
    fields["files"] = tuple(Path(p) for p in fields.get("files", ()))
    return SeriesInfo(**fields)


def job_from_row(row: sqlite3.Row | Mapping[str, Any]) -> Job:
    """Rebuild a :class:`Job` from its row in the ``jobs`` table (after a restart).

    Parameters
    ----------
    row : sqlite3.Row or mapping
        With ``id``, ``rule``, ``model``, ``study_uid`` and ``inputs``.

    Returns
    -------
    Job
    """
    inputs = {role: series_from_json(s) for role, s in json.loads(row["inputs"]).items()}
    return Job(
        rule=row["rule"],
        model=row["model"],
        study_uid=row["study_uid"],
        inputs=inputs,
        id=int(row["id"]),
    )


@dataclass(frozen=True)
class JobRecord:
    """A job as ``aenode jobs`` and ``aenode status`` show it.

    Attributes
    ----------
    id : int
    rule, model, study_uid : str
    state : JobState
    reason, result_dir : str or None
    t_received, t_completed, t_started, t_inferred, t_written, t_exported : float or None
        Epoch seconds of each stage's end.
    stages : dict of str to float
        Stage -> seconds, for the stages that have both ends.
    volumes_mm3 : dict of str to float
        From the findings (segmentations).
    """

    id: int
    rule: str
    model: str
    study_uid: str
    state: JobState
    reason: str | None
    result_dir: str | None
    t_received: float | None
    t_completed: float | None
    t_started: float | None
    t_inferred: float | None
    t_written: float | None
    t_exported: float | None
    stages: dict[str, float] = field(default_factory=dict)
    volumes_mm3: dict[str, float] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    class_probabilities: dict[str, float] | None = None
    measurements: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    t_volume: float | None = None
    """When the volume stage ended (the inference started); None before schema 3."""


def findings_record(prediction: Prediction, results: ResultSet | None = None) -> dict[str, Any]:
    """What the ``jobs.findings`` column holds for a job's prediction (JSON-ready).

    Parameters
    ----------
    prediction : Prediction
        The model's output.
    results : ResultSet or None
        The written results (volumes and notes), when written.

    Returns
    -------
    dict
        ``findings`` (one dict per :class:`~aenode.records.Finding`), ``class_probabilities``
        (or None), ``measurements`` (when the prediction has any), ``volumes_mm3`` and
        ``notes``.
    """
    record: dict[str, Any] = {
        "findings": [asdict(f) for f in prediction.findings],
        "class_probabilities": prediction.class_probabilities,
        "volumes_mm3": results.volumes_mm3 if results is not None else {},
        "notes": list(results.notes if results is not None else prediction.notes),
    }
    measurements = getattr(prediction, "measurements", None)
    if measurements:
        record["measurements"] = [asdict(m) for m in measurements]
    return record


def _record(row: sqlite3.Row) -> JobRecord:
    findings = json.loads(row["findings"]) if row["findings"] else {}
    return JobRecord(
        id=int(row["id"]),
        rule=row["rule"],
        model=row["model"],
        study_uid=row["study_uid"],
        state=JobState(row["state"]),
        reason=row["reason"],
        result_dir=row["result_dir"],
        t_received=row["t_received"],
        t_completed=row["t_completed"],
        t_started=row["t_started"],
        t_inferred=row["t_inferred"],
        t_written=row["t_written"],
        t_exported=row["t_exported"],
        stages={
            name: round(row[end] - row[start], 3)
            for name, start, end in _STAGES
            if row[start] and row[end]
        },
        volumes_mm3=findings.get("volumes_mm3", {}),
        findings=findings.get("findings", []),
        class_probabilities=findings.get("class_probabilities"),
        measurements=findings.get("measurements", []),
        notes=findings.get("notes", []),
        t_volume=row["t_volume"] if "t_volume" in row.keys() else None,
    )


# -- queries -----------------------------------------------------------------------------


def recent_jobs(store: Store, limit: int = 50) -> list[JobRecord]:
    """The most recent jobs, newest first, with per-stage seconds.

    Parameters
    ----------
    store : Store
        The store.
    limit : int
        At most this many rows.

    Returns
    -------
    list of JobRecord
    """
    rows = store.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
    return [_record(row) for row in rows]


def get_job(store: Store, job_id: int) -> JobRecord | None:
    """The job with row id ``job_id``, or None."""
    rows = store.execute("SELECT * FROM jobs WHERE id=?", (job_id,))
    return _record(rows[0]) if rows else None


STAGE_COLUMNS: dict[str, tuple[str, str]] = {
    "receive_to_complete": ("t_received", "t_completed"),
    "complete_to_start": ("t_completed", "t_started"),
    "volume": ("t_started", "t_volume"),
    "infer": ("t_volume", "t_inferred"),
    "write": ("t_inferred", "t_written"),
    "export": ("t_written", "t_exported"),
}
"""Stage -> (start, end) columns of ``jobs`` (``/metrics``' ``aenode_stage_seconds``);
``end_to_end`` runs from ``t_received`` to ``t_exported`` (``t_written`` without export)."""


def job_counts(store: Store) -> dict[tuple[str, JobState], int]:
    """Jobs per (model, state), since the store was made (for ``/metrics``)."""
    rows = store.execute("SELECT model, state, COUNT(*) AS n FROM jobs GROUP BY model, state")
    return {(str(r["model"]), JobState(r["state"])): int(r["n"]) for r in rows}


def stage_seconds(store: Store) -> dict[str, list[float]]:
    """Seconds each job spent in each stage (:data:`STAGE_COLUMNS`) plus ``end_to_end``.

    Returns
    -------
    dict of str to list of float
        Stage -> one value per job that has both ends of that stage.
    """
    cols = sorted({c for pair in STAGE_COLUMNS.values() for c in pair})
    rows = store.execute(f"SELECT state, {', '.join(cols)} FROM jobs")
    out: dict[str, list[float]] = {name: [] for name in (*STAGE_COLUMNS, "end_to_end")}
    for row in rows:
        for name, (start, end) in STAGE_COLUMNS.items():
            if row[start] and row[end]:
                out[name].append(max(0.0, row[end] - row[start]))
        if row["state"] == JobState.DONE and row["t_received"]:
            last = row["t_exported"] or row["t_written"]
            if last:
                out["end_to_end"].append(max(0.0, last - row["t_received"]))
    return out


# -- writes ------------------------------------------------------------------------------


def record_job(
    conn: sqlite3.Connection,
    rule: str,
    model: str,
    study_uid: str,
    inputs: Mapping[str, SeriesInfo],
    now: float,
) -> Job | None:
    """Record a new ``queued`` job inside the caller's transaction, once.

    Parameters
    ----------
    conn : sqlite3.Connection
        A connection inside an open :meth:`Store.transaction`.
    rule, model, study_uid : str
        The selection rule, the model package and the study.
    inputs : mapping of str to SeriesInfo
        Role -> series.
    now : float
        Epoch seconds.

    Returns
    -------
    Job or None
        The job with ``id`` set; None if the same (rule, model, inputs) was recorded before.
    """
    received = min((s.first_arrival for s in inputs.values()), default=0.0)
    completed = max((s.completed_at for s in inputs.values()), default=0.0)
    encoded = json.dumps({role: series_to_json(s) for role, s in sorted(inputs.items())})
    cur = conn.execute(
        "INSERT OR IGNORE INTO jobs (rule, model, study_uid, inputs, state, t_received,"
        " t_completed, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (rule, model, study_uid, encoded, JobState.QUEUED, received, completed, now, now),
    )
    if cur.rowcount != 1:
        return None
    audit.record(
        conn,
        audit.AuditEvent.SELECTED,
        study_uid,
        series_uid=",".join(s.series_uid for _, s in sorted(inputs.items())),
        job_id=cur.lastrowid,
        at=now,
        rule=rule,
        model=model,
        roles={role: s.series_uid for role, s in sorted(inputs.items())},
    )
    return Job(rule=rule, model=model, study_uid=study_uid, inputs=dict(inputs), id=cur.lastrowid)


def move(conn: sqlite3.Connection, job_id: int, new: JobState, **fields: Any) -> JobState:
    """Change a job's state (and other columns) inside the caller's transaction.

    Parameters
    ----------
    conn : sqlite3.Connection
        A connection inside an open :meth:`Store.transaction`.
    job_id : int
        The job's row id.
    new : JobState
        The state to move to.
    **fields
        Other ``jobs`` columns to set (``reason``, ``t_written``, ...).

    Returns
    -------
    JobState
        The state the job was in.

    Raises
    ------
    aenode.states.IllegalTransition
        If the move is not allowed.
    StoreError
        If there is no such job.
    """
    row = conn.execute("SELECT state, study_uid, model FROM jobs WHERE id=?", (job_id,)).fetchone()
    if row is None:
        raise StoreError(f"no job {job_id}")
    old = JobState(row["state"])
    transition(old, new)
    fields["updated_at"] = time.time()
    cols = "".join(f", {k}=?" for k in fields)
    conn.execute(f"UPDATE jobs SET state=?{cols} WHERE id=?", (new, *fields.values(), job_id))
    audit.record(
        conn,
        audit.AuditEvent.JOB,
        row["study_uid"],
        job_id=job_id,
        at=fields["updated_at"],
        model=row["model"],
        reason=fields.get("reason"),
        **{"from": old.value, "to": JobState(new).value},
    )
    return old


def get_state(conn: sqlite3.Connection, job_id: int) -> JobState | None:
    """A job's state read inside the caller's transaction, or None if there is no such job."""
    row = conn.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
    return JobState(row["state"]) if row is not None else None


def note(conn: sqlite3.Connection, job_id: int, reason: str | None) -> None:
    """Set a job's reason without changing its state (an export retrying, for example)."""
    conn.execute("UPDATE jobs SET reason=?, updated_at=? WHERE id=?", (reason, time.time(), job_id))


def quarantined_jobs(store: Store) -> list[Quarantined]:
    """Jobs set aside after repeated unexpected failures (``aenode status``)."""
    rows = store.execute(
        "SELECT id, reason FROM jobs WHERE state=? ORDER BY id", (JobState.QUARANTINED,)
    )
    return [Quarantined("job", str(r["id"]), r["reason"]) for r in rows]


def claim_job(store: Store, now: float | None = None) -> Job | None:
    """Take the oldest ``queued`` job (it becomes ``running``), or None.

    Safe with several workers (threads or processes): the claim is one ``BEGIN IMMEDIATE``
    transaction, so a job is handed to one worker only.

    Parameters
    ----------
    store : Store
        The store; the ``jobs`` table is the job queue.
    now : float or None
        Epoch seconds for ``t_started``.

    Returns
    -------
    Job or None
        A job whose row cannot be read (malformed inputs) ends ``failed`` with the reason
        and the next one is taken.
    """
    now = time.time() if now is None else now
    while True:
        with store.transaction() as conn:
            row = conn.execute(
                "SELECT * FROM jobs WHERE state=? ORDER BY id LIMIT 1", (JobState.QUEUED,)
            ).fetchone()
            if row is None:
                return None
            move(conn, row["id"], JobState.RUNNING, t_started=now)
            try:
                return job_from_row(row)
            except (ValueError, TypeError, KeyError) as exc:  # a malformed row: that job only
                reason = f"internal error: job row cannot be read: {type(exc).__name__}: {exc}"
                move(conn, row["id"], JobState.FAILED, reason=reason)
                logger.error("job %s: %s", row["id"], reason, extra={"job": row["id"]})


def requeue_interrupted(store: Store) -> int:
    """After a restart, queue again the jobs a previous process left half done.

    Returns
    -------
    int
        How many jobs were queued again.
    """
    with store.transaction() as conn:
        rows = conn.execute(
            "SELECT id FROM jobs WHERE state IN (?, ?)", (JobState.RUNNING, JobState.INFERRED)
        ).fetchall()
        for row in rows:
            move(conn, row["id"], JobState.QUEUED)
    return len(rows)


def retry_job(store: Store, job_id: int, outbox: Outbox | None) -> str:
    """Queue a failed, rejected or quarantined job again: its export when it got that far
    (failed only), else the job.

    Parameters
    ----------
    store : Store
        The store.
    job_id : int
        The job's row id.
    outbox : Outbox or None
        Used to queue the export again.

    Returns
    -------
    str
        ``"export"`` or ``"job"``: what was queued again.

    Raises
    ------
    aenode.errors.InputError
        If there is no such job or it is not failed or rejected.
    """
    job = get_job(store, job_id)
    if job is None:
        raise InputError(f"no job {job_id}")
    if job.state not in (JobState.FAILED, JobState.REJECTED, JobState.QUARANTINED):
        raise InputError(f"job {job_id} is {job.state.value}, not failed or quarantined")
    if job.state is JobState.QUARANTINED:
        with store.transaction() as conn:
            move(conn, job_id, JobState.QUEUED, reason=None)
        return "job"
    if job.t_written and outbox is not None and outbox.retry(job_id):
        return "export"
    with store.transaction() as conn:
        move(conn, job_id, JobState.QUEUED, reason=None)
    return "job"


# -- running -----------------------------------------------------------------------------


@dataclass
class JobOutcome:
    """What happened to one job."""

    job: Job
    state: JobState
    reason: str | None = None
    results: ResultSet | None = None
    timings: dict[str, float] = field(default_factory=dict)
    findings: dict[str, Any] = field(default_factory=dict)
    """What the job's ``findings`` column holds (:func:`findings_record`)."""
    postponed: bool = False
    """Queued again because the store or the disk failed under it (not counted as a try)."""


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
    runtime : Executor or Runtime
        Where models run (:mod:`aenode.infer.executor`); a bare
        :class:`~aenode.infer.runtime.Runtime` is wrapped in a ``LocalExecutor``.
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
        runtime: Executor | Predictor,
        outbox: Outbox | None = None,
        results_root: Path | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.executor = as_executor(runtime)
        self.outbox = outbox
        self.results_root = results_root or Path(settings.storage.path) / "results"
        self._stranded: set[int] = set()
        self._lock = threading.Lock()

    def _move(self, job: Job, new: JobState, **fields: Any) -> None:
        with self.store.transaction() as conn:
            move(conn, job.id or 0, new, **fields)

    def run(self, job: Job) -> JobOutcome:
        """Run one recorded job to the outbox; never raises for a job's own failure.

        Bad input (:class:`~aenode.errors.InputError`) and a peer's failure
        (:class:`~aenode.errors.PeerError`) end the job ``failed`` with the stage and the
        reason (a volume that cannot be trusted: ``rejected``); any other exception is a
        bug: logged with its traceback, the job ends ``failed`` with
        ``internal error: ...``.

        Parameters
        ----------
        job : Job
            A job recorded by the study tracker (``id`` set), ``queued`` or claimed.

        Returns
        -------
        JobOutcome
            The final state (``exporting``, ``done``, ``rejected`` or ``failed``) and reason.
        """
        return self._attempt(job, None)

    def _attempt(self, job: Job, failures: Failures | None) -> JobOutcome:
        # failures None: one try, a bug fails the job (aenode run); otherwise the job is
        # queued again and quarantined after failures.limit tries (aenode serve).
        ctx = {"job": job.id, "model": job.model, "study": job.study_uid}
        stage = ["start"]
        try:
            outcome = self._run(job, ctx, stage)
        except (InputError, PeerError) as exc:
            reason = f"{stage[0]}: {exc}"
            logger.error("job failed: %s", reason, extra=ctx)
        except WorkerLost as exc:  # the executor's worker died: the job runs again
            if failures is None:
                reason = f"{stage[0]}: {exc}"
                logger.error("job failed: %s", reason, extra=ctx)
            else:
                return self._worker_lost(job, exc, failures, ctx)
        except Exception as exc:
            if failures is not None and is_resource_error(exc):
                return self._postpone(job, f"{stage[0]}: {describe(exc)}", ctx)
            reason = f"internal error: {describe(exc)}"
            if failures is None:  # a bug: visible as such, with its traceback
                logger.exception("job failed in %s: %s", stage[0], reason, extra=ctx)
            else:
                tries = failures.failed(job.id, exc, logger, f"job {job.id} in {stage[0]}", ctx)
                if failures.exhausted(tries):
                    failures.clear(job.id)
                    reason = f"quarantined after {tries} tries: {reason}"
                    self._record_failure(job, JobState.QUARANTINED, reason, ctx)
                    return JobOutcome(job, JobState.QUARANTINED, reason)
                reason = f"try {tries} of {failures.limit} failed: {reason}"
                self._record_failure(job, JobState.QUEUED, reason, ctx)
                return JobOutcome(job, JobState.QUEUED, reason)
        else:
            if failures is not None:
                failures.clear(job.id)
            return outcome
        self._record_failure(job, JobState.FAILED, reason, ctx)
        return JobOutcome(job, JobState.FAILED, reason)

    def _worker_lost(
        self, job: Job, exc: WorkerLost, failures: Failures, ctx: dict[str, Any]
    ) -> JobOutcome:
        """Queue the job again (a try: a model that kills its worker each time ends quarantined)."""
        tries = failures.failed(job.id, exc, logger, f"job {job.id} in inference", ctx)
        reason = f"try {tries} of {failures.limit}: {exc}"
        state = JobState.QUEUED
        if failures.exhausted(tries):
            failures.clear(job.id)
            state, reason = JobState.QUARANTINED, f"quarantined after {tries} tries: {exc}"
        self._record_failure(job, state, reason, ctx)
        return JobOutcome(job, state, reason)

    def _record_failure(self, job: Job, state: JobState, reason: str, ctx: dict[str, Any]) -> None:
        try:
            self._move(job, state, reason=reason)
        except IllegalTransition:  # it got past the point where it can fail
            logger.exception("job %s: cannot record the failure", job.id, extra=ctx)
        except Exception as exc:
            if not is_resource_error(exc):
                raise
            self._postpone(job, reason, ctx)

    def _postpone(self, job: Job, reason: str, ctx: dict[str, Any]) -> JobOutcome:
        """The store or disk failed under the job: queue it again once the store takes it."""
        reason = f"postponed, store or disk unavailable: {reason}"
        logger.error("job %s %s", job.id, reason, extra=ctx)
        try:
            self._move(job, JobState.QUEUED, reason=reason)
        except Exception as exc:
            if not is_resource_error(exc):
                raise
            with self._lock:
                self._stranded.add(job.id or 0)  # the worker loop queues it again later
        return JobOutcome(job, JobState.QUEUED, reason, postponed=True)

    def _requeue_stranded(self) -> None:
        """Queue again the jobs a store error left running (the store takes writes again)."""
        with self._lock:  # each stranded job is taken by one worker only
            stranded = sorted(self._stranded)
            self._stranded.clear()
        for k, job_id in enumerate(stranded):
            try:
                with self.store.transaction() as conn:
                    state = get_state(conn, job_id)
                    if state in (JobState.RUNNING, JobState.INFERRED):
                        move(conn, job_id, JobState.QUEUED)
            except BaseException:
                with self._lock:
                    self._stranded.update(stranded[k:])
                raise
            logger.warning("job %s queued again after a store error", job_id, extra={"job": job_id})

    def _run(self, job: Job, ctx: dict[str, Any], stage: list[str]) -> JobOutcome:
        from aenode.results import write_results
        from aenode.volume import VolumeError, build_volume

        timings: dict[str, float] = {}
        t0 = time.time()
        with self.store.transaction() as conn:
            old = conn.execute("SELECT state FROM jobs WHERE id=?", (job.id,)).fetchone()
            if old is not None and old["state"] == JobState.RUNNING:
                note(conn, job.id or 0, None)
            else:  # run without a claim (aenode run)
                move(conn, job.id or 0, JobState.RUNNING, reason=None, t_started=t0)
        stage[0] = "volume"
        card = self.registry.card(job.model)
        geometry = card.inputs.geometry
        volumes: dict[str, Volume] = {}
        corrections: list[str] = []
        for role, series in job.inputs.items():
            try:
                volumes[role] = build_volume(
                    series,
                    spacing_tolerance=self.settings.volume.spacing_tolerance,
                    allow=geometry.allow or self.settings.volume.allow,
                    correct=geometry.correct,
                )
            except VolumeError as exc:
                reason = f"role {role}: series {series.series_uid}: {exc}"
                logger.warning("volume rejected: %s", reason, extra=ctx)
                reject_series(self.store, series.series_uid, series.revision, str(exc))
                self._move(job, JobState.REJECTED, reason=reason)
                return JobOutcome(job, JobState.REJECTED, reason)
            correction = volumes[role].correction
            if correction is not None:
                corrections.append(f"role {role}: {correction.describe()}")
        if corrections:
            with self.store.transaction() as conn:
                note(conn, job.id or 0, "; ".join(corrections))
        timings["volume"] = time.time() - t0
        stage[0] = "inference"
        t1 = time.time()
        prediction = self.executor.infer(
            job.model, volumes, fractional=self.settings.results.fractional
        )
        timings["infer"] = time.time() - t1
        prediction.notes[:0] = corrections
        self._move(job, JobState.INFERRED, t_inferred=time.time(), t_volume=t1)
        stage[0] = "results"
        t2 = time.time()
        out_dir = self.results_root / f"job-{job.id:06d}"
        results = write_results(job, volumes, prediction, card, self.settings.results, out_dir)
        timings["write"] = time.time() - t2
        stage[0] = "export"
        record = findings_record(prediction, results)
        findings = json.dumps(record)
        written = {"t_written": time.time(), "result_dir": str(out_dir), "findings": findings}
        with self.store.transaction() as conn:
            queued = 0
            if self.outbox is not None and results.files:
                queued = self.outbox.add(job.id or 0, results.files, conn=conn)
            # Nothing to send (no outbox, no destination, no file): done once written.
            state = JobState.EXPORTING if queued else JobState.DONE
            audit.record_results(conn, job.id or 0, job.study_uid, results.files)
            move(conn, job.id or 0, state, **written)
        logger.info(
            "job %s: %s (volume %.2fs, infer %.2fs, write %.2fs)",
            job.id,
            state,
            timings["volume"],
            timings["infer"],
            timings["write"],
            extra=ctx,
        )
        return JobOutcome(job, state, None, results, timings, record)

    def run_forever(
        self,
        stop: threading.Event,
        wakeup: threading.Event,
        poll: float,
        quarantine_after: int = QUARANTINE_AFTER,
    ) -> None:
        """Run queued jobs until ``stop`` is set; one job's failure fails that job only.

        A job whose run raises unexpectedly is queued again and quarantined after
        ``quarantine_after`` tries; a store or disk error (disk full, database locked)
        queues it again and the worker backs off until the store takes writes again.

        Parameters
        ----------
        stop : threading.Event
            Set to end the loop (after the job in hand).
        wakeup : threading.Event
            Set by the dispatcher when it records jobs.
        poll : float
            Seconds between looks at an empty queue.
        quarantine_after : int
            Tries of a job that fails with an unexpected error before it is quarantined.
        """
        failures = Failures(quarantine_after)

        def step() -> bool:
            self._requeue_stranded()
            job = claim_job(self.store)
            if job is None:
                return False
            outcome = self._attempt(job, failures)
            if outcome.postponed:
                raise Unavailable(
                    outcome.reason or "store or disk unavailable"
                )  # back off before the next claim
            return True

        def idle() -> None:
            wakeup.wait(poll)
            wakeup.clear()

        supervise("job worker", step, stop, idle=idle, backoff=Backoff(initial=1.0))
