"""``aenode train MODEL --data DIR --out DIR``: train a model by its recipe, then write its package.

Every trainable model has a recipe in :mod:`aenode.train` run by the one training loop
(device choice, mixed precision on GPU, time budget or exact epochs, checkpoints, progress
bar, per-epoch log). The run's checkpoints and log go to ``--work`` (default
``var/train/MODEL``); the package (weights and ``model.yaml`` with held-out figures) to
``--out``. ``--export-only`` writes the package from an earlier run's best checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aenode.config import ConfigError, Settings
from aenode.process import apply_process_settings

__all__ = ["DEFAULT_MINUTES", "command_train"]

DEFAULT_MINUTES = 30.0
"""Budget when neither ``--minutes`` nor ``--epochs`` is given."""


def command_train(args: argparse.Namespace, settings: Settings) -> int:
    """Train, write the package and print where it went with its validation figure.

    Threads and determinism come from ``runtime.threads`` and ``runtime.deterministic``.

    Returns
    -------
    int
        0 on success.

    Raises
    ------
    ConfigError
        For an unknown model or a data folder without ``imagesTr``/``labelsTr`` (the message
        names the option).
    """
    from aenode.train import PACKAGES, export_package, recipe, train

    try:
        recipe(args.model)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    apply_process_settings(settings.runtime)
    work: Path = args.work if args.work is not None else Path("var/train") / args.model
    minutes = args.minutes if args.minutes is not None or args.epochs else DEFAULT_MINUTES
    try:
        if not args.export_only:
            report = train(
                args.model,
                args.data,
                work,
                minutes,
                args.epochs,
                args.device,
                seed=args.seed,
                progress=sys.stderr.isatty() or args.progress,
            )
            summary = {k: str(v) if isinstance(v, Path) else v for k, v in vars(report).items()}
            (work / "report.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
            print(
                f"{args.model}: {report.epochs} epoch(s) in {report.minutes:.1f} min on "
                f"{report.device} ({report.precision}); best validation metric "
                f"{report.best_metric:.4f} at epoch {report.best_epoch}; run in {work}"
            )
        if args.model not in PACKAGES:
            print(f"{args.model}: no package export for this recipe; checkpoints in {work}")
            return 0
        card = export_package(args.model, work, args.data, args.out, seed=args.seed)
    except FileNotFoundError as exc:
        raise ConfigError(f"train: {exc}") from None
    print(f"{card}: written")
    return 0
