"""From class probabilities to findings, as the card's output head says (no torch here).

``softmax``: the classes are mutually exclusive, so a prediction has exactly one finding,
the most probable class (the first in card order on a tie), present, with its probability.
``sigmoid``: the classes are independent labels, so each class is one finding, present when
its probability reaches the class's ``threshold`` (0.5 unless the card says otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping

from aenode.infer.cards import ClassSpec, ModelCard
from aenode.records import Finding, FindingCode

__all__ = ["findings_for"]


def _code(spec: ClassSpec) -> FindingCode | None:
    if spec.code is None:
        return None
    return FindingCode(value=spec.code.value, scheme=spec.code.scheme, meaning=spec.code.meaning)


def findings_for(card: ModelCard, probabilities: Mapping[str, float]) -> list[Finding]:
    """The findings of one classifier prediction.

    Parameters
    ----------
    card : aenode.infer.cards.ModelCard
        A classification card: ``outputs.head`` and ``outputs.classes``.
    probabilities : Mapping[str, float]
        Probability per class name (after the head), one for each card class.

    Returns
    -------
    list of aenode.records.Finding
        One finding for a softmax head; one per class, in card order, for a sigmoid head.

    Raises
    ------
    ValueError
        If the card is not a classifier or the class names differ from the card's.
    """
    classes = card.outputs.classes
    if card.task != "classification" or card.outputs.head is None:
        raise ValueError(f"model {card.name}: findings need a classification card with a head")
    names = [c.name for c in classes]
    if sorted(probabilities) != sorted(names):
        raise ValueError(
            f"model {card.name}: probabilities for {sorted(probabilities)} but outputs.classes "
            f"lists {names}"
        )
    if card.outputs.head == "softmax":
        best = max(classes, key=lambda c: float(probabilities[c.name]))  # first wins a tie
        return [Finding(best.name, float(probabilities[best.name]), True, None, _code(best))]
    out = []
    for spec in classes:
        p = float(probabilities[spec.name])
        out.append(Finding(spec.name, p, p >= spec.threshold, spec.threshold, _code(spec)))
    return out
