"""``aenode serve`` across restarts and unusual senders: kill -9, per-instance associations,
the disk floor.

Real data: ../shared/data/cq500-ct0 (239 files, two series) and the T2_reg series of
../shared/data/udacity-mr/Study1 (22 instances, no ImagesInAcquisition).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import dcmtk
from test_receive import DCMTK_ENV, NodeProcess, assert_spooled_equal, read_sources, storescu

pytestmark = pytest.mark.network


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    """Nodes a test started; any still running at the end are stopped (also on failure)."""
    started: list[NodeProcess] = []
    yield started
    for node in started:
        if node.proc is not None and node.proc.poll() is None:
            node.stop()


def test_kill_9_mid_transfer_loses_nothing_and_hands_on_once(
    tmp_path: Path, data_dir: Path, nodes: list[NodeProcess]
) -> None:
    folder = data_dir / "cq500-ct0"
    sources = read_sources(folder)
    by_series: dict[str, int] = {}
    for _, ds in sources.values():
        by_series[str(ds.SeriesInstanceUID)] = by_series.get(str(ds.SeriesInstanceUID), 0) + 1
    settings = {"series": {"release_grace_seconds": 2.0, "quiet_seconds": 60.0}}
    node = NodeProcess(tmp_path, settings).start()
    nodes.append(node)
    sender = subprocess.Popen(
        [
            dcmtk("storescu"),
            "-aec",
            "AENODE",
            "-xs",
            "+sd",
            "127.0.0.1",
            str(node.port),
            str(folder),
        ],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        node.wait_for(lambda: len(list((node.storage / "spool").rglob("*.dcm"))) >= 40)
        node.stop(signal.SIGKILL)
        assert sender.wait(60) != 0  # the sender saw the node die
    finally:
        if sender.poll() is None:
            sender.kill()
    received = len(node.query("SELECT * FROM instances"))
    assert 40 <= received < 239

    node.start()
    done = storescu(node.port, folder, opts=("-xs", "+sd"))
    assert done.returncode == 0, done.stderr
    node.wait_for(lambda: len(node.complete_series(set(by_series))) == 2)
    time.sleep(2.5)  # longer than the grace: a second completion would show now
    rows = node.query("SELECT series_uid, revision, instance_count, state FROM series")
    assert sorted((r["instance_count"], r["revision"], r["state"]) for r in rows) == [
        (1, 0, "complete"),
        (238, 0, "complete"),
    ]
    items = node.query("SELECT key, payload FROM queue WHERE topic='series.complete'")
    assert sorted(r["key"] for r in items) == sorted(f"{uid}:0" for uid in by_series)
    for item in items:
        payload = json.loads(item["payload"])
        assert len(payload["files"]) == by_series[payload["series_uid"]]
    assert len(node.query("SELECT * FROM instances")) == 239
    assert len(list((node.storage / "spool").rglob("*.dcm"))) == 239
    for _, ds in sources.values():
        assert_spooled_equal(node, ds)
    assert node.stop() == 0


def test_one_association_per_instance_completes_by_quiet(
    tmp_path: Path, data_dir: Path, nodes: list[NodeProcess]
) -> None:
    folder = data_dir / "udacity-mr" / "Study1" / "37916-T2reg-88910"
    files = sorted(folder.iterdir())
    assert "ImagesInAcquisition" not in pydicom.dcmread(files[0], stop_before_pixels=True)
    settings = {"series": {"release_grace_seconds": 30.0, "quiet_seconds": 1.5}}
    node = NodeProcess(tmp_path, settings).start()
    nodes.append(node)
    try:
        for path in files:
            done = storescu(node.port, path)
            assert done.returncode == 0, done.stderr
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        node.wait_for(lambda: bool(node.complete_series({series_uid})), timeout=10)
        (row,) = node.query("SELECT * FROM series")
        assert (row["instance_count"], row["completed_by"]) == (len(files), "quiet")
        assert len(node.query("SELECT * FROM associations")) == len(files)
        assert len(node.query("SELECT * FROM queue")) == 1
    finally:
        assert node.stop() == 0


def test_disk_floor_answers_a700_and_writes_nothing(
    tmp_path: Path, data_dir: Path, nodes: list[NodeProcess]
) -> None:
    node = NodeProcess(tmp_path, {"storage": {"min_free_mb": 10**9}, "node": {"receivers": 1}})
    nodes.append(node.start())
    try:
        path = sorted((data_dir / "udacity-mr" / "Study1" / "13_HCropVolume").iterdir())[0]
        done = storescu(node.port, path, opts=("-v",))
        assert "Refused: OutOfResources" in done.stdout + done.stderr
        assert list((node.storage / "spool").rglob("*.dcm")) == []
        assert list((node.storage / "tmp").iterdir()) == []
        assert node.query("SELECT * FROM instances") == []
        node.wait_for(lambda: "C-STORE refused (0xA700)" in node.log_text())
    finally:
        assert node.stop() == 0
