"""``aenode serve`` fails fast and stops in bound (issue 10).

- start-up with ``runtime.device: cuda`` on this CPU-only machine fails naming the key and
  never listens;
- a stop signal while the models load, or with a job in flight, ends the node within
  ``node.stop_timeout_seconds``;
- once a stage has stopped for good, new C-STOREs get 0xA700 with an Error Comment that
  says why, and ``aenode status`` says it too.

Real model (models/hippocampus) and real HippoCrop series (udacity-mr/Study1) over loopback.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from conftest import ROOT, free_port
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]
from test_receive import NodeProcess

from aenode.cli import main
from aenode.config import Settings
from aenode.infer.runtime import Runtime
from aenode.jobs import JobRunner, recent_jobs, requeue_interrupted
from aenode.pipeline import Node
from aenode.records import Volume
from aenode.states import JobState
from aenode.store import Store

pytestmark = pytest.mark.network

HIPPO = "udacity-mr/Study1/13_HCropVolume"


def _settings(tmp_path: Path, **node: Any) -> Settings:
    return Settings.model_validate(
        {
            "node": {"host": "127.0.0.1", "port": free_port(), "receivers": 1, **node},
            "storage": {"path": str(tmp_path / "var"), "min_free_mb": 10},
            "http": {"port": None},
            "models": {"path": str(ROOT / "models"), "enabled": ["hippocampus"]},
            "series": {"release_grace_seconds": 0.2, "poll_seconds": 0.05},
            "runtime": {"device": "cpu", "threads": 1},
            "results": {"report": False},
            "selection": {
                "rules": [
                    {
                        "name": "hippocampus",
                        "models": ["hippocampus"],
                        "series": {"tag": "SeriesDescription", "regex": "HippoCrop"},
                    }
                ]
            },
        }
    )


def _send(port: int, files: list[Path]) -> list[Any]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="AENODE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(pydicom.dcmread(f)) for f in files]
    finally:
        assoc.release()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_fails_at_start_and_never_listens(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, {"runtime": {"device": "cuda"}})
    log = open(node.log, "ab")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [str(ROOT / ".venv/bin/aenode"), "--config", str(node.config), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        while proc.poll() is None:
            assert not _listening(node.port), "the node listened with a device it lacks"
            time.sleep(0.1)
    finally:
        log.close()
    assert proc.returncode == 2
    text = node.log_text()
    assert "cannot start: runtime.device: cuda requested" in text
    assert "listening on" not in text


def test_sigterm_while_models_load_stops_in_bound(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, {"node": {"stop_timeout_seconds": 5}})
    with open(node.log, "ab") as log:
        proc = subprocess.Popen(
            [str(ROOT / ".venv/bin/aenode"), "--config", str(node.config), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 60
        while "models loaded" not in node.log_text() and time.monotonic() < deadline:
            assert proc.poll() is None, node.log_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rc = proc.wait(30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 5 + 2, f"took {took:.1f} s"
    assert rc == 0, node.log_text()
    assert "stopping on SIGTERM" in node.log_text()


def test_stop_with_a_job_stuck_ends_in_bound_and_the_job_resumes(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, stop_timeout_seconds=3)
    node = Node(settings)
    in_flight, release = threading.Event(), threading.Event()
    real_predict = Runtime.predict

    def stuck_predict(self: Runtime, model: str, volumes: Mapping[str, Volume], **kw: Any) -> Any:
        if volumes["image"].series.description == "HippoCrop":  # not the warm-up job
            in_flight.set()
            release.wait(120)  # a job far longer than the stop bound
        return real_predict(self, model, volumes, **kw)

    monkeypatch.setattr(Runtime, "predict", stuck_predict)
    node.start()
    try:
        statuses = _send(settings.node.port, sorted((data_dir / HIPPO).glob("*.dcm")))
        assert all(s.Status == 0 for s in statuses)
        assert in_flight.wait(120), "the job never started"
        started = time.monotonic()
        node.stop()
        took = time.monotonic() - started
        assert took < 3 + 1.5, f"stop took {took:.1f} s"
        # `aenode serve` exits here (its watchdog at the same bound): the job is left as it
        # was, and the next start resumes it.
        store = Store(Path(settings.storage.path) / "aenode.db")
        (job,) = recent_jobs(store)
        assert job.state is JobState.RUNNING
        assert requeue_interrupted(store) == 1
        store.close()
    finally:
        release.set()


def test_dead_stage_refuses_new_stores_and_status_says_why(
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = _settings(tmp_path)
    monkeypatch.setattr(JobRunner, "run_forever", lambda self, stop, wakeup, poll: None)
    node = Node(settings)
    node.start()
    try:
        files = sorted((data_dir / HIPPO).glob("*.dcm"))
        reason = node.check_health()
        assert reason is not None and "job-0 worker stopped" in reason
        time.sleep(1.2)  # receivers re-read the flag once a second
        (status,) = _send(settings.node.port, files[:1])
        assert status.Status == 0xA700
        assert str(status.ErrorComment).startswith("cannot process: the job-0 worker stopped")
    finally:
        node.stop()
    store = Store(Path(settings.storage.path) / "aenode.db")
    assert store.execute("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0  # nothing taken
    store.close()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage: {{path: {settings.storage.path}}}\n")
    assert main(["--config", str(cfg), "status"]) == 0
    out = capsys.readouterr().out
    assert "node refusing new C-STOREs (0xA700): the job-0 worker stopped" in out
