"""The executor boundary without a Ray cluster: settings, start-up errors, result UIDs, status."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import ROOT
from test_jobs_runner import _Registry
from test_results import CARD, HIPPO, box_mask, load_volume, prediction_for

from aenode.config import ModelsSettings, RuntimeSettings, Settings, load_settings
from aenode.errors import ConfigError
from aenode.infer.cards import ModelCard
from aenode.infer.executor import (
    LocalExecutor,
    WorkerLost,
    as_executor,
    read_executor_file,
    write_executor_file,
)
from aenode.infer.registry import Registry
from aenode.infer.start import open_executor
from aenode.jobs import JobRunner, get_job, record_job
from aenode.records import SeriesInfo, Volume
from aenode.results import ResultUids
from aenode.states import JobState
from aenode.store import Store


def test_env_overrides_reach_the_ray_keys_at_any_depth() -> None:
    settings = load_settings(
        None,
        {
            "AENODE_RUNTIME__EXECUTOR": "ray",
            "AENODE_RUNTIME__RAY__ADDRESS": "127.0.0.1:6379",
            "AENODE_RUNTIME__RAY__MAX_IN_FLIGHT_PER_ACTOR": "3",
            "AENODE_RUNTIME__RAY__RESOURCES__HIPPOCAMPUS__NUM_GPUS": "0.25",
        },
    )
    ray = settings.runtime.ray
    assert settings.runtime.executor == "ray"
    assert ray.address == "127.0.0.1:6379"
    assert ray.max_in_flight_per_actor == 3
    assert ray.resources["hippocampus"].num_gpus == 0.25
    assert ray.resources["hippocampus"].num_cpus is None  # the card's stays
    assert load_settings(None, {}).runtime.executor == "local"


@pytest.mark.parametrize("address", ["localhost", "host:0", ":6379", "host:99999", "host:port"])
def test_a_bad_ray_address_names_the_key(address: str) -> None:
    with pytest.raises(
        ConfigError, match=r"runtime\.ray\.address: must be \"auto\", \"HOST:PORT\""
    ):
        load_settings(None, {"AENODE_RUNTIME__RAY__ADDRESS": address})
    with pytest.raises(ConfigError, match=r"runtime\.executor: Input should be 'local' or 'ray'"):
        load_settings(None, {"AENODE_RUNTIME__EXECUTOR": "celery"})


def test_cards_carry_resources_and_the_config_overrides_them() -> None:
    registry = Registry.load(ModelsSettings(path=ROOT / "models", enabled=["hippocampus"]))
    card = registry.card("hippocampus").resources
    assert (card.num_gpus, card.num_cpus) == (0.0, 1.0)  # the default: a CPU actor
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'aenode[ray]'")
    from aenode.infer.ray_executor import resources_for

    settings = load_settings(None, {"AENODE_RUNTIME__RAY__RESOURCES__HIPPOCAMPUS__NUM_GPUS": "0.5"})
    assert resources_for(settings, registry, "hippocampus") == {"num_gpus": 0.5, "num_cpus": 1.0}


def test_ray_selected_but_not_installed_names_runtime_executor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "aenode.infer.ray_executor", None)  # import fails
    settings = Settings.model_validate({"runtime": {"executor": "ray"}})
    with pytest.raises(ConfigError, match=r"runtime\.executor: ray selected but Ray is not inst"):
        open_executor(settings, Registry({}))


def test_an_unreachable_cluster_names_runtime_ray_address() -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'aenode[ray]'")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings.model_validate(
        {
            "runtime": {
                "executor": "ray",
                "ray": {"address": f"127.0.0.1:{port}", "connect_timeout_seconds": 2},
            }
        }
    )
    with pytest.raises(
        ConfigError, match=rf"runtime\.ray\.address: cannot reach the Ray head at 127.0.0.1:{port}"
    ):
        open_executor(settings, Registry({}))


def test_result_uids_are_the_same_for_a_rerun_and_differ_otherwise() -> None:
    base = (7, "1.2.3", ("image=1.2.3.4:0",), "hippocampus", "1.0.0")
    uids, again = ResultUids(*base), ResultUids(*base)
    assert uids.sop("SEG") == again.sop("SEG") and uids.series("SR") == again.series("SR")
    assert uids.sop("SEG").is_valid and len(uids.sop("SEG")) <= 64
    others = {
        ResultUids(8, *base[1:]).sop("SEG"),
        ResultUids(7, "1.2.4", *base[2:]).sop("SEG"),
        ResultUids(7, "1.2.3", ("image=1.2.3.5:0",), *base[3:]).sop("SEG"),  # another series
        ResultUids(7, "1.2.3", ("image=1.2.3.4:1",), *base[3:]).sop("SEG"),  # its revision
        ResultUids(*base[:3], "brain-tumour", "1.0.0").sop("SEG"),
        ResultUids(*base[:4], "1.0.1").sop("SEG"),
        uids.sop("SR"),
        uids.series("SEG"),
    }
    assert uids.sop("SEG") not in others and len(others) == 8


def test_local_executor_wraps_the_runtime_and_status_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aenode.cli.store import command_status
    from aenode.infer.runtime import Runtime
    from aenode.store import Store

    registry = Registry.load(ModelsSettings(path=ROOT / "models", enabled=["hippocampus"]))
    runtime = Runtime(registry, RuntimeSettings(device="cpu", threads=1))
    executor = as_executor(runtime)
    try:
        assert isinstance(executor, LocalExecutor) and as_executor(executor) is executor
        description = executor.describe()
        assert description == {
            "executor": "local",
            "workers": [{"device": "cpu", "models": ["hippocampus"]}],
        }
    finally:
        executor.close()
    settings = Settings.model_validate({"storage": {"path": str(tmp_path)}})
    Store(tmp_path / "aenode.db").close()
    ray_view = {
        "executor": "ray",
        "address": "10.0.0.5:6379",
        "actors": [
            {
                "name": "hippocampus-0",
                "state": "ready",
                "node_ip": "10.0.0.7",
                "devices": ["cuda:0"],
                "gpu_ids": ["1"],
                "in_flight": 1,
                "max_in_flight": 2,
                "restarts": 0,
            }
        ],
    }
    write_executor_file(tmp_path, ray_view)
    assert read_executor_file(tmp_path) == ray_view
    args = argparse.Namespace(json=False, limit=10)
    assert command_status(args, settings) == 0
    out = capsys.readouterr().out
    assert "executor: ray at 10.0.0.5:6379, 1 actor(s)" in out
    assert (
        "hippocampus-0: ready on 10.0.0.7, devices cuda:0, GPU ids 1, in flight 1/2, restarts 0"
        in out
    )
    args.json = True
    assert command_status(args, settings) == 0
    assert json.loads(capsys.readouterr().out)["executor"] == ray_view


class _LosesTheFirstCall:
    """An executor whose worker dies during the first job it gets (as a killed Ray actor)."""

    def __init__(self) -> None:
        self.calls = 0

    def infer(self, model: str, volumes: Mapping[str, Volume], *, fractional: bool = False) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise WorkerLost(f"model {model!r}: Ray actor {model}-0 lost mid-job (ActorDiedError)")
        return prediction_for(volumes["image"], box_mask(volumes["image"]))

    def describe(self) -> dict[str, Any]:
        return {"executor": "test"}

    def close(self) -> None:
        pass


def test_a_lost_worker_queues_the_job_again_and_the_rerun_keeps_the_uids(
    tmp_path: Path, data_dir: Path
) -> None:
    volume = load_volume(data_dir / HIPPO)
    files = tuple(sorted((data_dir / HIPPO).glob("*.dcm")))
    series = SeriesInfo(volume.series.study_uid, volume.series.series_uid, 0, "MR", "x", files)
    store = Store(tmp_path / "aenode.db")
    with store.transaction() as conn:
        job = record_job(conn, "hippo", "hippocampus", series.study_uid, {"image": series}, 0.0)
    assert job is not None and job.id is not None
    settings = Settings.model_validate({"storage": {"path": str(tmp_path / "var")}})
    executor = _LosesTheFirstCall()
    runner = JobRunner(settings, store, _Registry(), executor)  # type: ignore[arg-type]
    stop, wakeup = threading.Event(), threading.Event()
    worker = threading.Thread(target=runner.run_forever, args=(stop, wakeup, 0.05))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            record = get_job(store, job.id)
            if record is not None and record.state is JobState.DONE:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join(30)
    assert record is not None and record.state is JobState.DONE, record
    assert executor.calls == 2  # lost, queued again, run again
    card = ModelCard.model_validate(CARD)
    uids = ResultUids.for_job(job, card.name, card.version)
    folder = Path(record.result_dir or "")
    for kind, name in (("SEG", "seg.dcm"), ("report", "report.dcm"), ("SR", "sr.dcm")):
        ds = pydicom.dcmread(folder / name, stop_before_pixels=True)
        assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) == (uids.sop(kind), uids.series(kind))
    store.close()
