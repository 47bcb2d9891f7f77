"""The training layer on real data: the loop, the split by patient, checkpoints, the log,
the brain-tumour preprocessing on a real DICOM FLAIR series and the shipped weights.

Data used: ../shared/data/lgg-flair (LGG Segmentation Dataset, CC BY-NC-SA 4.0),
../shared/data/udacity-mr/Study1 (FLAIR series 36459-FLAIRreg-76244),
../shared/data/msd-hippocampus (split only).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
import yaml

from aenode.train import TrainReport, choose_device, load_checkpoint, read_log, recipe, train
from aenode.train.brain_tumour import (
    ARCH_ARGS,
    RECIPE,
    load_patient,
    patient_names,
    predict_volume,
    segment,
    split_patients,
)
from aenode.train.brain_tumour_card import POSTPROCESS, evaluate_patients, load_network
from aenode.train.flair import (
    LGG_PIXEL_MM,
    MATRIX,
    from_training_grid,
    postprocess,
    scale_intensity,
    slice_scores,
    to_training_grid,
)
from aenode.train.loop import run

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "brain-tumour"
SMALL = ["TCGA_CS_4943_20000902", "TCGA_CS_4944_20010208", "TCGA_HT_7602_19951103"]
SMALL_VAL = ["TCGA_CS_5395_19981004"]


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One torch thread, as the CLI sets from config: the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lgg(data_dir: Path) -> Path:
    return data_dir / "lgg-flair"


@pytest.fixture(scope="module")
def flair_series(data_dir: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Study1's FLAIR series as (z, rows, columns) stored values, slices in position order."""
    files = sorted((data_dir / "udacity-mr" / "Study1" / "36459-FLAIRreg-76244").glob("*.dcm"))
    ds = [pydicom.dcmread(f) for f in files]
    normal = np.cross(
        np.array(ds[0].ImageOrientationPatient[:3], float),
        np.array(ds[0].ImageOrientationPatient[3:], float),
    )
    ds.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, float))))
    volume = np.stack([d.pixel_array for d in ds])
    return volume, (float(ds[0].PixelSpacing[0]), float(ds[0].PixelSpacing[1]))


def test_split_is_by_patient_seeded_and_complete(lgg: Path) -> None:
    names = patient_names(lgg)
    assert len(names) == 66
    train_names, val_names = split_patients(names, seed=0)
    assert len(val_names) == 13 and len(train_names) == 53
    assert not set(train_names) & set(val_names)
    assert sorted(train_names + val_names) == names
    assert split_patients(list(reversed(names)), seed=0) == (train_names, val_names)
    assert split_patients(names, seed=1)[1] != val_names
    assert RECIPE.split(lgg, 0) == (train_names, val_names)


def test_split_matches_the_shipped_card(lgg: Path) -> None:
    card = yaml.safe_load((MODEL / "model.yaml").read_text(encoding="utf-8"))
    train_names, val_names = split_patients(patient_names(lgg), seed=0)
    assert card["training"]["validation_patients"] == val_names
    assert card["training"]["train_patients"] == train_names


def _small_recipe() -> Any:
    return dataclasses.replace(RECIPE, split=lambda data, seed: (SMALL, SMALL_VAL))


def test_loop_trains_logs_and_checkpoints_on_real_patients(lgg: Path, tmp_path: Path) -> None:
    small = _small_recipe()
    report = run(small, lgg, tmp_path, epochs=2, device="cpu", seed=0, progress=False)
    assert isinstance(report, TrainReport)
    assert report.epochs == 2 and report.validation_names == SMALL_VAL
    assert not set(report.train_names) & set(report.validation_names)
    lines = read_log(report.log_path)
    assert [line["epoch"] for line in lines] == [1, 2]
    for line in lines:
        assert np.isfinite(line["loss"]) and line["loss"] > 0
        assert 0.0 <= line["metric"] <= 1.0
    assert report.best_path.is_file() and report.last_path.is_file()

    # the last checkpoint, reloaded, gives exactly the logged validation metric
    net = small.network()
    meta = load_checkpoint(report.last_path, net)
    assert meta["epoch"] == 2 and meta["recipe"] == "brain-tumour"
    net.eval()
    with torch.no_grad():
        again = small.validate(net, small.validation(lgg, SMALL_VAL), torch.device("cpu"))
    assert round(again["metric"], 5) == lines[-1]["metric"]

    # and it reloads to identical outputs in a second network; training changed the weights
    other = small.network()
    load_checkpoint(report.last_path, other)
    x = torch.from_numpy(load_patient(lgg, SMALL_VAL[0]).image[:4, None])
    with torch.no_grad():
        assert torch.equal(net(x), other.eval()(x))
        torch.manual_seed(0)
        fresh = small.network().eval()
        assert not torch.equal(fresh(x), net(x))
    best = torch.load(report.best_path, weights_only=True)
    assert best["metric"] == pytest.approx(report.best_metric)
    assert best["epoch"] == report.best_epoch


def test_train_by_name_rejects_bad_arguments(lgg: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown model 'lung'"):
        train("lung", lgg, tmp_path, epochs=1)
    with pytest.raises(ValueError, match="give minutes or epochs"):
        train("brain-tumour", lgg, tmp_path)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train("brain-tumour", lgg, tmp_path, epochs=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            choose_device("cuda")
    assert choose_device("cpu").type == "cpu"


def test_training_data_lands_on_the_training_matrix(lgg: Path) -> None:
    p = load_patient(lgg, SMALL_VAL[0])
    assert p.image.shape == (p.native.shape[0], MATRIX, MATRIX)
    assert p.image.dtype == np.float32 and 0.0 <= p.image.min() and p.image.max() <= 1.5
    # the mask on the training grid keeps the tumour's area (in mm2) within 5%
    area_native = p.label.sum() * LGG_PIXEL_MM**2
    area_grid = p.label_grid.sum() * (LGG_PIXEL_MM * 2) ** 2
    assert area_grid == pytest.approx(area_native, rel=0.05)


def test_flair_preprocessing_on_a_real_dicom_series(
    lgg: Path, flair_series: tuple[np.ndarray, tuple[float, float]]
) -> None:
    volume, spacing = flair_series
    assert volume.shape == (22, 512, 512) and spacing == pytest.approx((0.4297, 0.4297))
    scaled = scale_intensity(volume)
    image, grid = to_training_grid(scaled, spacing)
    assert image.shape == (22, MATRIX, MATRIX) and image.dtype == np.float32
    assert grid.resized == (128, 128) and grid.offset == (0, 0)  # 220 mm field of view
    assert 0.0 <= image.min() and image.max() <= 1.5
    # head intensities are where the training data's are (scanner units 0..4250 otherwise)
    assert volume.max() > 1000
    train_image = load_patient(lgg, SMALL[0]).image
    med_dicom = np.median(image[image > image.mean()])
    med_train = np.median(train_image[train_image > train_image.mean()])
    assert med_dicom == pytest.approx(med_train, abs=0.15)
    assert 0.2 < med_dicom < 0.8
    back = from_training_grid(image, grid)
    assert back.shape == volume.shape


def test_resampling_handles_a_different_field_of_view() -> None:
    # 300 x 200 pixels at 1.2 mm: 360 x 240 mm, wider than the training 220 mm
    yy, xx = np.mgrid[0:300, 0:200]
    disc = (((yy - 150) * 1.2) ** 2 + ((xx - 100) * 1.2) ** 2 < 50**2).astype(np.float32)
    stack = np.stack([disc, disc])
    image, grid = to_training_grid(stack, (1.2, 1.2), mode="area")
    assert image.shape == (2, MATRIX, MATRIX) and grid.offset[0] < 0  # rows cropped
    pixel = 220.0 / MATRIX
    assert (image[0] > 0.5).sum() * pixel**2 == pytest.approx(np.pi * 50**2, rel=0.05)
    back = from_training_grid(image, grid) > 0.5
    assert back.shape == (2, 300, 200)
    inter = (back[0] & (disc > 0)).sum()
    assert 2 * inter / (back[0].sum() + disc.sum()) > 0.97


def test_postprocessing_drops_specks_and_minor_components() -> None:
    probs = np.zeros((5, 64, 64), np.float32)
    probs[1:4, 10:40, 10:40] = 0.9  # the lesion: 3 x 900 px
    probs[2, 50:53, 50:53] = 0.8  # a speck: 9 px
    probs[0, 55:60, 0:5] = 0.7  # 25 px, far below 10% of the lesion
    kept = postprocess(probs, pixel_mm2=1.0, **POSTPROCESS)
    assert kept.sum() == 2700 and kept[1:4, 10:40, 10:40].all()
    scores = slice_scores(probs, kept)
    assert scores.tolist() == pytest.approx([0.0, 0.9, 0.9, 0.9, 0.0])
    assert postprocess(probs, pixel_mm2=1.0, min_size_mm2=0, keep_fraction=0).sum() == 2734


def test_shipped_weights_match_the_card() -> None:
    card = yaml.safe_load((MODEL / "model.yaml").read_text(encoding="utf-8"))
    weights = MODEL / card["runtime"]["weights"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == card["runtime"]["weights_sha256"]
    assert card["training"]["network"]["architecture_args"] == ARCH_ARGS
    assert weights.stat().st_size < 10_000_000
    assert "non-commercial" in card["intended_use"]


def test_shipped_model_reproduces_the_card_dice(lgg: Path) -> None:
    card = yaml.safe_load((MODEL / "model.yaml").read_text(encoding="utf-8"))
    rows = {r["patient"]: r for r in card["metrics"]["validation_patients"]}
    # the two smallest validation patients keep the test short
    sizes = {n: sitk.ReadImage(str(lgg / "imagesTr" / f"{n}.nii.gz")).GetSize()[2] for n in rows}
    chosen = sorted(rows, key=lambda n: (sizes[n], n))[:2]
    net = load_network(MODEL / "model.pt")
    for result in evaluate_patients(net, lgg, chosen)[True]:
        assert result.dice == pytest.approx(rows[result.name]["dice"], abs=1e-3)
    # segment() is the same path: its mask gives that Dice against the reference
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(lgg / "imagesTr" / f"{chosen[0]}.nii.gz")))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(lgg / "labelsTr" / f"{chosen[0]}.nii.gz")))
    seg = segment(net, img, (LGG_PIXEL_MM, LGG_PIXEL_MM), **POSTPROCESS)
    inter = int((seg.mask.astype(bool) & (ref > 0)).sum())
    assert 2 * inter / (seg.mask.sum() + (ref > 0).sum()) == pytest.approx(
        rows[chosen[0]]["dice"], abs=1e-3
    )
    assert seg.probabilities.shape == img.shape and seg.slice_scores.shape == (img.shape[0],)
    assert predict_volume(net, load_patient(lgg, chosen[0]).image[:2]).shape == (2, 128, 128)


def test_hippocampus_recipe_rebuilds_the_shipped_model(data_dir: Path) -> None:
    from aenode.train.hippocampus import ARCH, ARCH_ARGS, case_names, split_cases

    card = yaml.safe_load((ROOT / "models/hippocampus/model.yaml").read_text(encoding="utf-8"))
    assert (ARCH, ARCH_ARGS) == (
        card["runtime"]["architecture"],
        card["runtime"]["architecture_args"],
    )
    names = case_names(data_dir / "msd-hippocampus")
    train_names, val_names = split_cases(names, seed=0)
    assert val_names == [c["case"] for c in card["metrics"]["validation_cases"]]
    assert not set(train_names) & set(val_names)
    hip = recipe("hippocampus")
    state = torch.load(ROOT / "models/hippocampus/model.pt", weights_only=True)
    hip.network().load_state_dict(state)  # same architecture: the shipped weights fit


def test_shipped_model_on_the_study1_flair_series(
    flair_series: tuple[np.ndarray, tuple[float, float]],
) -> None:
    # no reference mask exists for Study1 (a glioblastoma patient): this pins what the model
    # answers on a real DICOM series, checked by eye against the FLAIR hyperintensity once
    volume, spacing = flair_series
    seg = segment(load_network(MODEL / "model.pt"), volume, spacing, **POSTPROCESS)
    assert seg.mask.shape == volume.shape
    ml = seg.mask.sum() * spacing[0] * spacing[1] * 5.0 / 1000.0  # SliceThickness 5 mm
    assert 40.0 < ml < 110.0
    zs, ys, xs = np.nonzero(seg.mask)
    assert xs.mean() > volume.shape[2] / 2 and ys.mean() < volume.shape[1] / 2  # one frontal side
    assert seg.slice_scores.max() > 0.9 and (seg.slice_scores >= 0.5).sum() < volume.shape[0]


def test_hippocampus_recipe_runs_in_the_loop(data_dir: Path, tmp_path: Path) -> None:
    from aenode.train.hippocampus import PAD_TO, TRAIN_CROP, case_names

    hip = recipe("hippocampus")
    names = case_names(data_dir / "msd-hippocampus")
    small = dataclasses.replace(hip, split=lambda data, seed: (names[:4], names[4:6]))
    x, y = next(iter(small.loader(data_dir / "msd-hippocampus", names[:4], 0)))
    assert tuple(x.shape) == (4, 1, *reversed(TRAIN_CROP)) and x.dtype == torch.float32
    assert tuple(y.shape) == (4, 1, *reversed(TRAIN_CROP)) and set(y.unique().tolist()) <= {0, 1, 2}
    assert max(PAD_TO) == 64
    report = run(
        small, data_dir / "msd-hippocampus", tmp_path, epochs=1, device="cpu", progress=False
    )
    (line,) = read_log(report.log_path)
    assert {"anterior", "posterior", "metric"} <= set(line) and 0.0 <= line["metric"] <= 1.0
