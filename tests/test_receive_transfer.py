"""Transfers at the edges: deflated and big-endian data into the SCP, a peer with a small
maximum PDU (our sender fragments), the outbox resuming after a crash mid-send, and a
receiving process that dies and is restarted. Real data: udacity-mr/Study1 HippoCrop."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import free_port
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from aenode.config import DestinationSettings, ExportSettings, RetrySettings, Settings
from aenode.export.outbox import Outbox
from aenode.export.scu import send_files
from aenode.jobs import move, record_job
from aenode.receive.scp import serve_receiver
from aenode.receive.workers import ReceiverPool
from aenode.records import SeriesInfo
from aenode.states import JobState
from aenode.store import Store

pytestmark = pytest.mark.network

HIPPO = "udacity-mr/Study1/13_HCropVolume"


def _hippo(data_dir: Path, n: int = 4) -> list[Path]:
    return sorted((data_dir / HIPPO).glob("*.dcm"))[:n]


def _settings(tmp_path: Path, **node: object) -> Settings:
    return Settings.model_validate(
        {
            "node": {"host": "127.0.0.1", "port": free_port(), "receivers": 1, **node},
            "storage": {"path": str(tmp_path / "var"), "min_free_mb": 10},
        }
    )


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """One receiving listener in a thread of this process (no fork)."""
    # build_ae sets pynetdicom's process-wide switches (a receiving process is ours
    # alone); this one is the test process, so they are put back afterwards.
    for name in ("UNRESTRICTED_STORAGE_SERVICE", "LOG_HANDLER_LEVEL"):
        monkeypatch.setattr(_config, name, getattr(_config, name))
    settings = _settings(tmp_path)
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=serve_receiver, args=(settings, stop), kwargs={"ready": ready, "drain_seconds": 1}
    )
    thread.start()
    assert ready.wait(10)
    yield settings
    stop.set()
    thread.join(15)
    assert not thread.is_alive()


def _spooled(settings: Settings) -> dict[str, pydicom.Dataset]:
    root = Path(settings.storage.path) / "spool"
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, root.glob("*/*/*.dcm"))}


@pytest.mark.parametrize("syntax", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_deflated_and_big_endian_data_arrive_intact(
    receiver: Settings, data_dir: Path, syntax: str
) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", receiver.node.port, ae_title="AENODE")
    assert assoc.is_established
    assert str(assoc.accepted_contexts[0].transfer_syntax[0]) == syntax
    sources = {}
    for path in _hippo(data_dir):
        ds = pydicom.dcmread(path)
        sources[str(ds.SOPInstanceUID)] = ds
        if syntax == ExplicitVRBigEndian:
            # pydicom writes Pixel Data bytes as they are: give it big-endian words.
            sent = pydicom.dcmread(path)
            assert sent.BitsAllocated == 16
            sent.PixelData = sent.pixel_array.astype(
                sent.pixel_array.dtype.newbyteorder(">")
            ).tobytes()
            sent.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
            sent.set_original_encoding(False, False)
            ds = sent
        status = assoc.send_c_store(ds)
        assert status.Status == 0x0000
    assoc.release()
    spooled = _spooled(receiver)
    assert sorted(spooled) == sorted(sources)
    for uid, ds in spooled.items():
        assert ds.file_meta.TransferSyntaxUID == syntax
        original = sources[uid]
        assert ds.pixel_array.tolist() == original.pixel_array.tolist()
        assert ds.ImagePositionPatient == original.ImagePositionPatient
        assert ds.SeriesInstanceUID == original.SeriesInstanceUID
    store = Store(Path(receiver.storage.path) / "aenode.db")
    rows = store.execute("SELECT transfer_syntax FROM instances")
    assert {r["transfer_syntax"] for r in rows} == {syntax}
    store.close()


class _SmallPduSCP:
    """A pynetdicom storage SCP that takes PDUs of at most ``max_pdu`` bytes."""

    def __init__(self, max_pdu: int) -> None:
        self.port = free_port()
        self.max_pdu = max_pdu
        self.received: list[pydicom.Dataset] = []
        self.pdu_sizes: list[int] = []
        self.ae = AE(ae_title="SMALLPDU")
        self.ae.maximum_pdu_size = max_pdu
        self.ae.add_supported_context(MRImageStorage)
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.store), (evt.EVT_DATA_RECV, self.data)],
        )

    def store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000

    def data(self, event: evt.Event) -> None:
        self.pdu_sizes.append(len(event.data))

    def close(self) -> None:
        self.server.shutdown()


def test_a_peer_with_a_small_max_pdu_gets_fragments(data_dir: Path) -> None:
    scp = _SmallPduSCP(max_pdu=4096)
    try:
        files = _hippo(data_dir, 3)
        dest = DestinationSettings(ae_title="SMALLPDU", host="127.0.0.1", port=scp.port)
        outcome = send_files(dest, files, calling_ae="AENODE", timeout=10)
        assert outcome.ok, outcome
    finally:
        scp.close()
    # Each P-DATA-TF PDU: 6 bytes of PDU header plus at most max_pdu of PDV items.
    assert scp.pdu_sizes and max(scp.pdu_sizes) <= 4096 + 6
    assert len(scp.pdu_sizes) > 3 * 2  # pixel data of 3 instances did not fit 3 PDUs
    by_uid = {str(ds.SOPInstanceUID): ds for ds in scp.received}
    for path in files:
        original = pydicom.dcmread(path)
        assert by_uid[str(original.SOPInstanceUID)].PixelData == original.PixelData


def test_outbox_recover_resends_rows_left_sending(tmp_path: Path, data_dir: Path) -> None:
    scp = _SmallPduSCP(max_pdu=0)
    store = Store(tmp_path / "aenode.db")
    try:
        files = _hippo(data_dir, 2)
        with store.transaction() as conn:
            job = record_job(
                conn, "r", "m", "1.2", {"image": SeriesInfo("1.2", "3", 0, "MR", "", ())}, 0
            )
            assert job is not None and job.id is not None
            move(conn, job.id, JobState.RUNNING)
            move(conn, job.id, JobState.INFERRED)
        settings = ExportSettings(
            destinations=[
                DestinationSettings(ae_title="SMALLPDU", host="127.0.0.1", port=scp.port)
            ],
            retry=RetrySettings(timeout_seconds=10),
        )
        outbox = Outbox(store, settings, "AENODE")
        with store.transaction() as conn:
            assert outbox.add(job.id, files, conn=conn) == 1
            move(conn, job.id, JobState.EXPORTING)
        # A process claims the row, then dies before sending.
        claimed = store.execute("UPDATE outbox SET state='sending' RETURNING id")
        assert len(claimed) == 1
        assert outbox.run_due() == 0  # a row being sent is nobody else's
        assert Outbox(store, settings, "AENODE").recover() == 1  # the next start
        assert outbox.run_due() == 1
        (row,) = store.execute("SELECT state, files FROM outbox")
        assert row["state"] == "sent" and all(e["sent"] for e in json.loads(row["files"]))
        assert store.execute("SELECT state FROM jobs")[0]["state"] == "done"
        sent = sorted(str(ds.SOPInstanceUID) for ds in scp.received)
        assert sent == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    finally:
        scp.close()
        store.close()


def _store_files(port: int, files: list[Path]) -> list[int]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="AENODE")
    assert assoc.is_established
    statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
    assoc.release()
    return statuses


def test_a_receiving_process_that_dies_is_restarted(tmp_path: Path, data_dir: Path) -> None:
    settings = _settings(tmp_path, receivers=1)
    pool = ReceiverPool(settings)
    pool.start()
    try:
        files = _hippo(data_dir, 4)
        assert _store_files(settings.node.port, files[:2]) == [0, 0]
        (child,) = multiprocessing.active_children()
        os.kill(child.pid or 0, signal.SIGKILL)
        child.join(10)
        assert pool.check() == 1
        (restarted,) = multiprocessing.active_children()
        assert restarted.pid != child.pid
        assert _store_files(settings.node.port, files[2:]) == [0, 0]
        assert pool.check() == 0
    finally:
        pool.stop()
    spooled = _spooled(settings)
    assert sorted(spooled) == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    store = Store(Path(settings.storage.path) / "aenode.db")
    assert store.execute("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 4
    store.close()
    assert time.time() > 0
