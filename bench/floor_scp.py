"""The pynetdicom floor of ``bench ingest``: a storage SCP that answers every C-STORE at once.

No write, no parse, no store: the handler returns 0x0000 as soon as pynetdicom hands it the
data set. It runs with what aenode's receivers get from the same stack (several processes
sharing the port through aenode's ``ReceiverServer``, so ``SO_REUSEPORT`` and
``TCP_NODELAY``, without the connection guard; unlimited PDU size, pynetdicom's logging
off, aenode's timer slack), so its rate is the most any receiver built on pynetdicom
reaches on this machine; ``bench ingest`` prints aenode's rate against it as well as against
dcmtk storescp.

Run: ``python -m bench.floor_scp PORT PROCESSES`` (stops on SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.events import Event

from aenode.receive.scp import ReceiverServer
from aenode.receive.workers import set_timer_slack

__all__ = ["main"]


def _answer(event: Event) -> int:
    return 0x0000


def _serve(port: int) -> None:
    set_timer_slack()
    _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title="AENODE")
    ae.maximum_pdu_size = 0
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, list(AllTransferSyntaxes))
    server = ae.make_server(
        ("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, _answer)], server_class=ReceiverServer
    )
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()


def main(argv: list[str]) -> None:
    """Start ``PROCESSES`` listening processes on ``PORT``; SIGTERM stops them all."""
    port, processes = int(argv[0]), int(argv[1])
    children: list[int] = []

    def stop(*_: Any) -> None:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            _serve(port)
            os._exit(0)
        children.append(pid)
    while True:
        signal.pause()


if __name__ == "__main__":
    main(sys.argv[1:])
