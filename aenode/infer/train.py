"""``aenode train hippocampus``: train the shipped hippocampus segmenter on the Decathlon data.

Seeded and reproducible on CPU: the validation split, the weight initialisation and every
augmentation draw come from ``--seed``. Under a ``--minutes`` budget the learning-rate
schedule's horizon follows the machine's measured speed (the horizons are written into the
card); with a fixed ``epochs`` count (``train_hippocampus(epochs=N)``) the run is
bit-reproducible. The best checkpoint by validation Dice is kept; the card gets the split and the
per-label validation Dice with bootstrap 95% confidence intervals, measured through the
same preprocessing and forward pass the runtime uses.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import yaml

from aenode.config import ConfigError, Settings
from aenode.infer.cards import (
    Code,
    InputSpec,
    LabelSpec,
    ModelCard,
    OutputSpec,
    PreprocessSpec,
    RoleSpec,
    RuntimeSpec,
)
from aenode.infer.forward import predict_probs
from aenode.infer.preprocess import prepare, restore_labels
from aenode.infer.zoo import build_network
from aenode.metrics import bootstrap_ci, dice

__all__ = ["TrainResult", "command_train", "hippocampus_card", "split_cases", "train_hippocampus"]

log = logging.getLogger(__name__)

VALIDATION_CASES = 40
LABEL_NAMES = {1: "anterior", 2: "posterior"}
PAD_TO = [48, 64, 48]  # (x, y, z): covers the largest Decathlon crop (41, 59, 47)
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
LR = 3e-3
WEIGHT_DECAY = 1e-4
BATCH = 4
FINAL_EVAL_SECONDS = 90.0
TRAIN_CROP = [40, 56, 40]  # (x, y, z) training window, divisible by the net's 8


def hippocampus_card(runtime: RuntimeSpec | None = None) -> ModelCard:
    """The hippocampus card without training results (weights and checksum to be filled).

    Parameters
    ----------
    runtime : RuntimeSpec or None
        Runtime section to use; ``None`` gives a placeholder checksum.

    Returns
    -------
    ModelCard
        Labels coded as SCT 5366008 "Hippocampus" (CID 7140) under SCT 91723000
        "Anatomical Structure", told apart by the type modifiers SCT 255549009 "Anterior"
        and SCT 255551008 "Posterior".
    """
    category = Code(value="91723000", scheme="SCT", meaning="Anatomical Structure")
    hippocampus = Code(value="5366008", scheme="SCT", meaning="Hippocampus")
    return ModelCard(
        name="hippocampus",
        version="1.0.0",
        task="segmentation",
        description=(
            "Anterior and posterior hippocampus segmentation of a T1-weighted MR crop around "
            "one hippocampus (3D U-Net, MONAI)."
        ),
        intended_use=(
            "Research use: hippocampal volumetry on ~35x51x35 mm T1 MR crops at 1 mm such as the "
            "HippoCrop series; not for diagnosis. Whole-brain series must be cropped first."
        ),
        algorithm_family=Code(value="123110", scheme="DCM", meaning="Artificial Intelligence"),
        inputs=InputSpec(
            modality="MR",
            roles=[RoleSpec(name="image", required=True)],
            preprocessing=PreprocessSpec(
                target_spacing=[1.0, 1.0, 1.0],
                orientation="RAS",
                intensity="zscore",
                pad_to=PAD_TO,
            ),
        ),
        outputs=OutputSpec(
            labels=[
                LabelSpec(
                    value=1,
                    name="Anterior hippocampus",
                    category=category,
                    type=hippocampus,
                    type_modifier=Code(value="255549009", scheme="SCT", meaning="Anterior"),
                    color=[255, 170, 0],
                ),
                LabelSpec(
                    value=2,
                    name="Posterior hippocampus",
                    category=category,
                    type=hippocampus,
                    type_modifier=Code(value="255551008", scheme="SCT", meaning="Posterior"),
                    color=[0, 160, 255],
                ),
            ]
        ),
        runtime=runtime
        or RuntimeSpec(
            format="state_dict",
            architecture=ARCH,
            architecture_args=ARCH_ARGS,
            weights=Path("model.pt"),
            sha256="0" * 64,
            patch_size=PAD_TO,
            overlap=0.25,
            batch_size=4,
            flip_tta=True,
            flip_axes=["x", "z"],
        ),
    )


def split_cases(names: list[str], seed: int, n_val: int = VALIDATION_CASES) -> tuple[list, list]:
    """A fixed, seeded train/validation split of case names.

    Parameters
    ----------
    names : list of str
        All case names.
    seed : int
        Seed of the permutation.
    n_val : int
        Number of validation cases.

    Returns
    -------
    tuple of list
        (training names, validation names), each sorted.
    """
    order = np.random.default_rng(seed).permutation(sorted(names))
    return sorted(str(n) for n in order[n_val:]), sorted(str(n) for n in order[:n_val])


def _case_names(data: Path) -> list[str]:
    images, labels = data / "imagesTr", data / "labelsTr"
    for folder in (images, labels):
        if not folder.is_dir():
            raise ConfigError(f"--data: {folder} is not a folder (expected imagesTr and labelsTr)")
    names = sorted(p.name[: -len(".nii.gz")] for p in images.glob("[!._]*.nii.gz"))
    missing = [n for n in names if not (labels / f"{n}.nii.gz").is_file()]
    if missing:
        raise ConfigError(f"--data: no label in {labels} for {', '.join(missing[:5])}")
    if len(names) <= VALIDATION_CASES:
        raise ConfigError(f"--data: {images} has {len(names)} cases, need > {VALIDATION_CASES}")
    return names


@dataclass
class _Case:
    name: str
    image: np.ndarray  # (z, y, x) float32, oriented and normalised, unpadded
    label: np.ndarray  # (z, y, x) int64


def _load_case(data: Path, name: str, spec: PreprocessSpec) -> _Case:
    img = sitk.ReadImage(str(data / "imagesTr" / f"{name}.nii.gz"))
    lab = sitk.ReadImage(str(data / "labelsTr" / f"{name}.nii.gz"))
    unpadded = spec.model_copy(update={"pad_to": None})
    prep = prepare(img, unpadded)
    lab_o = sitk.DICOMOrient(lab, spec.orientation) if spec.orientation else lab
    label = sitk.GetArrayFromImage(lab_o).astype(np.int64)
    if label.shape != prep.array.shape:
        raise ValueError(f"{name}: label shape {label.shape} differs from image {prep.array.shape}")
    return _Case(name, prep.array, label)


def _affine_theta(rng: np.random.Generator, shape_zyx: tuple[int, int, int]) -> np.ndarray:
    ax, ay, az = rng.uniform(-math.radians(15), math.radians(15), size=3)
    cx, sx, cy, sy, cz, sz = (math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay),
                              math.cos(az), math.sin(az))  # fmt: skip
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    a = rz @ ry @ rx / rng.uniform(0.87, 1.15)
    half = np.diag([shape_zyx[2], shape_zyx[1], shape_zyx[0]]) / 2.0  # (x, y, z) of grid
    theta = np.zeros((3, 4))
    theta[:, :3] = np.linalg.inv(half) @ a @ half
    return theta


def _batch(
    cases: list[_Case], rng: np.random.Generator, box: tuple[int, int, int], augment: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(cases)
    x = np.zeros((n, 1, *box), np.float32)
    y = np.zeros((n, *box), np.int64)
    centres = []
    for i, c in enumerate(cases):
        img, lab = c.image, c.label
        if augment:
            if rng.random() < 0.5:
                img, lab = img[:, :, ::-1], lab[:, :, ::-1]
            if rng.random() < 0.5:
                img, lab = img[::-1], lab[::-1]
            off = [int(rng.integers(0, b - s + 1)) for s, b in zip(img.shape, box, strict=True)]
        else:
            off = [(b - s) // 2 for s, b in zip(img.shape, box, strict=True)]
        sz, sy, sx = (slice(o, o + s) for o, s in zip(off, img.shape, strict=True))
        x[i, 0, sz, sy, sx] = img
        y[i, sz, sy, sx] = lab
        centres.append([o + s // 2 for o, s in zip(off, img.shape, strict=True)])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if not augment:
        return xt, yt
    thetas = np.stack(
        [_affine_theta(rng, box) if rng.random() < 0.5 else np.eye(3, 4) for _ in range(n)]
    )
    if not np.allclose(thetas, np.eye(3, 4)):
        grid = F.affine_grid(torch.from_numpy(thetas).float(), list(xt.shape), align_corners=False)
        xt = F.grid_sample(xt, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        yt = F.grid_sample(yt[:, None].float(), grid, mode="nearest", align_corners=False).long()[
            :, 0
        ]
    for i in range(n):
        scale, shift = rng.uniform(0.85, 1.15), rng.uniform(-0.15, 0.15)
        xi = xt[i] * scale + shift
        if rng.random() < 0.3:
            lo, hi = xi.min(), xi.max()
            unit = (xi - lo) / (hi - lo + 1e-6)
            xi = unit ** float(rng.uniform(0.7, 1.5)) * (hi - lo) + lo
        if rng.random() < 0.2:
            noise = rng.normal(0.0, rng.uniform(0.0, 0.1), size=xi.shape).astype(np.float32)
            xi = xi + torch.from_numpy(noise)
        xt[i] = xi
    # train on a window around the case (most of the padded box is background): 1.6x faster
    crop = tuple(reversed(TRAIN_CROP))
    xs = torch.empty((n, 1, *crop), dtype=xt.dtype)
    ys = torch.empty((n, *crop), dtype=yt.dtype)
    for i, centre in enumerate(centres):
        start = [
            int(np.clip(m - w // 2 + rng.integers(-3, 4), 0, b - w))
            for m, w, b in zip(centre, crop, box, strict=True)
        ]
        sz, sy, sx = (slice(s, s + w) for s, w in zip(start, crop, strict=True))
        xs[i] = xt[i, :, sz, sy, sx]
        ys[i] = yt[i, sz, sy, sx]
    return xs, ys


def _validate(
    net: torch.nn.Module, cases: list[_Case], box: tuple[int, int, int], spec: RuntimeSpec
) -> dict[str, list[float]]:
    net.eval()
    scores: dict[str, list[float]] = {name: [] for name in LABEL_NAMES.values()}
    for start in range(0, len(cases), 8):
        chunk = cases[start : start + 8]
        x, _ = _batch(chunk, np.random.default_rng(0), box, augment=False)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        pred = predict_probs(net, x, spec).argmax(1).numpy()
        for c, p in zip(chunk, pred, strict=True):
            off = [(b - s) // 2 for s, b in zip(c.image.shape, box, strict=True)]
            sl = tuple(slice(o, o + s) for o, s in zip(off, c.image.shape, strict=True))
            for value, name in LABEL_NAMES.items():
                scores[name].append(dice(p[sl], c.label, value))
    net.train()
    return scores


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes
    ----------
    card : ModelCard
        The card written next to the weights.
    card_path, weights_path : pathlib.Path
        Where they were written.
    """

    card: ModelCard
    card_path: Path
    weights_path: Path


def _final_metrics(
    net: torch.nn.Module, data: Path, names: list[str], card: ModelCard, seed: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Dice per case and label through the runtime's path, on the original NIfTI grid."""
    net.eval()
    spec = card.inputs.preprocessing
    per_case: list[dict[str, Any]] = []
    for name in names:
        img = sitk.ReadImage(str(data / "imagesTr" / f"{name}.nii.gz"))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / f"{name}.nii.gz")))
        prep = prepare(img, spec)
        x = torch.from_numpy(prep.array)[None, None]
        probs = predict_probs(net, x, card.runtime)[0].numpy()
        labels = sitk.GetArrayFromImage(restore_labels(probs.argmax(0), prep, img))
        row: dict[str, Any] = {"case": name}
        for value, lname in LABEL_NAMES.items():
            row[lname] = round(dice(labels, ref, value), 4)
        per_case.append(row)
    metrics: dict[str, Any] = {"n": len(names)}
    for lname in [*LABEL_NAMES.values(), "mean"]:
        if lname == "mean":
            values = [np.mean([r[n] for n in LABEL_NAMES.values()]) for r in per_case]
        else:
            values = [r[lname] for r in per_case]
        lo, hi = bootstrap_ci(values, seed=seed)
        metrics[lname] = {
            "dice": round(float(np.mean(values)), 4),
            "ci95": [round(lo, 4), round(hi, 4)],
        }
    return metrics, per_case


def train_hippocampus(
    data: Path,
    out: Path,
    *,
    seed: int = 0,
    minutes: float = 28.0,
    epochs: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the hippocampus segmenter and write ``model.pt`` and ``model.yaml`` to ``out``.

    Parameters
    ----------
    data : pathlib.Path
        Decathlon Task04 folder with ``imagesTr`` and ``labelsTr``.
    out : pathlib.Path
        Package folder to write.
    seed : int
        Seed of the split, the initialisation and the augmentation.
    minutes : float
        Wall-clock budget. The cosine schedule's horizon is re-fitted to the time left after
        every epoch (recorded as ``training.epoch_horizons`` in the card).
    epochs : int or None
        Fixed number of epochs: the horizon is fixed and the run is bit-reproducible on CPU
        for a given seed, whatever the machine's speed (``minutes`` is then not enforced).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    TrainResult
        The card and the paths written.

    Raises
    ------
    aenode.config.ConfigError
        If ``data`` lacks images or labels (the message names the folder or case).
    """
    from monai.losses import DiceCELoss
    from tqdm import tqdm

    started = time.perf_counter()
    budget = minutes * 60.0
    # Threads and deterministic algorithms: process-wide, set at start-up from runtime.threads
    # and runtime.deterministic (aenode.process.apply_process_settings).
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    names = _case_names(data)
    train_names, val_names = split_cases(names, seed)
    card = hippocampus_card()
    spec = card.inputs.preprocessing
    box = tuple(reversed(PAD_TO))
    assert len(box) == 3
    train = [_load_case(data, n, spec) for n in train_names]
    val = [_load_case(data, n, spec) for n in val_names]
    plain = card.runtime.model_copy(update={"flip_tta": False, "patch_size": None})

    net = build_network(ARCH, ARCH_ARGS).to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    steps = math.ceil(len(train) / BATCH)
    total_epochs = epochs or 2
    best: dict[str, Any] = {"mean": -1.0, "epoch": 0, "state": None}
    history: list[dict[str, float]] = []
    horizons: list[int] = []
    speed = t_val = frac = 0.0
    bar = tqdm(total=total_epochs, desc="train hippocampus", unit="epoch", disable=not progress)
    epoch = 0
    while epoch < total_epochs:
        epoch += 1
        t0 = time.perf_counter()
        order = rng.permutation(len(train))
        running = 0.0
        for step in range(steps):
            if epoch == 1:  # linear warm-up over the first epoch
                lr = LR * (0.1 + 0.9 * step / steps)
            else:  # cosine from LR to ~0 over the remaining epochs
                # never backwards: a horizon that grows (the CPU got faster) holds the rate
                frac = max(frac, ((epoch - 2) * steps + step) / max(1, (total_epochs - 1) * steps))
                lr = LR * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = lr
            chunk = [train[i] for i in order[step * BATCH : (step + 1) * BATCH]]
            x, y = _batch(chunk, rng, box, augment=True)
            x = x.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # ~1.5x on AVX512-BF16 CPUs
                logits = net(x)
            loss = loss_fn(logits.float(), y[:, None])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
        t_epoch = time.perf_counter() - t0
        validate = (
            epoch == 1 or epoch >= total_epochs * 0.5 or epoch % 5 == 0 or epoch == total_epochs
        )
        entry: dict[str, float] = {"epoch": epoch, "loss": round(running / steps, 4)}
        if validate:
            t1 = time.perf_counter()
            scores = _validate(net, val, box, plain)
            t_val = time.perf_counter() - t1
            means = {k: float(np.mean(v)) for k, v in scores.items()}
            mean = float(np.mean(list(means.values())))
            entry.update({k: round(v, 4) for k, v in means.items()})
            entry["mean"] = round(mean, 4)
            if mean > best["mean"]:
                best = {"mean": mean, "epoch": epoch, "state": copy.deepcopy(net.state_dict())}
        if epochs is None:
            # Fit the schedule's horizon to the time left, at the recent speed: the cosine
            # always ends near zero inside the budget even when the shared CPU slows down.
            speed = t_epoch if epoch == 1 else 0.5 * speed + 0.5 * t_epoch
            remaining = budget - (time.perf_counter() - started) - FINAL_EVAL_SECONDS
            more = int(remaining / (speed + t_val)) if remaining > 0 else 0
            total_epochs = max(epoch + (1 if epoch == 1 else 0), epoch + more)
            horizons.append(total_epochs)
            if bar.total != total_epochs:
                bar.total = total_epochs
                bar.refresh()
        bar.update(1)
        history.append(entry)
        bar.set_postfix(loss=entry["loss"], val=entry.get("mean", "-"), best=round(best["mean"], 4))
    bar.close()

    net.load_state_dict(best["state"])
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.pt"
    torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    runtime = card.runtime.model_copy(update={"sha256": sha})
    card = hippocampus_card(runtime)
    metrics_tta, per_case = _final_metrics(net, data, val_names, card, seed)
    no_tta = card.model_copy(update={"runtime": runtime.model_copy(update={"flip_tta": False})})
    metrics_plain, _ = _final_metrics(net, data, val_names, no_tta, seed)
    card = card.model_copy(
        update={
            "training": {
                "data": "Medical Segmentation Decathlon Task04_Hippocampus imagesTr/labelsTr "
                "(201 cases, CC BY-SA 4.0), ../shared/data/msd-hippocampus",
                "command": f"aenode train hippocampus --data {data} --out {out} --seed {seed}"
                f" --minutes {minutes}",
                "seed": seed,
                "epochs": epoch,
                "epoch_horizons": horizons,
                "best_epoch": best["epoch"],
                "minutes": round((time.perf_counter() - started) / 60.0, 1),
                "device": "cpu, 2 threads",
                "optimizer": f"AdamW lr {LR} wd {WEIGHT_DECAY}, 1 warm-up epoch then cosine",
                "loss": "Dice + cross-entropy (batch Dice)",
                "batch_size": BATCH,
                "precision": "bfloat16 autocast (CPU), float32 weights",
                "train_window": TRAIN_CROP,
                "augmentation": "random placement in the 48x64x48 box, flips x/z, rotation "
                "+-15 deg and scale 0.87-1.15 (p 0.5), intensity scale/shift, gamma (p 0.3), "
                "noise (p 0.2)",
                "train_cases": train_names,
                "validation_cases": val_names,
                "history": history,
            },
            "metrics": {
                "validation": {
                    **metrics_tta,
                    "note": "validation Dice with flip TTA, on the original NIfTI grid; the "
                    "same cases chose the best epoch, so this is slightly optimistic",
                },
                "validation_without_tta": metrics_plain,
                "validation_cases": per_case,
            },
        }
    )
    card = ModelCard.model_validate(card.model_dump())
    card_path = out / "model.yaml"
    card_path.write_text(
        yaml.safe_dump(card.model_dump(mode="json", exclude_none=True), sort_keys=False),
        encoding="utf-8",
    )
    return TrainResult(card=card, card_path=card_path, weights_path=weights)


def command_train(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode train hippocampus --data DIR --out DIR [--seed N] [--minutes M]``.

    Parameters
    ----------
    args : argparse.Namespace
        ``model``, ``data``, ``out``, ``seed``, ``minutes`` (and optionally ``epochs``).
    settings : Settings
        Unused beyond the CLI's logging set-up.

    Returns
    -------
    int
        0 on success.
    """
    if args.model != "hippocampus":
        raise ConfigError(f"train: unknown model {args.model!r} (known: hippocampus)")
    result = train_hippocampus(
        args.data,
        args.out,
        seed=args.seed,
        minutes=args.minutes if args.minutes is not None else 28.0,
        epochs=getattr(args, "epochs", None),
    )
    val = result.card.metrics["validation"]
    print(
        f"{result.card_path}: validation Dice anterior {val['anterior']['dice']:.4f} "
        f"{val['anterior']['ci95']}, posterior {val['posterior']['dice']:.4f} "
        f"{val['posterior']['ci95']}, mean {val['mean']['dice']:.4f}"
    )
    return 0
