"""``aenode models``: validate and list the model packages."""

from __future__ import annotations

import argparse
import json
import sys

from aenode.config import Settings
from aenode.infer.registry import Registry, RegistryError, model_summary

__all__ = ["command_models"]


def command_models(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode models [--json]``.

    Returns
    -------
    int
        0 when every package is valid, 1 (with the reason on stderr) otherwise.
    """
    try:
        registry = Registry.load(settings.models)
    except RegistryError as exc:
        print(f"aenode: {exc}", file=sys.stderr)
        return 1
    rows = [model_summary(registry.get(n)) for n in registry.names()]
    if args.json:
        print(json.dumps({"models": rows}, indent=2))
        return 0
    if not rows:
        print(f"no model packages under {settings.models.path}")
    for row in rows:
        outputs = ", ".join(row["labels"] or row["classes"])
        dice = " ".join(f"{k}={v:.3f}" for k, v in row["validation_dice"].items())
        if row["format"] == "python":
            size = f"python {row['entry_point']}"
            if row["weights"] is not None:
                size += f" + {row['weights_mb']} MB"
        else:
            size = f"{row['weights_mb']} MB"
        print(
            f"{row['name']} {row['version']}  {row['task']} {row['modality']}  [{outputs}]  "
            f"{size}" + (f"  validation Dice {dice}" if dice else "")
        )
    return 0
