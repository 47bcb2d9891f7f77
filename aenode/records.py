"""Typed records handed from one pipeline stage to the next.

receive -> assemble: rows in the store. assemble -> select: :class:`SeriesInfo`.
select -> volume/infer: :class:`Job`. volume -> infer: :class:`Volume`.
infer -> results: :class:`Prediction`. results -> export: files on disk listed in the outbox.
Each record is plain data, so that a stage could later run on another machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import SimpleITK as sitk
    from pydicom import Dataset

    from aenode.tilt import GeometryCorrection

__all__ = [
    "Finding",
    "FindingCode",
    "Job",
    "Measurement",
    "Prediction",
    "SeriesInfo",
    "Volume",
]


@dataclass(frozen=True)
class SeriesInfo:
    """A complete series (one revision) as handed on by assembly.

    Attributes
    ----------
    study_uid, series_uid : str
        Study and Series Instance UIDs.
    revision : int
        0 for the first completion; late instances open revision 1, 2, ...
    modality, description : str
        ``Modality`` and ``SeriesDescription`` (empty when absent).
    files : tuple of pathlib.Path
        The spooled Part 10 files of this revision (all instances of the series so far).
    completed_by : str
        Which condition completed it: ``count``, ``release``, ``quiet`` or ``max_wait``.
    first_arrival, last_arrival, completed_at : float
        Epoch seconds.
    """

    study_uid: str
    series_uid: str
    revision: int
    modality: str
    description: str
    files: tuple[Path, ...]
    completed_by: str = ""
    first_arrival: float = 0.0
    last_arrival: float = 0.0
    completed_at: float = 0.0


@dataclass
class Job:
    """One model run on one or more series selected by a rule.

    Attributes
    ----------
    rule : str
        The selection rule's name.
    model : str
        The model package's name.
    study_uid : str
        The study the inputs belong to (results go into it).
    inputs : dict of str to SeriesInfo
        Role name to series; a series-level rule uses the single role ``"image"``.
    id : int or None
        Row id in the store's ``jobs`` table once recorded.
    """

    rule: str
    model: str
    study_uid: str
    inputs: dict[str, SeriesInfo]
    id: int | None = None


@dataclass
class Volume:
    """A geometry-checked volume in patient (LPS) space built from one series.

    Attributes
    ----------
    image : SimpleITK.Image
        Voxel values after the modality LUT (float32, or int16 when exact), with origin,
        spacing and direction set; index order (x, y, z) = (column, row, slice).
    series : SeriesInfo
        The series it was built from.
    datasets : list of pydicom.Dataset
        The source instances' headers in slice order (Pixel Data dropped), one per slice
        (or one multi-frame object), for result objects to reference.
    correction : GeometryCorrection or None
        Set when gantry tilt was resampled away or a missing slice interpolated; the image
        then is not the acquired grid (``datasets`` lists only the acquired slices).
    """

    image: sitk.Image
    series: SeriesInfo
    datasets: list[Dataset] = field(default_factory=list)
    correction: GeometryCorrection | None = None


@dataclass(frozen=True)
class FindingCode:
    """A coded concept of a finding (the card's ``outputs.classes[].code``).

    Attributes
    ----------
    value, scheme, meaning : str
        Code value, coding scheme designator (``SCT``, ``RADLEX``, ...) and code meaning.
    """

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Finding:
    """One classifier finding, decided by the card's output head.

    A softmax head gives one finding per prediction (the most probable class, ``present``
    True, ``threshold`` None); a sigmoid head gives one finding per class, present when its
    probability reaches the class's threshold.

    Attributes
    ----------
    name : str
        The class name from the card.
    probability : float
        The class's probability in [0, 1].
    present : bool
        Whether the finding is reported as present.
    threshold : float or None
        The decision threshold used (sigmoid head); None for a softmax head (argmax).
    code : FindingCode or None
        The class's code from the card, if it has one.
    """

    name: str
    probability: float
    present: bool
    threshold: float | None = None
    code: FindingCode | None = None


@dataclass(frozen=True)
class Measurement:
    """One numeric result of a model (a volume, a ratio, a probability).

    The SR writer puts each one in a numeric content item; the report page lists them.

    Attributes
    ----------
    name : str
        What was measured, e.g. ``"Infarct core volume"``.
    value : float
        The value in ``unit``.
    unit : str
        UCUM unit: ``"ml"``, ``"mm3"``, ``"{ratio}"``, ``"1"``.
    code : FindingCode or None
        Concept name code for the SR numeric item (DCM, SCT, ...); None gives a local code.
    probability : bool
        True when ``value`` is a probability in [0, 1] (the SR concept then reads as one).
    """

    name: str
    value: float
    unit: str
    code: FindingCode | None = None
    probability: bool = False


@dataclass
class Prediction:
    """What a model produced for one job, in the geometry of the input series.

    Attributes
    ----------
    model, version : str
        The model card's name and version.
    task : str
        ``segmentation`` or ``classification``.
    labels : SimpleITK.Image or None
        Label map (uint8, 0 background) on the grid of the reference input volume.
    probabilities : numpy.ndarray or None
        Per-label probabilities, shape (labels, slices, rows, columns), float32 in [0, 1],
        kept when a fractional segmentation is asked for.
    class_probabilities : dict of str to float or None
        Classifier output per class name, after the card's head (softmax or sigmoid).
    findings : list of Finding
        Classifier findings decided from ``class_probabilities`` by the head (one for
        softmax, one per class for sigmoid); empty for segmentation.
    reference_role : str
        The input role whose geometry ``labels`` follows.
    timings : dict of str to float
        Seconds per step (``preprocess``, ``infer``, ``postprocess``).
    notes : list of str
        What the runtime did that a reader should know (e.g. an input cropped to the card's
        fixed size, a missing optional role filled with zeros).
    extra : dict
        Device and batch size of the run.
    measurements : list of Measurement
        Numeric results (volumes, ratios, probabilities) for the SR and the report page.
    key_slices : list of int
        Slice indices (k, in the order of the reference Volume's ``datasets``) that drove
        the result; the SR references them and the report page shows them.
    display_window : tuple of float or None
        ``(center, width)`` for the report page's images, e.g. ``(40, 80)``; None: automatic.
    """

    model: str
    version: str
    task: str
    labels: sitk.Image | None = None
    probabilities: np.ndarray | None = None
    class_probabilities: dict[str, float] | None = None
    findings: list[Finding] = field(default_factory=list)
    reference_role: str = "image"
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    key_slices: list[int] = field(default_factory=list)
    display_window: tuple[float, float] | None = None
