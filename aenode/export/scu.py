"""C-STORE and C-ECHO as a service user, with a typed outcome that cannot pass for success.

One association per call; TCP_NODELAY is set on its socket (pynetdicom never sets it, and
without it every C-STORE stalls about 40 ms on Nagle's algorithm). pynetdicom answers an
empty Dataset on timeout or abort: that, a failure status, a rejected presentation context
or a dropped association are all failures naming the peer and the SOP Instance UID.
"""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from aenode.config import DestinationSettings, Settings

__all__ = ["SendOutcome", "command_echo", "echo", "echo_reason", "send_files"]

log = logging.getLogger(__name__)

# DIMSE warning statuses: the instance was stored (perhaps coerced).
_WARNINGS = {0x0001, 0xB000, 0xB006, 0xB007}
_MAX_CONTEXTS = 128


@dataclass
class SendOutcome:
    """What one :func:`send_files` call achieved.

    Attributes
    ----------
    ok : bool
        True only if every file was stored with a success (or warning) status.
    sent : list of str
        SOP Instance UIDs stored.
    failed : dict of str to str
        SOP Instance UID (or file path when unreadable) to the reason.
    error : str or None
        Association-level failure (could not connect, rejected, aborted), naming the peer.
    """

    ok: bool
    sent: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class: UID
    sop_instance: UID
    syntax: UID


def _peer(destination: DestinationSettings) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def _no_delay(assoc: Association) -> None:
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _read_headers(files: Sequence[Path], outcome: SendOutcome) -> list[_Item]:
    items = []
    for path in files:
        try:
            meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            items.append(
                _Item(
                    path=Path(path),
                    sop_class=UID(meta.file_meta.MediaStorageSOPClassUID),
                    sop_instance=UID(meta.file_meta.MediaStorageSOPInstanceUID),
                    syntax=UID(meta.file_meta.TransferSyntaxUID),
                )
            )
        except (OSError, InvalidDicomError, AttributeError, KeyError) as exc:
            outcome.failed[str(path)] = f"{path}: not a readable DICOM Part 10 file: {exc}"
    return items


def _contexts(items: Sequence[_Item]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax): the file's own, explicit and implicit LE."""
    seen: list[tuple[UID, UID]] = []
    for item in items:
        for syntax in (item.syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if (item.sop_class, syntax) not in seen:
                seen.append((item.sop_class, syntax))
    contexts = []
    for sop_class, syntax in seen[:_MAX_CONTEXTS]:
        cx = PresentationContext()
        cx.abstract_syntax = sop_class
        cx.transfer_syntax = [syntax]
        contexts.append(cx)
    return contexts


def _accepted_syntaxes(assoc: Association, sop_class: UID) -> set[str]:
    return {
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and cx.transfer_syntax
    }


def _store_one(assoc: Association, item: _Item, msg_id: int, peer: str) -> str | None:
    """Send one file; None on success, else the reason."""
    accepted = _accepted_syntaxes(assoc, item.sop_class)
    if not accepted:
        return f"{peer}: no accepted presentation context for SOP class {item.sop_class}"
    if item.syntax in accepted:
        payload: Path | object = item.path
    elif item.syntax.is_compressed:
        return (
            f"{peer}: transfer syntax {item.syntax} of {item.path.name} not accepted "
            f"for SOP class {item.sop_class}"
        )
    else:
        payload = dcmread(item.path)  # pynetdicom converts between uncompressed syntaxes
    try:
        status = assoc.send_c_store(payload, msg_id=msg_id)  # type: ignore[arg-type]
    except (ValueError, AttributeError, OSError) as exc:
        return f"{peer}: C-STORE of {item.sop_instance} not sent: {exc}"
    if "Status" not in status:
        return f"{peer}: no C-STORE response for {item.sop_instance} (timeout or aborted)"
    code = int(status.Status)
    if code == 0x0000:
        return None
    if code in _WARNINGS:
        log.warning(
            "C-STORE warning status 0x%04X from %s",
            code,
            peer,
            extra={"sop_uid": str(item.sop_instance), "peer_ae": peer},
        )
        return None
    comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
    return f"{peer}: C-STORE of {item.sop_instance} failed with status 0x{code:04X}{comment}"


def send_files(
    destination: DestinationSettings,
    files: Sequence[Path],
    *,
    calling_ae: str,
    timeout: float,
) -> SendOutcome:
    """Send Part 10 files to one destination over a single association.

    Parameters
    ----------
    destination : aenode.config.DestinationSettings
        Called AE title, host and port.
    files : sequence of pathlib.Path
        The files to store.
    calling_ae : str
        Our AE title.
    timeout : float
        Seconds for connecting, association negotiation and each DIMSE response.

    Returns
    -------
    SendOutcome
        ``ok`` only if every file was stored; never raises for network or peer failures.
    """
    peer = _peer(destination)
    outcome = SendOutcome(ok=False)
    items = _read_headers(files, outcome)
    if not items:
        outcome.ok = not outcome.failed
        return outcome
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = _contexts(items)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        rejected = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        if assoc.is_rejected:
            outcome.error = f"{peer}: association rejected"
        elif rejected and not assoc.accepted_contexts:
            outcome.error = (
                f"{peer}: no presentation context accepted (SOP classes {', '.join(rejected)})"
            )
        elif assoc.is_aborted:
            outcome.error = f"{peer}: association aborted (or could not connect)"
        else:
            outcome.error = f"{peer}: could not associate (connection refused or timed out)"
        for item in items:
            outcome.failed[str(item.sop_instance)] = outcome.error
        log.warning("export failed: %s", outcome.error, extra={"peer_ae": peer})
        return outcome
    _no_delay(assoc)
    try:
        for msg_id, item in enumerate(items, start=1):
            uid = str(item.sop_instance)
            if not assoc.is_established:
                outcome.error = outcome.error or f"{peer}: association dropped during the transfer"
                outcome.failed[uid] = outcome.error
                continue
            reason = _store_one(assoc, item, msg_id % 65536, peer)
            if reason is None:
                outcome.sent.append(uid)
            else:
                outcome.failed[uid] = reason
                log.warning("C-STORE failed: %s", reason, extra={"sop_uid": uid, "peer_ae": peer})
    finally:
        if assoc.is_established:
            assoc.release()
    outcome.ok = not outcome.failed and outcome.error is None
    return outcome


def echo_reason(
    host: str, port: int, called_ae: str, calling_ae: str, timeout: float = 10.0
) -> str | None:
    """C-ECHO a peer; None on success, else why it failed (naming the peer)."""
    peer = f"{called_ae}@{host}:{port}"
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return f"{peer}: association {'rejected' if assoc.is_rejected else 'failed'}"
    try:
        _no_delay(assoc)
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        return f"{peer}: no C-ECHO response (timeout or aborted)"
    if int(status.Status) != 0:
        return f"{peer}: C-ECHO status 0x{int(status.Status):04X}"
    return None


def echo(host: str, port: int, called_ae: str, calling_ae: str, timeout: float = 10.0) -> bool:
    """C-ECHO a peer.

    Parameters
    ----------
    host : str
        Peer address.
    port : int
        Peer port.
    called_ae : str
        The peer's AE title.
    calling_ae : str
        Our AE title.
    timeout : float
        Seconds for each step.

    Returns
    -------
    bool
        True if the peer answered with a success status.
    """
    return echo_reason(host, port, called_ae, calling_ae, timeout) is None


def command_echo(args: argparse.Namespace, settings: Settings) -> int:
    """``aenode echo HOST PORT [--aet CALLED] [--calling-aet OURS]``: print the outcome.

    Returns
    -------
    int
        0 if the peer answered with success, 1 otherwise.
    """
    calling = args.calling_aet or settings.export.calling_ae_title or settings.node.ae_title
    reason = echo_reason(
        args.host, args.port, args.aet, calling, settings.export.retry.timeout_seconds
    )
    if reason is None:
        print(f"C-ECHO {args.aet}@{args.host}:{args.port}: success")
        return 0
    print(f"C-ECHO failed: {reason}")
    return 1
