"""The Ray executor: warm model actors on a Ray cluster (``runtime.executor: ray``).

Each model gets its own pool of actors (:class:`ModelActor`), each holding the model warm
in an in-process :class:`~aenode.infer.runtime.Runtime` on the device Ray gave it (the
card's ``resources``, or ``runtime.ray.resources.<model>``: ``num_gpus``, fractional
allowed, and ``num_cpus``). The pool has ``runtime.ray.actors_per_model`` actors, by default
one per whole GPU of the cluster for a model that asks for GPUs, else one. At most
``runtime.ray.max_in_flight_per_actor`` jobs are handed to one actor at a time (the actor
batches them); a caller past that waits for a free actor. Volumes travel through Ray's object
store; the prediction comes back to the node, which writes and exports the results as with
the local executor. Only inference runs in Ray: receiving, assembly, selection, volumes,
results and the outbox stay in the node's process.

The store stays the truth: an actor or node lost mid-job (:data:`LOST`: ``RayActorError``,
``ActorDiedError``, ``OwnerDiedError``, ``WorkerCrashedError``, ``NodeDiedError``) is
replaced by a fresh actor and the call raises :class:`~aenode.infer.executor.WorkerLost`, on
which the job runner queues the job again.

Start-up (:meth:`RayExecutor.start`) fails with a :class:`~aenode.errors.ConfigError` naming
``runtime.ray.address`` when the cluster cannot be reached in
``runtime.ray.connect_timeout_seconds``, and ``runtime.ray.resources`` when the cluster
cannot hold a model's actor. Actors are named ``<model>-<n>`` in ``runtime.ray.namespace``
(``ray list actors`` shows them).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import exceptions as ray_errors

from aenode.config import ModelsSettings, RuntimeSettings
from aenode.errors import ConfigError, InputError, InternalError
from aenode.infer.executor import WorkerLost
from aenode.infer.runtime import InferenceError
from aenode.records import Prediction, Volume

if TYPE_CHECKING:
    from aenode.config import Settings
    from aenode.infer.registry import Registry

__all__ = ["LOST", "ModelActor", "RayExecutor", "connect", "resources_for"]

log = logging.getLogger(__name__)

LOST: tuple[type[BaseException], ...] = (
    ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray_errors.ObjectLostError,  # OwnerDiedError
    ray_errors.WorkerCrashedError,
    ray_errors.NodeDiedError,
    ray_errors.LocalRayletDiedError,
)
"""Ray's errors for a worker, actor or node lost mid-call: the job runs again."""

START_TIMEOUT = 300.0
"""Seconds for an actor to load its model (torch import, weights) before start-up fails."""


class ModelActor:
    """One warm copy of one model, inside a Ray worker process.

    Parameters
    ----------
    models_path : str
        ``models.path`` as an absolute path (the same on every Ray node).
    model : str
        The package to load.
    runtime : dict
        ``runtime`` settings (device, threads, timeouts) as a JSON-ready dict.
    """

    def __init__(self, models_path: str, model: str, runtime: dict[str, Any]) -> None:
        from aenode.infer.registry import Registry
        from aenode.infer.runtime import Runtime
        from aenode.process import apply_process_settings

        settings = RuntimeSettings.model_validate(runtime)
        apply_process_settings(settings)
        registry = Registry.load(ModelsSettings(path=Path(models_path), enabled=[model]))
        self.model = model
        self.runtime = Runtime(registry, settings)

    def infer(
        self, volumes: Mapping[str, Volume], fractional: bool
    ) -> tuple[Prediction | None, str | None]:
        """The prediction, or None and the reason the model refused the input."""
        try:
            return self.runtime.predict(self.model, volumes, fractional=fractional), None
        except InputError as exc:
            return None, str(exc)

    def describe(self) -> dict[str, Any]:
        """Where this actor runs: node, process, Ray's GPU ids and the torch devices."""
        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "devices": [str(d) for d in self.runtime.devices],
        }


def resources_for(settings: Settings, registry: Registry, model: str) -> dict[str, float]:
    """``num_gpus`` and ``num_cpus`` of one actor of ``model``: the card's, then the config's."""
    card = registry.card(model).resources
    override = settings.runtime.ray.resources.get(model)
    num_gpus = card.num_gpus
    num_cpus = card.num_cpus
    if override is not None:
        num_gpus = override.num_gpus if override.num_gpus is not None else num_gpus
        num_cpus = override.num_cpus if override.num_cpus is not None else num_cpus
    return {"num_gpus": float(num_gpus), "num_cpus": float(num_cpus)}


def connect(settings: Settings) -> bool:
    """Connect this process to the Ray cluster of ``runtime.ray.address``.

    Returns
    -------
    bool
        True if this call started or joined Ray (and :meth:`RayExecutor.close` leaves it),
        False if the process was connected already.

    Raises
    ------
    aenode.errors.ConfigError
        Naming ``runtime.ray.address`` when the head cannot be reached.
    """
    if ray.is_initialized():
        return False
    ray_settings = settings.runtime.ray
    address = ray_settings.address
    timeout = ray_settings.connect_timeout_seconds
    if address not in (None, "auto"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except OSError as exc:
            raise ConfigError(
                f"runtime.ray.address: cannot reach the Ray head at {address} within "
                f"{timeout:g} s (runtime.ray.connect_timeout_seconds): {exc}"
            ) from None
    options: dict[str, Any] = {
        "namespace": ray_settings.namespace,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    if address is None:
        options["include_dashboard"] = False
    # Ray's core worker installs its own SIGTERM/SIGINT handler (a crash dump, then abort);
    # the node's handlers (a graceful stop within node.stop_timeout_seconds) are put back.
    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = "a local start" if address is None else address
        raise ConfigError(
            f"runtime.ray.address: cannot connect to Ray at {where}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
    return True


@dataclass
class _Slot:
    """One actor of a model's pool and the jobs in flight on it."""

    model: str
    index: int
    options: dict[str, Any]
    args: tuple[Any, ...]
    gate: threading.BoundedSemaphore
    handle: Any = None
    in_flight: int = 0
    restarts: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``<model>-<n>``, then ``<model>-<n>.r<k>`` after its k-th restart."""
        base = f"{self.model}-{self.index}"
        return f"{base}.r{self.restarts}" if self.restarts else base


class RayExecutor:
    """Warm model actors on a Ray cluster behind :class:`~aenode.infer.executor.Executor`.

    Use :meth:`start`, which connects and waits until every actor has loaded its model.

    Parameters
    ----------
    settings : Settings
        ``runtime`` (``ray``, ``device``, ``job_timeout_seconds``) and ``models.path``.
    registry : Registry
        The loaded models (their cards give names, formats and resources).
    owns_ray : bool
        Whether :meth:`close` also disconnects from Ray.
    """

    def __init__(self, settings: Settings, registry: Registry, owns_ray: bool) -> None:
        self.settings = settings
        self.registry = registry
        self.owns_ray = owns_ray
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._closed = False
        self._pools: dict[str, list[_Slot]] = {}
        self._address = ray.get_runtime_context().gcs_address
        ray_settings = settings.runtime.ray
        models_path = str(Path(settings.models.path).resolve())
        runtime = settings.runtime.model_dump(mode="json", exclude={"ray", "executor"})
        cluster = ray.cluster_resources()
        for name in registry.names():
            res = resources_for(settings, registry, name)
            have_all = {"num_gpus": cluster.get("GPU", 0.0), "num_cpus": cluster.get("CPU", 0.0)}
            for key, have in have_all.items():
                if res[key] > have:
                    raise ConfigError(
                        f"runtime.ray.resources.{name}.{key}: an actor asks for {res[key]:g} "
                        f"but the Ray cluster at {self._address} has {have:g} in all"
                    )
            count = ray_settings.actors_per_model
            if count is None:
                count = max(1, int(cluster.get("GPU", 0.0))) if res["num_gpus"] > 0 else 1
            actor_runtime = dict(runtime)
            if res["num_cpus"] > 0 and not settings.runtime.threads:
                actor_runtime["threads"] = max(1, math.ceil(res["num_cpus"]))
            self._pools[name] = [
                _Slot(
                    model=name,
                    index=k,
                    options={
                        **res,
                        "namespace": ray_settings.namespace,
                        "max_concurrency": ray_settings.max_in_flight_per_actor,
                        "max_restarts": 0,
                    },
                    args=(models_path, name, actor_runtime),
                    gate=threading.BoundedSemaphore(ray_settings.max_in_flight_per_actor),
                )
                for k in range(count)
            ]

    @classmethod
    def start(cls, settings: Settings, registry: Registry) -> RayExecutor:
        """Connect to Ray, start every model's actors and wait until each has its model.

        Raises
        ------
        aenode.errors.ConfigError
            Naming ``runtime.ray.address`` (unreachable), ``runtime.ray.resources`` (more
            than the cluster has) or ``runtime.device`` (an actor could not load its model).
        """
        owns = connect(settings)
        try:
            executor = cls(settings, registry, owns)
            executor._start_all()
        except BaseException:
            if owns:
                ray.shutdown()
            raise
        return executor

    # -- actors ---------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> Any:
        actor = ray.remote(ModelActor).options(name=slot.name, **slot.options)
        deadline = time.monotonic() + 15.0
        while True:
            try:
                return actor.remote(*slot.args)
            except ValueError as exc:  # the name is taken: a node just killed, or another node
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"runtime.ray.namespace: actor name {slot.name!r} is taken in "
                        f"namespace {slot.options['namespace']!r} (give each node its own "
                        f"namespace): {exc}"
                    ) from None
                time.sleep(0.5)

    def _start_all(self) -> None:
        slots = [s for pool in self._pools.values() for s in pool]
        for slot in slots:
            slot.handle = self._spawn(slot)
        refs = {slot.name: slot.handle.describe.remote() for slot in slots}
        deadline = time.monotonic() + START_TIMEOUT
        for slot in slots:
            try:
                slot.info = ray.get(refs[slot.name], timeout=max(1.0, deadline - time.monotonic()))
            except ray_errors.GetTimeoutError:
                raise ConfigError(
                    f"runtime.ray.resources.{slot.model}: actor {slot.name} did not start within "
                    f"{START_TIMEOUT:g} s (the cluster at {self._address} may lack "
                    f"{slot.options['num_gpus']:g} GPU / {slot.options['num_cpus']:g} CPU free)"
                ) from None
            except (ray_errors.RayError, InputError) as exc:
                raise ConfigError(
                    f"runtime.device: actor {slot.name} could not load model {slot.model}: "
                    f"{_cause(exc)}"
                ) from None
            log.info(
                "ray actor %s ready on %s (devices %s, GPU ids %s)",
                slot.name,
                slot.info.get("node_ip"),
                slot.info.get("devices"),
                slot.info.get("gpu_ids"),
                extra={"model": slot.model},
            )

    def _restart(self, slot: _Slot, lost: Any, exc: BaseException) -> None:
        """Replace the actor ``lost`` (once, whichever caller sees it first)."""
        with self._lock:
            if slot.handle is not lost or self._closed:
                return
            slot.restarts += 1
            slot.info = {}
            try:
                ray.kill(lost, no_restart=True)
            except (ray_errors.RayError, ValueError):
                pass  # dead already
            slot.handle = self._spawn(slot)
            fresh = slot.handle
        log.warning(
            "ray actor %s lost (%s): started again (restart %d)",
            slot.name,
            type(exc).__name__,
            slot.restarts,
            extra={"model": slot.model},
        )
        threading.Thread(
            target=self._await_ready, args=(slot, fresh), name=f"ray-{slot.name}", daemon=True
        ).start()

    def _await_ready(self, slot: _Slot, fresh: Any) -> None:
        """Record where a restarted actor runs once it has loaded its model (describe())."""
        try:
            info = ray.get(fresh.describe.remote(), timeout=START_TIMEOUT)
        except (ray_errors.RayError, InputError) as exc:
            log.error("ray actor %s did not come back: %s", slot.name, _cause(exc))
            return
        with self._lock:
            if slot.handle is fresh:
                slot.info = info

    def _take(self, model: str, deadline: float) -> _Slot:
        """The pool's actor with the fewest jobs in flight and a free place, waiting for one."""
        pool = self._pools[model]
        with self._freed:
            while True:
                for slot in sorted(pool, key=lambda s: s.in_flight):
                    if slot.gate.acquire(blocking=False):
                        slot.in_flight += 1
                        return slot
                left = deadline - time.monotonic()
                if left <= 0:
                    raise InferenceError(
                        f"model {model!r}: every actor busy for "
                        f"{self.settings.runtime.job_timeout_seconds:g} s "
                        "(runtime.job_timeout_seconds)"
                    )
                self._freed.wait(left)

    def _give_back(self, slot: _Slot) -> None:
        with self._freed:
            slot.in_flight -= 1
            slot.gate.release()
            self._freed.notify()

    # -- the executor interface ----------------------------------------------------------

    def infer(
        self, model: str, volumes: Mapping[str, Volume], *, fractional: bool = False
    ) -> Prediction:
        """Run ``model`` on one of its actors and wait for the prediction.

        Raises
        ------
        aenode.infer.runtime.InferenceError
            The model refused the input, or no result within ``runtime.job_timeout_seconds``.
        aenode.infer.executor.WorkerLost
            The actor (or its node) was lost mid-job; a fresh actor replaces it.
        """
        if self._closed:
            raise InferenceError(f"model {model!r}: the executor is closed")
        if model not in self._pools:
            raise InferenceError(
                f"model {model!r}: no Ray actor for it (models: {sorted(self._pools)})"
            )
        timeout = self.settings.runtime.job_timeout_seconds
        deadline = time.monotonic() + timeout
        slot = self._take(model, deadline)
        try:
            handle, name = slot.handle, slot.name
            shipped = _shippable(volumes, self.registry.get(model).is_python)
            ref = handle.infer.remote(shipped, fractional)
            try:
                prediction, reason = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except ray_errors.GetTimeoutError:
                ray.cancel(ref)
                raise InferenceError(
                    f"model {model!r}: timed out after {timeout:g} s (runtime.job_timeout_seconds)"
                ) from None
            except LOST as exc:
                self._restart(slot, handle, exc)
                raise WorkerLost(
                    f"model {model!r}: Ray actor {name} lost mid-job "
                    f"({type(exc).__name__}); the job runs again"
                ) from exc
        finally:
            self._give_back(slot)
        if reason is not None:
            raise InferenceError(reason)
        if not isinstance(prediction, Prediction):
            raise InternalError(f"model {model!r}: actor {name} returned {type(prediction)}")
        prediction.extra.update(actor=name, node_ip=slot.info.get("node_ip"))
        return prediction

    def describe(self) -> dict[str, Any]:
        """``{"executor": "ray", "address": ..., "actors": [...]}``: each actor's model,
        name, jobs in flight, restarts, node and devices (no remote call)."""
        with self._lock:
            actors = [
                {
                    "name": slot.name,
                    "model": slot.model,
                    "in_flight": slot.in_flight,
                    "max_in_flight": self.settings.runtime.ray.max_in_flight_per_actor,
                    "restarts": slot.restarts,
                    "num_gpus": slot.options["num_gpus"],
                    "num_cpus": slot.options["num_cpus"],
                    "state": "ready" if slot.info else "starting",
                    **slot.info,
                }
                for pool in self._pools.values()
                for slot in pool
            ]
        return {
            "executor": "ray",
            "address": self._address,
            "namespace": self.settings.runtime.ray.namespace,
            "actors": actors,
        }

    def actor(self, name: str) -> Any:
        """The handle of actor ``name`` (``<model>-<n>``), as :meth:`describe` lists it."""
        for pool in self._pools.values():
            for slot in pool:
                if slot.name == name:
                    return slot.handle
        raise KeyError(name)

    def close(self) -> None:
        """Stop every actor; leave Ray if :meth:`start` joined it. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handles = [s.handle for pool in self._pools.values() for s in pool if s.handle]
        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except (ray_errors.RayError, ValueError):
                pass  # dead already
        if self.owns_ray:
            ray.shutdown()


def _shippable(volumes: Mapping[str, Volume], is_python: bool) -> dict[str, Volume]:
    """The volumes as the actor needs them: a torch model reads the image only, so the
    per-slice headers stay in the node; a python model gets them all."""
    if is_python:
        return dict(volumes)
    return {role: dataclasses.replace(v, datasets=[]) for role, v in volumes.items()}


def _cause(exc: BaseException) -> str:
    """The first line of what went wrong inside an actor (Ray wraps it with a traceback)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
