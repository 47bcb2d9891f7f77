"""``aenode train MODEL``: one command for every recipe, from data to a package the node loads.

Real data, few cases: 42 hippocampus cases with the recipe's split cut to 2 training and 3
validation cases, and 8 LGG FLAIR patients for the brain-tumour export.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from aenode.cli import main
from aenode.config import ModelsSettings
from aenode.infer.cards import ModelCard
from aenode.infer.registry import Registry
from aenode.train import hippocampus, hippocampus_card
from aenode.train.hippocampus import case_names, split_cases

ROOT = Path(__file__).resolve().parents[1]


def _subset(src: Path, dst: Path, names: list[str]) -> Path:
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True)
        for name in names:
            (dst / sub / f"{name}.nii.gz").symlink_to(src / sub / f"{name}.nii.gz")
    return dst


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AENODE_RUNTIME__THREADS", "1")
    monkeypatch.chdir(ROOT)


def _small_split(names: Sequence[str], seed: int, n_val: int = 40) -> tuple[list[str], list[str]]:
    train_names, val_names = split_cases(names, seed, n_val)
    return train_names[:2], val_names[:3]


@pytest.mark.slow
def test_train_hippocampus_writes_a_package_the_node_loads(
    data_dir: Path,
    tmp_path: Path,
    one_thread: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the recipe's split (40 validation cases) cut to 2 + 3 cases: one CPU forward pass of
    # the 3D U-Net takes about a second, and the export runs two per validation case
    monkeypatch.setattr(hippocampus, "split_cases", _small_split)
    monkeypatch.setattr(hippocampus_card, "split_cases", _small_split)
    names = case_names(data_dir / "msd-hippocampus")[:42]
    data = _subset(data_dir / "msd-hippocampus", tmp_path / "data", names)
    out, work = tmp_path / "models" / "hippocampus", tmp_path / "run"
    args = ["train", "hippocampus", "--data", str(data), "--out", str(out), "--work", str(work)]
    assert main([*args, "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "1 epoch(s)" in printed and f"{out / 'model.yaml'}: written" in printed
    log = [json.loads(line) for line in (work / "train-log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1] and log[0]["loss"] > 0
    card = ModelCard.model_validate(yaml.safe_load((out / "model.yaml").read_text()))
    assert card.runtime.sha256 == _sha(out / "model.pt")
    train_names, val_names = _small_split(names, seed=0)
    assert card.training["validation_cases"] == val_names and len(val_names) == 3
    assert card.training["train_cases"] == train_names and card.training["epochs"] == 1
    per_case = card.metrics["validation_cases"]
    assert [row["case"] for row in per_case] == val_names
    mean = np.mean([(row["anterior"] + row["posterior"]) / 2 for row in per_case])
    assert card.metrics["validation"]["mean"]["dice"] == pytest.approx(mean, abs=1e-3)
    lo, hi = card.metrics["validation"]["mean"]["ci95"]
    assert lo <= card.metrics["validation"]["mean"]["dice"] <= hi
    # the package loads through the registry's checks (checksum, a dummy forward pass)
    registry = Registry.load(ModelsSettings(path=out.parent, enabled=["hippocampus"]))
    assert registry.names() == ["hippocampus"]
    # --export-only rewrites the package from the same checkpoint: the same weights
    first = _sha(out / "model.pt")
    assert main([*args, "--export-only"]) == 0
    assert _sha(out / "model.pt") == first


@pytest.mark.slow
def test_brain_tumour_export_fills_the_hand_written_card(
    data_dir: Path, tmp_path: Path, one_thread: None
) -> None:
    lgg = data_dir / "lgg-flair"
    patients = sorted(p.name[: -len(".nii.gz")] for p in (lgg / "imagesTr").glob("TCGA_*.nii.gz"))
    data = _subset(lgg, tmp_path / "data", patients[:8])
    out, work = tmp_path / "brain-tumour", tmp_path / "run"
    shutil.copytree(ROOT / "models" / "brain-tumour", out)
    work.mkdir()
    # a run's checkpoint and log, as the loop writes them, holding the shipped weights
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    torch.save(
        {"model": state, "epoch": 7, "metric": 0.5, "recipe": "brain-tumour"}, work / "best.pt"
    )
    (work / "train-log.jsonl").write_text(
        "".join(
            json.dumps({"epoch": e, "loss": 1.0, "metric": 0.5, "seconds": 6.0}) + "\n"
            for e in range(1, 9)
        )
    )
    before = yaml.safe_load((out / "model.yaml").read_text())
    args = ["train", "brain-tumour", "--data", str(data), "--out", str(out), "--work", str(work)]
    assert main([*args, "--export-only"]) == 0
    after = yaml.safe_load((out / "model.yaml").read_text())
    card = ModelCard.model_validate(after)
    assert card.runtime.format == "python" and (out / "tumour.py").is_file()
    assert after["runtime"]["weights_sha256"] == _sha(out / "model.pt")
    assert after["runtime"]["entry_point"] == before["runtime"]["entry_point"]
    assert after["training"]["best_epoch"] == 7 and after["training"]["epochs"] == 8
    assert after["training"]["minutes"] == pytest.approx(0.8)
    assert after["training"]["licence"] == before["training"]["licence"]  # hand-written kept
    val = after["metrics"]["validation"]
    assert val["patients"] == 2 == len(after["metrics"]["validation_patients"])
    assert after["training"]["validation_patients"] == [
        row["patient"] for row in after["metrics"]["validation_patients"]
    ]
    dices = [row["dice"] for row in after["metrics"]["validation_patients"]]
    assert val["dice_mean"]["value"] == pytest.approx(np.mean(dices), abs=1e-3)


def test_train_names_the_bad_model_and_data(
    tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--epochs", "1"]
    assert main([base[0], "lung", *base[1:]]) == 2
    assert "unknown model 'lung' (known: brain-tumour, hippocampus)" in capsys.readouterr().err
    assert main([base[0], "hippocampus", *base[1:]]) == 2
    assert f"{tmp_path / 'imagesTr'}: not a folder" in capsys.readouterr().err
