"""The DIMSE listener: pynetdicom handlers bound to events, and one receiving process.

Each receiving process runs one pynetdicom AE whose listening socket shares the port with
the other receivers (``SO_REUSEPORT``; the kernel spreads associations over them), sets
``TCP_NODELAY`` on every accepted connection and writes each C-STORE data set as received
through the :class:`~aenode.receive.spool.Spool`. Handlers are plain functions; their
dependencies come in the third element of the event-handler tuple.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import sqlite3
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    build_context,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from aenode.assemble import record_association_end
from aenode.config import PeerSettings, Settings
from aenode.errors import ConfigError
from aenode.export.commitment import STORAGE_COMMITMENT, handle_report
from aenode.health import RefusalCheck
from aenode.receive.check import check_structure, failure_status
from aenode.receive.guard import (
    LISTEN_BACKLOG,
    AssociationSlots,
    ConnectionGuard,
    refuse_over_limit,
)
from aenode.receive.header import InvalidInstance, header_from_dataset, parse_header
from aenode.receive.negotiation import describe, storage_contexts
from aenode.receive.refusals import record_refusal
from aenode.receive.spool import OutOfSpace, Spool
from aenode.store import Store
from aenode.tls import peer_subject, server_context

__all__ = [
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_PROCESSING_FAILURE",
    "Receiver",
    "ReceiverServer",
    "build_ae",
    "handle_echo",
    "handle_ended",
    "handle_requested",
    "handle_store",
    "peer_allowed",
    "serve_receiver",
    "tls_handshake",
]

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_PROCESSING_FAILURE = 0x0110


class ReceiverServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with ``SO_REUSEPORT`` on the listener and
    ``TCP_NODELAY`` on each accepted connection."""

    def server_bind(self) -> None:
        """Set ``SO_REUSEPORT`` so several receiving processes share the port, then bind."""
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    request_queue_size = LISTEN_BACKLOG
    guard: ConnectionGuard | None = None
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection and turn Nagle's algorithm off on it."""
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def shutdown(self) -> None:
        """Stop serving and close the listening socket.

        pynetdicom's ``shutdown`` also removes the server from the list the AE keeps of the
        servers ``AE.start_server`` made, which this one (from ``AE.make_server``, the only
        way to pass a server class) is not on; ``start_server(block=False)`` takes no
        server class (pydicom/pynetdicom#533). So only the socketserver part runs here.
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: admit it (see :mod:`aenode.receive.guard`), then
        hand it to pynetdicom. On the TLS port the handshake comes first (here, not in the
        accepting thread as pynetdicom's ``ssl_context`` would do it)."""
        if self.tls is not None:
            request = tls_handshake(self.tls, request, self.guard)
            if request is None:
                return
        elif self.guard is not None:
            request = self.guard.admit(request)
            if request is None:
                return
        super().finish_request(request, client_address)


_NOT_TLS = ("not TLS: plain DICOM on the TLS port?", logging.WARNING)
_HANDSHAKE_REASONS = {
    "WRONG_VERSION_NUMBER": _NOT_TLS,
    "HTTP_REQUEST": _NOT_TLS,
    "UNKNOWN_PROTOCOL": _NOT_TLS,
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": (
        "no client certificate (node.tls.require_client_cert is true)",
        logging.WARNING,
    ),
    # A port probe (load balancer, monitoring) that connects and closes.
    "UNEXPECTED_EOF_WHILE_READING": ("closed by the peer during the handshake", logging.INFO),
}


def tls_handshake(
    context: ssl.SSLContext, sock: socket.socket, guard: ConnectionGuard | None
) -> ssl.SSLSocket | None:
    """Server side of the TLS handshake on an accepted connection; None if it failed.

    The handshake must end within ``node.artim_timeout``. A refusal (plain TCP on the TLS
    port, a certificate not signed by ``node.tls.ca``, no certificate when one is required)
    is logged with OpenSSL's reason; a success with the peer's certificate subject.
    """
    peer = "?"
    try:
        host, port = sock.getpeername()[:2]
        peer = f"{host}:{port}"
        sock.settimeout(guard.artim if guard is not None else 10.0)
        tls_sock = context.wrap_socket(sock, server_side=True)
    except ssl.SSLCertVerificationError as exc:
        log.warning(
            "TLS connection from %s refused: client certificate not accepted: %s",
            peer,
            exc.verify_message or exc.reason,
        )
        sock.close()
        return None
    except ssl.SSLError as exc:
        code = str(exc.reason or exc)
        reason, level = _HANDSHAKE_REASONS.get(code, (code, logging.WARNING))
        log.log(level, "TLS connection from %s refused: %s (%s)", peer, reason, code)
        sock.close()
        return None
    except OSError as exc:  # timeout or reset before the handshake ended
        log.warning("TLS connection from %s refused: no TLS handshake: %s", peer, exc or "timeout")
        sock.close()
        return None
    tls_sock.settimeout(guard.pdu_timeout if guard is not None else None)
    log.info(
        "TLS connection from %s: %s, %s, client certificate %s",
        peer,
        tls_sock.version(),
        (tls_sock.cipher() or ("?",))[0],
        peer_subject(tls_sock) or "none",
    )
    return tls_sock


@dataclass
class _AssocState:
    assoc_id: str
    calling_ae: str
    peer_host: str
    started_at: float
    delivered: int = 0
    peer_subject: str | None = None


@dataclass
class Receiver:
    """What the handlers of one receiving process share.

    Parameters
    ----------
    settings : Settings
        The node's settings.
    store : Store
        This process's store connection.
    spool : Spool
        Durable writes.
    """

    settings: Settings
    store: Store
    spool: Spool
    slots: AssociationSlots | None = None
    refusal: RefusalCheck | None = None
    _assocs: dict[int, _AssocState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def state(self, event: Event) -> _AssocState:
        """The per-association state of ``event.assoc`` (created on first use)."""
        key = id(event.assoc)
        with self._lock:
            found = self._assocs.get(key)
            if found is None:
                requestor = event.assoc.requestor
                dul_socket = event.assoc.dul.socket
                found = _AssocState(
                    assoc_id=uuid.uuid4().hex[:16],
                    calling_ae=str(requestor.ae_title).strip(),
                    peer_host=str(requestor.address),
                    started_at=time.time(),
                    peer_subject=peer_subject(dul_socket.socket) if dul_socket else None,
                )
                self._assocs[key] = found
            return found

    def pop(self, event: Event) -> _AssocState | None:
        """Forget the state of ``event.assoc``; None if it was already forgotten."""
        with self._lock:
            return self._assocs.pop(id(event.assoc), None)


def peer_allowed(peers: list[PeerSettings] | None, calling_ae: str, host: str) -> tuple[bool, str]:
    """Whether a calling AE from ``host`` may associate.

    Parameters
    ----------
    peers : list of PeerSettings or None
        ``node.allowed_peers``; None allows any peer.
    calling_ae : str
        The calling AE title of the request.
    host : str
        The peer's IP address.

    Returns
    -------
    (bool, str)
        The decision and, when refused, the reason.
    """
    if peers is None:
        return True, ""
    bound = [p for p in peers if p.ae_title == calling_ae]
    if not bound:
        return False, f"calling AE {calling_ae!r} is not in node.allowed_peers"
    if any(p.host is None or p.host == host for p in bound):
        return True, ""
    return False, f"calling AE {calling_ae!r} is not allowed from host {host}"


def handle_requested(event: Event, receiver: Receiver) -> None:
    """EVT_REQUESTED: reject a calling AE (or its host) that ``node.allowed_peers`` lacks."""
    rq = event.assoc.requestor
    calling = str(rq.primitive.calling_ae_title).strip() if rq.primitive else ""
    ok, reason = peer_allowed(receiver.settings.node.allowed_peers, calling, str(rq.address))
    if not ok:
        log.warning("association rejected: %s", reason, extra={"peer_ae": calling})
        # permanent, service user, calling AE title not recognised
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        # As pynetdicom does after its own rejections: wait until the PDU is out.
        event.assoc.kill()
        return
    if receiver.slots is not None:
        refuse_over_limit(event, receiver.slots)
        if event.assoc.is_rejected or event.assoc.is_aborted:
            return
    negotiate_storage(event, receiver.settings.node.accept_unknown_storage, calling)


def negotiate_storage(event: Event, accept_unknown: bool, calling: str) -> None:
    """EVT_REQUESTED helper: support the proposed storage-like contexts, log the refused.

    With ``accept_unknown`` every storage-like abstract syntax proposed
    (:func:`aenode.receive.negotiation.is_storage_like`) is supported for this association
    with the proposed transfer syntaxes; anything else (query/retrieve, worklist, ...) is
    refused at negotiation. Every refused context is logged with what was proposed.
    """
    acceptor = event.assoc.acceptor
    proposed = event.assoc.requestor.requested_contexts
    supported = [str(cx.abstract_syntax) for cx in acceptor.supported_contexts]
    added, refused = storage_contexts(proposed, supported)
    if accept_unknown and added:
        acceptor.supported_contexts = [*acceptor.supported_contexts, *added]
    elif not accept_unknown:
        refused += [
            describe(str(cx.abstract_syntax)) for cx in added
        ]  # unknown storage classes are refused too
    if refused:
        usable = len({str(cx.abstract_syntax) for cx in proposed}) - len(refused)
        log.warning(
            "association from %s: refused presentation context(s) %s (not storage or "
            "verification)%s; proposed: %s",
            calling or "?",
            ", ".join(refused),
            "" if usable > 0 else ": no context left, the association is refused",
            ", ".join(sorted({describe(str(cx.abstract_syntax)) for cx in proposed})),
            extra={"peer_ae": calling},
        )


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: success."""
    return STATUS_SUCCESS


def handle_store(event: Event, receiver: Receiver) -> int | Dataset:
    """EVT_C_STORE: spool the data set as received, record it, then answer.

    Returns
    -------
    int or pydicom.Dataset
        ``0x0000`` once the instance is on disk and in the store (or was already there);
        ``0xA700`` below the disk floor; ``0xA900`` SOP class mismatch; ``0xC000`` missing
        UIDs, unparsable or structurally broken data (see :mod:`aenode.receive.check`),
        these two with an Error Comment naming the element; ``0x0110`` if the disk or the
        store failed.
    """
    state = receiver.state(event)
    ctx: dict[str, Any] = {"peer_ae": state.calling_ae, "assoc": state.assoc_id}
    request = cast(C_STORE, event.request)
    refused = receiver.refusal.reason() if receiver.refusal is not None else None
    if refused is not None:
        # Data the node would never process is not accepted (aenode.health).
        ctx["sop_uid"] = str(request.AffectedSOPInstanceUID)
        log.error("C-STORE refused (0xA700): node cannot process: %s", refused, extra=ctx)
        record_refusal(receiver.store, 0xA700, state.calling_ae, ctx["sop_uid"], refused)
        return failure_status(STATUS_OUT_OF_RESOURCES, f"cannot process: {refused}")
    try:
        stream = cast(BytesIO, request.DataSet).getvalue()
        ts = str(event.context.transfer_syntax)
        header = header_from_dataset(
            parse_header(stream, ts), ts, context_sop_class=str(event.context.abstract_syntax)
        )
        ctx.update(
            study=header.study_uid, series=header.series_uid, sop_uid=header.sop_instance_uid
        )
        if receiver.settings.logging.phi:
            ctx["patient"] = header.patient_id
        if header.sop_instance_uid != str(request.AffectedSOPInstanceUID):
            raise InvalidInstance(
                f"SOPInstanceUID {header.sop_instance_uid} differs from the C-STORE request's "
                f"Affected SOP Instance UID {request.AffectedSOPInstanceUID}",
                status=0xA900,
            )
        check_structure(stream, ts)  # well-formed to its end, Pixel Data sized; no decoding
        file_meta = event.file_meta
        file_meta.SourceApplicationEntityTitle = state.calling_ae
        meta = b"\x00" * 128 + b"DICM" + encode_file_meta(file_meta)
        result = receiver.spool.put(
            header, meta, stream, calling_ae=state.calling_ae, assoc_id=state.assoc_id
        )
    except InvalidInstance as exc:
        ctx.setdefault("sop_uid", str(request.AffectedSOPInstanceUID))
        log.error("C-STORE refused (0x%04X): %s", exc.status, exc, extra=ctx)
        record_refusal(receiver.store, exc.status, state.calling_ae, ctx["sop_uid"], str(exc))
        return failure_status(exc.status, str(exc))
    except OutOfSpace as exc:
        log.error("C-STORE refused (0xA700): %s", exc, extra=ctx)
        record_refusal(receiver.store, 0xA700, state.calling_ae, ctx.get("sop_uid"), str(exc))
        return STATUS_OUT_OF_RESOURCES
    except (OSError, sqlite3.Error) as exc:
        log.error("C-STORE failed (0x0110), nothing recorded: %s", exc, extra=ctx)
        return STATUS_PROCESSING_FAILURE
    state.delivered += 1
    log.debug("stored (%s)", result.outcome.value, extra=ctx)
    return STATUS_SUCCESS


def handle_ended(event: Event, receiver: Receiver) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: record when a delivering association ended.

    The assembler's ``release`` condition waits for every association that delivered to a
    series to have ended.
    """
    if receiver.slots is not None:
        receiver.slots.release(id(event.assoc))
    state = receiver.pop(event)
    if state is None or state.delivered == 0:
        return
    record_association_end(
        receiver.store,
        state.assoc_id,
        state.calling_ae,
        state.peer_host,
        state.started_at,
        time.time(),
        peer_subject=state.peer_subject,
    )
    log.debug(
        "association ended (%s) after %d instance(s)%s",
        event.event.name,
        state.delivered,
        f" (TLS, {state.peer_subject})" if state.peer_subject else "",
        extra={"peer_ae": state.calling_ae, "assoc": state.assoc_id},
    )


def _contexts(accept_unknown: bool) -> list[PresentationContext]:
    verification = build_context(Verification)
    if accept_unknown:
        # Storage-like contexts are added per association as proposed, with the peer's
        # transfer syntaxes (no transcoding): see negotiate_storage.
        return [verification]
    contexts = [verification]
    for cx in AllStoragePresentationContexts:
        contexts.append(build_context(str(cx.abstract_syntax), list(AllTransferSyntaxes)))
    return contexts


def build_ae(settings: Settings, receivers: int) -> AE:
    """The pynetdicom AE of one receiving process.

    Parameters
    ----------
    settings : Settings
        ``node`` is used.
    receivers : int
        How many processes share the port. ``node.max_associations`` holds for the node
        as a whole (:class:`~aenode.receive.guard.AssociationSlots`); pynetdicom's own
        per-process limit is set above it so that it never refuses first.

    Returns
    -------
    pynetdicom.AE
    """
    node = settings.node
    # Process-wide in pynetdicom; each receiving process is ours alone.
    # Not pynetdicom's unrestricted storage: its negotiation takes any abstract syntax it
    # has no keyword for as storage (a worklist C-FIND was accepted, answered 0xC311).
    # negotiate_storage supports the storage-like contexts per association instead.
    _config.UNRESTRICTED_STORAGE_SERVICE = False
    # No per-PDU debug formatting on the hot path (aenode logs what matters itself).
    _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=node.ae_title)
    ae.supported_contexts = _contexts(node.accept_unknown_storage)
    # Storage commitment reports (N-EVENT-REPORT) a PACS opens back to us: either role.
    ae.add_supported_context(STORAGE_COMMITMENT, scu_role=True, scp_role=True)
    ae.require_called_aet = node.check_called_ae
    ae.maximum_associations = 2 * node.max_associations + max(2, receivers)
    ae.maximum_pdu_size = node.max_pdu_size
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    return ae


def serve_receiver(
    settings: Settings,
    stop: threading.Event,
    receivers: int = 1,
    ready: threading.Event | None = None,
    drain_seconds: float = 10.0,
    slots: AssociationSlots | None = None,
) -> None:
    """Run one receiving process's listener until ``stop`` is set.

    Parameters
    ----------
    settings : Settings
        The node's settings.
    stop : threading.Event
        Set (for example from a SIGTERM handler) to stop.
    receivers : int
        How many processes share the port.
    ready : threading.Event or None
        Set once the port is bound.
    drain_seconds : float
        On stop, how long running associations may finish before they are aborted.
    slots : AssociationSlots or None
        The node-wide association count; None counts this process alone.

    Raises
    ------
    OSError
        If the port cannot be bound; the message names the address.
    """
    root = Path(settings.storage.path)
    # The spool file is the durability point (fdatasynced in a pool file whose folder entry
    # was durable before use: see aenode.receive.pool); a store row
    # lost to a power cut is rebuilt from it by recover_spool at start-up, so the store can
    # commit without its own fsync (WAL, synchronous=NORMAL: a crash loses no commit).
    store = Store(root / "aenode.db")
    if slots is None:
        slots = AssociationSlots(settings.node.max_associations, [0])
    receiver = Receiver(
        settings=settings,
        store=store,
        spool=Spool(settings, store),
        slots=slots,
        refusal=RefusalCheck(Path(settings.storage.path)),
    )
    ae = build_ae(settings, receivers)
    handlers: list[EventHandlerType] = [
        (evt.EVT_REQUESTED, handle_requested, [receiver]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [receiver]),
        (evt.EVT_N_EVENT_REPORT, handle_report, [store]),
        (evt.EVT_RELEASED, handle_ended, [receiver]),
        (evt.EVT_ABORTED, handle_ended, [receiver]),
        (evt.EVT_CONN_CLOSE, handle_ended, [receiver]),
    ]
    servers = []
    try:
        for port, with_tls in settings.node.ports:
            servers.append(_listen(ae, settings, port, handlers, with_tls))
    except (OSError, ConfigError):
        for server in servers:
            server.shutdown()
        store.close()
        raise
    for server in servers:
        threading.Thread(target=server.serve_forever, name="aenode-receiver", daemon=True).start()
    if ready is not None:
        ready.set()
    stop.wait()
    for server in servers:
        server.shutdown()
    deadline = time.monotonic() + drain_seconds
    # Associations still exchanging data may finish; released ones are only winding down.
    while time.monotonic() < deadline and any(a.is_established for a in ae.active_associations):
        time.sleep(0.05)
    ae.shutdown()
    receiver.spool.close()
    store.close()


def _listen(
    ae: AE, settings: Settings, port: int, handlers: list[EventHandlerType], with_tls: bool
) -> ReceiverServer:
    """A bound listener on ``port`` (the TLS one with its context)."""
    address = (settings.node.host, port)
    tls = settings.node.tls
    context = None
    if with_tls and tls is not None:
        context = server_context(tls.cert, tls.key, tls.ca, tls.require_client_cert)
    try:
        server = cast(
            ReceiverServer,
            ae.make_server(address, evt_handlers=handlers, server_class=ReceiverServer),
        )
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {address[0]}:{address[1]}: {exc}") from exc
    server.guard = ConnectionGuard(settings.node)
    server.tls = context
    if server.socket is not None:
        server.socket.listen(settings.node.listen_backlog)
    return server
