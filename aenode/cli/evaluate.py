"""``aenode evaluate --model NAME --images DIR --labels DIR``: metrics against references."""

from __future__ import annotations

import argparse
import json
import sys
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


def _print_images(report: dict[str, Any]) -> None:
    print(
        f"{report['model']} {report['version']}: {report['n']} image(s), "
        f"{report['positives']} positive ({report['label_column']}), "
        f"threshold {report['threshold']:g}"
    )
    for name, values in report["metrics"].items():
        for metric in ("auc", "accuracy", "sensitivity", "specificity"):
            v = values[metric]
            lo, hi = v["ci95"]
            ci = "" if lo is None else f"  95% CI [{lo:.3f}, {hi:.3f}]"
            print(f"{name} {metric:>12}: {v['value']:.3f}{ci}")
        print(
            f"{name} {'confusion':>12}: TP {values['tp']} FN {values['fn']} TN {values['tn']} "
            f"FP {values['fp']}"
        )
    if "predictions_csv" in report:
        print(f"{'predictions':>12}: {report['predictions_csv']}")


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
    report = evaluate_model(
        settings,
        args.model,
        args.images,
        args.labels,
        names,
        predictions,
        progress=sys.stderr.isatty() and not args.json,
    )
    if args.json:
        print(json.dumps(finite(report)))
    elif report["task"] == "segmentation":
        _print_segmentation(report)
    elif "label_column" in report:
        _print_images(report)
    else:
        print(json.dumps(finite(report["metrics"]), indent=2))
    return 0
