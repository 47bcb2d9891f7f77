"""``aenode status``: a series no rule selected says why; ``aenode status | head`` ends cleanly."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import ROOT

from aenode.cli import main
from aenode.records import SeriesInfo
from aenode.select.rules import compile_rules
from aenode.select.spec import RuleSpec
from aenode.select.studies import StudyTracker
from aenode.store import Store

T2 = "udacity-mr/Study1/12-T1post-05670"


def _store_with_unmatched_series(tmp_path: Path, data_dir: Path, copies: int = 1) -> Path:
    (tmp_path / "var").mkdir()
    store = Store(tmp_path / "var" / "aenode.db")
    files = tuple(sorted((data_dir / T2).glob("*.dcm")))
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    rules = compile_rules(
        [
            RuleSpec.model_validate(
                {
                    "name": "hippo",
                    "models": ["m"],
                    "series": {"tag": "SeriesDescription", "equals": "HippoCrop"},
                }
            ),
            RuleSpec.model_validate(
                {"name": "ct", "models": ["m"], "series": {"tag": "Modality", "equals": "CT"}}
            ),
        ]
    )
    tracker = StudyTracker(store, rules, {})
    now = time.time()
    for k in range(copies):
        uid = f"{header.SeriesInstanceUID}.{k}"
        store.execute(
            "INSERT INTO series (series_uid, revision, study_uid, first_arrival, last_arrival,"
            " state, modality, description, instance_count) VALUES (?, 0, ?, ?, ?, 'complete',"
            " 'MR', 'T1post', ?)",
            (uid, str(header.StudyInstanceUID), now, now, len(files)),
        )
        info = SeriesInfo(str(header.StudyInstanceUID), uid, 0, "MR", "T1post", files)
        assert tracker.on_series(info, header) == []
    store.close()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage: {{path: {tmp_path / 'var'}}}\n")
    return cfg


def test_status_says_not_selected_with_each_rules_first_failure(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _store_with_unmatched_series(tmp_path, data_dir)
    assert main(["--config", str(cfg), "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(x for x in lines if "T1post" in x)
    assert "  unmatched  " in row and "  complete  " not in row
    reason = lines[lines.index(row) + 1].strip()
    assert reason == (
        "reason: not selected: rule hippo: SeriesDescription 'T1post' is not "
        "'HippoCrop'; rule ct: Modality 'MR' is not 'CT'"
    )


def test_status_into_a_closed_pipe_has_no_traceback(tmp_path: Path, data_dir: Path) -> None:
    cfg = _store_with_unmatched_series(tmp_path, data_dir, copies=400)
    cmd = f"{ROOT / '.venv/bin/aenode'} --config {cfg} status --limit 400 | head -n 2"
    done = subprocess.run(
        ["bash", "-c", cmd], capture_output=True, text=True, timeout=120, check=False
    )
    assert len(done.stdout.splitlines()) == 2
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert sys.executable  # the CLI ran in its own interpreter
