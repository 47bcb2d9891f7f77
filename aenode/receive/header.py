"""The few header elements read on the receive path, without touching pixel data.

A C-STORE data set arrives encoded; :func:`parse_header` reads the elements up to
(0054,0101) only, so Pixel Data (7FE0,0010) is never read, let alone decoded.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from aenode.assemble import expected_count
from aenode.errors import InputError

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_MISMATCH",
    "InstanceHeader",
    "InvalidInstance",
    "header_from_dataset",
    "parse_header",
    "read_file_header",
]

STATUS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

# The last tag parse_header needs: (0054,0101) NumberOfTimeSlices.
_LAST_TAG = 0x00540101
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class InvalidInstance(InputError):
    """A data set that cannot be accepted; ``status`` is the DIMSE failure status to answer.

    Parameters
    ----------
    message : str
        What is wrong, naming the tag.
    status : int
        ``0xA900`` (does not match the SOP class) or ``0xC000`` (cannot understand).
    """

    def __init__(self, message: str, status: int = STATUS_CANNOT_UNDERSTAND) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InstanceHeader:
    """What the receiver and the assembler need to know about one instance.

    Attributes
    ----------
    sop_class_uid, sop_instance_uid, study_uid, series_uid : str
        The identifying UIDs.
    modality, description : str
        ``Modality`` and ``SeriesDescription`` ("" when absent).
    expected : int or None
        Instances the series will have, when the data says so (see
        :func:`aenode.assemble.expected_count`).
    transfer_syntax : str
        The transfer syntax the data set is encoded in.
    patient_id : str
        ``PatientID``; PHI, logged only when ``logging.phi`` is on.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    description: str
    expected: int | None
    transfer_syntax: str
    patient_id: str = ""


def _stop(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) > _LAST_TAG


def parse_header(stream: bytes, transfer_syntax: str) -> Dataset:
    """Decode the leading elements of an encoded data set (no Pixel Data).

    Parameters
    ----------
    stream : bytes
        The data set as received, without file meta.
    transfer_syntax : str
        The transfer syntax UID of its presentation context.

    Returns
    -------
    pydicom.Dataset
        The elements up to (0054,0101).

    Raises
    ------
    InvalidInstance
        If the bytes cannot be parsed (status ``0xC000``).
    """
    ts = UID(transfer_syntax)
    try:
        if ts.is_deflated:
            stream = zlib.decompress(stream, -zlib.MAX_WBITS)
        return read_dataset(
            BytesIO(stream), ts.is_implicit_VR, ts.is_little_endian, stop_when=_stop
        )
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise InvalidInstance(f"cannot parse the data set ({ts.name}): {exc}") from exc


def header_from_dataset(
    ds: Dataset, transfer_syntax: str, context_sop_class: str | None = None
) -> InstanceHeader:
    """Check the identifying elements and extract an :class:`InstanceHeader`.

    Parameters
    ----------
    ds : pydicom.Dataset
        Header elements (from :func:`parse_header` or a file read without pixels).
    transfer_syntax : str
        The transfer syntax UID the data set is encoded in.
    context_sop_class : str or None
        The presentation context's abstract syntax (the C-STORE's SOP class); when given,
        ``SOPClassUID`` must equal it.

    Returns
    -------
    InstanceHeader

    Raises
    ------
    InvalidInstance
        Naming the missing or mismatching tag: ``0xC000`` for a missing or empty UID,
        ``0xA900`` for a SOP class that differs from the presentation context.
    """
    values: dict[str, str] = {}
    for keyword in _REQUIRED:
        try:
            value = ds.get(keyword)
        except Exception as exc:
            raise InvalidInstance(f"{keyword} cannot be read: {exc}") from exc
        text = str(value).strip() if value is not None else ""
        if not text:
            raise InvalidInstance(f"{keyword} is missing or empty")
        values[keyword] = text
    if context_sop_class is not None and values["SOPClassUID"] != str(context_sop_class):
        raise InvalidInstance(
            f"SOPClassUID {values['SOPClassUID']} does not match the presentation context's "
            f"SOP class {context_sop_class}",
            status=STATUS_MISMATCH,
        )
    return InstanceHeader(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_uid=values["StudyInstanceUID"],
        series_uid=values["SeriesInstanceUID"],
        modality=_text(ds, "Modality"),
        description=_text(ds, "SeriesDescription"),
        expected=expected_count(ds),
        transfer_syntax=str(transfer_syntax),
        patient_id=_text(ds, "PatientID"),
    )


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed optional element is treated as absent
        return ""
    return str(value).strip() if value is not None else ""


def read_file_header(path: Path) -> InstanceHeader:
    """Read the header of a spooled Part 10 file (used by start-up recovery).

    Parameters
    ----------
    path : pathlib.Path
        A file written by the spool.

    Returns
    -------
    InstanceHeader

    Raises
    ------
    InvalidInstance
        If the file is not a readable Part 10 file with the required UIDs; the message
        names the file.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except OSError as exc:
        raise InvalidInstance(f"{path}: cannot read: {exc.strerror}") from exc
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise InvalidInstance(f"{path}: not a readable DICOM file: {exc}") from exc
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    if not ts:
        raise InvalidInstance(f"{path}: TransferSyntaxUID missing from the file meta")
    try:
        return header_from_dataset(ds, ts)
    except InvalidInstance as exc:
        raise InvalidInstance(f"{path}: {exc}", exc.status) from exc
