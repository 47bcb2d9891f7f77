"""The operations web server of a real ``aenode serve``: dashboard, /healthz, /metrics, audit.

One node (hippocampus only, dcmtk storescp as the PACS) takes in the whole of
udacity-mr/Study1 (5 MR series, 120 instances) in one association; the tests then read
what the node serves over real HTTP: ``/metrics`` parsed with prometheus_client's parser,
``/healthz`` turned 503 by an immutable store folder (``chattr +i``: root ignores
``chmod``) or a disk floor above the free space, the dashboard in headless Chromium
(Debian ``chromium``, ``--dump-dom`` and ``--screenshot``), and ``aenode audit``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from conftest import ROOT, free_port
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_outbox import start_storescp
from test_receive import AENODE, NodeProcess, storescu

from aenode.config import ConfigError, Settings, load_settings
from aenode.infer.cards import ModelCard
from aenode.store import Store
from aenode.web.server import WebServer

pytestmark = pytest.mark.network

STUDY = "udacity-mr/Study1"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@dataclass
class WebNode:
    node: NodeProcess
    base: str
    study_uid: str
    sent: int
    received: Path
    tmp: Path
    settings: Settings


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes, str]:
    """GET ``url``: status, body and content type (an HTTP error status is returned too)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("content-type", "")


def post(url: str, headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[WebNode]:
    tmp = tmp_path_factory.mktemp("web")
    pacs_port = free_port()
    pacs = start_storescp(pacs_port, tmp / "pacs")
    http_port = free_port()
    node = NodeProcess(
        tmp,
        {
            "http": {"host": "127.0.0.1", "port": http_port},
            "runtime": {"device": "cpu"},
            "selection": {
                "rules": [
                    {
                        "name": "hippocampus",
                        "models": ["hippocampus"],
                        "series": {"tag": "SeriesDescription", "regex": "HippoCrop"},
                    }
                ]
            },
            "export": {
                "destinations": [{"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}],
                "retry": {"initial_seconds": 1.0},
            },
            "logging": {"level": "INFO"},
        },
    )
    try:
        node.start()
        folder = data_dir / STUDY
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        result = storescu(node.port, folder, opts=("+sd", "+r"))
        assert result.returncode == 0, result.stderr
        node.wait_for(
            lambda: bool(node.query("SELECT 1 FROM jobs WHERE state IN ('done', 'failed')")),
            timeout=180,
        )
        (job,) = node.query("SELECT state, reason FROM jobs")
        assert job["state"] == "done", job["reason"]
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        yield WebNode(
            node,
            f"http://127.0.0.1:{http_port}",
            study_uid,
            len(files),
            tmp / "pacs",
            tmp,
            load_settings(node.config, environ={}),
        )
    finally:
        node.stop()
        pacs.terminate()
        pacs.wait(10)


def test_metrics_count_exactly_the_instances_sent(web: WebNode) -> None:
    status, body, ctype = get(f"{web.base}/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    received = {
        s.labels["calling_ae"]: s.value
        for s in families["aenode_instances_received"].samples
        if s.name == "aenode_instances_received_total"
    }
    assert received == {"STORESCU": web.sent}
    # Bytes received are the data sets as they came over the wire: each spooled file less
    # its preamble and file meta (132 bytes + the group length element + its value).
    spooled = 0
    for path in (web.node.storage / "spool").rglob("*.dcm"):
        raw = path.read_bytes()
        spooled += len(raw) - (132 + 12 + int.from_bytes(raw[140:144], "little"))
    (size,) = [s.value for s in families["aenode_bytes_received"].samples]
    assert size == spooled
    completed = {
        s.labels["completed_by"]: s.value for s in families["aenode_series_completed"].samples
    }
    assert sum(completed.values()) == 5, completed
    jobs = {
        (s.labels["model"], s.labels["state"]): s.value for s in families["aenode_jobs"].samples
    }
    for state in ("queued", "running", "inferred", "exporting", "done"):
        assert jobs[("hippocampus", state)] == 1, jobs
    assert ("hippocampus", "failed") not in jobs
    counts = {
        s.labels["stage"]: s.value
        for s in families["aenode_stage_seconds"].samples
        if s.name == "aenode_stage_seconds_count"
    }
    stages = {"receive-to-complete", "complete-to-start", "volume", "infer", "write", "export"}
    assert counts == {stage: 1.0 for stage in (*stages, "end-to-end")}
    depth = {s.labels["destination"]: s.value for s in families["aenode_outbox_depth"].samples}
    assert list(depth.values()) == [0.0]
    (free,) = families["aenode_disk_free_bytes"].samples
    assert free.value > 10e6
    assert families["aenode_instances_refused"].samples == []
    (info,) = families["aenode_executor_info"].samples
    assert info.labels == {"executor": "local"} and info.value == 1


def test_refused_instances_are_counted_by_status(
    web: WebNode, tmp_path: Path, data_dir: Path
) -> None:
    # A Study1 file without its Study Instance UID: the node answers 0xC000.
    ds = pydicom.dcmread(next((data_dir / STUDY / "13_HCropVolume").glob("*.dcm")))
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=False)
    before = web.node.query("SELECT COUNT(*) AS n FROM refusals")[0]["n"]
    storescu(web.node.port, bad)
    web.node.wait_for(lambda: web.node.query("SELECT COUNT(*) AS n FROM refusals")[0]["n"] > before)
    _, body, _ = get(f"{web.base}/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    refused = {s.labels["status"]: s.value for s in families["aenode_instances_refused"].samples}
    assert refused == {"0xC000": before + 1}
    received = [
        s.value for s in families["aenode_instances_received"].samples if s.name.endswith("_total")
    ]
    assert received == [web.sent]  # a refused instance is not counted as received


def test_healthz_ok_then_503_on_a_read_only_store_folder(web: WebNode) -> None:
    status, body, _ = get(f"{web.base}/healthz")
    health = json.loads(body)
    assert status == 200, health
    assert {k: health["receivers"][k] for k in ("listening", "expected")} == {
        "listening": 2,
        "expected": 2,
    }
    assert health["store"]["writable"] is True
    assert health["executor"]["executor"] == "local"
    assert health["executor"]["workers"][0]["models"] == ["hippocampus"]
    assert health["models"]["loaded"] == ["hippocampus"]
    (dest,) = health["destinations"]
    assert dest["last_success_at"] and dest["last_failure_at"] is None and dest["pending"] == 0
    folder = web.node.storage
    # Root ignores chmod: make the folder immutable (ext4 attribute) so nothing new can be
    # created in it, as on a file system remounted read-only.
    lock = ["chattr", "+i", str(folder)] if os.geteuid() == 0 else ["chmod", "555", str(folder)]
    unlock = ["chattr", "-i", str(folder)] if os.geteuid() == 0 else ["chmod", "755", str(folder)]
    subprocess.run(lock, check=True)
    try:
        status, body, _ = get(f"{web.base}/healthz")
    finally:
        subprocess.run(unlock, check=True)
    health = json.loads(body)
    assert status == 503
    assert health["status"] == "failing" and health["store"]["writable"] is False
    assert len(health["failing"]) == 1 and health["failing"][0].startswith(
        f"store: {folder} not writable"
    )
    assert get(f"{web.base}/healthz")[0] == 200  # writable again


def test_healthz_503_below_the_disk_floor(web: WebNode) -> None:
    # The running node's settings with a floor above any disk: a second web server on the
    # same store and receivers answers 503 naming the disk only.
    settings = web.settings.model_copy(deep=True)
    settings.storage.min_free_mb = 10**9
    settings.http.port = free_port()
    card = ModelCard.model_validate(
        yaml.safe_load((ROOT / "models" / "hippocampus" / "model.yaml").read_text())
    )
    server = WebServer(settings)
    server.start(Store(web.node.storage / "aenode.db"), [card], receivers=2)
    try:
        status, body, _ = get(f"http://127.0.0.1:{server.port}/healthz")
    finally:
        server.stop()
    health = json.loads(body)
    assert status == 503
    (failing,) = health["failing"]
    assert failing.startswith("disk: ") and "storage.min_free_mb 1000000000" in failing


def test_actions_need_allow_actions_and_the_token(web: WebNode) -> None:
    status, body = post(f"{web.base}/jobs/1/retry", {"Authorization": "Bearer x"})
    assert status == 403 and "http.allow_actions" in body["error"]
    settings = web.settings.model_copy(deep=True)
    settings.http.port = free_port()
    settings.http.token = "s3cret"
    settings.http.allow_actions = True
    server = WebServer(settings)
    server.start(Store(web.node.storage / "aenode.db"), [], receivers=2)
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert post(f"{base}/jobs/1/retry")[0] == 401
        assert post(f"{base}/jobs/1/retry", {"Authorization": "Bearer wrong"})[0] == 401
        status, body = post(f"{base}/jobs/1/retry", {"Authorization": "Bearer s3cret"})
        assert status == 409 and body["error"] == "job 1 is done, not failed or quarantined"
        status, body = post(
            f"{base}/jobs/1/retry",
            {"Content-Type": "application/x-www-form-urlencoded"},
            b"token=s3cret",
        )
        assert status == 409
    finally:
        server.stop()


def test_a_taken_http_port_stops_start_up_before_anything_listens(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        node = NodeProcess(tmp_path, {"http": {"host": "127.0.0.1", "port": port}})
        started = time.monotonic()
        result = subprocess.run(
            [AENODE, "--config", str(node.config), "serve"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"http.port: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "listening on" not in result.stderr and "models loaded" not in result.stderr
    assert time.monotonic() - started < 30


def test_allow_actions_needs_a_token() -> None:
    with pytest.raises(ConfigError, match=r"http.token: required when http.allow_actions"):
        load_settings(environ={"AENODE_HTTP__ALLOW_ACTIONS": "true"})
    assert load_settings(environ={"AENODE_HTTP__PORT": "null"}).http.port is None
    assert load_settings(environ={}).http.port == 8180


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp / 'chromium-profile'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dashboard_in_headless_chromium(web: WebNode, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium not found; run `make install` (scripts/system-deps.sh)")
    result = _chromium(tmp_path, "--dump-dom", f"{web.base}/")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    # The HippoCrop job, done, with its two volumes (the DOM Chromium built from the page).
    assert 'class="job" id="job-1" data-model="hippocampus" data-state="done"' in dom
    (job,) = web.node.query("SELECT findings FROM jobs")
    volumes = json.loads(job["findings"])["volumes_mm3"]
    assert set(volumes) == {"Anterior hippocampus", "Posterior hippocampus"}
    for label, mm3 in volumes.items():
        assert f'data-label="{label}">{label}: {mm3:,.0f} mm³' in dom
    assert 'src="/jobs/1/report.png"' in dom
    for section in ("health", "jobs", "studies", "series", "problems", "destinations", "models"):
        assert f'id="{section}"' in dom
    assert "HippoCrop" in dom and web.study_uid in dom and 'id="model-hippocampus"' in dom
    assert "not selected" in dom  # the other four series, with the rule's reason
    # The report page the dashboard shows inline is the SC object's pixels.
    status, png, ctype = get(f"{web.base}/jobs/1/report.png")
    assert status == 200 and ctype == "image/png"
    report = pydicom.dcmread(next(Path(web.node.storage / "results").rglob("report.dcm")))
    image = Image.open(io.BytesIO(png))
    assert image.size == (report.Columns, report.Rows)
    # A screenshot of the whole page (kept under the test's tmp folder).
    shot = tmp_path / "dashboard.png"
    result = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", web.base)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        assert len(img.getcolors(1 << 20) or []) > 50  # a rendered page, not a blank one
    if os.environ.get("AENODE_DOCS_SCREENSHOT"):
        shutil.copy(shot, os.environ["AENODE_DOCS_SCREENSHOT"])


def test_audit_lists_the_events_of_study1_in_order(web: WebNode) -> None:
    result = subprocess.run(
        [AENODE, "--config", str(web.node.config), "audit", web.study_uid, "--json"],
        capture_output=True,
        text=True,
        cwd=web.tmp,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)
    kinds = [e["event"] for e in events]
    times = [e["at"] for e in events]
    assert times == sorted(times)
    (received,) = [e for e in events if e["event"] == "received"]
    assert received["detail"]["count"] == web.sent and received["detail"]["series"] == 5
    assert received["detail"]["calling_ae"] == "STORESCU"
    assert received["detail"]["peer_host"] == "127.0.0.1"
    assert kinds.count("series_complete") == 5 and kinds.count("not_selected") == 4
    (selected,) = [e for e in events if e["event"] == "selected"]
    assert (selected["detail"]["rule"], selected["detail"]["model"]) == (
        "hippocampus",
        "hippocampus",
    )
    moves = [(e["detail"]["from"], e["detail"]["to"]) for e in events if e["event"] == "job"]
    assert moves == [
        ("queued", "running"),
        ("running", "inferred"),
        ("inferred", "exporting"),
        ("exporting", "done"),
    ]
    (results,) = [e for e in events if e["event"] == "results"]
    stored = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in web.received.iterdir()
    }
    assert set(results["detail"]["sop_uids"]) == stored and len(stored) == 3  # SEG, SC, SR
    (export,) = [e for e in events if e["event"] == "export"]
    assert export["detail"]["ok"] is True and export["detail"]["sent"] == 3
    order = [
        kinds.index("received"),
        kinds.index("series_complete"),
        kinds.index("selected"),
        kinds.index("job"),
        kinds.index("results"),
        kinds.index("export"),
        len(kinds) - 1 - kinds[::-1].index("job"),
    ]
    assert order == sorted(order), kinds
    # Text form: one line per event; no patient name or ID anywhere.
    text = subprocess.run(
        [AENODE, "--config", str(web.node.config), "audit", web.study_uid],
        capture_output=True,
        text=True,
        cwd=web.tmp,
        timeout=60,
    ).stdout
    assert len(text.splitlines()) == len(events)
    # The dashboard's page of the study: the same events, one row each, in the same order.
    status, page, _ = get(f"{web.base}/studies/{web.study_uid}")
    html = page.decode()
    assert status == 200 and html.count("<tr><td>") == len(events)
    positions = [html.index(f"<td>{kind}</td>") for kind in ("received", "results", "export")]
    assert positions == sorted(positions)
    status, body, _ = get(f"{web.base}/studies/{web.study_uid}.json")
    assert status == 200 and json.loads(body) == events
    unknown = subprocess.run(
        [AENODE, "--config", str(web.node.config), "audit", "1.2.3.4"],
        capture_output=True,
        text=True,
        cwd=web.tmp,
        timeout=60,
    )
    assert unknown.returncode == 1 and "no event for study 1.2.3.4" in unknown.stderr
    source = next(web.node.storage.joinpath("spool").rglob("*.dcm"))
    patient = pydicom.dcmread(source, stop_before_pixels=True)
    for value in (str(patient.PatientName), str(patient.PatientID)):
        if value:
            assert value not in text and value not in result.stdout
