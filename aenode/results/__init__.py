"""Result objects of one job: DICOM SEG, secondary-capture report (plus PNG) and TID 1500 SR.

:func:`write_results` writes them as Part 10 files into the job's folder; the export stage
sends the files listed in the returned :class:`ResultSet`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from pydicom import Dataset

from aenode.config import ResultsSettings
from aenode.infer.cards import ModelCard
from aenode.records import Job, Prediction, Volume
from aenode.results.report import build_report, render_page
from aenode.results.seg import build_seg
from aenode.results.source import ResultError, voxel_volume_mm3
from aenode.results.sr import build_sr
from aenode.results.uids import ResultUids

__all__ = [
    "ResultError",
    "ResultSet",
    "ResultUids",
    "build_report",
    "build_seg",
    "build_sr",
    "label_volumes_mm3",
    "write_results",
]

log = logging.getLogger(__name__)


@dataclass
class ResultSet:
    """What :func:`write_results` wrote.

    Attributes
    ----------
    files : list of pathlib.Path
        The DICOM objects (Part 10), in the order SEG, report, SR (those written).
    report_png : pathlib.Path or None
        The report page as PNG.
    volumes_mm3 : dict of str to float
        Label name to volume in mm^3.
    notes : list of str
        What was skipped and why.
    """

    files: list[Path] = field(default_factory=list)
    report_png: Path | None = None
    volumes_mm3: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def label_volumes_mm3(prediction: Prediction, card: ModelCard) -> dict[str, float]:
    """Volume of each card label in the prediction: voxel count times voxel volume.

    Returns
    -------
    dict of str to float
        Empty when the prediction has no label map.
    """
    if prediction.labels is None:
        return {}
    array = sitk.GetArrayViewFromImage(prediction.labels)
    voxel = voxel_volume_mm3(prediction.labels)
    return {
        spec.name: float(np.count_nonzero(array == spec.value)) * voxel
        for spec in card.outputs.labels
    }


def _save(ds: Dataset, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_results(
    job: Job,
    volumes: Mapping[str, Volume],
    prediction: Prediction,
    card: ModelCard,
    settings: ResultsSettings,
    out_dir: Path,
) -> ResultSet:
    """Write the SEG, report and SR of one job (as enabled in ``settings``).

    Parameters
    ----------
    job : aenode.records.Job
        The job: logging context, and with the card the deterministic result UIDs
        (:class:`ResultUids`) when it has an ``id``, so a rerun of the job replaces its
        objects at the PACS; without an ``id`` the UIDs are new each time.
    volumes : Mapping[str, Volume]
        Input role to volume; ``prediction.reference_role`` names the one results follow.
    prediction : aenode.records.Prediction
        The model's output on the reference grid.
    card : aenode.infer.cards.ModelCard
        Model identity, coded labels and classes.
    settings : aenode.config.ResultsSettings
        Which objects, binary or fractional SEG, empty SEG policy, series numbers.
    out_dir : pathlib.Path
        Created if missing; receives ``seg.dcm``, ``report.dcm``, ``report.png``, ``sr.dcm``.

    Returns
    -------
    ResultSet

    Raises
    ------
    ResultError
        If the reference role has no volume, or the prediction does not fit its grid.
    """
    try:
        volume = volumes[prediction.reference_role]
    except KeyError:
        raise ResultError(
            f"model {card.name}: no volume for reference role {prediction.reference_role!r} "
            f"(have {sorted(volumes)})"
        ) from None
    ctx = {
        "study": job.study_uid,
        "series": volume.series.series_uid,
        "model": card.name,
        "job": job.id,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    # A rerun of a recorded job (worker lost, restart, retry) writes the same SOP Instance
    # UIDs; a job outside the store (no id) gets new ones each time.
    uids = ResultUids.for_job(job, card.name, card.version) if job.id is not None else None
    result = ResultSet(volumes_mm3=label_volumes_mm3(prediction, card))
    result.notes.extend(prediction.notes)

    seg: Dataset | None = None
    if settings.seg and card.outputs.labels and prediction.labels is not None:
        empty = not any(v > 0 for v in result.volumes_mm3.values())
        if empty and settings.skip_empty_seg:
            result.notes.append("SEG skipped: the segmentation is empty (results.skip_empty_seg)")
        else:
            seg = build_seg(volume, prediction, card, settings, uids)
            result.files.append(_save(seg, out_dir / "seg.dcm"))
            if empty:
                result.notes.append("SEG written with empty segments: nothing was segmented")
    elif settings.seg and card.outputs.labels:
        result.notes.append("SEG not written: the prediction has no label map")

    if settings.report:
        page = render_page(volume, prediction, card, result.volumes_mm3)
        png = out_dir / "report.png"
        Image.fromarray(page, "RGB").save(png)
        result.report_png = png
        sc = build_report(
            volume, prediction, card, settings, result.volumes_mm3, page=page, uids=uids
        )
        result.files.append(_save(sc, out_dir / "report.dcm"))

    has_content = (
        result.volumes_mm3
        or prediction.class_probabilities
        or prediction.measurements
        or prediction.findings
    )
    if settings.sr and has_content:
        sr = build_sr(volume, prediction, card, settings, result.volumes_mm3, seg=seg, uids=uids)
        result.files.append(_save(sr, out_dir / "sr.dcm"))
    elif settings.sr:
        result.notes.append("SR not written: no volumes, class probabilities or measurements")

    log.info("results written: %s", ", ".join(p.name for p in result.files), extra=ctx)
    return result
