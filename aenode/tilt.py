"""Gantry-tilt correction and single-gap interpolation for a sorted stack of slices.

A CT acquired with a tilted gantry has slice planes that are parallel to each other but whose
``ImagePositionPatient`` moves off the slice normal by the same in-plane amount at every step:
the stack is sheared. Each slice is still exactly one plane of an orthogonal grid whose axes
are the row and column cosines and their normal; only its in-plane origin is shifted. The
correction is therefore a pure in-plane translation of every slice by its shift (bilinear
interpolation), onto a grid widened just enough to hold every shifted slice, which is what
dcm2niix does (``nii_saveNII3Dtilt``). The shift is read from the positions (their linear drift
against the distance along the normal), never from ``GantryDetectorTilt`` alone, whose sign
convention differs between vendors; the tag, when present, must agree with the angle the
positions show.

A single missing slice (one step of twice the series' spacing) is filled by linear
interpolation between its two neighbours on the corrected grid, that is along the normal. Two
or more missing slices stay an error naming the gap: interpolating across them would invent
anatomy.

The functions are pure: geometry and pixels in, a SimpleITK image and a
:class:`GeometryCorrection` record out.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

__all__ = [
    "CORRECTABLE",
    "MAX_INTERPOLATED",
    "CorrectionMethod",
    "GeometryCorrection",
    "StackError",
    "correct_stack",
]

CORRECTABLE = frozenset({"tilt", "gaps"})
MAX_INTERPOLATED = 1  # slices; more than this stays a rejection
_TAG_TOLERANCE_DEG = 0.25  # GantryDetectorTilt against the angle the positions show
_SHEAR_TOL_PX = 0.05  # in-plane drift below this (pixels over the whole stack) is no tilt
_LINE_TOL_PX = 0.1  # positions off the fitted shear line by more than this: not one tilt


class StackError(ValueError):
    """A stack that cannot be corrected; the message is the reason, naming the slices."""


class CorrectionMethod(StrEnum):
    """What was done to the acquired grid."""

    TILT_SHEAR = "tilt-shear-bilinear"
    """Each slice translated in its plane by its shear offset, bilinear (as dcm2niix)."""
    GAP_LINEAR = "gap-linear"
    """A missing slice filled linearly from its two neighbours along the normal."""


@dataclass(frozen=True)
class GeometryCorrection:
    """The record of a correction, to keep with the job and print on result pages.

    Attributes
    ----------
    methods : tuple of CorrectionMethod
        What was applied, in order.
    tilt_degrees : float
        The tilt the positions show (0 when not sheared).
    gantry_tilt_tag : float or None
        ``GantryDetectorTilt`` as stored, when present.
    shift_mm : tuple of float
        In-plane shift of the stack per mm along the normal, along the row and the column
        cosine (the shear; ``tan(tilt)`` in magnitude).
    added_columns, added_rows : int
        How much wider and taller the corrected grid is than the acquired slices.
    interpolated_indices : tuple of int
        Slice indices (0-based, along the normal) of the corrected volume that were
        interpolated rather than acquired.
    interpolated_positions : tuple of tuple of float
        Their positions (the first voxel's centre, LPS mm) on the corrected grid.
    """

    methods: tuple[CorrectionMethod, ...]
    tilt_degrees: float
    gantry_tilt_tag: float | None
    shift_mm: tuple[float, float]
    added_columns: int
    added_rows: int
    interpolated_indices: tuple[int, ...] = ()
    interpolated_positions: tuple[tuple[float, float, float], ...] = ()

    def describe(self) -> str:
        """One line for a log, a report page or an SR text item."""
        parts = []
        if CorrectionMethod.TILT_SHEAR in self.methods:
            tag = (
                ""
                if self.gantry_tilt_tag is None
                else f" (GantryDetectorTilt {self.gantry_tilt_tag:g})"
            )
            parts.append(
                f"gantry tilt of {self.tilt_degrees:.2f} degrees{tag} corrected by resampling "
                f"each slice onto an orthogonal grid ({self.methods[0].value})"
            )
        if self.interpolated_indices:
            where = ", ".join(
                f"slice {i} at [{', '.join(f'{c:.2f}' for c in p)}]"
                for i, p in zip(self.interpolated_indices, self.interpolated_positions, strict=True)
            )
            parts.append(
                f"{len(self.interpolated_indices)} missing slice(s) interpolated "
                f"({CorrectionMethod.GAP_LINEAR.value}): {where}"
            )
        return "; ".join(parts) if parts else "no correction"


def _writable_view(image: sitk.Image) -> np.ndarray:
    """A writable numpy view (z, y, x) on ``image``'s own buffer; valid while image lives."""
    view = sitk.GetArrayViewFromImage(image)
    address = view.__array_interface__["data"][0]
    buffer = (ctypes.c_char * view.nbytes).from_address(address)
    arr: np.ndarray = np.frombuffer(memoryview(buffer), dtype=view.dtype).reshape(view.shape)
    return arr


_SITK_TYPES = {
    np.dtype(np.int16): sitk.sitkInt16,
    np.dtype(np.float32): sitk.sitkFloat32,
    np.dtype(np.uint16): sitk.sitkUInt16,
    np.dtype(np.int32): sitk.sitkInt32,
    np.dtype(np.float64): sitk.sitkFloat64,
}


def _slice_indices(
    d: np.ndarray, names: Sequence[str], tolerance: float
) -> tuple[np.ndarray, float]:
    """Index of each slice on the regular grid along the normal, and the grid's step."""
    steps = np.diff(d)
    if np.any(steps <= 0):
        i = int(np.argmin(steps))
        raise StackError(
            f"slices not sorted along the normal (or duplicated): {names[i]} and {names[i + 1]}"
        )
    step = float(np.median(steps))
    ratios = steps / step
    ks = np.rint(ratios).astype(int)
    for i, (ratio, k) in enumerate(zip(ratios.tolist(), ks.tolist(), strict=True)):
        if abs(ratio - k) > max(tolerance * k, 0.05 if k > 1 else tolerance):
            raise StackError(
                f"non-uniform slice spacing: {steps[i]:.4g} mm between {names[i]} and "
                f"{names[i + 1]}, the series steps {step:.4g} mm"
            )
    return np.concatenate([[0], np.cumsum(ks)]), step


def correct_stack(
    pixels: np.ndarray,
    positions: np.ndarray,
    orientation: Sequence[float] | np.ndarray,
    spacing: tuple[float, float],
    *,
    gantry_tilt: float | None = None,
    correct: Collection[str] = CORRECTABLE,
    names: Sequence[str] | None = None,
    spacing_tolerance: float = 0.01,
) -> tuple[sitk.Image, GeometryCorrection]:
    """Resample a sheared (gantry-tilted) stack onto an orthogonal grid and fill one gap.

    Parameters
    ----------
    pixels : numpy.ndarray
        The slices, shape (slices, rows, columns), sorted by position along the normal
        (ascending). int16 stays int16 (rounded), float stays float.
    positions : numpy.ndarray
        ``ImagePositionPatient`` of each slice, shape (slices, 3), LPS mm.
    orientation : sequence of float
        ``ImageOrientationPatient`` (row cosine, column cosine), common to all slices.
    spacing : tuple of float
        ``PixelSpacing``: (distance between rows, distance between columns) in mm.
    gantry_tilt : float or None
        ``GantryDetectorTilt`` in degrees when present; cross-checked against the positions.
    correct : collection of str
        What may be corrected: ``"tilt"``, ``"gaps"``. A stack that needs what is not listed
        is rejected.
    names : sequence of str or None
        A name per slice (file names) for messages; indices when None.
    spacing_tolerance : float
        Largest relative deviation of a slice step from the series' step.

    Returns
    -------
    SimpleITK.Image
        The corrected volume: direction (row, column, normal), spacing (column spacing, row
        spacing, step along the normal), origin the first voxel of the widened grid.
    GeometryCorrection
        What was done.

    Raises
    ------
    StackError
        If the stack is not one sheared regular stack, the tilt tag disagrees with the
        positions, more than one slice is missing, or a needed correction is not allowed.
    ValueError
        If the arguments do not fit together or ``correct`` names an unknown correction.
    """
    unknown = set(correct) - CORRECTABLE
    if unknown:
        raise ValueError(
            f"correct: unknown correction(s) {sorted(unknown)}; use {sorted(CORRECTABLE)}"
        )
    pixels = np.asarray(pixels)
    positions = np.asarray(positions, dtype=np.float64)
    n, rows, columns = pixels.shape
    if positions.shape != (n, 3):
        raise ValueError(f"positions: shape {positions.shape}, expected ({n}, 3)")
    if n < 2:
        raise StackError("a single slice has no stack geometry to correct")
    labels = list(names) if names is not None else [f"slice {i}" for i in range(n)]
    iop = np.asarray(orientation, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    dy, dx = float(spacing[0]), float(spacing[1])

    d = positions @ normal
    index, step = _slice_indices(d, labels, spacing_tolerance)
    total = int(index[-1]) + 1
    missing = sorted(set(range(total)) - set(index.tolist()))
    if missing:
        gaps = [
            (i, int(index[i + 1] - index[i] - 1))
            for i in range(n - 1)
            if index[i + 1] - index[i] > 1
        ]
        desc = "; ".join(
            f"{k} slice(s) missing between {labels[i]} and {labels[i + 1]} "
            f"({d[i + 1] - d[i]:.4g} mm where the series steps {step:.4g} mm)"
            for i, k in gaps
        )
        if "gaps" not in correct:
            raise StackError(f"missing slices, gap interpolation not allowed: {desc}")
        if len(missing) > MAX_INTERPOLATED:
            raise StackError(
                f"{len(missing)} slices missing, at most {MAX_INTERPOLATED} is interpolated: {desc}"
            )

    # Shear: in-plane offsets (mm along row, column) as a linear function of depth.
    offsets = (positions - positions[0]) @ np.stack([row, col], axis=1)
    depth = d - d[0]
    design = np.stack([np.ones_like(depth), depth], axis=1)
    coef, *_ = np.linalg.lstsq(design, offsets, rcond=None)
    per_mm = coef[1]  # mm in-plane per mm along the normal
    residual_px = np.max(np.abs(design @ coef - offsets) / np.array([dx, dy]))
    drift_px = np.abs(per_mm * depth[-1]) / np.array([dx, dy])
    sheared = bool(np.max(drift_px) > _SHEAR_TOL_PX)
    if residual_px > _LINE_TOL_PX:
        worst = int(np.argmax(np.max(np.abs(design @ coef - offsets), axis=1)))
        raise StackError(
            f"ImagePositionPatient: positions off the normal do not follow one gantry tilt "
            f"({residual_px:.2f} pixels off the line at {labels[worst]})"
        )
    angle = float(np.degrees(np.arctan(np.hypot(*per_mm)))) if sheared else 0.0
    if sheared:
        if "tilt" not in correct:
            raise StackError(
                f"gantry tilt of {angle:.2f} degrees from {labels[0]} to {labels[-1]}, "
                "tilt correction not allowed"
            )
        if gantry_tilt is not None and abs(abs(gantry_tilt) - angle) > _TAG_TOLERANCE_DEG:
            raise StackError(
                f"GantryDetectorTilt {gantry_tilt:g} in {labels[0]} disagrees with the "
                f"{angle:.2f} degrees the ImagePositionPatient values show"
            )

    # Per output slice k: the fitted in-plane shift in pixels (columns, rows).
    ks = np.arange(total)
    shift_col = per_mm[0] * ks * step / dx if sheared else np.zeros(total)
    shift_row = per_mm[1] * ks * step / dy if sheared else np.zeros(total)
    eps = 1e-3
    ox = math.floor(min(0.0, float(shift_col.min())) + eps)
    oy = math.floor(min(0.0, float(shift_row.min())) + eps)
    width = columns + math.ceil(max(0.0, float(shift_col.max())) - eps) - ox
    height = rows + math.ceil(max(0.0, float(shift_row.max())) - eps) - oy

    pixel_type = _SITK_TYPES.get(pixels.dtype)
    if pixel_type is None:
        raise ValueError(f"pixels: dtype {pixels.dtype} not supported")
    image = sitk.Image([width, height, total], pixel_type)
    out = _writable_view(image)
    fill = float(pixels.min())
    integral = np.issubdtype(pixels.dtype, np.integer)
    plane = np.empty((height, width), dtype=np.float32)
    for i in range(n):
        k = int(index[i])
        src = pixels[i].astype(np.float32, copy=False)
        if sheared or ox or oy:
            # out[J, I] = in[J + oy - shift_row, I + ox - shift_col]
            ndimage.affine_transform(
                src,
                np.ones(2),
                offset=(oy - shift_row[k], ox - shift_col[k]),
                output_shape=(height, width),
                output=plane,
                order=1,
                mode="constant",
                cval=fill,
            )
            np.copyto(out[k], np.rint(plane) if integral else plane, casting="unsafe")
        else:
            out[k] = pixels[i]
    origin0 = positions[0] + coef[0] @ np.stack([row, col])  # the fitted first position
    origin = origin0 + ox * dx * row + oy * dy * col
    interpolated_positions = []
    for m in missing:
        below = int(index[index < m].max())
        above = int(index[index > m].min())
        w = (m - below) / (above - below)
        mixed = (1 - w) * out[below].astype(np.float32) + w * out[above].astype(np.float32)
        np.copyto(out[m], np.rint(mixed) if integral else mixed, casting="unsafe")
        interpolated_positions.append(tuple(float(v) for v in origin + m * step * normal))
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([dx, dy, step])
    image.SetDirection([float(v) for v in np.stack([row, col, normal], axis=1).ravel()])
    methods = []
    if sheared:
        methods.append(CorrectionMethod.TILT_SHEAR)
    if missing:
        methods.append(CorrectionMethod.GAP_LINEAR)
    record = GeometryCorrection(
        methods=tuple(methods),
        tilt_degrees=round(angle, 4),
        gantry_tilt_tag=None if gantry_tilt is None else float(gantry_tilt),
        shift_mm=(float(per_mm[0]), float(per_mm[1])) if sheared else (0.0, 0.0),
        added_columns=width - columns,
        added_rows=height - rows,
        interpolated_indices=tuple(missing),
        interpolated_positions=tuple(interpolated_positions),  # type: ignore[arg-type]
    )
    return image, record
