"""``aenode evaluate`` on held-out Decathlon cases reproduces the card's Dice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aenode.cli import main
from aenode.config import ConfigError, ModelsSettings
from aenode.evaluate import find_cases
from aenode.infer.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def test_evaluate_reaches_the_cards_dice(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    card = Registry.load(ModelsSettings(path=ROOT / "models")).card("hippocampus")
    per_case = {row["case"]: row for row in card.metrics["validation_cases"]}
    cases = card.training["validation_cases"][:3]
    msd = data_dir / "msd-hippocampus"
    monkeypatch.setenv("AENODE_MODELS__PATH", str(ROOT / "models"))
    monkeypatch.setenv("AENODE_RUNTIME__DEVICE", "cpu")
    argv = ["evaluate", "--model", "hippocampus", "--images", str(msd / "imagesTr")]
    argv += ["--labels", str(msd / "labelsTr"), "--cases", ",".join(cases), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "hippocampus" and report["version"] == card.version
    assert report["n"] == 3
    for row in report["cases"]:
        for label in ("anterior", "posterior"):
            assert row["dice"][label] == pytest.approx(per_case[row["case"]][label], abs=0.01)
            assert 0 < row["hd95_mm"][label] < 10
            assert row["sensitivity"][label] > 0.6 and row["specificity"][label] > 0.98
    dice = report["metrics"]["dice"]
    expected = sum(per_case[c]["anterior"] + per_case[c]["posterior"] for c in cases) / 6
    assert dice["mean"] == pytest.approx(expected, abs=0.01)
    assert set(report["metrics"]) == {
        "dice", "jaccard", "hd95_mm", "volume_error_mm3", "volume_error_pct",
        "sensitivity", "specificity",
    }  # fmt: skip


def test_find_cases_names_what_is_missing(data_dir: Path, tmp_path: Path) -> None:
    msd = data_dir / "msd-hippocampus"
    with pytest.raises(ConfigError, match=r"--cases: no image for nope in "):
        find_cases(msd / "imagesTr", msd / "labelsTr", ["nope"])
    with pytest.raises(ConfigError, match=r"--labels: no hippocampus_001.nii.gz in "):
        find_cases(msd / "imagesTr", tmp_path, ["hippocampus_001"])
    with pytest.raises(ConfigError, match=r"--images: .*missing is not a folder"):
        find_cases(tmp_path / "missing", tmp_path, None)
    pairs = find_cases(msd / "imagesTr", msd / "labelsTr", ["hippocampus_003", "hippocampus_001"])
    assert [c for c, _, _ in pairs] == ["hippocampus_001", "hippocampus_003"]
    assert pairs[0][2] == msd / "labelsTr" / "hippocampus_001.nii.gz"
