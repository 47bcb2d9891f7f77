"""Training: one loop (:mod:`aenode.train.loop`) and one recipe module per model.

``train("brain-tumour", data, out, minutes=35, epochs=None, device="auto")`` looks the recipe
up by name, runs the loop and returns a :class:`TrainReport`; checkpoints and the per-epoch
JSON-lines log go to ``out``.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from aenode.train.loop import Recipe, TrainReport, choose_device, load_checkpoint, read_log

__all__ = [
    "PACKAGES",
    "RECIPES",
    "Recipe",
    "TrainReport",
    "choose_device",
    "export_package",
    "load_checkpoint",
    "read_log",
    "recipe",
    "train",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())

RECIPES: dict[str, str] = {
    "brain-tumour": "aenode.train.brain_tumour",
    "hippocampus": "aenode.train.hippocampus",
}
"""Recipe modules by model name; each defines ``RECIPE``."""

PACKAGES: dict[str, str] = {
    "brain-tumour": "aenode.train.brain_tumour_card",
    "hippocampus": "aenode.train.hippocampus_card",
}
"""Package writers by model name; each defines ``export(run_dir, data, model_dir, *, seed)``
writing the weights and ``model.yaml`` with held-out figures from a run's best checkpoint."""


def recipe(name: str) -> Recipe:
    """The recipe of a model.

    Parameters
    ----------
    name : str
        A key of :data:`RECIPES`.

    Returns
    -------
    Recipe

    Raises
    ------
    KeyError
        If no recipe has that name (the message lists the known ones).
    """
    try:
        module = RECIPES[name]
    except KeyError:
        raise KeyError(f"train: unknown model {name!r} (known: {', '.join(RECIPES)})") from None
    found: Recipe = importlib.import_module(module).RECIPE
    return found


def export_package(name: str, run_dir: Path, data: Path, model_dir: Path, *, seed: int = 0) -> Path:
    """Write a model's package from a training run (:data:`PACKAGES`).

    Parameters
    ----------
    name : str
        A key of :data:`PACKAGES`.
    run_dir : pathlib.Path
        The run's folder (``best.pt``, ``train-log.jsonl``).
    data : pathlib.Path
        The run's data folder (the split is recomputed from ``seed``).
    model_dir : pathlib.Path
        The package folder to write.
    seed : int
        The run's seed.

    Returns
    -------
    pathlib.Path
        The card written.

    Raises
    ------
    KeyError
        If no package writer has that name.
    FileNotFoundError
        If the checkpoint, the data or a hand-written part of the package is missing.
    """
    try:
        module = PACKAGES[name]
    except KeyError:
        raise KeyError(f"train: no package export for {name!r}") from None
    path: Path = importlib.import_module(module).export(run_dir, data, model_dir, seed=seed)
    return path


def train(
    recipe_name: str,
    data: Path,
    out: Path,
    minutes: float | None = None,
    epochs: int | None = None,
    device: str = "auto",
    *,
    seed: int = 0,
    progress: bool = True,
) -> TrainReport:
    """Train a model by recipe name.

    Parameters
    ----------
    recipe_name : str
        ``brain-tumour`` or ``hippocampus``.
    data : pathlib.Path
        The recipe's data folder (``imagesTr`` and ``labelsTr``).
    out : pathlib.Path
        Output folder for ``best.pt``, ``last.pt`` and ``train-log.jsonl``.
    minutes : float or None
        Wall-clock budget.
    epochs : int or None
        Exact number of epochs (wins over ``minutes``).
    device : str
        ``auto``, ``cpu`` or ``cuda[:N]``.
    seed : int
        Seed of split, initialisation and augmentation.
    progress : bool
        Show the tqdm progress bar.

    Returns
    -------
    TrainReport
    """
    from aenode.train.loop import run

    return run(
        recipe(recipe_name),
        data,
        out,
        minutes=minutes,
        epochs=epochs,
        device=device,
        seed=seed,
        progress=progress,
    )
