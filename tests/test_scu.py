"""The C-STORE sender against real peers on loopback: dcmtk storescp and pynetdicom SCPs
that reject, fail, abort or stall. Sends the real HippoCrop series (udacity-mr/Study1)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import dcmtk, free_port
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from aenode.cli import main as cli_main
from aenode.config import DestinationSettings
from aenode.export.scu import echo, send_files

HIPPO = "udacity-mr/Study1/13_HCropVolume"


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp accepting every SOP class and transfer syntax into tmp_path/in."""
    port = free_port()
    out = tmp_path / "in"
    out.mkdir()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "STORESCP", "-od", str(out), "+xa", "-pm", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def dest(port: int, aet: str = "STORESCP") -> DestinationSettings:
    return DestinationSettings(ae_title=aet, host="127.0.0.1", port=port)


def hippo_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / HIPPO).glob("*.dcm"))


@pytest.mark.network
def test_files_arrive_with_identical_content(storescp, data_dir: Path) -> None:
    port, out = storescp
    files = hippo_files(data_dir)
    outcome = send_files(dest(port), files, calling_ae="AENODE", timeout=30)
    assert outcome.ok, outcome
    assert outcome.error is None and outcome.failed == {}
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    assert sorted(outcome.sent) == sorted(sent)
    received = [pydicom.dcmread(p) for p in out.iterdir()]
    assert len(received) == len(files)
    for ds in received:
        original = sent[ds.SOPInstanceUID]
        assert ds == original  # every data element, pixel data included
        assert ds.PixelData == original.PixelData


@pytest.mark.network
def test_closed_port_fails_naming_peer(data_dir: Path) -> None:
    port = free_port()
    outcome = send_files(
        dest(port, "PACS"), hippo_files(data_dir)[:2], calling_ae="AENODE", timeout=3
    )
    assert not outcome.ok
    assert outcome.sent == []
    assert outcome.error is not None and f"PACS@127.0.0.1:{port}" in outcome.error
    assert len(outcome.failed) == 2


def test_unreadable_file_is_a_failure(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    outcome = send_files(dest(1), [bad], calling_ae="AENODE", timeout=1)
    assert not outcome.ok
    assert "not a readable DICOM Part 10 file" in outcome.failed[str(bad)]


class FakeSCP:
    """A pynetdicom SCP with one behaviour for every C-STORE (a test double of a PACS)."""

    def __init__(
        self, contexts: list[str], behaviour: str, syntaxes: list[str] | None = None
    ) -> None:
        self.port = free_port()
        self.behaviour = behaviour
        self.received: list[pydicom.Dataset] = []
        ae = AE(ae_title="FAKE")
        for cx in contexts:
            if syntaxes is None:
                ae.add_supported_context(cx)
            else:
                ae.add_supported_context(cx, syntaxes)
        self.ae = ae
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.handle)],
        )

    def handle(self, event: evt.Event) -> int:
        if self.behaviour == "fail":
            return 0xA700
        if self.behaviour == "abort":
            event.assoc.abort()
            return 0x0000
        if self.behaviour == "stall":
            time.sleep(3)
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def fake() -> Iterator[list[FakeSCP]]:
    made: list[FakeSCP] = []
    yield made
    for f in made:
        f.stop()


@pytest.mark.network
def test_rejected_sop_class_is_a_failure(fake, data_dir: Path, tmp_path: Path) -> None:
    scp = FakeSCP([MRImageStorage], "ok")  # CT is not supported
    fake.append(scp)
    mr = hippo_files(data_dir)[0]
    ct = pydicom.dcmread(mr)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ct.save_as(tmp_path / "ct.dcm")
    outcome = send_files(
        dest(scp.port, "FAKE"), [mr, tmp_path / "ct.dcm"], calling_ae="AENODE", timeout=5
    )
    assert not outcome.ok
    assert outcome.sent == [pydicom.dcmread(mr).SOPInstanceUID]
    assert outcome.failed == {
        ct.SOPInstanceUID: f"FAKE@127.0.0.1:{scp.port}: no accepted presentation context "
        f"for SOP class {CTImageStorage}"
    }
    # nothing acceptable at all: the association is aborted, the outcome says why
    only_ct = send_files(
        dest(scp.port, "FAKE"), [tmp_path / "ct.dcm"], calling_ae="AENODE", timeout=5
    )
    assert not only_ct.ok
    assert only_ct.error == (
        f"FAKE@127.0.0.1:{scp.port}: no presentation context accepted (SOP classes "
        f"{CTImageStorage})"
    )


@pytest.mark.network
@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("fail", r"failed with status 0xA700"),
        ("abort", r"no C-STORE response for .* \(timeout or aborted\)"),
        ("stall", r"no C-STORE response for .* \(timeout or aborted\)"),
    ],
)
def test_failure_status_abort_and_timeout_are_failures(
    fake, data_dir: Path, behaviour: str, reason: str
) -> None:
    scp = FakeSCP([MRImageStorage], behaviour)
    fake.append(scp)
    files = hippo_files(data_dir)[:2]
    outcome = send_files(dest(scp.port, "FAKE"), files, calling_ae="AENODE", timeout=1)
    assert not outcome.ok
    assert outcome.sent == []
    first = pydicom.dcmread(files[0]).SOPInstanceUID
    assert first in outcome.failed
    import re

    assert re.search(reason, outcome.failed[first]), outcome.failed[first]
    assert f"FAKE@127.0.0.1:{scp.port}" in outcome.failed[first]


@pytest.mark.network
def test_echo_and_command(storescp, capsys: pytest.CaptureFixture[str]) -> None:
    port, _ = storescp
    assert echo("127.0.0.1", port, "STORESCP", "AENODE", 5)
    assert cli_main(["echo", "127.0.0.1", str(port), "--aet", "STORESCP"]) == 0
    assert "success" in capsys.readouterr().out
    closed = free_port()
    assert not echo("127.0.0.1", closed, "X", "AENODE", 2)
    assert cli_main(["echo", "127.0.0.1", str(closed)]) == 1
    assert f"AENODE@127.0.0.1:{closed}" in capsys.readouterr().out  # node.ae_title


@pytest.mark.network
def test_every_transfer_syntax_arrives_as_is(storescp, data_dir: Path) -> None:
    """dcm-qa-ts: one real MR image in 9 transfer syntaxes, sent with their own syntax."""
    port, out = storescp
    files = sorted((data_dir / "dcm-qa-ts").glob("*.dcm"))
    outcome = send_files(dest(port), files, calling_ae="AENODE", timeout=30)
    assert outcome.ok, outcome
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    received = [pydicom.dcmread(p) for p in out.iterdir()]
    assert len(received) == 9
    for ds in received:
        original = sent[ds.SOPInstanceUID]
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert ds == original


@pytest.mark.network
def test_reencoded_when_only_implicit_is_accepted(fake, data_dir: Path) -> None:
    scp = FakeSCP([MRImageStorage], "ok", syntaxes=[pydicom.uid.ImplicitVRLittleEndian])
    fake.append(scp)
    qa = data_dir / "dcm-qa-ts"
    explicit, big, jpeg = qa / "1.dcm", qa / "3.dcm", qa / "5.dcm"
    outcome = send_files(
        dest(scp.port, "FAKE"), [explicit, big, jpeg], calling_ae="AENODE", timeout=10
    )
    assert not outcome.ok
    jpeg_uid = pydicom.dcmread(jpeg).SOPInstanceUID
    assert outcome.failed == {
        jpeg_uid: f"FAKE@127.0.0.1:{scp.port}: transfer syntax 1.2.840.10008.1.2.4.70 of 5.dcm "
        "not accepted for SOP class 1.2.840.10008.5.1.4.1.1.4"
    }
    assert len(outcome.sent) == 2
    reference = pydicom.dcmread(explicit).pixel_array
    for ds in scp.received:
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
        assert (ds.pixel_array == reference).all()


def test_store_command_decodes_as_c_store_rq() -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    from aenode.export.association import parse_command, store_command

    raw = store_command("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", 7)
    ds = read_dataset(DicomBytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert (ds.CommandField, ds.MessageID, ds.CommandDataSetType) == (0x0001, 7, 0x0000)
    assert ds.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert ds.AffectedSOPInstanceUID == "1.2.3.45"  # padded with one NUL, read back without
    fields = parse_command(raw)
    assert fields[0x1000] == b"1.2.3.45"
    assert fields[0x0110] == (7).to_bytes(2, "little")


@pytest.mark.network
def test_rejected_association_names_the_reason(fake, data_dir: Path) -> None:
    scp = FakeSCP([MRImageStorage], "ok")
    scp.ae.require_called_aet = True  # FAKE only
    fake.append(scp)
    outcome = send_files(
        dest(scp.port, "WRONG"), hippo_files(data_dir)[:1], calling_ae="AENODE", timeout=5
    )
    assert not outcome.ok
    assert outcome.error == (
        f"WRONG@127.0.0.1:{scp.port}: association rejected permanently: "
        "called AE title not recognized"
    )
