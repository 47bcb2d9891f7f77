"""Network architectures a card can name: ``runtime.architecture`` -> constructor.

A state-dict package names one of these and gives its keyword arguments in
``runtime.architecture_args``; the weights are loaded into the network built here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["ARCHITECTURES", "build_network"]


def _unet(**kwargs: Any) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(**kwargs)


def _dynunet(**kwargs: Any) -> torch.nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(**kwargs)


def _segresnet(**kwargs: Any) -> torch.nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(**kwargs)


def _basic_unet(**kwargs: Any) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(**kwargs)


ARCHITECTURES: Mapping[str, Callable[..., torch.nn.Module]] = {
    "monai.UNet": _unet,
    "monai.DynUNet": _dynunet,
    "monai.SegResNet": _segresnet,
    "monai.BasicUNet": _basic_unet,
}


def build_network(name: str, args: Mapping[str, Any]) -> torch.nn.Module:
    """Build an untrained network of a known architecture.

    Parameters
    ----------
    name : str
        A key of :data:`ARCHITECTURES` (``monai.UNet``, ``monai.DynUNet``, ...).
    args : Mapping[str, Any]
        Keyword arguments of the constructor, as given in the card.

    Returns
    -------
    torch.nn.Module
        The network in training mode with freshly initialised weights.

    Raises
    ------
    KeyError
        If ``name`` is not a known architecture (the message lists the known ones).
    ValueError
        If the constructor rejects ``args``; the message names the architecture.
    """
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise KeyError(f"unknown architecture {name!r} (known: {known})") from None
    try:
        return factory(**dict(args))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ValueError(f"architecture {name!r} rejects its arguments: {exc}") from exc
