"""The pynetdicom floor of ``bench ingest``: a storage SCP that answers every C-STORE at once.

No write, no parse, no store: the handler returns 0x0000 as soon as pynetdicom hands it the
data set. It runs with what aenode's receivers get from the same stack (several processes
sharing the port with ``SO_REUSEPORT``, ``TCP_NODELAY``, unlimited PDU size, pynetdicom's
logging off, 1 us timer slack), so its rate is the most any receiver built on pynetdicom
reaches on this machine; ``bench ingest`` prints aenode's rate against it as well as against
dcmtk storescp.

Run: ``python -m bench.floor_scp PORT PROCESSES`` (stops on SIGTERM).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["main"]


class _Server(ThreadedAssociationServer):
    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address


def _answer(event: Event) -> int:
    return 0x0000


def _serve(port: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(29, 1000)  # PR_SET_TIMERSLACK, as aenode's receivers
    except OSError:
        pass
    _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title="AENODE")
    ae.maximum_pdu_size = 0
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, list(AllTransferSyntaxes))
    server = ae.make_server(
        ("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, _answer)], server_class=_Server
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
