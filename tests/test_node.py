"""``Node`` in this process: stopping with a job in flight finishes that job, loses nothing.

The real hippocampus package runs on the real HippoCrop series (udacity-mr/Study1), sent
over loopback; the runtime's ``predict`` is held until ``stop`` has been asked for, so the
job is certainly in flight when it is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import ROOT, free_port
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from aenode.config import Settings
from aenode.infer.runtime import Runtime
from aenode.jobs import recent_jobs, requeue_interrupted
from aenode.pipeline import Node
from aenode.records import Volume
from aenode.states import JobState
from aenode.store import Store

pytestmark = pytest.mark.network

HIPPO = "udacity-mr/Study1/13_HCropVolume"


def _settings(tmp_path: Path) -> Settings:
    return Settings.model_validate(
        {
            "node": {"host": "127.0.0.1", "port": free_port(), "receivers": 1},
            "storage": {"path": str(tmp_path / "var"), "min_free_mb": 10},
            "http": {"port": None},
            "models": {"path": str(ROOT / "models"), "enabled": ["hippocampus"]},
            "series": {"release_grace_seconds": 0.2, "poll_seconds": 0.05},
            "runtime": {"device": "cpu", "threads": 1},
            "results": {"report": False},
            "selection": {
                "rules": [
                    {
                        "name": "hippocampus",
                        "models": ["hippocampus"],
                        "series": {"tag": "SeriesDescription", "regex": "HippoCrop"},
                    }
                ]
            },
        }
    )


def test_stop_with_a_job_in_flight_finishes_it(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path)
    node = Node(settings)
    in_flight = threading.Event()
    real_predict = Runtime.predict

    def held_predict(self: Runtime, model: str, volumes: Mapping[str, Volume], **kw: Any) -> Any:
        if volumes["image"].series.description == "HippoCrop":  # not the warm-up job
            in_flight.set()
            assert node.stop_event.wait(60)
        return real_predict(self, model, volumes, **kw)

    monkeypatch.setattr(Runtime, "predict", held_predict)
    node.start()
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", settings.node.port, ae_title="AENODE")
        assert assoc.is_established
        files = sorted((data_dir / HIPPO).glob("*.dcm"))
        assert all(assoc.send_c_store(pydicom.dcmread(f)).Status == 0 for f in files)
        assoc.release()
        assert in_flight.wait(180), "the job never started"
    finally:
        started = time.monotonic()
        node.stop()
    assert time.monotonic() - started < 60
    assert not [t for t in threading.enumerate() if t.name in ("assembler", "dispatcher", "jobs")]
    store = Store(Path(settings.storage.path) / "aenode.db")
    (job,) = recent_jobs(store)
    assert job.state is JobState.DONE, job.reason
    assert requeue_interrupted(store) == 0  # nothing left half done
    store.close()
    seg = hd.seg.segread(Path(job.result_dir or "") / "seg.dcm")
    assert np.count_nonzero(seg.get_volume().array) > 0
    assert job.volumes_mm3 and all(v > 0 for v in job.volumes_mm3.values())
