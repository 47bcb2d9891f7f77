"""Classifier results are first-class (issue 10): the findings and class probabilities are
stored with the job and shown by ``aenode run --json``, ``aenode jobs [--json]`` and
``aenode status``.

A TorchScript softmax classifier written here (seeded random weights) runs on the real
HippoCrop series of ../shared/data/udacity-mr; the expected probabilities are computed from
the network's own logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import torch
import yaml
from test_contract import TinyClassifier, _card, _expected_logits, _package, _softmax_outputs

from aenode.cli import main
from aenode.config import ModelsSettings, Settings
from aenode.infer.registry import Registry
from aenode.infer.runtime import Runtime
from aenode.jobs import JobRunner, recent_jobs, record_job
from aenode.records import SeriesInfo
from aenode.store import Store
from aenode.volume import build_volume_from_files

HIPPO = "udacity-mr/Study1/13_HCropVolume"


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return _package(tmp_path, _card("classification", _softmax_outputs()), TinyClassifier(1, 2))


def _config(tmp_path: Path, models: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "storage": {"path": str(tmp_path / "var"), "min_free_mb": 10},
                "models": {"path": str(models)},
                "runtime": {"device": "cpu", "threads": 1},
                "results": {"report": False},
                "selection": {
                    "rules": [
                        {
                            "name": "mr",
                            "models": ["net"],
                            "series": {"tag": "SeriesDescription", "equals": "HippoCrop"},
                        }
                    ]
                },
            }
        )
    )
    return cfg


def _expected(models: Path, data_dir: Path) -> dict[str, float]:
    registry = Registry.load(ModelsSettings(path=models))
    volume = build_volume_from_files(sorted((data_dir / HIPPO).glob("*.dcm")))
    probs = torch.softmax(_expected_logits(registry, volume), dim=0).tolist()
    return {"no bleed": probs[0], "bleed": probs[1]}


def test_run_json_shows_findings_and_probabilities(
    tmp_path: Path, data_dir: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = _expected(models, data_dir)
    cfg = _config(tmp_path, models)
    code = main(["--config", str(cfg), "run", str(data_dir / HIPPO), "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr()
    capsys.readouterr()
    args = ["--config", str(cfg), "run", str(data_dir / HIPPO), "--out", str(tmp_path / "o2")]
    assert main([*args, "--json"]) == 0
    (job,) = json.loads(capsys.readouterr().out)["jobs"]
    assert job["class_probabilities"] == pytest.approx(expected, abs=1e-5)
    (finding,) = job["findings"]  # softmax: one finding, the argmax
    top = max(expected, key=lambda k: expected[k])
    assert finding["name"] == top and finding["present"] is True
    assert finding["probability"] == pytest.approx(expected[top], abs=1e-5)
    assert finding["code"]["value"] == ("50960005" if top == "bleed" else "373572006")


def test_jobs_and_status_show_stored_findings(
    tmp_path: Path, data_dir: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = _expected(models, data_dir)
    cfg = _config(tmp_path, models)
    settings = Settings.model_validate(yaml.safe_load(cfg.read_text()))
    (tmp_path / "var").mkdir()
    store = Store(tmp_path / "var" / "aenode.db")
    files = tuple(sorted((data_dir / HIPPO).glob("*.dcm")))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    series = SeriesInfo(study, uid, 0, "MR", "HippoCrop", files)
    with store.transaction() as conn:
        job = record_job(conn, "mr", "net", study, {"image": series}, now=0.0)
    assert job is not None
    registry = Registry.load(settings.models)
    with Runtime(registry, settings.runtime) as runtime:
        JobRunner(settings, store, registry, runtime).run(job)
    (record,) = recent_jobs(store)
    store.close()
    assert record.class_probabilities == pytest.approx(expected, abs=1e-5)
    top = max(expected, key=lambda k: expected[k])
    assert [f["name"] for f in record.findings] == [top]

    assert main(["--config", str(cfg), "jobs", "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)["jobs"]
    assert shown["class_probabilities"] == pytest.approx(expected, abs=1e-5)
    assert shown["findings"][0]["name"] == top
    assert main(["--config", str(cfg), "jobs"]) == 0
    line = f"findings: {top} {expected[top]:.2f} (present)"
    assert line in capsys.readouterr().out
    assert main(["--config", str(cfg), "status"]) == 0
    assert f"job {record.id}: net done {top} {expected[top]:.2f} (present)" in (
        capsys.readouterr().out
    )
