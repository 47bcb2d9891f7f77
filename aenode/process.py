"""Process-wide switches, applied once at start-up from ``runtime`` (never in a constructor).

``aenode serve``, ``run``, ``evaluate`` and ``train`` call :func:`apply_process_settings`
before any model is built: the number of CPU threads torch uses (``runtime.threads``, 0 for
all cores) and deterministic algorithms (``runtime.deterministic``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from aenode.config import RuntimeSettings

__all__ = ["ProcessSettings", "apply_process_settings", "resolve_threads"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessSettings:
    """What :func:`apply_process_settings` set."""

    threads: int
    deterministic: bool


def resolve_threads(settings: RuntimeSettings) -> int:
    """``runtime.threads``, with 0 meaning every core of this machine."""
    return settings.threads or os.cpu_count() or 1


def apply_process_settings(settings: RuntimeSettings) -> ProcessSettings:
    """Set torch's thread count and determinism for this process.

    Parameters
    ----------
    settings : aenode.config.RuntimeSettings
        ``threads`` (0: every core of this machine) and ``deterministic``.

    Returns
    -------
    ProcessSettings
        The values in force.
    """
    import torch

    threads = resolve_threads(settings)
    torch.set_num_threads(threads)
    if settings.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    log.debug("torch threads %d, deterministic %s", threads, settings.deterministic)
    return ProcessSettings(threads=threads, deterministic=settings.deterministic)
