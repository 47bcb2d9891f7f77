"""The full disk of issue 9: a disk that fills while a job runs must not kill the job threads
(``sqlite3.OperationalError: database or disk is full``, ``Exception in thread job-0``) nor
leave jobs ``running`` until a restart; once space returns, the work completes by itself.

The store and the results live on a 12 MB tmpfs (the fixture of test_fuzz.py: skipped with
the reason where a tmpfs cannot be mounted); volumes come from the real HippoCrop series
(udacity-mr/Study1); the inference runtime is the seam of test_jobs_runner, which fills the
disk during the first prediction, as a growing spool or a log would.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_fuzz import tmpfs as tmpfs  # noqa: F401 (fixture)
from test_jobs_runner import _record, _runner, _Runtime
from test_jobs_runner import series as series  # noqa: F401 (fixture)

from aenode.jobs import get_job
from aenode.records import SeriesInfo
from aenode.states import JobState
from aenode.store import Store


def fill(path: Path) -> int:
    """Write ``path`` until the file system is full; returns the bytes written."""
    written = 0
    block = b"\0" * (256 << 10)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        block = b"\0" * 4096
        while True:  # the last few pages too
            try:
                written += f.write(block)
            except OSError:
                return written


class _FillsTheDisk(_Runtime):
    """Predicts a box mask; the first prediction fills the disk under the job."""

    def __init__(self, filler: Path) -> None:
        super().__init__()
        self.filler = filler
        self.filled = threading.Event()

    def predict(self, model: str, volumes: Any, **kw: Any) -> Any:
        if not self.filled.is_set():
            fill(self.filler)
            self.filled.set()
        return super().predict(model, volumes, **kw)


def test_a_disk_that_fills_under_a_job_does_not_stop_the_workers_and_the_job_completes(
    tmpfs: Path,  # noqa: F811
    series: SeriesInfo,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    var = tmpfs / "var"
    var.mkdir()
    store = Store(var / "aenode.db")
    jobs = [_record(store, series, model) for model in ("hippocampus", "hippocampus-b")]
    runtime = _FillsTheDisk(tmpfs / "filler")
    runner = _runner(tmpfs, store, runtime)
    stop, wakeup = threading.Event(), threading.Event()
    workers = [
        threading.Thread(
            target=runner.run_forever, args=(stop, wakeup, 0.05), name=f"job-{i}", daemon=True
        )
        for i in range(2)
    ]
    with caplog.at_level(logging.WARNING):
        for worker in workers:
            worker.start()
        try:
            assert runtime.filled.wait(60)
            time.sleep(4.0)  # the disk stays full for a while: the workers back off
            assert all(w.is_alive() for w in workers)
            states = {get_job(store, j.id or 0).state for j in jobs}  # type: ignore[union-attr]
            assert JobState.DONE not in states  # nothing can be written
            (tmpfs / "filler").unlink()  # space returns; no restart
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                records = [get_job(store, j.id or 0) for j in jobs]
                if all(r is not None and r.state is JobState.DONE for r in records):
                    break
                time.sleep(0.2)
            assert all(w.is_alive() for w in workers)
        finally:
            stop.set()
            wakeup.set()
            for worker in workers:
                worker.join(30)
    for job in jobs:
        record = get_job(store, job.id or 0)
        assert record is not None
        assert record.state is JobState.DONE, (record.state, record.reason)
        assert record.volumes_mm3 and all(v > 0 for v in record.volumes_mm3.values())
        assert (Path(record.result_dir or "") / "seg.dcm").stat().st_size > 0
    assert not any(
        r.exc_info and r.exc_info[0] is not None and "OperationalError" in r.exc_info[0].__name__
        for r in caplog.records
        if r.levelno >= logging.ERROR and "internal error" in r.getMessage()
    )
    store.close()


@pytest.mark.network
def test_aenode_serve_on_a_disk_that_fills_keeps_serving_and_finishes_the_study(
    tmpfs: Path,  # noqa: F811
    data_dir: Path,
    tmp_path: Path,
) -> None:
    import yaml
    from conftest import ROOT
    from test_receive import NodeProcess, storescu

    selection = yaml.safe_load((ROOT / "config.yaml").read_text())["selection"]
    # only the rule of the one model the node loads (tests/test_receive.py NodeProcess)
    selection["rules"] = [r for r in selection["rules"] if r["models"] == ["hippocampus"]]
    node = NodeProcess(
        tmp_path,
        {
            "storage": {"path": str(tmpfs / "var"), "min_free_mb": 0},
            "node": {"receivers": 1},
            "logging": {"level": "INFO"},
            "selection": selection,
        },
    )
    node.storage = tmpfs / "var"
    node.start(timeout=120)  # models load first: slow on a shared CPU
    try:
        deadline = time.monotonic() + 120
        while "model hippocampus warm" not in node.log_text():
            assert time.monotonic() < deadline, node.log_text()[-3000:]
            time.sleep(0.2)
        crop = data_dir / "udacity-mr" / "Study1" / "13_HCropVolume"
        assert storescu(node.port, crop, opts=("+sd",)).returncode == 0
        fill(tmpfs / "filler")  # while the series completes and its job runs
        time.sleep(5.0)
        assert node.proc is not None and node.proc.poll() is None
        (tmpfs / "filler").unlink()  # space returns; no restart
        deadline = time.monotonic() + 120
        rows: list[Any] = []
        while time.monotonic() < deadline:
            rows = node.query("SELECT model, state, reason FROM jobs")
            if rows and all(r["state"] == "done" for r in rows):
                break
            time.sleep(0.5)
        assert [(r["model"], r["state"]) for r in rows] == [("hippocampus", "done")], [
            dict(r) for r in rows
        ]
        assert node.proc.poll() is None
        assert "Exception in thread" not in node.log_text()
    finally:
        node.stop()
