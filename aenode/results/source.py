"""What the result writers share: the source series, coded concepts, label masks, identity.

Each writer (``seg``, ``report``, ``sr``) builds one IOD from the same inputs: the reference
volume's source headers, the prediction on its grid and the model card.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.sr.codedict import codes

from aenode.config import ResultsSettings
from aenode.dicomread import unreadable_elements
from aenode.errors import InputError
from aenode.infer.cards import Code, LabelSpec, ModelCard
from aenode.infer.findings import findings_for
from aenode.records import Finding, Prediction, Volume
from aenode.version import __version__

__all__ = [
    "ResultError",
    "algorithm_identification",
    "coded",
    "findings_of",
    "label_masks",
    "reference_datasets",
    "series_description",
    "software_versions",
    "voxel_volume_mm3",
]

log = logging.getLogger(__name__)

# Type 2 patient/study attributes that highdicom copies from the source and that some real
# series (the HippoCrop crops) lack; empty is a valid Type 2 value.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


class ResultError(InputError):
    """A prediction or source that cannot be written as a result object; names the culprit."""


def coded(code: Code) -> hd.sr.CodedConcept:
    """A model card's code as a highdicom coded concept.

    Parameters
    ----------
    code : aenode.infer.cards.Code
        Value, coding scheme designator and meaning.

    Returns
    -------
    highdicom.sr.CodedConcept
    """
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def findings_of(prediction: Prediction, card: ModelCard) -> list[Finding]:
    """The prediction's classifier findings; decided from its probabilities when it has none.

    Parameters
    ----------
    prediction : aenode.records.Prediction
        ``findings``, or ``class_probabilities`` to decide them from by the card's head.
    card : aenode.infer.cards.ModelCard
        ``outputs.head`` and ``outputs.classes``.

    Returns
    -------
    list of aenode.records.Finding
        Empty for a segmentation.

    Raises
    ------
    ResultError
        If the probabilities do not name the card's classes.
    """
    if prediction.findings or card.task != "classification":
        return list(prediction.findings)
    if not prediction.class_probabilities:
        return []
    try:
        return findings_for(card, prediction.class_probabilities)
    except ValueError as exc:
        raise ResultError(str(exc)) from exc


def software_versions(card: ModelCard) -> list[str]:
    """``SoftwareVersions`` of every result: aenode's version and the model's.

    A list, not a tuple: pydicom accepts only lists for multi-valued elements.
    """
    return [f"aenode {__version__}", f"{card.name} {card.version}"[:64]]


def algorithm_identification(card: ModelCard) -> hd.AlgorithmIdentificationSequence:
    """The SEG's algorithm identification from the card (family defaults to AI)."""
    family = (
        coded(card.algorithm_family)
        if card.algorithm_family is not None
        else hd.sr.CodedConcept.from_code(codes.DCM.ArtificialIntelligence)  # DCM 123110
    )
    return hd.AlgorithmIdentificationSequence(
        name=card.name, family=family, version=card.version, source="aenode"
    )


def series_description(settings: ResultsSettings, card: ModelCard, kind: str) -> str:
    """The configured series description for one kind of result (``SEG``, ``report``, ``SR``)."""
    return settings.series_description.format(model=card.name, kind=kind)[:64]


def reference_datasets(volume: Volume) -> list[Dataset]:
    """The reference volume's source headers, with missing Type 2 attributes added empty.

    The source files are never changed: the headers are copied first.

    Raises
    ------
    ResultError
        If the volume carries no source headers.
    """
    if not volume.datasets:
        raise ResultError(
            f"series {volume.series.series_uid}: the volume has no source headers (datasets)"
        )
    out = []
    for ds in volume.datasets:
        ref = copy.copy(ds)
        for keyword, problem in unreadable_elements(ref).items():
            # A malformed element would break the result's copy of the modules: drop it
            # (Type 2 ones come back empty below).
            log.warning("source header: %s; left out of the results", problem)
            del ref[keyword]
        for keyword in _TYPE2:
            if keyword not in ref:
                setattr(ref, keyword, "")
        out.append(ref)
    return out


def voxel_volume_mm3(image: sitk.Image) -> float:
    """Volume of one voxel of ``image`` in mm^3."""
    return float(np.prod(image.GetSpacing()))


def label_masks(prediction: Prediction, labels: Sequence[LabelSpec], volume: Volume) -> np.ndarray:
    """One boolean mask per card label, shape (slices, rows, columns, labels).

    Parameters
    ----------
    prediction : aenode.records.Prediction
        Its ``labels`` image must be on the grid of ``volume``.
    labels : sequence of LabelSpec
        The card's labels; mask ``i`` holds the voxels equal to ``labels[i].value``.
    volume : aenode.records.Volume
        The reference volume.

    Raises
    ------
    ResultError
        If the prediction has no label map, or its grid differs from the volume's.
    """
    if prediction.labels is None:
        raise ResultError(f"model {prediction.model}: the prediction has no label map (labels)")
    if prediction.labels.GetSize() != volume.image.GetSize():
        raise ResultError(
            f"model {prediction.model}: label map size {prediction.labels.GetSize()} differs "
            f"from series {volume.series.series_uid} size {volume.image.GetSize()}"
        )
    if not np.allclose(prediction.labels.GetOrigin(), volume.image.GetOrigin(), atol=1e-3) or (
        not np.allclose(prediction.labels.GetDirection(), volume.image.GetDirection(), atol=1e-4)
    ):
        raise ResultError(
            f"model {prediction.model}: label map origin/direction differ from series "
            f"{volume.series.series_uid}"
        )
    array = sitk.GetArrayViewFromImage(prediction.labels)
    return np.stack([array == spec.value for spec in labels], axis=-1)
