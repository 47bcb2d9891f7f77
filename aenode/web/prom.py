"""``/metrics``: Prometheus metrics computed from the store at scrape time.

The receivers are separate processes, so counters kept in memory would count one process
each and restart at zero. Every figure is therefore read from the store when Prometheus
scrapes, through the owners' query functions, by a custom ``prometheus_client`` collector
registered on a registry of the app's own (never the global one). Counters are monotonic
because the store keeps its rows: instances, refusals, completed series, job state entries
(from the audit trail), export retries. ``aenode_stage_seconds`` is a histogram built from
the stage timestamps of every job in the store (``jobs.t_*``), so it survives restarts and
needs no observation on the hot path; each scrape costs a few aggregate queries.
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from aenode.assemble import completion_counts, received_totals
from aenode.audit import job_state_counts
from aenode.config import Settings
from aenode.export.outbox import destination_loads
from aenode.infer.executor import read_executor_file
from aenode.jobs import job_counts, stage_seconds
from aenode.receive.refusals import refusal_counts
from aenode.store import Store
from aenode.web.checks import free_disk_mb

__all__ = ["BUCKETS", "StoreCollector", "make_registry"]

BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds (seconds) of ``aenode_stage_seconds``; ``+Inf`` is added."""


def _histogram(values: list[float]) -> tuple[list[tuple[str, float]], float]:
    ordered = sorted(values)
    buckets = [(str(b), float(bisect.bisect_right(ordered, b))) for b in BUCKETS]
    buckets.append(("+Inf", float(len(ordered))))
    return buckets, float(sum(ordered))


class StoreCollector(Collector):
    """Reads the node's figures from the store at each scrape.

    Parameters
    ----------
    settings : Settings
        ``storage`` (disk floor).
    open_store : callable
        Returns the :class:`Store` to read (the web server's connection).
    """

    def __init__(self, settings: Settings, open_store: Callable[[], Store]) -> None:
        self.settings = settings
        self.open_store = open_store

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family (prometheus_client calls this at each scrape)."""
        store = self.open_store()
        per_ae, received_bytes = received_totals(store)
        received = CounterMetricFamily(
            "aenode_instances_received",
            "Instances accepted and recorded, by calling AE title.",
            labels=["calling_ae"],
        )
        for ae, n in sorted(per_ae.items()):
            received.add_metric([ae], n)
        yield received
        yield CounterMetricFamily(
            "aenode_bytes_received",
            "Bytes of the instances accepted (as spooled).",
            value=received_bytes,
        )
        refused = CounterMetricFamily(
            "aenode_instances_refused",
            "C-STOREs answered with a failure status, by status (hex).",
            labels=["status"],
        )
        for status, n in sorted(refusal_counts(store).items()):
            refused.add_metric([f"0x{status:04X}"], n)
        yield refused
        completed = CounterMetricFamily(
            "aenode_series_completed",
            "Series revisions judged complete, by the condition that completed them.",
            labels=["completed_by"],
        )
        for by, n in sorted(completion_counts(store).items()):
            completed.add_metric([by], n)
        yield completed
        entered = CounterMetricFamily(
            "aenode_jobs",
            "Jobs that entered each state, by model (from the audit trail).",
            labels=["model", "state"],
        )
        for (model, state), n in sorted(job_state_counts(store).items()):
            entered.add_metric([model, state], n)
        yield entered
        current = GaugeMetricFamily(
            "aenode_jobs_current", "Jobs now in each state, by model.", labels=["model", "state"]
        )
        for (model, jstate), n in sorted(job_counts(store).items()):
            current.add_metric([model, jstate.value], n)
        yield current
        stages = HistogramMetricFamily(
            "aenode_stage_seconds",
            "Seconds per stage of each job (receive-to-complete, complete-to-start, volume, "
            "infer, write, export, end-to-end).",
            labels=["stage"],
        )
        for name, values in stage_seconds(store).items():
            buckets, total = _histogram(values)
            stages.add_metric([name.replace("_", "-")], buckets, total)
        yield stages
        depth = GaugeMetricFamily(
            "aenode_outbox_depth",
            "Exports waiting to be sent, by destination.",
            labels=["destination"],
        )
        retries = CounterMetricFamily(
            "aenode_outbox_retries",
            "Export tries beyond the first, by destination.",
            labels=["destination"],
        )
        for key, load in sorted(destination_loads(store).items()):
            depth.add_metric([key], load.depth)
            retries.add_metric([key], load.retries)
        yield depth
        yield retries
        root = Path(self.settings.storage.path)
        yield GaugeMetricFamily(
            "aenode_disk_free_bytes",
            "Free bytes on the file system of storage.path.",
            value=free_disk_mb(root) * 1e6,
        )
        yield GaugeMetricFamily(
            "aenode_disk_min_free_bytes",
            "The floor (storage.min_free_mb) below which C-STOREs are refused.",
            value=self.settings.storage.min_free_mb * 1e6,
        )
        yield from _executor_metrics(root)
        gpu = _gpu_memory()
        if gpu:
            family = GaugeMetricFamily(
                "aenode_gpu_memory_allocated_bytes",
                "GPU memory held by torch in the node's process, by device.",
                labels=["device"],
            )
            for device, used in gpu.items():
                family.add_metric([device], used)
            yield family


def _executor_metrics(root: Path) -> Iterator[Metric]:
    """The executor and its workers, from what the node writes every second (executor.json)."""
    described = read_executor_file(root)
    if described is None:
        return
    kind = str(described.get("executor", "local"))
    info = GaugeMetricFamily(
        "aenode_executor_info", "The inference executor in use (1).", labels=["executor"]
    )
    info.add_metric([kind], 1.0)
    yield info
    actors = described.get("actors")
    if not isinstance(actors, list):
        return
    in_flight = GaugeMetricFamily(
        "aenode_executor_jobs_in_flight",
        "Jobs in flight per Ray actor.",
        labels=["actor", "model", "devices"],
    )
    restarts = CounterMetricFamily(
        "aenode_executor_actor_restarts",
        "Times a Ray actor was replaced after it was lost.",
        labels=["actor", "model"],
    )
    for actor in actors:
        name, model = str(actor.get("name")), str(actor.get("model"))
        devices = ",".join(str(d) for d in actor.get("devices", [])) or "-"
        in_flight.add_metric([name, model, devices], float(actor.get("in_flight", 0)))
        restarts.add_metric([name, model], float(actor.get("restarts", 0)))
    yield in_flight
    yield restarts


def _gpu_memory() -> dict[str, float]:
    # Only when the node already uses torch on CUDA: never import or initialise it here.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {
        f"cuda:{i}": float(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count())
    }


def make_registry(settings: Settings, open_store: Callable[[], Store]) -> CollectorRegistry:
    """A registry of the app's own holding only the :class:`StoreCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(settings, open_store))
    return registry
