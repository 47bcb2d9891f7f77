"""Instances of one series -> one geometry-checked volume in patient (LPS) space.

Slices are ordered by the projection of ``ImagePositionPatient`` on the slice normal (the
cross product of the two ``ImageOrientationPatient`` cosines), never by file name or
``InstanceNumber``. Before any pixel is decoded the headers are checked, and a series that
cannot be one regular grid is rejected with a :class:`VolumeError` whose message is the reason
(naming the tag and the files): mixed orientations, rows/columns or pixel spacing; several
stacks or acquisitions in one series (rejected, never split: which stack a model was made for
is not ours to guess); duplicate positions; positions off the normal (gantry tilt); missing
slices; non-uniform spacing beyond ``spacing_tolerance``.

Gantry tilt, gaps and non-uniform spacing can be waived one by one with ``allow=``; the volume
is then built the way ITK's ``ImageSeriesReader`` builds it (origin at the first slice, the
orientation's normal as third axis, the mean distance between slices as spacing), which is an
approximation, and a warning names what was waived. With ``correct=`` instead, gantry tilt is
corrected by resampling onto an orthogonal grid and a single missing slice is interpolated
(:mod:`aenode.tilt`); the volume then carries the record of what was done.

Pixels: the modality LUT (``RescaleSlope``/``RescaleIntercept``, per frame for enhanced
objects) is applied; the output is int16 when that is exact, float32 otherwise. Compressed
transfer syntaxes are decoded by pydicom (with the pylibjpeg plugins), except JPEG Lossless
single-frame files, which GDCM (through SimpleITK) decodes about twice as fast; pydicom
takes over where GDCM fails, and ``decoder="pydicom"`` uses pydicom only. The output image is
allocated once and filled slice by slice through a writable view on SimpleITK's own buffer,
so that no second full copy of the volume is ever made; uncompressed little-endian slices are
read from the file straight into it.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
)

from aenode.dicomread import read_float, read_int, read_text, read_value, why_unreadable
from aenode.errors import InputError
from aenode.records import SeriesInfo, Volume
from aenode.tilt import CORRECTABLE, StackError, correct_stack

__all__ = ["VolumeError", "build_volume", "build_volume_from_files", "read_headers", "waiver"]

log = logging.getLogger(__name__)

_PIXEL_DATA = 0x7FE00010
_ORIENTATION_TOL = 1e-3  # direction cosines: about 0.06 degrees
_POSITION_TOL = 0.01  # mm: positions closer than this along the normal coincide
_NATIVE_LE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
_GDCM_FAST = {JPEGLosslessSV1, JPEGLossless}  # where GDCM is much faster than pylibjpeg
_WAIVABLE = frozenset({"tilt", "gaps", "spacing"})
_INT16 = np.iinfo(np.int16)


class VolumeError(InputError):
    """A series that cannot be built into one regular volume; the message is the reason."""


@dataclass
class _Frame:
    """One 2D slice: a single-frame instance or one frame of a multi-frame instance."""

    path: Path
    frame: int  # 0-based frame index within its file (0 for single-frame objects)
    frames_in_file: int
    header: Dataset
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float

    @property
    def name(self) -> str:
        suffix = f" frame {self.frame + 1}" if self.frames_in_file > 1 else ""
        return f"{self.path.name}{suffix}"


def _floats(value: Any, count: int, tag: str, path: Path) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{tag} in {path}: not {count} numbers ({value!r})") from exc
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise VolumeError(f"{tag} in {path}: expected {count} finite numbers, got {value!r}")
    return arr


def _scalar(value: Any, tag: str, path: Path) -> float:
    values = value if isinstance(value, list | tuple) else [value]
    return float(_floats(values, 1, tag, path)[0])


def _first(seq_item: Dataset | None, keyword: str) -> Any:
    return read_value(seq_item, keyword)


def _group(groups: Dataset | None, sequence: str) -> Dataset | None:
    items = read_value(groups, sequence)
    if not items:
        return None
    item: Dataset = items[0]
    return item


def _required_int(ds: Dataset, keyword: str, path: Path) -> int:
    value = read_int(ds, keyword)
    if value is None:
        problem = why_unreadable(ds, keyword)
        if problem is not None:
            raise VolumeError(f"{problem} in {path}")
        raise VolumeError(f"{keyword} missing or not an integer in {path}")
    return value


def _missing(ds: Dataset, keyword: str, path: Path) -> VolumeError:
    problem = why_unreadable(ds, keyword)
    return VolumeError(f"{problem} in {path}" if problem else f"{keyword} missing in {path}")


def _frames_of(path: Path, ds: Dataset) -> list[_Frame]:
    """The 2D frames of one instance with their geometry and modality LUT."""
    if "PixelData" not in ds:
        sop_class = read_text(ds, "SOPClassUID") or "?"
        raise VolumeError(f"PixelData missing in {path} (SOP class {sop_class})")
    samples = read_int(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise VolumeError(
            f"SamplesPerPixel {samples} in {path}: only single-sample "
            "(greyscale) images make a volume"
        )
    rows, columns = _required_int(ds, "Rows", path), _required_int(ds, "Columns", path)
    n_frames = read_int(ds, "NumberOfFrames", 1) or 1
    per_frame = read_value(ds, "PerFrameFunctionalGroupsSequence")
    shared = read_value(ds, "SharedFunctionalGroupsSequence")
    shared_item: Dataset | None = shared[0] if shared else None
    frames = []
    for i in range(n_frames):
        pf: Dataset | None = per_frame[i] if per_frame is not None and i < len(per_frame) else None

        def lookup(sequence: str, keyword: str, pf: Dataset | None = pf) -> Any:
            for source in (pf, shared_item):
                value = _first(_group(source, sequence), keyword)
                if value is not None:
                    return value
            return read_value(ds, keyword)

        ipp = lookup("PlanePositionSequence", "ImagePositionPatient")
        iop = lookup("PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = lookup("PixelMeasuresSequence", "PixelSpacing")
        if ipp is None:
            raise _missing(ds, "ImagePositionPatient", path)
        if iop is None:
            raise _missing(ds, "ImageOrientationPatient", path)
        if spacing is None:
            spacing = read_value(ds, "ImagerPixelSpacing")
        if spacing is None:
            raise _missing(ds, "PixelSpacing", path)
        slope = lookup("PixelValueTransformationSequence", "RescaleSlope")
        intercept = lookup("PixelValueTransformationSequence", "RescaleIntercept")
        slope = 1.0 if slope is None else _scalar(slope, "RescaleSlope", path)
        intercept = 0.0 if intercept is None else _scalar(intercept, "RescaleIntercept", path)
        sp = _floats(spacing, 2, "PixelSpacing", path)
        if np.any(sp <= 0):
            raise VolumeError(f"PixelSpacing in {path}: must be positive, got {list(sp)}")
        orientation = _floats(iop, 6, "ImageOrientationPatient", path)
        frames.append(
            _Frame(
                path=path,
                frame=i,
                frames_in_file=n_frames,
                header=ds,
                position=_floats(ipp, 3, "ImagePositionPatient", path),
                orientation=orientation,
                spacing=(float(sp[0]), float(sp[1])),
                rows=rows,
                columns=columns,
                slope=slope,
                intercept=intercept,
            )
        )
    return frames


def _check_same(frames: Sequence[_Frame], tag: str, key: Any, fmt: Any = str) -> None:
    groups: dict[Any, list[_Frame]] = {}
    for f in frames:
        groups.setdefault(key(f), []).append(f)
    if len(groups) > 1:
        parts = []
        for value, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            names = ", ".join(m.name for m in members[:3]) + (", ..." if len(members) > 3 else "")
            parts.append(f"{fmt(value)} in {len(members)} ({names})")
        raise VolumeError(f"{tag} differs within the series: " + "; ".join(parts))


def _check_consistent(frames: Sequence[_Frame]) -> None:
    ref = frames[0].orientation
    if any(np.max(np.abs(f.orientation - ref)) > _ORIENTATION_TOL for f in frames):
        # group around representatives (no rounding edge can split near-equal values)
        reps: list[np.ndarray] = []

        def key(f: _Frame) -> int:
            for i, rep in enumerate(reps):
                if np.max(np.abs(f.orientation - rep)) <= _ORIENTATION_TOL:
                    return i
            reps.append(f.orientation)
            return len(reps) - 1

        _check_same(
            frames,
            "ImageOrientationPatient (mixed orientations)",
            key,
            lambda i: "[" + ", ".join(f"{x:g}" for x in reps[i]) + "]",
        )
    _check_same(frames, "Rows/Columns", lambda f: (f.rows, f.columns), lambda v: f"{v[0]}x{v[1]}")
    _check_same(
        frames,
        "PixelSpacing",
        lambda f: (round(f.spacing[0], 4), round(f.spacing[1], 4)),
        lambda v: f"{v[0]:g}\\{v[1]:g}",
    )
    row, col = ref[:3], ref[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3:
        raise VolumeError(
            f"ImageOrientationPatient {list(ref)} in {frames[0].name}: cosines are not unit vectors"
        )
    if abs(float(np.dot(row, col))) > 1e-3:
        raise VolumeError(
            f"ImageOrientationPatient {list(ref)} in {frames[0].name}: "
            "row and column cosines are not orthogonal"
        )


def _names(frames: Sequence[_Frame], limit: int = 4) -> str:
    shown = ", ".join(f.name for f in frames[:limit])
    return shown + (f", ... ({len(frames)} in all)" if len(frames) > limit else "")


def _check_positions(
    frames: list[_Frame], normal: np.ndarray, in_plane: np.ndarray, tolerance: float
) -> tuple[list[str], float]:
    """Order-independent position checks on frames sorted along the normal.

    Returns the waivable problems (keyed ``tilt``, ``gaps``, ``spacing``) as messages and the
    regular slice step along the normal. Raises at once for what cannot be waived.
    """
    d = np.array([float(np.dot(normal, f.position)) for f in frames])
    offsets = np.array([in_plane @ f.position for f in frames])  # (n, 2): along row, column
    problems: list[str] = []
    tol_plane = max(_POSITION_TOL, 0.05 * min(frames[0].spacing))
    dev = offsets - offsets[0]
    if len(frames) > 1 and np.max(np.abs(dev)) > tol_plane:
        # Off the normal: a linear drift with depth is a tilted (sheared) stack; anything
        # else is several stacks side by side.
        design = np.stack([np.ones_like(d), d - d[0]], axis=1)
        coef, *_ = np.linalg.lstsq(design, offsets, rcond=None)
        residual = np.max(np.abs(design @ coef - offsets))
        if residual <= tol_plane:
            shift = float(np.hypot(*coef[1]))
            angle = float(np.degrees(np.arctan(shift)))
            tag = read_text(frames[0].header, "GantryDetectorTilt") or None
            told = f" (GantryDetectorTilt {tag})" if tag is not None else ""
            problems.append(
                f"tilt: ImagePositionPatient not along the slice normal: gantry tilt of "
                f"{angle:.2f} degrees{told} from {frames[0].name} to {frames[-1].name}"
            )
        else:
            keys = [tuple(np.round(o / tol_plane).astype(int)) for o in offsets]
            stacks: dict[tuple[int, ...], list[_Frame]] = {}
            for key, f in zip(keys, frames, strict=True):
                stacks.setdefault(key, []).append(f)
            desc = "; ".join(
                f"{len(m)} slices ({_names(m, 2)})"
                for m in sorted(stacks.values(), key=len, reverse=True)
            )
            raise VolumeError(
                f"ImagePositionPatient: several stacks in one series ({len(stacks)} stacks "
                f"side by side: {desc}); rejected, send each stack as its own series"
            )
    # Coinciding positions: duplicates, or whole repeated acquisitions.
    positions: list[list[_Frame]] = []
    last = None
    for value, f in zip(d, frames, strict=True):
        if last is not None and abs(value - last) < _POSITION_TOL:
            positions[-1].append(f)
        else:
            positions.append([f])
            last = value
    sizes = {len(p) for p in positions}
    if sizes != {1}:
        if len(sizes) == 1 and len(positions) > 1:
            acq = sorted({read_text(f.header, "AcquisitionNumber") for f in frames})
            raise VolumeError(
                f"ImagePositionPatient: several acquisitions in one series: each of "
                f"{len(positions)} positions occurs {sizes.pop()} times (AcquisitionNumber "
                f"{', '.join(acq)}); rejected, send each acquisition as its own series"
            )
        dups = [p for p in positions if len(p) > 1]
        where = "; ".join(
            f"[{', '.join(f'{x:g}' for x in p[0].position)}] in {_names(p)}" for p in dups[:3]
        )
        raise VolumeError(
            f"ImagePositionPatient: duplicate slice position ({len(dups)} position(s) occur "
            f"more than once): {where}"
        )
    if len(frames) < 2:
        return problems, 0.0
    steps = np.diff(d)
    step = float(np.median(steps))
    for i, s in enumerate(steps.tolist()):
        ratio = s / step
        k = int(round(ratio))
        if k >= 2 and abs(ratio - k) <= max(tolerance * k, 0.05):
            problems.append(
                f"gaps: missing slice(s): {s:.4g} mm between {frames[i].name} and "
                f"{frames[i + 1].name} where the series steps {step:.4g} mm "
                f"({k - 1} slice(s) missing)"
            )
        elif abs(s - step) > tolerance * step:
            problems.append(
                f"spacing: non-uniform slice spacing: {s:.4g} mm between {frames[i].name} and "
                f"{frames[i + 1].name}, the series steps {step:.4g} mm (tolerance "
                f"{tolerance:.2%})"
            )
    return problems, step


def _writable_view(image: sitk.Image) -> np.ndarray:
    """A writable numpy view (z, y, x) on ``image``'s own buffer; valid while image lives."""
    view = sitk.GetArrayViewFromImage(image)
    address = view.__array_interface__["data"][0]
    buffer = (ctypes.c_char * view.nbytes).from_address(address)
    arr: np.ndarray = np.frombuffer(memoryview(buffer), dtype=view.dtype).reshape(view.shape)
    return arr


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = read_int(ds, "BitsStored") or read_int(ds, "BitsAllocated") or 16
    if read_int(ds, "PixelRepresentation", 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _fits_int16(lo: float, hi: float) -> bool:
    return bool(_INT16.min <= lo and hi <= _INT16.max)


def _is_integral(frames: Sequence[_Frame]) -> bool:
    return all(f.slope == 1.0 and float(f.intercept).is_integer() for f in frames)


class _Filler:
    """Fills a preallocated SimpleITK image slice by slice; switches int16 -> float32 once."""

    def __init__(self, shape: tuple[int, int, int], integral: bool) -> None:
        self.shape = shape
        self.pixel_type = sitk.sitkInt16 if integral else sitk.sitkFloat32
        self.image = sitk.Image([shape[2], shape[1], shape[0]], self.pixel_type)
        self.array = _writable_view(self.image)
        self.filled = 0

    def _to_float(self) -> None:
        log.debug("int16 output would overflow; switching the volume to float32")
        image = sitk.Image([self.shape[2], self.shape[1], self.shape[0]], sitk.sitkFloat32)
        array = _writable_view(image)
        for k in range(self.shape[0]):  # slice by slice: never two full float copies
            array[k] = self.array[k]
        self.image, self.array, self.pixel_type = image, array, sitk.sitkFloat32

    def put(self, k: int, raw: np.ndarray, slope: float, intercept: float) -> None:
        if self.pixel_type == sitk.sitkInt16:
            if raw.size:
                lo, hi = float(raw.min()) + intercept, float(raw.max()) + intercept
                if not _fits_int16(lo, hi):
                    self._to_float()
        out = self.array[k]
        np.copyto(out, raw, casting="unsafe")
        if self.pixel_type == sitk.sitkInt16:
            if intercept != 0.0:
                out += np.int16(intercept)
        else:
            if slope != 1.0:
                out *= np.float32(slope)
            if intercept != 0.0:
                out += np.float32(intercept)


def _native_slice(frame: _Frame) -> np.ndarray | None:
    """An uncompressed little-endian 16-bit slice read straight from the file, or None."""
    ds = frame.header
    if (
        frame.frames_in_file != 1
        or ds.file_meta.get("TransferSyntaxUID") not in _NATIVE_LE
        or read_int(ds, "BitsAllocated") != 16
    ):
        return None
    signed = read_int(ds, "PixelRepresentation", 0) == 1
    dtype = np.dtype("<i2" if signed else "<u2")
    count = frame.rows * frame.columns
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if isinstance(elem, RawDataElement) and elem.value is None:
        # deferred: read from the file without loading the element into the dataset
        raw = np.fromfile(frame.path, dtype=dtype, count=count, offset=int(elem.value_tell))
    elif elem is not None and isinstance(elem.value, bytes):
        raw = np.frombuffer(elem.value, dtype=dtype, count=min(count, len(elem.value) // 2))
    else:
        return None
    if raw.size != count:
        raise VolumeError(f"PixelData in {frame.path}: truncated ({raw.size} of {count} pixels)")
    bits = read_int(ds, "BitsStored", 16) or 16
    if bits < 16:
        shift = 16 - bits
        raw = (raw << shift) >> shift if signed else raw & ((1 << bits) - 1)
    return raw.reshape(frame.rows, frame.columns)


def _gdcm_slice(frame: _Frame) -> np.ndarray | None:
    """A compressed single-frame slice decoded by GDCM (SimpleITK), rescaled; None if not.

    GDCM decodes JPEG Lossless about twice as fast as pylibjpeg here. It applies the same
    modality LUT (this file's RescaleSlope/Intercept) that :class:`_Filler` would.
    """
    ds = frame.header
    if frame.frames_in_file != 1 or ds.file_meta.get("TransferSyntaxUID") not in _GDCM_FAST:
        return None
    if read_text(ds, "PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(frame.path))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        log.debug("GDCM cannot decode %s (%s); using pydicom", frame.path, exc)
        return None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetSize()[:2] != (
        frame.columns,
        frame.rows,
    ):
        return None
    arr: np.ndarray = sitk.GetArrayFromImage(image).reshape(frame.rows, frame.columns)
    return arr


def _decoded(frame: _Frame, decoder: str) -> tuple[np.ndarray, float, float]:
    """One frame's values with the slope and intercept still to apply.

    A decoded single-frame instance drops its Pixel Data from the header.
    """
    native = _native_slice(frame)
    if native is not None:
        return native, frame.slope, frame.intercept
    rescaled = _gdcm_slice(frame) if decoder == "auto" else None
    if rescaled is not None:
        return rescaled, 1.0, 0.0
    index = frame.frame if frame.frames_in_file > 1 else None
    try:
        arr: np.ndarray = pixel_array(frame.header, index=index)
    except Exception as exc:  # pydicom raises many types for undecodable data
        ts = frame.header.file_meta.get("TransferSyntaxUID", "?")
        raise VolumeError(
            f"PixelData in {frame.path}: cannot decode (TransferSyntaxUID {ts}): {exc}"
        ) from exc
    if frame.frames_in_file == 1:
        del frame.header[_PIXEL_DATA]  # decoded: do not keep the encoded bytes around
    elif arr.ndim == 3:
        arr = arr[0]
    return arr, frame.slope, frame.intercept


def read_headers(paths: Sequence[Path]) -> list[tuple[Path, Dataset]]:
    """Read the headers of Part 10 files, leaving large values (Pixel Data) on disk.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        The files.

    Returns
    -------
    list of (pathlib.Path, pydicom.Dataset)
        In the given order.

    Raises
    ------
    VolumeError
        If a file cannot be read or is not DICOM; the message names it.
    """
    out: list[tuple[Path, Dataset]] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, defer_size=65536)
        except (OSError, InvalidDicomError) as exc:
            raise VolumeError(f"{path}: cannot read as DICOM: {exc}") from exc
        out.append((Path(path), ds))
    return out


def waiver(kind: str) -> str:
    """The settings that would waive (or correct) the geometry problem ``kind``.

    Parameters
    ----------
    kind : str
        ``"tilt"``, ``"gaps"`` or ``"spacing"``.

    Returns
    -------
    str
        E.g. ``set inputs.geometry.correct: [tilt] or inputs.geometry.allow: [tilt] in the
        model card, or volume.allow: [tilt] in the configuration``.
    """
    fix = f"inputs.geometry.correct: [{kind}] or " if kind in CORRECTABLE else ""
    return (
        f"set {fix}inputs.geometry.allow: [{kind}] in the model card, "
        f"or volume.allow: [{kind}] in the configuration"
    )


def _check_allow(allow: Collection[str], correct: Collection[str] = ()) -> None:
    unknown = set(allow) - _WAIVABLE
    if unknown:
        raise ValueError(f"allow: unknown check(s) {sorted(unknown)}; use {sorted(_WAIVABLE)}")
    unknown = set(correct) - CORRECTABLE
    if unknown:
        raise ValueError(
            f"correct: unknown correction(s) {sorted(unknown)}; use {sorted(CORRECTABLE)}"
        )


def build_volume(
    series: SeriesInfo,
    *,
    spacing_tolerance: float = 0.01,
    allow: Collection[str] = (),
    decoder: Literal["auto", "pydicom"] = "auto",
    correct: Collection[str] = (),
) -> Volume:
    """Build the geometry-checked volume of one series.

    Parameters
    ----------
    series : SeriesInfo
        The series; ``series.files`` are its Part 10 files in any order.
    spacing_tolerance : float
        Largest relative deviation of one slice step from the median step.
    allow : collection of str
        Problems to waive with a warning instead of rejecting: ``"tilt"`` (positions off the
        normal), ``"gaps"`` (missing slices), ``"spacing"`` (non-uniform spacing). The waived
        volume gets ITK's approximate geometry (see the module docstring).
    decoder : {"auto", "pydicom"}
        ``auto`` decodes JPEG Lossless with GDCM (through SimpleITK, about twice as fast
        as pylibjpeg) and falls back to pydicom; ``pydicom`` uses pydicom's plugins only.
    correct : collection of str
        Problems to correct instead of rejecting (takes precedence over ``allow``):
        ``"tilt"`` resamples a gantry-tilted stack onto an orthogonal grid, ``"gaps"``
        interpolates a single missing slice (more stay a rejection), see :mod:`aenode.tilt`.

    Returns
    -------
    Volume
        int16 or float32 voxels after the modality LUT, origin/spacing/direction in LPS,
        and the headers (without Pixel Data) in slice order; ``correction`` records a
        correction when one was applied.

    Raises
    ------
    VolumeError
        If the series is not one regular stack; the message names the tag and the files.
    """
    _check_allow(allow, correct)
    if not series.files:
        raise VolumeError(f"series {series.series_uid}: no files")
    return _build(series, read_headers(series.files), spacing_tolerance, allow, decoder, correct)


def _build(
    series: SeriesInfo,
    headers: Sequence[tuple[Path, Dataset]],
    spacing_tolerance: float,
    allow: Collection[str],
    decoder: str,
    correct: Collection[str] = (),
) -> Volume:
    extra = {"study": series.study_uid, "series": series.series_uid}
    frames: list[_Frame] = []
    for path, ds in headers:
        uid = read_text(ds, "SeriesInstanceUID") or None
        if uid is not None and series.series_uid and uid != series.series_uid:
            raise VolumeError(
                f"SeriesInstanceUID {uid} in {path} is not the series' {series.series_uid}"
            )
        frames.extend(_frames_of(path, ds))
    _check_consistent(frames)
    iop = frames[0].orientation
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    frames.sort(key=lambda f: float(np.dot(normal, f.position)))
    problems, step = _check_positions(frames, normal, np.stack([row, col]), spacing_tolerance)
    kinds = {p.split(":", 1)[0] for p in problems}
    corrected = kinds & set(correct)
    rejected = [
        f"{p.split(': ', 1)[1]} ({waiver(p.split(':', 1)[0])})"
        for p in problems
        if p.split(":", 1)[0] not in set(allow) | corrected
    ]
    if rejected:
        raise VolumeError("; ".join(rejected))
    if corrected and kinds - corrected:
        raise VolumeError(
            f"{', '.join(sorted(kinds - corrected))} waived and {', '.join(sorted(corrected))} "
            "corrected in one series: correct both or waive both"
        )
    for p in problems if not corrected else ():
        log.warning("volume built despite: %s", p.split(": ", 1)[1], extra=extra)
    if len(frames) == 1:
        ds = frames[0].header
        z = read_float(ds, "SpacingBetweenSlices") or read_float(ds, "SliceThickness") or 1.0
        z_spacing = z if z > 0 else 1.0
    elif problems:
        # ITK's geometry: the mean distance between first and last position
        span = float(np.linalg.norm(frames[-1].position - frames[0].position))
        z_spacing = span / (len(frames) - 1)
    else:
        z_spacing = step
    shape = (len(frames), frames[0].rows, frames[0].columns)
    filler = _Filler(shape, _is_integral(frames))
    for k, frame in enumerate(frames):
        filler.put(k, *_decoded(frame, decoder))
    image = filler.image
    correction = None
    if corrected:
        tilt = frames[0].header.get("GantryDetectorTilt")
        try:
            image, correction = correct_stack(
                sitk.GetArrayViewFromImage(filler.image),
                np.stack([f.position for f in frames]),
                iop,
                frames[0].spacing,
                gantry_tilt=float(tilt) if tilt not in (None, "") else None,
                correct=corrected,
                names=[f.name for f in frames],
                spacing_tolerance=spacing_tolerance,
            )
        except StackError as exc:
            raise VolumeError(str(exc)) from exc
        del filler
        log.info("volume corrected: %s", correction.describe(), extra=extra)
    else:
        image.SetOrigin([float(v) for v in frames[0].position])
        image.SetSpacing([frames[0].spacing[1], frames[0].spacing[0], z_spacing])
        image.SetDirection([float(v) for v in np.stack([row, col, normal], axis=1).ravel()])
    datasets: list[Dataset] = []
    seen: set[int] = set()
    for frame in frames:
        if id(frame.header) in seen:
            continue
        seen.add(id(frame.header))
        if _PIXEL_DATA in frame.header:
            del frame.header[_PIXEL_DATA]
        datasets.append(frame.header)
    log.debug(
        "volume %s built from %d slices",
        "x".join(str(s) for s in image.GetSize()),
        len(frames),
        extra=extra,
    )
    return Volume(image=image, series=series, datasets=datasets, correction=correction)


def build_volume_from_files(
    paths: Sequence[Path],
    *,
    spacing_tolerance: float = 0.01,
    allow: Collection[str] = (),
    decoder: Literal["auto", "pydicom"] = "auto",
    correct: Collection[str] = (),
) -> Volume:
    """Build a volume from files of one series, making its :class:`SeriesInfo` from the headers.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        Part 10 files of one series.
    spacing_tolerance, allow, decoder, correct
        As for :func:`build_volume`.

    Returns
    -------
    Volume

    Raises
    ------
    VolumeError
        If the files belong to several series or do not make one regular volume.
    """
    _check_allow(allow, correct)
    if not paths:
        raise VolumeError("no files given")
    headers = read_headers(paths)
    uids = {read_text(ds, "SeriesInstanceUID") for _, ds in headers}
    if len(uids) > 1:
        raise VolumeError(f"SeriesInstanceUID: the files belong to {len(uids)} series")
    first = headers[0][1]
    info = SeriesInfo(
        study_uid=read_text(first, "StudyInstanceUID"),
        series_uid=uids.pop(),
        revision=0,
        modality=read_text(first, "Modality"),
        description=read_text(first, "SeriesDescription"),
        files=tuple(Path(p) for p in paths),
    )
    return _build(info, headers, spacing_tolerance, allow, decoder, correct)
