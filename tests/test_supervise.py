"""Loops that outlive one item (issue 9): in each long-lived loop, one item that raises an
unexpected exception is retried, quarantined after QUARANTINE_AFTER tries with the reason,
shown by ``aenode status`` and freed by ``aenode retry``; the items behind it still go
through, and a store error is backed off and resumed without a restart.

The poison items are real malformed input (a hand-over payload, a ledger row, a job row,
an outbox row, a study-role row that cannot be parsed) or, for inference, the runtime seam
of test_jobs_runner raising; the good items are the real HippoCrop series (udacity-mr/Study1).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_dispatch import _dispatcher, _hand_on
from test_jobs_runner import _record, _runner, _Runtime
from test_jobs_runner import series as series  # noqa: F401 (fixture)
from test_outbox import new_job
from test_studies import _tracker

from aenode.assemble import SERIES_TOPIC, Assembler
from aenode.cli import main
from aenode.config import Settings
from aenode.export.outbox import Outbox
from aenode.jobs import claim_job, get_job, move, retry_job
from aenode.quarantine import quarantined_items, release_quarantined
from aenode.records import SeriesInfo
from aenode.states import JobState, StudyRuleState
from aenode.store import Store
from aenode.supervise import QUARANTINE_AFTER, Backoff, is_resource_error, supervise


def _wait(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# -- the helper --------------------------------------------------------------------------


def test_resource_errors_are_told_apart_from_bugs() -> None:
    assert is_resource_error(sqlite3.OperationalError("database or disk is full"))
    assert is_resource_error(sqlite3.OperationalError("database is locked"))
    assert is_resource_error(sqlite3.OperationalError("attempt to write a readonly database"))
    assert is_resource_error(OSError(28, "No space left on device"))
    assert not is_resource_error(OSError(2, "No such file or directory"))
    assert not is_resource_error(KeyError("labels"))
    assert not is_resource_error(sqlite3.IntegrityError("UNIQUE constraint failed"))


def test_supervise_backs_off_on_the_store_resumes_and_survives_bugs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = threading.Event()
    script: list[BaseException | None] = [
        sqlite3.OperationalError("database or disk is full"),
        sqlite3.OperationalError("database or disk is full"),
        None,
        ValueError("bad item"),
        ValueError("bad item"),
        None,
    ]
    resumed: list[int] = []

    def step() -> bool:
        error = script.pop(0)
        if not script:
            stop.set()
        if error is not None:
            raise error
        return True

    with caplog.at_level(logging.WARNING, logger="aenode.supervise"):
        supervise(
            "test",
            step,
            stop,
            idle=lambda: None,
            on_resume=lambda: resumed.append(1),
            backoff=Backoff(initial=0.01, maximum=0.02),
        )
    assert not script and resumed == [1, 1]  # before each try after a store error
    text = caplog.text
    assert text.count("store or disk unavailable") == 1  # one line per outage
    assert "test: resumed after 2 failed round(s)" in text
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "ValueError: bad item" in tracebacks[0].getMessage()
    assert "test: unexpected error again: ValueError: bad item" in text


# -- dispatcher ----------------------------------------------------------------------------


def _hand_on_malformed(store: Store, key: str) -> None:
    store.enqueue(SERIES_TOPIC, key, {"study_uid": "1.2", "series_uid": key, "revision": 0})


def test_dispatcher_quarantines_a_poison_hand_over_and_goes_on(
    tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, dispatcher = _dispatcher(tmp_path)
    crop = sorted((data_dir / "udacity-mr" / "Study1" / "13_HCropVolume").glob("*.dcm"))
    _hand_on_malformed(store, "9.9.9:0")  # no 'files': the payload cannot be read
    _hand_on(store, "1.2.3", crop, "HippoCrop")
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.ERROR, logger="aenode.dispatch"):
        thread.start()
        try:
            # The series behind the poison one gets its job while the poison one waits.
            _wait(lambda: store.execute("SELECT COUNT(*) AS n FROM jobs")[0]["n"] == 1)
            assert thread.is_alive()
        finally:
            stop.set()
            thread.join(10)
    (job,) = store.execute("SELECT model FROM jobs")
    assert job["model"] == "hippocampus"
    # Later tries (the back-off is 1 s, 2 s: steps in the future instead of waiting).
    t = time.time()
    for k in range(QUARANTINE_AFTER):
        dispatcher.step(now=t + 10 * (k + 1))
    (row,) = store.execute("SELECT state, attempts, error FROM queue WHERE key='9.9.9:0'")
    assert (row["state"], row["attempts"]) == ("quarantined", QUARANTINE_AFTER)
    assert row["error"].startswith(f"quarantined after {QUARANTINE_AFTER} tries: selection:")
    assert "'files'" in row["error"]
    assert dispatcher.step(now=t + 100) == []  # never handed out again by itself
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1  # logged once with its traceback, then one line per try
    (item,) = [q for q in quarantined_items(store) if q.kind == "handover"]
    assert item.key == "9.9.9:0" and "'files'" in (item.reason or "")
    assert release_quarantined(store, Outbox(store, Settings().export, "AENODE"))["handover"] == 1
    (row,) = store.execute("SELECT state, attempts FROM queue WHERE key='9.9.9:0'")
    assert (row["state"], row["attempts"]) == ("ready", 0)
    store.close()


# -- assembler -----------------------------------------------------------------------------


def test_assembler_quarantines_a_poison_series_and_completes_the_others(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {"storage": {"path": str(tmp_path)}, "series": {"quiet_seconds": 1.0, "poll_seconds": 0.05}}
    )
    store = Store(tmp_path / "aenode.db")
    t = time.time() - 60
    for uid, count in (("1.1", "'x'"), ("1.2", "3")):  # 1.1: a count that is no number
        store.execute(
            "INSERT INTO series (series_uid, revision, study_uid, expected, instance_count,"
            f" first_arrival, last_arrival, state) VALUES (?, 0, '1', 5, {count}, ?, ?,"
            " 'receiving')",
            (uid, t, t),
        )
    assembler = Assembler(store, settings)
    stop = threading.Event()
    thread = threading.Thread(target=assembler.run, args=(stop,), daemon=True)
    thread.start()
    try:
        _wait(
            lambda: (
                store.execute("SELECT state FROM series WHERE series_uid='1.1'")[0][0]
                != "receiving"
            )
        )
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(10)
    states = {
        r["series_uid"]: (r["state"], r["reason"]) for r in store.execute("SELECT * FROM series")
    }
    assert states["1.2"] == ("complete", None)
    state, reason = states["1.1"]
    assert state == "quarantined"
    assert reason.startswith(
        f"quarantined after {QUARANTINE_AFTER} tries: internal error: TypeError"
    )
    assert [q.key for q in quarantined_items(store)] == ["1.1:0"]
    assert release_quarantined(store, Outbox(store, settings.export, "AENODE"))["series"] == 1
    assert store.execute("SELECT state FROM series WHERE series_uid='1.1'")[0][0] == "receiving"
    store.close()


# -- study tracker -------------------------------------------------------------------------


def test_study_tracker_quarantines_a_study_it_cannot_decide(tmp_path: Path) -> None:
    tracker = _tracker(tmp_path)
    store = tracker.store
    t = time.time() - 1000
    for study, series_json in (("5.1", "{not json"), ("5.2", json.dumps({"x": 1}))):
        store.execute(
            "INSERT INTO select_studies (rule, study_uid, state, first_match, last_match)"
            " VALUES ('stroke', ?, 'waiting', ?, ?)",
            (study, t, t),
        )
        if study == "5.1":
            store.execute(
                "INSERT INTO select_roles (rule, study_uid, role, series_uid, revision, series,"
                " matched_at) VALUES ('stroke', ?, 'dwi', '5.1.1', 0, ?, ?)",
                (study, series_json, t),
            )
    assert tracker.due() == []
    # The study behind the poison one is decided at once (its required roles are missing).
    assert tracker.study_state("stroke", "5.2") == (
        StudyRuleState.MISSING,
        "model stroke: required role(s) dwi, adc, flair missing after 120 s",
    )
    for _ in range(QUARANTINE_AFTER - 1):
        tracker.due()
    state, reason = tracker.study_state("stroke", "5.1") or (None, None)
    assert state is StudyRuleState.QUARANTINED
    assert reason and reason.startswith(
        f"quarantined after {QUARANTINE_AFTER} tries: internal error: JSONDecodeError"
    )
    assert [q.key for q in quarantined_items(store)] == ["stroke:5.1"]
    assert release_quarantined(store, Outbox(store, Settings().export, "AENODE"))["study"] == 1
    assert tracker.study_state("stroke", "5.1") == (StudyRuleState.WAITING, None)
    store.close()


# -- job workers ---------------------------------------------------------------------------


def _states(store: Store, *ids: int | None) -> set[str]:
    rows = store.execute(f"SELECT state FROM jobs WHERE id IN ({','.join('?' * len(ids))})", ids)
    return {r["state"] for r in rows}


class _Flaky(_Runtime):
    """The runtime seam: one model always raises a bug, the other predicts."""

    broken_calls = 0

    def predict(self, model: str, volumes: Any, **kw: Any) -> Any:
        if model == "broken":
            self.broken_calls += 1
            raise KeyError("labels")
        return super().predict(model, volumes, **kw)


def test_job_workers_quarantine_a_job_that_always_raises_and_run_the_rest(
    tmp_path: Path, series: SeriesInfo, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path / "aenode.db")
    broken = _record(store, series, model="broken")
    store.execute(
        "INSERT INTO jobs (rule, model, study_uid, inputs, state, created_at,"
        " updated_at) VALUES ('r', 'm', '1', '{not json', 'queued', 0, 0)"
    )
    good = _record(store, series)
    runtime = _Flaky()
    runner = _runner(tmp_path, store, runtime)
    stop, wakeup = threading.Event(), threading.Event()
    workers = [
        threading.Thread(target=runner.run_forever, args=(stop, wakeup, 0.05), daemon=True)
        for _ in range(2)
    ]
    with caplog.at_level(logging.ERROR, logger="aenode.jobs"):
        for w in workers:
            w.start()
        try:
            _wait(lambda: _states(store, broken.id, good.id) <= {"quarantined", "done"})
            assert all(w.is_alive() for w in workers)
        finally:
            stop.set()
            wakeup.set()
            for w in workers:
                w.join(30)
    bad = get_job(store, broken.id or 0)
    assert bad is not None and bad.state is JobState.QUARANTINED
    assert bad.reason == (
        f"quarantined after {QUARANTINE_AFTER} tries: internal error: KeyError: 'labels'"
    )
    assert runtime.broken_calls == QUARANTINE_AFTER and runtime.calls == 1
    done = get_job(store, good.id or 0)
    assert done is not None and done.state is JobState.DONE
    (malformed,) = store.execute("SELECT state, reason FROM jobs WHERE model='m'")
    assert malformed["state"] == "failed" and "job row cannot be read" in malformed["reason"]
    tracebacks = [r for r in caplog.records if r.exc_info and getattr(r, "job", None) == broken.id]
    assert len(tracebacks) == 1
    assert [q.key for q in quarantined_items(store)] == [str(broken.id)]
    assert retry_job(store, broken.id or 0, None) == "job"
    claimed = claim_job(store)
    assert claimed is not None and claimed.id == broken.id
    store.close()


# -- outbox --------------------------------------------------------------------------------


def test_outbox_quarantines_a_row_it_cannot_read_and_handles_the_next(tmp_path: Path) -> None:
    store = Store(tmp_path / "aenode.db")
    settings = Settings.model_validate(
        {"export": {"destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 1}]}}
    )
    outbox = Outbox(store, settings.export, "AENODE")
    poison, other = new_job(store), new_job(store)
    missing = json.dumps([{"path": "/nope", "sop_uid": "1", "sent": False}])
    with store.transaction() as conn:
        for job_id, files in ((poison, "{not json"), (other, missing)):
            move(conn, job_id, JobState.EXPORTING, t_written=time.time())
            conn.execute(
                "INSERT INTO outbox (job_id, destination, files, state, next_try_at)"
                " VALUES (?, 'PACS@127.0.0.1:1', ?, 'pending', 0)",
                (job_id, files),
            )
    t = time.time()
    assert outbox.run_due(now=t) == 2
    # The row behind the poison one was handled (its file is gone: failed with that reason).
    (row,) = store.execute("SELECT state, last_error FROM outbox WHERE job_id=?", (other,))
    assert row["state"] == "failed" and "result file missing: /nope" in row["last_error"]
    for k in range(1, QUARANTINE_AFTER):
        outbox.run_due(now=t + 1000 * k)
    (row,) = store.execute(
        "SELECT state, attempts, last_error FROM outbox WHERE job_id=?", (poison,)
    )
    assert (row["state"], row["attempts"]) == ("quarantined", QUARANTINE_AFTER)
    assert "quarantined after 3 tries: internal error: JSONDecodeError" in row["last_error"]
    job = get_job(store, poison)
    assert job is not None and job.state is JobState.FAILED
    assert [q.kind for q in quarantined_items(store)] == ["export"]
    assert retry_job(store, poison, outbox) == "export"
    (row,) = store.execute("SELECT state, attempts FROM outbox WHERE job_id=?", (poison,))
    assert (row["state"], row["attempts"]) == ("pending", 0)
    store.close()


# -- the command line ------------------------------------------------------------------------


def test_status_shows_the_quarantine_and_retry_frees_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"storage:\n  path: {tmp_path / 'var'}\n")
    store = Store(tmp_path / "var" / "aenode.db")
    _hand_on_malformed(store, "7.7:0")
    item = store.claim(SERIES_TOPIC)
    assert item is not None
    store.quarantine(item.id, "quarantined after 3 tries: selection: internal error: KeyError")
    store.close()
    assert main(["--config", str(config), "status", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quarantined"] == [
        {
            "kind": "handover",
            "key": "7.7:0",
            "reason": "quarantined after 3 tries: selection: internal error: KeyError",
        }
    ]
    assert main(["--config", str(config), "status"]) == 0
    text = capsys.readouterr().out
    assert "quarantined: 1 item(s)" in text and "handover  7.7:0: quarantined after 3" in text
    assert main(["--config", str(config), "retry", "--quarantined"]) == 0
    assert capsys.readouterr().out.strip() == "out of quarantine: 1 handover"
    assert main(["--config", str(config), "retry"]) == 1
    assert "give a job id or --quarantined" in capsys.readouterr().out
