"""Warm-up: a synthetic job per model at start-up, leaving nothing behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from conftest import ROOT

from aenode.config import ModelsSettings, ResultsSettings, RuntimeSettings
from aenode.infer.registry import Registry
from aenode.infer.runtime import Runtime
from aenode.volume import build_volume_from_files
from aenode.warmup import synthetic_series, warm_up


def test_synthetic_series_builds_a_1mm_axial_volume(tmp_path: Path) -> None:
    volume = build_volume_from_files(synthetic_series(tmp_path, slices=6, size=20))
    assert volume.image.GetSize() == (20, 20, 6)
    assert volume.image.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
    assert volume.image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_warm_up_runs_every_model_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    registry = Registry.load(ModelsSettings(path=ROOT / "models"))
    with Runtime(registry, RuntimeSettings(device="cpu")) as runtime:
        seconds = warm_up(registry, runtime, ResultsSettings())
    warmed = {
        n
        for n in registry.names()
        if registry.card(n).runtime.format != "python" or registry.card(n).runtime.warmup
    }
    assert set(seconds) == warmed and "hippocampus" in warmed
    assert [p for p in tmp_path.iterdir() if p.name.startswith("aenode-")] == []
