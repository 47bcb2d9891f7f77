"""Storage commitment of exported results against a real Orthanc (its Storage Commitment SCP
sends the N-EVENT-REPORT on a new association to our receiving processes, which record it in
the store the outbox reads). Result objects from the real HippoCrop series (udacity-mr)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from nodes import Receivers
from orthanc import Orthanc
from test_outbox import make_results, new_job, outbox_rows  # noqa: F401 (fixture)

from aenode.cli import main as cli_main
from aenode.config import DestinationSettings, ExportSettings, RetrySettings
from aenode.export.outbox import Outbox
from aenode.store import Store

pytestmark = pytest.mark.network


@pytest.fixture
def files(request: pytest.FixtureRequest) -> list[Path]:
    """A fresh result set (SEG, SC, SR) from test_outbox's ``make_results``."""
    made: list[Path] = request.getfixturevalue("make_results")()
    return made


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[Receivers]:
    (tmp_path / "node").mkdir()
    node = Receivers(tmp_path / "node").start()
    try:
        yield node
    finally:
        node.stop()


def _orthanc(tmp_path: Path, report_port: int) -> Orthanc:
    return Orthanc(
        tmp_path / "orthanc", modalities={"aenode": ("AENODE", "127.0.0.1", report_port)}
    )


def _outbox(store: Store, orthanc: Orthanc, timeout: float = 30.0) -> Outbox:
    settings = ExportSettings(
        destinations=[
            DestinationSettings(
                ae_title="ORTHANC",
                host="127.0.0.1",
                port=orthanc.dicom_port,
                storage_commitment=True,
            )
        ],
        retry=RetrySettings(
            initial_seconds=0.5,
            max_interval_seconds=1.0,
            give_up_after_seconds=60,
            timeout_seconds=10,
        ),
        commitment_timeout_seconds=timeout,
    )
    return Outbox(store, settings, "AENODE")


def _run_until(outbox: Outbox, store: Store, job: int, state: str, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        outbox.run_due()
        (row,) = outbox_rows(store, job)
        if row["state"] == state:
            return row
        time.sleep(0.1)
    pytest.fail(f"outbox row not {state} within {seconds} s: {outbox_rows(store, job)}")


def test_job_committed_only_after_orthancs_report(
    receivers: Receivers, tmp_path: Path, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    orthanc = _orthanc(tmp_path, receivers.port).start()
    store = Store(receivers.storage / "aenode.db")
    try:
        job = new_job(store)
        outbox = _outbox(store, orthanc)
        assert outbox.add(job, files) == 1
        outbox.run_due()
        (row,) = outbox_rows(store, job)
        assert row["state"] in ("committing", "committed") and row["commit_uid"]
        assert orthanc.instance_count() == len(files)
        row = _run_until(outbox, store, job, "committed", 20)
        assert row["committed_at"] is not None and row["attempts"] == 0
        job_state = store.execute("SELECT state, reason FROM jobs WHERE id=?", (job,))[0]
        assert (job_state["state"], job_state["reason"]) == ("committed", None)
        (report,) = store.execute("SELECT * FROM commitment_reports")
        assert report["transaction_uid"] == row["commit_uid"]
        assert report["calling_ae"] == "ORTHANC"
        committed = set(json.loads(report["committed"]))
        assert committed == {e["sop_uid"] for e in json.loads(row["files"])}
        assert json.loads(report["failed"]) == {}
        trail = store.execute(
            "SELECT detail FROM audit WHERE job_id=? AND event='commitment' ORDER BY id", (job,)
        )
        steps = [json.loads(r["detail"]) for r in trail]
        assert [d["outcome"] for d in steps] == ["requested", "committed"]
        assert {d["transaction_uid"] for d in steps} == {row["commit_uid"]}
        config = tmp_path / "cli.yaml"
        config.write_text(yaml.safe_dump({"storage": {"path": str(receivers.storage)}}))
        assert cli_main(["--config", str(config), "jobs"]) == 0
        out = capsys.readouterr().out
        assert f"{job:>5}  committed" in out
        assert f"export: ORTHANC@127.0.0.1:{orthanc.dicom_port} committed" in out
    finally:
        store.close()
        orthanc.stop()


def test_report_lost_over_an_orthanc_restart_and_a_failed_instance_sent_again(
    receivers: Receivers, tmp_path: Path, files: list[Path]
) -> None:
    # Orthanc first knows us at a port where nothing listens: its report is lost.
    orthanc = _orthanc(tmp_path, free_port()).start()
    store = Store(receivers.storage / "aenode.db")
    try:
        job = new_job(store)
        outbox = _outbox(store, orthanc, timeout=3.0)
        outbox.add(job, files)
        outbox.run_due()
        (row,) = outbox_rows(store, job)
        assert row["state"] == "committing"
        first_uid = row["commit_uid"]
        # One object disappears from the PACS before it reports (Orthanc answers 0x0112).
        victim = orthanc.study_instances(
            orthanc.instance_tags(orthanc.get_json("/instances")[0])["StudyInstanceUID"]
        )[0]["ID"]
        victim_uid = orthanc.instance_tags(victim)["SOPInstanceUID"]
        orthanc._request("DELETE", f"/instances/{victim}")
        # Restart Orthanc, now pointing at our listener.
        config = json.loads(orthanc.config_path.read_text())
        config["DicomModalities"]["aenode"] = ["AENODE", "127.0.0.1", receivers.port]
        orthanc.config_path.write_text(json.dumps(config))
        orthanc.restart()
        # No report within 3 s: a retry asks again (nothing is sent twice for that) ...
        row = _run_until(outbox, store, job, "pending", 10)
        assert "no storage commitment report within 3 s" in row["last_error"]
        assert all(e["sent"] for e in json.loads(row["files"]))
        # ... Orthanc reports the deleted object failed: it is sent again, then committed.
        row = _run_until(outbox, store, job, "committed", 30)
        assert row["commit_uid"] != first_uid
        assert orthanc.instance_count() == len(files)
        reports = store.execute("SELECT failed FROM commitment_reports ORDER BY received_at")
        failures = [json.loads(r["failed"]) for r in reports]
        assert any(victim_uid in f and f[victim_uid].startswith("0x0112") for f in failures)
        assert json.loads(reports[-1]["failed"]) == {}
        job_state = store.execute("SELECT state FROM jobs WHERE id=?", (job,))[0]["state"]
        assert job_state == "committed"
        log = receivers.log_text()
        assert "storage commitment report" not in log or "not recorded" not in log
    finally:
        store.close()
        orthanc.stop()
