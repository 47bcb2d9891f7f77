"""aenode: a DICOM network inference node.

receive (DIMSE SCP, durable spool) -> assemble (series completion) -> select (rules on tags)
-> volume (geometry-checked) -> infer (torch, warm models) -> results (SEG, SC, SR)
-> export (C-STORE SCU, durable outbox).
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

__all__ = ["__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
