"""The registry loads the shipped package and rejects each kind of bad one, naming the field.

Bad packages are tmp copies of ``models/hippocampus`` with one thing broken.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from aenode.cli import main
from aenode.config import ModelsSettings
from aenode.infer.registry import Registry, RegistryError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "models" / "hippocampus"


@pytest.fixture()
def package(tmp_path: Path) -> Path:
    """A tmp copy of the shipped hippocampus package: ``<tmp>/models/hippocampus``."""
    dest = tmp_path / "models" / "hippocampus"
    shutil.copytree(PACKAGE, dest)
    return dest


def _edit(package: Path, change: Callable[[dict[str, Any]], None]) -> None:
    card_path = package / "model.yaml"
    data = yaml.safe_load(card_path.read_text())
    change(data)
    card_path.write_text(yaml.safe_dump(data, sort_keys=False))


def _load(package: Path) -> Registry:
    return Registry.load(ModelsSettings(path=package.parent))


def test_shipped_package_loads() -> None:
    registry = Registry.load(ModelsSettings(path=ROOT / "models", enabled=["hippocampus"]))
    assert registry.names() == ["hippocampus"]
    everything = Registry.load(ModelsSettings(path=ROOT / "models"))
    assert {"hippocampus", "brain-tumour", "stroke-mismatch"} <= set(everything.names())
    assert "head-ct-haemorrhage" in everything.names()
    assert everything.get("head-ct-haemorrhage").is_python
    card = registry.card("hippocampus")
    assert card.task == "segmentation"
    assert [label.value for label in card.outputs.labels] == [1, 2]
    assert {label.type.value for label in card.outputs.labels} == {"5366008"}
    assert card.outputs.labels[0].category.value == "91723000"
    net = registry.get("hippocampus").network
    assert not net.training
    assert all(p.dtype == torch.float32 for p in net.parameters())
    with pytest.raises(
        KeyError, match=r"model 'nope' is not loaded \(loaded: \[.*'hippocampus'.*\]\)"
    ):
        registry.get("nope")
    tumour = everything.get("brain-tumour")
    assert tumour.card.runtime.format == "python" and tumour.state is not None
    assert not tumour.state.network.training


def test_missing_weights_file(package: Path) -> None:
    (package / "model.pt").unlink()
    with pytest.raises(RegistryError, match=r"hippocampus/model.yaml: runtime.weights: file not"):
        _load(package)


def test_checksum_mismatch(package: Path) -> None:
    weights = package / "model.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(
        RegistryError,
        match=rf"model.yaml: runtime.sha256: does not match model.pt \(expected [0-9a-f]{{64}}, "
        rf"got {actual}\)",
    ):
        _load(package)


def test_bad_task(package: Path) -> None:
    _edit(package, lambda d: d.update(task="detection"))
    with pytest.raises(RegistryError, match=r"model.yaml: task: Input should be 'segmentation'"):
        _load(package)


def test_missing_label_code(package: Path) -> None:
    _edit(package, lambda d: d["outputs"]["labels"][0].pop("type"))
    with pytest.raises(RegistryError, match=r"model.yaml: outputs.labels.0.type: Field required"):
        _load(package)


def test_bad_sha256_format_and_unknown_field(package: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["runtime"]["sha256"] = "abc"
        d["colour"] = "red"

    _edit(package, change)
    with pytest.raises(RegistryError, match=r"runtime.sha256: String should.*colour: unknown"):
        _load(package)


def test_segmentation_without_labels(package: Path) -> None:
    _edit(package, lambda d: d["outputs"].update(labels=[]))
    with pytest.raises(RegistryError, match=r"outputs.labels: a segmentation model needs labels"):
        _load(package)


def test_duplicate_label_values(package: Path) -> None:
    _edit(package, lambda d: d["outputs"]["labels"][1].update(value=1))
    with pytest.raises(RegistryError, match=r"outputs.labels: duplicate label values \[1, 1\]"):
        _load(package)


def test_unknown_architecture(package: Path) -> None:
    _edit(package, lambda d: d["runtime"].update(architecture="my.Net"))
    with pytest.raises(RegistryError, match=r"runtime.architecture: unknown 'my.Net' \(known: "):
        _load(package)


def test_weights_that_do_not_fit_the_architecture(package: Path) -> None:
    _edit(package, lambda d: d["runtime"]["architecture_args"].update(channels=[8, 16, 32, 64]))
    with pytest.raises(RegistryError, match=r"runtime.weights: model.pt does not fit monai.UNet"):
        _load(package)


def test_name_differs_from_folder(package: Path) -> None:
    _edit(package, lambda d: d.update(name="hippo"))
    with pytest.raises(RegistryError, match=r"name: 'hippo' differs from the package folder"):
        _load(package)


def test_weights_outside_the_package(package: Path) -> None:
    _edit(package, lambda d: d["runtime"].update(weights="../model.pt"))
    with pytest.raises(RegistryError, match=r"runtime.weights: must be a path inside the package"):
        _load(package)


def test_invalid_yaml_and_missing_folder(package: Path, tmp_path: Path) -> None:
    (package / "model.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RegistryError, match=r"model.yaml: not valid YAML"):
        _load(package)
    with pytest.raises(RegistryError, match=r"models.path: .*nowhere is not a folder"):
        Registry.load(ModelsSettings(path=tmp_path / "nowhere"))


def test_enabled_names_a_missing_package(package: Path) -> None:
    settings = ModelsSettings(path=package.parent, enabled=["hippocampus", "lungs"])
    with pytest.raises(RegistryError, match=r"models.enabled: 'lungs' has no model.yaml"):
        Registry.load(settings)
    only = Registry.load(ModelsSettings(path=package.parent, enabled=["hippocampus"]))
    assert only.names() == ["hippocampus"]


def test_command_models_lists_and_fails(
    package: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AENODE_MODELS__PATH", str(package.parent))
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["models"]
    assert [m["name"] for m in listed] == ["hippocampus"]
    assert listed[0]["weights_mb"] < 20
    assert set(listed[0]["validation_dice"]) >= {"anterior", "posterior", "mean"}
    assert main(["models"]) == 0
    assert "hippocampus 1.0.0  segmentation MR" in capsys.readouterr().out
    (package / "model.pt").unlink()
    assert main(["models"]) == 1
    assert "runtime.weights: file not found" in capsys.readouterr().err
