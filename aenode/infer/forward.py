"""The network forward pass: sliding window, test-time flips, the output head.

Used by the runtime's device workers and by training's validation, so that the Dice in a
card is measured with the code that serves the model. Input tensors are
``[batch, channel, z, y, x]``; the card's ``patch_size`` (x, y, z) is reversed here.
Segmentation is a softmax over background + labels; a classifier's head is the card's
``outputs.head`` (``softmax`` or ``sigmoid``), never guessed from the number of logits.
"""

from __future__ import annotations

import torch

from aenode.infer.cards import RuntimeSpec

__all__ = ["class_scores", "predict_probs"]

_AXIS_DIM = {"z": 2, "y": 3, "x": 4}


def _flip_sets(spec: RuntimeSpec) -> list[tuple[int, ...]]:
    if not spec.flip_tta:
        return [()]
    dims = [_AXIS_DIM[a] for a in spec.flip_axes]
    sets: list[tuple[int, ...]] = [()]
    for d in dims:
        sets += [(*s, d) for s in sets]
    return sets


def _logits(net: torch.nn.Module, x: torch.Tensor, spec: RuntimeSpec) -> torch.Tensor:
    if spec.patch_size is None:
        out = net(x)
    else:
        from monai.inferers import sliding_window_inference

        roi = tuple(reversed(spec.patch_size))
        out = sliding_window_inference(
            x, roi, spec.batch_size, net, overlap=spec.overlap, mode="gaussian"
        )
    if isinstance(out, (list, tuple)):  # deep supervision heads: the first is full size
        out = out[0]
    assert isinstance(out, torch.Tensor)
    return out


@torch.inference_mode()
def predict_probs(
    net: torch.nn.Module,
    x: torch.Tensor,
    spec: RuntimeSpec,
    *,
    autocast: bool = False,
    sigmoid: bool = False,
) -> torch.Tensor:
    """Class probabilities for a batch, averaged over the card's test-time flips.

    Parameters
    ----------
    net : torch.nn.Module
        The network in eval mode, on ``x``'s device.
    x : torch.Tensor
        (batch, channels, z, y, x) float32 input.
    spec : RuntimeSpec
        The card's runtime: ``patch_size`` (x, y, z) turns on sliding-window inference with
        ``overlap`` and ``batch_size`` windows at a time; ``flip_tta`` and ``flip_axes``.
    autocast : bool
        Run under mixed precision (float16 on CUDA, bfloat16 on CPU).
    sigmoid : bool
        Independent sigmoid per channel instead of a softmax over channels.

    Returns
    -------
    torch.Tensor
        (batch, classes, z, y, x) float32 probabilities.
    """
    dtype = torch.float16 if x.device.type == "cuda" else torch.bfloat16
    total: torch.Tensor | None = None
    flips = _flip_sets(spec)
    for dims in flips:
        xi = x.flip(dims) if dims else x
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            logits = _logits(net, xi, spec).float()
        probs = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=1)
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(flips)


def _flat_logits(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    if isinstance(out, (list, tuple)):  # auxiliary outputs: the first is the classifier's
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the network returned {type(out).__name__}, not a tensor")
    return out.float().reshape(out.shape[0], -1)


@torch.inference_mode()
def class_scores(
    net: torch.nn.Module,
    x: torch.Tensor,
    spec: RuntimeSpec,
    head: str,
    *,
    autocast: bool = False,
) -> torch.Tensor:
    """Classifier probabilities for a batch through the card's head, averaged over flips.

    Parameters
    ----------
    net : torch.nn.Module
        The network in eval mode, on ``x``'s device; it returns one logit per class,
        shape (batch, classes) (trailing singleton dimensions are accepted).
    x : torch.Tensor
        (batch, channels, z, y, x) float32 input.
    spec : RuntimeSpec
        ``flip_tta`` and ``flip_axes`` (the input is mirrored, the scores averaged).
    head : str
        ``softmax`` (over the classes) or ``sigmoid`` (each class alone).
    autocast : bool
        Run under mixed precision (float16 on CUDA, bfloat16 on CPU).

    Returns
    -------
    torch.Tensor
        (batch, classes) float32 probabilities.

    Raises
    ------
    ValueError
        If ``head`` is neither ``softmax`` nor ``sigmoid``.
    """
    if head not in ("softmax", "sigmoid"):
        raise ValueError(f"outputs.head: unknown head {head!r} (softmax or sigmoid)")
    dtype = torch.float16 if x.device.type == "cuda" else torch.bfloat16
    total: torch.Tensor | None = None
    flips = _flip_sets(spec)
    for dims in flips:
        xi = x.flip(dims) if dims else x
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            logits = _flat_logits(net, xi)
        probs = torch.sigmoid(logits) if head == "sigmoid" else torch.softmax(logits, dim=1)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(flips)
