"""No PHI in logs from any source (aenode/phi.py): pydicom's warnings about a malformed
header quote raw values; with ``logging.phi`` off they reach the log scrubbed.

Real data: ../shared/data/cq500-ct0, whose PatientName and PatientID are ``CQ500-CT-1``;
one slice is sent with PatientID's VR flipped from LO to IS, so that pydicom warns
``Invalid value for VR IS: 'CQ500-CT-1'`` when the receiver reads the header.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodes import Receivers
from pynetdicom import AE, _config
from test_receive_check import split

from aenode.cli import configure_logging
from aenode.config import Settings
from aenode.phi import THIRD_PARTY, scrub

NAME = "CQ500-CT-1"


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    names = ("aenode", *THIRD_PARTY)
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    yield
    logging.captureWarnings(False)
    for name, (handlers, propagate) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


def test_scrub_keeps_words_tags_and_vr_codes() -> None:
    assert scrub(f"Invalid value for VR IS: '{NAME}'. See (0010,0020)") == (
        "Invalid value for VR IS: '<redacted>'. See (0010,0020)"
    )
    assert scrub(f"received b'{NAME}' with length 10") == "received '<redacted>' with length 10"
    assert scrub("Unknown Value Representation 'CW' in tag (0008,0060)").count("'CW'") == 1


@pytest.mark.usefixtures("restore_logging")
def test_library_warnings_and_records_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(Settings())
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"Invalid value for VR PN: '{NAME}'", UserWarning, stacklevel=1)
    logging.getLogger("pydicom").warning("bad bytes %r in PatientName", NAME.encode())
    logging.getLogger("aenode.test").warning("PatientID %r refused", NAME, extra={"patient": NAME})
    logging.getLogger("aenode.test").warning("SeriesDescription 'HippoCrop' kept")
    err = capsys.readouterr().err
    assert NAME not in err
    assert "Invalid value for VR PN: '<redacted>'" in err
    assert "bad bytes '<redacted>' in PatientName" in err
    assert "PatientID '<redacted>' refused" in err and "patient=" not in err
    assert "SeriesDescription 'HippoCrop' kept" in err


@pytest.mark.usefixtures("restore_logging")
def test_phi_on_passes_records_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(Settings.model_validate({"logging": {"phi": True}}))
    logging.getLogger("pydicom").warning("bad value %r", NAME)
    assert f"bad value '{NAME}'" in capsys.readouterr().err


@pytest.mark.network
def test_malformed_header_at_receipt_leaves_no_patient_id_in_the_log(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = sorted(p for p in (data_dir / "cq500-ct0").rglob("*") if p.is_file())[0]
    meta, stream, ts = split(source)
    at = stream.index(b"\x10\x00\x20\x00LO")  # PatientID
    bad = tmp_path / "bad-id.dcm"
    bad.write_bytes(meta + stream[:at] + b"\x10\x00\x20\x00IS" + stream[at + 6 :])
    (tmp_path / "node").mkdir()
    node = Receivers(tmp_path / "node").start()
    try:
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ts)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="AENODE")
        assert assoc.is_established
        try:
            assert assoc.send_c_store(bad).Status == 0x0000
        finally:
            assoc.release()
    finally:
        node.stop()
    log = node.log_text()
    assert "Invalid value for VR IS: '<redacted>'" in log  # the warning was there, scrubbed
    assert NAME not in log
