"""The receiver end to end: dcmtk and pynetdicom peers against ``aenode serve`` on loopback.

Real data: ../shared/data/udacity-mr/Study1 (5 MR series, 120 instances, Explicit VR LE) and
../shared/data/cq500-ct0 (238 JPEG Lossless SV1 CT slices plus one stray Explicit VR LE
slice of another series). One node serves the whole module.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from conftest import DATA, ROOT, dcmtk, free_port
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config

from aenode.assemble import series_info_from_payload

pytestmark = pytest.mark.network

AENODE = str(ROOT / ".venv" / "bin" / "aenode")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class NodeProcess:
    """``aenode serve`` as a subprocess with storage in a tmp folder."""

    def __init__(self, tmp: Path, overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.storage = tmp / "var"
        config: dict[str, dict[str, Any]] = {
            "node": {"host": "127.0.0.1", "port": self.port, "receivers": 2},
            "storage": {"path": str(self.storage), "min_free_mb": 10},
            # Only the model these tests select (a start loads and warms every enabled one);
            # the e2e tests enable all.
            "models": {"path": str(ROOT / "models"), "enabled": ["hippocampus"]},
            "series": {"release_grace_seconds": 0.5, "poll_seconds": 0.05},
            "logging": {"level": "DEBUG"},
            # No web server unless a test asks for one (tests/test_web.py): nodes of
            # parallel tests would share the default http.port.
            "http": {"port": None},
        }
        for section, values in (overrides or {}).items():
            config.setdefault(section, {}).update(values)
        node = config["node"]
        self.port = node["port"]
        # The port start() waits for: the plain one, else the TLS one (node.port null).
        self.listen_port = int(node["port"] if node["port"] is not None else node["tls"]["port"])
        self.config = tmp / "aenode.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = tmp / "aenode.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> NodeProcess:
        # Start-up now includes the warm-up job of every model before the node listens.
        offset = len(self.log_text())
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [AENODE, "--config", str(self.config), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"aenode serve exited with {self.proc.returncode}:\n{self.log_text()}")
            if "listening on" in self.log_text()[offset:]:
                with socket.create_connection(("127.0.0.1", self.listen_port), timeout=1):
                    return self
            time.sleep(0.1)
        self.proc.kill()  # never leave a node running behind a failed test
        self.proc.wait(10)
        pytest.fail(f"aenode serve did not listen within {timeout} s:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        conn = sqlite3.connect(self.storage / "aenode.db", timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        pytest.fail(f"condition not met within {timeout} s; log:\n{self.log_text()[-3000:]}")

    def complete_series(self, series_uids: set[str]) -> dict[str, sqlite3.Row]:
        rows = self.query("SELECT * FROM series WHERE state='complete'")
        return {r["series_uid"]: r for r in rows if r["series_uid"] in series_uids}


def storescu(
    port: int, *files: str | Path, opts: tuple[str, ...] = (), aet: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu with ``opts`` sending ``files`` (files or folders with ``+sd``)."""
    return subprocess.run(
        [dcmtk("storescu"), "-aet", aet, "-aec", "AENODE", *opts, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=120,
    )


def read_sources(folder: Path) -> dict[str, tuple[Path, pydicom.Dataset]]:
    """SOP Instance UID -> (file, dataset) of every DICOM file under ``folder``."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            ds = pydicom.dcmread(path)
            found[str(ds.SOPInstanceUID)] = (path, ds)
    return found


def assert_spooled_equal(node: NodeProcess, source: pydicom.Dataset) -> Path:
    spooled = (
        node.storage
        / "spool"
        / str(source.StudyInstanceUID)
        / str(source.SeriesInstanceUID)
        / f"{source.SOPInstanceUID}.dcm"
    )
    ds = pydicom.dcmread(spooled)
    assert ds.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
    for element in source:
        assert element.tag in ds, f"{spooled}: {element.keyword} missing"
        assert ds[element.tag].value == element.value, f"{spooled}: {element.keyword} differs"
    assert len(ds) == len(source)
    return spooled


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("node")
    proc = NodeProcess(
        tmp,
        {
            "node": {
                "allowed_peers": [
                    {"ae_title": "STORESCU"},
                    {"ae_title": "PYSCU", "host": "127.0.0.1"},
                    {"ae_title": "ECHOSCU"},
                    {"ae_title": "FARAWAY", "host": "10.11.12.13"},
                ]
            }
        },
    ).start()
    yield proc
    assert proc.stop() == 0, proc.log_text()[-3000:]


def echo(port: int, aet: str, aec: str = "AENODE") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=30,
    )


def test_echo_and_peer_checks(node: NodeProcess) -> None:
    assert echo(node.port, "ECHOSCU").returncode == 0
    refused = echo(node.port, "INTRUDER")
    assert refused.returncode != 0
    assert "Rejected" in refused.stdout + refused.stderr
    assert echo(node.port, "FARAWAY").returncode != 0
    assert echo(node.port, "ECHOSCU", aec="SOMEONE").returncode != 0
    node.wait_for(lambda: "not allowed from host 127.0.0.1" in node.log_text())
    assert "calling AE 'INTRUDER' is not in node.allowed_peers" in node.log_text()


def test_study_of_five_series_round_trips(node: NodeProcess, data_dir: Path) -> None:
    study = data_dir / "udacity-mr" / "Study1"
    sources = read_sources(study)
    assert len(sources) == 120
    done = storescu(node.port, study, opts=("+sd", "+r"))
    assert done.returncode == 0, done.stderr
    expected: dict[str, int] = {}
    for _, ds in sources.values():
        expected[str(ds.SeriesInstanceUID)] = expected.get(str(ds.SeriesInstanceUID), 0) + 1
    assert len(expected) == 5
    node.wait_for(lambda: len(node.complete_series(set(expected))) == 5)
    complete = node.complete_series(set(expected))
    assert {uid: r["instance_count"] for uid, r in complete.items()} == expected
    hippo = next(r for r in complete.values() if r["description"] == "HippoCrop")
    assert hippo["completed_by"] == "count"  # ImagesInAcquisition is set there
    for _, ds in sources.values():
        assert_spooled_equal(node, ds)

    items = node.query("SELECT * FROM queue WHERE topic='series.complete'")
    infos = {
        i.series_uid: i for i in (series_info_from_payload(json.loads(r["payload"])) for r in items)
    }
    for uid, count in expected.items():
        info = infos[uid]
        assert info.revision == 0
        assert len(info.files) == count
        assert list(info.files) == sorted(info.files)
        assert all(f.is_file() for f in info.files)


def test_jpeg_lossless_is_stored_as_sent(node: NodeProcess, data_dir: Path) -> None:
    folder = data_dir / "cq500-ct0"
    sources = read_sources(folder)
    done = storescu(node.port, folder, opts=("-xs", "+sd"))
    assert done.returncode == 0, done.stderr
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for _, ds in sources.values():
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    assert sorted(len(v) for v in by_series.values()) == [1, 238]
    node.wait_for(lambda: len(node.complete_series(set(by_series))) == 2)
    complete = node.complete_series(set(by_series))
    assert sorted(r["instance_count"] for r in complete.values()) == [1, 238]
    syntaxes = set()
    for _, ds in sources.values():
        spooled = assert_spooled_equal(node, ds)
        meta = pydicom.dcmread(spooled, stop_before_pixels=True).file_meta
        syntaxes.add(str(meta.TransferSyntaxUID))
    assert syntaxes == {"1.2.840.10008.1.2.4.70", ExplicitVRLittleEndian}


def _crafted(tmp: Path, name: str, drop: str | None = None, sop_class: str | None = None) -> Path:
    """A small MR instance written with full file meta; optionally without one element."""
    src = next((DATA / "udacity-mr" / "Study1" / "13_HCropVolume").iterdir())
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    if sop_class is not None:
        ds.SOPClassUID = sop_class
    if drop is not None:
        del ds[drop]
    path = tmp / name
    ds.save_as(path)  # keeps the source file meta (MR) whatever the data set says
    return path


def test_bad_datasets_fail_and_the_association_goes_on(
    node: NodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_uid = _crafted(tmp_path, "no-uid.dcm", drop="SOPInstanceUID")
    wrong_class = _crafted(tmp_path, "ct.dcm", sop_class="1.2.840.10008.5.1.4.1.1.2")
    good = _crafted(tmp_path, "good.dcm")
    # Send the files as they are (the file meta names the UID the data set lacks).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AENODE")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(p).Status for p in (no_uid, wrong_class, good)]
    finally:
        assoc.release()
    assert statuses[0] == 0xC000
    assert statuses[1] == 0xA900
    assert statuses[2] == 0x0000
    good_uid = str(pydicom.dcmread(good).SOPInstanceUID)
    assert node.query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (good_uid,))
    log = node.log_text()
    assert "SOPInstanceUID is missing or empty" in log
    assert "does not match the presentation context's SOP class" in log


def test_identical_duplicate_is_acknowledged_without_new_work(
    node: NodeProcess, tmp_path: Path
) -> None:
    path = _crafted(tmp_path, "dup.dcm")
    ds = pydicom.dcmread(path)
    first = storescu(node.port, path)
    assert first.returncode == 0, first.stderr
    rows = node.query("SELECT * FROM instances WHERE sop_instance_uid=?", (ds.SOPInstanceUID,))
    assert len(rows) == 1
    spooled = node.storage / rows[0]["path"]
    stat = spooled.stat()
    again = storescu(node.port, path)
    assert again.returncode == 0, again.stderr
    rows2 = node.query("SELECT * FROM instances WHERE sop_instance_uid=?", (ds.SOPInstanceUID,))
    assert [dict(r) for r in rows2] == [dict(r) for r in rows]
    assert spooled.stat().st_mtime_ns == stat.st_mtime_ns
    # Different content, same SOP Instance UID: keep_first (the default) keeps the first.
    ds.SeriesDescription = "changed"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    third = storescu(node.port, changed)
    assert third.returncode == 0, third.stderr
    assert pydicom.dcmread(spooled).SeriesDescription != "changed"
    node.wait_for(lambda: "kept the first (storage.duplicate_policy=keep_first)" in node.log_text())


def test_status_command_lists_series(node: NodeProcess, data_dir: Path) -> None:
    done = subprocess.run(
        [AENODE, "--config", str(node.config), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=node.tmp,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    described = {s["description"]: s for s in status["series"]}
    assert described["HippoCrop"]["instance_count"] == 32
    assert described["HippoCrop"]["state"] == "complete"
    text = subprocess.run(
        [AENODE, "--config", str(node.config), "status"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=node.tmp,
    )
    assert "HippoCrop" in text.stdout and "32/32" in text.stdout


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_unknown_storage_class_is_accepted_as_sent(node: NodeProcess, tmp_path: Path) -> None:
    # A private SOP class no table knows (node.accept_unknown_storage is on by default).
    private = "1.3.6.1.4.1.99999.1.1"
    path = _crafted(tmp_path, "private.dcm", sop_class=private)
    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPClassUID = private
    ds.save_as(path)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(private, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AENODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds).Status
    finally:
        assoc.release()
    assert status == 0x0000
    (row,) = node.query(
        "SELECT sop_class_uid, path FROM instances WHERE sop_instance_uid=?", (ds.SOPInstanceUID,)
    )
    assert row["sop_class_uid"] == private
    back = pydicom.dcmread(node.storage / row["path"])
    assert back.file_meta.MediaStorageSOPClassUID == private
    assert back.PixelData == ds.PixelData


def test_logs_carry_context_but_no_phi(node: NodeProcess, data_dir: Path) -> None:
    source = sorted((data_dir / "udacity-mr" / "Study2" / "14_HCropVolume").glob("*.dcm"))[0]
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    result = storescu(node.port, source)
    assert result.returncode == 0, result.stderr
    node.wait_for(lambda: f"sop_uid={ds.SOPInstanceUID}" in node.log_text())
    line = next(x for x in node.log_text().splitlines() if f"sop_uid={ds.SOPInstanceUID}" in x)
    assert f"study={ds.StudyInstanceUID}" in line and "peer_ae=STORESCU" in line
    log = node.log_text()
    for phi in (str(ds.PatientName), str(ds.PatientID), str(ds.get("PatientBirthDate", ""))):
        if phi:
            assert phi not in log, "PHI in the log with logging.phi off"
