"""The network forward pass: sliding window, test-time flips, softmax.

Used by the runtime's device workers and by training's validation, so that the Dice in a
card is measured with the code that serves the model.
"""

from __future__ import annotations

import torch

from aenode.infer.cards import RuntimeSpec

__all__ = ["predict_probs"]

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
