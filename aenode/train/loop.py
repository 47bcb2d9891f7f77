"""The one training loop every recipe runs.

Device choice, mixed precision, a time budget (``minutes``) or an exact epoch count
(``epochs``), a warm-up then cosine learning rate, checkpoints of the best and the last epoch,
a tqdm progress bar and one JSON line per epoch (loss and validation metric) in the output
folder. Seeded: with ``epochs`` a CPU run is reproducible for a given seed. Process-wide
torch threads are the caller's business (the CLI sets them from config); nothing here calls
``torch.set_num_threads``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

__all__ = [
    "Recipe",
    "TrainReport",
    "choose_device",
    "load_checkpoint",
    "read_log",
    "run",
]

log = logging.getLogger(__name__)

CHECKPOINT_BEST = "best.pt"
CHECKPOINT_LAST = "last.pt"
LOG_NAME = "train-log.jsonl"


@dataclass(frozen=True)
class Recipe:
    """What a model's training needs from the loop; each recipe module builds one.

    Attributes
    ----------
    name : str
        Model name (``aenode train NAME``).
    network : callable
        ``() -> torch.nn.Module``: a freshly initialised network.
    split : callable
        ``(data, seed) -> (train_names, validation_names)``: the fixed case split.
    loader : callable
        ``(data, train_names, seed) -> DataLoader`` of ``(inputs, targets)`` batches for one
        epoch, augmented with MONAI transforms; called once, iterated every epoch.
    validation : callable
        ``(data, validation_names) -> object``: the validation cases, loaded once.
    validate : callable
        ``(net, validation, device) -> dict`` with at least ``"metric"`` (higher is
        better); called with the network in eval mode under ``torch.no_grad``.
    loss : callable
        ``() -> torch.nn.Module`` taking ``(logits, targets)``.
    lr, weight_decay : float
        AdamW settings.
    warmup_fraction : float
        Share of the run spent on the linear warm-up before the cosine decay.
    cpu_bf16 : bool
        Use bfloat16 autocast on CPU (fast on AVX512-BF16 and AMX CPUs).
    """

    name: str
    network: Callable[[], torch.nn.Module]
    split: Callable[[Path, int], tuple[list[str], list[str]]]
    loader: Callable[[Path, Sequence[str], int], DataLoader[Any]]
    validation: Callable[[Path, Sequence[str]], Any]
    validate: Callable[[torch.nn.Module, Any, torch.device], dict[str, Any]]
    loss: Callable[[], torch.nn.Module]
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.03
    cpu_bf16: bool = False


@dataclass
class TrainReport:
    """What a training run produced (returned, never printed).

    Attributes
    ----------
    recipe : str
        Recipe name.
    out : pathlib.Path
        Output folder (checkpoints and log).
    device : str
        Device used (``cpu``, ``cuda:0``).
    precision : str
        ``float32``, ``bfloat16 autocast`` or ``float16 autocast``.
    seed : int
        Seed of split, initialisation and augmentation.
    epochs : int
        Epochs run.
    best_epoch : int
        Epoch of the best validation metric.
    best_metric : float
        Best validation metric.
    minutes : float
        Wall time of the run.
    best_path, last_path, log_path : pathlib.Path
        Checkpoints and the JSON-lines log.
    train_names, validation_names : list of str
        The split.
    history : list of dict
        One entry per epoch (the lines of the log).
    """

    recipe: str
    out: Path
    device: str
    precision: str
    seed: int
    epochs: int
    best_epoch: int
    best_metric: float
    minutes: float
    best_path: Path
    last_path: Path
    log_path: Path
    train_names: list[str]
    validation_names: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)


def choose_device(device: str = "auto") -> torch.device:
    """The device to train on.

    Parameters
    ----------
    device : str
        ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If a CUDA device is asked for and none is present (the message names the value).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is present")
    return dev


def _lr_at(base: float, progress: float, warmup: float) -> float:
    """Linear warm-up to ``base`` over ``warmup`` of the run, then cosine to 1% of it."""
    if progress < warmup:
        return base * (0.1 + 0.9 * progress / warmup)
    frac = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return base * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def load_checkpoint(path: Path, net: torch.nn.Module) -> dict[str, Any]:
    """Load a checkpoint written by :func:`run` into ``net``.

    Parameters
    ----------
    path : pathlib.Path
        ``best.pt`` or ``last.pt``.
    net : torch.nn.Module
        A network of the recipe's architecture.

    Returns
    -------
    dict
        The checkpoint's metadata (``epoch``, ``metric``, ``recipe``).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(ckpt["model"])
    return {k: ckpt[k] for k in ("epoch", "metric", "recipe")}


def _save(path: Path, net: torch.nn.Module, recipe: str, epoch: int, metric: float) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"model": state, "epoch": epoch, "metric": metric, "recipe": recipe}, tmp)
    tmp.replace(path)


def run(
    recipe: Recipe,
    data: Path,
    out: Path,
    *,
    minutes: float | None = None,
    epochs: int | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> TrainReport:
    """Train ``recipe`` on ``data``, writing checkpoints and the log to ``out``.

    Parameters
    ----------
    recipe : Recipe
        What to train.
    data : pathlib.Path
        The recipe's data folder.
    out : pathlib.Path
        Output folder: ``best.pt``, ``last.pt``, ``train-log.jsonl``.
    minutes : float or None
        Wall-clock budget; the learning-rate schedule follows the elapsed share of it and no
        epoch is started that the recent speed says cannot finish in it.
    epochs : int or None
        Exact number of epochs (takes precedence over ``minutes``; reproducible on CPU).
    device : str
        ``auto``, ``cpu`` or ``cuda[:N]``.
    seed : int
        Seed of the split, the initialisation and the augmentation.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    TrainReport

    Raises
    ------
    ValueError
        If neither or a non-positive ``minutes``/``epochs`` is given, or the device is absent.
    """
    from tqdm import tqdm

    if epochs is None and minutes is None:
        raise ValueError("train: give minutes or epochs")
    if epochs is not None and epochs < 1:
        raise ValueError(f"train: epochs must be >= 1, got {epochs}")
    if epochs is None and minutes is not None and minutes <= 0:
        raise ValueError(f"train: minutes must be > 0, got {minutes}")
    started = time.perf_counter()
    dev = choose_device(device)
    torch.manual_seed(seed)
    train_names, val_names = recipe.split(data, seed)
    overlap = set(train_names) & set(val_names)
    if overlap:
        raise ValueError(f"{recipe.name}: split puts {sorted(overlap)[:3]} on both sides")
    batches = recipe.loader(data, train_names, seed)
    validation = recipe.validation(data, val_names)
    torch.manual_seed(seed)
    net = recipe.network().to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    loss_fn = recipe.loss()
    if dev.type == "cuda":
        amp_dtype: torch.dtype | None = torch.float16
        precision = "float16 autocast"
    elif recipe.cpu_bf16:
        amp_dtype, precision = torch.bfloat16, "bfloat16 autocast"
    else:
        amp_dtype, precision = None, "float32"
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    log_path.write_text("", encoding="utf-8")
    budget = None if epochs is not None else float(minutes or 0.0) * 60.0
    total = epochs or 1
    steps_per_epoch = max(1, len(batches))
    best_metric, best_epoch = -math.inf, 0
    history: list[dict[str, Any]] = []
    epoch_seconds: float | None = None
    extra = {"model": recipe.name, "device": str(dev)}
    log.info("training %s on %s (%s)", recipe.name, dev, precision, extra=extra)
    bar = tqdm(total=epochs, desc=f"train {recipe.name}", unit="epoch", disable=not progress)
    epoch = 0
    while True:
        if epochs is not None and epoch >= epochs:
            break
        if budget is not None:
            elapsed = time.perf_counter() - started
            if epoch > 0 and elapsed + (epoch_seconds or 0.0) > budget:
                break
        epoch += 1
        t0 = time.perf_counter()
        net.train()
        running, n_steps = 0.0, 0
        for step, (x, y) in enumerate(batches):
            if budget is not None:
                prog = (time.perf_counter() - started) / budget
            else:
                prog = ((epoch - 1) * steps_per_epoch + step) / (total * steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = _lr_at(recipe.lr, min(prog, 1.0), recipe.warmup_fraction)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with torch.autocast(
                dev.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)
            ):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            running += float(loss.item())
            n_steps += 1
        net.eval()
        with torch.no_grad():
            scores = recipe.validate(net, validation, dev)
        metric = float(scores["metric"])
        seconds = time.perf_counter() - t0
        epoch_seconds = seconds if epoch_seconds is None else 0.5 * (epoch_seconds + seconds)
        entry: dict[str, Any] = {
            "epoch": epoch,
            "loss": round(running / max(1, n_steps), 5),
            "lr": round(opt.param_groups[0]["lr"], 7),
            **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in scores.items()},
            "seconds": round(seconds, 1),
        }
        history.append(entry)
        with log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        _save(out / CHECKPOINT_LAST, net, recipe.name, epoch, metric)
        if metric > best_metric:
            best_metric, best_epoch = metric, epoch
            _save(out / CHECKPOINT_BEST, net, recipe.name, epoch, metric)
        log.info("epoch %d: loss %.4f, metric %.4f", epoch, entry["loss"], metric, extra=extra)
        bar.update(1)
        bar.set_postfix(loss=entry["loss"], val=round(metric, 4), best=round(best_metric, 4))
    bar.close()
    return TrainReport(
        recipe=recipe.name,
        out=out,
        device=str(dev),
        precision=precision,
        seed=seed,
        epochs=epoch,
        best_epoch=best_epoch,
        best_metric=best_metric,
        minutes=round((time.perf_counter() - started) / 60.0, 2),
        best_path=out / CHECKPOINT_BEST,
        last_path=out / CHECKPOINT_LAST,
        log_path=log_path,
        train_names=list(train_names),
        validation_names=list(val_names),
        history=history,
    )


def read_log(path: Path) -> list[Mapping[str, Any]]:
    """The epochs of a ``train-log.jsonl`` (one JSON object a line).

    Parameters
    ----------
    path : pathlib.Path
        The log file.

    Returns
    -------
    list of dict
    """
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
