"""The durable outbox: back-off, give-up, restart, no double sends; against dcmtk storescp,
pynetdicom peers and a real Orthanc. Result objects are built from the real HippoCrop series
(udacity-mr/Study1) with a synthetic two-box mask (see test_results.py)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import dcmtk, free_port
from orthanc import Orthanc, orthanc_server  # noqa: F401 (fixture)
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]
from test_results import CARD, box_mask, load_volume, prediction_for
from test_scu import wait_port

from aenode.config import DestinationSettings, ExportSettings, ResultsSettings, RetrySettings
from aenode.export.outbox import (
    Outbox,
    OutboxError,
    backoff_seconds,
    destination_key,
    parse_destination,
)
from aenode.infer.cards import ModelCard
from aenode.jobs import move, record_job
from aenode.records import Job, SeriesInfo
from aenode.results import write_results
from aenode.states import JobState
from aenode.store import Store

HIPPO = "udacity-mr/Study1/13_HCropVolume"


@pytest.fixture(scope="module")
def make_results(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Writes a fresh result set (new UIDs) per call: SEG, SC report, SR."""
    volume = load_volume(data_dir / HIPPO)
    card = ModelCard.model_validate(CARD)
    prediction = prediction_for(volume, box_mask(volume))

    def make() -> list[Path]:
        out = tmp_path_factory.mktemp("job")
        job = Job("hippo", "hippocampus", volume.series.study_uid, {"image": volume.series})
        return write_results(job, {"image": volume}, prediction, card, ResultsSettings(), out).files

    return make


def new_job(store: Store) -> int:
    """A job recorded and run up to inference, through the owner of the jobs table."""
    now = time.time()
    series = SeriesInfo("1.2.3", os.urandom(4).hex(), 0, "MR", "", ())
    with store.transaction() as conn:
        job = record_job(conn, "hippo", "hippocampus", "1.2.3", {"image": series}, now)
        assert job is not None and job.id is not None
        move(conn, job.id, JobState.RUNNING, t_started=now)
        move(conn, job.id, JobState.INFERRED, t_inferred=now)
    return job.id


def job_row(store: Store, job_id: int) -> dict:
    return dict(store.execute("SELECT * FROM jobs WHERE id=?", (job_id,))[0])


def outbox_rows(store: Store, job_id: int) -> list[dict]:
    return [dict(r) for r in store.execute("SELECT * FROM outbox WHERE job_id=?", (job_id,))]


def export_settings(
    *ports_aets: tuple[int, str], initial: float = 1.0, maximum: float = 4.0, give_up: float = 10.0
) -> ExportSettings:
    return ExportSettings(
        destinations=[
            DestinationSettings(ae_title=a, host="127.0.0.1", port=p) for p, a in ports_aets
        ],
        retry=RetrySettings(
            initial_seconds=initial,
            max_interval_seconds=maximum,
            give_up_after_seconds=give_up,
            timeout_seconds=5,
        ),
    )


def start_storescp(port: int, out: Path) -> subprocess.Popen[bytes]:
    out.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "STORESCP", "-od", str(out), "+xa", "-pm", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "aenode.db")
    yield s
    s.close()


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_seconds(n, 5, 60) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_destination_key_round_trip() -> None:
    d = DestinationSettings(ae_title="PACS", host="10.0.0.1", port=104)
    assert destination_key(d) == "PACS@10.0.0.1:104"
    assert parse_destination("PACS@10.0.0.1:104") == d
    with pytest.raises(OutboxError, match="'nonsense': expected AE@host:port"):
        parse_destination("nonsense")


def test_unreadable_file_is_refused_before_queueing(store: Store, tmp_path: Path) -> None:
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"junk")
    outbox = Outbox(store, export_settings((104, "PACS")), "AENODE")
    with pytest.raises(OutboxError, match=r"x\.dcm: cannot queue for export"):
        outbox.add(new_job(store), [bad])
    assert store.execute("SELECT COUNT(*) AS n FROM outbox")[0]["n"] == 0


def test_no_destination_queues_nothing(store: Store, make_results) -> None:
    # The job runner decides that such a job is done (test_jobs_volume.py).
    job = new_job(store)
    assert Outbox(store, ExportSettings(), "AENODE").add(job, make_results()) == 0
    assert outbox_rows(store, job) == []
    assert job_row(store, job)["state"] == "inferred"


@pytest.mark.network
def test_sent_to_storescp_and_job_done(store: Store, make_results, tmp_path: Path) -> None:
    port = free_port()
    proc = start_storescp(port, tmp_path / "in")
    try:
        files = make_results()
        job = new_job(store)
        outbox = Outbox(store, export_settings((port, "STORESCP")), "AENODE")
        with store.transaction() as conn:  # atomically with the caller's own writes
            assert outbox.add(job, files, conn=conn) == 1
        assert outbox.add(job, files) == 1  # still the one row to send: queued once
        assert len(outbox_rows(store, job)) == 1
        assert outbox.run_due() == 1
        assert outbox.run_due() == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    (row,) = outbox_rows(store, job)
    assert (row["state"], row["attempts"], row["last_error"]) == ("sent", 1, None)
    jr = job_row(store, job)
    assert jr["state"] == "done" and jr["t_exported"] is not None
    received = {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "in").iterdir()}
    assert received == {pydicom.dcmread(f).SOPInstanceUID for f in files}


@pytest.mark.network
def test_backoff_give_up_restart_and_manual_retry(tmp_path: Path, make_results) -> None:
    port = free_port()  # nobody listens
    settings = export_settings((port, "PACS"), initial=1, maximum=4, give_up=10)
    store = Store(tmp_path / "a.db")
    job = new_job(store)
    outbox = Outbox(store, settings, "AENODE")
    outbox.add(job, make_results())
    store.execute("UPDATE outbox SET next_try_at=1000")
    schedule = []
    for now in (1000.0, 1001.0, 1003.0):
        assert outbox.run_due(now=now) == 1
        assert outbox.run_due(now=now + 0.5) == 0  # not due yet
        (row,) = outbox_rows(store, job)
        schedule.append(row["next_try_at"] - now)
    assert schedule == [1.0, 2.0, 4.0]
    assert row["state"] == "pending" and row["attempts"] == 3
    assert f"PACS@127.0.0.1:{port}" in row["last_error"]
    assert job_row(store, job)["reason"].startswith("export retrying (3 tries)")
    store.close()
    # a restart: a new process opens the same store and carries on where it was
    store = Store(tmp_path / "a.db")
    outbox = Outbox(store, settings, "AENODE")
    assert outbox.run_due(now=1007.0) == 1
    (row,) = outbox_rows(store, job)
    assert row["next_try_at"] == 1010.0  # capped at the give-up time
    assert outbox.run_due(now=1010.0) == 1
    (row,) = outbox_rows(store, job)
    assert (row["state"], row["attempts"]) == ("failed", 5)
    jr = job_row(store, job)
    assert jr["state"] == "failed"
    assert jr["reason"].startswith(f"export to PACS@127.0.0.1:{port} failed after 5 tries: ")
    assert outbox.run_due(now=5000.0) == 0
    assert outbox.retry(job) is True
    assert outbox.retry(job) is False
    (row,) = outbox_rows(store, job)
    assert (row["state"], row["attempts"]) == ("pending", 0)
    assert job_row(store, job)["state"] == "exporting"
    store.close()


@pytest.mark.network
def test_partial_failure_resends_only_the_rest(store: Store, make_results, tmp_path: Path) -> None:
    """A peer that takes only the SC: SEG and SR go later, the SC is never sent twice."""
    port = free_port()
    ae = AE(ae_title="PICKY")
    ae.add_supported_context(SecondaryCaptureImageStorage)
    stored: list[str] = []

    def handle(event: evt.Event) -> int:
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
    )
    files = make_results()
    job = new_job(store)
    outbox = Outbox(store, export_settings((port, "STORESCP"), initial=0.01), "AENODE")
    outbox.add(job, files)
    try:
        assert outbox.run_due() == 1
    finally:
        server.shutdown()
    sc_uid = pydicom.dcmread(files[1]).SOPInstanceUID
    assert stored == [sc_uid]
    (row,) = outbox_rows(store, job)
    assert row["state"] == "pending"
    assert "no accepted presentation context" in row["last_error"]
    assert [e["sent"] for e in json.loads(row["files"])] == [False, True, False]
    proc = start_storescp(port, tmp_path / "in")
    try:
        time.sleep(0.02)
        assert outbox.run_due() == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    got = sorted(pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "in").iterdir())
    assert got == sorted(pydicom.dcmread(f).SOPInstanceUID for i, f in enumerate(files) if i != 1)
    assert job_row(store, job)["state"] == "done"


@pytest.mark.network
def test_orthanc_outage_retried_none_twice(
    orthanc_server: Orthanc,  # noqa: F811 (the imported fixture)
    store: Store,
    make_results,
    data_dir: Path,
) -> None:
    settings = export_settings(
        (orthanc_server.dicom_port, "ORTHANC"), initial=0.2, maximum=0.5, give_up=120
    )
    outbox = Outbox(store, settings, "AENODE")
    first = make_results()
    job1 = new_job(store)
    outbox.add(job1, first)
    assert outbox.run_due() == 1
    assert job_row(store, job1)["state"] == "done"
    study = pydicom.dcmread(first[0]).StudyInstanceUID
    instances = orthanc_server.study_instances(study)
    uids = {orthanc_server.instance_tags(i["ID"])["SOPInstanceUID"] for i in instances}
    assert uids == {pydicom.dcmread(f).SOPInstanceUID for f in first}
    modalities = sorted(orthanc_server.instance_tags(i["ID"])["Modality"] for i in instances)
    assert modalities == ["OT", "SEG", "SR"]

    orthanc_server.stop()
    second = make_results()
    job2 = new_job(store)
    outbox.add(job2, second)
    assert outbox.run_due() == 1
    (row,) = outbox_rows(store, job2)
    assert row["state"] == "pending" and row["attempts"] == 1
    assert f"ORTHANC@127.0.0.1:{orthanc_server.dicom_port}" in row["last_error"]
    assert job_row(store, job2)["state"] == "inferred"

    orthanc_server.start()
    stop = threading.Event()
    worker = threading.Thread(target=outbox.run, args=(stop, 0.05))
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while job_row(store, job2)["state"] != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert job_row(store, job2)["state"] == "done"
    assert orthanc_server.instance_count() == 6
    changes = orthanc_server.get_json("/changes?limit=1000")["Changes"]
    new_instances = [c for c in changes if c["ChangeType"] == "NewInstance"]
    assert len(new_instances) == 6  # each object stored exactly once
    # the fixture's upload helper: a source instance of the same study joins it
    source = sorted((data_dir / HIPPO).glob("*.dcm"))[0]
    uploaded = orthanc_server.upload(source)
    assert orthanc_server.instance_tags(uploaded)["SeriesDescription"] == "HippoCrop"
    assert len(orthanc_server.study_instances(study)) == 7
