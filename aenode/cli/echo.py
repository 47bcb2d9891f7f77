"""``aenode echo HOST PORT``: C-ECHO a DICOM peer."""

from __future__ import annotations

import argparse

from aenode.config import Settings
from aenode.export.scu import echo_reason

__all__ = ["command_echo"]


def command_echo(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode echo HOST PORT [--aet CALLED] [--calling-aet OURS]``: print the outcome.

    Returns
    -------
    int
        0 if the peer answered with success, 1 otherwise.
    """
    calling = args.calling_aet or settings.calling_ae
    called = args.aet or settings.node.ae_title
    reason = echo_reason(
        args.host, args.port, called, calling, settings.export.retry.timeout_seconds
    )
    if reason is None:
        print(f"C-ECHO {called}@{args.host}:{args.port}: success")
        return 0
    print(f"C-ECHO failed: {reason}")
    return 1
