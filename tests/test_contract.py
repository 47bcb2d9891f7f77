"""The model contract of docs/models.md, enforced: card validation, the load-time check,
the declared output head, fixed input size, role channels and classifier results.

Networks are written here (TorchScript, seeded random weights: the contract, not accuracy,
is under test); inputs are the real HippoCrop series of ../shared/data/udacity-mr.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
import yaml
from PIL import Image

from aenode.config import ModelsSettings, ResultsSettings, RuntimeSettings
from aenode.infer.cards import ModelCard
from aenode.infer.findings import findings_for
from aenode.infer.preprocess import prepare
from aenode.infer.registry import LoadedModel, Registry, RegistryError
from aenode.infer.runtime import Runtime
from aenode.records import Job, Prediction, Volume
from aenode.results import write_results
from aenode.results.report import PAGE_SIZE
from aenode.volume import build_volume_from_files

ROOT = Path(__file__).resolve().parents[1]
HEMORRHAGE = {"value": "50960005", "scheme": "SCT", "meaning": "Hemorrhage"}
NO_BLEED = {"value": "373572006", "scheme": "SCT", "meaning": "Clinical finding absent"}


class TinyClassifier(torch.nn.Module):
    """conv -> global mean -> linear: one logit per class."""

    def __init__(self, channels: int, logits: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(channels, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=[2, 3, 4])
        return self.head(h)


class Recorder(torch.nn.Module):
    """A segmentation 'network' that records its inputs and says label 1 everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        out[:, 1] = 5.0
        return out


class ConstantSegmentation(torch.nn.Module):
    """A scriptable segmentation 'network' with a fixed number of output channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].repeat(1, self.channels, 1, 1, 1)


def _card(task: str, outputs: dict[str, Any], **inputs: Any) -> dict[str, Any]:
    return {
        "name": "net",
        "version": "0.1.0",
        "task": task,
        "description": "contract test network",
        "intended_use": "tests",
        "inputs": {
            "modality": "MR",
            "preprocessing": {"intensity": "zscore", "pad_to": [16, 16, 8]},
            **inputs,
        },
        "outputs": outputs,
        "runtime": {"format": "torchscript", "weights": "model.pt", "sha256": "0" * 64},
    }


def _softmax_outputs() -> dict[str, Any]:
    return {
        "head": "softmax",
        "classes": [{"name": "no bleed", "code": NO_BLEED}, {"name": "bleed", "code": HEMORRHAGE}],
    }


def _sigmoid_outputs() -> dict[str, Any]:
    return {
        "head": "sigmoid",
        "classes": [
            {"name": "bleed", "threshold": 0.5, "code": HEMORRHAGE},
            {"name": "fracture", "threshold": 0.1},
            {"name": "mass effect", "threshold": 0.9},
        ],
    }


def _package(root: Path, card: dict[str, Any], net: torch.nn.Module) -> Path:
    """Write ``root/models/net`` with the card and the network as TorchScript."""
    folder = root / "models" / card["name"]
    folder.mkdir(parents=True)
    torch.jit.script(net).save(str(folder / "model.pt"))
    card = {**card, "runtime": {**card["runtime"]}}
    card["runtime"]["sha256"] = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    (folder / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return folder.parent


def _load(root: Path, card: dict[str, Any], net: torch.nn.Module) -> Registry:
    return Registry.load(ModelsSettings(path=_package(root, card, net)))


@pytest.fixture(scope="module")
def hippo(data_dir: Path) -> Volume:
    folder = data_dir / "udacity-mr" / "Study1" / "13_HCropVolume"
    return build_volume_from_files(sorted(folder.glob("*.dcm")))


@pytest.fixture()
def settings() -> Iterator[RuntimeSettings]:
    yield RuntimeSettings(device="cpu", torch_threads=1)


def _expected_logits(registry: Registry, volume: Volume) -> torch.Tensor:
    card = registry.card("net")
    prep = prepare(volume.image, card.inputs.preprocessing, fixed=True)
    with torch.inference_mode():
        out: torch.Tensor = registry.get("net").network(torch.from_numpy(prep.array)[None, None])
    return out[0]


# -- the head ---------------------------------------------------------------------------------


def test_softmax_classifier_gives_one_finding(
    tmp_path: Path, hippo: Volume, settings: RuntimeSettings
) -> None:
    torch.manual_seed(0)
    registry = _load(tmp_path, _card("classification", _softmax_outputs()), TinyClassifier(1, 2))
    with Runtime(registry, settings) as rt:
        pred = rt.predict("net", {"image": hippo})
    expected = torch.softmax(_expected_logits(registry, hippo), 0).numpy()
    assert pred.class_probabilities is not None
    probs = [pred.class_probabilities["no bleed"], pred.class_probabilities["bleed"]]
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert sum(probs) == pytest.approx(1.0)
    (finding,) = pred.findings
    best = int(np.argmax(expected))
    assert finding.name == ["no bleed", "bleed"][best]
    assert finding.probability == pytest.approx(float(expected[best]), abs=1e-5)
    assert finding.present and finding.threshold is None
    assert finding.code is not None
    assert finding.code.value == [NO_BLEED, HEMORRHAGE][best]["value"]


def test_sigmoid_multilabel_gives_one_finding_per_class(
    tmp_path: Path, hippo: Volume, settings: RuntimeSettings
) -> None:
    torch.manual_seed(1)
    registry = _load(tmp_path, _card("classification", _sigmoid_outputs()), TinyClassifier(1, 3))
    with Runtime(registry, settings) as rt:
        pred = rt.predict("net", {"image": hippo})
    expected = torch.sigmoid(_expected_logits(registry, hippo)).numpy()
    assert [f.name for f in pred.findings] == ["bleed", "fracture", "mass effect"]
    for finding, p, threshold in zip(pred.findings, expected, (0.5, 0.1, 0.9), strict=True):
        assert finding.probability == pytest.approx(float(p), abs=1e-5)
        assert finding.threshold == threshold
        assert finding.present is (float(p) >= threshold)
    assert pred.findings[0].code is not None and pred.findings[0].code.value == "50960005"
    assert pred.findings[1].code is None


def test_a_tie_in_a_softmax_never_gives_present_and_absent(hippo: Volume, tmp_path: Path) -> None:
    card = ModelCard.model_validate(_card("classification", _softmax_outputs()))
    (finding,) = findings_for(card, {"no bleed": 0.5, "bleed": 0.5})
    assert (finding.name, finding.present) == ("no bleed", True)  # first in card order
    pred = Prediction("net", "0.1.0", "classification", class_probabilities={"no bleed": 0.5,
                      "bleed": 0.5})  # fmt: skip
    result = write_results(
        Job("r", "net", hippo.series.study_uid, {}), {"image": hippo}, pred, card,
        ResultsSettings(), tmp_path,
    )  # fmt: skip
    sr = hd.sr.srread(result.files[-1])
    (group,) = sr.content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name.value == NO_BLEED["value"]
    assert evaluation.value.meaning == "Present"
    values = [str(ds.ConceptCodeSequence[0].CodeMeaning) for ds in _code_items(sr)]
    assert "Absent" not in values


def _code_items(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "CODE":
            yield item
        yield from _code_items(item)


# -- the load-time check --------------------------------------------------------------------


def test_one_class_for_a_two_logit_network_stops_at_load(tmp_path: Path) -> None:
    outputs = {"head": "sigmoid", "classes": [{"name": "bleed"}]}
    with pytest.raises(
        RegistryError,
        match=r"net/model.yaml: outputs.classes: the network gives 2 output\(s\) .* for a dummy "
        r"input \[1, 1, 8, 16, 16\] but the card lists 1 class",
    ):
        _load(tmp_path, _card("classification", outputs), TinyClassifier(1, 2))


def test_a_network_that_does_not_take_the_roles_stops_at_load(tmp_path: Path) -> None:
    card = _card(
        "classification",
        _softmax_outputs(),
        roles=[{"name": "dwi"}, {"name": "adc", "required": False}],
    )
    with pytest.raises(RegistryError, match=r"inputs.roles: the network fails on a dummy input "
                       r"\[1, 2, 8, 16, 16\]"):  # fmt: skip
        _load(tmp_path, card, TinyClassifier(1, 2))


def test_segmentation_channels_are_checked_at_load(tmp_path: Path) -> None:
    label = {
        "category": {"value": "91723000", "meaning": "Anatomical Structure"},
        "type": {"value": "5366008", "meaning": "Hippocampus"},
        "color": [255, 0, 0],
    }
    outputs = {
        "labels": [
            {**label, "value": 1, "name": "a", "type_modifier": {"value": "1", "meaning": "A"}},
            {**label, "value": 2, "name": "b", "type_modifier": {"value": "2", "meaning": "B"}},
        ]
    }
    with pytest.raises(
        RegistryError,
        match=r"outputs.labels: the network gives \[1, 2, 8, 16, 16\] .* needs \[1, 3, z, y, x\]",
    ):
        _load(tmp_path, _card("segmentation", outputs), ConstantSegmentation(2))


class Downsampling(torch.nn.Module):
    """A segmentation 'network' that halves the grid (background + one label)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, ::2, ::2, ::2].repeat(1, 2, 1, 1, 1)


def test_a_segmentation_that_changes_the_grid_stops_at_load(tmp_path: Path) -> None:
    label = {
        "value": 1,
        "name": "a",
        "category": {"value": "91723000", "meaning": "Anatomical Structure"},
        "type": {"value": "5366008", "meaning": "Hippocampus"},
        "color": [255, 0, 0],
    }
    card = _card("segmentation", {"labels": [label]})
    with pytest.raises(
        RegistryError,
        match=r"inputs.preprocessing.pad_to: the network gives a \[4, 8, 8\] grid for a "
        r"\[8, 16, 16\] input \(z, y, x\)",
    ):
        _load(tmp_path, card, Downsampling())


# -- card validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preprocessing", "message"),
    [
        ({"intensity": "window", "window": [80, 0]}, r"window: lower 80 must be below upper 0"),
        ({"intensity": "window", "window": [40, 40]}, r"window: lower 40 must be below upper 40"),
        ({"intensity": "window"}, r"window: required when intensity is window"),
        ({"intensity": "zscore", "window": [0, 80]}, r"window: only used with intensity: window"),
        ({"intensity": "percentile", "percentiles": [5, 101]}, r"percentiles: need 0 <= lo < hi"),
        ({"intensity": "percentile", "percentiles": [60, 10]}, r"percentiles: need 0 <= lo < hi"),
        ({"pad_to": [16, 0, 8]}, r"pad_to: every size must be >= 1"),
        ({"pad_to": {"x": 1, "y": 2}}, r"pad_to: a mapping must have exactly the keys x, y and z"),
        ({"target_spacing": [1, 1, 0]}, r"target_spacing: every spacing must be > 0 mm"),
    ],
)
def test_preprocessing_errors_name_the_field(
    tmp_path: Path, preprocessing: dict[str, Any], message: str
) -> None:
    card = _card("classification", _softmax_outputs(), preprocessing=preprocessing)
    with pytest.raises(RegistryError, match=r"model.yaml: inputs.preprocessing." + message):
        _load(tmp_path, card, TinyClassifier(1, 2))


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"classes": [{"name": "a"}, {"name": "b"}]}, r"outputs.head: required for classif"),
        ({"head": "softmax", "classes": [{"name": "a"}]}, r"outputs.classes: a softmax head needs"),
        (
            {"head": "softmax", "classes": [{"name": "a", "threshold": 0.3}, {"name": "b"}]},
            r"outputs.classes.0.threshold: not used with head softmax",
        ),
        (
            {"head": "sigmoid", "classes": [{"name": "a"}, {"name": "a"}]},
            r"outputs.classes: duplicate class names",
        ),
        (
            {"head": "sigmoid", "classes": [{"name": "a", "code": {"value": "1"}}]},
            r"outputs.classes.0.code.meaning: Field required",
        ),
    ],
)
def test_output_errors_name_the_field(
    tmp_path: Path, outputs: dict[str, Any], message: str
) -> None:
    with pytest.raises(RegistryError, match=r"model.yaml: " + message):
        _load(tmp_path, _card("classification", outputs), TinyClassifier(1, 2))


def test_segmentation_head_and_indistinct_label_codes_are_rejected() -> None:
    card = yaml.safe_load((ROOT / "models" / "hippocampus" / "model.yaml").read_text())
    card["outputs"]["head"] = "sigmoid"
    with pytest.raises(ValueError, match=r"outputs.head: segmentation is a softmax"):
        ModelCard.model_validate(card)
    card["outputs"]["head"] = "softmax"
    ModelCard.model_validate(card)
    del card["outputs"]["labels"][1]["type_modifier"]
    card["outputs"]["labels"][0].pop("type_modifier")
    with pytest.raises(ValueError, match=r"outputs.labels: 'Anterior hippocampus' and 'Posterior "
                       r"hippocampus' have the same type code \(SCT 5366008\)"):  # fmt: skip
        ModelCard.model_validate(card)


def test_sizes_may_be_written_as_an_xyz_mapping() -> None:
    card = _card("classification", _softmax_outputs())
    card["inputs"]["preprocessing"]["pad_to"] = {"z": 8, "x": 16, "y": 12}
    assert ModelCard.model_validate(card).inputs.preprocessing.pad_to == [16, 12, 8]


# -- fixed input size and roles -------------------------------------------------------------


def _direct(card: dict[str, Any], net: torch.nn.Module) -> Registry:
    """A registry around an in-process network (so that the test can see what it got)."""
    model = ModelCard.model_validate(card)
    return Registry({"net": LoadedModel(card=model, path=Path("."), network=net)})


def test_a_volume_larger_than_pad_to_reaches_the_network_at_exactly_pad_to(
    hippo: Volume, settings: RuntimeSettings
) -> None:
    size = hippo.image.GetSize()  # (35, 51, 32) x, y, z
    assert size == (35, 51, 32)
    label = {
        "value": 1,
        "name": "everything",
        "category": {"value": "91723000", "meaning": "Anatomical Structure"},
        "type": {"value": "5366008", "meaning": "Hippocampus"},
        "color": [255, 0, 0],
    }
    card = _card("segmentation", {"labels": [label]}, preprocessing={"pad_to": [16, 64, 8]})
    net = Recorder()
    with Runtime(_direct(card, net), settings) as rt:
        pred = rt.predict("net", {"image": hippo})
    (x,) = net.seen
    assert list(x.shape) == [1, 1, 8, 64, 16]  # [B, C, z, y, x] of pad_to (16, 64, 8)
    # the centre of the volume went in: z 12..20 of 32, x 9..25 of 35; y 51 padded to 64
    source = sitk.GetArrayFromImage(hippo.image).astype(np.float32)
    inside = source[12:20, :, 9:25]
    zscored = (inside - source.mean()) / source.std()
    np.testing.assert_allclose(x[0, 0, :, 6:57, :].numpy(), zscored, atol=1e-4)
    assert float(x[0, 0, :, :6].abs().max()) == 0.0
    # and the output comes back on the full grid: label 1 exactly where the network looked
    assert pred.labels is not None and pred.labels.GetSize() == size
    labels = sitk.GetArrayFromImage(pred.labels)
    expected = np.zeros(labels.shape, np.uint8)
    expected[12:20, :, 9:25] = 1
    np.testing.assert_array_equal(labels, expected)
    assert any("centre-cropped to inputs.preprocessing.pad_to [16, 64, 8]" in n for n in pred.notes)


def test_a_missing_optional_role_is_zeros_and_the_network_is_told(
    hippo: Volume, settings: RuntimeSettings
) -> None:
    roles = [{"name": "t1"}, {"name": "flair", "required": False}]
    card = _card("classification", _sigmoid_outputs(), roles=roles, presence_channels=True)
    card["inputs"]["preprocessing"] = {"intensity": "none", "pad_to": [35, 51, 32]}
    seen: list[torch.Tensor] = []

    class Probe(TinyClassifier):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.detach().clone())
            return super().forward(x)

    registry = _direct(card, Probe(3, 3))
    assert registry.card("net").channels == 3  # t1, flair, flair present
    with Runtime(registry, settings) as rt:
        alone = rt.predict("net", {"t1": hippo})
        rt.predict("net", {"t1": hippo, "flair": hippo})
    image = sitk.GetArrayFromImage(hippo.image).astype(np.float32)
    np.testing.assert_allclose(seen[0][0, 0].numpy(), image)
    assert float(seen[0][0, 1:].abs().max()) == 0.0  # flair zeros, presence 0
    np.testing.assert_allclose(seen[1][0, 1].numpy(), image, atol=1e-3)
    assert float(seen[1][0, 2].min()) == 1.0  # presence 1
    assert any("optional role 'flair' missing" in n for n in alone.notes)


# -- classifier results -----------------------------------------------------------------------


def _classifier_results(hippo: Volume, tmp_path: Path, head: str) -> tuple[Any, Prediction]:
    outputs = _softmax_outputs() if head == "softmax" else _sigmoid_outputs()
    card = ModelCard.model_validate(_card("classification", outputs))
    probs = (
        {"no bleed": 0.17, "bleed": 0.83}
        if head == "softmax"
        else {"bleed": 0.62, "fracture": 0.05, "mass effect": 0.95}
    )
    pred = Prediction("net", "0.1.0", "classification", class_probabilities=probs)
    pred.findings = findings_for(card, probs)
    job = Job("r", "net", hippo.series.study_uid, {})
    return write_results(job, {"image": hippo}, pred, card, ResultsSettings(), tmp_path), pred


def test_the_sr_of_a_softmax_classifier_carries_the_class_code_and_probability(
    hippo: Volume, tmp_path: Path
) -> None:
    result, _ = _classifier_results(hippo, tmp_path, "softmax")
    sr = hd.sr.srread(result.files[-1])
    (group,) = sr.content.get_image_measurement_groups()
    assert (group.finding_type.value, group.finding_type.scheme_designator) == ("50960005", "SCT")
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.name.value, evaluation.value.meaning) == ("50960005", "Present")
    (probability,) = group.get_measurements()
    assert (probability.name.value, probability.name.meaning) == ("122157", "Probability")
    assert probability.value == pytest.approx(0.83)


def test_the_sr_of_a_sigmoid_classifier_has_one_group_per_class(
    hippo: Volume, tmp_path: Path
) -> None:
    result, _ = _classifier_results(hippo, tmp_path, "sigmoid")
    sr = hd.sr.srread(result.files[-1])
    groups = sr.content.get_image_measurement_groups()
    rows = [
        (
            g.finding_type.meaning,
            g.get_qualitative_evaluations()[0].value.meaning,
            g.get_measurements()[0].value,
        )
        for g in groups
    ]
    assert rows == [
        ("Hemorrhage", "Present", pytest.approx(0.62)),
        ("fracture", "Absent", pytest.approx(0.05)),
        ("mass effect", "Present", pytest.approx(0.95)),
    ]


def test_the_classifier_report_page_shows_the_input(hippo: Volume, tmp_path: Path) -> None:
    result, _ = _classifier_results(hippo, tmp_path, "softmax")
    assert result.report_png is not None
    page = np.asarray(Image.open(result.report_png).convert("L"), dtype=float)
    assert page.shape == (PAGE_SIZE[1], PAGE_SIZE[0])
    images = page[300 : PAGE_SIZE[1] - 60]  # below the findings, above the disclaimer band
    assert (images < 250).mean() > 0.1  # not a blank page: the central planes are drawn
    assert images[:, :330].std() > 20 and images[:, 330:650].std() > 20
    assert pydicom.dcmread(result.files[0]).BurnedInAnnotation == "YES"


DCIODVFY = shutil.which("dciodvfy")


@pytest.mark.skipif(DCIODVFY is None, reason="dicom3tools dciodvfy not installed")
@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_classifier_objects_pass_dciodvfy(hippo: Volume, tmp_path: Path, head: str) -> None:
    result, _ = _classifier_results(hippo, tmp_path, head)
    assert [p.name for p in result.files] == ["report.dcm", "sr.dcm"]
    for path in result.files:
        proc = subprocess.run(
            [str(DCIODVFY), "-new", str(path)], capture_output=True, text=True, timeout=60
        )
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], path.name


def test_the_example_card_of_docs_models_md_is_valid() -> None:
    text = (ROOT / "docs" / "models.md").read_text()
    example = text.split("```yaml\n")[-1].split("```")[0]
    data = yaml.safe_load(example.replace("sha256: ...", f"sha256: '{'a' * 64}'"))
    card = ModelCard.model_validate(data)
    assert card.fixed_size == [224, 224, 32] and card.outputs.head == "softmax"
    assert "(docs/models.md)" in (ROOT / "README.md").read_text()  # linked from the README
