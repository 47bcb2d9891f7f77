"""FLAIR slice preprocessing and postprocessing of the brain-tumour model, for training and
inference alike.

Plain functions on numpy arrays in (z, y, x) order (slices, rows, columns), so that the
runtime can apply to a DICOM FLAIR series exactly what the training data went through:

1. :func:`scale_intensity`: per-volume percentile scaling, robust to scanner units.
2. :func:`to_training_grid`: each slice resampled to the training pixel size and centre
   padded or cropped to the training matrix (a square field of view of ``FOV_MM``).
3. the network, slice by slice (sigmoid probability of FLAIR abnormality).
4. :func:`from_training_grid`: probabilities back onto the series' own rows and columns.
5. :func:`postprocess`: threshold, small 3D components removed, per-volume consistency.
6. :func:`slice_scores`: a tumour-presence score per slice.

The training slices (LGG Segmentation Dataset) carry no spacing; they are taken to be a
256x256 matrix over a ``FOV_MM`` = 220 mm square field of view (0.86 mm pixels), the
usual axial brain FLAIR field of view (220-240 mm), consistent with the head sizes seen in
them (see ``models/brain-tumour/README.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "FOV_MM",
    "LGG_PIXEL_MM",
    "MATRIX",
    "Grid",
    "from_training_grid",
    "postprocess",
    "scale_intensity",
    "slice_scores",
    "to_training_grid",
]

FOV_MM = 220.0  # assumed square in-plane field of view of a training slice
MATRIX = 128  # training matrix (rows = columns)
LGG_PIXEL_MM = FOV_MM / 256.0  # assumed pixel size of the 256x256 training slices
LOW_PERCENTILE = 0.5  # of all voxels: the background level
HIGH_PERCENTILE = 99.5  # of head voxels (above the volume mean)
CLIP_HIGH = 1.5


def scale_intensity(volume: np.ndarray) -> np.ndarray:
    """Per-volume percentile scaling to about [0, 1].

    The low anchor is the 0.5th percentile of all voxels (background); the high anchor the
    99.5th percentile of the head voxels, those above the volume's mean, so that neither the
    share of background (field of view) nor the scanner's units move the result. Values are
    clipped to [0, 1.5].

    Parameters
    ----------
    volume : numpy.ndarray
        One series, any numeric dtype, (z, y, x).

    Returns
    -------
    numpy.ndarray
        float32, same shape.

    Raises
    ------
    ValueError
        If the volume is empty or constant.
    """
    v = np.asarray(volume, dtype=np.float32)
    if v.size == 0:
        raise ValueError("scale_intensity: empty volume")
    lo = float(np.percentile(v, LOW_PERCENTILE))
    head = v[v > v.mean()]
    if head.size == 0:
        raise ValueError("scale_intensity: constant volume (no voxel above the mean)")
    hi = float(np.percentile(head, HIGH_PERCENTILE))
    if hi <= lo:
        raise ValueError(f"scale_intensity: degenerate range ({lo} .. {hi})")
    return np.asarray(np.clip((v - lo) / (hi - lo), 0.0, CLIP_HIGH), dtype=np.float32)


@dataclass(frozen=True)
class Grid:
    """How a series' slices map onto the training matrix (to undo it afterwards).

    Attributes
    ----------
    shape : tuple of int
        The series' (rows, columns).
    resized : tuple of int
        (rows, columns) after resampling to the training pixel size.
    offset : tuple of int
        Where the resized slice's first row and column land in the training matrix
        (negative: the slice was cropped).
    """

    shape: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]


def _resize(stack: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    if tuple(t.shape[-2:]) == size:
        return stack.astype(np.float32)
    if mode == "bilinear":
        antialias = size[0] < t.shape[-2] or size[1] < t.shape[-1]
        r = F.interpolate(t, size=size, mode=mode, align_corners=False, antialias=antialias)
    else:
        r = F.interpolate(t, size=size, mode=mode)
    return np.asarray(r[:, 0].numpy())


def _place(src: np.ndarray, dst_hw: tuple[int, int], offset: tuple[int, int]) -> np.ndarray:
    """Copy (z, h, w) ``src`` into zeros of (z, *dst_hw) with its origin at ``offset``."""
    out = np.zeros((src.shape[0], *dst_hw), dtype=src.dtype)
    (oy, ox), (h, w) = offset, src.shape[1:]
    ys, xs = max(0, oy), max(0, ox)
    ye, xe = min(dst_hw[0], oy + h), min(dst_hw[1], ox + w)
    if ye > ys and xe > xs:
        out[:, ys:ye, xs:xe] = src[:, ys - oy : ye - oy, xs - ox : xe - ox]
    return out


def to_training_grid(
    volume: np.ndarray, pixel_spacing: tuple[float, float], *, mode: str = "bilinear"
) -> tuple[np.ndarray, Grid]:
    """Resample slices to the training pixel size and centre them in the training matrix.

    Parameters
    ----------
    volume : numpy.ndarray
        (z, y, x) intensities (scaled with :func:`scale_intensity` first) or masks.
    pixel_spacing : tuple of float
        (row spacing, column spacing) in mm, as DICOM ``PixelSpacing``; for the LGG training
        data :data:`LGG_PIXEL_MM` both.
    mode : str
        ``bilinear`` for images and probabilities, ``area`` for masks to be thresholded.

    Returns
    -------
    numpy.ndarray
        float32 (z, MATRIX, MATRIX); outside the series' field of view is 0.
    Grid
        What :func:`from_training_grid` needs to undo it.

    Raises
    ------
    ValueError
        If the volume is not 3D or a spacing is not positive.
    """
    if volume.ndim != 3:
        raise ValueError(f"to_training_grid: expected (z, y, x), got shape {volume.shape}")
    if min(pixel_spacing) <= 0:
        raise ValueError(f"to_training_grid: PixelSpacing {pixel_spacing} must be positive")
    target = FOV_MM / MATRIX
    rows, cols = int(volume.shape[1]), int(volume.shape[2])
    resized = (
        max(1, round(rows * pixel_spacing[0] / target)),
        max(1, round(cols * pixel_spacing[1] / target)),
    )
    offset = ((MATRIX - resized[0]) // 2, (MATRIX - resized[1]) // 2)
    grid = Grid(shape=(rows, cols), resized=resized, offset=offset)
    return _place(_resize(volume, resized, mode), (MATRIX, MATRIX), offset), grid


def from_training_grid(stack: np.ndarray, grid: Grid) -> np.ndarray:
    """Undo :func:`to_training_grid` on probabilities (bilinear).

    Parameters
    ----------
    stack : numpy.ndarray
        (z, MATRIX, MATRIX) values on the training grid.
    grid : Grid
        From :func:`to_training_grid`.

    Returns
    -------
    numpy.ndarray
        float32 (z, rows, columns) on the series' own grid.
    """
    back = (-grid.offset[0], -grid.offset[1])
    resized = _place(np.asarray(stack, dtype=np.float32), grid.resized, back)
    return _resize(resized, grid.shape, "bilinear")


def postprocess(
    probs: np.ndarray,
    *,
    threshold: float = 0.5,
    min_size_mm2: float = 100.0,
    keep_fraction: float = 0.1,
    pixel_mm2: float = LGG_PIXEL_MM**2,
) -> np.ndarray:
    """Binary mask from probabilities, small components removed, consistent over the volume.

    3D connected components (26-connectivity across neighbouring slices) whose in-plane area
    summed over their slices is below ``min_size_mm2`` are dropped (an area, not a volume:
    the training data's slice thickness is unknown), then those below ``keep_fraction`` of
    the largest one: a lower-grade glioma's FLAIR abnormality is one lesion or a few large
    ones, and isolated specks on single slices are the commonest false positives.

    Parameters
    ----------
    probs : numpy.ndarray
        (z, y, x) probabilities.
    threshold : float
        Probability above which a voxel is abnormal.
    min_size_mm2 : float
        Smallest component kept, as in-plane area summed over its slices (mm2).
    keep_fraction : float
        Components smaller than this share of the largest are dropped (0 keeps all).
    pixel_mm2 : float
        In-plane area of one pixel (mm2) of ``probs``' grid.

    Returns
    -------
    numpy.ndarray
        uint8 (z, y, x) mask of 0/1.
    """
    mask = np.asarray(probs) > threshold
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return mask.astype(np.uint8)
    sizes = np.bincount(labels.ravel())[1:] * pixel_mm2
    keep = (sizes >= min_size_mm2) & (sizes >= keep_fraction * sizes.max())
    lut = np.concatenate([[False], keep])
    return np.asarray(lut[labels], dtype=np.uint8)


def slice_scores(probs: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Tumour-presence score of each slice: its highest probability, inside ``mask`` if given.

    Parameters
    ----------
    probs : numpy.ndarray
        (z, y, x) probabilities.
    mask : numpy.ndarray or None
        A postprocessed mask; slices without any of it score 0.

    Returns
    -------
    numpy.ndarray
        float64 (z,) in [0, 1].
    """
    p = np.asarray(probs, dtype=np.float64)
    if mask is not None:
        p = np.where(np.asarray(mask) > 0, p, 0.0)
    return np.asarray(p.reshape(p.shape[0], -1).max(axis=1))
