"""``aenode train MODEL --data DIR --out DIR``: train a shipped model from data on disk."""

from __future__ import annotations

import argparse

from aenode.config import ConfigError, Settings
from aenode.process import apply_process_settings

__all__ = ["command_train"]


def command_train(args: argparse.Namespace, settings: Settings) -> int:
    """Train, write the package and print the validation figures.

    Threads and determinism come from ``runtime.threads`` and ``runtime.deterministic``.

    Returns
    -------
    int
        0 on success.
    """
    from aenode.infer.train import train_hippocampus

    if args.model != "hippocampus":
        raise ConfigError(f"train: unknown model {args.model!r} (known: hippocampus)")
    apply_process_settings(settings.runtime)
    result = train_hippocampus(
        args.data,
        args.out,
        seed=args.seed,
        minutes=args.minutes if args.minutes is not None else 28.0,
        epochs=args.epochs,
    )
    val = result.card.metrics["validation"]
    print(
        f"{result.card_path}: validation Dice anterior {val['anterior']['dice']:.4f} "
        f"{val['anterior']['ci95']}, posterior {val['posterior']['dice']:.4f} "
        f"{val['posterior']['ci95']}, mean {val['mean']['dice']:.4f}"
    )
    return 0
