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
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from PIL import Image
from pydicom.dataset import Dataset

from aenode import metrics
from aenode.cli import main
from aenode.config import load_settings
from aenode.errors import InputError
from aenode.records import SeriesInfo, Volume
from aenode.select.rules import Rule, compile_rules, match_series
from aenode.volume import build_volume_from_files

ROOT = Path(__file__).resolve().parents[1]
MODEL = "head-ct-haemorrhage"


@pytest.fixture(scope="module")
def rules() -> list[Rule]:
    settings = load_settings(ROOT / "config.yaml", environ={})
    shipped = sorted(p.parent.name for p in (ROOT / "models").glob("*/model.yaml"))
    return compile_rules(settings.selection.rules, known_models=shipped)


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


# -- the entry point on the real tilted scan -----------------------------------------------


@pytest.fixture(scope="module")
def loaded() -> Any:
    from aenode.infer.registry import load_package

    return load_package(ROOT / "models" / MODEL)


def test_entry_point_on_cq500(loaded: Any, data_dir: Path) -> None:
    files = [
        p for p in sorted((data_dir / "cq500-ct0").glob("CT*.dcm")) if p.name != "CT000000.dcm"
    ]
    volume = build_volume_from_files(files, correct={"tilt", "gaps"})
    assert volume.correction is not None
    prediction = loaded.module.predict({"image": volume}, loaded.state, loaded.card)
    expected = loaded.card.metrics["scans"][0]
    p = prediction.class_probabilities["haemorrhage"]
    assert p == pytest.approx(expected["probability"], abs=1e-3)
    assert prediction.labels is None
    [finding] = prediction.findings
    assert finding.name == "haemorrhage" and finding.threshold == 0.5
    assert finding.present == (p >= 0.5)
    assert finding.code is not None and finding.code.value == "1386000"
    [m] = prediction.measurements
    assert m.probability and m.value == p and m.unit == "1"
    assert prediction.display_window == (40.0, 80.0)
    # the key slabs 11-13 are the acquired slices 88-111 (0.625 mm, 8 a slab) in datasets order
    assert prediction.key_slices == list(range(88, 112))
    z = [float(volume.datasets[k].ImagePositionPatient[2]) for k in prediction.key_slices]
    assert z == sorted(z) and 14.0 < z[-1] - z[0] < 15.0
    notes = " ".join(prediction.notes)
    assert "key slabs 11-13" in notes and "15 of 29 slabs classified" in notes
    assert "not validated for clinical use" in notes


def test_entry_point_refuses_a_volume_without_head(loaded: Any) -> None:
    image = sitk.Image([64, 64, 20], sitk.sitkInt16) - 1000
    image.SetSpacing([1.0, 1.0, 5.0])
    info = SeriesInfo("1.2.3", "1.2.3.4", 0, "CT", "", ())
    with pytest.raises(InputError, match=r"series 1\.2\.3\.4: no slab encloses 50 cm2"):
        loaded.module.predict({"image": Volume(image, info)}, loaded.state, loaded.card)


# -- aenode evaluate on PNGs ------------------------------------------------------------------


def _config(tmp: Path) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({"models": {"path": str(ROOT / "models")}}))
    return path


def _some_slices(data_dir: Path, folder: Path) -> dict[str, int]:
    src = data_dir / "head-ct-kitamura"
    with (src / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    chosen = rows[:4] + rows[-4:]  # 4 with haemorrhage, 4 without
    folder.mkdir()
    for row in chosen:
        shutil.copy(src / row["file"], folder / row["file"])
    with (folder / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "hemorrhage"])
        writer.writerows([r["file"], r["hemorrhage"]] for r in chosen)
    return {r["file"]: int(r["hemorrhage"]) for r in chosen}


def test_evaluate_pngs_and_predictions_round_trip(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth = _some_slices(data_dir, tmp_path / "images")
    assert sorted(set(truth.values())) == [0, 1]
    out = tmp_path / "out"
    argv = ["--config", str(_config(tmp_path)), "evaluate", "--model", MODEL]
    argv += ["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "images")]
    assert main([*argv, "--predictions", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 8 and report["positives"] == 4
    with (out / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == sorted(truth)
    got = {r["file"]: float(r["probability"]) for r in rows}
    # the shipped model's training predictions of the same images
    with (ROOT / "models" / MODEL / "predictions.csv").open(newline="") as fh:
        shipped = {r["file"]: float(r["probability"]) for r in csv.DictReader(fh)}
    for name, p in got.items():
        assert p == pytest.approx(shipped[name], abs=1e-4), name
    names = sorted(got)
    auc = metrics.auc([got[n] for n in names], [truth[n] for n in names])
    scored = report["metrics"]["haemorrhage"]
    assert scored["auc"]["value"] == pytest.approx(auc, abs=1e-12)
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        lo, hi = scored[key]["ci95"]
        assert lo <= scored[key]["value"] <= hi
    tp = sum(got[n] >= 0.5 and truth[n] == 1 for n in names)
    assert scored["tp"] == tp and scored["sensitivity"]["value"] == tp / 4
    # the text report names the figures and the file
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "haemorrhage          auc:" in text and "95% CI" in text


def test_evaluate_refuses_a_colour_png(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _some_slices(data_dir, tmp_path / "images")
    first = sorted((tmp_path / "images").glob("*.png"))[0]
    grey = np.asarray(Image.open(first).convert("L"))
    rgb = np.stack([grey, grey, np.zeros_like(grey)], axis=-1)
    Image.fromarray(rgb, "RGB").save(first)
    argv = ["--config", str(_config(tmp_path)), "evaluate", "--model", MODEL]
    argv += ["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "images")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert first.name in err and "colour image" in err
