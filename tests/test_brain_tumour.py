"""The brain-tumour model wired into the node: FLAIR selection, `aenode run`, evaluate.

Real data: the FLAIR series of ../shared/data/udacity-mr Study1 and Study2 (glioblastoma
patients), and held-out lgg-flair patients (NIfTI with reference masks).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from aenode.cli import main
from aenode.config import load_settings
from aenode.metrics import dice
from aenode.select.rules import compile_rules, evaluate

ROOT = Path(__file__).resolve().parents[1]
FLAIR = {"Study1": "36459-FLAIRreg-76244", "Study2": "37623-FLAIRreg-62665"}
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"


def _series_uid(folder: Path) -> str:
    first = next(folder.glob("*.dcm"))
    return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


# -- selection ---------------------------------------------------------------------------


def test_default_rules_take_exactly_the_flair_series(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mr = data_dir / "udacity-mr"
    code = main(["--config", str(ROOT / "config.yaml"), "select", str(mr), "--json"])
    assert code == 0
    series = json.loads(capsys.readouterr().out)["series"]
    assert len(series) == 10
    taken = {
        s["series_uid"]
        for s in series
        for m in s["matches"]
        if m["rule"] == "brain-tumour" and m["models"] == ["brain-tumour"]
    }
    assert taken == {_series_uid(mr / study / name) for study, name in FLAIR.items()}
    hippo = {s["description"] for s in series for m in s["matches"] if m["rule"] == "hippocampus"}
    assert hippo == {"HippoCrop"}


@pytest.fixture(scope="module")
def headers(data_dir: Path) -> dict[str, Dataset]:
    study = data_dir / "udacity-mr" / "Study1"
    return {
        "flair": pydicom.dcmread(study / FLAIR["Study1"] / "000000.dcm", stop_before_pixels=True),
        "t2": pydicom.dcmread(study / "37916-T2reg-88910" / "000000.dcm", stop_before_pixels=True),
    }


def _rule() -> Any:
    settings = load_settings(ROOT / "config.yaml")
    rules = compile_rules(settings.selection.rules)
    return next(r for r in rules if r.name == "brain-tumour")


@pytest.mark.parametrize(
    "description",
    [
        "FLAIR_reg",
        "T2 FLAIR",
        "Ax T2 FLAIR",  # GE
        "T2W_FLAIR",  # Philips
        "DarkFluid",  # Siemens
        "t2_tirm_tra_dark-fluid",  # Siemens
        "AX FLAIR FS",
        "flair tra",
    ],
)
def test_flair_as_other_vendors_name_it(headers: dict[str, Dataset], description: str) -> None:
    ds = copy.deepcopy(headers["flair"])
    ds.SeriesDescription = description
    decision = evaluate(_rule(), ds, 22)
    assert decision.matched, decision.reason


@pytest.mark.parametrize(
    ("base", "changes", "reason"),
    [
        ("t2", {"SeriesDescription": "T2 FLAIR"}, "ScanningSequence 'SE' does not contain 'IR'"),
        ("flair", {"InversionTime": 150}, "InversionTime 150 is not in [1400, 3500]"),
        (
            "flair",
            {"ImageType": ["DERIVED", "SECONDARY", "OTHER"]},
            "does not contain 'ORIGINAL'",
        ),
        ("flair", {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, "orientation is sagittal"),
        ("flair", {"SeriesDescription": "T2_reg"}, "SeriesDescription 'T2_reg' does not match"),
    ],
)
def test_what_is_not_an_axial_flair(
    headers: dict[str, Dataset], base: str, changes: dict[str, Any], reason: str
) -> None:
    ds = copy.deepcopy(headers[base])
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    decision = evaluate(_rule(), ds, 22)
    assert not decision.matched
    assert reason in str(decision.reason)


# -- `aenode run` on Study1 --------------------------------------------------------------


def _numeric_items(items: Any) -> list[tuple[str, float, str]]:
    found: list[tuple[str, float, str]] = []
    for item in items or []:
        if getattr(item, "ValueType", "") == "NUM" and "MeasuredValueSequence" in item:
            mv = item.MeasuredValueSequence[0]
            unit = mv.MeasurementUnitsCodeSequence[0].CodeValue
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            found.append((str(name), float(mv.NumericValue), str(unit)))
        found += _numeric_items(getattr(item, "ContentSequence", None))
    return found


def _items(items: Any) -> list[Any]:
    out: list[Any] = []
    for item in items or []:
        out.append(item)
        out += _items(getattr(item, "ContentSequence", None))
    return out


@pytest.fixture(scope="module")
def study1_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("run")
    study = data_dir / "udacity-mr" / "Study1"
    argv = ["--config", str(ROOT / "config.yaml"), "run", str(study), "--out", str(out), "--json"]
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    return dict(json.loads(buffer.getvalue()))


def _job(run: dict[str, Any], model: str) -> dict[str, Any]:
    jobs = [j for j in run["jobs"] if j["model"] == model]
    assert len(jobs) == 1, run["jobs"]
    return jobs[0]


def _objects(job: dict[str, Any]) -> dict[str, pydicom.Dataset]:
    objects = {}
    for path in job["files"]:
        ds = pydicom.dcmread(path)
        objects[str(ds.SOPClassUID)] = ds
    return objects


def test_run_study1_gives_both_jobs(study1_run: dict[str, Any]) -> None:
    assert sorted(j["model"] for j in study1_run["jobs"]) == ["brain-tumour", "hippocampus"]
    assert all(j["state"] == "done" for j in study1_run["jobs"]), study1_run["jobs"]
    bt = _job(study1_run, "brain-tumour")
    assert bt["inputs"]["image"]["description"] == "FLAIR_reg"
    series = [
        {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in j["files"]}
        for j in study1_run["jobs"]
    ]
    assert not series[0] & series[1]  # each job's results in its own series


def test_run_study1_tumour_seg_and_sr(data_dir: Path, study1_run: dict[str, Any]) -> None:
    folder = data_dir / "udacity-mr" / "Study1" / FLAIR["Study1"]
    flair = {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in folder.glob("*.dcm"))
    }
    first = next(iter(flair.values()))
    objects = _objects(_job(study1_run, "brain-tumour"))
    assert set(objects) == {SEG, SR, SC}
    seg = hd.seg.Segmentation.from_dataset(objects[SEG])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    desc = seg.get_segment_description(1)
    assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    frames = seg.PerFrameFunctionalGroupsSequence
    for frame in frames:
        src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in flair[src].ImagePositionPatient], atol=1e-3)
    # The real voxel volume: PixelSpacing times the spacing of the slice positions.
    positions = sorted(
        np.dot(
            [float(v) for v in ds.ImagePositionPatient],
            np.cross(
                [float(v) for v in ds.ImageOrientationPatient[:3]],
                [float(v) for v in ds.ImageOrientationPatient[3:]],
            ),
        )
        for ds in flair.values()
    )
    step = float(np.median(np.diff(positions)))
    voxel = float(first.PixelSpacing[0]) * float(first.PixelSpacing[1]) * step
    mask = seg.get_volume(segment_numbers=[1], combine_segments=True).array
    seg_ml = float(np.count_nonzero(mask)) * voxel / 1000.0
    assert 40.0 < seg_ml < 150.0  # one large lesion (92 ml on 12 slices when measured)
    numeric = _numeric_items(objects[SR].ContentSequence)
    # The SEG segment's volume group (mm3) and the model's measurement (ml) agree with it.
    ml = [v for name, v, u in numeric if name == "Volume" and u == "ml"]
    mm3 = [v for name, v, u in numeric if name == "Volume" and u == "mm3"]
    assert len(ml) == 1 and len(mm3) == 1, numeric
    assert ml[0] == pytest.approx(seg_ml, rel=1e-4) and mm3[0] == pytest.approx(1000 * seg_ml)
    probability = [v for name, v, u in numeric if name == "Tumour presence probability"]
    assert len(probability) == 1 and 0.9 <= probability[0] <= 1.0, numeric
    # The key slices referenced by the measurements are the slices of largest extent.
    keys = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in _items(objects[SR].ContentSequence)
        if getattr(item, "ValueType", "") == "IMAGE"
        and item.ConceptNameCodeSequence[0].CodeMeaning == "Source of Measurement"
    }
    area: dict[str, int] = {}
    for i, frame in enumerate(frames):
        src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        area[str(src)] = int(np.count_nonzero(seg.pixel_array[i]))
    largest = sorted(area, key=lambda uid: -area[uid])[:3]
    assert keys == set(largest)


# -- evaluate --predictions ---------------------------------------------------------------


def test_evaluate_predictions_round_trip_brain_tumour(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lgg = data_dir / "lgg-flair"
    cases = ["TCGA_CS_6667_20011105", "TCGA_HT_7874_19950902"]  # held-out patients
    out = tmp_path / "pred"
    argv = ["--config", str(ROOT / "config.yaml"), "evaluate", "--model", "brain-tumour"]
    argv += ["--images", str(lgg / "imagesTr"), "--labels", str(lgg / "labelsTr")]
    argv += ["--cases", ",".join(cases), "--predictions", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    card = {r["patient"]: r for r in _card_cases()}
    for row in report["cases"]:
        written = out / f"{row['case']}.nii.gz"
        assert row["prediction"] == str(written)
        pred, image = (
            sitk.ReadImage(str(written)),
            sitk.ReadImage(str(lgg / "imagesTr" / written.name)),
        )
        assert pred.GetSize() == image.GetSize() and pred.GetOrigin() == image.GetOrigin()
        ref = sitk.ReadImage(str(lgg / "labelsTr" / written.name))
        recomputed = dice(sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(ref), 1)
        assert recomputed == pytest.approx(row["dice"]["flair_abnormality"], abs=1e-9)
        # The node reproduces the card's held-out per-patient Dice.
        assert recomputed == pytest.approx(card[row["case"]]["dice"], abs=0.005)
    presence = report["slice_presence"]
    assert presence["slices"] == 40 and presence["positive_slices"] == 16
    assert presence["auc"] > 0.85 and presence["specificity"] > 0.95, presence


def _card_cases() -> list[dict[str, Any]]:
    import yaml

    card = yaml.safe_load((ROOT / "models" / "brain-tumour" / "model.yaml").read_text())
    return list(card["metrics"]["validation_patients"])


def test_evaluate_predictions_round_trip_hippocampus(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    msd = data_dir / "msd-hippocampus"
    out = tmp_path / "pred"
    argv = ["--config", str(ROOT / "config.yaml"), "evaluate", "--model", "hippocampus"]
    argv += ["--images", str(msd / "imagesTr"), "--labels", str(msd / "labelsTr")]
    argv += ["--cases", "hippocampus_001,hippocampus_003", "--predictions", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == [
        "hippocampus_001.nii.gz",
        "hippocampus_003.nii.gz",
    ]
    for row in report["cases"]:
        pred = sitk.ReadImage(str(out / f"{row['case']}.nii.gz"))
        image = sitk.ReadImage(str(msd / "imagesTr" / f"{row['case']}.nii.gz"))
        assert pred.GetSize() == image.GetSize()
        assert np.allclose(pred.GetSpacing(), image.GetSpacing())
        ref = sitk.GetArrayFromImage(
            sitk.ReadImage(str(msd / "labelsTr" / f"{row['case']}.nii.gz"))
        )
        p = sitk.GetArrayFromImage(pred)
        for key, value in (("anterior", 1), ("posterior", 2)):
            assert dice(p, ref, value) == pytest.approx(row["dice"][key], abs=1e-9)
