"""Negotiation: with unknown storage classes accepted, only storage-like abstract syntaxes
and Verification are accepted; a Modality Worklist C-FIND (dcmtk findscu) or a
query/retrieve request is refused at negotiation and the refusal is logged with what was
proposed. Real sockets on loopback, real dcmtk tools, a real pynetdicom SCU.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import dcmtk
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
)
from test_receive import DCMTK_ENV, NodeProcess

from aenode.receive.negotiation import is_storage_like

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("negotiation")
    started = NodeProcess(tmp, {"models": {"enabled": []}, "node": {"receivers": 1}}).start()
    yield started
    started.stop()


def test_storage_like() -> None:
    assert is_storage_like("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    assert is_storage_like("1.2.840.10008.5.1.4.1.1.999")  # a future storage class
    assert is_storage_like("1.3.46.670589.11.0.0.12.1")  # private (Philips)
    assert not is_storage_like("1.2.840.10008.5.1.4.31")  # Modality Worklist FIND
    assert not is_storage_like("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root Q/R FIND


def test_worklist_find_is_refused_at_negotiation(tmp_path: Path, node: NodeProcess) -> None:
    query = tmp_path / "wl.dcm"
    ds = pydicom.Dataset()
    ds.PatientName = ""
    item = pydicom.Dataset()
    item.Modality = "MR"
    ds.ScheduledProcedureStepSequence = [item]
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(query, enforce_file_format=False)
    offset = len(node.log_text())
    done = subprocess.run(
        [dcmtk("findscu"), "-W", "-aec", "AENODE", "127.0.0.1", str(node.port), str(query)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "No Acceptable Presentation Contexts" in done.stderr + done.stdout
    assert "Received Final Find Response" not in done.stderr + done.stdout
    node.wait_for(lambda: "refused presentation context" in node.log_text()[offset:])
    line = next(x for x in node.log_text()[offset:].splitlines() if "refused presentation" in x)
    assert "association from FINDSCU" in line
    assert "1.2.840.10008.5.1.4.31 (Modality Worklist Information Model - FIND)" in line
    assert "no context left, the association is refused" in line


def test_query_retrieve_refused_but_storage_and_private_accepted(node: NodeProcess) -> None:
    private = "1.3.6.1.4.1.5962.99.1.1"
    ae = AE(ae_title="MIXED")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")  # MR Image Storage
    ae.add_requested_context(private, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AENODE")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
    assoc.release()
    assert accepted == {"1.2.840.10008.5.1.4.1.1.4", private}
    assert rejected == {str(PatientRootQueryRetrieveInformationModelFind)}


def test_private_storage_class_is_stored(node: NodeProcess) -> None:
    private = "1.3.6.1.4.1.5962.99.1.2"
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = private, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ae = AE(ae_title="PRIVATE")
    ae.add_requested_context(private, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AENODE")
    assert assoc.is_established
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    rows = node.query("SELECT * FROM instances WHERE sop_instance_uid=?", (str(ds.SOPInstanceUID),))
    assert len(rows) == 1
