"""Preparing a volume for a network, and putting the network's output back.

The same functions serve training and inference, so that a model sees at run time exactly
what it saw while it learned: orientation (``sitk.DICOMOrient``), resampling to the card's
spacing, intensity normalisation and padding (or, for a fixed input size, padding and
centre-cropping), then the inverse for the output. Arrays are (z, y, x); the card's sizes
are (x, y, z) and are reversed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from aenode.infer.cards import PreprocessSpec

__all__ = [
    "Prepared",
    "fit_box",
    "normalize",
    "pad_box",
    "prepare",
    "restore_labels",
    "restore_probs",
]


@dataclass
class Prepared:
    """A network input and what is needed to map the output back to the source grid.

    Attributes
    ----------
    array : numpy.ndarray
        float32 (z, y, x) after orientation, resampling, normalisation and padding.
    grid : SimpleITK.Image
        The oriented and resampled image before padding (its geometry is the network's).
    crop : tuple of slice
        Where the kept part of ``grid`` lies inside ``array`` (z, y, x).
    region : tuple of slice or None
        The part of ``grid`` that is in ``array`` (z, y, x); None when all of it is (no
        cropping). Outside it the output is background.
    """

    array: np.ndarray
    grid: sitk.Image
    crop: tuple[slice, slice, slice]
    region: tuple[slice, slice, slice] | None = None

    @property
    def cropped(self) -> bool:
        """Whether part of the volume was cut away to reach a fixed input size."""
        if self.region is None:
            return False
        shape = sitk.GetArrayViewFromImage(self.grid).shape
        return any(r.stop - r.start != n for r, n in zip(self.region, shape, strict=True))


def normalize(array: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Normalise intensities as the card says.

    Parameters
    ----------
    array : numpy.ndarray
        Voxel values.
    spec : PreprocessSpec
        ``intensity`` is ``none``, ``zscore`` (mean 0, sd 1 over the volume), ``window``
        (``window`` = [low, high] mapped to [0, 1], clipped) or ``percentile`` (the
        ``percentiles`` [low, high] mapped to [0, 1], clipped).

    Returns
    -------
    numpy.ndarray
        float32 values.
    """
    a = array.astype(np.float32, copy=False)
    if spec.intensity == "none":
        return np.asarray(a, dtype=np.float32)
    if spec.intensity == "zscore":
        sd = float(a.std())
        return np.asarray((a - float(a.mean())) / (sd if sd > 1e-6 else 1.0), dtype=np.float32)
    if spec.intensity == "window":
        if spec.window is None:  # the card validator requires it; a hand-built spec may not
            raise ValueError("inputs.preprocessing.window: required when intensity is window")
        lo, hi = spec.window
    else:
        p_lo, p_hi = spec.percentiles or (0.5, 99.5)
        lo, hi = (float(v) for v in np.percentile(a, [p_lo, p_hi]))
    scale = hi - lo if hi > lo else 1.0
    return np.asarray(np.clip((a - lo) / scale, 0.0, 1.0), dtype=np.float32)


def pad_box(shape: tuple[int, ...], pad_to: list[int] | None) -> tuple[slice, ...]:
    """The centred position of an array of ``shape`` inside the padded box.

    Parameters
    ----------
    shape : tuple of int
        (z, y, x) shape of the unpadded array.
    pad_to : list of int or None
        The card's ``pad_to`` in (x, y, z) order; a dimension already larger stays as is.

    Returns
    -------
    tuple of slice
        (z, y, x) slices into the padded array.
    """
    if pad_to is None:
        return tuple(slice(0, s) for s in shape)
    target = list(reversed(pad_to))
    return tuple(
        slice((max(t, s) - s) // 2, (max(t, s) - s) // 2 + s)
        for s, t in zip(shape, target, strict=True)
    )


def fit_box(
    shape: tuple[int, ...], size: list[int]
) -> tuple[tuple[slice, slice, slice], tuple[slice, slice, slice]]:
    """Centred placement of an array of ``shape`` in a box of exactly ``size``.

    Parameters
    ----------
    shape : tuple of int
        (z, y, x) shape of the array.
    size : list of int
        The card's fixed size in (x, y, z) order.

    Returns
    -------
    tuple
        ``(inside, region)``: (z, y, x) slices into the box where the array goes, and
        slices into the array of the part that fits (the centre, where it is larger).
    """
    inside: list[slice] = []
    region: list[slice] = []
    for s, t in zip(shape, reversed(size), strict=True):
        if t >= s:
            inside.append(slice((t - s) // 2, (t - s) // 2 + s))
            region.append(slice(0, s))
        else:
            start = (s - t) // 2
            inside.append(slice(0, t))
            region.append(slice(start, start + t))
    return (inside[0], inside[1], inside[2]), (region[0], region[1], region[2])


def _padded(array: np.ndarray, box: tuple[slice, ...], pad_to: list[int] | None) -> np.ndarray:
    if pad_to is None:
        return array
    shape = tuple(max(t, s) for s, t in zip(array.shape, reversed(pad_to), strict=True))
    out = np.zeros(shape, dtype=array.dtype)
    out[box] = array
    return out


def prepare(image: sitk.Image, spec: PreprocessSpec, *, fixed: bool = False) -> Prepared:
    """Orient, resample, normalise and pad (or fit) a volume for the network.

    Parameters
    ----------
    image : SimpleITK.Image
        The input volume in patient space (a DICOM series or a NIfTI file).
    spec : PreprocessSpec
        The card's ``inputs.preprocessing``.
    fixed : bool
        ``pad_to`` is the exact network input size (the card has no ``runtime.patch_size``,
        see :attr:`ModelCard.fixed_size`): smaller dimensions are zero-padded and larger
        ones centre-cropped, so the array has exactly that shape. Otherwise ``pad_to`` is a
        minimum and larger dimensions stay as they are.

    Returns
    -------
    Prepared
        The network input and the geometry to map the output back with.

    Raises
    ------
    ValueError
        If the image is not a scalar 3-D volume.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        dims = "x".join(str(s) for s in image.GetSize())
        raise ValueError(
            f"input volume is {image.GetDimension()}-D ({dims}) with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s); a scalar 3-D volume is needed"
        )
    img = sitk.Cast(image, sitk.sitkFloat32)
    if spec.orientation is not None:
        img = sitk.DICOMOrient(img, spec.orientation)
    if spec.target_spacing is not None and not np.allclose(
        img.GetSpacing(), spec.target_spacing, atol=1e-3
    ):
        spacing = [float(s) for s in spec.target_spacing]
        size = [
            max(1, round(n * s / t))
            for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing, strict=True)
        ]
        img = sitk.Resample(
            img,
            size,
            sitk.Transform(),
            sitk.sitkLinear,
            img.GetOrigin(),
            spacing,
            img.GetDirection(),
            0.0,
            sitk.sitkFloat32,
        )
    array = normalize(sitk.GetArrayFromImage(img), spec)
    if fixed and spec.pad_to is not None:
        inside, region = fit_box(array.shape, spec.pad_to)
        out = np.zeros(tuple(reversed(spec.pad_to)), dtype=np.float32)
        out[inside] = array[region]
        return Prepared(array=out, grid=img, crop=inside, region=region)
    box = pad_box(array.shape, spec.pad_to)
    crop = (box[0], box[1], box[2])
    return Prepared(array=_padded(array, box, spec.pad_to), grid=img, crop=crop)


def _on_grid(array: np.ndarray, prepared: Prepared) -> sitk.Image:
    """The network-grid values of the kept region put on ``prepared.grid`` (zeros outside)."""
    values = array[prepared.crop]
    if prepared.region is not None:
        full = np.zeros(sitk.GetArrayViewFromImage(prepared.grid).shape, dtype=values.dtype)
        full[prepared.region] = values
        values = full
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(prepared.grid)
    return out


def restore_labels(labels: np.ndarray, prepared: Prepared, reference: sitk.Image) -> sitk.Image:
    """Put a network label map back on the reference volume's grid.

    Parameters
    ----------
    labels : numpy.ndarray
        (z, y, x) integer labels on the padded network grid; voxels cropped away before the
        network are background (0).
    prepared : Prepared
        What :func:`prepare` returned for the reference volume.
    reference : SimpleITK.Image
        The original input volume.

    Returns
    -------
    SimpleITK.Image
        uint8 labels with the reference's size, origin, spacing and direction.
    """
    img = _on_grid(labels.astype(np.uint8), prepared)
    return sitk.Resample(img, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


def restore_probs(probs: np.ndarray, prepared: Prepared, reference: sitk.Image) -> np.ndarray:
    """Put per-label probabilities back on the reference volume's grid.

    Parameters
    ----------
    probs : numpy.ndarray
        (labels, z, y, x) float probabilities on the padded network grid; voxels cropped
        away before the network get 0.
    prepared : Prepared
        What :func:`prepare` returned for the reference volume.
    reference : SimpleITK.Image
        The original input volume.

    Returns
    -------
    numpy.ndarray
        (labels, z, y, x) float32 in [0, 1] on the reference grid.
    """
    out = []
    for channel in probs:
        img = _on_grid(channel.astype(np.float32), prepared)
        res = sitk.Resample(img, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
        out.append(np.clip(sitk.GetArrayFromImage(res), 0.0, 1.0))
    return np.stack(out).astype(np.float32)
