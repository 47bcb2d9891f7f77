"""The runtime: warm device workers, geometry back on the input grid, failures and timeouts.

Inputs are real: HippoCrop DICOM series of ../shared/data/udacity-mr and Decathlon NIfTI
cases of ../shared/data/msd-hippocampus.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from aenode.config import ConfigError, ModelsSettings, RuntimeSettings
from aenode.infer.registry import Registry
from aenode.infer.runtime import InferenceError, Runtime, resolve_devices
from aenode.records import SeriesInfo, Volume
from aenode.volume import build_volume_from_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load(ModelsSettings(path=ROOT / "models"))


@pytest.fixture(scope="module")
def runtime(registry: Registry) -> Iterator[Runtime]:
    rt = Runtime(registry, RuntimeSettings(device="cpu", threads=2))
    yield rt
    rt.close()


def _hippocrop(data_dir: Path, study: str) -> Volume:
    folder = next((data_dir / "udacity-mr" / study).glob("*HCropVolume"))
    return build_volume_from_files(sorted(folder.glob("*.dcm")))


def _nifti(data_dir: Path, case: str) -> Volume:
    image = sitk.ReadImage(str(data_dir / "msd-hippocampus" / "imagesTr" / f"{case}.nii.gz"))
    info = SeriesInfo("", case, 0, "MR", case, ())
    return Volume(image=image, series=info)


def test_labels_come_back_on_the_dicom_grid(runtime: Runtime, data_dir: Path) -> None:
    volume = _hippocrop(data_dir, "Study1")
    pred = runtime.predict("hippocampus", {"image": volume})
    assert pred.labels is not None
    image = volume.image
    assert pred.labels.GetSize() == image.GetSize()
    assert pred.labels.GetOrigin() == pytest.approx(image.GetOrigin())
    assert pred.labels.GetSpacing() == pytest.approx(image.GetSpacing())
    assert pred.labels.GetDirection() == pytest.approx(image.GetDirection())
    assert pred.labels.GetPixelID() == sitk.sitkUInt8
    values = set(np.unique(sitk.GetArrayFromImage(pred.labels)).tolist())
    assert values == {0, 1, 2}
    assert pred.probabilities is None
    assert pred.model == "hippocampus" and pred.task == "segmentation"
    assert set(pred.timings) >= {"preprocess", "infer", "postprocess", "queue"}


def test_fractional_probabilities_agree_with_labels(runtime: Runtime, data_dir: Path) -> None:
    volume = _nifti(data_dir, "hippocampus_001")
    pred = runtime.predict("hippocampus", {"image": volume}, fractional=True)
    assert pred.labels is not None and pred.probabilities is not None
    labels = sitk.GetArrayFromImage(pred.labels)
    probs = pred.probabilities
    assert probs.dtype == np.float32
    assert probs.shape == (2, *labels.shape)
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    assert probs.sum(axis=0).max() <= 1.0 + 1e-5
    # where a label wins, its probability beats the other label's and background's
    for value in (1, 2):
        inside = labels == value
        assert (probs[value - 1][inside] > 0.33).all()
        assert probs[value - 1][inside].mean() > 0.8


def test_cpu_results_are_deterministic_and_batched_jobs_equal_single(
    runtime: Runtime, data_dir: Path
) -> None:
    volumes = [_nifti(data_dir, c) for c in ("hippocampus_001", "hippocampus_003")]
    single = [
        sitk.GetArrayFromImage(runtime.predict("hippocampus", {"image": v}).labels) for v in volumes
    ]
    results: dict[int, np.ndarray] = {}
    batches: dict[int, int] = {}

    def submit(i: int) -> None:
        pred = runtime.predict("hippocampus", {"image": volumes[i % 2]})
        results[i] = sitk.GetArrayFromImage(pred.labels)
        batches[i] = pred.extra["batch"]

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    for i, labels in results.items():
        np.testing.assert_array_equal(labels, single[i % 2])
    assert max(batches.values()) > 1  # queued jobs of one model ran together


def test_failing_job_names_model_and_runtime_survives(runtime: Runtime, data_dir: Path) -> None:
    flat = Volume(sitk.Image([8, 8], sitk.sitkFloat32), SeriesInfo("", "", 0, "", "", ()))
    with pytest.raises(InferenceError, match=r"model 'hippocampus': .*input volume is 2-D \(8x8\)"):
        runtime.predict("hippocampus", {"image": flat})
    pred = runtime.predict("hippocampus", {"image": _nifti(data_dir, "hippocampus_003")})
    assert pred.labels is not None


def test_bad_requests_are_named(runtime: Runtime, data_dir: Path) -> None:
    volume = _nifti(data_dir, "hippocampus_001")
    with pytest.raises(InferenceError, match=r"model 'lungs': not in the registry"):
        runtime.predict("lungs", {"image": volume})
    with pytest.raises(InferenceError, match=r"missing required input role\(s\) \['image'\]"):
        runtime.predict("hippocampus", {"t1": volume})


def test_job_timeout(registry: Registry, data_dir: Path) -> None:
    settings = RuntimeSettings(device="cpu", job_timeout_seconds=0.001)
    with Runtime(registry, settings) as rt:
        with pytest.raises(InferenceError, match=r"timed out after 0.001 s"):
            rt.predict("hippocampus", {"image": _nifti(data_dir, "hippocampus_001")})
    with pytest.raises(InferenceError, match="the runtime is closed"):
        rt.predict("hippocampus", {"image": _nifti(data_dir, "hippocampus_001")})


def test_cuda_setting_without_a_device() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert resolve_devices("auto") == [torch.device("cpu")]
    with pytest.raises(ConfigError, match=r"runtime.device: cuda requested"):
        resolve_devices("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.is_available() is False")
def test_gpu_matches_cpu(registry: Registry, runtime: Runtime, data_dir: Path) -> None:
    volume = _hippocrop(data_dir, "Study2")
    cpu = sitk.GetArrayFromImage(runtime.predict("hippocampus", {"image": volume}).labels)
    with Runtime(registry, RuntimeSettings(device="cuda", mixed_precision=True)) as rt:
        pred = rt.predict("hippocampus", {"image": volume})
    assert pred.extra["device"].startswith("cuda")
    gpu = sitk.GetArrayFromImage(pred.labels)
    for value in (1, 2):
        a, b = cpu == value, gpu == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.98
