"""``aenode config check [PATH]``: validate a configuration, its rules against the models."""

from __future__ import annotations

import argparse

from aenode.config import Settings, load_settings
from aenode.infer.registry import check_selection

__all__ = ["command_config_check"]


def command_config_check(args: argparse.Namespace, settings: Settings) -> int:
    """Validate every key, then the rules' model names against ``models.path``.

    Returns
    -------
    int
        0 when valid; a :class:`aenode.config.ConfigError` is printed by the CLI (exit 2).
    """
    path = args.path or args.config
    checked = load_settings(path) if path else settings
    models = check_selection(checked)
    rules = len(checked.selection.rules)
    print(f"{path or '(defaults)'}: OK ({rules} selection rule(s), models: {', '.join(models)})")
    return 0
