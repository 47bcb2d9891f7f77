"""Python-format model packages (``runtime.format: python``): card, registry, runtime, CLI.

The package is written per test: a threshold "model" whose entry point keeps a ``load``
state, returns a label map, a measurement and key slices, and refuses a constant image with
an :class:`aenode.errors.InputError`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from aenode.cli import main
from aenode.config import ModelsSettings, ResultsSettings, RuntimeSettings
from aenode.infer.registry import Registry, RegistryError, module_name
from aenode.infer.runtime import InferenceError, Runtime
from aenode.records import Measurement, Prediction, SeriesInfo, Volume
from aenode.warmup import warm_up

SOURCE = textwrap.dedent(
    """
    from dataclasses import dataclass

    import numpy as np
    import SimpleITK as sitk

    from aenode.errors import InputError
    from aenode.records import Measurement, Prediction

    CALLS = []


    @dataclass
    class State:
        threshold: float
        package: str
        device: str


    def load(package, card, device):
        return State(card.runtime.parameters["threshold"], package.name, str(device))


    def predict(volumes, state, card):
        CALLS.append(state)
        image = volumes["image"].image
        array = sitk.GetArrayFromImage(image)
        if array.min() == array.max():
            raise InputError("role image: the image is constant")
        mask = (array > state.threshold).astype(np.uint8)
        labels = sitk.GetImageFromArray(mask)
        labels.CopyInformation(image)
        if card.runtime.parameters.get("bad_grid"):
            labels = sitk.GetImageFromArray(mask[:-1])
        ml = float(mask.sum()) * float(np.prod(image.GetSpacing())) / 1000
        return Prediction(
            model="", version="", task="",
            labels=labels,
            measurements=[Measurement("Bright volume", ml, "ml")],
            key_slices=[int(np.argmax(mask.sum(axis=(1, 2))))],
        )
    """
)

LABEL = {
    "value": 1,
    "name": "Bright",
    "category": {
        "value": "49755003",
        "scheme": "SCT",
        "meaning": "Morphologically Altered Structure",
    },
    "type": {"value": "55641003", "scheme": "SCT", "meaning": "Infarct"},
    "color": [255, 0, 0],
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _card(source: Path, **runtime: Any) -> dict[str, Any]:
    return {
        "name": "toy-threshold",
        "version": "0.1.0",
        "task": "segmentation",
        "description": "threshold test model",
        "intended_use": "tests only",
        "inputs": {"modality": "MR", "preprocessing": {"intensity": "none"}},
        "outputs": {"labels": [LABEL]},
        "runtime": {
            "format": "python",
            "entry_point": f"{source.name}:predict",
            "sha256": _sha(source),
            "parameters": {"threshold": 100.0},
            **runtime,
        },
    }


@pytest.fixture()
def package(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "toy-threshold"
    folder.mkdir(parents=True)
    source = folder / "toy.py"
    source.write_text(SOURCE)
    (folder / "model.yaml").write_text(yaml.safe_dump(_card(source), sort_keys=False))
    yield folder
    sys.modules.pop(module_name("toy-threshold"), None)


def _edit(package: Path, **runtime: Any) -> None:
    path = package / "model.yaml"
    data = yaml.safe_load(path.read_text())
    data["runtime"].update(runtime)
    data["runtime"] = {k: v for k, v in data["runtime"].items() if v is not None}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _load(package: Path) -> Registry:
    return Registry.load(ModelsSettings(path=package.parent))


def _volume(array: np.ndarray) -> Volume:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((2.0, 2.0, 3.0))
    image.SetOrigin((-10.0, 5.0, 7.0))
    info = SeriesInfo("1.2.3", "1.2.3.4", 0, "MR", "toy", ())
    return Volume(image=image, series=info)


def test_python_package_loads_with_its_module_and_state(package: Path) -> None:
    registry = _load(package)
    loaded = registry.get("toy-threshold")
    assert loaded.is_python and loaded.network is None
    assert sys.modules["aenode_model_toy_threshold"] is loaded.module
    assert loaded.state.threshold == 100.0
    assert (loaded.state.package, loaded.state.device) == ("toy-threshold", "cpu")


def test_entry_point_checksum_and_fields_are_checked(package: Path) -> None:
    (package / "toy.py").write_text(SOURCE + "\n# edited\n")
    with pytest.raises(RegistryError, match=r"model.yaml: runtime.sha256: does not match toy.py"):
        _load(package)
    _edit(package, entry_point=None)
    with pytest.raises(RegistryError, match=r"runtime.entry_point: required for format python"):
        _load(package)
    _edit(package, entry_point="toy.py")
    with pytest.raises(RegistryError, match=r"runtime.entry_point: String should match"):
        _load(package)
    (package / "toy.py").write_text(SOURCE)
    _edit(package, entry_point="toy.py:segment")
    with pytest.raises(
        RegistryError, match=r"runtime.entry_point: toy.py has no function 'segment'"
    ):
        _load(package)
    _edit(package, entry_point="toy.py:predict", weights="w.bin")
    with pytest.raises(
        RegistryError, match=r"runtime.weights_sha256: required when runtime.weights"
    ):
        _load(package)
    (package / "w.bin").write_bytes(b"weights")
    _edit(package, weights_sha256="0" * 64)
    with pytest.raises(RegistryError, match=r"runtime.weights_sha256: does not match w.bin"):
        _load(package)
    _edit(package, weights_sha256=_sha(package / "w.bin"))
    assert _load(package).names() == ["toy-threshold"]


def test_torch_cards_refuse_python_fields(package: Path) -> None:
    _edit(package, format="torchscript", weights="w.pt", sha256="0" * 64, parameters={"a": 1})
    with pytest.raises(RegistryError, match=r"runtime.entry_point: only used with format python"):
        _load(package)
    _edit(package, format="torchscript", weights=None, entry_point=None)
    with pytest.raises(RegistryError, match=r"runtime.weights: required for format torchscript"):
        _load(package)


def test_import_error_names_the_file(package: Path) -> None:
    (package / "toy.py").write_text("import not_a_module_here\n")
    _edit(package, sha256=_sha(package / "toy.py"))
    with pytest.raises(RegistryError, match=r"runtime.entry_point: toy.py fails to import: Module"):
        _load(package)
    assert module_name("toy-threshold") not in sys.modules


def test_runtime_runs_the_entry_point_and_checks_its_answer(package: Path) -> None:
    registry = _load(package)
    array = np.zeros((4, 8, 8))
    array[2, 2:6, 2:6] = 500.0
    with Runtime(registry, RuntimeSettings(device="cpu")) as runtime:
        prediction = runtime.predict("toy-threshold", {"image": _volume(array)})
        assert (prediction.model, prediction.version, prediction.task) == (
            "toy-threshold",
            "0.1.0",
            "segmentation",
        )
        assert prediction.reference_role == "image"
        assert sitk.GetArrayFromImage(prediction.labels).sum() == 16
        assert prediction.labels.GetOrigin() == (-10.0, 5.0, 7.0)
        assert prediction.measurements == [Measurement("Bright volume", 16 * 12 / 1000, "ml")]
        assert prediction.key_slices == [2]
        assert prediction.extra == {"device": "cpu", "batch": 1}
        assert prediction.timings["infer"] >= 0
        with pytest.raises(
            InferenceError, match=r"^model 'toy-threshold': role image: the image is constant$"
        ):
            runtime.predict("toy-threshold", {"image": _volume(np.ones((4, 8, 8)))})
        # the worker goes on after a refusal
        assert isinstance(runtime.predict("toy-threshold", {"image": _volume(array)}), Prediction)
    assert len(registry.get("toy-threshold").module.CALLS) == 3


def test_runtime_refuses_labels_off_the_reference_grid(package: Path) -> None:
    _edit(package, parameters={"threshold": 1.0, "bad_grid": True})
    registry = _load(package)
    with Runtime(registry, RuntimeSettings(device="cpu")) as runtime:
        with pytest.raises(InferenceError, match=r"labels \[8, 8, 3\] is not on the grid of role"):
            runtime.predict("toy-threshold", {"image": _volume(np.arange(256.0).reshape(4, 8, 8))})


def test_warm_up_calls_the_entry_point_unless_the_card_says_no(package: Path) -> None:
    registry = _load(package)
    with Runtime(registry, RuntimeSettings(device="cpu")) as runtime:
        seconds = warm_up(registry, runtime, ResultsSettings())
    assert set(seconds) == {"toy-threshold"}
    assert len(registry.get("toy-threshold").module.CALLS) == 1
    _edit(package, warmup=False)
    registry = _load(package)
    with Runtime(registry, RuntimeSettings(device="cpu")) as runtime:
        assert warm_up(registry, runtime, ResultsSettings()) == {}
    assert registry.get("toy-threshold").module.CALLS == []


def test_command_models_shows_the_python_format(
    package: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AENODE_MODELS__PATH", str(package.parent))
    assert main(["models", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["models"][0]
    assert (row["format"], row["entry_point"], row["weights"]) == ("python", "toy.py:predict", None)
    assert main(["models"]) == 0
    assert "toy-threshold 0.1.0  segmentation MR  [Bright]  python toy.py:predict" in (
        capsys.readouterr().out
    )
