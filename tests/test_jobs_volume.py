"""JobRunner on the real tilted CQ500 head CT: rejected with the reason, unless waived in config."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydicom
import pytest

from aenode.config import Settings
from aenode.infer.runtime import InferenceError
from aenode.jobs import JobRunner
from aenode.records import Job, SeriesInfo, Volume
from aenode.store import Store


class _NoModelRuntime:
    """Stands in for the runtime: records the volume it was given, then fails the job."""

    def __init__(self) -> None:
        self.volumes: list[Volume] = []

    def predict(self, model: str, volumes: Mapping[str, Volume], **_: Any) -> Any:
        self.volumes.extend(volumes.values())
        raise InferenceError(f"model {model!r}: no CT model in this test")


def _cq500(data_dir: Path) -> SeriesInfo:
    """The 238-slice series of the folder (its stray slice belongs to another series)."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for f in sorted((data_dir / "cq500-ct0").glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        groups.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), []).append(f)
    (study, series), files = max(groups.items(), key=lambda kv: len(kv[1]))
    assert len(files) == 238
    return SeriesInfo(study, series, 0, "CT", "", tuple(files))


@pytest.mark.parametrize("allow", [[], ["tilt", "gaps"]])
def test_tilted_ct_is_rejected_unless_waived(
    tmp_path: Path, data_dir: Path, allow: list[str]
) -> None:
    settings = Settings.model_validate({"volume": {"allow": allow}})
    store = Store(tmp_path / "aenode.db")
    series = _cq500(data_dir)
    now = time.time()
    store.execute(
        "INSERT INTO series (series_uid, revision, study_uid, first_arrival, last_arrival, state)"
        " VALUES (?, 0, ?, ?, ?, 'complete')",
        (series.series_uid, series.study_uid, now, now),
    )
    store.execute(
        "INSERT INTO jobs (id, rule, model, study_uid, inputs, created_at, updated_at)"
        " VALUES (1, 'ct', 'ct-model', ?, '{}', 0, 0)",
        (series.study_uid,),
    )
    runtime = _NoModelRuntime()
    runner = JobRunner(settings, store, registry=None, runtime=runtime)  # type: ignore[arg-type]
    outcome = runner.run(Job("ct", "ct-model", series.study_uid, {"image": series}, id=1))
    row = store.execute("SELECT state, reason FROM series")[0]
    if not allow:
        assert outcome.state == "rejected"
        assert "tilt" in (outcome.reason or "")
        assert row["state"] == "rejected" and "tilt" in row["reason"]
        assert runtime.volumes == []
    else:
        assert outcome.state == "failed" and "no CT model" in (outcome.reason or "")
        assert row["state"] == "complete"
        assert runtime.volumes[0].image.GetSize() == (512, 512, 238)
