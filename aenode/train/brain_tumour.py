"""Recipe ``brain-tumour``: a 2D MONAI U-Net for FLAIR abnormality on axial slices.

Data: the LGG Segmentation Dataset as ``imagesTr/<patient>.nii.gz`` and
``labelsTr/<patient>.nii.gz`` (uint8 256x256 slices, masks 0/1). Split by patient (the file
name): a seeded permutation puts ``VALIDATION_SHARE`` of the patients on the validation side,
every slice of a patient on the same side. Slices go through :mod:`aenode.train.flair` (per
volume percentile scaling, 256x256 at the assumed 0.86 mm to 128x128 at 1.72 mm), then MONAI
augmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import DataLoader

from aenode.infer.zoo import build_network
from aenode.train.cases import paired_cases, split_names
from aenode.train.flair import (
    LGG_PIXEL_MM,
    from_training_grid,
    postprocess,
    scale_intensity,
    slice_scores,
    to_training_grid,
)
from aenode.train.loop import Recipe

__all__ = [
    "ARCH",
    "ARCH_ARGS",
    "RECIPE",
    "Patient",
    "Segmentation",
    "load_patient",
    "patient_names",
    "predict_volume",
    "segment",
    "split_patients",
]

log = logging.getLogger(__name__)

ARCH = "monai.UNet"
ARCH_ARGS: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 0,
    "norm": "instance",
}
VALIDATION_SHARE = 0.2
BATCH = 16
INFER_BATCH = 32


def patient_names(data: Path) -> list[str]:
    """Patients with both an image and a label in ``data``.

    Parameters
    ----------
    data : pathlib.Path
        Folder with ``imagesTr`` and ``labelsTr``.

    Returns
    -------
    list of str
        Sorted file names without ``.nii.gz``.

    Raises
    ------
    FileNotFoundError
        If a folder is missing or an image has no label (the message names it).
    """
    return paired_cases(data)


def split_patients(
    names: Sequence[str], seed: int, share: float = VALIDATION_SHARE
) -> tuple[list[str], list[str]]:
    """A fixed seeded split by patient (:func:`aenode.train.cases.split_names`).

    Parameters
    ----------
    names : sequence of str
        Patient names.
    seed : int
        Seed of the permutation.
    share : float
        Validation share (rounded to whole patients, at least one).

    Returns
    -------
    tuple of list of str
        (training patients, validation patients), each sorted.
    """
    return split_names(names, seed, max(1, round(share * len(names))))


@dataclass
class Patient:
    """One patient's volume on the native and the training grid.

    Attributes
    ----------
    name : str
    image : numpy.ndarray
        float32 (z, 128, 128), scaled, on the training grid.
    label : numpy.ndarray
        uint8 (z, 256, 256) reference mask on the native grid.
    label_grid : numpy.ndarray
        float32 (z, 128, 128) reference mask on the training grid (0/1).
    native : numpy.ndarray
        The native (z, 256, 256) image as stored.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    label_grid: np.ndarray
    native: np.ndarray


def load_patient(data: Path, name: str) -> Patient:
    """Read one patient and bring it onto the training grid.

    Parameters
    ----------
    data : pathlib.Path
        Folder with ``imagesTr`` and ``labelsTr``.
    name : str
        Patient (file name without ``.nii.gz``).

    Returns
    -------
    Patient

    Raises
    ------
    ValueError
        If image and label shapes differ (the message names the patient).
    """
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "imagesTr" / f"{name}.nii.gz")))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / f"{name}.nii.gz")))
    if img.shape != lab.shape:
        raise ValueError(f"{name}: label shape {lab.shape} differs from image {img.shape}")
    spacing = (LGG_PIXEL_MM, LGG_PIXEL_MM)
    grid_img, _ = to_training_grid(scale_intensity(img), spacing)
    grid_lab, _ = to_training_grid((lab > 0).astype(np.float32), spacing, mode="area")
    return Patient(
        name=name,
        image=grid_img,
        label=(lab > 0).astype(np.uint8),
        label_grid=(grid_lab >= 0.5).astype(np.float32),
        native=img,
    )


def _transforms(seed: int) -> Any:
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    t = Compose(
        [
            RandFlipd(keys, prob=0.5, spatial_axis=1),  # left-right
            RandAffined(
                keys,
                prob=0.6,
                rotate_range=0.26,  # +-15 degrees
                scale_range=(0.12, 0.12),
                translate_range=(10, 10),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd("image", factors=0.15, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
            RandGaussianNoised("image", prob=0.2, std=0.03),
        ]
    )
    t.set_random_state(seed=seed)
    return t


def _collate(items: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([torch.as_tensor(np.asarray(i["image"]), dtype=torch.float32) for i in items])
    y = torch.stack([torch.as_tensor(np.asarray(i["label"]), dtype=torch.float32) for i in items])
    return x, y


def _loader(data: Path, names: Sequence[str], seed: int) -> DataLoader[Any]:
    from monai.data import Dataset

    slices: list[dict[str, np.ndarray]] = []
    for name in names:
        p = load_patient(data, name)
        for z in range(p.image.shape[0]):
            slices.append({"image": p.image[z][None], "label": p.label_grid[z][None]})
    log.info("brain-tumour: %d training slices from %d patients", len(slices), len(names))
    ds = Dataset(slices, transform=_transforms(seed))
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=BATCH, shuffle=True, generator=gen, collate_fn=_collate)


def predict_volume(
    net: torch.nn.Module, image: np.ndarray, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Sigmoid probabilities of a scaled (z, 128, 128) stack, slice by slice in batches.

    Parameters
    ----------
    net : torch.nn.Module
        The network in eval mode.
    image : numpy.ndarray
        float32 (z, 128, 128) from :func:`aenode.train.flair.to_training_grid`.
    device : torch.device or str
        Where to run.

    Returns
    -------
    numpy.ndarray
        float32 (z, 128, 128) in [0, 1].
    """
    out = []
    with torch.no_grad():
        for start in range(0, image.shape[0], INFER_BATCH):
            x = torch.from_numpy(np.ascontiguousarray(image[start : start + INFER_BATCH]))
            out.append(torch.sigmoid(net(x[:, None].to(device)).float())[:, 0].cpu().numpy())
    return np.concatenate(out).astype(np.float32)


@dataclass
class Segmentation:
    """The model's answer for one series, on the series' own grid.

    Attributes
    ----------
    probabilities : numpy.ndarray
        float32 (z, rows, columns) sigmoid probabilities.
    mask : numpy.ndarray
        uint8 (z, rows, columns) after :func:`aenode.train.flair.postprocess` (or the
        thresholded probabilities when postprocessing is off).
    slice_scores : numpy.ndarray
        (z,) tumour-presence score per slice (highest probability inside the mask).
    """

    probabilities: np.ndarray
    mask: np.ndarray
    slice_scores: np.ndarray


def segment(
    net: torch.nn.Module,
    volume: np.ndarray,
    pixel_spacing: tuple[float, float],
    *,
    device: torch.device | str = "cpu",
    postprocessing: bool = True,
    threshold: float = 0.5,
    min_size_mm2: float = 100.0,
    keep_fraction: float = 0.1,
) -> Segmentation:
    """Segment FLAIR abnormality in one axial series, slice by slice.

    Scaling, resampling to the training grid, the network, resampling back and
    postprocessing: the same path for the LGG validation patients and a DICOM series.

    Parameters
    ----------
    net : torch.nn.Module
        The brain-tumour network in eval mode.
    volume : numpy.ndarray
        (z, rows, columns) stored pixel values (any units).
    pixel_spacing : tuple of float
        (row, column) spacing in mm (DICOM ``PixelSpacing``).
    device : torch.device or str
        Where to run the network.
    postprocessing : bool
        Remove small and minor components (see :func:`aenode.train.flair.postprocess`).
    threshold, min_size_mm2, keep_fraction : float
        Postprocessing parameters, as in the card.

    Returns
    -------
    Segmentation
    """
    image, grid = to_training_grid(scale_intensity(volume), pixel_spacing)
    probs = from_training_grid(predict_volume(net, image, device), grid)
    if postprocessing:
        mask = postprocess(
            probs,
            threshold=threshold,
            min_size_mm2=min_size_mm2,
            keep_fraction=keep_fraction,
            pixel_mm2=float(pixel_spacing[0] * pixel_spacing[1]),
        )
    else:
        mask = (probs > threshold).astype(np.uint8)
    return Segmentation(probs, mask, slice_scores(probs, mask))


def _split(data: Path, seed: int) -> tuple[list[str], list[str]]:
    return split_patients(patient_names(data), seed)


def _validation(data: Path, names: Sequence[str]) -> list[Patient]:
    return [load_patient(data, n) for n in names]


def _validate(
    net: torch.nn.Module, patients: list[Patient], device: torch.device
) -> dict[str, Any]:
    """Mean per-patient Dice on the training grid (threshold 0.5, no postprocessing)."""
    scores = []
    for p in patients:
        pred = predict_volume(net, p.image, device) > 0.5
        ref = p.label_grid > 0.5
        total = int(pred.sum()) + int(ref.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total)
    return {"metric": float(np.mean(scores)), "dice_median": float(np.median(scores))}


def _network() -> torch.nn.Module:
    return build_network(ARCH, ARCH_ARGS)


def _loss() -> torch.nn.Module:
    from monai.losses import DiceCELoss

    loss: torch.nn.Module = DiceCELoss(sigmoid=True, batch=True)
    return loss


RECIPE = Recipe(
    name="brain-tumour",
    network=_network,
    split=_split,
    loader=_loader,
    validation=_validation,
    validate=_validate,
    loss=_loss,
    lr=2e-3,
    weight_decay=1e-4,
    warmup_fraction=0.03,
    cpu_bf16=True,
)
