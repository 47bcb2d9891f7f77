"""The job runner and the jobs table: outcomes by cause, a restart mid-job, concurrent claims.

Volumes are built from the real HippoCrop series (udacity-mr/Study1); the runtime is a
small stand-in whose prediction is a two-box mask (see test_results.py), or which raises.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from test_results import CARD, HIPPO, box_mask, load_volume, prediction_for

from aenode.config import Settings
from aenode.errors import PeerError
from aenode.export.outbox import Outbox
from aenode.infer.cards import ModelCard
from aenode.infer.runtime import InferenceError
from aenode.jobs import JobRunner, claim_job, get_job, record_job, requeue_interrupted
from aenode.records import Job, SeriesInfo, Volume
from aenode.states import JobState
from aenode.store import Store


class _Runtime:
    """Stands in for the inference runtime: a box mask, or the exception it was given."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.calls = 0

    def predict(self, model: str, volumes: Mapping[str, Volume], **_: Any) -> Any:
        self.calls += 1
        if self.error is not None:
            raise self.error
        volume = volumes["image"]
        return prediction_for(volume, box_mask(volume))


class _Registry:
    def card(self, name: str) -> ModelCard:
        return ModelCard.model_validate(CARD)


@pytest.fixture(scope="module")
def series(data_dir: Path) -> SeriesInfo:
    volume = load_volume(data_dir / HIPPO)
    files = tuple(sorted((data_dir / HIPPO).glob("*.dcm")))
    return SeriesInfo(
        volume.series.study_uid, volume.series.series_uid, 0, "MR", "HippoCrop", files
    )


def _record(store: Store, series: SeriesInfo, model: str = "hippocampus") -> Job:
    with store.transaction() as conn:
        job = record_job(conn, "hippo", model, series.study_uid, {"image": series}, time.time())
    assert job is not None
    return job


def _runner(tmp_path: Path, store: Store, runtime: _Runtime, **kw: Any) -> JobRunner:
    settings = Settings.model_validate({"storage": {"path": str(tmp_path / "var")}, **kw})
    outbox = Outbox(store, settings.export, "AENODE")
    return JobRunner(settings, store, _Registry(), runtime, outbox)  # type: ignore[arg-type]


def test_no_destination_means_done_with_the_results_written(
    tmp_path: Path, series: SeriesInfo
) -> None:
    store = Store(tmp_path / "aenode.db")
    job = _record(store, series)
    outcome = _runner(tmp_path, store, _Runtime()).run(job)
    assert outcome.state is JobState.DONE and outcome.reason is None
    record = get_job(store, job.id or 0)
    assert record is not None and record.state is JobState.DONE
    assert record.t_started and record.t_inferred and record.t_written
    seg = hd.seg.segread(Path(record.result_dir or "") / "seg.dcm")
    assert seg.number_of_segments == 2
    assert store.execute("SELECT COUNT(*) AS n FROM outbox")[0]["n"] == 0
    # The SR's volumes are the mask's (so the findings are content, not just a state).
    assert record.volumes_mm3 and all(v > 0 for v in record.volumes_mm3.values())
    store.close()


def test_with_a_destination_the_job_is_exporting(tmp_path: Path, series: SeriesInfo) -> None:
    store = Store(tmp_path / "aenode.db")
    job = _record(store, series)
    dest = {"destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 1}]}
    outcome = _runner(tmp_path, store, _Runtime(), export=dest).run(job)
    assert outcome.state is JobState.EXPORTING
    (row,) = store.execute("SELECT state, destination, files FROM outbox")
    assert (row["state"], row["destination"]) == ("pending", "PACS@127.0.0.1:1")
    assert row["files"].count("sop_uid") == 3
    store.close()


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (InferenceError("model 'hippocampus': input volume is 2-D"), r"^inference: model 'hip"),
        (PeerError("GPU-NODE@10.0.0.2:104: association aborted"), r"^inference: GPU-NODE@"),
    ],
)
def test_input_and_peer_errors_become_the_jobs_reason(
    tmp_path: Path,
    series: SeriesInfo,
    error: Exception,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Store(tmp_path / "aenode.db")
    job = _record(store, series)
    with caplog.at_level(logging.ERROR, logger="aenode.jobs"):
        outcome = _runner(tmp_path, store, _Runtime(error)).run(job)
    assert outcome.state is JobState.FAILED
    record = get_job(store, job.id or 0)
    assert record is not None and record.state is JobState.FAILED
    assert record.reason is not None
    assert __import__("re").match(reason, record.reason)
    assert not any(r.exc_info for r in caplog.records)  # a recorded reason, not a bug
    store.close()


def test_a_bug_is_an_internal_error_logged_with_its_traceback(
    tmp_path: Path, series: SeriesInfo, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path / "aenode.db")
    job = _record(store, series)
    with caplog.at_level(logging.ERROR, logger="aenode.jobs"):
        outcome = _runner(tmp_path, store, _Runtime(KeyError("labels"))).run(job)
    assert outcome.state is JobState.FAILED
    assert outcome.reason == "internal error: KeyError: 'labels'"
    record = get_job(store, job.id or 0)
    assert record is not None and record.reason == "internal error: KeyError: 'labels'"
    (logged,) = [r for r in caplog.records if r.exc_info]
    assert logged.exc_info is not None and logged.exc_info[0] is KeyError
    assert logged.job == job.id
    store.close()


def test_restart_in_the_middle_of_a_job(tmp_path: Path, series: SeriesInfo) -> None:
    db = tmp_path / "aenode.db"
    store = Store(db)
    first = _record(store, series)
    second = _record(store, series, model="other")
    claimed = claim_job(store)
    assert claimed is not None and claimed.id == first.id
    assert claim_job(store) is not None  # the second one, then the process dies
    store.execute("UPDATE jobs SET state='inferred' WHERE id=?", (second.id,))  # mid-write
    store.close()

    store = Store(db)  # the next start
    assert requeue_interrupted(store) == 2
    assert requeue_interrupted(store) == 0
    runtime = _Runtime()
    runner = _runner(tmp_path, store, runtime)
    again = claim_job(store)
    assert again is not None and again.id == first.id and again.inputs == first.inputs
    assert runner.run(again).state is JobState.DONE
    assert runtime.calls == 1
    record = get_job(store, first.id or 0)
    assert record is not None and record.state is JobState.DONE
    store.close()


def test_two_workers_claiming_at_once_never_share_a_job(tmp_path: Path, series: SeriesInfo) -> None:
    db = tmp_path / "aenode.db"
    store = Store(db)
    for i in range(40):
        _record(store, series, model=f"m{i}")
    store.close()
    claimed: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    start = threading.Barrier(len(claimed))

    def worker(name: str) -> None:
        own = Store(db)  # each worker its own connection, as in serve
        start.wait()
        while (job := claim_job(own)) is not None:
            claimed[name].append(job.id or 0)
        own.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = sorted(i for ids in claimed.values() for i in ids)
    assert everything == list(range(1, 41))  # each job once, none lost
    store = Store(db)
    states = {r["state"] for r in store.execute("SELECT state FROM jobs")}
    assert states == {"running"}
    store.close()
