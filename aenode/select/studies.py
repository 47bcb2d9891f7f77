"""Complete series -> jobs: series rules at once, study rules when every role has a series.

A study rule (``roles:``) waits until each of its roles has been filled by a complete series
of the same study; then one job per model starts. If the roles are not all filled within
``study_timeout_seconds`` after the study's last role match, :meth:`StudyTracker.due` decides
per model from its card (``inputs.roles[i].required``): a model runs with the roles present
when every missing role is optional, otherwise the study records which role was missing
(state ``missing`` with the reason; a late series of that role still starts it). When the
rule's first role (its reference series, e.g. the DWI of a stroke rule) is there, the
model's job is also recorded as ``rejected`` with the missing role named (``no FLAIR series
in study ...``), so that ``aenode status`` shows it; a study without the first role (a brain
study whose FLAIR matched a stroke rule's role) is not one for that model and gets no job.

This module owns the store's tables ``select_roles`` and ``select_studies`` (their schema is
in :mod:`aenode.store`); every job is recorded through :func:`aenode.jobs.record_job` in the
same transaction as the state change that made
it, so that a restart neither loses nor repeats a job: ``on_series`` and ``due`` return only
jobs that were newly recorded, with ``Job.id`` set.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import pydicom
from pydicom import Dataset

from aenode import audit
from aenode.assemble import note_series
from aenode.jobs import job_from_row, move, record_job, series_from_json, series_to_json
from aenode.records import Job, SeriesInfo
from aenode.select.rules import Rule, evaluate, match_series
from aenode.states import JobState, StudyRuleState, transition
from aenode.store import Store
from aenode.supervise import Failures, Quarantined, describe, is_resource_error

if TYPE_CHECKING:
    from aenode.infer.cards import ModelCard
    from aenode.select.spec import RuleSpec

__all__ = [
    "SERIES_ROLE",
    "StudyTracker",
    "check_rule_roles",
    "job_from_row",
    "quarantined_studies",
    "release_quarantined_studies",
    "role_requirements",
    "role_waits",
    "series_from_json",
    "series_to_json",
]

log = logging.getLogger(__name__)

SERIES_ROLE = "image"
"""The single input role of a job made by a series rule."""


def role_requirements(cards: Mapping[str, ModelCard]) -> dict[str, dict[str, bool]]:
    """Model name -> role -> required, from the cards' ``inputs.roles``.

    Parameters
    ----------
    cards : mapping of str to ModelCard
        The loaded model cards by model name.

    Returns
    -------
    dict of str to dict of str to bool
    """
    return {name: {r.name: r.required for r in card.inputs.roles} for name, card in cards.items()}


def role_waits(cards: Mapping[str, ModelCard]) -> dict[str, dict[str, float]]:
    """Model name -> optional role -> ``wait_seconds``, from the cards' ``inputs.roles``."""
    return {
        name: {r.name: r.wait_seconds for r in card.inputs.roles if not r.required}
        for name, card in cards.items()
    }


def check_rule_roles(rules: Sequence[RuleSpec], cards: Mapping[str, ModelCard]) -> None:
    """Check that each rule gives each of its models the roles its card names.

    A study rule's role names must be roles of every model's card, and every required
    role of the card must be among them; a series rule gives one series as role
    ``image``, so its models must take that role (and need no other).

    Parameters
    ----------
    rules : sequence of RuleSpec
        ``selection.rules``.
    cards : mapping of str to ModelCard
        The loaded cards; models not in it are left to the model-name check.

    Raises
    ------
    aenode.config.ConfigError
        Naming the key path, e.g. ``selection.rules[1].roles.flair: model 'stroke' has no
        input role 'flair' (its card's inputs.roles: dwi, adc)``.
    """
    from aenode.config import ConfigError

    errors = []
    for i, rule in enumerate(rules):
        for model in rule.models:
            card = cards.get(model)
            if card is None:
                continue
            names = [r.name for r in card.inputs.roles]
            required = [r.name for r in card.inputs.roles if r.required]
            shown = ", ".join(names)
            if rule.roles is None:
                if SERIES_ROLE not in names or set(required) - {SERIES_ROLE}:
                    errors.append(
                        f"selection.rules[{i}].series: a series rule gives model {model!r} "
                        f"one series as role {SERIES_ROLE!r}, but its card's inputs.roles are "
                        f"{shown}; write a study rule with roles: {shown}"
                    )
                continue
            for role in rule.roles:
                if role not in names:
                    errors.append(
                        f"selection.rules[{i}].roles.{role}: model {model!r} has no input role "
                        f"{role!r} (its card's inputs.roles: {shown})"
                    )
            missing = [r for r in required if r not in rule.roles]
            if missing:
                errors.append(
                    f"selection.rules[{i}].roles: model {model!r} requires role(s) "
                    f"{', '.join(missing)} that the rule does not select"
                )
    if errors:
        raise ConfigError("; ".join(errors))


def _move(
    conn: sqlite3.Connection, rule: str, study_uid: str, new: StudyRuleState, reason: str | None
) -> None:
    row = conn.execute(
        "SELECT state FROM select_studies WHERE rule=? AND study_uid=?", (rule, study_uid)
    ).fetchone()
    transition(row["state"], new)
    conn.execute(
        "UPDATE select_studies SET state=?, reason=? WHERE rule=? AND study_uid=?",
        (new, reason, rule, study_uid),
    )


def quarantined_studies(store: Store) -> list[Quarantined]:
    """Study rules set aside after repeated failures to decide them (``aenode status``)."""
    rows = store.execute(
        "SELECT rule, study_uid, reason FROM select_studies WHERE state=? ORDER BY last_match",
        (StudyRuleState.QUARANTINED,),
    )
    return [Quarantined("study", f"{r['rule']}:{r['study_uid']}", r["reason"]) for r in rows]


def release_quarantined_studies(store: Store) -> int:
    """``aenode retry --quarantined``: quarantined study rules wait (and are decided) again.

    Returns
    -------
    int
        How many were released.
    """
    with store.transaction() as conn:
        rows = conn.execute(
            "SELECT rule, study_uid FROM select_studies WHERE state=?",
            (StudyRuleState.QUARANTINED,),
        ).fetchall()
        for row in rows:
            _move(conn, row["rule"], row["study_uid"], StudyRuleState.WAITING, None)
    return len(rows)


class StudyTracker:
    """Turns complete series into jobs; remembers study roles across restarts.

    Parameters
    ----------
    store : Store
        The node's store (a file, or ``Store(":memory:")`` for ``aenode run``).
    rules : sequence of Rule
        Compiled rules (:func:`aenode.select.rules.compile_rules`).
    role_requirements : mapping of str to mapping of str to bool
        Model name -> role -> required, from the model cards. A role not listed is required.
    timeout : float
        Seconds after a study's last role match before :meth:`due` decides without the
        missing roles (``settings.selection.study_timeout_seconds``).
    waits : mapping of str to mapping of str to float or None
        Model name -> optional role -> seconds to wait for it once the required roles are
        there (the card's ``inputs.roles[].wait_seconds``); a role not listed is not waited
        for: the job starts as soon as every required role is filled.
    """

    def __init__(
        self,
        store: Store,
        rules: Sequence[Rule],
        role_requirements: Mapping[str, Mapping[str, bool]],
        *,
        timeout: float = 120.0,
        waits: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        self.store = store
        self.rules = list(rules)
        self._by_name = {r.name: r for r in self.rules}
        self.role_requirements = {m: dict(r) for m, r in role_requirements.items()}
        self.timeout = timeout
        self.waits = {m: dict(w) for m, w in (waits or {}).items()}
        self.failures = Failures()

    def _ready(self, rule: Rule, absent: Sequence[str], waited: float) -> bool:
        """Whether every model of ``rule`` can start without the ``absent`` roles now.

        True when each absent role is optional for each model and its ``wait_seconds``
        (default 0) has passed (``waited``: seconds since the last role was filled).
        """
        for model in rule.models:
            needs = self.role_requirements.get(model, {})
            if any(needs.get(r, True) for r in absent):
                return False
            waits = self.waits.get(model, {})
            if any(waits.get(r, 0.0) > waited for r in absent):
                return False
        return True

    # -- recording -----------------------------------------------------------------------

    def _record(
        self,
        conn: sqlite3.Connection,
        rule: Rule,
        model: str,
        study_uid: str,
        inputs: dict[str, SeriesInfo],
        now: float,
    ) -> Job | None:
        job = record_job(conn, rule.name, model, study_uid, inputs, now)
        if job is None:
            return None
        log.info(
            "job %s: rule %s, model %s, inputs %s",
            job.id,
            rule.name,
            model,
            ", ".join(f"{r}={s.series_uid}" for r, s in sorted(inputs.items())),
            extra={"study": study_uid, "model": model, "job": job.id},
        )
        return job

    def _roles(self, conn: sqlite3.Connection, rule: Rule, study_uid: str) -> dict[str, SeriesInfo]:
        rows = conn.execute(
            "SELECT role, series FROM select_roles WHERE rule=? AND study_uid=?",
            (rule.name, study_uid),
        ).fetchall()
        return {r["role"]: series_from_json(json.loads(r["series"])) for r in rows}

    # -- events --------------------------------------------------------------------------

    def on_series(
        self,
        series: SeriesInfo,
        header: Dataset | None = None,
        *,
        count: int | None = None,
        now: float | None = None,
    ) -> list[Job]:
        """Take one complete series: jobs of series rules at once, study roles remembered.

        Parameters
        ----------
        series : SeriesInfo
            The complete series (one revision).
        header : pydicom.Dataset or None
            One of its instances' headers; None reads the first file's.
        count : int or None
            Instances in the series; defaults to ``len(series.files)``.
        now : float or None
            Epoch seconds (defaults to the clock).

        Returns
        -------
        list of Job
            The jobs newly recorded (a series handed in again yields none twice).

        Notes
        -----
        A series fills at most one role of a study rule, so that it never feeds two inputs
        of one model: when it matches several, the first one not yet filled by another
        series (in the rule's order) is taken, with a warning.
        """
        now = time.time() if now is None else now
        count = len(series.files) if count is None else count
        if header is None:
            if not series.files:
                raise ValueError(f"series {series.series_uid}: no files to read a header from")
            header = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        extra = {"study": series.study_uid, "series": series.series_uid}
        matches = match_series(self.rules, header, count)
        if not matches:
            unread = [
                f"rule {rule.name}: {evaluate(rule, header, count).reason}" for rule in self.rules
            ]
            # Say so where the operator looks (aenode status) and in the log, the first
            # failing condition of each rule, as `aenode select` does.
            reason = "not selected: " + ("; ".join(unread) or "no selection rules")
            note_series(self.store, series.series_uid, series.revision, reason[:2000])
            audit.record(
                self.store,
                audit.AuditEvent.NOT_SELECTED,
                series.study_uid,
                series_uid=series.series_uid,
                at=now,
                reason=reason[:2000],
            )
            if any("cannot be read" in r for r in unread):
                log.warning("series %s", reason, extra=extra)
            else:
                log.info("series %s", reason, extra=extra)
            return []
        jobs: list[Job] = []
        with self.store.transaction() as conn:
            study_roles: dict[str, tuple[Rule, list[str]]] = {}
            for rule, role in matches:
                if role is not None:
                    study_roles.setdefault(rule.name, (rule, []))[1].append(role)
                    continue
                for model in rule.models:
                    job = self._record(
                        conn, rule, model, series.study_uid, {SERIES_ROLE: series}, now
                    )
                    if job is not None:
                        jobs.append(job)
            for rule, roles in study_roles.values():
                role = self._pick_role(conn, rule, roles, series)
                jobs.extend(self._fill_role(conn, rule, role, series, now))
        return jobs

    def _pick_role(
        self, conn: sqlite3.Connection, rule: Rule, roles: list[str], series: SeriesInfo
    ) -> str:
        """One role per series and rule: the first matching role not yet filled."""
        if len(roles) == 1:
            return roles[0]
        filled = {
            r["role"]: r["series_uid"]
            for r in conn.execute(
                "SELECT role, series_uid FROM select_roles WHERE rule=? AND study_uid=?",
                (rule.name, series.study_uid),
            )
        }
        free = [r for r in roles if filled.get(r, series.series_uid) == series.series_uid]
        role = (free or roles)[0]
        log.warning(
            "series matches roles %s of rule %s; it fills %s only (make the roles' "
            "conditions exclusive)",
            ", ".join(roles),
            rule.name,
            role,
            extra={"study": series.study_uid, "series": series.series_uid},
        )
        return role

    def _fill_role(
        self, conn: sqlite3.Connection, rule: Rule, role: str, series: SeriesInfo, now: float
    ) -> list[Job]:
        study = series.study_uid
        extra = {"study": study, "series": series.series_uid}
        row = conn.execute(
            "SELECT state FROM select_studies WHERE rule=? AND study_uid=?", (rule.name, study)
        ).fetchone()
        if row is not None and row["state"] == StudyRuleState.QUARANTINED:
            log.warning(
                "rule %s is quarantined for this study (aenode retry --quarantined); series "
                "for role %s not used",
                rule.name,
                role,
                extra=extra,
            )
            return []
        if row is not None and row["state"] == StudyRuleState.STARTED:
            log.info(
                "rule %s already started for this study; series for role %s not used",
                rule.name,
                role,
                extra=extra,
            )
            return []
        conn.execute(
            "INSERT OR REPLACE INTO select_roles (rule, study_uid, role, series_uid, revision,"
            " series, matched_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                rule.name,
                study,
                role,
                series.series_uid,
                series.revision,
                json.dumps(series_to_json(series)),
                now,
            ),
        )
        conn.execute(
            "INSERT INTO select_studies (rule, study_uid, state, first_match, last_match)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (rule, study_uid) DO UPDATE SET"
            " last_match=excluded.last_match",
            (rule.name, study, StudyRuleState.WAITING, now, now),
        )
        present = self._roles(conn, rule, study)
        missing = [r for r in rule.roles if r not in present]
        log.info(
            "rule %s: role %s filled; %s",
            rule.name,
            role,
            f"waiting for {', '.join(missing)}" if missing else "all roles present",
            extra=extra,
        )
        if missing and not self._ready(rule, missing, 0.0):
            return []
        if missing:
            log.info(
                "rule %s: required roles present; starting without optional role(s) %s",
                rule.name,
                ", ".join(missing),
                extra=extra,
            )
        jobs = []
        for model in rule.models:
            job = self._record(conn, rule, model, study, present, now)
            if job is not None:
                jobs.append(job)
        _move(conn, rule.name, study, StudyRuleState.STARTED, None)
        return jobs

    def due(self, now: float | None = None) -> list[Job]:
        """Decide the studies whose roles were not all filled within the timeout.

        Parameters
        ----------
        now : float or None
            Epoch seconds (defaults to the clock).

        Returns
        -------
        list of Job
            Jobs of models that may run with the roles present; studies where a required
            role is missing get state ``missing`` and the reason instead.
        """
        now = time.time() if now is None else now
        jobs: list[Job] = []
        rows = self.store.execute(
            "SELECT rule, study_uid FROM select_studies WHERE state=?",
            (StudyRuleState.WAITING,),
        )
        for row in rows:
            # One transaction per study, so that one that fails fails alone.
            try:
                with self.store.transaction() as conn:
                    jobs.extend(self._decide(conn, row["rule"], row["study_uid"], now))
            except Exception as exc:
                if is_resource_error(exc):
                    raise
                self._failed(row["rule"], row["study_uid"], exc)
        return jobs

    def _failed(self, rule: str, study: str, exc: Exception) -> None:
        key = (rule, study)
        what = f"rule {rule}: study decision"
        tries = self.failures.failed(key, exc, log, what, {"study": study})
        if self.failures.exhausted(tries):
            reason = f"quarantined after {tries} tries: internal error: {describe(exc)}"
            with self.store.transaction() as conn:
                _move(conn, rule, study, StudyRuleState.QUARANTINED, reason)
            self.failures.clear(key)

    def _decide(self, conn: sqlite3.Connection, name: str, study: str, now: float) -> list[Job]:
        jobs: list[Job] = []
        fresh = conn.execute(
            "SELECT state, last_match FROM select_studies WHERE rule=? AND study_uid=?",
            (name, study),
        ).fetchone()
        if fresh is None or fresh["state"] != StudyRuleState.WAITING:
            return jobs
        waited = now - fresh["last_match"]
        rule = self._by_name.get(name)
        if rule is None:
            if waited >= self.timeout:
                gone = f"rule {name} is no longer configured"
                _move(conn, name, study, StudyRuleState.MISSING, gone)
            return jobs
        present = self._roles(conn, rule, study)
        absent = [r for r in rule.roles if r not in present]
        if waited < self.timeout:
            # Before the timeout only optional roles' wait_seconds can run out.
            if not self._ready(rule, absent, waited):
                return jobs
            log.info(
                "rule %s: starting without optional role(s) %s after %.0f s",
                rule.name,
                ", ".join(absent),
                waited,
                extra={"study": study},
            )
        reasons = []
        started = False
        anchored = next(iter(rule.roles)) in present
        for model in rule.models:
            needs = self.role_requirements.get(model, {})
            required = [r for r in absent if needs.get(r, True)]
            if required:
                reasons.append(
                    f"model {model}: required role(s) {', '.join(required)} missing "
                    f"after {self.timeout:g} s"
                )
                if anchored:
                    self._reject(conn, rule, model, study, present, required, now)
                continue
            started = True
            job = self._record(conn, rule, model, study, present, now)
            if job is not None:
                jobs.append(job)
        reason = "; ".join(reasons) or None
        state = StudyRuleState.STARTED if started else StudyRuleState.MISSING
        _move(conn, rule.name, study, state, reason)
        if reason:
            level = logging.WARNING if anchored else logging.INFO
            log.log(level, "rule %s: %s", rule.name, reason, extra={"study": study})
        return jobs

    def _reject(
        self,
        conn: sqlite3.Connection,
        rule: Rule,
        model: str,
        study_uid: str,
        present: dict[str, SeriesInfo],
        missing: list[str],
        now: float,
    ) -> None:
        """Record the job a missing required role prevents, as ``rejected`` with the reason."""
        job = record_job(conn, rule.name, model, study_uid, present, now)
        if job is None or job.id is None:
            return
        roles = ", ".join(r.upper() for r in missing)
        reason = (
            f"no {roles} series in study {study_uid} (rule {rule.name}: required role(s) "
            f"{', '.join(missing)} not matched within {self.timeout:g} s of the last match)"
        )
        move(conn, job.id, JobState.REJECTED, reason=reason)
        log.warning(
            "job %s: rejected: %s",
            job.id,
            reason,
            extra={"study": study_uid, "model": model, "job": job.id},
        )

    def study_state(self, rule: str, study_uid: str) -> tuple[StudyRuleState, str | None] | None:
        """The state (``waiting``, ``started``, ``missing``) and reason of a study rule.

        Returns
        -------
        tuple of (str, str or None) or None
            None when no series of the study has filled a role of the rule.
        """
        rows = self.store.execute(
            "SELECT state, reason FROM select_studies WHERE rule=? AND study_uid=?",
            (rule, study_uid),
        )
        if not rows:
            return None
        return StudyRuleState(rows[0]["state"]), rows[0]["reason"]
