"""``aenode evaluate``: a model's metrics against reference labels, through the runtime.

Images are NIfTI files (``<case>.nii.gz`` / ``.nii``) or DICOM series folders
(``<case>/``); reference labels are ``<case>.nii.gz`` label maps in ``--labels``. Each case
goes through the same :class:`aenode.infer.runtime.Runtime` that serves the model, and is
scored per label: Dice, Jaccard, 95th-percentile Hausdorff distance (mm), volume error
(mm^3 and %), sensitivity and specificity. Classifiers are scored from a labels CSV
(``case,label``, or ``case,<class>,...`` with 0/1 per class for multi-label models, see
:func:`read_labels_csv`) with accuracy, AUC, F0.5, sensitivity and specificity per class
and bootstrap 95% intervals; a softmax model is decided by the argmax. Models with several
roles read ``<case>/<role>/`` folders (:func:`read_roles`). A DICOM input whose Modality
differs from the card's is refused. The JSON report has no NaN: undefined values are null
and ``undefined`` says why.
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
    "read_labels_csv",
    "read_roles",
    "score_segmentation",
    "write_prediction",
]

log = logging.getLogger(__name__)

_NIFTI = (".nii.gz", ".nii")
# Per-case entries of a segmentation report that are not per-label metrics.
_NOT_METRICS = ("case", "prediction", "slice_scores", "slice_truth")


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


def read_roles(path: Path, card: ModelCard, case: str) -> dict[str, Volume]:
    """The input volumes of one case: role name -> volume, checked against the card.

    A single-role model reads ``path`` itself (a NIfTI file or a DICOM series folder). A
    model with several roles reads a case folder holding one entry per role:
    ``<case>/<role>/`` (a DICOM series folder) or ``<case>/<role>.nii.gz``; a missing
    optional role is left out (the runtime fills it as for a study without it).

    Raises
    ------
    aenode.config.ConfigError
        If a required role is missing, or a DICOM series' Modality differs from the card's
        ``inputs.modality``; the message names the case, the role and the path.
    """
    roles = card.inputs.roles
    if len(roles) == 1:
        entries = {roles[0].name: path}
    else:
        if not path.is_dir():
            names = ", ".join(r.name for r in roles)
            raise ConfigError(
                f"case {case}: model {card.name} takes roles {names}: {path} must be a folder "
                "with one <role>/ DICOM folder or <role>.nii.gz per role"
            )
        entries = {}
        for role in roles:
            found = next(
                (
                    p
                    for p in (path / role.name, *(path / f"{role.name}{s}" for s in _NIFTI))
                    if p.exists()
                ),
                None,
            )
            if found is None:
                if role.required:
                    raise ConfigError(
                        f"case {case}: required role {role.name} missing: no {role.name}/ or "
                        f"{role.name}.nii.gz in {path}"
                    )
                continue
            entries[role.name] = found
    volumes = {}
    for name, entry in entries.items():
        volume = read_case(entry, card.inputs.modality)
        modality = volume.series.modality
        if modality and modality.upper() != card.inputs.modality.upper():
            raise ConfigError(
                f"case {case}: role {name}: {entry} is Modality {modality}, but model "
                f"{card.name} is for {card.inputs.modality} (inputs.modality)"
            )
        volumes[name] = volume
    return volumes


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
    predictions: Path | None = None,
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
    predictions : pathlib.Path or None
        When given, each case's predicted label map is written there (see
        :func:`write_prediction`).

    Returns
    -------
    dict
        ``{"model", "version", "n", "metrics": {metric: {label: mean, ..., "mean"}},
        "dice_ci95": {label: [low, high]}, "cases": [{"case", metric: {label: value}}]}``;
        non-finite Hausdorff distances (an empty mask) are left out of the means and
        counted in ``"hd95_infinite"``.
    """
    rows: list[dict[str, Any]] = []
    for case, image_path, label_path in cases:
        prediction = runtime.predict(card.name, read_roles(image_path, card, case))
        if prediction.labels is None:
            raise ConfigError(f"case {case}: model {card.name} gave no label map")
        reference = sitk.ReadImage(str(label_path))
        scores = score_segmentation(prediction.labels, reference, card)
        row: dict[str, Any] = {"case": case, **scores}
        if predictions is not None:
            row["prediction"] = str(write_prediction(prediction.labels, image_path, predictions))
        slice_scores = prediction.extra.get("slice_scores")
        if slice_scores is not None:  # a slice-wise model (brain-tumour): presence per slice
            ref = sitk.GetArrayViewFromImage(reference)
            row["slice_scores"] = [float(s) for s in slice_scores]
            row["slice_truth"] = [int(ref[k].any()) for k in range(ref.shape[0])]
        rows.append(row)
        if progress is not None:
            progress(case)
    keys = _keys(card)
    summary: dict[str, dict[str, float]] = {}
    for metric in rows[0]:
        if metric in _NOT_METRICS:
            continue
        summary[metric] = {k: _mean([r[metric][k] for r in rows]) for k in keys}
        summary[metric]["mean"] = _mean(list(summary[metric].values()))
    ci = {k: list(metrics.bootstrap_ci([r["dice"][k] for r in rows])) for k in keys}
    ci["mean"] = list(metrics.bootstrap_ci([np.mean([r["dice"][k] for k in keys]) for r in rows]))
    infinite = sum(1 for r in rows for k in keys if not math.isfinite(r["hd95_mm"][k]))
    report: dict[str, Any] = {
        "model": card.name,
        "version": card.version,
        "n": len(rows),
        "metrics": summary,
        "dice_ci95": ci,
        "dice_median": float(np.median([np.mean([r["dice"][k] for k in keys]) for r in rows])),
        "hd95_infinite": infinite,
        "cases": rows,
    }
    if all("slice_scores" in r for r in rows):
        report["slice_presence"] = _slice_presence(rows, card)
    return report


def _slice_presence(rows: list[dict[str, Any]], card: ModelCard) -> dict[str, Any]:
    """Slice-level tumour presence over all cases' slices, at the card's slice threshold."""
    params = getattr(card.runtime, "parameters", None) or {}
    threshold = float(params.get("slice_threshold", 0.5))
    scores = [s for r in rows for s in r["slice_scores"]]
    truth = [t for r in rows for t in r["slice_truth"]]
    out: dict[str, Any] = dict(metrics.classification_metrics(scores, truth, threshold))
    out.update(slices=len(scores), positive_slices=int(sum(truth)), threshold=threshold)
    return out


def write_prediction(labels: sitk.Image, image_path: Path, out: Path) -> Path:
    """Write a predicted label map to ``out`` under the image's file name, on its grid.

    Parameters
    ----------
    labels : SimpleITK.Image
        The prediction, on the grid of the image read from ``image_path``.
    image_path : pathlib.Path
        The case's image: a NIfTI file (the name is kept) or a DICOM folder
        (``<folder name>.nii.gz``).
    out : pathlib.Path
        Output folder (created).

    Returns
    -------
    pathlib.Path
        The written NIfTI file.
    """
    out.mkdir(parents=True, exist_ok=True)
    name = image_path.name if image_path.name.endswith(_NIFTI) else f"{image_path.name}.nii.gz"
    path = out / name
    sitk.WriteImage(sitk.Cast(labels, sitk.sitkUInt8), str(path), useCompression=True)
    return path


def read_labels_csv(path: Path, card: ModelCard) -> dict[str, set[str]]:
    """The reference classes per case from a labels CSV.

    Two layouts (a header row is required):

    - ``case,label`` (or ``case,class``): one class name of the card per case; empty for
      none (a sigmoid model's negative case).
    - ``case,<class>,<class>...``: one column per card class, ``1``/``0`` (or
      ``true``/``false``), for multi-label (sigmoid) models.

    Returns
    -------
    dict of str to set of str
        Case -> the classes present.

    Raises
    ------
    aenode.config.ConfigError
        Naming the file, line and column of what does not fit the card.
    """
    names = [c.name for c in card.outputs.classes]
    if not path.is_file():
        raise ConfigError(f"--labels: {path} is not a file (a CSV with a case column)")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        if "case" not in header:
            raise ConfigError(f"--labels: {path}: the header must have a 'case' column")
        single = next((h for h in ("label", "class") if h in header), None)
        if single is None:
            unknown = [h for h in header if h != "case" and h not in names]
            if unknown or len(header) < 2:
                raise ConfigError(
                    f"--labels: {path}: columns {unknown or header} are not classes of model "
                    f"{card.name} ({', '.join(names)}); use case,label or case,<class>..."
                )
        truth: dict[str, set[str]] = {}
        for line, row in enumerate(reader, start=2):
            case = (row.get("case") or "").strip()
            if not case:
                raise ConfigError(f"--labels: {path}:{line}: empty case")
            if single is not None:
                value = (row.get(single) or "").strip()
                if value and value not in names:
                    raise ConfigError(
                        f"--labels: {path}:{line}: {single} {value!r} is not a class of model "
                        f"{card.name} ({', '.join(names)})"
                    )
                truth[case] = {value} if value else set()
                continue
            present = set()
            for name in names:
                value = (row.get(name) or "0").strip().lower()
                if value not in ("0", "1", "true", "false", ""):
                    raise ConfigError(f"--labels: {path}:{line}: column {name}: {value!r} not 0/1")
                if value in ("1", "true"):
                    present.add(name)
            truth[case] = present
    return truth


def evaluate_classification(
    runtime: Runtime,
    card: ModelCard,
    images: Path,
    labels_csv: Path,
    cases: Sequence[str] | None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a classifier on cases and score it against a labels CSV (:func:`read_labels_csv`).

    A softmax head is decided by the argmax (one class per case, as the node reports it);
    a sigmoid head by each class's threshold. Per class (one-vs-rest): accuracy, AUC, F0.5,
    sensitivity and specificity with bootstrap 95% intervals
    (:func:`aenode.metrics.classification_metrics`); a softmax model also gets the overall
    accuracy of the argmax.

    Parameters
    ----------
    runtime : Runtime
        The runtime holding the model.
    card : ModelCard
        The classifier's card.
    images : pathlib.Path
        Folder of ``<case>.nii.gz`` files or ``<case>/`` DICOM series folders (a model with
        several roles: ``<case>/<role>/`` folders, see :func:`read_roles`).
    labels_csv : pathlib.Path
        The reference classes.
    cases : sequence of str or None
        Only these cases.
    progress : callable or None
        Called with each case name when done.

    Returns
    -------
    dict
        ``{"model", "version", "n", "head", "metrics": {class: {...}}, "accuracy" (softmax),
        "cases": [{"case", "truth", "predicted", "scores"}]}``.
    """
    truth = read_labels_csv(labels_csv, card)
    names = list(cases) if cases is not None else sorted(truth)
    classes = [c.name for c in card.outputs.classes]
    softmax = card.outputs.head == "softmax"
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
        if softmax and len(truth[case]) != 1:
            raise ConfigError(
                f"--labels: {labels_csv}: case {case}: a softmax model needs exactly one class "
                f"per case, got {sorted(truth[case]) or 'none'}"
            )
        prediction = runtime.predict(card.name, read_roles(path, card, case))
        probs = prediction.class_probabilities or {}
        if softmax:
            predicted = [max(classes, key=lambda c: probs.get(c, 0.0))]
        else:
            predicted = [
                c.name for c in card.outputs.classes if probs.get(c.name, 0.0) >= c.threshold
            ]
        rows.append(
            {"case": case, "truth": sorted(truth[case]), "predicted": predicted, "scores": probs}
        )
        if progress is not None:
            progress(case)
    if not rows:
        raise ConfigError(f"--labels: {labels_csv}: no cases")
    result: dict[str, dict[str, Any]] = {}
    for spec in card.outputs.classes:
        scores = [float(r["scores"].get(spec.name, 0.0)) for r in rows]
        positive = [int(spec.name in r["truth"]) for r in rows]
        decided = [int(spec.name in r["predicted"]) for r in rows]
        result[spec.name] = metrics.classification_metrics(
            scores, positive, spec.threshold, predicted=decided, intervals=True
        )
    report: dict[str, Any] = {
        "model": card.name,
        "version": card.version,
        "n": len(rows),
        "head": card.outputs.head,
        "metrics": result,
        "cases": rows,
    }
    if softmax:
        report["accuracy"] = sum(r["truth"] == r["predicted"] for r in rows) / len(rows)
    return report


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
    progress: bool = False,
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
        Segmentation: write each case's predicted label map there (NIfTI, the image's file
        name and grid).
        A classifier on a folder of PNGs writes ``predictions/predictions.csv`` here
        (:mod:`aenode.evaluate_images`).
    progress : bool
        Show a tqdm progress bar of the cases (on stderr) for NIfTI and DICOM cases.

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
    from tqdm import tqdm

    names = list(cases) if cases is not None else None
    with Runtime(registry, settings.runtime) as runtime:
        if card.task == "segmentation":
            pairs = find_cases(images, labels, names)
            total: int | None = len(pairs)
        else:
            labels_csv = labels / "labels.csv" if labels.is_dir() else labels
            if names is None:
                names = sorted(read_labels_csv(labels_csv, card))
            total = len(names)
        with tqdm(total=total, desc=f"evaluate {model}", unit="case", disable=not progress) as bar:

            def done(case: str) -> None:
                bar.set_postfix_str(case, refresh=False)
                bar.update(1)

            if card.task == "segmentation":
                report = evaluate_segmentation(
                    runtime, card, pairs, progress=done, predictions=predictions
                )
            else:
                report = evaluate_classification(
                    runtime, card, images, labels_csv, names, progress=done
                )
    return {**report, "task": card.task}
