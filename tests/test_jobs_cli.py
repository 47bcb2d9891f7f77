"""``aenode jobs``, ``aenode status`` and ``aenode retry`` on a store with real rows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from aenode.cli import main
from aenode.store import Store


def _store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "var" / "aenode.db")
    now = time.time()
    store.execute(
        "INSERT INTO series (series_uid, revision, study_uid, modality, description,"
        " instance_count, first_arrival, last_arrival, state, reason)"
        " VALUES ('1.2.3', 0, '1.2', 'CT', 'tilted', 10, ?, ?, 'rejected',"
        " 'ImagePositionPatient: positions are not along the slice normal (gantry tilt)')",
        (now - 5, now - 4),
    )
    rows = [
        # id 1: exported fine; id 2: export failed; id 3: volume rejected.
        ("done", None, now - 3.0, now - 2.5, now - 2.0, now - 1.5, now - 1.0, now - 0.5),
        (
            "failed",
            "export: ORTHANC@127.0.0.1:1: connection refused",
            now,
            now,
            now,
            now,
            now,
            None,
        ),
        ("rejected", "role image: series 1.2.3: gantry tilt", now, now, now, None, None, None),
    ]
    for i, (state, reason, *times) in enumerate(rows, start=1):
        store.execute(
            "INSERT INTO jobs (rule, model, study_uid, inputs, state, reason, t_received,"
            " t_completed, t_started, t_inferred, t_written, t_exported, created_at, updated_at,"
            " findings) VALUES ('r', 'hippocampus', '1.2', ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?)",
            (
                f'{{"n": {i}}}',
                state,
                reason,
                *times,
                json.dumps({"volumes_mm3": {"Anterior hippocampus": 1874.0}}),
            ),
        )
    store.execute(
        "INSERT INTO outbox (job_id, destination, files, state, attempts, last_error)"
        " VALUES (2, 'ORTHANC@127.0.0.1:1', '[]', 'failed', 9, 'connection refused')"
    )
    return store


def _cfg(tmp_path: Path) -> list[str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage:\n  path: {tmp_path / 'var'}\n")
    return ["--config", str(cfg)]


def test_jobs_json_has_states_and_stage_times(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _store(tmp_path).close()
    assert main([*_cfg(tmp_path), "jobs", "--json"]) == 0
    jobs = {j["id"]: j for j in json.loads(capsys.readouterr().out)["jobs"]}
    assert [jobs[i]["state"] for i in (1, 2, 3)] == ["done", "failed", "rejected"]
    assert jobs[1]["stages"] == pytest.approx(
        {"complete": 0.5, "wait": 0.5, "infer": 0.5, "write": 0.5, "export": 0.5}, abs=1e-3
    )
    assert jobs[1]["volumes_mm3"] == {"Anterior hippocampus": 1874.0}
    assert "gantry tilt" in jobs[3]["reason"]


def test_status_shows_why_a_series_was_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _store(tmp_path).close()
    assert main([*_cfg(tmp_path), "status"]) == 0
    out = capsys.readouterr().out
    assert "rejected" in out and "reason: ImagePositionPatient" in out
    assert "job 3: hippocampus rejected role image" in out


def test_retry_requeues_export_or_whole_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _store(tmp_path).close()
    assert main([*_cfg(tmp_path), "retry", "1"]) == 1
    assert "is done, not failed" in capsys.readouterr().out
    assert main([*_cfg(tmp_path), "retry", "2"]) == 0
    assert "export queued again" in capsys.readouterr().out
    assert main([*_cfg(tmp_path), "retry", "3"]) == 0
    assert "queued to run again" in capsys.readouterr().out
    assert main([*_cfg(tmp_path), "retry", "99"]) == 1
    store = Store(tmp_path / "var" / "aenode.db")
    states = {r["id"]: r["state"] for r in store.execute("SELECT id, state FROM jobs")}
    outbox = store.execute("SELECT state, attempts FROM outbox")[0]
    assert states == {1: "done", 2: "exporting", 3: "queued"}
    assert (outbox["state"], outbox["attempts"]) == ("pending", 0)
