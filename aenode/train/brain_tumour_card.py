"""Export of a brain-tumour training run: the weights, and the held-out figures into the card.

Every figure is measured on the native 256x256 grid through :func:`segment`, the path a DICOM
series takes. Intervals are 95% percentile bootstrap intervals (``scipy.stats.bootstrap``)
over validation *patients*: the slice-level figures resample whole patients (their slices
together), since slices of one patient are not independent. The slice-presence threshold is
chosen on the training patients (Youden's J), never on the validation split.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy import stats

from aenode.infer.cards import ModelCard
from aenode.metrics import auc, dice
from aenode.train.brain_tumour import (
    BATCH,
    RECIPE,
    patient_names,
    segment,
    split_patients,
)
from aenode.train.flair import (
    LGG_PIXEL_MM,
    slice_scores,
)
from aenode.train.loop import CHECKPOINT_BEST, load_checkpoint, read_log

__all__ = ["POSTPROCESS", "PatientResult", "evaluate_patients", "export", "load_network"]

log = logging.getLogger(__name__)

POSTPROCESS: dict[str, float] = {"threshold": 0.5, "min_size_mm2": 100.0, "keep_fraction": 0.1}
N_RESAMPLES = 2000


@dataclass
class PatientResult:
    """One patient's figures.

    Attributes
    ----------
    name : str
    dice : float
        Dice of the 3D mask on the native grid.
    scores : numpy.ndarray
        Slice presence scores.
    truth : numpy.ndarray
        1 where the reference mask has tumour on the slice.
    """

    name: str
    dice: float
    scores: np.ndarray
    truth: np.ndarray


def load_network(weights: Path) -> torch.nn.Module:
    """The brain-tumour network with ``weights`` (a state dict or a loop checkpoint), eval mode.

    Parameters
    ----------
    weights : pathlib.Path
        ``model.pt`` (state dict) or ``best.pt`` (checkpoint).

    Returns
    -------
    torch.nn.Module
    """
    net = RECIPE.network()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if "model" in state and isinstance(state["model"], dict):
        load_checkpoint(weights, net)
    else:
        net.load_state_dict(state)
    return net.eval()


def evaluate_patients(
    net: torch.nn.Module, data: Path, names: Sequence[str]
) -> dict[bool, list[PatientResult]]:
    """Segment each patient through :func:`segment` and score it on the native grid.

    Parameters
    ----------
    net : torch.nn.Module
        The network in eval mode.
    data : pathlib.Path
        LGG folder (``imagesTr``, ``labelsTr``).
    names : sequence of str
        Patients.

    Returns
    -------
    dict
        ``True``: with :func:`aenode.train.flair.postprocess`, ``False``: the thresholded
        probabilities alone (one forward pass serves both).
    """
    import SimpleITK as sitk

    out: dict[bool, list[PatientResult]] = {True: [], False: []}
    for name in names:
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "imagesTr" / f"{name}.nii.gz")))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / f"{name}.nii.gz")))
        ref = (ref > 0).astype(np.uint8)
        truth = ref.reshape(ref.shape[0], -1).max(axis=1).astype(np.int64)
        seg = segment(
            net,
            img,
            (LGG_PIXEL_MM, LGG_PIXEL_MM),
            threshold=POSTPROCESS["threshold"],
            min_size_mm2=POSTPROCESS["min_size_mm2"],
            keep_fraction=POSTPROCESS["keep_fraction"],
        )
        out[True].append(PatientResult(name, dice(seg.mask, ref, 1), seg.slice_scores, truth))
        raw = (seg.probabilities > POSTPROCESS["threshold"]).astype(np.uint8)
        scores = slice_scores(seg.probabilities)
        out[False].append(PatientResult(name, dice(raw, ref, 1), scores, truth))
    return out


def _youden_threshold(results: Sequence[PatientResult]) -> float:
    s = np.concatenate([r.scores for r in results])
    t = np.concatenate([r.truth for r in results]).astype(bool)
    best, best_j = 0.5, -1.0
    for c in np.unique(np.concatenate([s, [0.5]])):
        pred = s >= c
        j = pred[t].mean() + (~pred[~t]).mean() - 1.0
        if j > best_j:
            best, best_j = float(c), float(j)
    return best


def _slice_figures(results: Sequence[PatientResult], threshold: float) -> dict[str, float]:
    s = np.concatenate([r.scores for r in results])
    t = np.concatenate([r.truth for r in results]).astype(bool)
    pred = s >= threshold
    tp, tn = int((pred & t).sum()), int((~pred & ~t).sum())
    return {
        "auc": auc(s.tolist(), t.astype(int).tolist()) if 0 < t.sum() < t.size else float("nan"),
        "accuracy": float((pred == t).mean()),
        "sensitivity": tp / max(1, int(t.sum())),
        "specificity": tn / max(1, int((~t).sum())),
    }


def _interval(n: int, statistic: Callable[[np.ndarray], float], seed: int) -> list[float]:
    """95% percentile bootstrap interval of ``statistic`` over resampled patient indices."""
    res = stats.bootstrap(
        (np.arange(n),),
        lambda idx: statistic(np.asarray(idx, dtype=int)),
        vectorized=False,
        n_resamples=N_RESAMPLES,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def _figures(results: Sequence[PatientResult], threshold: float, seed: int) -> dict[str, Any]:
    dices = np.array([r.dice for r in results])
    point = _slice_figures(results, threshold)
    figures: dict[str, Any] = {
        "patients": len(results),
        "slices": int(sum(r.truth.size for r in results)),
        "tumour_slices": int(sum(r.truth.sum() for r in results)),
        "dice_mean": {
            "value": round(float(dices.mean()), 4),
            "ci95": _interval(len(dices), lambda i: float(dices[i].mean()), seed),
        },
        "dice_median": {
            "value": round(float(np.median(dices)), 4),
            "ci95": _interval(len(dices), lambda i: float(np.median(dices[i])), seed),
        },
    }
    for key, value in point.items():

        def stat(idx: np.ndarray, key: str = key) -> float:
            return _slice_figures([results[i] for i in idx], threshold)[key]

        figures[f"slice_{key}"] = {
            "value": round(value, 4),
            "ci95": _interval(len(results), stat, seed),
        }
    return figures


def _minutes(run_dir: Path, history: Sequence[Any]) -> float:
    """Wall time of the run (data loading included) from ``report.json``, else the epochs'."""
    import json

    report = run_dir / "report.json"
    if report.is_file():
        return float(json.loads(report.read_text(encoding="utf-8"))["minutes"])
    return round(sum(float(h["seconds"]) for h in history) / 60.0, 1)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trained_parts(
    *,
    figures: dict[str, Any],
    per_patient: list[dict[str, Any]],
    train_names: list[str],
    val_names: list[str],
    run: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    return {
        "training": {
            "data": "../shared/data/lgg-flair imagesTr/labelsTr: 66 patients, FLAIR channel "
            "of the LGG Segmentation Dataset (kaggle_3m), uint8 256x256 slices",
            "split": f"by patient (file name): numpy default_rng({seed}).permutation of the "
            "sorted names, the first 20% (13) validation; every slice of a patient on one "
            "side",
            "validation_patients": val_names,
            "train_patients": train_names,
            "network_choice": "MONAI UNet (2D, channels 16-256, 4 strided downsamplings, no "
            "residual units, instance norm): a U-Net is what Buda et al. used on this data "
            "(82% Dice with three sequences); small (0.66 M parameters, 2.6 MB) so that "
            "about 50 epochs fit in 36 minutes on one CPU thread; instance norm keeps it "
            "insensitive to a series' intensity scale. In a 32-step comparison on 3 training "
            "patients (no validation data), the same U-Net with 1 or 2 residual units and "
            "MONAI BasicUNet (16-256) lowered the loss more slowly per step and were 2-8x "
            "slower per step; a larger net would have had fewer epochs in the CPU budget.",
            "command": "AENODE_RUNTIME__THREADS=1 aenode train brain-tumour --data "
            "../shared/data/lgg-flair --out models/brain-tumour --minutes 36",
            "launched_as": "the shipped run called aenode.train.train('brain-tumour', "
            "data, out, minutes=36.0, epochs=None, device='cpu', seed=0) after "
            "torch.set_num_threads(1) (what the command does), then exported the best "
            "checkpoint (aenode.train.brain_tumour_card.export, what the command does next); "
            "CPU shared with other jobs (2 cores)",
            "loop": "aenode.train.loop.run via aenode.train.train('brain-tumour', ...)",
            "loss": "Dice + binary cross-entropy (MONAI DiceCELoss, sigmoid, batch Dice)",
            "optimizer": f"AdamW lr {RECIPE.lr} wd {RECIPE.weight_decay}, linear warm-up "
            f"({RECIPE.warmup_fraction:.0%} of the budget) then cosine to 1% over the time "
            "budget",
            "batch_size": BATCH,
            "augmentation": "MONAI: RandFlipd (left-right, p 0.5), RandAffined (rotation "
            "+-15 deg, scale +-12%, translation +-10 px, p 0.6), RandScaleIntensityd (0.15, "
            "p 0.5), RandShiftIntensityd (0.1, p 0.5), RandAdjustContrastd (gamma 0.7-1.5, p "
            "0.3), RandGaussianNoised (std 0.03, p 0.2)",
            **run,
        },
        "metrics": {
            "validation": {
                **figures["post"],
                "note": "13 held-out patients, native 256x256 grid, with postprocessing; the "
                "same patients chose the best epoch (validation Dice on the 128 grid), so "
                "slightly optimistic; intervals: 95% percentile bootstrap over patients "
                "(scipy.stats.bootstrap, 2000 resamples)",
            },
            "validation_without_postprocessing": figures["raw"],
            "validation_patients": per_patient,
        },
    }


def export(
    run_dir: Path, data: Path, model_dir: Path, *, seed: int = 0, threads: int | None = None
) -> Path:
    """Write ``model.pt`` and the figures into ``model.yaml`` from a run's best checkpoint.

    The package's card and code (``model.yaml``, ``tumour.py``) are written by hand; this fills
    in the weights' checksum, the slice threshold chosen on the training patients, the run
    (split, epochs, history) and the held-out figures, and checks the card still validates.

    Parameters
    ----------
    run_dir : pathlib.Path
        The loop's output folder (``best.pt``, ``train-log.jsonl``).
    data : pathlib.Path
        LGG folder.
    model_dir : pathlib.Path
        Package folder to write (``models/brain-tumour``).
    seed : int
        The run's seed (split) and the bootstrap's.
    threads : int or None
        Torch threads the run used (recorded); ``None``: this process's.

    Returns
    -------
    pathlib.Path
        The card written.

    Raises
    ------
    FileNotFoundError
        If ``model_dir`` has no ``model.yaml`` (the message says what to copy there).
    """
    path = model_dir / "model.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; the brain-tumour package (model.yaml, tumour.py) is written by "
            "hand: copy models/brain-tumour there first, training fills in weights and figures"
        )
    card = yaml.safe_load(path.read_text(encoding="utf-8"))
    net = load_network(run_dir / CHECKPOINT_BEST)
    meta = torch.load(run_dir / CHECKPOINT_BEST, map_location="cpu", weights_only=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    weights = model_dir / "model.pt"
    torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    train_names, val_names = split_patients(patient_names(data), seed)
    history = read_log(run_dir / "train-log.jsonl")
    on_train = evaluate_patients(net, data, train_names)
    on_val = evaluate_patients(net, data, val_names)
    thr = {pp: _youden_threshold(on_train[pp]) for pp in (True, False)}
    figures = {
        "post": {**_figures(on_val[True], thr[True], seed), "slice_threshold": thr[True]},
        "raw": {
            **_figures(on_val[False], thr[False], seed),
            "slice_threshold": thr[False],
            "slice_score": "highest probability on the slice (no postprocessing)",
        },
    }
    train_dice = float(np.mean([r.dice for r in on_train[True]]))
    raw_by_name = {r.name: r.dice for r in on_val[False]}
    per_patient = [
        {
            "patient": r.name,
            "dice": round(r.dice, 4),
            "dice_without_postprocessing": round(raw_by_name[r.name], 4),
            "slices": int(r.truth.size),
            "tumour_slices": int(r.truth.sum()),
        }
        for r in on_val[True]
    ]
    run = {
        "device": f"cpu, {threads or torch.get_num_threads()} torch thread(s)",
        "precision": "bfloat16 autocast (CPU), float32 weights",
        "epochs": len(history),
        "best_epoch": int(meta["epoch"]),
        "minutes": _minutes(run_dir, history),
        "train_dice_mean_native_grid": round(train_dice, 4),
        "history": [dict(h) for h in history],
    }
    parts = _trained_parts(
        figures=figures,
        per_patient=per_patient,
        train_names=train_names,
        val_names=val_names,
        run=run,
        seed=seed,
    )
    card["training"] = {**card.get("training", {}), **parts["training"]}
    card["metrics"] = parts["metrics"]
    card["runtime"]["weights_sha256"] = _sha256(weights)
    card["runtime"].setdefault("parameters", {})["slice_threshold"] = round(thr[True], 4)
    ModelCard.model_validate(card)  # a card the registry would refuse is never written
    path.write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")
    log.info("brain-tumour: wrote %s and %s", weights, path)
    return path
