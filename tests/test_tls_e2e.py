"""DICOM TLS and storage commitment end to end with a real Orthanc as the PACS.

Orthanc listens for DICOM TLS only (``DicomTlsEnabled``, client certificates required);
a study goes in over TLS (dcmtk storescu ``+tls``), Orthanc routes it to ``aenode serve``'s
TLS port (modality ``UseDicomTls``; aenode's plain port is off), the hippocampus results go
back over TLS with storage commitment, and Orthanc's N-EVENT-REPORT comes over TLS to the
node. Real data: udacity-mr/Study1.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from conftest import ROOT, dcmtk, free_port
from orthanc import Orthanc
from test_e2e import SC, SEG, SR, _results
from test_receive import DCMTK_ENV, NodeProcess
from tlscerts import make_certs

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROUTE_STABLE_STUDY = (ROOT / "docker" / "orthanc" / "route-stable-study.lua").read_text()


def test_study_in_and_results_out_over_tls_with_storage_commitment(
    tmp_path: Path, data_dir: Path
) -> None:
    certs = make_certs(tmp_path / "pki")
    ca, cert, key = certs.pem("ca"), certs.pem("server"), certs.key("server")
    tls_port = free_port()
    orthanc = Orthanc(
        tmp_path / "orthanc",
        modalities={
            "aenode": {"AET": "AENODE", "Host": "127.0.0.1", "Port": tls_port, "UseDicomTls": True}
        },
        lua=ROUTE_STABLE_STUDY,
        extra={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(cert),
            "DicomTlsPrivateKey": str(key),
            "DicomTlsTrustedCertificates": str(ca),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    (tmp_path / "node").mkdir()
    tls = {"ca": str(ca), "cert": str(cert), "key": str(key)}
    node = NodeProcess(
        tmp_path / "node",
        {
            "node": {"port": None, "tls": {"port": tls_port, **tls}},
            "selection": {
                "rules": [
                    {
                        "name": "hippocampus",
                        "models": ["hippocampus"],
                        "series": {"tag": "SeriesDescription", "regex": "HippoCrop"},
                    }
                ]
            },
            "series": {"quiet_seconds": 2.0},
            "export": {
                "destinations": [
                    {
                        "ae_title": "ORTHANC",
                        "host": "127.0.0.1",
                        "port": orthanc.dicom_port,
                        "tls": tls,
                        "storage_commitment": True,
                    }
                ],
                "retry": {"initial_seconds": 1.0, "max_interval_seconds": 4.0},
            },
            "logging": {"level": "INFO"},
        },
    )
    orthanc.start()
    node.start()
    study_dir = data_dir / "udacity-mr" / "Study1" / "13_HCropVolume"
    study_uid = str(pydicom.dcmread(next(study_dir.glob("*.dcm"))).StudyInstanceUID)
    try:
        plain = subprocess.run(
            [dcmtk("echoscu"), "-to", "5", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port)],
            capture_output=True, env=DCMTK_ENV, timeout=30,
        )  # fmt: skip
        assert plain.returncode != 0  # Orthanc takes TLS only
        sent = subprocess.run(
            [dcmtk("storescu"), "+tls", str(certs.key("client")), str(certs.pem("client")),
             "+cf", str(ca), "-aec", "ORTHANC", "+sd", "127.0.0.1", str(orthanc.dicom_port),
             str(study_dir)],
            capture_output=True, text=True, env=DCMTK_ENV, timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 150
        state = None
        while time.monotonic() < deadline:
            jobs = node.query("SELECT state, reason FROM jobs")
            state = jobs[0]["state"] if jobs else None
            if state in ("committed", "failed", "done"):
                break
            time.sleep(0.5)
        assert state == "committed", (jobs and dict(jobs[0]), node.log_text()[-4000:])
        found = _results(orthanc, study_uid)
        assert {k: len(v) for k, v in found.items()} == {SEG: 1, SC: 1, SR: 1}
        (row,) = node.query("SELECT state, commit_uid FROM outbox")
        assert row["state"] == "committed"
        (report,) = node.query(
            "SELECT calling_ae FROM commitment_reports WHERE transaction_uid=?",
            (row["commit_uid"],),
        )
        assert report["calling_ae"] == "ORTHANC"
        # Orthanc's study came in over TLS with Orthanc's certificate; so did its report.
        subjects = {r["peer_subject"] for r in node.query("SELECT peer_subject FROM associations")}
        assert subjects == {"CN=aenode,O=aenode tests"}
        log = node.log_text()
        assert "storage commitment report: 3 committed, 0 failed" in log
        assert "client certificate CN=aenode,O=aenode tests" in log
    finally:
        node.stop()
        orthanc.stop()
