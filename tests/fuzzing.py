"""Fuzzed instances and raw PDU abuse for the quick suite (tests/test_fuzz.py) and
``make stress`` (stress/): seeded, made from the real files in ../shared/data.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from poison import mutate
from pydicom.dataset import Dataset
from pynetdicom import AE

SENT_OK = 0x0000


@dataclass
class Fuzzed:
    """One fuzzed Part 10 file: what was done and what its request will say."""

    path: Path
    kind: str
    sop_class: str
    sop_uid: str
    transfer_syntax: str
    stream: bytes  # the data set bytes as sent (without file meta)


def split(path: Path) -> tuple[bytes, bytes, str, str, str]:
    """(file meta, data set, transfer syntax, SOP class, SOP instance) of a Part 10 file."""
    raw = path.read_bytes()
    length = struct.unpack_from("<L", raw, 132 + 8)[0]
    at = 132 + 12 + length
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return (
        raw[:at],
        raw[at:],
        str(meta.TransferSyntaxUID),
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
    )


def fresh_uid(rng: random.Random, length: int) -> str:
    """A ``2.25.`` UID of exactly ``length`` characters (so that no length changes)."""
    tail = [str(rng.randint(1, 9))] + [str(rng.randint(0, 9)) for _ in range(length - 6)]
    return "2.25." + "".join(tail)


def sources(data: Path) -> list[Path]:
    """The real files fuzzed: HippoCrop MR, CQ500 CT (JPEG Lossless) and dcm-qa-ts."""
    crop = sorted((data / "udacity-mr" / "Study1" / "13_HCropVolume").glob("*.dcm"))
    ct = sorted(p for p in (data / "cq500-ct0").rglob("*") if p.is_file())[:8]
    ts = sorted(p for p in (data / "dcm-qa-ts").rglob("*") if p.is_file())
    return crop + ct + ts


def fuzz(files: list[Path], count: int, seed: int, out: Path) -> Iterator[Fuzzed]:
    """``count`` fuzzed files written under ``out``, each with a fresh SOP Instance UID."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    cache = {p: split(p) for p in files}
    weights = [4 if "HCrop" in str(p) else 1 for p in files]
    for i in range(count):
        src = rng.choices(files, weights)[0]
        meta, stream, ts, sop_class, uid = cache[src]
        new = fresh_uid(rng, len(uid))
        meta = meta.replace(uid.encode(), new.encode())
        stream = stream.replace(uid.encode(), new.encode())
        kind, body = mutate(stream, rng)
        path = out / f"fuzz-{seed}-{i:05d}.dcm"
        path.write_bytes(meta + body)
        yield Fuzzed(path, kind, sop_class, new, ts, body)


def rewrite_uids(files: Iterable[Path], out: Path, rng: random.Random) -> list[Path]:
    """Copies of ``files`` with new Study, Series and SOP Instance UIDs (one study)."""
    out.mkdir(parents=True, exist_ok=True)
    study = fresh_uid(rng, 40)
    series: dict[str, str] = {}
    written = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID), fresh_uid(rng, 40))
        ds.SOPInstanceUID = fresh_uid(rng, 40)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = out / path.name
        ds.save_as(target)
        written.append(target)
    return written


def send_raw(port: int, items: list[Fuzzed]) -> dict[str, int | None]:
    """C-STORE each file's bytes as they are; SOP Instance UID -> status (None: aborted).

    The caller sets ``pynetdicom._config.STORE_SEND_CHUNKED_DATASET``. An association the
    node aborts is opened again for the next file.
    """
    contexts = sorted({(f.sop_class, f.transfer_syntax) for f in items})
    answers: dict[str, int | None] = {}
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for sop_class, ts in contexts[:128]:
        ae.add_requested_context(sop_class, ts)
    assoc = None
    for item in items:
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title="AENODE")
            if not assoc.is_established:
                answers[item.sop_uid] = None
                assoc = None
                continue
        try:
            rsp: Dataset = assoc.send_c_store(item.path)
        except Exception:  # pynetdicom itself may refuse to read a mangled file
            answers[item.sop_uid] = -1
            continue
        answers[item.sop_uid] = int(rsp.Status) if "Status" in rsp else None
    if assoc is not None and assoc.is_established:
        assoc.release()
    return answers


def pdu_abuse(port: int, rng: random.Random, count: int) -> int:
    """Open ``count`` connections sending random or truncated PDUs; returns how many the
    node closed (each within its ARTIM or PDU timer) out of ``count``."""
    closed = 0
    socks = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        kind = i % 5
        if kind == 0:  # truncated A-ASSOCIATE-RQ
            sock.sendall(b"\x01\x00" + struct.pack(">L", 300) + rng.randbytes(20))
        elif kind == 1:  # 4 GB declared
            sock.sendall(b"\x01\x00\xff\xff\xff\xff" + rng.randbytes(16))
        elif kind == 2:  # an unknown PDU type
            sock.sendall(bytes([rng.randint(8, 255), 0]) + struct.pack(">L", 4) + b"abcd")
        elif kind == 3:  # random bytes
            sock.sendall(rng.randbytes(rng.randint(1, 512)))
        # kind 4: say nothing
        socks.append(sock)
    deadline = time.monotonic() + 15
    for sock in socks:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while sock.recv(4096):
                pass
            closed += 1
        except TimeoutError:
            pass
        except OSError:
            closed += 1
        finally:
            sock.close()
    return closed
