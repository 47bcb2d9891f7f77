"""Warm-up at start-up: one synthetic job per model through volume, inference and writers.

The first real job after a start otherwise pays for torch's first kernels, highdicom's
lazily loaded IOD tables and font loading (about 2 s on 2 CPU cores). A small synthetic
MR series, written to a temporary folder and discarded, takes that cost before the first
study arrives. Nothing of it reaches the store, the spool or a destination.

A python-format model (``runtime.format: python``) is warmed the same way: its entry point
is called with the synthetic volume in every role, which takes its first-call costs (imports
done lazily, SimpleITK filters, a torch network it loaded). A model that cannot run on such
an input (a registration that needs a head, a minimum size) says ``runtime.warmup: false``
in its card and is skipped, with a log line; its state is warm from ``load`` anyway.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from aenode.config import ResultsSettings
from aenode.infer.executor import Executor, Predictor, WorkerLost, as_executor
from aenode.infer.registry import Registry
from aenode.infer.runtime import InferenceError
from aenode.records import Job
from aenode.results import ResultError, write_results
from aenode.volume import VolumeError, build_volume_from_files

__all__ = ["synthetic_series", "warm_up"]

log = logging.getLogger(__name__)


def synthetic_series(folder: Path, slices: int = 8, size: int = 24) -> list[Path]:
    """Write a small axial MR series of smooth synthetic pixels (for warm-up only).

    Parameters
    ----------
    folder : pathlib.Path
        Where the Part 10 files go (created).
    slices, size : int
        Number of slices and their rows/columns (1 mm voxels).

    Returns
    -------
    list of pathlib.Path
        The files, one per slice.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[0:size, 0:size]
    paths = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.SeriesDescription, ds.InstanceNumber = "MR", "aenode warm-up", k + 1
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            setattr(ds, keyword, "")
        for keyword in ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID"):
            setattr(ds, keyword, "")
        ds.AccessionNumber, ds.SeriesNumber, ds.Manufacturer = "", 1, "aenode"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        pixels = (1000 + 400 * np.sin(xx / 4.0 + k) * np.cos(yy / 5.0)).astype(np.uint16)
        ds.PixelData = pixels.tobytes()
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def warm_up(
    registry: Registry,
    runtime: Executor | Predictor,
    settings: ResultsSettings,
    failures: dict[str, str] | None = None,
) -> dict[str, float]:
    """Run one synthetic job per loaded model; failures are logged and change nothing.

    Parameters
    ----------
    registry : Registry
        The loaded models.
    runtime : Executor or Runtime
        Where the models run (a bare Runtime is wrapped in a ``LocalExecutor``).
    settings : ResultsSettings
        The result objects to build (written to a temporary folder, then deleted).
    failures : dict or None
        When given, model name -> reason is added for each model whose warm-up failed
        (``aenode serve`` refuses to start on them).

    Returns
    -------
    dict of str to float
        Seconds per model for the warm-up job (models whose warm-up failed are absent).
    """
    seconds: dict[str, float] = {}
    executor = as_executor(runtime)
    with tempfile.TemporaryDirectory(prefix="aenode-warmup-") as tmp:
        try:
            volume = build_volume_from_files(synthetic_series(Path(tmp) / "in"))
        except (VolumeError, OSError) as exc:
            log.warning("warm-up skipped: synthetic volume failed: %s", exc)
            return seconds
        for name in registry.names():
            card = registry.card(name)
            if card.runtime.format == "python" and not card.runtime.warmup:
                log.info(
                    "warm-up of model %s skipped (runtime.warmup: false)",
                    name,
                    extra={"model": name},
                )
                continue
            volumes = {role.name: volume for role in card.inputs.roles}
            job = Job(rule="warm-up", model=name, study_uid="", inputs={}, id=0)
            t0 = time.perf_counter()
            try:
                prediction = executor.infer(name, volumes)
                write_results(job, volumes, prediction, card, settings, Path(tmp) / name)
            except (InferenceError, WorkerLost, ResultError, ValueError, OSError) as exc:
                log.warning("warm-up of model %s failed: %s", name, exc, extra={"model": name})
                if failures is not None:
                    failures[name] = str(exc)
                continue
            seconds[name] = time.perf_counter() - t0
            log.info("model %s warm (%.2f s)", name, seconds[name], extra={"model": name})
    return seconds
