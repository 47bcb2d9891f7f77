"""Train the brain-tumour model by hand, on one CPU thread, then write its package.

Usage::

    .venv/bin/python scripts/train_brain_tumour.py --minutes 36 --out var/train/brain-tumour
    .venv/bin/python scripts/train_brain_tumour.py --export-only --out var/train/brain-tumour

The first trains (checkpoints and ``train-log.jsonl`` in ``--out``) and then exports; the second
only exports ``--out``'s best checkpoint to ``models/brain-tumour`` (weights, card draft).
Threads are set here, once for the process, as the CLI will do from ``runtime.threads``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/lgg-flair"))
    parser.add_argument("--out", type=Path, default=Path("var/train/brain-tumour"))
    parser.add_argument("--model-dir", type=Path, default=Path("models/brain-tumour"))
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from aenode.train import train

    if not args.export_only:
        report = train(
            "brain-tumour", args.data, args.out, args.minutes, args.epochs, args.device,
            seed=args.seed,
        )  # fmt: skip
        summary = {k: str(v) if isinstance(v, Path) else v for k, v in vars(report).items()}
        (args.out / "report.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    from aenode.train.brain_tumour_card import export

    card = export(args.out, args.data, args.model_dir, seed=args.seed, threads=args.threads)
    print(f"{card}: written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
