"""Whether the node can still process what it receives: the refusal flag.

When a model or a device fails for good after start-up, accepting C-STOREs would take in
data the node will never process. The main process then writes the reason to
``<storage.path>/refusing.json``; every receiving process checks it (at most once a second)
and answers C-STORE with ``0xA700`` and an Error Comment naming the reason, and
``aenode status`` shows it. A fresh start clears the flag (start-up checks the models and
devices again before it listens).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["REFUSAL_FILE", "RefusalCheck", "clear_refusal", "read_refusal", "refuse"]

log = logging.getLogger(__name__)

REFUSAL_FILE = "refusing.json"
"""The flag's file name under ``storage.path``."""


def refuse(root: Path, reason: str) -> None:
    """Make the node refuse new C-STOREs with ``reason`` (atomic, durable).

    Parameters
    ----------
    root : pathlib.Path
        ``storage.path``.
    reason : str
        Why, naming the model, device or stage (shown in Error Comments and ``status``).
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{REFUSAL_FILE}.tmp"
    tmp.write_text(json.dumps({"reason": reason, "since": time.time()}), encoding="utf-8")
    os.replace(tmp, root / REFUSAL_FILE)
    log.error("refusing new C-STOREs: %s", reason)


def clear_refusal(root: Path) -> None:
    """Remove the flag (at start-up, once the models and devices are checked again)."""
    (root / REFUSAL_FILE).unlink(missing_ok=True)


def read_refusal(root: Path) -> str | None:
    """The reason the node refuses C-STOREs, or None when it accepts them."""
    try:
        data = json.loads((root / REFUSAL_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable flag: still a refusal, say so
        return f"refusal flag {root / REFUSAL_FILE} unreadable: {exc}"
    return str(data.get("reason") or "unknown reason")


@dataclass
class RefusalCheck:
    """The flag as a receiving process sees it, read at most every ``interval`` seconds.

    Parameters
    ----------
    root : pathlib.Path
        ``storage.path``.
    interval : float
        Seconds a reading is reused (one ``stat`` a second keeps the C-STORE path fast).
    """

    root: Path
    interval: float = 1.0
    _checked: float = field(default=-1e9, repr=False)
    _reason: str | None = field(default=None, repr=False)

    def reason(self) -> str | None:
        """The current refusal reason, or None."""
        now = time.monotonic()
        if now - self._checked >= self.interval:
            self._reason = read_refusal(self.root)
            self._checked = now
        return self._reason
