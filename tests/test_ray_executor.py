"""``runtime.executor: ray`` end to end: a real local Ray, ``aenode serve``, Orthanc as the PACS.

One Ray per module, started here as the issue asks (``ray.init(num_cpus=2, num_gpus=1)``: the
GPU is a resource only, torch runs on the CPU), and one node connected to it by address. The
node runs two models, each on its own actor: the shipped hippocampus model on Study1's
HippoCrop series (the results must equal the local executor's) and a python-format model
that sleeps mid-inference, whose actor the test kills with ``ray.kill`` while it runs: the job
runs again on a fresh actor and the PACS ends with exactly one set of its results.
"""

from __future__ import annotations

import hashlib
import io
import json
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from conftest import ROOT
from orthanc import Orthanc
from test_e2e import SC, SEG, SR, _sr_volumes
from test_receive import NodeProcess, storescu

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: pip install 'aenode[ray]' (make install does)"
)

pytestmark = [pytest.mark.network, pytest.mark.slow]

NAMESPACE = "aenode-test"

SLOW = textwrap.dedent(
    """
    import time

    import numpy as np
    import SimpleITK as sitk

    from aenode.records import Prediction


    def predict(volumes, state, card):
        params = card.runtime.parameters
        with open(params["marker"], "a+") as fh:  # the test kills the actor once this appears
            fh.seek(0)
            first = not fh.read()
            fh.write("called\\n")
        if first:  # killed in here; the rerun goes straight on
            time.sleep(params["sleep"])
        image = volumes["image"].image
        array = sitk.GetArrayFromImage(image)
        labels = sitk.GetImageFromArray((array > np.percentile(array, 90)).astype(np.uint8))
        labels.CopyInformation(image)
        return Prediction(model="", version="", task="", labels=labels)
    """
)


def _slow_package(models: Path, marker: Path) -> None:
    folder = models / "slow-bright"
    folder.mkdir(parents=True)
    source = folder / "slow.py"
    source.write_text(SLOW)
    card = {
        "name": "slow-bright",
        "version": "0.1.0",
        "task": "segmentation",
        "description": "the brightest tenth of the image, slowly (tests only)",
        "intended_use": "tests only",
        "inputs": {"modality": "MR", "preprocessing": {"intensity": "none"}},
        "outputs": {
            "labels": [
                {
                    "value": 1,
                    "name": "Bright",
                    "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical"},
                    "type": {"value": "5366008", "scheme": "SCT", "meaning": "Hippocampus"},
                    "color": [255, 0, 0],
                }
            ]
        },
        "runtime": {
            "format": "python",
            "entry_point": "slow.py:predict",
            "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "parameters": {"marker": str(marker), "sleep": 60.0},
            "warmup": False,
        },
        "resources": {"num_cpus": 0.5},
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray for this module: 2 CPUs and one fake GPU, no dashboard."""
    ray.init(
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        namespace=NAMESPACE,
        logging_level="WARNING",
    )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


def _executor(node: NodeProcess) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((node.storage / "executor.json").read_text())
    return data


def _aenode_objects(orthanc: Orthanc, study_uid: str, model: str) -> dict[str, list[str]]:
    """SOP class -> SOP Instance UIDs of ``model``'s results in Orthanc's copy of the study."""
    found: dict[str, list[str]] = {}
    for inst in orthanc.study_instances(study_uid):
        tags = orthanc.instance_tags(inst["ID"])
        if str(tags.get("SeriesDescription", "")).startswith(f"AI {model} "):
            found.setdefault(tags["SOPClassUID"], []).append(tags["SOPInstanceUID"])
    return found


def _wait(what: str, check: Any, node: NodeProcess, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    jobs = [dict(j) for j in node.query("SELECT id, model, state, reason FROM jobs")]
    pytest.fail(f"{what} not within {timeout} s; jobs {jobs}\n{node.log_text()[-6000:]}")


def _local_reference(crop: Path) -> tuple[np.ndarray, dict[str, float]]:
    """The local executor's SEG pixels and volumes for the HippoCrop series."""
    from aenode.config import ModelsSettings, ResultsSettings, RuntimeSettings
    from aenode.infer.executor import LocalExecutor
    from aenode.infer.registry import Registry
    from aenode.infer.runtime import Runtime
    from aenode.results import build_seg, label_volumes_mm3
    from aenode.volume import build_volume_from_files

    registry = Registry.load(ModelsSettings(path=ROOT / "models", enabled=["hippocampus"]))
    volume = build_volume_from_files(sorted(crop.glob("*.dcm")))
    executor = LocalExecutor(Runtime(registry, RuntimeSettings(device="cpu", threads=1)))
    try:
        prediction = executor.infer("hippocampus", {"image": volume})
    finally:
        executor.close()
    card = registry.card("hippocampus")
    seg = build_seg(volume, prediction, card, ResultsSettings())
    return np.asarray(seg.pixel_array), label_volumes_mm3(prediction, card)


def test_serve_on_ray_matches_local_and_survives_a_killed_actor(
    tmp_path: Path, data_dir: Path, ray_address: str
) -> None:
    crop = data_dir / "udacity-mr" / "Study1" / "13_HCropVolume"
    models = tmp_path / "models"
    models.mkdir()
    (models / "hippocampus").symlink_to(ROOT / "models" / "hippocampus")
    marker = tmp_path / "slow-calls.txt"
    _slow_package(models, marker)
    orthanc = Orthanc(tmp_path / "orthanc").start()
    (tmp_path / "node").mkdir()
    crop_rule = {"all": [{"tag": "SeriesDescription", "regex": "HippoCrop"}]}
    node = NodeProcess(
        tmp_path / "node",
        {
            "models": {"path": str(models), "enabled": None},
            "runtime": {
                "executor": "ray",
                "threads": 1,
                "ray": {
                    "address": ray_address,
                    "namespace": NAMESPACE,
                    "resources": {"hippocampus": {"num_gpus": 0.5}},
                },
            },
            "selection": {
                "rules": [
                    {"name": "hippocampus", "models": ["hippocampus"], "series": crop_rule},
                    {"name": "slow", "models": ["slow-bright"], "series": crop_rule},
                ]
            },
            "series": {"quiet_seconds": 2.0},
            "export": {
                "destinations": [
                    {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
                ],
                "retry": {"initial_seconds": 1.0, "max_interval_seconds": 2.0},
            },
            "logging": {"level": "INFO"},
        },
    )
    try:
        node.start(timeout=240)
        # A second model gets its own actor; the hippocampus one holds half the fake GPU.
        actors = {a["model"]: a for a in _executor(node)["actors"]}
        assert set(actors) == {"hippocampus", "slow-bright"}
        assert actors["hippocampus"]["pid"] != actors["slow-bright"]["pid"]
        assert actors["hippocampus"]["gpu_ids"] == ["0"]
        assert actors["slow-bright"]["gpu_ids"] == []
        assert all(a["state"] == "ready" for a in actors.values())

        result = storescu(node.port, crop, opts=("+sd",))
        assert result.returncode == 0, result.stderr
        # Kill the slow model's actor while its job is inside the model.
        _wait("slow model called", lambda: marker.exists(), node, 120)
        victim = ray.get_actor(actors["slow-bright"]["name"], namespace=NAMESPACE)
        ray.kill(victim)

        def both_done() -> bool:
            rows = node.query("SELECT state FROM jobs")
            return len(rows) == 2 and all(r["state"] == "done" for r in rows)

        _wait("both jobs done", both_done, node, 180)
        study_uid = str(pydicom.dcmread(next(crop.glob("*.dcm"))).StudyInstanceUID)
        # Ran twice (killed, then on the fresh actor); one set of its results in the PACS.
        assert marker.read_text().count("called") == 2
        slow = _aenode_objects(orthanc, study_uid, "slow-bright")
        assert {k: len(v) for k, v in slow.items()} == {SEG: 1, SC: 1, SR: 1}
        log = node.log_text()
        assert "lost mid-job (ActorDiedError)" in log
        restarted = {a["model"]: a for a in _executor(node)["actors"]}["slow-bright"]
        assert restarted["restarts"] == 1 and restarted["name"].endswith(".r1")

        # The hippocampus results equal the local executor's.
        hippo = _aenode_objects(orthanc, study_uid, "hippocampus")
        assert {k: len(v) for k, v in hippo.items()} == {SEG: 1, SC: 1, SR: 1}
        job_dir = Path(
            node.query("SELECT result_dir FROM jobs WHERE model='hippocampus'")[0]["result_dir"]
        )
        pixels, volumes = _local_reference(crop)
        seg = pydicom.dcmread(job_dir / "seg.dcm")
        assert np.array_equal(np.asarray(seg.pixel_array), pixels)
        assert seg.SOPInstanceUID == hippo[SEG][0]
        sr_volumes = _sr_volumes(pydicom.dcmread(io.BytesIO((job_dir / "sr.dcm").read_bytes())))
        assert sr_volumes == pytest.approx(
            {f"{name} volume": v for name, v in volumes.items()}, rel=1e-6
        )
        assert min(volumes.values()) > 100  # a real segmentation, not two empty ones

        # A graceful stop takes the node's actors with it.
        assert node.stop() == 0
        for name in (actors["hippocampus"]["name"], restarted["name"]):
            with pytest.raises(ValueError):
                ray.get_actor(name, namespace=NAMESPACE)
    finally:
        node.stop()
        orthanc.stop()


def test_more_gpus_than_the_cluster_has_names_the_resource(ray_address: str) -> None:
    from aenode.config import ModelsSettings, Settings
    from aenode.errors import ConfigError
    from aenode.infer.registry import Registry
    from aenode.infer.start import open_executor

    registry = Registry.load(ModelsSettings(path=ROOT / "models", enabled=["hippocampus"]))
    settings = Settings.model_validate(
        {
            "runtime": {
                "executor": "ray",
                "ray": {"address": ray_address, "resources": {"hippocampus": {"num_gpus": 2}}},
            }
        }
    )
    with pytest.raises(
        ConfigError,
        match=r"runtime\.ray\.resources\.hippocampus\.num_gpus: an actor asks for 2 but the Ray "
        r"cluster at .* has 1 in all",
    ):
        open_executor(settings, registry)
    assert ray.is_initialized()  # the test's Ray is left as it was
