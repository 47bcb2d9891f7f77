"""``aenode select PATH...``: dry-run the selection rules on DICOM files or folders."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aenode.config import Settings
from aenode.select.explain import explain, scan, studies, text_report
from aenode.select.rules import compile_rules

__all__ = ["command_select"]


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
