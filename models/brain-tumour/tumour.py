"""Entry module of the ``brain-tumour`` package (``runtime.format: python``).

``load`` builds the 2D U-Net once (kept warm by the registry); ``predict`` runs
:func:`aenode.train.brain_tumour.segment` (the path the held-out figures were measured on:
percentile scaling, resampling to the training grid, the network slice by slice in batches,
back to the series' grid, postprocessing, slice scores) on the FLAIR series and returns the
label map on the series' own grid, the tumour-presence finding, the abnormality volume and
presence probability as measurements, and the slices of largest extent as key slices.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from aenode.errors import InputError
from aenode.infer.cards import ModelCard
from aenode.records import Finding, FindingCode, Measurement, Prediction, Volume
from aenode.results.report import key_slices
from aenode.train.brain_tumour import segment
from aenode.train.brain_tumour_card import load_network

ROLE = "image"
NEOPLASM = FindingCode("108369006", "SCT", "Neoplasm")
VOLUME = FindingCode("118565006", "SCT", "Volume")
# Defaults of the card's runtime.parameters (the values the held-out figures were measured with).
DEFAULTS: dict[str, float] = {
    "threshold": 0.5,
    "min_size_mm2": 100.0,
    "keep_fraction": 0.1,
    "slice_threshold": 0.5,
    "min_axial_cosine": 0.8,
    "headerless_pixel_spacing_mm": 220.0 / 256.0,
    "key_slices": 3,
}


class State:
    """What ``load`` keeps warm: the network and the device it runs on.

    Parameters
    ----------
    network : torch.nn.Module
        The U-Net in eval mode on ``device``.
    device : torch.device
        Where the network runs.
    """

    def __init__(self, network: torch.nn.Module, device: torch.device) -> None:
        self.network = network
        self.device = device


def load(package: Path, card: ModelCard, device: torch.device) -> State:
    """Build the network with the package's weights (checked by the registry) on ``device``.

    Parameters
    ----------
    package : pathlib.Path
        The package folder.
    card : ModelCard
        The validated card (``runtime.weights`` names the state dict).
    device : torch.device
        The device worker's device.

    Returns
    -------
    State
    """
    weights = card.runtime.weights
    if weights is None:
        raise InputError(f"{package / 'model.yaml'}: runtime.weights: required by brain-tumour")
    net = load_network(package / weights).to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    return State(net, device)


def _params(card: ModelCard) -> dict[str, float]:
    given = getattr(card.runtime, "parameters", None) or {}
    return {k: float(given.get(k, v)) for k, v in DEFAULTS.items()}


def _pixel_spacing(volume: Volume, params: Mapping[str, float]) -> tuple[tuple[float, float], str]:
    """(row, column) spacing in mm and a note when it is assumed rather than read."""
    sx, sy = volume.image.GetSpacing()[:2]
    if volume.datasets:
        return (float(sy), float(sx)), ""
    mm = params["headerless_pixel_spacing_mm"]
    note = (
        f"no DICOM headers (file input): in-plane pixel size taken as {mm:.4f} mm "
        f"(runtime.parameters.headerless_pixel_spacing_mm), not the file's {sy:g} x {sx:g} mm"
    )
    return (mm, mm), note


def _check_axial(volume: Volume, params: Mapping[str, float]) -> None:
    direction = np.asarray(volume.image.GetDirection(), dtype=float).reshape(3, 3)
    normal_z = abs(float(direction[2, 2]))
    if normal_z < params["min_axial_cosine"]:
        raise InputError(
            f"brain-tumour: role {ROLE!r} series {volume.series.series_uid}: not an axial "
            f"stack (slice normal z-cosine {normal_z:.2f} < {params['min_axial_cosine']:g}); "
            "the model segments axial FLAIR slices"
        )


def predict(volumes: Mapping[str, Volume], state: State, card: ModelCard) -> Prediction:
    """Segment FLAIR abnormality in the ``image`` series and score tumour presence.

    Parameters
    ----------
    volumes : mapping of str to Volume
        ``{"image": <axial FLAIR volume>}``.
    state : State
        From :func:`load`.
    card : ModelCard
        The package's card (``runtime.parameters`` may override :data:`DEFAULTS`).

    Returns
    -------
    aenode.records.Prediction
        Label map (1 = FLAIR abnormality) on the series' grid; the finding "tumour present"
        with the series probability (the highest slice score); measurements: abnormality
        volume in ml (voxel count times the series' voxel volume) and the presence
        probability; key slices: those of largest abnormality extent.

    Raises
    ------
    aenode.errors.InputError
        If the role is missing, the series is not an axial stack, or its intensities are
        constant (the message names the series).
    """
    if ROLE not in volumes:
        raise InputError(f"brain-tumour: role {ROLE!r} missing (got {sorted(volumes)})")
    volume = volumes[ROLE]
    params = _params(card)
    _check_axial(volume, params)
    spacing, note = _pixel_spacing(volume, params)
    array = sitk.GetArrayFromImage(volume.image)  # (slices, rows, columns)
    t0 = time.perf_counter()
    try:
        result = segment(
            state.network,
            array,
            spacing,
            device=state.device,
            threshold=params["threshold"],
            min_size_mm2=params["min_size_mm2"],
            keep_fraction=params["keep_fraction"],
        )
    except ValueError as exc:
        raise InputError(
            f"brain-tumour: role {ROLE!r} series {volume.series.series_uid}: {exc}"
        ) from exc
    seconds = time.perf_counter() - t0
    labels = sitk.GetImageFromArray(result.mask.astype(np.uint8))
    labels.CopyInformation(volume.image)
    voxel_mm3 = float(np.prod(volume.image.GetSpacing()))
    if not volume.datasets:
        voxel_mm3 = spacing[0] * spacing[1] * float(volume.image.GetSpacing()[2])
    ml = float(np.count_nonzero(result.mask)) * voxel_mm3 / 1000.0
    probability = float(result.slice_scores.max()) if result.slice_scores.size else 0.0
    threshold = params["slice_threshold"]
    finding = Finding(
        name="tumour present",
        probability=probability,
        present=probability >= threshold,
        threshold=threshold,
        code=NEOPLASM,
    )
    measurements = [
        Measurement(name="FLAIR abnormality volume", value=ml, unit="ml", code=VOLUME),
        Measurement(
            name="Tumour presence probability", value=probability, unit="1", probability=True
        ),
    ]
    extent = result.mask.astype(bool)[..., None]
    keys = key_slices(extent, limit=int(params["key_slices"])) if extent.any() else []
    notes = [note] if note else []
    extra: dict[str, Any] = {
        "device": str(state.device),
        "slices": int(array.shape[0]),
        "tumour_slices": int((result.slice_scores >= threshold).sum()),
        "slice_scores": [float(s) for s in result.slice_scores],
    }
    return Prediction(
        model=card.name,
        version=card.version,
        task=card.task,
        labels=labels,
        class_probabilities={"tumour present": probability},
        findings=[finding],
        reference_role=ROLE,
        timings={"infer": seconds},
        notes=notes,
        extra=extra,
        measurements=measurements,
        key_slices=keys,
    )
