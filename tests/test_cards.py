"""Card helpers and preprocessing geometry: what training writes is what the runtime reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from aenode.infer.cards import ModelCard, PreprocessSpec
from aenode.infer.preprocess import (
    fit_box,
    normalize,
    pad_box,
    prepare,
    restore_labels,
    restore_probs,
)
from aenode.train.hippocampus import case_names, split_cases
from aenode.train.hippocampus_card import hippocampus_card

ROOT = Path(__file__).resolve().parents[1]


def test_hippocampus_card_codes_and_roundtrip() -> None:
    card = hippocampus_card()
    assert [(lb.value, lb.name) for lb in card.outputs.labels] == [
        (1, "Anterior hippocampus"),
        (2, "Posterior hippocampus"),
    ]
    for label in card.outputs.labels:
        assert (label.category.value, label.category.scheme) == ("91723000", "SCT")
        assert (label.type.value, label.type.meaning) == ("5366008", "Hippocampus")
    assert card.outputs.labels[0].color != card.outputs.labels[1].color
    again = ModelCard.model_validate(yaml.safe_load(yaml.safe_dump(card.model_dump(mode="json"))))
    assert again == card


def test_split_is_seeded_and_matches_the_shipped_card(data_dir: Path) -> None:
    names = case_names(data_dir / "msd-hippocampus")
    assert len(names) == 201
    train, val = split_cases(names, seed=0)
    assert (train, val) == split_cases(list(reversed(names)), seed=0)
    assert len(val) == 40 and not set(train) & set(val)
    assert split_cases(names, seed=1)[1] != val
    shipped = yaml.safe_load((ROOT / "models" / "hippocampus" / "model.yaml").read_text())
    assert shipped["training"]["validation_cases"] == val


def test_training_data_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"imagesTr: not a folder"):
        case_names(tmp_path)


def _lps_image(array: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetOrigin((10.0, -20.0, 5.0))
    img.SetSpacing((1.0, 1.0, 1.0))
    return img


def test_orientation_and_padding_map_back_exactly() -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 3, size=(7, 11, 9)).astype(np.float32)  # (z, y, x)
    image = _lps_image(array)  # DICOM-like identity direction
    spec = PreprocessSpec(orientation="RAS", intensity="none", pad_to=[16, 16, 8])
    prep = prepare(image, spec)
    assert prep.array.shape == (8, 16, 16)
    # RAS flips x and y of an LPS-direction image
    inner = prep.array[prep.crop]
    np.testing.assert_array_equal(inner, array[:, ::-1, ::-1])
    labels = np.zeros(prep.array.shape, np.uint8)
    labels[prep.crop] = inner.astype(np.uint8)
    back = restore_labels(labels, prep, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array.astype(np.uint8))
    assert back.GetOrigin() == image.GetOrigin()
    probs = np.stack([labels == 1, labels == 2]).astype(np.float32)
    p_back = restore_probs(probs, prep, image)
    np.testing.assert_array_equal(p_back[1] == 1.0, array == 2)


def test_resampling_to_target_spacing_and_back() -> None:
    array = np.zeros((10, 20, 20), np.float32)
    array[2:8, 5:15, 5:15] = 1.0
    image = _lps_image(array)
    image.SetSpacing((0.5, 0.5, 1.0))
    spec = PreprocessSpec(target_spacing=[1.0, 1.0, 1.0], intensity="none")
    prep = prepare(image, spec)
    assert prep.grid.GetSpacing() == (1.0, 1.0, 1.0)
    assert prep.array.shape == (10, 10, 10)
    back = restore_labels((prep.array > 0.5).astype(np.uint8), prep, image)
    assert back.GetSize() == image.GetSize()
    restored = sitk.GetArrayFromImage(back)
    overlap = 2 * (restored & (array > 0)).sum() / (restored.sum() + (array > 0).sum())
    assert overlap > 0.9


def test_normalize_and_pad_box() -> None:
    a = np.array([0.0, 10.0, 20.0, 30.0], np.float32)
    z = normalize(a, PreprocessSpec(intensity="zscore"))
    assert z.mean() == pytest.approx(0.0, abs=1e-6) and z.std() == pytest.approx(1.0, abs=1e-6)
    w = normalize(a, PreprocessSpec(intensity="window", window=[10.0, 20.0]))
    assert w.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert pad_box((35, 51, 35), [48, 64, 48]) == (slice(6, 41), slice(6, 57), slice(6, 41))
    assert pad_box((50, 51, 35), [48, 64, 48])[0] == slice(0, 50)
    with pytest.raises(ValueError, match=r"input volume is 2-D \(4x4\)"):
        prepare(sitk.Image([4, 4], sitk.sitkFloat32), PreprocessSpec())


def test_fit_box_pads_and_crops_to_exactly_the_size() -> None:
    # (z, y, x) shape 50, 51, 35 into pad_to (x, y, z) = (48, 64, 48)
    inside, region = fit_box((50, 51, 35), [48, 64, 48])
    assert inside == (slice(0, 48), slice(6, 57), slice(6, 41))
    assert region == (slice(1, 49), slice(0, 51), slice(0, 35))
    array = np.arange(50 * 51 * 35, dtype=np.float32).reshape(50, 51, 35)
    image = _lps_image(array)
    prep = prepare(image, PreprocessSpec(intensity="none", pad_to=[48, 64, 48]), fixed=True)
    assert prep.array.shape == (48, 64, 48) and prep.cropped
    np.testing.assert_array_equal(prep.array[:, 6:57, 6:41], array[1:49])
    back = sitk.GetArrayFromImage(restore_labels(np.ones((48, 64, 48), np.uint8), prep, image))
    assert back[1:49].all() and not back[0].any() and not back[49].any()
