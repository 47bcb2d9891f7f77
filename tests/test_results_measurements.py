"""Measurements, key slices and display window (phase-2 Prediction fields) in the SR and page.

On the real HippoCrop series with the box mask of ``test_results``: the SR's measurement
group carries each measurement as a numeric item with its concept and unit and references
the key slices' instances; the page shows those slices in the window; dciodvfy is clean.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from test_results import CARD, HIPPO, box_mask, load_volume, prediction_for

from aenode.config import ResultsSettings
from aenode.infer.cards import ModelCard
from aenode.records import Finding, FindingCode, Job, Measurement, Prediction, Volume
from aenode.results import ResultError, write_results
from aenode.results.report import render_page
from aenode.results.sr import measurement_concept

ONSET = FindingCode("AEN-ONSET-4H5", "99AENODE", "Probability of onset < 4.5 h")


@pytest.fixture(scope="module")
def hippo(data_dir: Path) -> Volume:
    return load_volume(data_dir / HIPPO)


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.model_validate(CARD)


def _prediction(volume: Volume, key_slices: list[int], **kw: object) -> Prediction:
    pred = prediction_for(volume, box_mask(volume))
    pred.measurements = [
        Measurement("Core volume", 2.5, "ml"),
        Measurement("Relative FLAIR signal", 1.04, "{ratio}"),
        Measurement("onset < 4.5 h", 0.8, "1", code=ONSET, probability=True),
        Measurement("Bleed", 0.25, "1", probability=True),
    ]
    pred.findings = [Finding("DWI-FLAIR mismatch", 0.8, True)]
    pred.key_slices = key_slices
    for name, value in kw.items():
        setattr(pred, name, value)
    return pred


@pytest.fixture(scope="module")
def written(hippo: Volume, card: ModelCard, tmp_path_factory: pytest.TempPathFactory):
    job = Job("r", "hippocampus", hippo.series.study_uid, {"image": hippo.series}, id=3)
    pred = _prediction(hippo, [12, 20], display_window=(300.0, 600.0))
    out = tmp_path_factory.mktemp("measurements")
    return write_results(job, {"image": hippo}, pred, card, ResultsSettings(), out)


def test_measurements_are_numeric_items_with_concepts_and_units(written, hippo: Volume) -> None:
    sr = hd.sr.srread(written.files[2])
    groups = sr.content.get_image_measurement_groups()
    (group,) = [g for g in groups if g.tracking_identifier == "hippocampus measurements"]
    items = {m.name.meaning: m for m in group.get_measurements()}
    assert set(items) == {
        "Core volume",
        "Relative FLAIR signal",
        "Probability of onset < 4.5 h",
        "Probability of Bleed",
    }
    assert items["Core volume"].value == pytest.approx(2.5)
    assert items["Core volume"].unit.value == "ml"
    assert items["Relative FLAIR signal"].unit.value == "{ratio}"
    onset = items["Probability of onset < 4.5 h"]
    assert (onset.name.value, onset.name.scheme_designator) == ("AEN-ONSET-4H5", "99AENODE")
    assert (onset.value, onset.unit.value) == (pytest.approx(0.8), "1")
    assert items["Probability of Bleed"].name.scheme_designator == "99AENODE"
    # the key slices' instances are the group's source images
    referenced = sorted(img.referenced_sop_instance_uid for img in group.source_images)
    want = sorted(hippo.datasets[k].SOPInstanceUID for k in (12, 20))
    assert referenced == want
    # the finding a segmentation model decided is written too
    (finding,) = [g for g in groups if g.tracking_identifier.endswith("DWI-FLAIR mismatch")]
    assert finding.get_qualitative_evaluations()[0].value.meaning == "Present"


def test_local_concepts_are_short_and_named() -> None:
    concept = measurement_concept(Measurement("Infarct core volume (ADC < 620)", 1.0, "ml"))
    assert concept.scheme_designator == "99AENODE" and len(concept.value) <= 16
    assert concept.meaning == "Infarct core volume (ADC < 620)"


def test_probability_outside_0_1_is_refused(hippo: Volume, card: ModelCard, tmp_path) -> None:
    pred = _prediction(hippo, [12])
    pred.measurements = [Measurement("P", 1.5, "1", probability=True)]
    job = Job("r", "hippocampus", hippo.series.study_uid, {})
    with pytest.raises(ResultError, match=r"measurement 'P' is a probability but 1.5 is not in"):
        write_results(job, {"image": hippo}, pred, card, ResultsSettings(), tmp_path)


def test_page_shows_the_key_slices_in_the_window(hippo: Volume, card: ModelCard) -> None:
    volumes = {"Anterior hippocampus": 1.0, "Posterior hippocampus": 1.0}
    a = render_page(hippo, _prediction(hippo, [12]), card, volumes)
    b = render_page(hippo, _prediction(hippo, [20]), card, volumes)
    c = render_page(hippo, _prediction(hippo, [12], display_window=(100.0, 50.0)), card, volumes)
    assert a.shape == b.shape == c.shape
    assert not np.array_equal(a, b)  # a different slice is shown
    assert not np.array_equal(a, c)  # the same slice, another window


def test_page_shows_display_images_beside_the_reference(hippo: Volume, card: ModelCard) -> None:
    other = sitk.GetImageFromArray(np.zeros(sitk.GetArrayViewFromImage(hippo.image).shape))
    other.CopyInformation(hippo.image)
    volumes = {"Anterior hippocampus": 1.0, "Posterior hippocampus": 1.0}
    plain = render_page(hippo, _prediction(hippo, [12]), card, volumes)
    pred = _prediction(hippo, [12])
    pred.extra["display_images"] = {"FLAIR registered": other}
    page = render_page(hippo, pred, card, volumes)
    assert not np.array_equal(plain, page)


DCIODVFY = shutil.which("dciodvfy")


@pytest.mark.skipif(DCIODVFY is None, reason="dicom3tools dciodvfy not installed")
@pytest.mark.parametrize("index", [1, 2], ids=["report", "sr"])
def test_dciodvfy_is_clean_with_measurements(written, index: int) -> None:
    proc = subprocess.run(
        [str(DCIODVFY), "-new", str(written.files[index])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
    assert errors == []
