"""``aenode select PATH...``: dry-run the selection rules on DICOM files or folders."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import ValidationError

from aenode.config import Settings
from aenode.infer.cards import ModelCard
from aenode.select.explain import check_volumes, explain, scan, studies, text_report
from aenode.select.rules import compile_rules

__all__ = ["command_select"]


def _geometry(settings: Settings) -> Callable[[str], tuple[list[str], list[str]]]:
    """Model -> (allow, correct) from its card's ``inputs.geometry``, as a job uses them."""

    def lookup(model: str) -> tuple[list[str], list[str]]:
        card_path = Path(settings.models.path) / model / "model.yaml"
        try:
            data = yaml.safe_load(card_path.read_text(encoding="utf-8"))
            geometry = ModelCard.model_validate(data).inputs.geometry
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            # `aenode config check` names what is wrong with a card; here use the default.
            print(
                f"aenode select: {card_path}: card not usable ({exc}); geometry checks use "
                "volume.allow",
                file=sys.stderr,
            )
            return list(settings.volume.allow), []
        return list(geometry.allow or settings.volume.allow), list(geometry.correct)

    return lookup


def command_select(args: argparse.Namespace, settings: Settings) -> int:
    """Which series each rule selects, and why the others were not.

    Returns
    -------
    int
        0 when DICOM series were found, 1 when none were.
    """
    rules = compile_rules(settings.selection.rules)
    reports, skipped = scan([Path(p) for p in args.paths])
    explain(reports, rules)
    if not args.no_volume_check:
        check_volumes(reports, _geometry(settings), settings.volume.spacing_tolerance)
    study_rows = studies(reports, rules)
    if args.json:
        result = {
            "series": [r.as_dict() for r in reports],
            "studies": study_rows,
            "skipped": skipped,
        }
        print(json.dumps(result, indent=2))
    else:
        print(text_report(reports, skipped, len(rules), study_rows))
        for line in skipped:
            print(f"skipped {line}", file=sys.stderr)
    if not reports:
        print("aenode select: no DICOM series found", file=sys.stderr)
        return 1
    return 0
