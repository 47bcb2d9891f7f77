"""Export: result files to the configured destinations over DIMSE, through a durable outbox.

``scu`` sends (one association, typed outcome), ``association`` is the minimal upper layer
it sends through, ``outbox`` keeps the work and the retries in the store.
"""

from __future__ import annotations

from aenode.export.outbox import Outbox, OutboxError, backoff_seconds
from aenode.export.scu import SendOutcome, echo, send_files

__all__ = ["Outbox", "OutboxError", "SendOutcome", "backoff_seconds", "echo", "send_files"]
