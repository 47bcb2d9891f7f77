"""The spool and the header reader without a network: duplicates, disk floor, recovery.

Uses real instances from ../shared/data/udacity-mr/Study1 (HippoCrop series) encoded as a
peer would send them (data set bytes plus the file meta pynetdicom builds).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode, encode_file_meta

from aenode.config import Settings
from aenode.receive.header import (
    InvalidInstance,
    header_from_dataset,
    parse_header,
    read_file_header,
)
from aenode.receive.spool import Outcome, OutOfSpace, Spool, recover_spool
from aenode.store import Store


def _encode(ds: pydicom.Dataset) -> tuple[bytes, bytes]:
    """(preamble + file meta, data set bytes) as the receiver gets them."""
    body = encode(ds, False, True)
    assert body is not None
    return b"\x00" * 128 + b"DICM" + encode_file_meta(ds.file_meta), body


@pytest.fixture
def sample(data_dir: Path) -> pydicom.Dataset:
    path = sorted((data_dir / "udacity-mr" / "Study1" / "13_HCropVolume").iterdir())[0]
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    return ds


def _spool(tmp_path: Path, **storage: object) -> Spool:
    settings = Settings.model_validate(
        {"storage": {"path": str(tmp_path), "min_free_mb": 1, **storage}}
    )
    return Spool(settings, Store(tmp_path / "aenode.db"))


def _put(spool: Spool, ds: pydicom.Dataset) -> tuple[Outcome, Path]:
    meta, body = _encode(ds)
    header = header_from_dataset(parse_header(body, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    result = spool.put(header, meta, body, calling_ae="PACS", assoc_id="a1")
    return result.outcome, result.path


def test_header_is_read_without_pixel_data(sample: pydicom.Dataset) -> None:
    _, body = _encode(sample)
    ds = parse_header(body, ExplicitVRLittleEndian)
    assert "PixelData" not in ds
    header = header_from_dataset(ds, ExplicitVRLittleEndian, str(sample.SOPClassUID))
    assert header.sop_instance_uid == sample.SOPInstanceUID
    assert header.expected == int(sample.ImagesInAcquisition)
    assert header.description == "HippoCrop"


def test_header_errors_name_the_tag(sample: pydicom.Dataset) -> None:
    ds = copy.deepcopy(sample)
    del ds.SeriesInstanceUID
    _, body = _encode(ds)
    with pytest.raises(InvalidInstance, match="SeriesInstanceUID is missing or empty") as err:
        header_from_dataset(parse_header(body, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert err.value.status == 0xC000
    _, body = _encode(sample)
    with pytest.raises(InvalidInstance, match="does not match the presentation context") as err:
        header_from_dataset(
            parse_header(body, ExplicitVRLittleEndian),
            ExplicitVRLittleEndian,
            "1.2.840.10008.5.1.4.1.1.2",
        )
    assert err.value.status == 0xA900
    garbage = b"\x08\x00\x18\x00UI\xff\xff" + bytes(range(256))
    with pytest.raises(InvalidInstance, match="cannot parse the data set|is missing") as err:
        header_from_dataset(parse_header(garbage, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert err.value.status == 0xC000


def test_stored_file_is_the_sent_dataset(tmp_path: Path, sample: pydicom.Dataset) -> None:
    spool = _spool(tmp_path)
    outcome, path = _put(spool, sample)
    assert outcome is Outcome.STORED
    assert path == (
        tmp_path
        / "spool"
        / sample.StudyInstanceUID
        / sample.SeriesInstanceUID
        / f"{sample.SOPInstanceUID}.dcm"
    )
    back = pydicom.dcmread(path)
    assert back == sample
    assert back.PixelData == sample.PixelData
    assert list((tmp_path / "tmp").iterdir()) == []


def test_duplicates_keep_first(tmp_path: Path, sample: pydicom.Dataset) -> None:
    spool = _spool(tmp_path)
    _, path = _put(spool, sample)
    first = path.read_bytes()
    assert _put(spool, sample)[0] is Outcome.DUPLICATE
    changed = copy.deepcopy(sample)
    changed.SeriesDescription = "edited"
    assert _put(spool, changed)[0] is Outcome.KEPT_FIRST
    assert path.read_bytes() == first
    assert len(spool.store.execute("SELECT * FROM instances")) == 1
    (series,) = spool.store.execute("SELECT * FROM series")
    assert series["instance_count"] == 1


def test_duplicates_replace(tmp_path: Path, sample: pydicom.Dataset) -> None:
    spool = _spool(tmp_path, duplicate_policy="replace")
    _put(spool, sample)
    changed = copy.deepcopy(sample)
    changed.SeriesDescription = "edited"
    outcome, path = _put(spool, changed)
    assert outcome is Outcome.REPLACED
    assert pydicom.dcmread(path).SeriesDescription == "edited"
    assert len(spool.store.execute("SELECT * FROM instances")) == 1
    (series,) = spool.store.execute("SELECT * FROM series")
    assert series["instance_count"] == 1


def test_disk_floor_refuses_and_leaves_nothing(tmp_path: Path, sample: pydicom.Dataset) -> None:
    spool = _spool(tmp_path, min_free_mb=10**9)
    with pytest.raises(OutOfSpace, match="storage.min_free_mb is 1000000000"):
        _put(spool, sample)
    assert list((tmp_path / "spool").rglob("*.dcm")) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert spool.store.execute("SELECT * FROM instances") == []


def test_recovery_records_orphans_and_drops_temporaries(
    tmp_path: Path, sample: pydicom.Dataset
) -> None:
    spool = _spool(tmp_path)
    _, path = _put(spool, sample)
    # Simulate a crash after the rename but before the insert: drop the rows.
    spool.store.execute("DELETE FROM instances")
    spool.store.execute("DELETE FROM series")
    (tmp_path / "tmp" / "unfinished.part").write_bytes(b"half a file")
    bad = tmp_path / "spool" / "1.2" / "3.4" / "5.6.dcm"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not dicom")
    report = recover_spool(spool.store, spool.settings)
    assert (report.recovered, report.removed_temporary, report.quarantined) == (1, 1, 1)
    (row,) = spool.store.execute("SELECT * FROM instances")
    assert row["sop_instance_uid"] == sample.SOPInstanceUID
    assert (tmp_path / row["path"]) == path
    assert (tmp_path / "quarantine" / "spool" / "1.2" / "3.4" / "5.6.dcm").is_file()
    assert read_file_header(path).series_uid == sample.SeriesInstanceUID
    assert recover_spool(spool.store, spool.settings).recovered == 0


def test_contexts_without_unknown_storage_cover_known_classes_in_every_syntax(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydicom.uid import AllTransferSyntaxes, CTImageStorage, JPEGLossless
    from pynetdicom import _config

    from aenode.receive.scp import build_ae, peer_allowed

    # build_ae sets pynetdicom's process-wide options (meant for a receiving process).
    for name in ("UNRESTRICTED_STORAGE_SERVICE", "LOG_HANDLER_LEVEL"):
        monkeypatch.setattr(_config, name, getattr(_config, name))

    settings = Settings.model_validate(
        {"node": {"accept_unknown_storage": False, "max_associations": 5}}
    )
    ae = build_ae(settings, receivers=2)
    by_class = {str(cx.abstract_syntax): cx for cx in ae.supported_contexts}
    assert "1.3.6.1.4.1.99999.1.1" not in by_class
    assert set(by_class[CTImageStorage].transfer_syntax) == set(AllTransferSyntaxes)
    assert JPEGLossless in by_class[CTImageStorage].transfer_syntax
    # the node-wide count (receive/guard.py) refuses first; pynetdicom never does
    assert ae.maximum_associations == 2 * 5 + 2
    peers = Settings.model_validate(
        {"node": {"allowed_peers": [{"ae_title": "PACS", "host": "10.0.0.5"}]}}
    ).node.allowed_peers
    assert peer_allowed(peers, "PACS", "10.0.0.5") == (True, "")
    assert (
        peer_allowed(peers, "PACS", "10.0.0.6")[1]
        == "calling AE 'PACS' is not allowed from host 10.0.0.6"
    )
    assert peer_allowed(None, "ANY", "1.2.3.4") == (True, "")


def test_recovery_puts_back_a_pool_file_whose_rename_was_lost(
    tmp_path: Path, sample: pydicom.Dataset
) -> None:
    spool = _spool(tmp_path)
    _, path = _put(spool, sample)
    written = path.read_bytes()
    spool.close()
    # A power cut lost the rename and the commit (neither is fsynced): the data is in the
    # pool file it was written to. Beside it, a pool file cut off mid-write and an unused one.
    pool = tmp_path / "pool"
    assert sorted(pool.iterdir()) == []  # close removed the unused files
    path.rename(pool / "lost-rename.slot")
    spool.store.execute("DELETE FROM instances")
    spool.store.execute("DELETE FROM series")
    (pool / "cut-off.slot").write_bytes(written[: len(written) // 2])
    (pool / "unused.slot").write_bytes(b"")
    report = recover_spool(spool.store, spool.settings)
    assert (report.placed, report.recovered, report.removed_temporary) == (1, 1, 1)
    assert path.read_bytes() == written
    assert list(pool.iterdir()) == []
    (row,) = spool.store.execute("SELECT * FROM instances")
    assert row["sop_instance_uid"] == sample.SOPInstanceUID
    assert tmp_path / row["path"] == path


def test_recovery_drops_a_pool_copy_of_a_stored_instance(
    tmp_path: Path, sample: pydicom.Dataset
) -> None:
    spool = _spool(tmp_path)
    _, path = _put(spool, sample)
    spool.close()
    # An identical re-send whose pool file's removal was lost: the stored file stays.
    copy_in_pool = tmp_path / "pool" / "dup.slot"
    copy_in_pool.write_bytes(path.read_bytes())
    report = recover_spool(spool.store, spool.settings)
    assert (report.placed, report.recovered) == (0, 0)
    assert not copy_in_pool.exists()
    assert path.is_file()
    assert len(spool.store.execute("SELECT * FROM instances")) == 1


def test_writes_go_through_files_made_ahead(tmp_path: Path, sample: pydicom.Dataset) -> None:
    spool = _spool(tmp_path)
    _, path = _put(spool, sample)
    left = sorted((tmp_path / "pool").iterdir())
    # One batch was made; the first file became the spooled instance, the rest wait empty.
    assert len(left) == spool.pool.batch - 1
    assert all(p.suffix == ".slot" and p.stat().st_size == 0 for p in left)
    assert pydicom.dcmread(path).SOPInstanceUID == sample.SOPInstanceUID
