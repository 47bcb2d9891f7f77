"""head-ct-haemorrhage in the node: the default head CT rule, the entry point on CQ500-CT-0,
and ``aenode evaluate`` on a folder of PNGs with the predictions file round-tripped.

Real data: ``../shared/data/cq500-ct0`` (238 tilted 0.625 mm slices of CQ500-CT-0 and one
stray 5 mm slice of another series) and ``../shared/data/head-ct-kitamura`` (PNGs and
``labels.csv``). Series without a ``SeriesDescription`` are copies of the real headers with
the tag removed.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from aenode.cli import main
from aenode.config import load_settings
from aenode.select.rules import Rule, compile_rules, match_series

ROOT = Path(__file__).resolve().parents[1]
MODEL = "head-ct-haemorrhage"


@pytest.fixture(scope="module")
def rules() -> list[Rule]:
    settings = load_settings(ROOT / "config.yaml", environ={})
    return compile_rules(settings.selection.rules, known_models=["hippocampus", MODEL])


def _header(data_dir: Path, name: str) -> Dataset:
    return pydicom.dcmread(data_dir / "cq500-ct0" / name, stop_before_pixels=True)


def _models(rules: list[Rule], header: Dataset, count: int) -> list[str]:
    return [m for rule, _ in match_series(rules, header, count) for m in rule.models]


def test_head_ct_rule_takes_cq500_and_not_the_stray_slice(
    rules: list[Rule], data_dir: Path
) -> None:
    assert _models(rules, _header(data_dir, "CT000001.dcm"), 238) == [MODEL]
    stray = _header(data_dir, "CT000000.dcm")
    assert str(stray.SeriesDescription) == "2.5/5mm"
    assert _models(rules, stray, 1) == []


def test_head_ct_rule_body_part_and_description(rules: list[Rule], data_dir: Path) -> None:
    ds = _header(data_dir, "CT000001.dcm")
    del ds.SeriesDescription
    assert _models(rules, ds, 238) == [MODEL]  # no description: still head CT
    ds.BodyPartExamined = "HEAD"
    assert _models(rules, ds, 238) == [MODEL]
    ds.BodyPartExamined = "CHEST"
    assert _models(rules, ds, 238) == []
    del ds.BodyPartExamined
    ds.SeriesDescription = "CT CHEST 1.25"
    assert _models(rules, ds, 238) == []
    ds.SeriesDescription = "HEAD 5mm"
    ds.SliceThickness = "12"
    assert _models(rules, ds, 238) == []  # thicker than 10 mm
    ds.SliceThickness = "5"
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    assert _models(rules, ds, 238) == []  # sagittal
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Modality = "MR"
    assert _models(rules, ds, 238) == []


def test_select_takes_head_ct_without_series_description(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = data_dir / "cq500-ct0"
    for path in sorted(src.glob("CT*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "SeriesDescription" in ds:
            del ds.SeriesDescription
        ds.save_as(tmp_path / path.name)  # headers only: selection reads no pixels
    code = main(["--config", str(ROOT / "config.yaml"), "select", str(tmp_path), "--json"])
    assert code == 0
    series = json.loads(capsys.readouterr().out)["series"]
    by_count = {s["instances"]: s for s in series}
    assert set(by_count) == {1, 238}
    assert by_count[238]["description"] == ""
    assert by_count[238]["matches"] == [{"rule": "head-ct", "role": None, "models": [MODEL]}]
    assert by_count[1]["matches"] == []
