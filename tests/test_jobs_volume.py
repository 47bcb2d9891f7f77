"""JobRunner on the real tilted CQ500 head CT: rejected with the reason naming the waiver, unless
waived in the config or the card (``inputs.geometry.allow``), or corrected by the card
(``inputs.geometry.correct``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest

from aenode.config import Settings
from aenode.infer.cards import GeometrySpec
from aenode.infer.runtime import InferenceError
from aenode.jobs import JobRunner
from aenode.records import Job, SeriesInfo, Volume
from aenode.store import Store


class _NoModelRuntime:
    """Stands in for the runtime: records the volume and the job's note, then fails the job."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.volumes: list[Volume] = []
        self.reason: str | None = None

    def predict(self, model: str, volumes: Mapping[str, Volume], **_: Any) -> Any:
        self.volumes.extend(volumes.values())
        self.reason = self.store.execute("SELECT reason FROM jobs WHERE id=1")[0]["reason"]
        raise InferenceError(f"model {model!r}: no CT model in this test")


class _Registry:
    """Only the card's ``inputs.geometry`` is read before inference."""

    def __init__(self, geometry: GeometrySpec) -> None:
        self.geometry = geometry

    def card(self, name: str) -> Any:
        return SimpleNamespace(inputs=SimpleNamespace(geometry=self.geometry))


def _cq500(data_dir: Path) -> SeriesInfo:
    """The 238-slice series of the folder (its stray slice belongs to another series)."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for f in sorted((data_dir / "cq500-ct0").glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        groups.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), []).append(f)
    (study, series), files = max(groups.items(), key=lambda kv: len(kv[1]))
    assert len(files) == 238
    return SeriesInfo(study, series, 0, "CT", "", tuple(files))


def _runner(tmp_path: Path, settings: Settings, geometry: GeometrySpec, series: SeriesInfo) -> Any:
    store = Store(tmp_path / "aenode.db")
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
    runtime = _NoModelRuntime(store)
    runner = JobRunner(settings, store, _Registry(geometry), runtime)  # type: ignore[arg-type]
    return store, runtime, runner


@pytest.mark.parametrize(
    ("allow", "card_allow"),
    [([], []), (["tilt", "gaps"], []), ([], ["tilt", "gaps"]), (["spacing"], ["tilt", "gaps"])],
)
def test_tilted_ct_is_rejected_unless_waived(
    tmp_path: Path, data_dir: Path, allow: list[str], card_allow: list[str]
) -> None:
    settings = Settings.model_validate({"volume": {"allow": allow}})
    series = _cq500(data_dir)
    geometry = GeometrySpec.model_validate({"allow": card_allow})
    store, runtime, runner = _runner(tmp_path, settings, geometry, series)
    outcome = runner.run(Job("ct", "ct-model", series.study_uid, {"image": series}, id=1))
    row = store.execute("SELECT state, reason FROM series")[0]
    if not allow and not card_allow:
        assert outcome.state == "rejected"
        assert "tilt" in (outcome.reason or "")
        # The message names the settings that would waive it.
        assert "inputs.geometry.allow: [tilt] in the model card" in (outcome.reason or "")
        assert "volume.allow: [tilt] in the configuration" in (outcome.reason or "")
        assert row["state"] == "rejected" and "tilt" in row["reason"]
        assert runtime.volumes == []
    else:
        # The card's allow replaces the global one (spacing alone would not waive the tilt).
        assert outcome.state == "failed" and "no CT model" in (outcome.reason or "")
        assert row["state"] == "complete"
        assert runtime.volumes[0].image.GetSize() == (512, 512, 238)
        assert runtime.volumes[0].correction is None


def test_card_corrects_tilt_and_notes_it(tmp_path: Path, data_dir: Path) -> None:
    series = _cq500(data_dir)
    geometry = GeometrySpec.model_validate({"correct": ["tilt", "gaps"]})
    store, runtime, runner = _runner(tmp_path, Settings(), geometry, series)
    outcome = runner.run(Job("ct", "ct-model", series.study_uid, {"image": series}, id=1))
    assert outcome.state == "failed" and "no CT model" in (outcome.reason or "")
    volume = runtime.volumes[0]
    assert volume.correction is not None
    direction = volume.image.GetDirection()
    # Resampled onto an orthogonal grid: the slice axis is the row x column normal.
    d = np.array(direction).reshape(3, 3)
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-6)
    # The correction was noted on the job before inference.
    assert runtime.reason is not None and runtime.reason.startswith("role image: ")
    assert volume.correction.describe() in runtime.reason


def test_card_geometry_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="spacing"):
        GeometrySpec.model_validate({"correct": ["spacing"]})
    with pytest.raises(ValueError, match="tilt"):
        GeometrySpec.model_validate({"allow": ["twist"]})
