"""C-STORE and C-ECHO as a service user, with a typed outcome that cannot pass for success.

:func:`send_files` sends a job's files over one association (TCP_NODELAY, a presentation
context per SOP class and transfer syntax) through :mod:`aenode.export.association`, which
sends the files' bytes as they are; a failure status, a timeout, an abort, a rejected
context or a dropped connection are all failures naming the peer and the SOP Instance UID.
The same module answers :func:`echo` (C-ECHO).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode, split_dataset

from aenode.config import DestinationSettings
from aenode.errors import ConfigError
from aenode.export.association import (
    IMPLICIT_VR_LE,
    VERIFICATION,
    AssociationError,
    Context,
    StoreAssociation,
    StoreResponse,
)
from aenode.tls import client_context

__all__ = ["SendOutcome", "destination_tls", "echo", "echo_reason", "send_files"]

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
    offset: int


def destination_tls(destination: DestinationSettings) -> ssl.SSLContext | None:
    """The client TLS context of a destination with ``tls`` set, else None.

    Raises
    ------
    ConfigError
        If a file it names cannot be loaded any more (a failed try, never a plain send).
    """
    tls = destination.tls
    if tls is None:
        return None
    return client_context(tls.ca, tls.cert, tls.key, prefix=f"{_peer(destination)} tls")


def _peer(destination: DestinationSettings) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def _read_headers(files: Sequence[Path], outcome: SendOutcome) -> list[_Item]:
    items = []
    for path in files:
        try:
            meta, offset = split_dataset(Path(path))
            items.append(
                _Item(
                    path=Path(path),
                    sop_class=UID(meta.MediaStorageSOPClassUID),
                    sop_instance=UID(meta.MediaStorageSOPInstanceUID),
                    syntax=UID(meta.TransferSyntaxUID),
                    offset=offset,
                )
            )
        except (OSError, InvalidDicomError, AttributeError, KeyError, ValueError) as exc:
            outcome.failed[str(path)] = f"{path}: not a readable DICOM Part 10 file: {exc}"
    return items


def _contexts(items: Sequence[_Item]) -> list[tuple[str, str]]:
    """One context per (SOP class, transfer syntax): the file's own, explicit and implicit LE."""
    seen: list[tuple[str, str]] = []
    for item in items:
        for syntax in (item.syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if (item.sop_class, syntax) not in seen:
                seen.append((str(item.sop_class), str(syntax)))
    return seen[:_MAX_CONTEXTS]


_WORD_SIZES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def _swap_bulk_to_little_endian(ds: Dataset) -> str | None:
    """Byte-swap raw OW/OL/OF/OD/OV values read from big endian data, in place.

    pydicom re-encodes parsed values in the target byte order but writes such raw bytes
    as they are, which would corrupt 16-bit pixel data sent as little endian.
    """
    for elem in ds.iterall():
        width = _WORD_SIZES.get(str(elem.VR))
        if width is None or not isinstance(elem.value, bytes):
            continue
        if len(elem.value) % width:
            return f"{elem.keyword or elem.tag} has {len(elem.value)} bytes, not words of {width}"
        elem.value = np.frombuffer(elem.value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
    return None


def _encoded(assoc: StoreAssociation, item: _Item) -> tuple[Context, bytes] | str:
    """The context to use and the dataset bytes in its syntax, or why the file cannot go."""
    cx = assoc.context_for(item.sop_class, [item.syntax])
    if cx is not None:
        with open(item.path, "rb") as fh:
            fh.seek(item.offset)
            return cx, fh.read()
    if item.syntax.is_compressed:
        if assoc.context_for(item.sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]):
            return (
                f"{assoc.peer}: transfer syntax {item.syntax} of {item.path.name} not accepted "
                f"for SOP class {item.sop_class}"
            )
        return f"{assoc.peer}: no accepted presentation context for SOP class {item.sop_class}"
    cx = assoc.context_for(item.sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if cx is None:
        return f"{assoc.peer}: no accepted presentation context for SOP class {item.sop_class}"
    syntax = UID(cx.transfer_syntax)
    ds = dcmread(item.path)
    if not item.syntax.is_little_endian:
        problem = _swap_bulk_to_little_endian(ds)
        if problem is not None:
            return f"{assoc.peer}: {item.path.name} cannot be converted from big endian: {problem}"
    data = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian)
    if data is None:
        return f"{assoc.peer}: {item.path.name} cannot be encoded as {syntax.name}"
    return cx, data


def _status_reason(peer: str, uid: str, response: StoreResponse) -> str | None:
    if response.status == 0x0000:
        return None
    if response.status in _WARNINGS:
        log.warning(
            "C-STORE warning status 0x%04X from %s",
            response.status,
            peer,
            extra={"sop_uid": uid, "peer_ae": peer},
        )
        return None
    comment = f" ({response.error_comment})" if response.error_comment else ""
    return f"{peer}: C-STORE of {uid} failed with status 0x{response.status:04X}{comment}"


def send_files(
    destination: DestinationSettings,
    files: Sequence[Path],
    *,
    calling_ae: str,
    timeout: float,
) -> SendOutcome:
    """Send Part 10 files to one destination over a single association.

    The files' bytes go as they are when the peer accepts their transfer syntax; otherwise
    uncompressed data are re-encoded as explicit or implicit VR little endian.

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
    contexts = _contexts(items)
    try:
        assoc = StoreAssociation(
            destination.host,
            destination.port,
            destination.ae_title,
            calling_ae,
            contexts,
            timeout,
            tls=destination_tls(destination),
        )
    except (AssociationError, ConfigError) as exc:
        outcome.error = str(exc)
        for item in items:
            outcome.failed[str(item.sop_instance)] = outcome.error
        log.warning("export failed: %s", outcome.error, extra={"peer_ae": peer})
        return outcome
    if not any(cx.accepted for cx in assoc.contexts):
        classes = sorted({a for a, _ in contexts})
        outcome.error = (
            f"{peer}: no presentation context accepted (SOP classes {', '.join(classes)})"
        )
    try:
        for msg_id, item in enumerate(items, start=1):
            uid = str(item.sop_instance)
            if outcome.error is not None:
                outcome.failed[uid] = outcome.error
                continue
            prepared = _encoded(assoc, item)
            if isinstance(prepared, str):
                reason: str | None = prepared
            else:
                cx, data = prepared
                try:
                    response = assoc.store(cx, item.sop_class, uid, data, msg_id % 65536)
                except AssociationError as exc:
                    outcome.error = f"{exc}; no C-STORE response for {uid} (timeout or aborted)"
                    reason = outcome.error
                else:
                    reason = _status_reason(peer, uid, response)
            if reason is None:
                outcome.sent.append(uid)
            else:
                outcome.failed[uid] = reason
                log.warning("C-STORE failed: %s", reason, extra={"sop_uid": uid, "peer_ae": peer})
    finally:
        if outcome.error is None:
            assoc.release()
        else:
            assoc.abort()
    outcome.ok = not outcome.failed and outcome.error is None
    return outcome


def echo_reason(
    host: str, port: int, called_ae: str, calling_ae: str, timeout: float = 10.0
) -> str | None:
    """C-ECHO a peer; None on success, else why it failed (naming the peer)."""
    peer = f"{called_ae}@{host}:{port}"
    try:
        assoc = StoreAssociation(
            host, port, called_ae, calling_ae, [(VERIFICATION, IMPLICIT_VR_LE)], timeout
        )
    except AssociationError as exc:
        return str(exc)
    try:
        cx = assoc.context_for(VERIFICATION, [IMPLICIT_VR_LE])
        if cx is None:
            return f"{peer}: Verification not accepted"
        response = assoc.echo(cx)
    except AssociationError as exc:
        return f"{exc}; no C-ECHO response (timeout or aborted)"
    finally:
        assoc.release()
    if response.status != 0x0000:
        return f"{peer}: C-ECHO status 0x{response.status:04X}"
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
