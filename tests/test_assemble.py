"""Series completion rules, revisions and the hand-over payload, on the store directly.

Synthetic headers (UIDs only, no pixels) exercise the timing rules deterministically;
the real-data paths are in test_receive.py and test_serve.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from aenode.assemble import (
    SERIES_TOPIC,
    Assembler,
    admit,
    close_stale_associations,
    expected_count,
    series_info_from_payload,
)
from aenode.config import Settings
from aenode.receive.header import InstanceHeader
from aenode.store import Store

T0 = 1_700_000_000.0


def _header(i: int, series: str = "1.2.3.4", expected: int | None = None) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        sop_instance_uid=f"{series}.{i}",
        study_uid="1.2.3",
        series_uid=series,
        modality="MR",
        description="T1",
        expected=expected,
        transfer_syntax="1.2.840.10008.1.2.1",
    )


@pytest.fixture
def env(tmp_path: Path) -> tuple[Store, Settings]:
    settings = Settings.model_validate(
        {
            "storage": {"path": str(tmp_path)},
            "series": {
                "release_grace_seconds": 1.0,
                "quiet_seconds": 10.0,
                "max_wait_seconds": 100.0,
            },
        }
    )
    return Store(tmp_path / "aenode.db"), settings


def _arrive(
    store: Store, settings: Settings, i: int, at: float, assoc: str | None = "a1", **kw: object
) -> None:
    header = _header(i, **kw)  # type: ignore[arg-type]
    with store.transaction() as conn:
        admit(
            conn,
            store,
            header,
            path=f"spool/{header.study_uid}/{header.series_uid}/{header.sop_instance_uid}.dcm",
            sha256="0" * 64,
            size=1,
            calling_ae="PACS",
            assoc_id=assoc,
            now=at,
            settings=settings.series,
            root=Path(settings.storage.path),
        )


def _release(store: Store, assoc: str, at: float) -> None:
    store.execute(
        "INSERT INTO associations (assoc_id, started_at, released_at) VALUES (?, ?, ?)",
        (assoc, at, at),
    )


def _items(store: Store) -> list[dict[str, object]]:
    rows = store.execute(
        "SELECT key, payload FROM queue WHERE topic=? ORDER BY id", (SERIES_TOPIC,)
    )
    return [{"key": r["key"], **json.loads(r["payload"])} for r in rows]


def test_expected_count_reads_header_elements() -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    assert expected_count(ds) is None
    ds.ImagesInAcquisition = 32
    assert expected_count(ds) == 32
    del ds.ImagesInAcquisition
    ds.NumberOfSlices = 40
    ds.NumberOfTimeSlices = 3
    assert expected_count(ds) == 120
    enhanced = Dataset()
    enhanced.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR
    enhanced.NumberOfFrames = 120
    assert expected_count(enhanced) == 1
    broken = Dataset()
    broken.ImagesInAcquisition = "0"
    assert expected_count(broken) is None


def test_expected_count_on_real_hippocrop(data_dir: Path) -> None:
    folder = data_dir / "udacity-mr" / "Study1" / "13_HCropVolume"
    files = sorted(folder.iterdir())
    assert expected_count(pydicom.dcmread(files[0], stop_before_pixels=True)) == len(files)


def test_complete_by_count_in_the_same_transaction(env: tuple[Store, Settings]) -> None:
    store, settings = env
    for i in range(3):
        _arrive(store, settings, i, T0 + i, expected=3)
    (row,) = store.execute("SELECT * FROM series")
    assert (row["state"], row["completed_by"], row["instance_count"]) == ("complete", "count", 3)
    (item,) = _items(store)
    assert item["key"] == "1.2.3.4:0"
    info = series_info_from_payload(item)
    assert info.completed_by == "count"
    assert [f.name for f in info.files] == ["1.2.3.4.0.dcm", "1.2.3.4.1.dcm", "1.2.3.4.2.dcm"]
    assert all(f.is_absolute() for f in info.files)


def test_release_waits_for_every_association_and_the_grace(env: tuple[Store, Settings]) -> None:
    store, settings = env
    assembler = Assembler(store, settings)
    _arrive(store, settings, 0, T0, assoc="a1")
    _arrive(store, settings, 1, T0 + 0.1, assoc="a2")
    _release(store, "a1", T0 + 0.2)
    assert assembler.poll(T0 + 5) == []  # a2 still open
    _release(store, "a2", T0 + 6)
    assert assembler.poll(T0 + 6.5) == []  # grace not over
    assert assembler.poll(T0 + 7.1) == [("1.2.3.4", 0, "release")]
    assert assembler.poll(T0 + 8) == []  # handed on once
    assert len(_items(store)) == 1


def test_quiet_and_max_wait(env: tuple[Store, Settings]) -> None:
    store, settings = env
    assembler = Assembler(store, settings)
    _arrive(store, settings, 0, T0, assoc=None, series="9.1")
    assert assembler.poll(T0 + 9.9) == []
    assert assembler.poll(T0 + 10.0) == [("9.1", 0, "quiet")]
    # A trickle that never pauses for quiet_seconds ends at max_wait.
    for k in range(0, 101, 5):
        _arrive(store, settings, k, T0 + k, assoc="busy", series="9.2")
    assert assembler.poll(T0 + 100.0) == [("9.2", 0, "max_wait")]


def test_late_instance_opens_a_revision_with_all_instances(env: tuple[Store, Settings]) -> None:
    store, settings = env
    assembler = Assembler(store, settings)
    for i in range(3):
        _arrive(store, settings, i, T0 + i, expected=3)
    _arrive(store, settings, 3, T0 + 20, assoc="late", expected=3)
    rows = store.execute("SELECT * FROM series ORDER BY revision")
    assert [(r["revision"], r["state"], r["instance_count"]) for r in rows] == [
        (0, "complete", 3),
        (1, "receiving", 4),
    ]
    _release(store, "late", T0 + 20)
    assert assembler.poll(T0 + 21.5) == [("1.2.3.4", 1, "release")]
    items = _items(store)
    assert [i["key"] for i in items] == ["1.2.3.4:0", "1.2.3.4:1"]
    assert len(series_info_from_payload(items[1]).files) == 4


def test_late_instance_ignored_is_stored_without_reopening(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {"storage": {"path": str(tmp_path)}, "series": {"late_instances": "ignore"}}
    )
    store = Store(tmp_path / "aenode.db")
    for i in range(2):
        _arrive(store, settings, i, T0 + i, expected=2)
    _arrive(store, settings, 2, T0 + 30, expected=2)
    assert len(store.execute("SELECT * FROM series")) == 1
    assert len(store.execute("SELECT * FROM instances")) == 3
    assert len(_items(store)) == 1


def test_restart_closes_associations_left_open(env: tuple[Store, Settings]) -> None:
    store, settings = env
    assembler = Assembler(store, settings)
    _arrive(store, settings, 0, T0, assoc="died-with-the-process")
    assert assembler.poll(T0 + 5) == []
    assert close_stale_associations(store, now=T0 + 5) == 1
    assert assembler.poll(T0 + 6.1) == [("1.2.3.4", 0, "release")]


def test_payload_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="key 'files' is missing"):
        series_info_from_payload({"study_uid": "1", "series_uid": "2", "revision": 0})
    with pytest.raises(ValueError, match="'files' must be a list of paths"):
        series_info_from_payload({"study_uid": "1", "series_uid": "2", "revision": 0, "files": 3})


def test_assembler_survives_a_store_error(
    env: tuple[Store, Settings], caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3
    import threading

    store, settings = env
    assembler = Assembler(store, settings)
    calls: list[int] = []
    stop = threading.Event()

    def flaky(now: float | None = None) -> list[tuple[str, int, str]]:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        stop.set()
        return []

    assembler.poll = flaky  # type: ignore[method-assign]
    assembler.run(stop)
    assert len(calls) == 2
    assert "assembler: store or disk unavailable, retrying with back-off: database is locked" in (
        caplog.text
    )
    assert "assembler: resumed after 1 failed round(s)" in caplog.text
