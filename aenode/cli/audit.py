"""``aenode audit STUDY_UID [--json]``: what happened to one study, in order."""

from __future__ import annotations

import argparse
import json
import sys
import time

from aenode.cli.store import with_store
from aenode.config import Settings
from aenode.status import study_trail

__all__ = ["command_audit"]


def command_audit(args: argparse.Namespace, settings: Settings) -> int:
    """Print the audit trail of ``args.study``: one line per event, or JSON.

    Returns
    -------
    int
        0; 1 if there is no store, or the node never saw the study.
    """
    events = with_store(settings, lambda store: study_trail(store, args.study))
    if events is None:
        return 1
    if args.json:
        print(json.dumps([e.to_json() for e in events], indent=2))
    else:
        for e in events:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at))
            print(f"{when}.{int(e.at * 1000) % 1000:03d}  {e.event.value:16}  {e.describe()}")
    if not events:
        print(
            f"aenode: no event for study {args.study} in {settings.storage.path}",
            file=sys.stderr,
        )
        return 1
    return 0
