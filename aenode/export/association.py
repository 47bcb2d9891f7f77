"""A minimal synchronous DICOM association for sending (PS3.8 upper layer, PS3.7 C-STORE).

Why not pynetdicom's ``send_c_store`` here: its threaded DUL handles each 16 KB P-DATA PDU
as a queued event and decodes/re-encodes every dataset, so it sent about 135 instances/s
into storescp where dcmtk's storescu sends 640/s; and its reactor can take a fast peer's
response off the queue before ``send_c_store`` sees it (the request then times out although
the peer stored the instance). This module does one thing: on one blocking socket with
TCP_NODELAY, negotiate presentation contexts, send C-STORE requests with the file's bytes
as they are, read each response, release. pynetdicom still does everything else.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom.uid import generate_uid

from aenode.errors import PeerError
from aenode.version import __version__

__all__ = [
    "AssociationError",
    "Context",
    "StoreAssociation",
    "StoreResponse",
    "echo_command",
    "parse_command",
    "store_command",
]

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
# aenode's implementation class: a fixed UID derived under pydicom's root (no root of our own).
IMPLEMENTATION_UID = generate_uid(entropy_srcs=["aenode implementation class"]).encode()
IMPLEMENTATION_VERSION = f"AENODE_{__version__}".encode()[:16]
OUR_MAX_PDU = 1 << 20
_RJ_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class AssociationError(PeerError):
    """The association failed (refused, rejected, aborted, timed out); names the peer."""


@dataclass(frozen=True)
class Context:
    """A proposed presentation context and, after negotiation, its outcome."""

    id: int
    abstract_syntax: str
    transfer_syntax: str
    accepted: bool = False


@dataclass(frozen=True)
class StoreResponse:
    """A C-STORE-RSP: status and optional error comment."""

    status: int
    error_comment: str = ""


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def _element(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def store_command(sop_class: str, sop_instance: str, message_id: int) -> bytes:
    """Encode a C-STORE-RQ command set (implicit VR little endian)."""
    body = b"".join(
        [
            _element(0x0000, 0x0002, _uid(sop_class)),
            _element(0x0000, 0x0100, struct.pack("<H", 0x0001)),
            _element(0x0000, 0x0110, struct.pack("<H", message_id)),
            _element(0x0000, 0x0700, struct.pack("<H", 0x0000)),
            _element(0x0000, 0x0800, struct.pack("<H", 0x0000)),
            _element(0x0000, 0x1000, _uid(sop_instance)),
        ]
    )
    return _element(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def echo_command(message_id: int) -> bytes:
    """Encode a C-ECHO-RQ command set (implicit VR little endian)."""
    body = b"".join(
        [
            _element(0x0000, 0x0002, _uid(VERIFICATION)),
            _element(0x0000, 0x0100, struct.pack("<H", 0x0030)),
            _element(0x0000, 0x0110, struct.pack("<H", message_id)),
            _element(0x0000, 0x0800, struct.pack("<H", 0x0101)),
        ]
    )
    return _element(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def parse_command(data: bytes) -> dict[int, bytes]:
    """Decode a command set (implicit VR LE) into element tag (0000,eeee) -> raw value."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        _group, element, length = struct.unpack_from("<HHI", data, pos)
        out[element] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


class StoreAssociation:
    """One association to a storage SCP on a blocking socket.

    Parameters
    ----------
    host, port : str, int
        The peer.
    called_ae, calling_ae : str
        AE titles.
    contexts : sequence of (abstract syntax, transfer syntax)
        Proposed presentation contexts (at most 128), one transfer syntax each.
    timeout : float
        Seconds for connecting and for each read.
    tls : ssl.SSLContext or None
        DICOM TLS: the connection is wrapped before anything is sent and the server's
        certificate checked against ``host`` (:func:`aenode.tls.client_context`).

    Raises
    ------
    AssociationError
        If the connection or the TLS handshake fails (never retried in the clear), or the
        peer rejects or aborts the association.
    """

    def __init__(
        self,
        host: str,
        port: int,
        called_ae: str,
        calling_ae: str,
        contexts: Sequence[tuple[str, str]],
        timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.peer = f"{called_ae}@{host}:{port}"
        self.timeout = timeout
        self.contexts: list[Context] = [
            Context(id=2 * i + 1, abstract_syntax=a, transfer_syntax=t)
            for i, (a, t) in enumerate(contexts[:128])
        ]
        self.max_pdu = 0
        self.established = False
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise AssociationError(f"{self.peer}: cannot connect: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        if tls is not None:
            self.sock = self._wrap(tls, host)
        try:
            self._negotiate(called_ae, calling_ae)
        except BaseException:
            self.sock.close()
            raise

    def _wrap(self, tls: ssl.SSLContext, host: str) -> socket.socket:
        try:
            return tls.wrap_socket(self.sock, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            self.sock.close()
            why = exc.verify_message or exc.reason
            raise AssociationError(
                f"{self.peer}: TLS: server certificate not accepted: {why}"
            ) from exc
        except ssl.SSLError as exc:
            self.sock.close()
            raise AssociationError(
                f"{self.peer}: TLS handshake failed: {exc.reason or exc}"
            ) from exc
        except OSError as exc:
            self.sock.close()
            raise AssociationError(
                f"{self.peer}: TLS handshake failed: {exc or 'timeout'} (is the port TLS?)"
            ) from exc

    # -- PDUs ---------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError as exc:
                raise AssociationError(f"{self.peer}: no answer within {self.timeout} s") from exc
            except OSError as exc:
                raise AssociationError(f"{self.peer}: connection lost: {exc}") from exc
            if not chunk:
                raise AssociationError(f"{self.peer}: connection closed by the peer")
            buf += chunk
        return bytes(buf)

    def _read_pdu(self) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBI", self._recv_exact(6))
        return kind, self._recv_exact(length)

    def _send(self, data: bytes | Iterable[bytes]) -> None:
        try:
            if isinstance(data, bytes):
                self.sock.sendall(data)
            else:
                self.sock.sendall(b"".join(data))
        except OSError as exc:
            self.established = False
            raise AssociationError(f"{self.peer}: send failed: {exc}") from exc

    def _negotiate(self, called_ae: str, calling_ae: str) -> None:
        items = [_item(0x10, APPLICATION_CONTEXT)]
        for cx in self.contexts:
            sub = _item(0x30, cx.abstract_syntax.encode()) + _item(
                0x40, cx.transfer_syntax.encode()
            )
            items.append(_item(0x20, struct.pack(">BBBB", cx.id, 0, 0, 0) + sub))
        user = (
            _item(0x51, struct.pack(">I", OUR_MAX_PDU))
            + _item(0x52, IMPLEMENTATION_UID)
            + _item(0x55, IMPLEMENTATION_VERSION)
        )
        items.append(_item(0x50, user))
        body = struct.pack(">HH", 1, 0) + _ae(called_ae) + _ae(calling_ae) + bytes(32)
        body += b"".join(items)
        self._send(struct.pack(">BBI", 0x01, 0, len(body)) + body)
        kind, data = self._read_pdu()
        if kind == 0x03:
            _, result, source, reason = struct.unpack_from(">BBBB", data, 0)
            why = _RJ_REASONS.get((source, reason), f"source {source}, reason {reason}")
            kind_txt = "permanently" if result == 1 else "transiently"
            raise AssociationError(f"{self.peer}: association rejected {kind_txt}: {why}")
        if kind == 0x07:
            raise AssociationError(f"{self.peer}: association aborted by the peer")
        if kind != 0x02:
            raise AssociationError(f"{self.peer}: unexpected PDU type 0x{kind:02X} in negotiation")
        self._parse_accept(data)
        self.established = True

    def _parse_accept(self, data: bytes) -> None:
        results: dict[int, tuple[int, str]] = {}
        pos = 68
        while pos + 4 <= len(data):
            kind, _, length = struct.unpack_from(">BBH", data, pos)
            value = data[pos + 4 : pos + 4 + length]
            pos += 4 + length
            if kind == 0x21:
                cx_id, _, result, _ = struct.unpack_from(">BBBB", value, 0)
                syntax = ""
                if len(value) >= 8 and value[4] == 0x40:
                    (ts_len,) = struct.unpack_from(">H", value, 6)
                    syntax = value[8 : 8 + ts_len].rstrip(b"\x00 ").decode("ascii", "replace")
                results[cx_id] = (result, syntax)
            elif kind == 0x50:
                sub = 0
                while sub + 4 <= len(value):
                    skind, _, slen = struct.unpack_from(">BBH", value, sub)
                    if skind == 0x51 and slen == 4:
                        (self.max_pdu,) = struct.unpack_from(">I", value, sub + 4)
                    sub += 4 + slen
        self.contexts = [
            Context(
                cx.id,
                cx.abstract_syntax,
                cx.transfer_syntax,
                accepted=results.get(cx.id, (1, ""))[0] == 0
                and results[cx.id][1] in ("", cx.transfer_syntax),
            )
            for cx in self.contexts
        ]

    # -- use ----------------------------------------------------------------------------

    def context_for(self, abstract_syntax: str, transfer_syntaxes: Sequence[str]) -> Context | None:
        """The first accepted context of ``abstract_syntax`` with one of the syntaxes."""
        for syntax in transfer_syntaxes:
            for cx in self.contexts:
                if (
                    cx.accepted
                    and cx.abstract_syntax == abstract_syntax
                    and (cx.transfer_syntax == syntax)
                ):
                    return cx
        return None

    def _pdata(self, context_id: int, payload: bytes, command: bool) -> list[bytes]:
        limit = (self.max_pdu - 6) if self.max_pdu else len(payload) or 1
        limit = max(limit, 1)
        chunks = []
        flags = 0x01 if command else 0x00
        for start in range(0, max(len(payload), 1), limit):
            fragment = payload[start : start + limit]
            last = 0x02 if start + limit >= len(payload) else 0x00
            pdv_len = len(fragment) + 2
            chunks.append(
                struct.pack(">BBIIBB", 0x04, 0, pdv_len + 4, pdv_len, context_id, flags | last)
            )
            chunks.append(fragment)
        return chunks

    def _request(
        self,
        context: Context,
        command: bytes,
        dataset: bytes | None,
        message_id: int,
        name: str,
        response_field: int,
    ) -> StoreResponse:
        parts = self._pdata(context.id, command, True)
        if dataset is not None:
            parts += self._pdata(context.id, dataset, False)
        self._send(parts)
        fragments = bytearray()
        done = False
        while not done:
            try:
                kind, data = self._read_pdu()
            except AssociationError:
                self.established = False
                raise
            if kind == 0x07:
                self.established = False
                raise AssociationError(f"{self.peer}: association aborted by the peer")
            if kind == 0x05:
                self.established = False
                raise AssociationError(f"{self.peer}: peer asked to release during a {name}")
            if kind != 0x04:
                self.abort()
                raise AssociationError(f"{self.peer}: unexpected PDU type 0x{kind:02X}")
            pos = 0
            while pos + 6 <= len(data):
                (length,) = struct.unpack_from(">I", data, pos)
                header = data[pos + 5]
                if header & 0x01:  # command fragment (a response carries no dataset here)
                    fragments += data[pos + 6 : pos + 4 + length]
                    done = done or bool(header & 0x02)
                pos += 4 + length
        fields = parse_command(bytes(fragments))
        if struct.unpack("<H", fields.get(0x0100, b"\x00\x00"))[0] != response_field:
            self.abort()
            raise AssociationError(f"{self.peer}: answer to {name}-RQ is not a {name}-RSP")
        responded = struct.unpack("<H", fields.get(0x0120, b"\xff\xff"))[0]
        if responded != message_id:
            self.abort()
            raise AssociationError(
                f"{self.peer}: {name}-RSP for message {responded}, expected {message_id}"
            )
        if 0x0900 not in fields:
            self.abort()
            raise AssociationError(f"{self.peer}: {name}-RSP without a Status")
        (status,) = struct.unpack("<H", fields[0x0900])
        comment = fields.get(0x0902, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        return StoreResponse(status=status, error_comment=comment)

    def store(
        self, context: Context, sop_class: str, sop_instance: str, dataset: bytes, message_id: int
    ) -> StoreResponse:
        """Send one C-STORE-RQ with ``dataset`` (encoded in the context's syntax); wait for the
        response.

        Raises
        ------
        AssociationError
            On timeout, abort, or a protocol error (the association is then unusable).
        """
        command = store_command(sop_class, sop_instance, message_id)
        return self._request(context, command, dataset, message_id, "C-STORE", 0x8001)

    def echo(self, context: Context, message_id: int = 1) -> StoreResponse:
        """Send a C-ECHO-RQ on a Verification context and wait for the response.

        Raises
        ------
        AssociationError
            On timeout, abort, or a protocol error.
        """
        command = echo_command(message_id)
        return self._request(context, command, None, message_id, "C-ECHO", 0x8030)

    def release(self) -> None:
        """A-RELEASE; falls back to closing the socket if the peer does not answer."""
        try:
            if self.established:
                self._send(struct.pack(">BBII", 0x05, 0, 4, 0))
                while True:
                    kind, _ = self._read_pdu()
                    if kind in (0x06, 0x07):
                        break
        except AssociationError:
            pass
        finally:
            self.established = False
            self.sock.close()

    def abort(self) -> None:
        """A-ABORT and close."""
        try:
            self.sock.sendall(struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0))
        except OSError:
            pass
        finally:
            self.established = False
            self.sock.close()
