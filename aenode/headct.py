"""Head CT haemorrhage slice classifier: preprocessing, network, per-scan aggregation.

The training data (``head-ct-kitamura``) are 8-bit PNGs already in the brain window and
cropped around the head at varying sizes, with no HU and no spacing. Inference must present
a CT slice the same way, so one path serves both:

- a CT slice in HU is mapped through the brain window (centre 40, width 80) to 8 bits
  (:func:`window_to_uint8`); a training PNG is loaded as it is (:func:`load_png`, which
  refuses what it cannot interpret: colour, 16-bit, alpha);
- :func:`prepare_slice` crops to the bounding box of the largest bright connected region (the
  head), pads it to a square (centred, background 0), resizes it to ``size`` pixels with
  PIL's bilinear filter (antialiased) and scales to [0, 1].

A volume is cut into axial slabs of about 5 mm (the mean of the thin slices in each slab;
single-slice training images look like a routine 5 mm reconstruction, not a 0.6 mm one),
each slab whose bone ring encloses at least 50 cm^2 (:data:`MIN_INTRACRANIAL_CM2`) is
classified, and the per-slab probabilities are aggregated to one scan probability by
:func:`aggregate`: the maximum over z of the probabilities smoothed over three
consecutive slabs (see its docstring for why).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

__all__ = [
    "BRAIN_WINDOW",
    "HEAD_THRESHOLD",
    "SIZE",
    "HeadCTError",
    "ScanResult",
    "Slab",
    "aggregate",
    "build_model",
    "classify_volume",
    "load_png",
    "predict",
    "prepare_slice",
    "slabs_from_volume",
    "window_to_uint8",
]

log = logging.getLogger(__name__)

BRAIN_WINDOW = (40.0, 80.0)  # centre, width in HU
SIZE = 128  # network input, pixels a side
HEAD_THRESHOLD = 50  # 8-bit brain-window value: about +16 HU (scalp, brain, bone)
SLAB_MM = 5.0
MIN_HEAD_FRACTION = 0.05  # of the slice: smaller regions are no head (vertex, below the skull)
MIN_INTRACRANIAL_CM2 = 50.0  # a slab is classified only when its skull encloses this much
BONE_HU = 200.0

MODEL_ARGS: dict[str, Any] = {
    "in_shape": [1, SIZE, SIZE],
    "classes": 1,
    "channels": [8, 16, 32, 64, 128],
    "strides": [2, 2, 2, 2, 2],
    "num_res_units": 1,
    "dropout": 0.2,
    "last_act": None,
}


class HeadCTError(ValueError):
    """An image or volume the head CT path cannot interpret; the message names it."""


def load_png(path: Path) -> np.ndarray:
    """Load an 8-bit greyscale brain-window image.

    Parameters
    ----------
    path : pathlib.Path
        A PNG (or other PIL-readable) file.

    Returns
    -------
    numpy.ndarray
        uint8, shape (rows, columns).

    Raises
    ------
    HeadCTError
        If the file cannot be read, or is colour, has an alpha channel, or has more than
        8 bits per sample: such an image is not a brain-window slice as trained on, and
        guessing a conversion would change what the model sees.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "L":
                return np.asarray(im, dtype=np.uint8).copy()
            if mode == "P":
                converted = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = f"P -> {converted.mode}"
                arr = np.asarray(converted)
            else:
                arr = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise HeadCTError(f"{path}: cannot read as an image: {exc}") from exc
    if arr.dtype != np.uint8 or mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise HeadCTError(
            f"{path}: {arr.dtype.itemsize * 8}-bit image (PIL mode {mode}); expected an 8-bit "
            "greyscale brain-window image (window 40/80 HU mapped to 0-255)"
        )
    if arr.ndim == 3:
        bands = arr.shape[2]
        if bands in (2, 4):
            raise HeadCTError(
                f"{path}: image with an alpha channel (PIL mode {mode}); expected 8-bit greyscale"
            )
        if bands == 3 and (
            np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
        ):
            return np.ascontiguousarray(arr[..., 0])  # grey stored as RGB: exact
        raise HeadCTError(
            f"{path}: colour image (PIL mode {mode}, channels differ); expected 8-bit greyscale"
        )
    raise HeadCTError(f"{path}: unsupported image (PIL mode {mode}); expected 8-bit greyscale")


def window_to_uint8(
    hu: np.ndarray, center: float = BRAIN_WINDOW[0], width: float = BRAIN_WINDOW[1]
) -> np.ndarray:
    """Map HU through a linear window to 0-255 (below the window 0, above 255).

    Parameters
    ----------
    hu : numpy.ndarray
        Values in Hounsfield units (after the modality LUT).
    center, width : float
        The window, default the brain window 40/80.

    Returns
    -------
    numpy.ndarray
        uint8, same shape.
    """
    lo = center - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - lo) * (255.0 / width)
    out: np.ndarray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return out


def head_box(img8: np.ndarray, threshold: int = HEAD_THRESHOLD) -> tuple[int, int, int, int] | None:
    """Bounding box (row0, row1, col0, col1; end exclusive) of the largest bright region.

    Returns None when the largest region covers less than :data:`MIN_HEAD_FRACTION` of the
    image (no head in this slice).
    """
    mask = img8 > threshold
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    if sizes[biggest - 1] < MIN_HEAD_FRACTION * img8.size:
        return None
    rows = np.flatnonzero(np.any(labels == biggest, axis=1))
    cols = np.flatnonzero(np.any(labels == biggest, axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def prepare_slice(img8: np.ndarray, size: int = SIZE, name: str = "slice") -> np.ndarray:
    """Crop to the head, pad to a square, resize: the network's input, as in training.

    Parameters
    ----------
    img8 : numpy.ndarray
        uint8 brain-window slice, shape (rows, columns).
    size : int
        Output pixels a side.
    name : str
        Names the slice in an error.

    Returns
    -------
    numpy.ndarray
        float32 in [0, 1], shape (size, size).

    Raises
    ------
    HeadCTError
        If the slice shows no head.
    """
    if img8.dtype != np.uint8 or img8.ndim != 2:
        raise HeadCTError(f"{name}: expected a 2D uint8 slice, got {img8.dtype} {img8.shape}")
    box = head_box(img8)
    if box is None:
        raise HeadCTError(f"{name}: no head found (no bright region over {MIN_HEAD_FRACTION:.0%})")
    r0, r1, c0, c1 = box
    crop = img8[r0:r1, c0:c1]
    side = max(crop.shape)
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class Slab:
    """One axial slab of a volume, in the brain window.

    Attributes
    ----------
    index : int
        Slab number from inferior to superior.
    slices : tuple of int
        The volume's slice indices (after reorientation to LPS) averaged into it.
    image : numpy.ndarray
        uint8 brain-window image (rows posterior-down, columns patient-left-right as viewed).
    intracranial_cm2 : float
        Area of the largest region enclosed by bone (above 200 HU): the brain's cross-section
        where the skull is a closed ring; small through the face, neck, skull base and vertex,
        which the training slices do not show.
    """

    index: int
    slices: tuple[int, ...]
    image: np.ndarray
    intracranial_cm2: float = 0.0

    @property
    def classifiable(self) -> bool:
        """Whether the slab shows enough enclosed brain to be like the training slices."""
        return self.intracranial_cm2 >= MIN_INTRACRANIAL_CM2


def _intracranial_cm2(hu: np.ndarray, pixel_mm2: float) -> float:
    bone = hu > BONE_HU
    inside = ndimage.binary_fill_holes(bone) & ~bone
    labels, count = ndimage.label(inside)
    if count == 0:
        return 0.0
    return float(np.bincount(labels.ravel())[1:].max() * pixel_mm2 / 100.0)


def slabs_from_volume(image: sitk.Image, slab_mm: float = SLAB_MM) -> list[Slab]:
    """Cut a head CT volume (HU) into axial brain-window slabs of about ``slab_mm``.

    The volume is reoriented to LPS (columns to the patient's left, rows posterior, slices
    superior), so an axial slice is displayed as radiologists and the training images do
    (patient's right on the image left, anterior up). Each slab is the mean in HU of
    ``round(slab_mm / spacing)`` consecutive slices (at least one), then windowed.

    Parameters
    ----------
    image : SimpleITK.Image
        The volume in HU (e.g. ``Volume.image``, tilt-corrected).
    slab_mm : float
        Target slab thickness.

    Returns
    -------
    list of Slab
    """
    oriented = sitk.DICOMOrient(image, "LPS")
    arr = sitk.GetArrayViewFromImage(oriented)  # (z, y, x)
    sx, sy, sz = oriented.GetSpacing()
    per = max(1, int(round(slab_mm / sz)))
    slabs = []
    for i, start in enumerate(range(0, arr.shape[0] - per + 1, per)):
        mean = arr[start : start + per].astype(np.float32).mean(axis=0)
        slabs.append(
            Slab(
                i,
                tuple(range(start, start + per)),
                window_to_uint8(mean),
                _intracranial_cm2(mean, sx * sy),
            )
        )
    return slabs


@dataclass(frozen=True)
class ScanResult:
    """One haemorrhage probability for a scan and the slabs that drove it.

    Attributes
    ----------
    probability : float
        The maximum over z of the per-slab probabilities smoothed over ``window`` slabs.
    key_indices : tuple of int
        Positions (into the per-slab sequence) of the slabs in the winning window.
    per_slice : tuple of float
        The per-slab probabilities (NaN where a slab was not classified).
    smoothed : tuple of float
        The smoothed probabilities.
    """

    probability: float
    key_indices: tuple[int, ...]
    per_slice: tuple[float, ...]
    smoothed: tuple[float, ...]


def aggregate(probabilities: Sequence[float] | np.ndarray, window: int = 3) -> ScanResult:
    """Per-slice probabilities -> one scan probability: the maximum of a moving mean.

    Why: a haemorrhage worth reporting spans more than one 5 mm slab, while a single-slab
    spike is typical of streak or beam-hardening artefact near the skull base, which a slice
    classifier trained on 160 images cannot tell from blood. The mean over three consecutive
    slabs damps an isolated spike by two thirds yet keeps a bleed seen on three slabs at its
    full probability; the maximum over z keeps a small bleed from being diluted by the many
    normal slabs (a scan-wide mean would be). Windows at the ends hold the slabs that exist;
    slabs without a head (NaN) are skipped.

    Parameters
    ----------
    probabilities : sequence of float
        Per slab, inferior to superior; NaN for a slab that was not classified.
    window : int
        Odd number of consecutive slabs averaged.

    Returns
    -------
    ScanResult

    Raises
    ------
    ValueError
        If no slab has a probability, or ``window`` is not a positive odd number.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window: a positive odd number of slices, got {window}")
    p = np.asarray(probabilities, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(p))
    if valid.size == 0:
        raise ValueError("no slice has a probability (no head found in any slice)")
    q = p[valid]
    half = window // 2
    smoothed = np.array(
        [q[max(0, i - half) : i + half + 1].mean() for i in range(q.size)], dtype=np.float64
    )
    best = int(np.argmax(smoothed))
    keys = tuple(int(valid[j]) for j in range(max(0, best - half), min(q.size, best + half + 1)))
    full = np.full(p.shape, np.nan)
    full[valid] = smoothed
    return ScanResult(
        probability=float(smoothed[best]),
        key_indices=keys,
        per_slice=tuple(float(v) for v in p),
        smoothed=tuple(float(v) for v in full),
    )


def build_model(args: dict[str, Any] | None = None) -> Any:
    """The untrained network: MONAI ``Classifier`` (strided residual conv blocks, one logit).

    Parameters
    ----------
    args : dict or None
        Constructor arguments; :data:`MODEL_ARGS` when None.

    Returns
    -------
    torch.nn.Module
    """
    from monai.networks.nets import Classifier

    kw = dict(MODEL_ARGS if args is None else args)
    return Classifier(**kw)


def predict(model: Any, images: np.ndarray, batch_size: int = 32, flip: bool = True) -> np.ndarray:
    """Haemorrhage probability for each prepared slice.

    Parameters
    ----------
    model : torch.nn.Module
        The network, in eval mode.
    images : numpy.ndarray
        float32, shape (n, size, size), from :func:`prepare_slice`.
    batch_size : int
        Slices per forward pass.
    flip : bool
        Average the probabilities of each slice and its left-right mirror image (a bleed may
        be on either side; training mirrors at random).

    Returns
    -------
    numpy.ndarray
        float64 probabilities, shape (n,).
    """
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            batch = batch[:, None].float()
            prob = torch.sigmoid(model(batch).reshape(-1).double())
            if flip:
                mirrored = torch.sigmoid(model(torch.flip(batch, dims=[3])).reshape(-1).double())
                prob = (prob + mirrored) / 2
            out.append(prob.numpy())
    return np.concatenate(out) if out else np.zeros(0)


def load_model(weights: Path, args: dict[str, Any] | None = None) -> Any:
    """Build the network and load a state dict saved by ``scripts/train_head_ct.py``."""
    import torch

    model = build_model(args)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    return model


def classify_volume(
    model: Any, image: sitk.Image, *, window: int = 3, slab_mm: float = SLAB_MM
) -> tuple[ScanResult, list[Slab]]:
    """Classify every axial slab of a head CT volume and aggregate to one probability.

    Parameters
    ----------
    model : torch.nn.Module
        The network, in eval mode.
    image : SimpleITK.Image
        The volume in HU.
    window : int
        Slabs averaged before the maximum (:func:`aggregate`).
    slab_mm : float
        Slab thickness.

    Returns
    -------
    ScanResult
        ``key_indices`` index the returned slabs.
    list of Slab
    """
    slabs = slabs_from_volume(image, slab_mm)
    probs = np.full(len(slabs), np.nan)
    ready, where = [], []
    for slab in slabs:
        if not slab.classifiable:
            continue  # face, neck, skull base or vertex: unlike any training slice
        try:
            ready.append(prepare_slice(slab.image, name=f"slab {slab.index}"))
        except HeadCTError:
            continue  # no head in this slab: not classified
        where.append(slab.index)
    if ready:
        probs[where] = predict(model, np.stack(ready))
    return aggregate(probs, window), slabs
