"""The model registry: every package under ``models.path`` validated and loaded at start-up.

A package is a folder ``<name>/`` holding ``model.yaml`` (a :class:`ModelCard`) and the
weights it names. Anything wrong (unreadable YAML, an invalid card, a missing weights file,
a checksum mismatch, weights that do not fit the architecture, a network whose output on a
dummy input of the card's size does not match the card's labels or classes) stops start-up
with a :class:`RegistryError` naming the card file, the field and the reason, e.g.
``models/hippocampus/model.yaml: runtime.sha256: does not match model.pt (expected ..., got ...)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import ValidationError

from aenode.config import ModelsSettings, Settings
from aenode.errors import InputError
from aenode.infer.cards import ModelCard
from aenode.infer.zoo import ARCHITECTURES, build_network
from aenode.select.rules import compile_rules

__all__ = [
    "LoadedModel",
    "Registry",
    "RegistryError",
    "check_selection",
    "load_package",
    "model_summary",
    "module_name",
]

log = logging.getLogger(__name__)

CARD_FILE = "model.yaml"


class RegistryError(InputError):
    """A model package that cannot be used; the message names the file, field and reason."""


@dataclass
class LoadedModel:
    """A validated package with its network (torch formats) or module (python) loaded.

    Attributes
    ----------
    card : ModelCard
        The validated card.
    path : pathlib.Path
        The package folder.
    network : torch.nn.Module or None
        The network with its weights, in eval mode on the CPU; None for format python.
    module : types.ModuleType or None
        Format python: the entry point's module (``sys.modules[module_name(card.name)]``).
    state : Any
        Format python: what the module's optional ``load(package, card, device)`` returned,
        handed to every ``predict`` call; None without ``load``.
    """

    card: ModelCard
    path: Path
    network: torch.nn.Module | None = None
    module: ModuleType | None = None
    state: Any = None

    @property
    def is_python(self) -> bool:
        """Whether the package runs a python entry point (``runtime.format: python``)."""
        return self.card.runtime.format == "python"


def _fail(card_path: Path, field: str, reason: str) -> RegistryError:
    return RegistryError(f"{card_path}: {field}: {reason}")


def _read_card(card_path: Path) -> ModelCard:
    try:
        text = card_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"{card_path}: cannot read the card: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{card_path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{card_path}: the card must be a mapping of fields")
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{loc}: {msg}" if loc else msg)  # a card-level rule names its field
        raise RegistryError(f"{card_path}: " + "; ".join(lines)) from exc


def _check_card(card: ModelCard, folder: Path, card_path: Path) -> None:
    if card.name != folder.name:
        raise _fail(card_path, "name", f"{card.name!r} differs from the package folder")
    if card.task == "segmentation":
        if not card.outputs.labels:
            raise _fail(card_path, "outputs.labels", "a segmentation model needs labels")
        values = [label.value for label in card.outputs.labels]
        if len(set(values)) != len(values):
            raise _fail(card_path, "outputs.labels", f"duplicate label values {values}")
    elif not card.outputs.classes:
        raise _fail(card_path, "outputs.classes", "a classification model needs classes")
    roles = [role.name for role in card.inputs.roles]
    if len(set(roles)) != len(roles):
        raise _fail(card_path, "inputs.roles", f"duplicate role names {roles}")
    if not any(role.required for role in card.inputs.roles):
        raise _fail(card_path, "inputs.roles", "at least one role must be required")
    rt = card.runtime
    if rt.format == "state_dict":
        if rt.architecture is None:
            raise _fail(card_path, "runtime.architecture", "required for format state_dict")
        if rt.architecture not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise _fail(
                card_path, "runtime.architecture", f"unknown {rt.architecture!r} (known: {known})"
            )
    if rt.weights is not None and (rt.weights.is_absolute() or ".." in rt.weights.parts):
        raise _fail(card_path, "runtime.weights", "must be a path inside the package folder")
    entry = rt.entry_file
    if entry is not None and Path(entry).name != entry:
        raise _fail(card_path, "runtime.entry_point", "the file must be in the package folder")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_network(card: ModelCard, weights: Path, card_path: Path) -> torch.nn.Module:
    rt = card.runtime
    if rt.format == "torchscript":
        try:
            net: torch.nn.Module = torch.jit.load(str(weights), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise _fail(card_path, "runtime.weights", f"not a TorchScript file: {exc}") from exc
    else:
        assert rt.architecture is not None
        try:
            net = build_network(rt.architecture, rt.architecture_args)
        except ValueError as exc:
            raise _fail(card_path, "runtime.architecture_args", str(exc)) from exc
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several unrelated types for a bad file
            raise _fail(card_path, "runtime.weights", f"cannot read {weights.name}: {exc}") from exc
        if not isinstance(state, dict):
            raise _fail(card_path, "runtime.weights", f"{weights.name} is not a state dict")
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            reason = " ".join(line.strip() for line in first[:3])
            raise _fail(
                card_path,
                "runtime.weights",
                f"{weights.name} does not fit {rt.architecture}: {reason}",
            ) from exc
    net.float().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


# Without pad_to or patch_size a model takes any size; the check then uses this one
# (divisible by 16, so that U-Nets with four down-samplings fit).
_DUMMY_SIZE = [32, 32, 32]


def _dummy_shape(card: ModelCard) -> tuple[list[int], str, str]:
    """The (x, y, z) size of the load-time check's dummy input, the field to blame, its origin.

    A sliding-window model is checked on one window (``runtime.patch_size``), a fixed-size
    model on ``inputs.preprocessing.pad_to``, any other on a small default size.
    """
    if card.runtime.patch_size is not None:
        return list(card.runtime.patch_size), "runtime.patch_size", "runtime.patch_size"
    pad_to = "inputs.preprocessing.pad_to"
    if card.inputs.preprocessing.pad_to is not None:
        return list(card.inputs.preprocessing.pad_to), pad_to, pad_to
    return list(_DUMMY_SIZE), pad_to, f"the default, as the card sets no {pad_to}"


def _check_network(card: ModelCard, net: torch.nn.Module, card_path: Path) -> None:
    """Run the network once on a dummy input of the card's shape and check its output."""
    size, field, source = _dummy_shape(card)
    shape = [1, card.channels, *reversed(size)]
    channels = f"{card.channels} channel(s): one per inputs.roles" + (
        " plus inputs.presence_channels" if card.inputs.presence_channels else ""
    )
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            out = net(x)
    except Exception as exc:  # any failure of the forward pass is the card's or the network's
        first = " ".join(str(exc).strip().splitlines()[:2])
        raise _fail(
            card_path,
            "inputs.roles",
            f"the network fails on a dummy input {shape} ([batch, channel, z, y, x]; "
            f"{channels}; size {size} (x, y, z) from {source}): {type(exc).__name__}: {first}",
        ) from exc
    if isinstance(out, (list, tuple)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise _fail(card_path, "runtime.weights", f"the network returns {type(out).__name__}")
    got = list(out.shape)
    if card.task == "segmentation":
        want = len(card.outputs.labels) + 1
        if len(got) != 5 or got[1] != want:
            raise _fail(
                card_path,
                "outputs.labels",
                f"the network gives {got} for a dummy input {shape}; a segmentation needs "
                f"[1, {want}, z, y, x] ({len(card.outputs.labels)} labels + background)",
            )
        if got[2:] != shape[2:]:
            raise _fail(
                card_path,
                field,
                f"the network gives a {got[2:]} grid for a {shape[2:]} input (z, y, x); "
                "a segmentation network must keep the input's size",
            )
        return
    n = len(card.outputs.classes)
    if not got or got[0] != 1 or int(np.prod(got[1:])) != n:
        raise _fail(
            card_path,
            "outputs.classes",
            f"the network gives {int(np.prod(got[1:])) if got else 0} output(s) (shape {got}) "
            f"for a dummy input {shape} but the card lists {n} class(es) "
            f"{[c.name for c in card.outputs.classes]} for a {card.outputs.head} head",
        )


def module_name(model: str) -> str:
    """The ``sys.modules`` name a python-format model's entry point is loaded under.

    Parameters
    ----------
    model : str
        The card's name.

    Returns
    -------
    str
        ``aenode_model_<name with - replaced by _>``.
    """
    return "aenode_model_" + model.replace("-", "_")


def _check_sha(card_path: Path, file: Path, expected: str, field: str, what: str) -> None:
    if not file.is_file():
        raise _fail(card_path, what, f"file not found: {file}")
    actual = _sha256(file)
    if actual != expected:
        raise _fail(
            card_path,
            field,
            f"does not match {file.name} (expected {expected}, got {actual})",
        )


def _load_python(
    card: ModelCard, folder: Path, card_path: Path, device: torch.device
) -> tuple[ModuleType, Any]:
    """Import the entry point's file as a module, check ``predict``, call ``load``."""
    rt = card.runtime
    assert rt.entry_file is not None and rt.entry_function is not None
    source = folder / rt.entry_file
    _check_sha(card_path, source, rt.sha256, "runtime.sha256", "runtime.entry_point")
    if rt.weights is not None:
        assert rt.weights_sha256 is not None  # the card validator requires it
        weights = folder / rt.weights
        _check_sha(
            card_path, weights, rt.weights_sha256, "runtime.weights_sha256", "runtime.weights"
        )
    name = module_name(card.name)
    spec = importlib.util.spec_from_file_location(name, source)
    if spec is None or spec.loader is None:
        raise _fail(card_path, "runtime.entry_point", f"cannot import {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the package's own code: any error stops the load, named
        sys.modules.pop(name, None)
        raise _fail(
            card_path,
            "runtime.entry_point",
            f"{rt.entry_file} fails to import: {type(exc).__name__}: {exc}",
        ) from exc
    if not callable(getattr(module, rt.entry_function, None)):
        sys.modules.pop(name, None)
        raise _fail(
            card_path,
            "runtime.entry_point",
            f"{rt.entry_file} has no function {rt.entry_function!r}",
        )
    state = None
    load = getattr(module, "load", None)
    if callable(load):
        try:
            state = load(folder, card, device)
        except Exception as exc:  # the package's own code, as above
            sys.modules.pop(name, None)
            raise _fail(
                card_path,
                "runtime.entry_point",
                f"{rt.entry_file}: load() failed: {type(exc).__name__}: {exc}",
            ) from exc
    return module, state


def load_package(folder: Path, device: torch.device | None = None) -> LoadedModel:
    """Validate one package folder and load its network or python entry point.

    Parameters
    ----------
    folder : pathlib.Path
        ``<models.path>/<name>``.
    device : torch.device or None
        Handed to a python-format module's ``load(package, card, device)``; default CPU.
        (Torch-format networks are loaded on the CPU and copied to each worker's device.)

    Returns
    -------
    LoadedModel
        The card and the network (CPU, eval mode), or the module and its state.

    Raises
    ------
    RegistryError
        If the card is missing or invalid, the weights (or entry point) file is missing,
        its sha256 differs from the card's, the weights do not load, the network's output
        on a dummy input of the card's size does not fit the card, or the entry point does
        not import, lacks its function or its ``load`` fails; the message names file and
        field.
    """
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise RegistryError(f"{card_path}: model card not found")
    card = _read_card(card_path)
    _check_card(card, folder, card_path)
    if card.runtime.format == "python":
        module, state = _load_python(card, folder, card_path, device or torch.device("cpu"))
        log.info(
            "loaded python model %s %s (%s)",
            card.name,
            card.version,
            card.runtime.entry_point,
            extra={"model": card.name},
        )
        return LoadedModel(card=card, path=folder, module=module, state=state)
    assert card.runtime.weights is not None  # the card validator requires it
    weights = folder / card.runtime.weights
    _check_sha(card_path, weights, card.runtime.sha256, "runtime.sha256", "runtime.weights")
    net = _load_network(card, weights, card_path)
    _check_network(card, net, card_path)
    log.info("loaded model %s %s", card.name, card.version, extra={"model": card.name})
    return LoadedModel(card=card, path=folder, network=net)


class Registry:
    """The loaded model packages, by name.

    Parameters
    ----------
    models : dict of str to LoadedModel
        Packages by card name.
    """

    def __init__(self, models: dict[str, LoadedModel]) -> None:
        self._models = dict(models)

    @classmethod
    def load(cls, settings: ModelsSettings, device: torch.device | None = None) -> Registry:
        """Validate every package under ``settings.path`` (or those ``enabled``) and load them.

        Parameters
        ----------
        settings : aenode.config.ModelsSettings
            ``path`` and the optional ``enabled`` list.
        device : torch.device or None
            Handed to python-format modules' ``load``; default CPU.

        Returns
        -------
        Registry
            All packages loaded.

        Raises
        ------
        RegistryError
            If the folder is missing, an enabled package does not exist, or any package is
            invalid (see :func:`load_package`).
        """
        root = Path(settings.path)
        if not root.is_dir():
            raise RegistryError(f"models.path: {root} is not a folder")
        if settings.enabled is None:
            folders = sorted(p.parent for p in root.glob(f"*/{CARD_FILE}"))
        else:
            folders = []
            for name in settings.enabled:
                if not (root / name / CARD_FILE).is_file():
                    raise RegistryError(
                        f"models.enabled: {name!r} has no {CARD_FILE} under {root / name}"
                    )
                folders.append(root / name)
        return cls({f.name: load_package(f, device) for f in folders})

    def names(self) -> list[str]:
        """Names of the loaded models, sorted.

        Returns
        -------
        list of str
        """
        return sorted(self._models)

    def get(self, name: str) -> LoadedModel:
        """A loaded package.

        Parameters
        ----------
        name : str
            The model's name.

        Returns
        -------
        LoadedModel

        Raises
        ------
        KeyError
            If no such model is loaded (the message lists the loaded ones).
        """
        try:
            return self._models[name]
        except KeyError:
            raise KeyError(f"model {name!r} is not loaded (loaded: {self.names()})") from None

    def card(self, name: str) -> ModelCard:
        """A loaded model's card.

        Parameters
        ----------
        name : str
            The model's name.

        Returns
        -------
        ModelCard

        Raises
        ------
        KeyError
            If no such model is loaded.
        """
        return self.get(name).card

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __len__(self) -> int:
        return len(self._models)


def model_summary(model: LoadedModel) -> dict[str, Any]:
    card = model.card
    val = card.metrics.get("validation", {}) if isinstance(card.metrics, dict) else {}
    dice = {k: v["dice"] for k, v in val.items() if isinstance(v, dict) and "dice" in v}
    weights = model.path / card.runtime.weights if card.runtime.weights is not None else None
    return {
        "name": card.name,
        "version": card.version,
        "task": card.task,
        "modality": card.inputs.modality,
        "roles": [r.name for r in card.inputs.roles],
        "labels": [label.name for label in card.outputs.labels],
        "classes": [c.name for c in card.outputs.classes],
        "head": card.outputs.head or ("softmax" if card.task == "segmentation" else None),
        "format": card.runtime.format,
        "entry_point": card.runtime.entry_point,
        "weights": str(weights) if weights is not None else None,
        "weights_mb": round(weights.stat().st_size / 1e6, 2) if weights is not None else 0.0,
        "sha256": card.runtime.sha256,
        "validation_dice": dice,
    }


def check_selection(settings: Settings) -> list[str]:
    """Validate the model packages under ``models.path`` and the rules' model names.

    Parameters
    ----------
    settings : Settings
        ``models`` and ``selection.rules``.

    Returns
    -------
    list of str
        The names of the packages found.

    Raises
    ------
    RegistryError
        If a package is invalid.
    aenode.config.ConfigError
        If a rule names a model that is not there; the message names the key path
        (``selection.rules[0].models[0]: unknown model 'lungs' (known: hippocampus)``).
    """
    from aenode.select.studies import check_rule_roles

    registry = Registry.load(settings.models)
    compile_rules(settings.selection.rules, known_models=registry.names())
    cards = {name: registry.card(name) for name in registry.names()}
    check_rule_roles(settings.selection.rules, cards)
    return registry.names()
