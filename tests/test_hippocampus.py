"""The shipped hippocampus model on the real HippoCrop DICOM series, and its card.

Plausible volumes come from the Decathlon reference labels: over all 201 cases of
../shared/data/msd-hippocampus/labelsTr (1 mm voxels), label 1 (anterior) spans
1054-2593 mm^3 and label 2 (posterior) 993-2169 mm^3 (computed once with SimpleITK,
counting voxels per label; see DECATHLON_RANGE_MM3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from aenode.config import ModelsSettings, RuntimeSettings
from aenode.infer.registry import Registry
from aenode.infer.runtime import Runtime
from aenode.volume import build_volume_from_files

ROOT = Path(__file__).resolve().parents[1]
DECATHLON_RANGE_MM3 = {1: (1054.0, 2593.0), 2: (993.0, 2169.0)}


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load(ModelsSettings(path=ROOT / "models"))


@pytest.mark.parametrize("study", ["Study1", "Study2"])
def test_hippocrop_series_gets_both_labels_with_plausible_volumes(
    registry: Registry, data_dir: Path, study: str
) -> None:
    folder = next((data_dir / "udacity-mr" / study).glob("*HCropVolume"))
    volume = build_volume_from_files(sorted(folder.glob("*.dcm")))
    assert volume.series.description == "HippoCrop"
    with Runtime(registry, RuntimeSettings(device="cpu", threads=2)) as runtime:
        pred = runtime.predict("hippocampus", {"image": volume})
    assert pred.labels is not None
    labels = sitk.GetArrayFromImage(pred.labels)
    voxel_mm3 = float(np.prod(volume.image.GetSpacing()))
    for value, (low, high) in DECATHLON_RANGE_MM3.items():
        mm3 = float((labels == value).sum()) * voxel_mm3
        assert low <= mm3 <= high, f"{study}: label {value} volume {mm3} mm3 outside {low}-{high}"

    # the anterior part lies anterior (-P in LPS) of the posterior part
    def centroid_p(value: int) -> float:
        z, y, x = np.nonzero(labels == value)
        index = [float(x.mean()), float(y.mean()), float(z.mean())]
        return volume.image.TransformContinuousIndexToPhysicalPoint(index)[1]

    assert centroid_p(1) < centroid_p(2)


def test_card_records_split_metrics_and_small_weights(registry: Registry) -> None:
    model = registry.get("hippocampus")
    card = model.card
    training = card.training
    val, train = set(training["validation_cases"]), set(training["train_cases"])
    assert len(val) == 40 and len(train) == 161 and not val & train
    assert training["seed"] == 0
    metrics = card.metrics["validation"]
    for key in ("anterior", "posterior", "mean"):
        lo, hi = metrics[key]["ci95"]
        assert lo <= metrics[key]["dice"] <= hi
    assert metrics["n"] == 40
    assert len(card.metrics["validation_cases"]) == 40
    assert (model.path / card.runtime.weights).stat().st_size < 20e6
    assert card.runtime.flip_tta and card.inputs.preprocessing.orientation == "RAS"
