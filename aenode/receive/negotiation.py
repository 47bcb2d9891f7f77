"""Which presentation contexts a receiving process accepts: storage and verification only.

With ``node.accept_unknown_storage`` the node accepts storage SOP classes it does not know
(new standard classes under ``1.2.840.10008.5.1.4.1.1``, private classes outside the
DICOM root) as they are proposed, with the peer's transfer syntaxes (no transcoding).
Nothing else is storage-like: query/retrieve, worklist, MPPS and other services are
refused at negotiation (abstract syntax not supported) rather than accepted and answered
``0xC311``. Pure functions; :func:`aenode.receive.scp.handle_requested` applies them and
logs what was refused.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from pydicom.uid import UID
from pynetdicom import build_context, register_uid, sop_class
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass

__all__ = ["STORAGE_ROOT", "VERIFICATION", "describe", "is_storage_like", "storage_contexts"]

STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
"""The root of the standard storage SOP class UIDs."""

VERIFICATION = "1.2.840.10008.1.1"

_DICOM_ROOT = "1.2.840.10008."
_lock = threading.Lock()


def is_storage_like(uid: str) -> bool:
    """Whether an abstract syntax is a storage SOP class (standard, future or private).

    Parameters
    ----------
    uid : str
        The proposed abstract syntax.

    Returns
    -------
    bool
        True under ``1.2.840.10008.5.1.4.1.1.`` or outside the DICOM root (private).
    """
    return uid.startswith(STORAGE_ROOT) or not uid.startswith(_DICOM_ROOT)


def describe(uid: str) -> str:
    """``1.2.840.10008.5.1.4.31 (Modality Worklist Information Model - FIND)``."""
    name = UID(uid).name
    return f"{uid} ({name})" if name and name != uid else uid


def _register(uid: str) -> None:
    # pynetdicom dispatches a C-STORE by SOP class: an unknown one must be known as storage.
    keyword = "AenodeStorage_" + uid.replace(".", "_")
    with _lock:
        if not hasattr(sop_class, keyword) and sop_class.uid_to_service_class(uid) is not (
            StorageServiceClass
        ):
            register_uid(uid, keyword, StorageServiceClass)


def storage_contexts(
    proposed: Iterable[PresentationContext], supported: Iterable[str]
) -> tuple[list[PresentationContext], list[str]]:
    """The contexts to add for one association, and the abstract syntaxes refused.

    Parameters
    ----------
    proposed : iterable of PresentationContext
        The requestor's proposed contexts.
    supported : iterable of str
        Abstract syntaxes the AE supports already (verification, known storage).

    Returns
    -------
    tuple of (list of PresentationContext, list of str)
        New storage-like contexts (with the proposed transfer syntaxes; their SOP classes
        registered as storage), and the refused abstract syntaxes (:func:`describe`).
    """
    known = set(supported)
    added: dict[str, PresentationContext] = {}
    refused: list[str] = []
    for cx in proposed:
        uid = str(cx.abstract_syntax)
        if uid in known:
            continue
        if not is_storage_like(uid):
            if describe(uid) not in refused:
                refused.append(describe(uid))
            continue
        syntaxes = [str(ts) for ts in cx.transfer_syntax]
        if uid in added:
            merged = [str(ts) for ts in added[uid].transfer_syntax]
            syntaxes = merged + [ts for ts in syntaxes if ts not in merged]
        _register(uid)
        added[uid] = build_context(uid, syntaxes)
    return list(added.values()), refused
