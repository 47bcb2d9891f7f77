"""Run only the receiving processes of a node (no models, no workers) until SIGTERM.

``python tests/receiver_only.py CONFIG.yaml``: what the network tests attack. Prints
``listening`` once every receiving process has bound the port.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from aenode.cli import configure_logging
from aenode.config import load_settings
from aenode.receive.workers import ReceiverPool


def main() -> None:
    settings = load_settings(sys.argv[1], environ={})
    configure_logging(settings)
    Path(settings.storage.path).mkdir(parents=True, exist_ok=True)
    pool = ReceiverPool(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pool.start()
    print("listening", flush=True)
    while not stop.wait(0.5):
        pool.check()
    pool.stop()


if __name__ == "__main__":
    main()
