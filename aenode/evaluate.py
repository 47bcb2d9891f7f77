"""``aenode evaluate``: a model's metrics against reference labels, through the runtime.

Images are NIfTI files (``<case>.nii.gz`` / ``.nii``) or DICOM series folders
(``<case>/``); reference labels are ``<case>.nii.gz`` label maps in ``--labels``. Each case
goes through the same :class:`aenode.infer.runtime.Runtime` that serves the model, and is
scored per label: Dice, Jaccard, 95th-percentile Hausdorff distance (mm), volume error
(mm^3 and %), sensitivity and specificity. Classifiers are scored from a ``labels.csv``
(``case,class``) with accuracy, AUC, F0.5, sensitivity and specificity per class.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from aenode import metrics
from aenode.config import ConfigError, Settings
from aenode.evaluate_images import evaluate_images, has_images
from aenode.infer.cards import ModelCard
from aenode.infer.registry import Registry
from aenode.infer.runtime import Runtime
from aenode.records import SeriesInfo, Volume

__all__ = [
    "finite",
    "evaluate_classification",
    "evaluate_model",
    "evaluate_segmentation",
    "find_cases",
    "label_key",
    "read_case",
    "score_segmentation",
]

log = logging.getLogger(__name__)

_NIFTI = (".nii.gz", ".nii")


def label_key(name: str) -> str:
    """The metric key of a label name in snake case: ``"Left lung"`` -> ``"left_lung"``.

    When all of a card's label names share their last word (``"Anterior hippocampus"``,
    ``"Posterior hippocampus"``), the evaluation uses their distinct first words instead
    (``"anterior"``, ``"posterior"``).

    Parameters
    ----------
    name : str
        A card label name.

    Returns
    -------
    str
    """
    return name.strip().lower().replace(" ", "_")


def _keys(card: ModelCard) -> list[str]:
    names = [label.name.strip().split() for label in card.outputs.labels]
    if len(names) > 1 and all(len(n) > 1 for n in names) and len({n[-1] for n in names}) == 1:
        firsts = [n[0].lower() for n in names]
        if len(set(firsts)) == len(firsts):
            return firsts
    return [label_key(label.name) for label in card.outputs.labels]


def _case_name(path: Path) -> str:
    for suffix in _NIFTI:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def find_cases(
    images: Path, labels: Path, cases: Sequence[str] | None
) -> list[tuple[str, Path, Path]]:
    """Pair each image (NIfTI file or DICOM folder) with its reference label file.

    Parameters
    ----------
    images : pathlib.Path
        Folder of ``<case>.nii.gz`` files or ``<case>/`` DICOM series folders.
    labels : pathlib.Path
        Folder of ``<case>.nii.gz`` (or ``.nii``) label maps.
    cases : sequence of str or None
        Only these cases (all when ``None``).

    Returns
    -------
    list of tuple
        ``(case, image path, label path)`` sorted by case.

    Raises
    ------
    aenode.config.ConfigError
        If a folder is missing, a named case has no image, or an image has no label.
    """
    for flag, folder in (("--images", images), ("--labels", labels)):
        if not folder.is_dir():
            raise ConfigError(f"{flag}: {folder} is not a folder")
    found: dict[str, Path] = {}
    for p in sorted(images.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or p.name.endswith(_NIFTI):
            found[_case_name(p)] = p
    if cases is not None:
        unknown = [c for c in cases if c not in found]
        if unknown:
            raise ConfigError(f"--cases: no image for {', '.join(unknown)} in {images}")
        found = {c: found[c] for c in cases}
    out = []
    for case, path in sorted(found.items()):
        label = next(
            (labels / f"{case}{s}" for s in _NIFTI if (labels / f"{case}{s}").is_file()), None
        )
        if label is None:
            raise ConfigError(f"--labels: no {case}.nii.gz in {labels} for image {path}")
        out.append((case, path, label))
    if not out:
        raise ConfigError(f"--images: no NIfTI files or DICOM folders in {images}")
    return out


def read_case(path: Path, modality: str = "") -> Volume:
    """Read a NIfTI file or a DICOM series folder into a :class:`Volume`.

    Parameters
    ----------
    path : pathlib.Path
        A ``.nii``/``.nii.gz`` file or a folder holding one DICOM series.
    modality : str
        Modality recorded for a NIfTI file (it has none).

    Returns
    -------
    aenode.records.Volume
    """
    if path.is_dir():
        from aenode.volume import build_volume_from_files

        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        return build_volume_from_files(files)
    image = sitk.ReadImage(str(path))
    info = SeriesInfo(
        study_uid="",
        series_uid=_case_name(path),
        revision=0,
        modality=modality,
        description=path.name,
        files=(path,),
    )
    return Volume(image=image, series=info)


def score_segmentation(
    pred: sitk.Image, ref: sitk.Image, card: ModelCard
) -> dict[str, dict[str, float]]:
    """All segmentation metrics of one case, per label.

    Parameters
    ----------
    pred : SimpleITK.Image
        Predicted label map.
    ref : SimpleITK.Image
        Reference label map; the prediction is resampled onto its grid (nearest) if the
        grids differ.
    card : ModelCard
        Gives the label values and names.

    Returns
    -------
    dict
        metric name -> label key -> value.
    """
    if (
        pred.GetSize() != ref.GetSize()
        or not np.allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-3)
        or not np.allclose(pred.GetDirection(), ref.GetDirection(), atol=1e-4)
        or not np.allclose(pred.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    ):
        pred = sitk.Resample(pred, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    p = sitk.GetArrayFromImage(pred)
    r = sitk.GetArrayFromImage(ref)
    spacing = tuple(reversed(ref.GetSpacing()))
    out: dict[str, dict[str, float]] = {
        k: {}
        for k in (
            "dice",
            "jaccard",
            "hd95_mm",
            "volume_error_mm3",
            "volume_error_pct",
            "sensitivity",
            "specificity",
        )
    }
    for key, label in zip(_keys(card), card.outputs.labels, strict=True):
        v = label.value
        out["dice"][key] = metrics.dice(p, r, v)
        out["jaccard"][key] = metrics.jaccard(p, r, v)
        out["hd95_mm"][key] = metrics.hausdorff95(p, r, spacing, v)
        mm3, pct = metrics.volume_error(p, r, spacing, v)
        out["volume_error_mm3"][key] = mm3
        out["volume_error_pct"][key] = pct
        out["sensitivity"][key] = metrics.sensitivity(p, r, v)
        out["specificity"][key] = metrics.specificity(p, r, v)
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate_segmentation(
    runtime: Runtime,
    card: ModelCard,
    cases: list[tuple[str, Path, Path]],
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a segmentation model on cases and aggregate the metrics.

    Parameters
    ----------
    runtime : Runtime
        The runtime holding the model.
    card : ModelCard
        The model's card.
    cases : list of tuple
        ``(case, image path, label path)`` as from :func:`find_cases`.
    progress : callable or None
        Called with each case name when done.

    Returns
    -------
    dict
        ``{"model", "version", "n", "metrics": {metric: {label: mean, ..., "mean"}},
        "dice_ci95": {label: [low, high]}, "cases": [{"case", metric: {label: value}}]}``;
        non-finite Hausdorff distances (an empty mask) are left out of the means and
        counted in ``"hd95_infinite"``.
    """
    role = card.inputs.roles[0].name
    rows: list[dict[str, Any]] = []
    for case, image_path, label_path in cases:
        volume = read_case(image_path, card.inputs.modality)
        prediction = runtime.predict(card.name, {role: volume})
        assert prediction.labels is not None
        scores = score_segmentation(prediction.labels, sitk.ReadImage(str(label_path)), card)
        rows.append({"case": case, **scores})
        if progress is not None:
            progress(case)
    keys = _keys(card)
    summary: dict[str, dict[str, float]] = {}
    for metric in rows[0]:
        if metric == "case":
            continue
        summary[metric] = {k: _mean([r[metric][k] for r in rows]) for k in keys}
        summary[metric]["mean"] = _mean(list(summary[metric].values()))
    ci = {k: list(metrics.bootstrap_ci([r["dice"][k] for r in rows])) for k in keys}
    ci["mean"] = list(metrics.bootstrap_ci([np.mean([r["dice"][k] for k in keys]) for r in rows]))
    infinite = sum(1 for r in rows for k in keys if not math.isfinite(r["hd95_mm"][k]))
    return {
        "model": card.name,
        "version": card.version,
        "n": len(rows),
        "metrics": summary,
        "dice_ci95": ci,
        "hd95_infinite": infinite,
        "cases": rows,
    }


def evaluate_classification(
    runtime: Runtime, card: ModelCard, images: Path, labels_csv: Path, cases: Sequence[str] | None
) -> dict[str, Any]:
    """Run a classifier on cases and score it against ``case,class`` rows of a CSV file.

    Parameters
    ----------
    runtime : Runtime
        The runtime holding the model.
    card : ModelCard
        The classifier's card.
    images : pathlib.Path
        Folder of NIfTI files or DICOM series folders.
    labels_csv : pathlib.Path
        CSV with a header ``case,class``; ``class`` is a card class name or empty for none.
    cases : sequence of str or None
        Only these cases.

    Returns
    -------
    dict
        ``{"model", "version", "n", "metrics": {class: {accuracy, auc, f0.5, sensitivity,
        specificity}}, "cases": [...]}``.
    """
    with labels_csv.open(newline="", encoding="utf-8") as fh:
        truth = {row["case"]: row["class"] for row in csv.DictReader(fh)}
    names = list(cases) if cases is not None else sorted(truth)
    role = card.inputs.roles[0].name
    rows: list[dict[str, Any]] = []
    for case in names:
        path = next(
            (p for p in (images / case, *(images / f"{case}{s}" for s in _NIFTI)) if p.exists()),
            None,
        )
        if path is None or case not in truth:
            raise ConfigError(
                f"--cases: {case} lacks an image in {images} or a row in {labels_csv}"
            )
        prediction = runtime.predict(card.name, {role: read_case(path, card.inputs.modality)})
        rows.append({"case": case, "truth": truth[case], "scores": prediction.class_probabilities})
    result: dict[str, dict[str, float]] = {}
    for spec in card.outputs.classes:
        scores = [float((r["scores"] or {}).get(spec.name, 0.0)) for r in rows]
        positive = [int(r["truth"] == spec.name) for r in rows]
        result[spec.name] = metrics.classification_metrics(scores, positive, spec.threshold)
    return {
        "model": card.name,
        "version": card.version,
        "n": len(rows),
        "metrics": result,
        "cases": rows,
    }


def finite(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats (an empty mask's Hausdorff distance) become null."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def evaluate_model(
    settings: Settings,
    model: str,
    images: Path,
    labels: Path,
    cases: Sequence[str] | None = None,
    predictions: Path | None = None,
) -> dict[str, Any]:
    """Run a loaded model on images and score it against reference labels.

    Parameters
    ----------
    settings : Settings
        ``models`` and ``runtime`` are used.
    model : str
        A model package's name.
    images, labels : pathlib.Path
        Folders (a classifier's labels may be a ``labels.csv`` file or its folder).
    cases : sequence of str or None
        Case names; None evaluates all.
    predictions : pathlib.Path or None
        A classifier on a folder of PNGs writes ``predictions/predictions.csv`` here
        (:mod:`aenode.evaluate_images`).

    Returns
    -------
    dict
        The report, with ``task`` (``segmentation`` or ``classification``) added.

    Raises
    ------
    aenode.config.ConfigError
        If the model is unknown or the folders or cases do not match.
    """
    registry = Registry.load(settings.models)
    if model not in registry:
        raise ConfigError(f"--model: {model!r} is not loaded (loaded: {registry.names()})")
    card = registry.card(model)
    if card.task == "classification" and has_images(images):  # 2D images + labels.csv
        return {
            **evaluate_images(registry.get(model), images, labels, predictions),
            "task": card.task,
        }
    names = list(cases) if cases is not None else None
    with Runtime(registry, settings.runtime) as runtime:
        if card.task == "segmentation":
            report = evaluate_segmentation(runtime, card, find_cases(images, labels, names))
        else:
            labels_csv = labels / "labels.csv" if labels.is_dir() else labels
            report = evaluate_classification(runtime, card, images, labels_csv, names)
    return {**report, "task": card.task}
