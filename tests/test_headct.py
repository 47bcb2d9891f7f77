"""Head CT haemorrhage classifier: preprocessing on real CQ500 slices, the PNG loader's
refusals, the shipped weights against their card and their training predictions, and the
per-scan aggregation.

Real data: ``../shared/data/cq500-ct0`` (16 consecutive 0.625 mm slices of CQ500-CT-0, the
101st to 116th from the bottom) and ``../shared/data/head-ct-kitamura`` (the first and last
six PNGs of ``labels.csv``).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from PIL import Image

from aenode import headct
from aenode.infer.cards import ModelCard
from aenode.volume import build_volume_from_files

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "models" / "head-ct-haemorrhage"


@pytest.fixture(scope="module")
def card() -> dict:
    return yaml.safe_load((PACKAGE / "model.yaml").read_text())


def test_window_maps_hu_to_8_bit() -> None:
    hu = np.array([-1000, -1, 0, 20, 40, 60, 80, 81, 3000])
    assert headct.window_to_uint8(hu).tolist() == [0, 0, 0, 64, 128, 191, 255, 255, 255]


def test_cq500_slices_become_training_sized_brain_window_crops(data_dir: Path) -> None:
    folder = data_dir / "cq500-ct0"
    z = {
        p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
        for p in folder.glob("CT*.dcm")
        if p.name != "CT000000.dcm"  # the stray slice of another scan
    }
    files = sorted(z, key=z.__getitem__)[100:116]  # 16 consecutive slices mid-brain
    vol = build_volume_from_files(files, correct={"tilt"})
    assert vol.correction is not None and vol.correction.tilt_degrees == pytest.approx(8.5, 0.01)
    slabs = headct.slabs_from_volume(vol.image)
    per = round(headct.SLAB_MM / vol.image.GetSpacing()[2])
    assert per == 8 and len(slabs) == 2
    assert slabs[0].slices == tuple(range(8))
    oriented = sitk.DICOMOrient(vol.image, "LPS")  # kept: a view of a freed image reads garbage
    hu = sitk.GetArrayViewFromImage(oriented)[:8].astype(np.float32)
    np.testing.assert_array_equal(slabs[0].image, headct.window_to_uint8(hu.mean(axis=0)))
    # mid-brain: a closed skull ring around about 150 cm^2 of brain, so it is classified
    assert all(s.classifiable for s in slabs)
    assert 100 < slabs[0].intracranial_cm2 < 250
    img = slabs[0].image
    assert img.dtype == np.uint8
    # brain parenchyma (about 20-45 HU) sits mid-window, skull is white, air black
    centre = img[img.shape[0] // 2 - 20 : img.shape[0] // 2 + 20, 236:276]
    assert 60 < float(np.median(centre)) < 200
    assert img.max() == 255 and img.min() == 0
    x = headct.prepare_slice(img)
    assert x.shape == (headct.SIZE, headct.SIZE) == (128, 128)
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    # cropped to the head: its longer side spans the square, the padding is black
    bright = x > headct.HEAD_THRESHOLD / 255
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    span = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    assert span >= headct.SIZE - 2
    assert bright.mean() > 0.4
    # anterior up: the frontal bone is in the top rows, the image is not flipped upside down
    assert rows[0] <= 2


def test_training_pngs_prepare_the_same_way(data_dir: Path) -> None:
    img = headct.load_png(data_dir / "head-ct-kitamura" / "001.png")
    assert img.dtype == np.uint8 and img.ndim == 2
    x = headct.prepare_slice(img)
    assert x.shape == (128, 128)
    assert (x > headct.HEAD_THRESHOLD / 255).mean() > 0.4


def test_loader_accepts_grey_and_grey_as_rgb(tmp_path: Path) -> None:
    grey = (np.arange(64 * 48).reshape(64, 48) % 256).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(headct.load_png(tmp_path / "grey.png"), grey)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(headct.load_png(tmp_path / "grey_rgb.png"), grey)


def test_loader_refuses_colour(tmp_path: Path) -> None:
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200  # a red overlay
    path = tmp_path / "overlay.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(headct.HeadCTError, match=r"overlay\.png: colour image \(PIL mode RGB"):
        headct.load_png(path)
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(tmp_path / "alpha.png")
    with pytest.raises(headct.HeadCTError, match=r"alpha\.png: image with an alpha channel"):
        headct.load_png(tmp_path / "alpha.png")


def test_loader_refuses_16_bit(tmp_path: Path) -> None:
    path = tmp_path / "raw16.png"
    Image.fromarray((np.arange(1024).reshape(32, 32) * 60).astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    with pytest.raises(
        headct.HeadCTError, match=r"raw16\.png: (16|32)-bit image \(PIL mode I.*expected an 8-bit"
    ):
        headct.load_png(path)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(headct.HeadCTError, match=r"junk\.png: cannot read as an image"):
        headct.load_png(tmp_path / "junk.png")


def test_slab_guard_skips_what_training_never_showed() -> None:
    # a bone ring enclosing 40 x 40 pixels of 1 mm^2 (16 cm^2) is not classified; 100 x 100 is
    # five 1 mm slices make one 5 mm slab
    hu = np.full((5, 160, 160), -1000.0, np.float32)
    hu[:, 10:150, 10:150] = 700.0
    hu[:, 30:130, 30:130] = 30.0
    (slab,) = headct.slabs_from_volume(sitk.GetImageFromArray(hu))
    assert slab.intracranial_cm2 == pytest.approx(100.0)
    assert slab.classifiable
    hu[:, 30:130, 30:130] = 700.0
    hu[:, 60:100, 60:100] = 30.0
    (slab,) = headct.slabs_from_volume(sitk.GetImageFromArray(hu))
    assert slab.intracranial_cm2 == pytest.approx(16.0) and not slab.classifiable


def test_prepare_refuses_a_slice_without_head() -> None:
    with pytest.raises(headct.HeadCTError, match=r"slab 3: no head found"):
        headct.prepare_slice(np.zeros((64, 64), np.uint8), name="slab 3")


def test_aggregation_known_answer() -> None:
    # a bleed over three slabs (0.9, 0.8, 0.7) beats an isolated spike (0.95)
    p = [0.1, 0.2, 0.9, 0.8, 0.7, 0.1, 0.95, 0.1]
    r = headct.aggregate(p)
    assert r.probability == pytest.approx(0.8)
    assert r.key_indices == (2, 3, 4)
    assert r.smoothed[6] == pytest.approx((0.1 + 0.95 + 0.1) / 3)
    # ends use the slabs that exist; NaN slabs (no head) are skipped, indices kept
    r = headct.aggregate([0.9, 0.7, float("nan"), 0.1])
    assert r.probability == pytest.approx(0.8)
    assert r.key_indices == (0, 1)
    r = headct.aggregate([0.2, float("nan"), 0.6, 0.7])
    assert r.key_indices == (2, 3) and r.probability == pytest.approx(0.65)
    assert headct.aggregate([0.3, 0.9, 0.3], window=1).key_indices == (1,)
    with pytest.raises(ValueError, match="no slice has a probability"):
        headct.aggregate([float("nan")])
    with pytest.raises(ValueError, match="positive odd number"):
        headct.aggregate([0.5], window=2)


def test_card_shape_and_statements(card: dict) -> None:
    parsed = ModelCard.model_validate(card)
    assert parsed.task == "classification"
    assert parsed.outputs.head == "sigmoid"
    assert parsed.outputs.classes[0].name == "haemorrhage"
    assert parsed.runtime.format == "python"
    assert parsed.runtime.entry_point == "haemorrhage.py:predict"
    assert sorted(card["inputs"]["geometry"]["correct"]) == ["gaps", "tilt"]
    text = (PACKAGE / "model.yaml").read_text().lower()
    for phrase in [
        "demonstration-grade",
        "research use only",
        "not validated for clinical use",
        "licence unstated",
        "never redistributed",
    ]:
        assert phrase in text, phrase
    cv = card["metrics"]["cross_validated"]
    for name in ["auc", "accuracy", "sensitivity", "specificity"]:
        lo, hi = cv[name]["ci95"]
        assert lo <= cv[name]["value"] <= hi
    assert card["metrics"]["threshold"] == parsed.outputs.classes[0].threshold
    assert not (PACKAGE / "card-draft.yaml").exists()


def test_weights_and_entry_point_match_card_sha256(card: dict) -> None:
    weights = PACKAGE / card["runtime"]["weights"]
    assert weights.stat().st_size < 2_000_000
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == card["runtime"]["weights_sha256"]
    entry = PACKAGE / card["runtime"]["entry_point"].split(":")[0]
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == card["runtime"]["sha256"]


def test_shipped_model_reproduces_training_predictions(data_dir: Path, card: dict) -> None:
    with (PACKAGE / "predictions.csv").open(newline="") as fh:
        expected = {row["file"]: float(row["probability"]) for row in csv.DictReader(fh)}
    assert len(expected) == 160
    names = sorted(expected)[:6] + sorted(expected)[-6:]
    model = headct.load_model(PACKAGE / card["runtime"]["weights"])
    images = np.stack(
        [headct.prepare_slice(headct.load_png(data_dir / "head-ct-kitamura" / n)) for n in names]
    )
    got = headct.predict(model, images)
    np.testing.assert_allclose(got, [expected[n] for n in names], atol=1e-4)
    # the probabilities differ between images: a constant output would pass the round trip
    assert np.ptp(got) > 0.1
