"""The structural check at receipt (aenode/receive/check.py): unit cases on real files and a
real C-STORE of broken data sets that must be refused with 0xC000 and never spooled.

Real data: ../shared/data/udacity-mr/Study1 (Explicit VR LE MR), ../shared/data/cq500-ct0
(JPEG Lossless CT, encapsulated) and ../shared/data/dcm-qa-ts (one MR image in nine
transfer syntaxes: implicit/explicit LE, explicit BE, RLE, JPEG, JPEG-LS, JPEG 2000).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from nodes import Receivers
from pynetdicom import AE, _config

from aenode.receive.check import check_structure, failure_status
from aenode.receive.header import InvalidInstance


def split(path: Path) -> tuple[bytes, bytes, str]:
    """(file meta bytes, data set bytes, transfer syntax) of a Part 10 file."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    length = struct.unpack_from("<L", raw, 132 + 8)[0]
    at = 132 + 12 + length
    ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return raw[:at], raw[at:], ts


def _real_files(data: Path) -> list[Path]:
    crop = sorted((data / "udacity-mr" / "Study1" / "13_HCropVolume").glob("*.dcm"))[:3]
    t1 = sorted((data / "udacity-mr" / "Study1" / "12-T1post-05670").glob("*.dcm"))[:2]
    ct = sorted(p for p in (data / "cq500-ct0").rglob("*") if p.is_file())[:3]
    ts = sorted(p for p in (data / "dcm-qa-ts").rglob("*") if p.is_file())
    return crop + t1 + ct + ts


def test_every_real_file_passes(data_dir: Path) -> None:
    files = _real_files(data_dir)
    syntaxes = set()
    for path in files:
        _, stream, ts = split(path)
        assert check_structure(stream, ts) > 20, path
        syntaxes.add(ts)
    assert len(syntaxes) >= 7  # implicit, explicit LE/BE, RLE, JPEG, JPEG-LS, JPEG 2000


@pytest.fixture()
def crop(data_dir: Path) -> tuple[bytes, bytes, str]:
    return split(sorted((data_dir / "udacity-mr" / "Study1" / "13_HCropVolume").glob("*"))[0])


@pytest.fixture()
def ct(data_dir: Path) -> tuple[bytes, bytes, str]:
    files = sorted(p for p in (data_dir / "cq500-ct0").rglob("*") if p.is_file())
    for path in files:
        meta, stream, ts = split(path)
        if ts == "1.2.840.10008.1.2.4.70":
            return meta, stream, ts
    raise AssertionError("no JPEG Lossless file in cq500-ct0")


def _pixel_at(stream: bytes, explicit: bool = True) -> int:
    at = stream.rindex(b"\xe0\x7f\x10\x00")
    return at


def test_truncated_data_set_names_the_element(crop: tuple[bytes, bytes, str]) -> None:
    _, stream, ts = crop
    cut = stream[: _pixel_at(stream) + 100]
    with pytest.raises(InvalidInstance, match=r"^\(7FE0,0010\) PixelData: declares 3570 bytes"):
        check_structure(cut, ts)
    with pytest.raises(InvalidInstance, match=r"^data set: 3 stray byte\(s\) at offset"):
        check_structure(stream[: _pixel_at(stream) + 3], ts)


def test_length_past_the_end_names_the_element(crop: tuple[bytes, bytes, str]) -> None:
    _, stream, ts = crop
    at = stream.index(b"\x08\x00\x3e\x10LO")  # SeriesDescription
    bad = stream[: at + 6] + b"\xff\x7f" + stream[at + 8 :]
    with pytest.raises(InvalidInstance, match=r"^\(0008,103E\) SeriesDescription: declares 32767"):
        check_structure(bad, ts)


def test_pixel_data_declared_as_1_gb_with_nothing_behind(crop: tuple[bytes, bytes, str]) -> None:
    _, stream, ts = crop
    at = _pixel_at(stream)
    bad = stream[: at + 8] + struct.pack("<L", 1 << 30)
    with pytest.raises(InvalidInstance, match=r"PixelData: declares 1073741824 bytes, 0 left"):
        check_structure(bad, ts)


def test_native_pixel_data_must_match_rows_and_columns(crop: tuple[bytes, bytes, str]) -> None:
    _, stream, ts = crop
    at = stream.index(b"\x28\x00\x10\x00US\x02\x00")  # Rows
    rows = struct.unpack_from("<H", stream, at + 8)[0]
    bad = stream[: at + 8] + struct.pack("<H", rows + 1) + stream[at + 10 :]
    columns = struct.unpack_from("<H", stream, stream.index(b"\x28\x00\x11\x00US") + 8)[0]
    assert rows * columns * 2 == 3570
    wanted = rf"^\(7FE0,0010\) PixelData: 3570 bytes, {(rows + 1) * columns * 2} required by Rows"
    with pytest.raises(InvalidInstance, match=wanted):
        check_structure(bad, ts)


def test_encapsulated_fragments_must_be_well_formed(ct: tuple[bytes, bytes, str]) -> None:
    _, stream, ts = ct
    assert check_structure(stream, ts)
    with pytest.raises(InvalidInstance, match=r"PixelData: fragments truncated"):
        check_structure(stream[:-8], ts)  # no sequence delimiter
    at = _pixel_at(stream)
    first = at + 12  # the Basic Offset Table item
    bot = struct.unpack_from("<L", stream, first + 4)[0]
    frag = first + 8 + bot
    bad = stream[:frag] + b"\xfe\xff\x00\xe1" + stream[frag + 4 :]
    with pytest.raises(InvalidInstance, match=r"where a fragment item was expected"):
        check_structure(bad, ts)
    bad = stream[: frag + 4] + struct.pack("<L", 1 << 31) + stream[frag + 8 :]
    with pytest.raises(InvalidInstance, match=r"fragment 1 declares 2147483648 bytes"):
        check_structure(bad, ts)


def test_error_comment_keeps_the_element_within_64_characters() -> None:
    ds = failure_status(0xC000, "(7FE0,0010) PixelData: declares 1073741824 bytes, 0 left in it")
    assert ds.Status == 0xC000
    assert ds.ErrorComment.startswith("(7FE0,0010) PixelData: declares")
    assert len(ds.ErrorComment) <= 64


@pytest.fixture(scope="module")
def receivers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receivers]:
    node = Receivers(tmp_path_factory.mktemp("check")).start()
    yield node
    node.stop()


@pytest.mark.network
def test_broken_instances_are_refused_with_the_element_and_not_spooled(
    receivers: Receivers,
    crop: tuple[bytes, bytes, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    meta, stream, ts = crop
    at = _pixel_at(stream)
    cases = {
        "truncated": stream[: at + 100],
        "1gb": stream[: at + 8] + struct.pack("<L", 1 << 30),
        "good": stream,
    }
    paths = {}
    for name, body in cases.items():
        paths[name] = tmp_path / f"{name}.dcm"
        paths[name].write_bytes(meta + body)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # bytes as they are
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ts)
    assoc = ae.associate("127.0.0.1", receivers.port, ae_title="AENODE")
    assert assoc.is_established
    try:
        answers = {name: assoc.send_c_store(path) for name, path in paths.items()}
    finally:
        assoc.release()
    assert answers["truncated"].Status == 0xC000
    assert answers["truncated"].ErrorComment.startswith("(7FE0,0010) PixelData: declares 3570")
    assert answers["1gb"].Status == 0xC000
    assert "1073741824" in answers["1gb"].ErrorComment
    assert answers["good"].Status == 0x0000
    spooled = receivers.spooled()
    assert len(spooled) == 1 and spooled[0].read_bytes().endswith(stream)
    assert len(receivers.query("SELECT 1 FROM instances")) == 1
    assert "C-STORE refused (0xC000): (7FE0,0010) PixelData" in receivers.log_text()
