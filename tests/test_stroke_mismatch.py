"""stroke-mismatch (models/stroke-mismatch): the classical pipeline on the real ISLES'22 case.

Data: ``../shared/data/isles22`` sub-strokecase0009 (DWI, ADC, FLAIR NIfTI; the expert lesion
mask in DWI space, ``derivatives/``), and the same pixels as a DICOM study with made-up
headers written by ``scripts/isles_to_dicom.py``. One real case: the figures are a check
that the pipeline works, not a validation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from isles import nifti_path, write_isles_study

from aenode.volume import build_volume_from_files

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "models" / "stroke-mismatch"
Prediction = tuple[sitk.Image, dict[str, Any]]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stroke_mismatch", PACKAGE / "mismatch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["stroke_mismatch"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


mm = _load()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def volumes(data_dir: Path) -> dict[str, sitk.Image]:
    return {role: sitk.ReadImage(str(nifti_path(data_dir, role))) for role in mm.ROLES}


@pytest.fixture(scope="module")
def expert(data_dir: Path) -> np.ndarray:
    path = data_dir / "isles22/derivatives/sub-strokecase0009/ses-0001"
    mask = sitk.ReadImage(str(path / "sub-strokecase0009_ses-0001_msk.nii.gz"))
    return sitk.GetArrayFromImage(mask) > 0


@pytest.fixture(scope="module")
def baseline(volumes: dict[str, sitk.Image]) -> Prediction:
    result: Prediction = mm.analyse(volumes)
    return result


def test_core_against_the_expert_mask(
    baseline: Prediction, volumes: dict[str, sitk.Image], expert: np.ndarray
) -> None:
    labels, results = baseline
    dwi = volumes["dwi"]
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert labels.GetSize() == dwi.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), dwi.GetOrigin())
    np.testing.assert_allclose(labels.GetDirection(), dwi.GetDirection())
    core = sitk.GetArrayFromImage(labels)
    assert set(np.unique(core)) == {0, 1}
    assert results["core_ml"] == pytest.approx(core.sum() * 8 / 1000)  # 2 mm isotropic
    dice = _dice(core > 0, expert)
    inside = float(np.logical_and(core > 0, expert).sum()) / float(core.sum())
    print(f"core {results['core_ml']:.2f} mL, expert {expert.sum() * 8 / 1000:.2f} mL, "
          f"Dice {dice:.3f}, {inside:.0%} of the core inside the expert lesion")  # fmt: skip
    # Measured 0.43. The core (ADC < 620e-6) is by definition the part of the DWI lesion with
    # the lowest diffusion; the expert drew the whole DWI lesion, whose median ADC is 592e-6,
    # so half of it lies above the threshold and the Dice ceiling is far below 1. A floor of
    # 0.35 fails a unit error (Dice 0), a dropped DWI criterion (Dice ~0.1, tens of mL of
    # grey matter and artefact) or a component filter that keeps noise.
    assert dice >= 0.35
    assert inside >= 0.7  # what it calls core is mostly lesion
    assert 0.5 <= results["core_ml"] <= expert.sum() * 8 / 1000


def test_registration_residual_and_a_displaced_flair(
    baseline: Prediction, volumes: dict[str, sitk.Image]
) -> None:
    _, results = baseline
    # mutual information can only have improved from the scanner geometry
    assert results["registration_metric_final"] < results["registration_metric_start"]
    # Head masks of DWI and of the registered FLAIR: 0.971 at the scanner geometry, 0.975
    # registered, 0.888 with the FLAIR displaced 6 degrees and 10 mm. 0.95 sits between a
    # registration that worked and one a few millimetres off.
    assert results["registration_head_dice"] > 0.95
    # Displace the FLAIR (6 degrees about the DWI centre, (8, -5, 4) mm): registration must
    # recover it, from a clearly worse mutual information to the same optimum.
    dwi = sitk.Cast(volumes["dwi"], sitk.sitkFloat32)
    flair = sitk.Cast(volumes["flair"], sitk.sitkFloat32)
    move = sitk.Euler3DTransform()
    move.SetCenter(
        dwi.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in dwi.GetSize()])
    )
    move.SetRotation(0.0, 0.0, math.radians(6.0))
    move.SetTranslation((8.0, -5.0, 4.0))
    displaced = sitk.Image(flair)
    rotation = np.array(move.GetMatrix()).reshape(3, 3)
    displaced.SetDirection((rotation @ np.array(flair.GetDirection()).reshape(3, 3)).ravel())
    displaced.SetOrigin(move.TransformPoint(flair.GetOrigin()))
    head = mm._head_mask(dwi)
    recovered = mm.register_flair(displaced, dwi, head, mm.Parameters())
    assert recovered.metric_start > results["registration_metric_final"] + 0.1
    assert recovered.metric_final == pytest.approx(results["registration_metric_final"], abs=0.005)
    assert recovered.head_dice > 0.95
    assert recovered.rotation_deg == pytest.approx(6.0, abs=1.5)
    # the transform found equals the displacement after the undisplaced one, at every
    # point of the head, to well under a DWI voxel (2 mm)
    first = sitk.Euler3DTransform()
    first.SetCenter(results["registration_center"])
    first.SetParameters(results["registration_parameters"])
    points = np.argwhere(sitk.GetArrayViewFromImage(head) > 0)[::97]
    errors = [
        np.linalg.norm(
            np.subtract(
                recovered.transform.TransformPoint(x),
                move.TransformPoint(first.TransformPoint(x)),
            )
        )
        for x in (dwi.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in points)
    ]
    print(f"displaced FLAIR recovered to within {max(errors):.2f} mm (max over the head)")
    assert max(errors) < 1.0


def test_adc_units_are_detected_and_give_the_same_core(volumes: dict[str, sitk.Image]) -> None:
    params = mm.Parameters()
    dwi = sitk.Cast(volumes["dwi"], sitk.sitkFloat32)
    brain = mm.brain_mask(dwi)
    floats = sitk.Cast(volumes["adc"], sitk.sitkFloat32)  # the NIfTI: floats in 1e-3 mm^2/s
    integers = sitk.Cast(sitk.Round(floats * 1000.0), sitk.sitkInt16)  # as vendors store it
    assert mm.adc_scale(floats, brain) == (1000.0, "1e-3 mm2/s")
    assert mm.adc_scale(integers, brain) == (1.0, "1e-6 mm2/s")
    core_f = sitk.GetArrayFromImage(mm.infarct_core(dwi, floats * 1000.0, brain, params))
    core_i = sitk.GetArrayFromImage(
        mm.infarct_core(dwi, sitk.Cast(integers, sitk.sitkFloat32), brain, params)
    )
    assert core_f.sum() > 0
    assert _dice(core_f > 0, core_i > 0) > 0.98  # rounding to 1e-6 moves a voxel or two


@pytest.mark.parametrize(
    ("scale", "what"), [(0.0, "all zeros"), (1e6, "huge"), (0.01, "1e-5 units")]
)
def test_implausible_adc_is_refused(
    volumes: dict[str, sitk.Image], scale: float, what: str
) -> None:
    bad = dict(volumes, adc=sitk.Cast(volumes["adc"], sitk.sitkFloat32) * scale)
    with pytest.raises(mm.MismatchError, match=r"^ADC series 1\.2\.3: median ADC in the brain"):
        mm.analyse(bad, series={"adc": "1.2.3"})


def test_missing_or_unusable_roles_are_named(volumes: dict[str, sitk.Image]) -> None:
    without = {k: v for k, v in volumes.items() if k != "flair"}
    with pytest.raises(mm.MismatchError, match="^FLAIR: missing"):
        mm.analyse(without)
    flat = sitk.Image(volumes["dwi"].GetSize(), sitk.sitkFloat32)
    flat.CopyInformation(volumes["dwi"])
    with pytest.raises(mm.MismatchError, match="^DWI series s1: the image is constant"):
        mm.analyse(dict(volumes, dwi=flat), series={"dwi": "s1"})


def test_probability_is_bounded_monotone_and_deterministic(
    baseline: Prediction, volumes: dict[str, sitk.Image]
) -> None:
    labels, results = baseline
    params = mm.Parameters()
    ps = [mm.onset_probability(r, params) for r in np.linspace(0.0, 5.0, 101)]
    assert all(0.0 <= p <= 1.0 for p in ps)
    assert all(a > b for a, b in zip(ps, ps[1:], strict=False))
    # the two anchors the coefficients were derived from (see the card)
    assert mm.onset_probability(1.0, params) == pytest.approx(0.83, abs=0.005)
    assert mm.onset_probability(1.2, params) == pytest.approx(0.46, abs=0.005)
    rsi, p = results["rsi"], results["p_onset_lt_4_5h"]
    print(f"rSI {rsi:.3f}, P(onset < 4.5 h) {p:.3f}, mismatch {results['mismatch']}")
    assert 0.0 <= p <= 1.0
    assert p == mm.onset_probability(rsi, params)
    assert results["mismatch"] is (rsi < params.mismatch_rsi_below)
    # this core is bright on FLAIR (rSI 1.6): no mismatch, a low probability
    assert rsi > 1.3 and p < 0.2 and results["mismatch"] is False
    # deterministic: the same inputs give the same labels and results; floats to 1e-6 (rad,
    # mm, MI): the last bits of the optimiser's path differ from run to run (seen: 4e-9 rad)
    again_labels, again = mm.analyse(volumes)
    assert again.keys() == results.keys()
    for key, value in results.items():
        if key == "seconds":
            continue
        if key == "registration_head_dice":  # Otsu masks: a voxel or two of 170,000
            assert again[key] == pytest.approx(value, abs=1e-3)
        elif isinstance(value, float):
            assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
        elif isinstance(value, list):
            assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
        else:
            assert again[key] == value, key
    assert np.array_equal(
        sitk.GetArrayViewFromImage(again_labels), sitk.GetArrayViewFromImage(labels)
    )


def test_dicom_study_gives_the_same_core(
    tmp_path: Path, data_dir: Path, baseline: Prediction
) -> None:
    _, files = write_isles_study(tmp_path, data_dir)
    volumes = {role: build_volume_from_files(paths).image for role, paths in files.items()}
    labels, results = mm.analyse(volumes)
    _, reference = baseline
    assert results["adc_unit"] == "1e-6 mm2/s"  # the script stores ADC as vendors do
    assert results["core_ml"] == pytest.approx(reference["core_ml"], rel=0.05)
    assert results["rsi"] == pytest.approx(reference["rsi"], abs=0.02)
    assert results["mismatch"] == reference["mismatch"]
    # the DICOM volume is sorted along the slice normal: the NIfTI's slices come reversed
    ours = sitk.GetArrayFromImage(labels)[::-1] > 0
    theirs = sitk.GetArrayFromImage(baseline[0]) > 0
    assert _dice(ours, theirs) > 0.95


def test_card_matches_the_source(volumes: dict[str, sitk.Image]) -> None:
    card = yaml.safe_load((PACKAGE / "model.yaml").read_text())
    runtime = card["runtime"]
    assert runtime["format"] == "python"
    file, function = runtime["entry_point"].split(":")
    source = PACKAGE / file
    assert hashlib.sha256(source.read_bytes()).hexdigest() == runtime["sha256"]
    assert callable(getattr(mm, function))
    assert mm.Parameters.from_mapping(runtime["parameters"]) == mm.Parameters()
    assert [r["name"] for r in card["inputs"]["roles"]] == list(mm.ROLES)
    assert all(r["required"] for r in card["inputs"]["roles"])
    with pytest.raises(ValueError, match="unknown stroke-mismatch parameter"):
        mm.Parameters.from_mapping({"adc_core_belwo": 600})


def test_no_core_gives_no_ratio(volumes: dict[str, sitk.Image]) -> None:
    dwi = sitk.Cast(volumes["dwi"], sitk.sitkFloat32)
    brain = mm.brain_mask(dwi)
    normal = sitk.Cast(brain, sitk.sitkFloat32) * 0.0 + 800.0  # every voxel normal tissue
    core = mm.infarct_core(dwi, normal, brain, mm.Parameters())
    assert not sitk.GetArrayViewFromImage(core).any()
    identity = sitk.Euler3DTransform()
    assert mm.relative_flair_signal(dwi, core, brain, normal, identity, mm.Parameters()) == (
        None,
        0.0,
    )
