"""DICOM Segmentation (SEG): one segment per card label, frames aligned with the source slices."""

from __future__ import annotations

from typing import cast

import highdicom as hd
import numpy as np

from aenode.config import ResultsSettings
from aenode.infer.cards import ModelCard
from aenode.records import Prediction, Volume
from aenode.results.source import (
    ResultError,
    algorithm_identification,
    coded,
    label_masks,
    reference_datasets,
    series_description,
    software_versions,
)
from aenode.results.uids import ResultUids

__all__ = ["SEG_SERIES_OFFSET", "build_seg", "segment_descriptions"]

SEG_SERIES_OFFSET = 1


def segment_descriptions(card: ModelCard) -> list[hd.seg.SegmentDescription]:
    """One segment description per card label, numbered 1..n in card order.

    Parameters
    ----------
    card : aenode.infer.cards.ModelCard
        ``outputs.labels`` gives name, coded category, type and optional type modifier
        (Segmented Property Type Modifier Code Sequence), and display colour.

    Returns
    -------
    list of highdicom.seg.SegmentDescription
    """
    algorithm = algorithm_identification(card)
    out = []
    for number, spec in enumerate(card.outputs.labels, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.name[:64],
            segmented_property_category=coded(spec.category),
            segmented_property_type=coded(spec.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=f"{card.name} {spec.name}"[:64],
            display_color=hd.color.CIELabColor.from_rgb(*spec.color),
        )
        if spec.type_modifier is not None:
            # highdicom 0.28 has no argument for it: Segmented Property Type Modifier Code
            # Sequence (0062,0011) goes inside the type's item (codes from CID 2, e.g. Anterior)
            item = description.SegmentedPropertyTypeCodeSequence[0]
            item.SegmentedPropertyTypeModifierCodeSequence = [coded(spec.type_modifier)]
        out.append(description)
    return out


def _fractional(prediction: Prediction, card: ModelCard, volume: Volume) -> np.ndarray:
    probs = prediction.probabilities
    n = len(card.outputs.labels)
    if probs is None:
        raise ResultError(
            f"model {card.name}: results.fractional is set but the prediction has no probabilities"
        )
    if probs.ndim != 4 or probs.shape[0] not in (n, n + 1):
        raise ResultError(
            f"model {card.name}: probabilities of shape {probs.shape} do not hold {n} labels "
            "(expected (labels[+background], slices, rows, columns))"
        )
    if probs.shape[0] == n + 1:
        probs = probs[1:]
    size = volume.image.GetSize()
    if probs.shape[1:] != (size[2], size[1], size[0]):
        raise ResultError(
            f"model {card.name}: probabilities grid {probs.shape[1:]} differs from series "
            f"{volume.series.series_uid} (slices, rows, columns) {(size[2], size[1], size[0])}"
        )
    out: np.ndarray = np.clip(np.moveaxis(probs, 0, -1), 0.0, 1.0).astype(np.float32)
    return out


def build_seg(
    volume: Volume,
    prediction: Prediction,
    card: ModelCard,
    settings: ResultsSettings,
    uids: ResultUids | None = None,
) -> hd.seg.Segmentation:
    """Build the SEG of one prediction in the geometry of its source series.

    Parameters
    ----------
    volume : aenode.records.Volume
        The reference volume; its ``datasets`` (one per slice, in slice order) are the
        source instances each frame references.
    prediction : aenode.records.Prediction
        ``labels`` on the volume's grid; ``probabilities`` when ``settings.fractional``.
    card : aenode.infer.cards.ModelCard
        Model identity and the coded labels.
    settings : aenode.config.ResultsSettings
        ``fractional``, ``series_number_base`` (+1), ``series_description``, ``manufacturer``.
    uids : ResultUids or None
        The job's deterministic UIDs (:mod:`aenode.results.uids`); None makes random ones.

    Returns
    -------
    highdicom.seg.Segmentation
        Same study as the source, a new series; binary unless ``settings.fractional``.

    Raises
    ------
    ResultError
        If the card has no labels, or the prediction does not fit the source grid.
    """
    if not card.outputs.labels:
        raise ResultError(f"model {card.name}: the card lists no outputs.labels for a SEG")
    sources = reference_datasets(volume)
    if settings.fractional:
        pixels = _fractional(prediction, card, volume)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixels = label_masks(prediction, card.outputs.labels, volume).astype(np.uint8)
        seg_type = hd.seg.SegmentationTypeValues.BINARY
    if len(sources) > 1 and pixels.shape[0] != len(sources):
        raise ResultError(
            f"series {volume.series.series_uid}: {pixels.shape[0]} mask slices but "
            f"{len(sources)} source instances"
        )
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=seg_type,
        segment_descriptions=segment_descriptions(card),
        series_instance_uid=uids.series("SEG") if uids else hd.UID(),
        series_number=settings.series_number_base + SEG_SERIES_OFFSET,
        sop_instance_uid=uids.sop("SEG") if uids else hd.UID(),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=card.name[:64],
        # a list (pydicom's multi-value type); highdicom's annotation says tuple
        software_versions=cast("tuple[str]", software_versions(card)),
        device_serial_number="0",
        series_description=series_description(settings, card, "SEG"),
        content_label="AENODE_SEG",
        content_description=f"{card.name} {card.version}"[:64],
        max_fractional_value=255,
        omit_empty_frames=True,
        institution_name=settings.institution_name,
    )
