"""``aenode select PATH... [--json]``: dry-run the selection rules on files, no networking.

Each series found is printed with the rule (and role) and models it matched, or, for each
rule, the first condition that failed::

    series ...153146185462  MR  'HippoCrop'  32 instances
      -> rule hippocampus: model hippocampus
    series ...6417231052.1  MR  'T1post'  22 instances
      rule hippocampus: SeriesDescription 'T1post' does not match '^HippoCrop$'
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from aenode.dicomread import read_text
from aenode.select.rules import Rule, evaluate

__all__ = [
    "SeriesReport",
    "check_volumes",
    "explain",
    "scan",
    "short_uid",
    "studies",
    "text_report",
]

log = logging.getLogger(__name__)


@dataclass
class SeriesReport:
    """One series found on disk and what the rules made of it."""

    study_uid: str
    series_uid: str
    modality: str
    description: str
    instances: int
    first_file: Path
    header: Dataset = field(repr=False)
    files: list[Path] = field(default_factory=list, repr=False)
    matches: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    volume: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready content (without the header)."""
        return {
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "modality": self.modality,
            "description": self.description,
            "instances": self.instances,
            "first_file": str(self.first_file),
            "matches": self.matches,
            "failures": self.failures,
            "volume": self.volume,
        }


def short_uid(uid: str, keep: int = 12) -> str:
    """The last ``keep`` characters of a UID, marked as shortened (``...153146185462``)."""
    return uid if len(uid) <= keep + 3 else "..." + uid[-keep:]


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def scan(paths: Sequence[Path]) -> tuple[list[SeriesReport], list[str]]:
    """Group the DICOM files under ``paths`` by series, reading headers only.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        Files or folders (searched recursively).

    Returns
    -------
    tuple of (list of SeriesReport, list of str)
        Series in the order of their first file, and one line per file skipped (not DICOM,
        no SeriesInstanceUID, unreadable) naming it.
    """
    found: dict[str, SeriesReport] = {}
    skipped: list[str] = []
    for path in _files(paths):
        if not path.exists():
            skipped.append(f"{path}: no such file or folder")
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as exc:
            skipped.append(f"{path}: not DICOM ({exc})")
            continue
        uid = read_text(ds, "SeriesInstanceUID")
        if not uid:
            skipped.append(f"{path}: SeriesInstanceUID missing")
            continue
        report = found.get(str(uid))
        if report is None:
            found[str(uid)] = SeriesReport(
                study_uid=read_text(ds, "StudyInstanceUID"),
                series_uid=uid,
                modality=read_text(ds, "Modality"),
                description=read_text(ds, "SeriesDescription"),
                instances=1,
                first_file=path,
                header=ds,
                files=[path],
            )
        else:
            report.instances += 1
            report.files.append(path)
    return list(found.values()), skipped


def explain(reports: Sequence[SeriesReport], rules: Sequence[Rule]) -> None:
    """Fill each report's ``matches`` and ``failures`` from the rules.

    Parameters
    ----------
    reports : sequence of SeriesReport
        From :func:`scan`.
    rules : sequence of Rule
        Compiled rules.
    """
    for report in reports:
        for rule in rules:
            decision = evaluate(rule, report.header, report.instances)
            if decision.matched:
                report.matches.append(
                    {"rule": rule.name, "role": decision.role, "models": list(rule.models)}
                )
            else:
                report.failures.append({"rule": rule.name, "reason": decision.reason})


def check_volumes(
    reports: Sequence[SeriesReport],
    geometry: Callable[[str], tuple[Collection[str], Collection[str]]],
    spacing_tolerance: float,
) -> None:
    """Build the volume of each matched series as a job would, and record what it gives.

    Fills ``report.volume`` with one dict per matched model: ``model``, ``outcome``
    (``ok``, ``corrected`` or ``rejected``) and ``detail`` (the rejection or correction).

    Parameters
    ----------
    reports : sequence of SeriesReport
        After :func:`explain`.
    geometry : callable
        Model name -> (allow, correct) for :func:`aenode.volume.build_volume`.
    spacing_tolerance : float
        ``volume.spacing_tolerance``.
    """
    from aenode.volume import VolumeError, build_volume_from_files

    for report in reports:
        models = sorted({m for match in report.matches for m in match["models"]})
        for model in models:
            allow, correct = geometry(model)
            try:
                volume = build_volume_from_files(
                    report.files,
                    spacing_tolerance=spacing_tolerance,
                    allow=allow,
                    correct=correct,
                )
            except VolumeError as exc:
                report.volume.append({"model": model, "outcome": "rejected", "detail": str(exc)})
                continue
            if volume.correction is not None:
                detail = volume.correction.describe()
                report.volume.append({"model": model, "outcome": "corrected", "detail": detail})
            else:
                report.volume.append({"model": model, "outcome": "ok", "detail": ""})


def studies(reports: Sequence[SeriesReport], rules: Sequence[Rule]) -> list[dict[str, Any]]:
    """For each study rule and study with a role filled: the roles found and those missing.

    Parameters
    ----------
    reports : sequence of SeriesReport
        After :func:`explain`.
    rules : sequence of Rule
        Compiled rules.

    Returns
    -------
    list of dict
        ``study_uid``, ``rule``, ``models``, ``roles`` (role -> series UIDs), ``missing``.
    """
    out = []
    for rule in rules:
        if not rule.is_study:
            continue
        found: dict[str, dict[str, list[str]]] = {}
        for r in reports:
            for m in r.matches:
                if m["rule"] == rule.name and m["role"]:
                    roles = found.setdefault(r.study_uid, {})
                    roles.setdefault(m["role"], []).append(r.series_uid)
        for study_uid, roles in found.items():
            out.append(
                {
                    "study_uid": study_uid,
                    "rule": rule.name,
                    "models": list(rule.models),
                    "roles": roles,
                    "missing": [role for role in rule.roles if role not in roles],
                }
            )
    return out


def text_report(
    reports: Sequence[SeriesReport],
    skipped: Sequence[str],
    n_rules: int,
    study_rows: Sequence[dict[str, Any]] = (),
) -> str:
    lines = []
    for r in reports:
        lines.append(
            f"series {short_uid(r.series_uid)}  {r.modality or '-'}  {r.description!r}  "
            f"{r.instances} instance{'s' if r.instances != 1 else ''}"
        )
        for m in r.matches:
            role = f" role {m['role']}" if m["role"] else ""
            models = ", ".join(m["models"])
            plural = "s" if len(m["models"]) > 1 else ""
            lines.append(f"  -> rule {m['rule']}{role}: model{plural} {models}")
        for v in r.volume:
            if v["outcome"] == "rejected":
                lines.append(
                    f"     model {v['model']}: matched, but the volume would be rejected: "
                    f"{v['detail']}"
                )
            elif v["outcome"] == "corrected":
                lines.append(
                    f"     model {v['model']}: the volume would be corrected: {v['detail']}"
                )
        for f in r.failures:
            lines.append(f"  rule {f['rule']}: {f['reason']}")
    for row in study_rows:
        head = f"study {short_uid(row['study_uid'])}: rule {row['rule']}"
        if row["missing"]:
            lines.append(f"{head} waits for role(s) {', '.join(row['missing'])}")
        else:
            lines.append(f"{head} -> model(s) {', '.join(row['models'])} with all roles")
    matched = sum(1 for r in reports if r.matches)
    lines.append(
        f"{len(reports)} series, {matched} matched, {n_rules} rule{'s' if n_rules != 1 else ''}"
        + (f", {len(skipped)} file(s) skipped" if skipped else "")
    )
    return "\n".join(lines)
