"""Study tracker: series rules at once, study roles (ISLES'22 as DICOM), timeouts, restarts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from isles import nifti_path, write_isles_study

from aenode.errors import ConfigError
from aenode.infer.cards import ModelCard
from aenode.records import SeriesInfo
from aenode.select.rules import Rule, compile_rules
from aenode.select.spec import RuleSpec
from aenode.select.studies import (
    StudyTracker,
    check_rule_roles,
    job_from_row,
    role_requirements,
    role_waits,
)
from aenode.store import Store
from aenode.volume import build_volume

STROKE = {
    "name": "stroke",
    "models": ["stroke"],
    "roles": {
        "dwi": {
            "all": [
                {"tag": "Modality", "equals": "MR"},
                {"tag": "SeriesDescription", "regex": ".*(dwi|trace).*", "ignore_case": True},
            ]
        },  # fmt: skip
        "adc": {"tag": "SeriesDescription", "regex": ".*ADC.*"},
        "flair": {"tag": "SeriesDescription", "regex": ".*FLAIR.*"},
    },
}
HIPPO = {
    "name": "hippocampus",
    "models": ["hippocampus", "hippo-b"],
    "series": {"tag": "SeriesDescription", "equals": "HippoCrop"},
}
T0 = 1_000_000.0


@pytest.fixture(scope="module")
def isles(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> tuple[str, dict[str, list[Path]]]:
    return write_isles_study(tmp_path_factory.mktemp("isles"), data_dir)


def _rules(*specs: dict[str, Any]) -> list[Rule]:
    return compile_rules([RuleSpec.model_validate(s) for s in specs])


def _series(files: list[Path], revision: int = 0) -> tuple[SeriesInfo, pydicom.Dataset]:
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    info = SeriesInfo(
        study_uid=header.StudyInstanceUID,
        series_uid=header.SeriesInstanceUID,
        revision=revision,
        modality=header.Modality,
        description=header.SeriesDescription,
        files=tuple(files),
        completed_by="count",
        first_arrival=T0,
        last_arrival=T0,
        completed_at=T0,
    )
    return info, header


def _tracker(path: Path, requirements: dict[str, dict[str, bool]] | None = None) -> StudyTracker:
    return StudyTracker(
        Store(path / "aenode.db"),
        _rules(STROKE, HIPPO),
        requirements or {"stroke": {"dwi": True, "adc": True, "flair": True}},
        timeout=120.0,
    )


def test_isles_series_are_real_pixels_in_the_right_place(
    isles: tuple[str, dict[str, list[Path]]], data_dir: Path
) -> None:
    _, files = isles
    for role in ("dwi", "flair"):
        info, _ = _series(list(reversed(files[role])))
        vol = build_volume(info)
        ref = sitk.ReadImage(str(nifti_path(data_dir, role)))
        assert vol.image.GetSize() == ref.GetSize()
        ours = sitk.GetArrayViewFromImage(vol.image)
        theirs = sitk.GetArrayViewFromImage(ref)
        slope = float(vol.datasets[0].RescaleSlope)
        # the NIfTI grid is left-handed: sorted along the DICOM normal, slices come reversed
        np.testing.assert_allclose(ours, theirs[::-1], atol=slope * 0.51 + 1e-3)
        last = ref.GetSize()[2] - 1
        for index in [(0, 0, 0), (10, 20, 5), (ref.GetSize()[0] - 1, 3, last)]:
            ours_pt = vol.image.TransformIndexToPhysicalPoint(index)
            ref_pt = ref.TransformIndexToPhysicalPoint((index[0], index[1], last - index[2]))
            np.testing.assert_allclose(ours_pt, ref_pt, atol=1e-3)


def test_study_job_only_when_all_roles_present(
    tmp_path: Path, isles: tuple[str, dict[str, list[Path]]]
) -> None:
    study_uid, files = isles
    tracker = _tracker(tmp_path)
    assert tracker.on_series(*_series(files["dwi"]), now=T0) == []
    assert tracker.on_series(*_series(files["flair"]), now=T0 + 1) == []
    assert tracker.study_state("stroke", study_uid) == ("waiting", None)
    jobs = tracker.on_series(_series(files["adc"])[0], now=T0 + 2)  # header read from file
    assert len(jobs) == 1
    job = jobs[0]
    assert (job.rule, job.model, job.study_uid) == ("stroke", "stroke", study_uid)
    assert sorted(job.inputs) == ["adc", "dwi", "flair"]
    assert job.inputs["dwi"].files == tuple(files["dwi"])
    assert job.inputs["flair"].description == "FLAIR"
    assert tracker.study_state("stroke", study_uid) == ("started", None)
    # recorded once, in the store's jobs table, and rebuilt from its row
    rows = tracker.store.execute("SELECT * FROM jobs")
    assert len(rows) == 1 and rows[0]["id"] == job.id and rows[0]["state"] == "queued"
    assert job_from_row(rows[0]) == job
    # the same series again (a re-delivered queue item), or a timeout later: nothing new
    assert tracker.on_series(*_series(files["adc"]), now=T0 + 3) == []
    assert tracker.due(T0 + 10_000) == []
    assert len(tracker.store.execute("SELECT * FROM jobs")) == 1


def test_study_roles_survive_restart(
    tmp_path: Path, isles: tuple[str, dict[str, list[Path]]]
) -> None:
    _, files = isles
    first = _tracker(tmp_path)
    assert first.on_series(*_series(files["dwi"]), now=T0) == []
    assert first.on_series(*_series(files["adc"]), now=T0 + 1) == []
    first.store.close()
    second = _tracker(tmp_path)  # a restart: new store connection, new tracker
    jobs = second.on_series(*_series(files["flair"]), now=T0 + 2)
    assert [sorted(j.inputs) for j in jobs] == [["adc", "dwi", "flair"]]


def test_optional_role_does_not_hold_the_job(
    tmp_path: Path, isles: tuple[str, dict[str, list[Path]]]
) -> None:
    """Once the required roles are there the job starts; a missing optional role is left out."""
    study_uid, files = isles
    card = _card({"name": "flair", "required": False})
    tracker = _tracker(tmp_path, role_requirements({"stroke": card}))
    assert tracker.on_series(*_series(files["dwi"]), now=T0) == []
    jobs = tracker.on_series(*_series(files["adc"]), now=T0 + 5)
    assert len(jobs) == 1
    assert sorted(jobs[0].inputs) == ["adc", "dwi"]
    assert tracker.study_state("stroke", study_uid) == ("started", None)
    assert tracker.due(T0 + 10_000) == []
    # flair arriving after the job started is not used
    assert tracker.on_series(*_series(files["flair"]), now=T0 + 200) == []


def test_optional_role_with_wait_seconds_waits_that_long(
    tmp_path: Path, isles: tuple[str, dict[str, list[Path]]]
) -> None:
    """``inputs.roles[].wait_seconds``: the job waits for the optional role, at most that long."""
    study_uid, files = isles
    card = _card({"name": "flair", "required": False, "wait_seconds": 30})
    store = Store(tmp_path / "aenode.db")
    cards = {"stroke": card}
    tracker = StudyTracker(
        store,
        _rules(STROKE, HIPPO),
        role_requirements(cards),
        timeout=120.0,
        waits=role_waits(cards),
    )
    assert tracker.on_series(*_series(files["dwi"]), now=T0) == []
    assert tracker.on_series(*_series(files["adc"]), now=T0 + 5) == []
    assert tracker.due(T0 + 5 + 29) == []  # still within wait_seconds
    jobs = tracker.due(T0 + 5 + 31)
    assert len(jobs) == 1 and sorted(jobs[0].inputs) == ["adc", "dwi"]
    assert tracker.study_state("stroke", study_uid) == ("started", None)


def test_optional_role_arriving_within_its_wait_is_used(
    tmp_path: Path, isles: tuple[str, dict[str, list[Path]]]
) -> None:
    card = _card({"name": "flair", "required": False, "wait_seconds": 30})
    cards = {"stroke": card}
    tracker = StudyTracker(
        Store(tmp_path / "aenode.db"),
        _rules(STROKE, HIPPO),
        role_requirements(cards),
        timeout=120.0,
        waits=role_waits(cards),
    )
    assert tracker.on_series(*_series(files_of(isles, "dwi")), now=T0) == []
    assert tracker.on_series(*_series(files_of(isles, "adc")), now=T0 + 5) == []
    assert tracker.due(T0 + 20) == []
    jobs = tracker.on_series(*_series(files_of(isles, "flair")), now=T0 + 20)
    assert len(jobs) == 1 and sorted(jobs[0].inputs) == ["adc", "dwi", "flair"]


def files_of(isles: tuple[str, dict[str, list[Path]]], role: str) -> list[Path]:
    return isles[1][role]


def test_wait_seconds_is_only_for_optional_roles() -> None:
    with pytest.raises(ValueError, match="wait_seconds: only for an optional role"):
        _card({"name": "flair", "required": True, "wait_seconds": 30})


def test_timeout_records_missing_required_role(
    tmp_path: Path, isles: tuple[str, dict[str, list[Path]]]
) -> None:
    study_uid, files = isles
    card = _card({"name": "flair", "required": True})
    tracker = _tracker(tmp_path, role_requirements({"stroke": card}))
    tracker.on_series(*_series(files["dwi"]), now=T0)
    tracker.on_series(*_series(files["adc"]), now=T0)
    assert tracker.due(T0 + 121) == []
    assert tracker.study_state("stroke", study_uid) == (
        "missing",
        "model stroke: required role(s) flair missing after 120 s",
    )
    assert tracker.store.execute("SELECT COUNT(*) AS n FROM jobs")[0]["n"] == 0
    # the late series still completes the study
    jobs = tracker.on_series(*_series(files["flair"]), now=T0 + 500)
    assert [sorted(j.inputs) for j in jobs] == [["adc", "dwi", "flair"]]


def test_series_rule_jobs_at_once_for_every_model_and_study(tmp_path: Path, data_dir: Path) -> None:
    tracker = _tracker(tmp_path)
    jobs = []
    for study in ("Study1", "Study2"):
        for folder in sorted((data_dir / "udacity-mr" / study).iterdir()):
            jobs += tracker.on_series(*_series(sorted(folder.iterdir())), now=T0)
    assert sorted(
        (j.model, j.inputs["image"].description, len(j.inputs["image"].files)) for j in jobs
    ) == [  # fmt: skip
        ("hippo-b", "HippoCrop", 32),
        ("hippo-b", "HippoCrop", 35),
        ("hippocampus", "HippoCrop", 32),
        ("hippocampus", "HippoCrop", 35),
    ]
    assert len({j.id for j in jobs}) == 4
    # a revision of a series is a new job; the same revision again is not
    hippo = sorted((data_dir / "udacity-mr/Study1/13_HCropVolume").iterdir())
    assert tracker.on_series(*_series(hippo), now=T0 + 1) == []
    revised = tracker.on_series(*_series(hippo, revision=1), now=T0 + 2)
    assert [j.inputs["image"].revision for j in revised] == [1, 1]
    inputs = json.loads(tracker.store.execute("SELECT inputs FROM jobs WHERE id=?",
                                              (revised[0].id,))[0]["inputs"])  # fmt: skip
    assert inputs["image"]["revision"] == 1


def _card(role: dict[str, Any]) -> ModelCard:
    return ModelCard.model_validate(
        {
            "name": "stroke",
            "version": "0",
            "task": "segmentation",
            "description": "test card",
            "intended_use": "tests",
            "inputs": {
                "modality": "MR",
                "roles": [{"name": "dwi"}, {"name": "adc"}, role],
            },
            "outputs": {},
            "runtime": {"format": "torchscript", "weights": "w.pt", "sha256": "0" * 64},
        }
    )


def test_series_fills_one_role_per_rule(
    tmp_path: Path, isles: tuple[str, dict[str, list[Path]]], caplog: pytest.LogCaptureFixture
) -> None:
    _, files = isles
    loose = {
        "name": "loose",
        "models": ["m"],
        "roles": {
            "first": {"tag": "Modality", "equals": "MR"},
            "second": {"tag": "Modality", "equals": "MR"},
        },
    }
    tracker = StudyTracker(Store(tmp_path / "aenode.db"), _rules(loose), {}, timeout=120.0)
    assert tracker.on_series(*_series(files["dwi"]), now=T0) == []
    assert "series matches roles first, second of rule loose; it fills first only" in caplog.text
    # the same series again does not take the second role too
    assert tracker.on_series(*_series(files["dwi"]), now=T0 + 1) == []
    jobs = tracker.on_series(*_series(files["adc"]), now=T0 + 2)
    assert [(j.inputs["first"].description, j.inputs["second"].description) for j in jobs] == [
        ("DWI", "ADC")
    ]


def test_rule_role_names_are_checked_against_the_card() -> None:
    card = _card({"name": "flair", "required": False})
    bad = RuleSpec.model_validate(
        {
            "name": "stroke",
            "models": ["stroke"],
            "roles": {
                "dwi": {"tag": "SeriesDescription", "equals": "DWI"},
                "adc": {"tag": "SeriesDescription", "equals": "ADC"},
                "t2": {"tag": "SeriesDescription", "equals": "T2"},
            },
        }
    )
    with pytest.raises(
        ConfigError,
        match=r"selection.rules\[0\].roles.t2: model 'stroke' has no "
        r"input role 't2' \(its card's inputs.roles: dwi, adc, flair\)",
    ):
        check_rule_roles([bad], {"stroke": card})
    short = RuleSpec.model_validate(
        {"name": "s", "models": ["stroke"], "roles": {"dwi": {"tag": "Modality", "equals": "MR"}}}
    )
    with pytest.raises(ConfigError, match=r"requires role\(s\) adc that the rule does not select"):
        check_rule_roles([short], {"stroke": card})
    series_rule = RuleSpec.model_validate(
        {"name": "s", "models": ["stroke"], "series": {"tag": "Modality", "equals": "MR"}}
    )
    with pytest.raises(ConfigError, match=r"selection.rules\[0\].series: a series rule gives"):
        check_rule_roles([series_rule], {"stroke": card})
    good = RuleSpec.model_validate(
        {
            "name": "stroke",
            "models": ["stroke"],
            "roles": {
                "dwi": {"tag": "SeriesDescription", "equals": "DWI"},
                "adc": {"tag": "SeriesDescription", "equals": "ADC"},
            },
        }
    )
    check_rule_roles([good], {"stroke": card})  # flair is optional: may be left out
