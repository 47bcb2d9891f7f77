"""The hippocampus package: its card, and ``export`` of a training run to weights + card.

The recipe (:mod:`aenode.train.hippocampus`) trains; :func:`export` takes the run's best
checkpoint, writes the weights and the full card, with per-label validation Dice and bootstrap
95% intervals measured through the same preprocessing and forward pass the runtime uses (on
the original NIfTI grid, with and without flip test-time augmentation).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import yaml

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
from aenode.metrics import bootstrap_ci, dice
from aenode.train.hippocampus import (
    ARCH,
    ARCH_ARGS,
    BATCH,
    LABELS,
    PAD_TO,
    RECIPE,
    TRAIN_CROP,
    case_names,
    split_cases,
)
from aenode.train.loop import CHECKPOINT_BEST, LOG_NAME, load_checkpoint, read_log

__all__ = ["export", "hippocampus_card"]

log = logging.getLogger(__name__)


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
        for value, lname in LABELS.items():
            row[lname] = round(dice(labels, ref, value), 4)
        per_case.append(row)
    metrics: dict[str, Any] = {"n": len(names)}
    for lname in [*LABELS.values(), "mean"]:
        if lname == "mean":
            values = [np.mean([r[n] for n in LABELS.values()]) for r in per_case]
        else:
            values = [r[lname] for r in per_case]
        lo, hi = bootstrap_ci(values, seed=seed)
        metrics[lname] = {
            "dice": round(float(np.mean(values)), 4),
            "ci95": [round(lo, 4), round(hi, 4)],
        }
    return metrics, per_case


def export(
    run_dir: Path, data: Path, model_dir: Path, *, seed: int = 0, command: str | None = None
) -> Path:
    """Write ``model.pt`` and ``model.yaml`` from a training run's best checkpoint.

    Parameters
    ----------
    run_dir : pathlib.Path
        The loop's output folder (``best.pt``, ``train-log.jsonl``).
    data : pathlib.Path
        Decathlon Task04 folder (the run's data: the split is recomputed from ``seed``).
    model_dir : pathlib.Path
        Package folder to write (``models/hippocampus``).
    seed : int
        The run's seed (split) and the bootstrap's.
    command : str or None
        The command line to record in the card.

    Returns
    -------
    pathlib.Path
        The card written.
    """
    net = RECIPE.network()
    meta = load_checkpoint(run_dir / CHECKPOINT_BEST, net)
    net.eval()
    model_dir.mkdir(parents=True, exist_ok=True)
    weights = model_dir / "model.pt"
    torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    card = hippocampus_card()
    card = hippocampus_card(card.runtime.model_copy(update={"sha256": sha}))
    train_names, val_names = split_cases(case_names(data), seed)
    with torch.no_grad():
        metrics_tta, per_case = _final_metrics(net, data, val_names, card, seed)
        no_tta = card.model_copy(
            update={"runtime": card.runtime.model_copy(update={"flip_tta": False})}
        )
        metrics_plain, _ = _final_metrics(net, data, val_names, no_tta, seed)
    history = [dict(h) for h in read_log(run_dir / LOG_NAME)]
    training: dict[str, Any] = {
        "data": "Medical Segmentation Decathlon Task04_Hippocampus imagesTr/labelsTr "
        "(201 cases, CC BY-SA 4.0), ../shared/data/msd-hippocampus",
        "command": command or f"aenode train hippocampus --data {data} --out {model_dir}",
        "loop": "aenode.train.loop.run via aenode.train.train('hippocampus', ...)",
        "seed": seed,
        "epochs": len(history),
        "best_epoch": int(meta["epoch"]),
        "minutes": round(sum(float(h.get("seconds", 0.0)) for h in history) / 60.0, 1),
        "optimizer": f"AdamW lr {RECIPE.lr} wd {RECIPE.weight_decay}, linear warm-up "
        f"({RECIPE.warmup_fraction:.0%} of the run) then cosine to 1%",
        "loss": "Dice + cross-entropy (MONAI DiceCELoss, batch Dice)",
        "batch_size": BATCH,
        "precision": "bfloat16 autocast (CPU), float32 weights",
        "train_window": TRAIN_CROP,
        "augmentation": "MONAI: placement in the 48x64x48 box, RandFlipd x/z, RandAffined "
        "(rotation +-15 deg, scale +-15%, translation +-3 voxels, p 0.5), "
        "RandScaleIntensityd, RandShiftIntensityd, RandAdjustContrastd (gamma, p 0.3), "
        "RandGaussianNoised (p 0.2), then a random 40x56x40 window",
        "train_cases": train_names,
        "validation_cases": val_names,
        "history": history,
    }
    card = card.model_copy(
        update={
            "training": training,
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
    path = model_dir / "model.yaml"
    path.write_text(
        yaml.safe_dump(card.model_dump(mode="json", exclude_none=True), sort_keys=False),
        encoding="utf-8",
    )
    log.info("hippocampus: wrote %s and %s", weights, path)
    return path
