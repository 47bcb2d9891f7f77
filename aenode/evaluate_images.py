"""``aenode evaluate`` for a classifier on a folder of 2D images (PNG) with a labels CSV.

The labels file has a ``file`` column and one 0/1 label column (``labels.csv`` of
``head-ct-kitamura``: ``file,hemorrhage``); the card's single class is the positive class.
Each image is scored through the model package's python entry module, which must provide
``predict_images(paths, state, card) -> list[float]`` (the per-image probability); loading
and refusing images (colour, 16-bit) is the module's, with a message naming the file.
Reported: AUC, accuracy, sensitivity and specificity at the card's threshold, each with a
95 % percentile bootstrap interval over images (paired, seeded), and with ``predictions``
the file ``predictions.csv`` (``file,probability``, every image) so that anyone can
recompute the figures.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aenode import metrics
from aenode.config import ConfigError
from aenode.infer.registry import LoadedModel

__all__ = [
    "IMAGE_SUFFIXES",
    "evaluate_images",
    "has_images",
    "read_labels",
    "score_with_intervals",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png",)
_SCORED = ("auc", "accuracy", "sensitivity", "specificity")


def has_images(folder: Path) -> bool:
    """Whether ``folder`` holds 2D image files (PNG) to evaluate a classifier on.

    Parameters
    ----------
    folder : pathlib.Path
        The ``--images`` folder.

    Returns
    -------
    bool
    """
    return folder.is_dir() and any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file()
    )


def read_labels(labels_csv: Path) -> tuple[str, dict[str, int]]:
    """Read a ``file,<label>`` CSV of 0/1 labels.

    Parameters
    ----------
    labels_csv : pathlib.Path
        The CSV file.

    Returns
    -------
    tuple
        The label column's name and ``{file: 0 or 1}``.

    Raises
    ------
    aenode.config.ConfigError
        If the file is missing, lacks a ``file`` column or exactly one other column, or a
        label is not 0 or 1 (the message names the file and line).
    """
    if not labels_csv.is_file():
        raise ConfigError(f"--labels: {labels_csv} is not a file (expected labels.csv)")
    with labels_csv.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        others = [c for c in columns if c != "file"]
        if "file" not in columns or len(others) != 1:
            raise ConfigError(
                f"--labels: {labels_csv} needs a 'file' column and one 0/1 label column, "
                f"has {columns}"
            )
        column = others[0]
        out: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            value = (row[column] or "").strip()
            if value not in ("0", "1"):
                raise ConfigError(
                    f"--labels: {labels_csv} line {line}: {column} is {value!r}, not 0 or 1"
                )
            out[row["file"].strip()] = int(value)
    return column, out


def score_with_intervals(
    scores: Sequence[float],
    truth: Sequence[int],
    threshold: float,
    resamples: int = 2000,
    seed: int = 13,
) -> dict[str, Any]:
    """AUC, accuracy, sensitivity, specificity and their 95 % bootstrap intervals.

    Parameters
    ----------
    scores : sequence of float
        Probability of the positive class per image.
    truth : sequence of int
        0/1 per image.
    threshold : float
        Scores at or above it count as positive.
    resamples : int
        Bootstrap resamples of the images (paired: score and label together).
    seed : int
        Seed of the resampling.

    Returns
    -------
    dict
        ``{metric: {"value": v, "ci95": [low, high]}}`` plus ``tp, fn, tn, fp``; a resample
        without both classes is left out of the AUC interval.
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=int)
    point = metrics.classification_metrics(s.tolist(), t.tolist(), threshold)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in _SCORED}
    for _ in range(resamples):
        idx = rng.integers(0, s.size, s.size)
        ts = t[idx]
        if ts.min() == ts.max():
            continue  # one class only: no AUC, sensitivity or specificity
        m = metrics.classification_metrics(s[idx].tolist(), ts.tolist(), threshold)
        for k in _SCORED:
            draws[k].append(m[k])
    out: dict[str, Any] = {}
    for k in _SCORED:
        values = np.asarray(draws[k])
        ci = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
        out[k] = {"value": float(point[k]), "ci95": ci if values.size else [None, None]}
    positive = s >= threshold
    out["tp"] = int((positive & (t == 1)).sum())
    out["fn"] = int((~positive & (t == 1)).sum())
    out["tn"] = int((~positive & (t == 0)).sum())
    out["fp"] = int((positive & (t == 0)).sum())
    return out


def evaluate_images(
    loaded: LoadedModel, images: Path, labels: Path, predictions: Path | None = None
) -> dict[str, Any]:
    """Score a single-class classifier on a folder of PNGs against a labels CSV.

    Parameters
    ----------
    loaded : aenode.infer.registry.LoadedModel
        A python-format classifier whose module has ``predict_images``.
    images : pathlib.Path
        Folder of images named in the CSV's ``file`` column.
    labels : pathlib.Path
        ``labels.csv`` or the folder holding it.
    predictions : pathlib.Path or None
        When given, ``predictions/predictions.csv`` is written (``file,probability``).

    Returns
    -------
    dict
        ``{"model", "version", "n", "positives", "label_column", "threshold",
        "metrics": {class: {metric: {"value", "ci95"}, ...}}, "cases": [...],
        "predictions_csv"}``.

    Raises
    ------
    aenode.config.ConfigError
        If the model cannot score images, the CSV names a missing image, or the card has
        not exactly one class.
    aenode.errors.InputError
        If an image cannot be interpreted (the module's message names the file).
    """
    card = loaded.card
    labels_csv = labels / "labels.csv" if labels.is_dir() else labels
    column, truth = read_labels(labels_csv)
    module = getattr(loaded, "module", None)
    scorer = getattr(module, "predict_images", None)
    if scorer is None:
        raise ConfigError(
            f"--model: {card.name} cannot score 2D images (its entry module has no "
            "predict_images(paths, state, card)); give DICOM or NIfTI cases instead"
        )
    if len(card.outputs.classes) != 1:
        raise ConfigError(
            f"--model: {card.name} has {len(card.outputs.classes)} classes; a 0/1 labels CSV "
            "scores a single-class classifier"
        )
    missing = [name for name in truth if not (images / name).is_file()]
    if missing:
        raise ConfigError(
            f"--images: {len(missing)} file(s) of {labels_csv} not in {images}, e.g. {missing[0]}"
        )
    names = sorted(truth)
    scores = [float(p) for p in scorer([images / n for n in names], loaded.state, card)]
    spec = card.outputs.classes[0]
    rows = [
        {"case": n, "truth": truth[n], "probability": p} for n, p in zip(names, scores, strict=True)
    ]
    report: dict[str, Any] = {
        "model": card.name,
        "version": card.version,
        "n": len(rows),
        "positives": sum(truth.values()),
        "label_column": column,
        "threshold": spec.threshold,
        "metrics": {
            spec.name: score_with_intervals(scores, [truth[n] for n in names], spec.threshold)
        },
        "cases": rows,
    }
    if predictions is not None:
        predictions.mkdir(parents=True, exist_ok=True)
        out = predictions / "predictions.csv"
        with out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "probability"])
            writer.writerows([n, repr(p)] for n, p in zip(names, scores, strict=True))
        report["predictions_csv"] = str(out)
        log.info("wrote %d predictions to %s", len(rows), out, extra={"model": card.name})
    return report
