"""Recipe ``hippocampus``: the shipped 3D MONAI U-Net for anterior/posterior hippocampus.

Ported from the first release's trainer with the same network and arguments, the same
preprocessing (the runtime's :func:`aenode.infer.preprocess.prepare`: RAS, 1 mm, z-score) and
the same seeded split (40 validation cases), so that ``train("hippocampus", ...)`` rebuilds the
model that ``models/hippocampus/model.yaml`` describes. Augmentation is now MONAI's: random
placement in the 48x64x48 box, flips, rotation and scaling, intensity scale/shift, gamma and
noise, then a 40x56x40 training window.
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

from aenode.infer.cards import PreprocessSpec, RuntimeSpec
from aenode.infer.forward import predict_probs
from aenode.infer.preprocess import prepare
from aenode.infer.zoo import build_network
from aenode.metrics import dice
from aenode.train.cases import paired_cases, split_names
from aenode.train.loop import Recipe

__all__ = ["ARCH", "ARCH_ARGS", "PAD_TO", "RECIPE", "VALIDATION_CASES", "case_names", "split_cases"]

log = logging.getLogger(__name__)

VALIDATION_CASES = 40
LABELS = {1: "anterior", 2: "posterior"}
PAD_TO = [48, 64, 48]  # (x, y, z): covers the largest Decathlon crop (41, 59, 47)
TRAIN_CROP = [40, 56, 40]  # (x, y, z) training window, divisible by the net's 8
ARCH = "monai.UNet"
ARCH_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [24, 48, 96, 192],
    "strides": [2, 2, 2],
    "num_res_units": 2,
    "norm": "instance",
}
PREPROCESS = PreprocessSpec(target_spacing=[1.0, 1.0, 1.0], orientation="RAS", intensity="zscore")
BATCH = 4


def case_names(data: Path) -> list[str]:
    """Cases with both an image and a label (more than :data:`VALIDATION_CASES`).

    Parameters
    ----------
    data : pathlib.Path
        Decathlon Task04 folder (``imagesTr``, ``labelsTr``).

    Returns
    -------
    list of str
        Sorted names without ``.nii.gz``.

    Raises
    ------
    FileNotFoundError
        If a folder is missing, a label is missing or there are too few cases.
    """
    return paired_cases(data, more_than=VALIDATION_CASES)


def split_cases(
    names: Sequence[str], seed: int, n_val: int = VALIDATION_CASES
) -> tuple[list[str], list[str]]:
    """The seeded split of the shipped model (:func:`aenode.train.cases.split_names`).

    Parameters
    ----------
    names : sequence of str
        All case names.
    seed : int
        Seed of the permutation.
    n_val : int
        Number of validation cases.

    Returns
    -------
    tuple of list of str
        (training names, validation names), each sorted.
    """
    return split_names(names, seed, n_val)


@dataclass
class _Case:
    name: str
    image: np.ndarray  # (z, y, x) float32, RAS, 1 mm, z-scored, unpadded
    label: np.ndarray  # (z, y, x) int64


def _load(data: Path, name: str) -> _Case:
    img = sitk.ReadImage(str(data / "imagesTr" / f"{name}.nii.gz"))
    lab = sitk.DICOMOrient(sitk.ReadImage(str(data / "labelsTr" / f"{name}.nii.gz")), "RAS")
    prep = prepare(img, PREPROCESS)
    label = sitk.GetArrayFromImage(lab).astype(np.int64)
    if label.shape != prep.array.shape:
        raise ValueError(f"{name}: label shape {label.shape} differs from image {prep.array.shape}")
    return _Case(name, prep.array, label)


def _transforms(seed: int) -> Any:
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropd,
        ResizeWithPadOrCropd,
    )

    keys = ["image", "label"]
    box = list(reversed(PAD_TO))  # (z, y, x)
    t = Compose(
        [
            ResizeWithPadOrCropd(keys, spatial_size=box),
            RandFlipd(keys, prob=0.5, spatial_axis=2),  # x (left-right)
            RandFlipd(keys, prob=0.5, spatial_axis=0),  # z
            RandAffined(
                keys,
                prob=0.5,
                rotate_range=(0.26, 0.26, 0.26),
                scale_range=(0.15, 0.15, 0.15),
                translate_range=(3, 3, 3),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd("image", factors=0.15, prob=1.0),
            RandShiftIntensityd("image", offsets=0.15, prob=1.0),
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
            RandGaussianNoised("image", prob=0.2, std=0.1),
            RandSpatialCropd(keys, roi_size=list(reversed(TRAIN_CROP)), random_size=False),
        ]
    )
    t.set_random_state(seed=seed)
    return t


def _collate(items: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([torch.as_tensor(np.asarray(i["image"]), dtype=torch.float32) for i in items])
    y = torch.stack([torch.as_tensor(np.asarray(i["label"])).long() for i in items])
    return x, y


def _loader(data: Path, names: Sequence[str], seed: int) -> DataLoader[Any]:
    from monai.data import Dataset

    cases = [_load(data, n) for n in names]
    items = [{"image": c.image[None], "label": c.label[None]} for c in cases]
    ds = Dataset(items, transform=_transforms(seed))
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=BATCH, shuffle=True, generator=gen, collate_fn=_collate)


def _split(data: Path, seed: int) -> tuple[list[str], list[str]]:
    return split_cases(case_names(data), seed)


def _validation(data: Path, names: Sequence[str]) -> list[_Case]:
    return [_load(data, n) for n in names]


def _validate(net: torch.nn.Module, cases: list[_Case], device: torch.device) -> dict[str, Any]:
    """Mean Dice over both labels and all cases, each case centred in the padded box."""
    spec = RuntimeSpec(
        format="state_dict", architecture=ARCH, weights=Path("model.pt"), sha256="0" * 64
    )
    box = tuple(reversed(PAD_TO))
    scores: dict[str, list[float]] = {name: [] for name in LABELS.values()}
    for c in cases:
        off = [(b - s) // 2 for s, b in zip(c.image.shape, box, strict=True)]
        sl = tuple(slice(o, o + s) for o, s in zip(off, c.image.shape, strict=True))
        x = np.zeros(box, np.float32)
        x[sl] = c.image
        probs = predict_probs(net, torch.from_numpy(x)[None, None].to(device), spec)
        pred = probs.argmax(1)[0].cpu().numpy()[sl]
        for value, name in LABELS.items():
            scores[name].append(dice(pred, c.label, value))
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    return {"metric": float(np.mean(list(means.values()))), **means}


def _network() -> torch.nn.Module:
    return build_network(ARCH, ARCH_ARGS)


def _loss() -> torch.nn.Module:
    from monai.losses import DiceCELoss

    loss: torch.nn.Module = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    return loss


RECIPE = Recipe(
    name="hippocampus",
    network=_network,
    split=_split,
    loader=_loader,
    validation=_validation,
    validate=_validate,
    loss=_loss,
    lr=3e-3,
    weight_decay=1e-4,
    warmup_fraction=0.02,
    cpu_bf16=True,
)
