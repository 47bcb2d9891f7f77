"""``aenode evaluate`` for classifiers and multi-role models (issue 10): the labels CSV
layouts, softmax decided by the argmax, bootstrap intervals, valid JSON, the modality check
and clear errors instead of tracebacks.

Metrics are checked on constructed cases with answers worked out by hand; the model runs
are a TorchScript classifier written in the test on the real HippoCrop series.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_contract import TinyClassifier, _card, _package, _sigmoid_outputs, _softmax_outputs

from aenode import metrics
from aenode.cli import main
from aenode.config import ConfigError, Settings
from aenode.evaluate import evaluate_model, finite, read_labels_csv
from aenode.infer.cards import ModelCard

HIPPO = "udacity-mr/Study1/13_HCropVolume"


def test_classification_metrics_known_answers_with_intervals() -> None:
    scores = [0.9, 0.8, 0.3, 0.6, 0.1, 0.2]
    truth = [1, 1, 1, 0, 0, 0]
    m = metrics.classification_metrics(scores, truth, 0.5, intervals=True)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(2 / 3)
    assert m["f0.5"] == pytest.approx(2 / 3)  # precision = recall = 2/3
    assert (m["n"], m["positives"]) == (6, 3)
    for name in ("accuracy", "auc", "f0.5", "sensitivity", "specificity"):
        lo, hi = m["ci95"][name]
        assert 0 <= lo <= m[name] <= hi <= 1, name
    assert m["ci95"]["accuracy"][0] < m["ci95"]["accuracy"][1]  # resampling spreads it
    # Reproducible.
    assert metrics.classification_metrics(scores, truth, 0.5, intervals=True) == m
    # A perfect ranking: AUC and its interval are exactly 1.
    perfect = metrics.classification_metrics([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0], intervals=True)
    assert perfect["auc"] == 1.0 and perfect["ci95"]["auc"] == [1.0, 1.0]
    # The decision may come from elsewhere (a softmax argmax), not a threshold.
    argmax = metrics.classification_metrics(scores, truth, predicted=[1, 1, 1, 1, 0, 0])
    assert argmax["sensitivity"] == 1.0 and argmax["specificity"] == pytest.approx(2 / 3)


def test_undefined_metrics_are_null_with_a_reason_in_json() -> None:
    m = metrics.classification_metrics([0.7, 0.2], [1, 1], intervals=True)
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"])
    assert m["undefined"] == {
        "auc": "needs at least one positive and one negative case",
        "specificity": "no negative case",
    }
    text = json.dumps(finite(m), allow_nan=False)  # valid JSON: raises on NaN
    assert json.loads(text)["auc"] is None


def _softmax_card() -> ModelCard:
    return ModelCard.model_validate(_card("classification", _softmax_outputs()))


def test_labels_csv_layouts(tmp_path: Path) -> None:
    card = _softmax_card()
    single = tmp_path / "single.csv"
    single.write_text("case,label\na,bleed\nb,no bleed\n")
    assert read_labels_csv(single, card) == {"a": {"bleed"}, "b": {"no bleed"}}
    sigmoid = ModelCard.model_validate(_card("classification", _sigmoid_outputs()))
    multi = tmp_path / "multi.csv"
    multi.write_text("case,bleed,fracture,mass effect\na,1,0,1\nb,0,0,0\n")
    assert read_labels_csv(multi, sigmoid) == {"a": {"bleed", "mass effect"}, "b": set()}
    bad = tmp_path / "bad.csv"
    bad.write_text("case,label\na,tumour\n")
    with pytest.raises(ConfigError, match=r"bad.csv:2: label 'tumour' is not a class of model"):
        read_labels_csv(bad, card)
    cols = tmp_path / "cols.csv"
    cols.write_text("case,bleed,tumour\na,1,0\n")
    with pytest.raises(ConfigError, match=r"columns \['tumour'\] are not classes of model net"):
        read_labels_csv(cols, sigmoid)


def _setup(tmp_path: Path, data_dir: Path, card: dict, cases: dict[str, str]) -> Settings:
    torch.manual_seed(0)
    models = _package(tmp_path, card, TinyClassifier(len(card["inputs"].get("roles", [1])), 2))
    images = tmp_path / "images"
    images.mkdir()
    for case in cases:
        (images / case).symlink_to(data_dir / HIPPO, target_is_directory=True)
    (tmp_path / "labels.csv").write_text(
        "case,label\n" + "".join(f"{c},{label}\n" for c, label in cases.items())
    )
    return Settings.model_validate(
        {"models": {"path": str(models)}, "runtime": {"device": "cpu", "threads": 1}}
    )


def test_softmax_classifier_is_decided_by_argmax(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {"a": "bleed", "b": "no bleed", "c": "bleed"}
    settings = _setup(tmp_path, data_dir, _card("classification", _softmax_outputs()), cases)
    report = evaluate_model(settings, "net", tmp_path / "images", tmp_path / "labels.csv")
    assert report["head"] == "softmax" and report["n"] == 3
    for row in report["cases"]:
        top = max(row["scores"], key=row["scores"].get)
        assert row["predicted"] == [top]  # one class per case, never two
    # The same image three times: one decision, right for the cases labelled with it.
    top = report["cases"][0]["predicted"][0]
    right = sum(label == top for label in cases.values())
    assert report["accuracy"] == pytest.approx(right / 3)
    assert report["metrics"][top]["sensitivity"] == 1.0
    # The CLI's JSON is valid JSON (no NaN).
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models: {{path: {tmp_path / 'models'}}}\nruntime: {{device: cpu}}\n")
    args = ["--config", str(cfg), "evaluate", "--model", "net", "--images"]
    args += [str(tmp_path / "images"), "--labels", str(tmp_path / "labels.csv"), "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    assert out["accuracy"] == pytest.approx(right / 3)


def test_a_case_of_another_modality_is_refused(tmp_path: Path, data_dir: Path) -> None:
    card = _card("classification", _softmax_outputs())
    card["inputs"]["modality"] = "CT"
    settings = _setup(tmp_path, data_dir, card, {"a": "bleed"})
    with pytest.raises(
        ConfigError,
        match=r"case a: role image: .* is Modality MR, but model net "
        r"is for CT \(inputs.modality\)",
    ):
        evaluate_model(settings, "net", tmp_path / "images", tmp_path / "labels.csv")


def test_multi_role_model_needs_role_folders(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = _card("classification", _softmax_outputs(), roles=[{"name": "dwi"}, {"name": "adc"}])
    settings = _setup(tmp_path, data_dir, card, {"a": "bleed"})
    with pytest.raises(
        ConfigError,
        match=r"case a: required role dwi missing: no dwi/ or "
        r"dwi.nii.gz in",
    ):
        evaluate_model(settings, "net", tmp_path / "images", tmp_path / "labels.csv")
    # With <case>/<role>/ folders it runs.
    case = tmp_path / "images2" / "a"
    case.mkdir(parents=True)
    for role in ("dwi", "adc"):
        (case / role).symlink_to(data_dir / HIPPO, target_is_directory=True)
    report = evaluate_model(settings, "net", tmp_path / "images2", tmp_path / "labels.csv")
    assert report["n"] == 1 and len(report["cases"][0]["predicted"]) == 1


def test_evaluate_shows_a_progress_bar_of_the_cases(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {"a": "bleed", "b": "no bleed"}
    settings = _setup(tmp_path, data_dir, _card("classification", _softmax_outputs()), cases)
    evaluate_model(settings, "net", tmp_path / "images", tmp_path / "labels.csv", progress=True)
    err = capsys.readouterr().err
    assert "evaluate net" in err and "2/2" in err and "case" in err
    evaluate_model(settings, "net", tmp_path / "images", tmp_path / "labels.csv")
    assert "evaluate net" not in capsys.readouterr().err  # off unless asked (the CLI: a tty)
