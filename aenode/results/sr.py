"""TID 1500 measurement report (Comprehensive 3D SR): segment volumes and classifier findings.

A segment's group has the label's type as finding type and, when the card gives a type
modifier, a finding site with it as topographical modifier (e.g. Hippocampus, Anterior).
A classifier finding is one group: the class's code as finding type, its probability as a
numeric item (DCM 122157 Probability, UCUM 1) and the finding as a qualitative evaluation
``<class> = Present`` (SCT 52101004) or ``Absent`` (SCT 272519000). A softmax head gives one
group, the most probable class, present; a sigmoid head one group per class.

A prediction's ``measurements`` (volumes, ratios, probabilities a python-format model gives)
are one more group, "<model> measurements": a numeric item each, its concept the
measurement's code or a local one (``99AENODE``) named after it; a probability without a
code reads "Probability of <name>" (unless its name says so already), UCUM ``1``. The
group's source images are the key slices' instances (``Prediction.key_slices``).

Each of the prediction's notes (e.g. a gantry-tilt correction) is a TEXT item (DCM 121106
Comment) in the report's root container.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from aenode.config import ResultsSettings
from aenode.infer.cards import ModelCard
from aenode.records import Finding, FindingCode, Measurement, Prediction, Volume
from aenode.results.source import (
    ResultError,
    coded,
    findings_of,
    reference_datasets,
    series_description,
    software_versions,
)
from aenode.results.uids import ResultUids

__all__ = ["SR_SERIES_OFFSET", "build_sr", "measurement_concept"]

SR_SERIES_OFFSET = 3
_IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
_LOCAL_SCHEME = "99AENODE"
_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")


def _algorithm(card: ModelCard) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=card.name, version=card.version)


def _volume_groups(
    card: ModelCard,
    volumes_mm3: Mapping[str, float],
    seg: Dataset | None,
    series_uid: str,
) -> list[
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
]:
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    for number, spec in enumerate(card.outputs.labels, start=1):
        tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{spec.name} volume"[:64])
        measurement = hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=float(volumes_mm3.get(spec.name, 0.0)),
            unit=codes.UCUM.CubicMillimeter,
            algorithm_id=_algorithm(card),
        )
        sites = (
            [hd.sr.FindingSite(coded(spec.type), topographical_modifier=coded(spec.type_modifier))]
            if spec.type_modifier is not None
            else None
        )
        if seg is not None:
            # Built by hand: from_segmentation fails when a single segment puts
            # SegmentIdentificationSequence in the shared functional groups (NOTES.md).
            segment = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
            )
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_segment=segment,
                    finding_type=coded(spec.type),
                    finding_category=coded(spec.category),
                    algorithm_id=_algorithm(card),
                    measurements=[measurement],
                    finding_sites=sites,
                )
            )
        else:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_type=coded(spec.type),
                    finding_category=coded(spec.category),
                    algorithm_id=_algorithm(card),
                    measurements=[measurement],
                    finding_sites=sites,
                )
            )
    return groups


def _class_code(finding: Finding) -> hd.sr.CodedConcept:
    if finding.code is not None:
        c = finding.code
        return hd.sr.CodedConcept(value=c.value, scheme_designator=c.scheme, meaning=c.meaning)
    return hd.sr.CodedConcept(finding.name[:16], _LOCAL_SCHEME, finding.name[:64])


def _class_groups(
    card: ModelCard, prediction: Prediction
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    groups = []
    for finding in findings_of(prediction, card):
        concept = _class_code(finding)
        # "<class> = Present / Absent"; a softmax head has one finding, always present (the
        # TID 1501 "Finding" concept is the finding type, so it cannot name the evaluation)
        present = codes.SCT.Present if finding.present else codes.SCT.Absent
        evaluation = hd.sr.QualitativeEvaluation(name=concept, value=present)
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"{card.name} {finding.name}"[:64]
                ),
                finding_type=concept,
                algorithm_id=_algorithm(card),
                qualitative_evaluations=[evaluation],
                measurements=[
                    hd.sr.Measurement(
                        name=codes.DCM.Probability,
                        value=float(finding.probability),
                        unit=codes.UCUM.NoUnits,
                        algorithm_id=_algorithm(card),
                    )
                ],
            )
        )
    return groups


_UNIT_MEANINGS = {
    "1": "no units",
    "ml": "milliliter",
    "mm3": "cubic millimeter",
    "mm": "millimeter",
    "{ratio}": "ratio",
    "%": "percent",
    "s": "second",
    "h": "hour",
}


def _local_value(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").upper()
    return (slug or "MEASUREMENT")[:16]


def measurement_concept(measurement: Measurement) -> hd.sr.CodedConcept:
    """The SR concept name of a measurement's numeric item.

    Parameters
    ----------
    measurement : aenode.records.Measurement
        Its ``code`` when given; else a local code (scheme ``99AENODE``) whose meaning is its
        name, or "Probability of <name>" for a probability whose name does not say so.

    Returns
    -------
    highdicom.sr.CodedConcept
    """
    code: FindingCode | None = measurement.code
    if code is not None:
        return hd.sr.CodedConcept(code.value, code.scheme, code.meaning[:64])
    meaning = measurement.name
    if measurement.probability and "probab" not in meaning.lower():
        meaning = f"Probability of {meaning}"
    return hd.sr.CodedConcept(_local_value(meaning), _LOCAL_SCHEME, meaning[:64])


def _unit(unit: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(unit, "UCUM", _UNIT_MEANINGS.get(unit, unit)[:64])


def _key_images(
    volume: Volume, sources: Sequence[Dataset], key_slices: Sequence[int]
) -> list[hd.sr.SourceImageForMeasurementGroup]:
    """The key slices' source instances (frames, for one multi-frame object)."""
    nz = volume.image.GetSize()[2]
    ks = sorted({k for k in key_slices if 0 <= k < nz})
    if len(sources) == 1 and nz > 1:
        if not ks:
            return []
        return [
            hd.sr.SourceImageForMeasurementGroup.from_source_image(sources[0], [k + 1 for k in ks])
        ]
    return [
        hd.sr.SourceImageForMeasurementGroup.from_source_image(sources[k])
        for k in ks
        if k < len(sources)
    ]


def _measurement_group(
    card: ModelCard, prediction: Prediction, volume: Volume, sources: Sequence[Dataset]
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    if not prediction.measurements:
        return []
    for m in prediction.measurements:
        if m.probability and not 0.0 <= m.value <= 1.0:
            raise ResultError(
                f"model {card.name}: measurement {m.name!r} is a probability but {m.value:g} "
                "is not in [0, 1]"
            )
    items = [
        hd.sr.Measurement(
            name=measurement_concept(m),
            value=float(m.value),
            unit=_unit("1" if m.probability else m.unit),
            algorithm_id=_algorithm(card),
        )
        for m in prediction.measurements
    ]
    images = _key_images(volume, sources, prediction.key_slices)
    return [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=hd.UID(), identifier=f"{card.name} measurements"[:64]
            ),
            algorithm_id=_algorithm(card),
            measurements=items,
            source_images=images or None,
        )
    ]


def build_sr(
    volume: Volume,
    prediction: Prediction,
    card: ModelCard,
    settings: ResultsSettings,
    volumes_mm3: Mapping[str, float],
    seg: Dataset | None = None,
    uids: ResultUids | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 measurement report of one prediction.

    Parameters
    ----------
    volume : aenode.records.Volume
        The reference volume; its source instances are the evidence.
    prediction : aenode.records.Prediction
        ``findings`` (or, when empty, ``class_probabilities`` decided by the card's head)
        become qualitative evaluations with their probability; ``measurements`` numeric
        items of one group whose source images are the ``key_slices``.
    card : aenode.infer.cards.ModelCard
        Labels (coded finding type, category and type modifier) and classes (code, head).
    settings : aenode.config.ResultsSettings
        ``series_number_base`` (+3), ``series_description``, ``manufacturer``.
    volumes_mm3 : Mapping[str, float]
        Volume per label name, reported in UCUM ``mm3``.
    seg : pydicom.Dataset or None
        The SEG of the same prediction; each volume group then references its segment.
    uids : ResultUids or None
        The job's deterministic UIDs (:mod:`aenode.results.uids`); None makes random ones.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR

    Raises
    ------
    ResultError
        If a probability measurement is outside [0, 1].
    """
    sources = reference_datasets(volume)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(),
            name=card.name[:64],
            manufacturer_name=settings.manufacturer,
            model_name=card.version[:64],
        ),
    )
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    groups += _volume_groups(card, volumes_mm3, seg, volume.series.series_uid)
    groups += _class_groups(card, prediction)
    groups += _measurement_group(card, prediction, volume, sources)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    for note in prediction.notes:  # what a reader should know (e.g. the geometry correction)
        report[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=_COMMENT,
                value=note[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    evidence: list[Dataset] = list(sources) + ([seg] if seg is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.series("SR") if uids else hd.UID(),
        series_number=settings.series_number_base + SR_SERIES_OFFSET,
        sop_instance_uid=uids.sop("SR") if uids else hd.UID(),
        instance_number=1,
        manufacturer=settings.manufacturer,
        is_complete=True,
        institution_name=settings.institution_name,
        series_description=series_description(settings, card, "SR"),
        software_versions=software_versions(card),
        manufacturer_model_name=card.name[:64],
    )
