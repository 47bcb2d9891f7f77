"""The inference runtime: one worker thread per device, models kept warm between jobs.

:meth:`Runtime.predict` may be called from any thread; it queues the job on a device
worker (``cuda:N`` for each GPU, else the CPU) and waits at most
``runtime.job_timeout_seconds`` (counted from submission). A worker takes several queued
jobs of the same model and input shape at once and runs them as one batch (up to the
card's ``runtime.batch_size``); volumes larger than the card's patch go through MONAI's
sliding window. Inputs are oriented, resampled, normalised and padded (to exactly
``pad_to`` when the card has a fixed input size) as the card says; roles become channels in
card order, a missing optional role an all-zero channel (and a 0 presence channel with
``inputs.presence_channels``). Outputs go through the card's head and are put back on the
grid of the reference role's volume. A python-format model (``runtime.format: python``)
runs on the same workers, one job at a time per model: its entry point gets the role
volumes as they are and returns the :class:`~aenode.records.Prediction`, whose label map the
runtime checks against the reference grid and the card's labels; an
:class:`~aenode.errors.InputError` it raises becomes the job's reason. The contract is
written in ``docs/models.md``. A
failing job raises :class:`InferenceError` naming model and reason; the worker goes on.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from aenode.config import ConfigError, RuntimeSettings
from aenode.errors import InputError
from aenode.infer.cards import ModelCard
from aenode.infer.findings import findings_for
from aenode.infer.forward import class_scores, predict_probs
from aenode.infer.preprocess import Prepared, prepare, restore_labels, restore_probs
from aenode.infer.registry import Registry
from aenode.process import resolve_threads
from aenode.records import Prediction, Volume

__all__ = ["InferenceError", "Runtime", "resolve_devices"]

log = logging.getLogger(__name__)


class InferenceError(InputError):
    """A job the model could not run on (shape, roles, timeout); names the model and why."""


def resolve_devices(setting: str) -> list[torch.device]:
    """The devices to start workers on.

    Parameters
    ----------
    setting : str
        ``runtime.device``: ``auto`` (every CUDA device, else the CPU), ``cpu`` or ``cuda``.

    Returns
    -------
    list of torch.device

    Raises
    ------
    aenode.config.ConfigError
        If ``cuda`` is asked for and torch sees no CUDA device.
    """
    cuda = torch.cuda.is_available()
    if setting == "cuda" and not cuda:
        raise ConfigError("runtime.device: cuda requested but torch.cuda.is_available() is False")
    if setting in ("auto", "cuda") and cuda:
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


@dataclass
class _Job:
    model: str
    volumes: Mapping[str, Volume]
    fractional: bool
    future: Future[Prediction]
    submitted: float
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Ready:
    job: _Job
    reference: str
    prepared: Prepared
    array: np.ndarray  # (channels, z, y, x)
    preprocess_s: float
    notes: list[str] = field(default_factory=list)


_STOP = object()


class _Worker:
    def __init__(
        self,
        device: torch.device,
        registry: Registry,
        settings: RuntimeSettings,
        locks: Mapping[str, threading.Lock],
    ):
        self.device = device
        self.registry = registry
        self.settings = settings
        self.locks = locks  # python models: one job at a time across all workers
        self.queue: queue.Queue[object] = queue.Queue()
        self.nets: dict[str, torch.nn.Module] = {}
        for name in registry.names():
            net = registry.get(name).network
            if net is None:  # format python: the module runs as it is
                continue
            self.nets[name] = net if device.type == "cpu" else copy.deepcopy(net).to(device)
        self.thread = threading.Thread(
            target=self._loop, name=f"aenode-infer-{device}", daemon=True
        )
        self.thread.start()

    # -- the worker thread ------------------------------------------------------------
    def _loop(self) -> None:
        # torch's thread count is kept per OS thread: the worker takes the process's
        # setting (aenode.process.apply_process_settings) for itself.
        torch.set_num_threads(resolve_threads(self.settings))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        pending: list[_Job] = []
        while True:
            item = pending.pop(0) if pending else self.queue.get()
            if item is _STOP:
                return
            assert isinstance(item, _Job)
            if item.model in self.locks:
                self._run_python(item)
                continue
            batch, pending = self._gather(item, pending)
            if batch:
                self._run_batch(batch)

    def _gather(self, first: _Job, pending: list[_Job]) -> tuple[list[_Ready], list[_Job]]:
        """``first`` plus queued jobs of the same model and input shape, prepared."""
        ready: list[_Ready] = []
        card = self.registry.card(first.model) if first.model in self.registry else None
        limit = card.runtime.batch_size if card is not None else 1
        candidates = [first]
        while len(candidates) < limit:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if (
                item is _STOP
                or not isinstance(item, _Job)
                or item.model != first.model
                or item.model in self.locks
            ):
                pending.append(item)  # type: ignore[arg-type]
                break
            candidates.append(item)
        for job in candidates:
            if job.cancelled.is_set() or job.future.done():
                continue
            try:
                prepared = self._prepare(job)
            except Exception as exc:  # each job fails on its own, the worker goes on
                _fail(job, exc)
                continue
            if ready and prepared.array.shape != ready[0].array.shape:
                pending.insert(0, job)  # different shape: run it in the next batch
                continue
            ready.append(prepared)
        return ready, pending

    def _run_python(self, job: _Job) -> None:
        """Call a python-format model's entry point on one job and check what it returns."""
        if job.cancelled.is_set() or job.future.done():
            return
        t0 = time.perf_counter()
        try:
            loaded = self.registry.get(job.model)
            card = loaded.card
            reference = _reference_role(card, job.volumes, job.model)
            function = getattr(loaded.module, card.runtime.entry_function or "predict")
            with self.locks[job.model]:
                t1 = time.perf_counter()
                result = function(dict(job.volumes), loaded.state, card)
                infer_s = time.perf_counter() - t1
            prediction = _checked(card, result, job.volumes, reference)
        except InputError as exc:  # the model refuses its input: the reason, as it says it
            _fail(
                job,
                exc
                if isinstance(exc, InferenceError)
                else InferenceError(f"model {job.model!r}: {exc}"),
            )
            return
        except Exception as exc:  # a bug in the model's code: logged with its traceback
            log.exception("python model %s failed", job.model, extra={"model": job.model})
            _fail(job, exc)
            return
        prediction.timings.update(
            queue=round(t0 - job.submitted, 4), preprocess=0.0, infer=round(infer_s, 4)
        )
        prediction.extra.update(device=str(self.device), batch=1)
        if not job.future.done():
            job.future.set_result(prediction)

    def _prepare(self, job: _Job) -> _Ready:
        t0 = time.perf_counter()
        card = self.registry.card(job.model)
        reference = _reference_role(card, job.volumes, job.model)
        ref_image = job.volumes[reference].image
        spec = card.inputs.preprocessing
        fixed = card.fixed_size is not None
        prepared_ref = prepare(ref_image, spec, fixed=fixed)
        notes = []
        if prepared_ref.cropped:
            kept = [r.stop - r.start for r in reversed(prepared_ref.region or ())]
            outside = ", outside is background" if card.task == "segmentation" else ""
            notes.append(
                f"input centre-cropped to inputs.preprocessing.pad_to {spec.pad_to} (x, y, z); "
                f"kept {kept} of {list(prepared_ref.grid.GetSize())} voxels{outside}"
            )
        channels = []
        presence = []
        for role in card.inputs.roles:
            if role.name == reference:
                channels.append(prepared_ref.array)
            elif role.name in job.volumes:
                img = sitk.Resample(
                    sitk.Cast(job.volumes[role.name].image, sitk.sitkFloat32),
                    ref_image,
                    sitk.Transform(),
                    sitk.sitkLinear,
                    0.0,
                )
                channels.append(prepare(img, spec, fixed=fixed).array)
            else:
                channels.append(np.zeros_like(prepared_ref.array))
                notes.append(f"optional role {role.name!r} missing: its channel is all zeros")
            if not role.required:
                presence.append(1.0 if role.name in job.volumes else 0.0)
        if card.inputs.presence_channels:
            channels += [np.full_like(prepared_ref.array, value) for value in presence]
        array = np.stack(channels).astype(np.float32)
        return _Ready(job, reference, prepared_ref, array, time.perf_counter() - t0, notes)

    def _run_batch(self, batch: list[_Ready]) -> None:
        name = batch[0].job.model
        card = self.registry.card(name)
        t0 = time.perf_counter()
        try:
            x = torch.from_numpy(np.stack([r.array for r in batch])).to(self.device)
            autocast = self.device.type == "cuda" and self.settings.mixed_precision
            net = self.nets[name]
            if card.task == "segmentation":
                probs = predict_probs(net, x, card.runtime, autocast=autocast).cpu().numpy()
            else:
                assert card.outputs.head is not None  # the card validator requires it
                scores = class_scores(net, x, card.runtime, card.outputs.head, autocast=autocast)
                probs = scores.cpu().numpy()
        except Exception as exc:  # the whole batch failed; each caller gets the reason
            for r in batch:
                _fail(r.job, exc)
            return
        infer_s = (time.perf_counter() - t0) / len(batch)
        for r, p in zip(batch, probs, strict=True):
            try:
                prediction = self._postprocess(card, r, p)
                prediction.timings.update(
                    queue=round(t0 - r.job.submitted - r.preprocess_s, 4),
                    preprocess=round(r.preprocess_s, 4),
                    infer=round(infer_s, 4),
                )
                prediction.extra.update(device=str(self.device), batch=len(batch))
                prediction.notes[:0] = r.notes
                if not r.job.future.done():
                    r.job.future.set_result(prediction)
            except Exception as exc:
                _fail(r.job, exc)

    def _postprocess(self, card: ModelCard, ready: _Ready, probs: np.ndarray) -> Prediction:
        t0 = time.perf_counter()
        ref_image = ready.job.volumes[ready.reference].image
        if card.task == "classification":
            values = probs.reshape(-1)
            names = [c.name for c in card.outputs.classes]
            if values.size != len(names):
                raise ValueError(
                    f"network gives {values.size} outputs for {len(names)} outputs.classes"
                )
            scores = {n: float(v) for n, v in zip(names, values, strict=True)}
            return Prediction(
                model=card.name,
                version=card.version,
                task=card.task,
                class_probabilities=scores,
                findings=findings_for(card, scores),
                reference_role=ready.reference,
                timings={"postprocess": round(time.perf_counter() - t0, 4)},
            )
        n_labels = len(card.outputs.labels)
        if probs.shape[0] != n_labels + 1:
            raise ValueError(
                f"network gives {probs.shape[0]} channels for {n_labels} labels + background"
            )
        if probs.shape[1:] != ready.array.shape[1:]:
            raise ValueError(
                f"network output grid {probs.shape[1:]} differs from its input "
                f"{ready.array.shape[1:]} (z, y, x)"
            )
        index = probs.argmax(0).astype(np.uint8)
        values = np.array([0, *(label.value for label in card.outputs.labels)], np.uint8)
        labels = restore_labels(values[index], ready.prepared, ref_image)
        fractional = (
            restore_probs(probs[1:], ready.prepared, ref_image) if ready.job.fractional else None
        )
        return Prediction(
            model=card.name,
            version=card.version,
            task=card.task,
            labels=labels,
            probabilities=fractional,
            reference_role=ready.reference,
            timings={"postprocess": round(time.perf_counter() - t0, 4)},
        )


def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def _checked(
    card: ModelCard, result: object, volumes: Mapping[str, Volume], reference: str
) -> Prediction:
    """A python model's return value, checked against the card and the reference grid."""
    name = card.name
    if not isinstance(result, Prediction):
        raise InferenceError(
            f"model {name!r}: {card.runtime.entry_point} returned {type(result).__name__}, "
            "not an aenode.records.Prediction"
        )
    if result.reference_role not in volumes:
        result.reference_role = reference
    result.model, result.version, result.task = card.name, card.version, card.task
    labels = result.labels
    if labels is None:
        if card.task == "segmentation":
            raise InferenceError(f"model {name!r}: a segmentation model returned no labels")
        return result
    if not isinstance(labels, sitk.Image) or labels.GetPixelID() != sitk.sitkUInt8:
        raise InferenceError(f"model {name!r}: Prediction.labels must be a uint8 SimpleITK image")
    grid = volumes[result.reference_role].image
    if not _same_grid(labels, grid):
        raise InferenceError(
            f"model {name!r}: Prediction.labels {list(labels.GetSize())} is not on the grid of "
            f"role {result.reference_role!r} {list(grid.GetSize())} (size, spacing, origin, "
            "direction must match)"
        )
    allowed = {0, *(label.value for label in card.outputs.labels)}
    found = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels))}
    if found - allowed:
        raise InferenceError(
            f"model {name!r}: label values {sorted(found - allowed)} are not in outputs.labels"
        )
    return result


def _reference_role(card: ModelCard, volumes: Mapping[str, Volume], model: str) -> str:
    missing = [r.name for r in card.inputs.roles if r.required and r.name not in volumes]
    if missing:
        raise InferenceError(f"model {model!r}: missing required input role(s) {missing}")
    unknown = sorted(set(volumes) - {r.name for r in card.inputs.roles})
    if unknown:
        raise InferenceError(f"model {model!r}: unknown input role(s) {unknown}")
    return next(r.name for r in card.inputs.roles if r.name in volumes)


def _fail(job: _Job, exc: BaseException) -> None:
    reason = str(exc) if isinstance(exc, InferenceError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, InferenceError):
        error = exc
    else:
        error = InferenceError(f"model {job.model!r}: {reason}")
    log.error("inference failed: %s", reason, extra={"model": job.model})
    if not job.future.done():
        job.future.set_exception(error)


class Runtime:
    """Device workers holding the registry's models warm.

    Parameters
    ----------
    registry : Registry
        The loaded models.
    settings : aenode.config.RuntimeSettings
        ``device``, ``job_timeout_seconds`` and ``mixed_precision`` (CUDA only; the CPU
        path runs float32). Threads and determinism are process-wide:
        :func:`aenode.process.apply_process_settings`.
    """

    def __init__(self, registry: Registry, settings: RuntimeSettings) -> None:
        self.registry = registry
        self.settings = settings
        self.devices = resolve_devices(settings.device)
        locks = {
            name: threading.Lock() for name in registry.names() if registry.get(name).is_python
        }
        self._workers = [_Worker(d, registry, settings, locks) for d in self.devices]
        self._next = 0
        self._lock = threading.Lock()
        self._closed = False

    def predict(
        self, model: str, volumes: Mapping[str, Volume], *, fractional: bool = False
    ) -> Prediction:
        """Run a model on its input volumes and wait for the result.

        Parameters
        ----------
        model : str
            A loaded model's name.
        volumes : Mapping[str, Volume]
            Input role name to volume (``{"image": volume}`` for single-series models).
        fractional : bool
            Also return per-label probabilities on the reference grid.

        Returns
        -------
        aenode.records.Prediction
            Labels (uint8) on the grid of the reference (first present) role's volume.

        Raises
        ------
        InferenceError
            If the model is unknown, a required role is missing, the job fails, or it does
            not finish within ``job_timeout_seconds`` of submission; the message names the
            model and the reason.
        """
        if self._closed:
            raise InferenceError(f"model {model!r}: the runtime is closed")
        if model not in self.registry:
            raise InferenceError(
                f"model {model!r}: not in the registry (loaded: {self.registry.names()})"
            )
        _reference_role(self.registry.card(model), volumes, model)
        timeout = self.settings.job_timeout_seconds
        now = time.perf_counter()
        job = _Job(model, volumes, fractional, Future(), now, now + timeout)
        with self._lock:
            n = len(self._workers)
            order = [self._workers[(self._next + i) % n] for i in range(n)]
            worker = min(order, key=lambda w: w.queue.qsize())
            self._next = (self._workers.index(worker) + 1) % n
        worker.queue.put(job)
        try:
            return job.future.result(timeout=timeout)
        except FutureTimeout:
            job.cancelled.set()
            raise InferenceError(
                f"model {model!r}: timed out after {timeout:g} s (runtime.job_timeout_seconds)"
            ) from None

    def close(self) -> None:
        """Stop the workers after the jobs already queued; idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.queue.put(_STOP)
        for w in self._workers:
            w.thread.join()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
