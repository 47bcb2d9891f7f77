"""Entry point of the ``head-ct-haemorrhage`` python-format model (docs/models.md, format python).

``load`` builds the slab classifier once (kept warm by the registry); ``predict`` runs
:func:`aenode.headct.classify_volume` on the head CT volume in HU (tilt-corrected and a single
gap interpolated by the node when the card's ``inputs.geometry.correct`` says so) and returns
a :class:`aenode.records.Prediction` with no labels:

- the finding ``haemorrhage`` against the card's threshold (a qualitative evaluation in the SR);
- the scan probability as a measurement whose concept says probability;
- the key slices: the acquired slices (indices into ``Volume.datasets``) averaged into the slabs
  of the winning 3-slab window;
- the brain window (40/80) for the report page;
- notes: the slabs that drove the result and the demonstration-grade disclaimer (the node puts
  the geometry correction - angle, method, interpolated slice - ahead of them, from
  ``Volume.correction``, so that the report page and the SR show it).

The network is 0.2 M parameters and runs on the CPU whatever the device (a few ms a slab).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from aenode import headct
from aenode.errors import InputError
from aenode.infer.findings import findings_for
from aenode.records import Measurement, Prediction, Volume

CLASS = "haemorrhage"
ROLE = "image"
DISCLAIMER = (
    "Demonstration-grade model, research use only, not validated for clinical use; "
    "training data of unstated licence"
)


def load(package: Path, card: Any, device: Any) -> Any:
    """Build the network and load its weights once.

    Parameters
    ----------
    package : pathlib.Path
        The model package folder.
    card : aenode.infer.cards.ModelCard
        Its card (``runtime.weights`` names the state dict).
    device : torch.device
        Ignored: the network is small enough for the CPU.

    Returns
    -------
    torch.nn.Module
        The network in eval mode.
    """
    weights = card.runtime.weights or "model.pt"
    model = headct.load_model(package / weights, headct.MODEL_ARGS)
    # warm: the node's synthetic warm-up volume is no head CT (runtime.warmup: false), so one
    # blank slice goes through the network here instead
    headct.predict(model, np.zeros((1, headct.SIZE, headct.SIZE), dtype=np.float32))
    return model


def key_slices(volume: Volume, slabs: list[headct.Slab], keys: tuple[int, ...]) -> list[int]:
    """Indices into ``volume.datasets`` of the acquired slices inside the key slabs.

    The slabs index the LPS-reoriented (and possibly tilt-corrected, gap-filled) grid; an
    acquired slice belongs to a slab when its position along the grid's slice normal lies
    within the slab's extent. Interpolated slices have no dataset and are not listed.

    Parameters
    ----------
    volume : aenode.records.Volume
        The input volume (its image and source headers).
    slabs : list of aenode.headct.Slab
        As returned by :func:`aenode.headct.classify_volume`.
    keys : tuple of int
        Positions of the key slabs in ``slabs``.

    Returns
    -------
    list of int
        Sorted dataset indices.
    """
    oriented = sitk.DICOMOrient(volume.image, "LPS")
    normal = np.asarray(oriented.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    half = oriented.GetSpacing()[2] / 2.0
    spans = []
    for k in keys:
        zs = [
            float(np.dot(oriented.TransformIndexToPhysicalPoint((0, 0, int(i))), normal))
            for i in slabs[k].slices
        ]
        spans.append((min(zs) - half, max(zs) + half))
    out = []
    for index, ds in enumerate(volume.datasets):
        position = ds.get("ImagePositionPatient")
        if position is None:
            continue
        z = float(np.dot([float(v) for v in position], normal))
        if any(lo <= z < hi for lo, hi in spans):
            out.append(index)
    return out


def predict(volumes: Mapping[str, Volume], state: Any, card: Any) -> Prediction:
    """Classify a head CT volume: one haemorrhage probability, its finding and key slices.

    Parameters
    ----------
    volumes : Mapping[str, aenode.records.Volume]
        Role ``image``: the head CT in HU.
    state : torch.nn.Module
        From :func:`load`.
    card : aenode.infer.cards.ModelCard
        The model's card (threshold of class ``haemorrhage``).

    Returns
    -------
    aenode.records.Prediction

    Raises
    ------
    aenode.errors.InputError
        If the role is missing or no slab of the series shows enough enclosed brain to be
        classified (not a head CT the model can read).
    """
    if ROLE not in volumes:
        raise InputError(f"model {card.name}: role {ROLE!r} missing (got {sorted(volumes)})")
    volume = volumes[ROLE]
    started = time.perf_counter()
    try:
        result, slabs = headct.classify_volume(state, volume.image)
    except ValueError as exc:
        raise InputError(
            f"series {volume.series.series_uid}: no slab encloses "
            f"{headct.MIN_INTRACRANIAL_CM2:g} cm2 of brain within bone ({exc}); "
            "not a head CT this model can read"
        ) from exc
    inferred = time.perf_counter()
    probability = float(result.probability)
    findings = findings_for(card, {CLASS: probability})
    threshold = next(c.threshold for c in card.outputs.classes if c.name == CLASS)
    keys = key_slices(volume, slabs, result.key_indices)
    classified = [
        s.index for s, p in zip(slabs, result.per_slice, strict=True) if not math.isnan(p)
    ]
    per_key = ", ".join(f"{result.per_slice[k]:.3f}" for k in result.key_indices)
    notes = [  # the geometry correction is noted by the job (jobs.py), ahead of these
        f"Haemorrhage probability {probability:.4f} (threshold {threshold:g}): the maximum over z "
        f"of 5 mm slab probabilities averaged over 3 consecutive slabs; key slabs "
        f"{result.key_indices[0]}-{result.key_indices[-1]} (slab probabilities {per_key}); "
        f"{len(classified)} of {len(slabs)} slabs classified (the others enclose less than "
        f"{headct.MIN_INTRACRANIAL_CM2:g} cm2 of brain)",
        DISCLAIMER,
    ]
    return Prediction(
        model=card.name,
        version=card.version,
        task=card.task,
        labels=None,
        class_probabilities={CLASS: probability},
        findings=findings,
        reference_role=ROLE,
        timings={"infer": inferred - started, "postprocess": time.perf_counter() - inferred},
        notes=notes,
        extra={"device": "cpu", "slabs": len(slabs), "classified_slabs": len(classified)},
        measurements=[
            Measurement(
                name="Haemorrhage probability", value=probability, unit="1", probability=True
            )
        ],
        key_slices=keys,
        display_window=headct.BRAIN_WINDOW,
    )


def predict_images(paths: Sequence[Path], state: Any, card: Any) -> list[float]:
    """Haemorrhage probability of each 8-bit brain-window slice image (``aenode evaluate``).

    Each image is read by :func:`aenode.headct.load_png` (colour, alpha and 16-bit images are
    refused) and prepared as in training.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        PNG files.
    state : torch.nn.Module
        From :func:`load`.
    card : aenode.infer.cards.ModelCard
        The model's card.

    Returns
    -------
    list of float
        One probability per path, in order.

    Raises
    ------
    aenode.errors.InputError
        If an image cannot be interpreted; the message names the file.
    """
    try:
        ready = [headct.prepare_slice(headct.load_png(p), name=str(p)) for p in paths]
    except headct.HeadCTError as exc:
        raise InputError(f"model {card.name}: {exc}") from exc
    if not ready:
        return []
    return [float(p) for p in headct.predict(state, np.stack(ready))]
