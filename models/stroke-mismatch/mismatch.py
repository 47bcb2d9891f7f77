"""stroke-mismatch: infarct core and DWI-FLAIR mismatch from DWI, ADC and FLAIR (no learning).

The node's entry point (``runtime.format: python``, ``entry_point: mismatch.py:predict``) is
:func:`predict`: ``predict(volumes, state, card)`` with the role volumes as
:class:`aenode.records.Volume`, the :class:`Parameters` that :func:`load` made from the
card's ``runtime.parameters``, and the card; it returns an :class:`aenode.records.Prediction`.
The pipeline itself is :func:`analyse`: it takes the three role volumes as SimpleITK images
in LPS (as :func:`aenode.volume.build_volume` builds them from DICOM, or read from NIfTI) and
returns a label map on the DWI grid (uint8, 1 = infarct core) and a dict of results.

Steps, each a pure function of its inputs:

1. :func:`brain_mask` on DWI (Otsu, largest component, closed, holes filled, one voxel eroded
   so that the skull-base and cortical rim, where susceptibility makes DWI bright and ADC
   low, does not seed false core).
2. :func:`adc_scale`: ADC units from the median ADC in the brain (integers in 1e-6 mm^2/s as
   vendors store them, or floats in 1e-3 mm^2/s); anything else is refused.
3. :func:`infarct_core`: ADC < 620e-6 mm^2/s (Purushotham et al. 2015) and above an artefact
   floor, within DWI-hyperintense tissue (DWI above the brain median plus three robust SD),
   connected components of at least ``min_component_ml``.
4. :func:`register_flair`: FLAIR rigidly registered to DWI (Mattes mutual information,
   Euler3D, three resolution levels, fixed seed), with the residual.
5. :func:`mirror_transform`: the mid-sagittal plane by flip-and-register of DWI onto itself.
6. :func:`relative_flair_signal` and :func:`onset_probability`: FLAIR rSI of the core against
   the mirrored region, mapped to P(onset < 4.5 h) by a logistic whose coefficients (and
   where they come from) are in the card.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from aenode.errors import InputError
from aenode.records import Finding, FindingCode, Measurement, Prediction

if TYPE_CHECKING:
    import torch

    from aenode.infer.cards import ModelCard
    from aenode.records import Volume

__all__ = [
    "ROLES",
    "MismatchError",
    "Parameters",
    "Registration",
    "adc_scale",
    "analyse",
    "brain_mask",
    "infarct_core",
    "load",
    "mirror_transform",
    "onset_probability",
    "predict",
    "register_flair",
    "relative_flair_signal",
]

ROLES = ("dwi", "adc", "flair")
_GRID_TOL = 1e-3  # mm / direction cosine: the tolerance for "the same grid"


class MismatchError(InputError, ValueError):
    """An input this model cannot use; the message names the role (and series) and why.

    Parameters
    ----------
    role : str
        ``dwi``, ``adc`` or ``flair``.
    reason : str
        What is wrong with it.
    series : str or None
        The series (SeriesInstanceUID or description) when the caller knows it.
    """

    def __init__(self, role: str, reason: str, series: str | None = None) -> None:
        self.role = role
        self.reason = reason
        self.series = series
        where = role.upper() if series is None else f"{role.upper()} series {series}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Parameters:
    """Every number the pipeline uses; the card's ``runtime.parameters`` carries the same.

    ADC values are in 1e-6 mm^2/s, volumes in mL, distances in mm.
    """

    adc_core_below: float = 620.0
    adc_artefact_below: float = 100.0
    csf_adc_above: float = 1500.0
    dwi_robust_z: float = 3.0
    min_component_ml: float = 0.1
    brain_erode_voxels: int = 1
    adc_tissue_median_range: tuple[float, float] = (300.0, 3000.0)
    registration_bins: int = 32
    registration_sampling: float = 0.1
    registration_seed: int = 20111
    registration_iterations: int = 100
    registration_shrink: tuple[int, int, int] = (4, 2, 1)
    registration_sigmas_mm: tuple[float, float, float] = (4.0, 2.0, 0.0)
    logistic_intercept: float = 10.32
    logistic_slope: float = -8.73
    mismatch_rsi_below: float = 1.15
    min_reference_ml: float = 0.1

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Parameters:
        """Parameters from a card's ``runtime.parameters`` mapping.

        Parameters
        ----------
        values : Mapping
            Names as the fields of this class; lists become tuples.

        Returns
        -------
        Parameters

        Raises
        ------
        ValueError
            A name that is not a parameter (named in the message).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown stroke-mismatch parameter(s): {', '.join(unknown)}")
        converted: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
        }
        return cls(**converted)


@dataclass(frozen=True)
class Registration:
    """FLAIR registered to DWI: the resampled FLAIR, the transform and the residual.

    ``metric_start`` and ``metric_final`` are Mattes mutual information (negative: lower is
    better) over every DWI voxel, against the FLAIR averaged to about the DWI's voxel size,
    at the scanner geometry and after registration. ``head_dice`` is the Dice of the head
    masks of DWI and of the registered FLAIR; ``rotation_deg`` and ``translation_mm`` are the
    motion found.
    """

    flair: sitk.Image
    transform: sitk.Euler3DTransform
    metric_start: float
    metric_final: float
    head_dice: float
    rotation_deg: float
    translation_mm: float
    iterations: int
    stop: str


def _uint8(image: sitk.Image) -> sitk.Image:
    out: sitk.Image = sitk.Cast(image, sitk.sitkUInt8)
    return out


def _float(image: sitk.Image) -> sitk.Image:
    out: sitk.Image = sitk.Cast(image, sitk.sitkFloat32)
    return out


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=_GRID_TOL)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=_GRID_TOL)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=_GRID_TOL)
    )


def _voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0


def _head_mask(image: sitk.Image) -> sitk.Image:
    """Otsu on the smoothed image, largest component, closed, holes filled."""
    smooth = sitk.SmoothingRecursiveGaussian(_float(image), 2.0)
    fg = sitk.OtsuThreshold(smooth, 0, 1)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(fg), sortByObjectSize=True) == 1
    closed = sitk.BinaryMorphologicalClosing(largest, [2, 2, 2])
    return _uint8(sitk.BinaryFillhole(closed))


def brain_mask(dwi: sitk.Image, erode_voxels: int = 1) -> sitk.Image:
    """The brain on a b~1000 DWI: Otsu foreground, largest component, eroded.

    At b~1000 with fat suppression, scalp and CSF are dark, so Otsu's threshold separates
    brain parenchyma from background; closing and hole filling take the ventricles back in.

    Parameters
    ----------
    dwi : SimpleITK.Image
        Trace-weighted DWI.
    erode_voxels : int
        Erosion radius in voxels after filling (0 for none).

    Returns
    -------
    SimpleITK.Image
        uint8 mask on the DWI grid.

    Raises
    ------
    MismatchError
        When no foreground is found (an empty or constant DWI).
    """
    stats = sitk.StatisticsImageFilter()
    stats.Execute(_float(dwi))
    if not stats.GetMaximum() > stats.GetMinimum():
        raise MismatchError("dwi", "the image is constant; no brain can be found")
    mask = _head_mask(dwi)
    if erode_voxels > 0:
        mask = sitk.BinaryErode(mask, [erode_voxels] * 3)
    if not sitk.GetArrayViewFromImage(mask).any():
        raise MismatchError("dwi", "no brain found (empty mask after Otsu thresholding)")
    return _uint8(mask)


def adc_scale(
    adc: sitk.Image, brain: sitk.Image, tissue_range: tuple[float, float] = (300.0, 3000.0)
) -> tuple[float, str]:
    """The factor that brings ADC to 1e-6 mm^2/s, judged from its median in the brain.

    Brain tissue (with some CSF) has a median ADC of about 700-1100e-6 mm^2/s. Vendors store
    ADC as integers in 1e-6 mm^2/s (Siemens, GE, Philips), some pipelines as floats in 1e-3
    mm^2/s (0.7-1.1). The median in the brain tells which, when it falls in ``tissue_range``
    or that range divided by 1000.

    Parameters
    ----------
    adc : SimpleITK.Image
        ADC on the DWI grid.
    brain : SimpleITK.Image
        Brain mask on the same grid.
    tissue_range : tuple of float
        Plausible median ADC in the brain, in 1e-6 mm^2/s.

    Returns
    -------
    tuple of (float, str)
        The factor (1 or 1000) and the unit found (``1e-6 mm2/s`` or ``1e-3 mm2/s``).

    Raises
    ------
    MismatchError
        When the median fits neither unit (all zeros, a different scaling, not an ADC map).
    """
    values = sitk.GetArrayViewFromImage(adc)[sitk.GetArrayViewFromImage(brain) > 0]
    median = float(np.median(values)) if values.size else float("nan")
    lo, hi = tissue_range
    if lo <= median <= hi:
        return 1.0, "1e-6 mm2/s"
    if lo / 1000.0 <= median <= hi / 1000.0:
        return 1000.0, "1e-3 mm2/s"
    raise MismatchError(
        "adc",
        f"median ADC in the brain is {median:.6g}, which fits neither 1e-6 mm^2/s "
        f"({lo:g}-{hi:g}) nor 1e-3 mm^2/s ({lo / 1000:g}-{hi / 1000:g}); "
        "refusing to guess the units",
    )


def infarct_core(
    dwi: sitk.Image, adc_um2: sitk.Image, brain: sitk.Image, params: Parameters
) -> sitk.Image:
    """Infarct core: low ADC in DWI-hyperintense brain, components above a minimum volume.

    Parameters
    ----------
    dwi : SimpleITK.Image
        Trace-weighted DWI.
    adc_um2 : SimpleITK.Image
        ADC in 1e-6 mm^2/s on the DWI grid.
    brain : SimpleITK.Image
        Brain mask on the DWI grid.
    params : Parameters
        ``adc_core_below``, ``adc_artefact_below``, ``dwi_robust_z``, ``min_component_ml``.

    Returns
    -------
    SimpleITK.Image
        uint8 label map on the DWI grid, 1 = core.
    """
    d = sitk.GetArrayViewFromImage(dwi).astype(np.float32)
    a = sitk.GetArrayViewFromImage(adc_um2)
    b = sitk.GetArrayViewFromImage(brain) > 0
    median = float(np.median(d[b]))
    robust_sd = 1.4826 * float(np.median(np.abs(d[b] - median)))
    bright = d > median + params.dwi_robust_z * robust_sd
    core = b & bright & (a < params.adc_core_below) & (a >= params.adc_artefact_below)
    image = sitk.GetImageFromArray(core.astype(np.uint8))
    image.CopyInformation(dwi)
    min_voxels = math.ceil(params.min_component_ml / _voxel_ml(dwi))
    labels = sitk.RelabelComponent(
        sitk.ConnectedComponent(image), minimumObjectSize=min_voxels, sortByObjectSize=True
    )
    return _uint8(labels > 0)


def register_flair(
    flair: sitk.Image, dwi: sitk.Image, head: sitk.Image, params: Parameters
) -> Registration:
    """Rigidly register FLAIR (moving) to DWI (fixed) by Mattes mutual information.

    Starts from the scanner geometry (both series share the frame of reference), then a
    three-level (``registration_shrink``, ``registration_sigmas_mm``) Euler3D optimisation
    with regular-step gradient descent and physical-shift scales, sampling a fixed share of
    the DWI grid with a fixed seed, on one thread: the same inputs give the same transform.

    Parameters
    ----------
    flair : SimpleITK.Image
        FLAIR in LPS.
    dwi : SimpleITK.Image
        DWI (the fixed grid).
    head : SimpleITK.Image
        DWI head mask, compared with the registered FLAIR's for the residual.
    params : Parameters
        The ``registration_*`` fields.

    Returns
    -------
    Registration

    Raises
    ------
    MismatchError
        When the FLAIR is constant or the optimiser fails.
    """
    stats = sitk.StatisticsImageFilter()
    stats.Execute(_float(flair))
    if not stats.GetMaximum() > stats.GetMinimum():
        raise MismatchError("flair", "the image is constant; it cannot be registered")
    fixed = _float(dwi)
    # average FLAIR down to about the DWI's voxel size for the optimisation: the metric
    # samples the DWI grid anyway, and a 512x512 moving pyramid costs far more than it gives
    factors = [
        max(1, round(d / f)) for d, f in zip(dwi.GetSpacing(), flair.GetSpacing(), strict=True)
    ]
    moving = sitk.BinShrink(_float(flair), factors)
    initial = sitk.Euler3DTransform()
    initial.SetCenter(
        dwi.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in dwi.GetSize()])
    )

    def method() -> sitk.ImageRegistrationMethod:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(params.registration_bins)
        # no SetMetricFixedMask: with it the optimiser climbed away from the optimum on the
        # ISLES case (MI -0.12 -> -0.03); DWI background is dark, so little is lost
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetNumberOfThreads(1)  # the metric's sums then never depend on thread count
        return reg

    reg = method()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(params.registration_sampling, params.registration_seed)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0,
        minStep=1e-3,
        numberOfIterations=params.registration_iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(params.registration_shrink))
    reg.SetSmoothingSigmasPerLevel(list(params.registration_sigmas_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(sitk.Euler3DTransform(initial), inPlace=False)
    try:
        found = reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise MismatchError("flair", f"registration to DWI failed: {exc}") from exc
    transform = sitk.Euler3DTransform(sitk.CompositeTransform(found).GetNthTransform(0))

    def metric(t: sitk.Transform) -> float:
        probe = method()  # full sampling at full resolution: comparable, deterministic
        probe.SetInitialTransform(t)
        return float(probe.MetricEvaluate(fixed, moving))

    registered = sitk.Resample(_float(flair), fixed, transform, sitk.sitkLinear, 0.0)
    head_dice = _dice(
        sitk.GetArrayFromImage(_head_mask(registered)) > 0,  # a copy: a view of a temporary dangles
        sitk.GetArrayViewFromImage(head) > 0,
    )
    angles = np.degrees(np.abs(transform.GetParameters()[:3]))
    return Registration(
        flair=registered,
        transform=transform,
        metric_start=metric(initial),
        metric_final=metric(transform),
        head_dice=head_dice,
        rotation_deg=float(np.linalg.norm(angles)),
        translation_mm=float(np.linalg.norm(transform.GetTranslation())),
        iterations=int(reg.GetOptimizerIteration()),
        stop=reg.GetOptimizerStopConditionDescription(),
    )


def mirror_transform(dwi: sitk.Image, brain: sitk.Image, params: Parameters) -> sitk.Transform:
    """A map from each point to its contralateral homologue across the mid-sagittal plane.

    The DWI is reflected across the plane x = (brain centroid x) of LPS space (left-right),
    then the reflected image is rigidly registered back onto the original (correlation, in
    the brain mask): the registration absorbs the head's yaw, roll and off-centre position.
    The result ``M = F o T`` (reflection after the rigid fit) sends a point of one
    hemisphere to the matching point of the other. A lesion is small against the brain, so
    it barely moves the fit.

    Parameters
    ----------
    dwi : SimpleITK.Image
        DWI.
    brain : SimpleITK.Image
        Brain mask on the DWI grid.
    params : Parameters
        ``registration_*`` fields (shrink, sigmas, iterations, seed, sampling).

    Returns
    -------
    SimpleITK.Transform
        The composite mirror map in physical (LPS) space.
    """
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(brain)
    centre = np.array(shape.GetCentroid(1))
    flip = sitk.AffineTransform(3)
    flip.SetMatrix([-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    flip.SetCenter(centre.tolist())
    fixed = sitk.Mask(_float(dwi), brain)
    flipped = sitk.Resample(fixed, fixed, flip, sitk.sitkLinear, 0.0)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()  # the fixed image is masked to the brain instead
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(params.registration_sampling, params.registration_seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetNumberOfThreads(1)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=params.registration_iterations
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(params.registration_shrink))
    reg.SetSmoothingSigmasPerLevel(list(params.registration_sigmas_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    start = sitk.Euler3DTransform()
    start.SetCenter(centre.tolist())
    reg.SetInitialTransform(start, inPlace=False)
    try:
        found = reg.Execute(fixed, flipped)
    except RuntimeError as exc:
        raise MismatchError("dwi", f"mid-sagittal plane not found: {exc}") from exc
    rigid = sitk.CompositeTransform(found).GetNthTransform(0)
    return sitk.CompositeTransform([flip, rigid])  # applied right to left: rigid, then flip


def relative_flair_signal(
    flair: sitk.Image,
    core: sitk.Image,
    brain: sitk.Image,
    adc_um2: sitk.Image,
    mirror: sitk.Transform,
    params: Parameters,
) -> tuple[float | None, float]:
    """FLAIR rSI: mean FLAIR in the core over mean FLAIR in its mirror image.

    The reference is the core mapped across the mid-sagittal plane, keeping only mirrored
    points that are brain, not CSF (ADC above ``csf_adc_above``, FLAIR suppresses CSF and
    would raise the ratio) and not core themselves (bilateral lesions).

    Parameters
    ----------
    flair : SimpleITK.Image
        FLAIR registered to the DWI grid.
    core : SimpleITK.Image
        Core mask on the DWI grid.
    brain : SimpleITK.Image
        Brain mask on the DWI grid.
    adc_um2 : SimpleITK.Image
        ADC in 1e-6 mm^2/s on the DWI grid.
    mirror : SimpleITK.Transform
        From :func:`mirror_transform`.
    params : Parameters
        ``csf_adc_above`` and ``min_reference_ml``.

    Returns
    -------
    tuple of (float or None, float)
        rSI (None without a core or a usable reference) and the reference volume in mL.
    """
    c = sitk.GetArrayViewFromImage(core) > 0
    if not c.any():
        return None, 0.0

    def mirrored(image: sitk.Image, interpolator: int) -> np.ndarray:
        out = sitk.Resample(image, core, mirror, interpolator, 0.0)
        return sitk.GetArrayFromImage(out)

    flair_m = mirrored(_float(flair), sitk.sitkLinear)
    brain_m = mirrored(brain, sitk.sitkNearestNeighbor) > 0
    core_m = mirrored(core, sitk.sitkNearestNeighbor) > 0
    adc_m = mirrored(_float(adc_um2), sitk.sitkLinear)
    reference = c & brain_m & ~core_m & (adc_m <= params.csf_adc_above)
    reference_ml = float(reference.sum()) * _voxel_ml(core)
    if reference_ml < params.min_reference_ml:
        return None, reference_ml
    f = sitk.GetArrayViewFromImage(flair)
    denominator = float(flair_m[reference].mean())
    if denominator <= 0:
        return None, reference_ml
    return float(f[reference].mean()) / denominator, reference_ml


def onset_probability(rsi: float, params: Parameters) -> float:
    """P(onset < 4.5 h) = 1 / (1 + exp(-(intercept + slope * rSI))).

    Parameters
    ----------
    rsi : float
        Relative FLAIR signal of the core.
    params : Parameters
        ``logistic_intercept`` and ``logistic_slope`` (see the card for their derivation).

    Returns
    -------
    float
        In [0, 1].
    """
    z = params.logistic_intercept + params.logistic_slope * rsi
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _check_inputs(
    volumes: Mapping[str, sitk.Image], series: Mapping[str, str]
) -> dict[str, sitk.Image]:
    out: dict[str, sitk.Image] = {}
    for role in ROLES:
        image = volumes.get(role)
        if image is None:
            raise MismatchError(role, "missing; the model needs dwi, adc and flair")
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise MismatchError(role, "not a scalar 3D volume", series.get(role))
        if min(image.GetSize()) < 4:
            raise MismatchError(role, f"too small a volume {image.GetSize()}", series.get(role))
        out[role] = image
    return out


def analyse(
    volumes: Mapping[str, sitk.Image],
    params: Parameters | None = None,
    series: Mapping[str, str] | None = None,
) -> tuple[sitk.Image, dict[str, Any]]:
    """Infarct core and DWI-FLAIR mismatch of one study.

    The pipeline of :func:`predict`, on plain images; see :func:`_analyse` for the images it
    also makes for the report page.

    Parameters
    ----------
    volumes : Mapping of str to SimpleITK.Image
        ``dwi`` (trace-weighted, b about 1000), ``adc`` and ``flair`` in LPS.
    params : Parameters or None
        Defaults to :class:`Parameters` (the values of the card).
    series : Mapping of str to str or None
        Optional role -> series identifier, used in error messages only.

    Returns
    -------
    tuple of (SimpleITK.Image, dict)
        The uint8 label map on the DWI grid (1 = infarct core) and the results:
        ``core_ml``, ``rsi`` (None without a core), ``p_onset_lt_4_5h`` (None without an
        rSI), ``mismatch`` (bool or None), ``adc_unit``, ``adc_scale``, the registration
        residual (``registration_metric_start``, ``registration_metric_final``,
        ``registration_head_dice``, ``registration_rotation_deg``,
        ``registration_translation_mm``, ``registration_iterations``, and the Euler3D
        transform from DWI to FLAIR points as ``registration_parameters`` (three angles in
        radians, translation in mm) about ``registration_center``),
        ``reference_ml``, ``brain_ml`` and ``seconds``.

    Raises
    ------
    MismatchError
        A missing or unusable role, ADC in implausible units, a registration that fails.
    """
    core, results, _ = _analyse(volumes, params, series)
    return core, results


def _analyse(
    volumes: Mapping[str, sitk.Image],
    params: Parameters | None,
    series: Mapping[str, str] | None,
) -> tuple[sitk.Image, dict[str, Any], dict[str, sitk.Image]]:
    """:func:`analyse`, plus ADC and the registered FLAIR on the DWI grid (for display)."""
    t0 = time.perf_counter()
    p = params or Parameters()
    names = dict(series or {})
    v = _check_inputs(volumes, names)
    dwi = _float(v["dwi"])
    adc = _float(v["adc"])
    if not _same_grid(adc, dwi):
        adc = sitk.Resample(adc, dwi, sitk.Transform(), sitk.sitkLinear, 0.0)
    try:
        brain = brain_mask(dwi, p.brain_erode_voxels)
        head = _head_mask(dwi)
    except MismatchError as exc:
        raise MismatchError("dwi", exc.reason, names.get("dwi")) from exc
    try:
        scale, unit = adc_scale(adc, brain, p.adc_tissue_median_range)
    except MismatchError as exc:
        raise MismatchError("adc", exc.reason, names.get("adc")) from exc
    adc_um2 = adc * scale
    core = infarct_core(dwi, adc_um2, brain, p)
    try:
        reg = register_flair(v["flair"], dwi, head, p)
    except MismatchError as exc:
        raise MismatchError("flair", exc.reason, names.get("flair")) from exc
    mirror = mirror_transform(dwi, brain, p)
    rsi, reference_ml = relative_flair_signal(reg.flair, core, brain, adc_um2, mirror, p)
    probability = None if rsi is None else onset_probability(rsi, p)
    core_ml = float(sitk.GetArrayViewFromImage(core).sum()) * _voxel_ml(dwi)
    results: dict[str, Any] = {
        "core_ml": core_ml,
        "rsi": rsi,
        "p_onset_lt_4_5h": probability,
        "mismatch": None if rsi is None else rsi < p.mismatch_rsi_below,
        "adc_unit": unit,
        "adc_scale": scale,
        "registration_metric_start": reg.metric_start,
        "registration_metric_final": reg.metric_final,
        "registration_head_dice": reg.head_dice,
        "registration_rotation_deg": reg.rotation_deg,
        "registration_translation_mm": reg.translation_mm,
        "registration_iterations": reg.iterations,
        "registration_parameters": list(reg.transform.GetParameters()),
        "registration_center": list(reg.transform.GetCenter()),
        "reference_ml": reference_ml,
        "brain_ml": float(sitk.GetArrayViewFromImage(brain).sum()) * _voxel_ml(dwi),
        "parameters": asdict(p),
        "seconds": time.perf_counter() - t0,
    }
    return core, results, {"adc": adc_um2, "flair": reg.flair}


# -- the node's entry point (runtime.format: python) -------------------------------------


def load(package: Path, card: ModelCard, device: torch.device) -> Parameters:
    """The state kept warm between jobs: the card's parameters, checked once.

    Parameters
    ----------
    package : pathlib.Path
        The package folder (unused: nothing to read besides the card).
    card : aenode.infer.cards.ModelCard
        ``runtime.parameters`` become :class:`Parameters`.
    device : torch.device
        Unused: the pipeline runs on the CPU (SimpleITK).

    Returns
    -------
    Parameters

    Raises
    ------
    ValueError
        A parameter that is not one of :class:`Parameters` (the node then refuses to start).
    """
    return Parameters.from_mapping(card.runtime.parameters)


def _code(card: ModelCard, name: str) -> FindingCode | None:
    for spec in card.outputs.classes:
        if spec.name == name and spec.code is not None:
            return FindingCode(spec.code.value, spec.code.scheme, spec.code.meaning)
    return None


def _key_slices(core: sitk.Image, limit: int = 2) -> list[int]:
    """The slices (k) with the largest core area, at most ``limit``, in ascending order."""
    areas = sitk.GetArrayViewFromImage(core).sum(axis=(1, 2))
    if not areas.any():
        return []
    order = [int(k) for k in np.argsort(-areas, kind="stable")[:limit] if areas[k] > 0]
    return sorted(order)


MISMATCH = "DWI-FLAIR mismatch"
ONSET = "Onset < 4.5 h"


def predict(volumes: Mapping[str, Volume], state: Parameters, card: ModelCard) -> Prediction:
    """The node's entry point: :func:`analyse` on the role volumes, as a Prediction.

    Parameters
    ----------
    volumes : Mapping of str to aenode.records.Volume
        ``dwi``, ``adc`` and ``flair``.
    state : Parameters
        From :func:`load`.
    card : aenode.infer.cards.ModelCard
        Identity, and the codes of the classes ``DWI-FLAIR mismatch`` and ``Onset < 4.5 h``.

    Returns
    -------
    aenode.records.Prediction
        ``labels``: the core on the DWI grid; ``measurements``: core volume (mL), rSI and
        P(onset < 4.5 h) (the latter two when there is a core with a usable mirror region);
        ``findings``: the DWI-FLAIR mismatch (a rule, rSI < ``mismatch_rsi_below``: its
        probability is 1 or 0) and onset < 4.5 h (P >= the class threshold); the two slices
        of largest core area as ``key_slices``; ADC and the registered FLAIR on the DWI grid
        as ``extra["display_images"]``; the registration residual and ADC unit as notes.

    Raises
    ------
    MismatchError
        A missing or unusable role, ADC in implausible units, a failed registration.
    """
    images = {role: v.image for role, v in volumes.items()}
    series = {role: v.series.series_uid for role, v in volumes.items()}
    core, r, shown = _analyse(images, state, series)
    measurements = [Measurement("Infarct core volume", round(r["core_ml"], 4), "ml")]
    findings = []
    notes = [
        f"ADC read as {r['adc_unit']}; infarct core: ADC < {state.adc_core_below:g}e-6 mm2/s "
        "in DWI-hyperintense brain",
        f"FLAIR registered to DWI: Mattes MI {r['registration_metric_start']:.3f} -> "
        f"{r['registration_metric_final']:.3f}, head-mask Dice "
        f"{r['registration_head_dice']:.3f}, {r['registration_rotation_deg']:.1f} deg / "
        f"{r['registration_translation_mm']:.1f} mm",
    ]
    if r["rsi"] is not None:
        p = float(r["p_onset_lt_4_5h"])
        measurements += [
            Measurement("Relative FLAIR signal of the core", round(r["rsi"], 4), "{ratio}"),
            Measurement("Onset < 4.5 h", p, "1", code=_code(card, ONSET), probability=True),
        ]
        threshold = next((c.threshold for c in card.outputs.classes if c.name == ONSET), 0.5)
        mismatch = bool(r["mismatch"])
        findings = [
            Finding(MISMATCH, 1.0 if mismatch else 0.0, mismatch, None, _code(card, MISMATCH)),
            Finding(ONSET, p, p >= threshold, threshold, _code(card, ONSET)),
        ]
        notes.append(
            "P(onset < 4.5 h) is a surrogate from the DWI-FLAIR mismatch (fixed logistic of "
            "rSI, not fitted to onset times); research use only"
        )
    elif r["core_ml"] > 0:
        notes.append("no rSI: too little contralateral reference tissue for the core")
    else:
        notes.append("no infarct core found: no rSI, no probability")
    return Prediction(
        model=card.name,
        version=card.version,
        task=card.task,
        labels=core,
        findings=findings,
        reference_role="dwi",
        measurements=measurements,
        key_slices=_key_slices(core),
        notes=notes,
        extra={"display_images": {"ADC": shown["adc"], "FLAIR registered": shown["flair"]}},
    )
