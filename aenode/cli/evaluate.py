"""``aenode evaluate --model NAME --images DIR --labels DIR``: metrics against references."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from aenode.config import Settings
from aenode.evaluate import evaluate_model, finite
from aenode.process import apply_process_settings

__all__ = ["command_evaluate"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _print_segmentation(report: dict[str, Any]) -> None:
    keys = [k for k in report["metrics"]["dice"] if k != "mean"]
    print(f"{report['model']} {report['version']}: {report['n']} case(s)")
    header = "case".ljust(24) + "".join(f"dice {k}".rjust(16) for k in keys)
    print(header + "hd95 mm".rjust(12))
    for row in report["cases"]:
        hd = _mean([row["hd95_mm"][k] for k in keys])
        print(
            row["case"].ljust(24) + "".join(f"{row['dice'][k]:16.4f}" for k in keys) + f"{hd:12.2f}"
        )
    for metric, values in report["metrics"].items():
        text = "  ".join(f"{k} {v:.4f}" for k, v in values.items())
        print(f"{metric:>18}: {text}")
    for k, (lo, hi) in report["dice_ci95"].items():
        print(f"{'dice 95% CI':>18}: {k} [{lo:.4f}, {hi:.4f}]")
    print(f"{'dice median':>18}: {report['dice_median']:.4f}")
    presence = report.get("slice_presence")
    if presence:
        text = "  ".join(f"{k} {presence[k]:.4f}" for k in ("auc", "accuracy", "sensitivity"))
        print(f"{'slice presence':>18}: {text}  specificity {presence['specificity']:.4f}")
    written = [row["prediction"] for row in report["cases"] if "prediction" in row]
    if written:
        print(f"{'predictions':>18}: {len(written)} file(s) in {Path(written[0]).parent}")


def command_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """Evaluate and print the report (text or JSON).

    Returns
    -------
    int
        0 on success; a ConfigError (unknown model, mismatched folders) exits with 2.
    """
    apply_process_settings(settings.runtime)
    names = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    predictions = getattr(args, "predictions", None)
    report = evaluate_model(settings, args.model, args.images, args.labels, names, predictions)
    if args.json:
        print(json.dumps(finite(report)))
    elif report["task"] == "segmentation":
        _print_segmentation(report)
    else:
        print(json.dumps(finite(report["metrics"]), indent=2))
    return 0
