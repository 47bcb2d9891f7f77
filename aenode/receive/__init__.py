"""Receive: the DIMSE listener (scp), durable Part 10 spool (spool), header reading (header),
the structural check at receipt (check), network hygiene (guard) and the receiving
processes sharing the port (workers)."""

from __future__ import annotations

from aenode.receive.check import check_structure
from aenode.receive.guard import AssociationSlots, ConnectionGuard
from aenode.receive.header import InstanceHeader, InvalidInstance, parse_header, read_file_header
from aenode.receive.scp import build_ae, peer_allowed, serve_receiver
from aenode.receive.spool import Outcome, OutOfSpace, Spool, SpoolResult, recover_spool
from aenode.receive.workers import ReceiverError, ReceiverPool

__all__ = [
    "AssociationSlots",
    "ConnectionGuard",
    "InstanceHeader",
    "InvalidInstance",
    "OutOfSpace",
    "Outcome",
    "ReceiverError",
    "ReceiverPool",
    "Spool",
    "SpoolResult",
    "build_ae",
    "check_structure",
    "parse_header",
    "peer_allowed",
    "read_file_header",
    "recover_spool",
    "serve_receiver",
]
