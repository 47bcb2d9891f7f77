"""The executor boundary: where the job runner hands a job's volumes to run a model.

:class:`Executor` is the small interface the job runner (:class:`aenode.jobs.JobRunner`)
and the warm-up call: ``infer(model, volumes) -> Prediction``, ``describe()`` for
``aenode status`` and the health pages, ``close()``; :func:`aenode.infer.start.open_executor`
starts the one ``runtime.executor`` names. Two implement it:

- :class:`LocalExecutor` (``runtime.executor: local``, the default) wraps the in-process
  :class:`~aenode.infer.runtime.Runtime`: device threads in the node.
- :class:`~aenode.infer.ray_executor.RayExecutor` (``runtime.executor: ray``) hands the
  volumes to warm actors on a Ray cluster.

An executor that loses the worker running a job (a Ray actor or node died) raises
:class:`WorkerLost`; the job runner queues the job again (the store stays the truth) and its
results keep their SOP Instance UIDs (:mod:`aenode.results.uids`), so a rerun never makes a
second copy at the destination.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from aenode.errors import AenodeError
from aenode.records import Prediction, Volume

__all__ = [
    "EXECUTOR_FILE",
    "Executor",
    "LocalExecutor",
    "Predictor",
    "WorkerLost",
    "as_executor",
    "read_executor_file",
    "write_executor_file",
]

EXECUTOR_FILE = "executor.json"
"""Under ``storage.path``: the running node's :meth:`Executor.describe` for ``aenode status``."""


class WorkerLost(AenodeError, RuntimeError):
    """The worker running a job was lost (actor or node died); the job runs again."""


class Predictor(Protocol):
    """What :class:`LocalExecutor` wraps: :class:`~aenode.infer.runtime.Runtime`'s call."""

    def predict(
        self, model: str, volumes: Mapping[str, Volume], *, fractional: bool = False
    ) -> Prediction: ...


@runtime_checkable
class Executor(Protocol):
    """Runs a model on a job's volumes, wherever the model is kept warm."""

    def infer(
        self, model: str, volumes: Mapping[str, Volume], *, fractional: bool = False
    ) -> Prediction:
        """Run ``model`` on ``volumes`` (role -> volume) and return its prediction.

        Raises
        ------
        aenode.infer.runtime.InferenceError
            The job's own failure (roles, shape, timeout), naming the model.
        WorkerLost
            The worker was lost mid-job; running the job again is safe.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """The executor, its workers (actors) and their devices, JSON-ready; cheap to call."""
        ...

    def close(self) -> None:
        """Stop the workers; idempotent."""
        ...


class LocalExecutor:
    """The in-process executor: today's device-thread :class:`~aenode.infer.runtime.Runtime`.

    Parameters
    ----------
    runtime : Predictor
        A :class:`~aenode.infer.runtime.Runtime` (or anything with its ``predict``).
    """

    def __init__(self, runtime: Predictor) -> None:
        self.runtime = runtime

    def infer(
        self, model: str, volumes: Mapping[str, Volume], *, fractional: bool = False
    ) -> Prediction:
        """Run the model on the node's device workers (:meth:`Runtime.predict`)."""
        return self.runtime.predict(model, volumes, fractional=fractional)

    def describe(self) -> dict[str, Any]:
        """``{"executor": "local", "workers": [{"device": "cpu", "models": [...]}, ...]}``."""
        devices = [str(d) for d in getattr(self.runtime, "devices", [])]
        registry = getattr(self.runtime, "registry", None)
        models = registry.names() if registry is not None else []
        return {
            "executor": "local",
            "workers": [{"device": d, "models": models} for d in devices],
        }

    def close(self) -> None:
        """Close the runtime (after the jobs already queued)."""
        close = getattr(self.runtime, "close", None)
        if close is not None:
            close()


def as_executor(runtime: Executor | Predictor) -> Executor:
    """An :class:`Executor` as it is; a runtime with ``predict`` wrapped in a LocalExecutor."""
    if isinstance(runtime, Executor):
        return runtime
    return LocalExecutor(runtime)


def write_executor_file(root: Path, description: Mapping[str, Any]) -> None:
    """Write ``describe()`` to ``<root>/executor.json`` atomically (for ``aenode status``)."""
    path = root / EXECUTOR_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(description, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def read_executor_file(root: Path) -> dict[str, Any] | None:
    """What the running (or last) node wrote to ``<root>/executor.json``, or None."""
    try:
        data = json.loads((root / EXECUTOR_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
