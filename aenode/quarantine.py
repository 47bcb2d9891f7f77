"""The quarantine across the pipeline: what ``aenode status`` lists, what ``aenode retry`` frees.

An item that failed the same way repeatedly (:mod:`aenode.supervise`) is in the
``quarantined`` state of its table; each owner lists and releases its own. This module only
puts the owners' functions together, in the order of the pipeline.
"""

from __future__ import annotations

from aenode.assemble import SERIES_TOPIC, quarantined_series, release_quarantined_series
from aenode.export.outbox import Outbox, quarantined_exports
from aenode.jobs import quarantined_jobs, retry_job
from aenode.select.studies import quarantined_studies, release_quarantined_studies
from aenode.store import Store
from aenode.supervise import Quarantined

__all__ = ["quarantined_items", "release_quarantined"]


def quarantined_items(store: Store) -> list[Quarantined]:
    """Every quarantined item with its reason: series, hand-overs, study rules, jobs, exports.

    Parameters
    ----------
    store : Store
        The store.

    Returns
    -------
    list of Quarantined
    """
    handovers = [
        Quarantined("handover", key, error) for key, error in store.quarantined(SERIES_TOPIC)
    ]
    return [
        *quarantined_series(store),
        *handovers,
        *quarantined_studies(store),
        *quarantined_jobs(store),
        *quarantined_exports(store),
    ]


def release_quarantined(store: Store, outbox: Outbox) -> dict[str, int]:
    """Take every item out of quarantine, each with a fresh count of tries.

    Series are receiving again (the assembler completes them), hand-overs ready, study rules
    waiting, jobs queued and export rows pending; a running ``aenode serve`` picks them up.

    Parameters
    ----------
    store : Store
        The store.
    outbox : Outbox
        Queues the quarantined export rows again.

    Returns
    -------
    dict of str to int
        Kind -> how many were released.
    """
    jobs = [int(q.key) for q in quarantined_jobs(store)]
    for job_id in jobs:
        retry_job(store, job_id, outbox)
    return {
        "series": release_quarantined_series(store),
        "handover": store.release_quarantined(SERIES_TOPIC),
        "study": release_quarantined_studies(store),
        "job": len(jobs),
        "export": outbox.release_quarantined(),
    }
