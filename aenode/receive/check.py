"""The structural check at receipt: an encoded data set walked element by element.

Before a C-STORE is acknowledged, :func:`check_structure` walks the encoded bytes as
received, without decoding a value other than the few US/IS integers that size Pixel Data
and without copying: every element's declared length must fit in what arrived, sequences
and items must be delimited, the walk must end exactly at the end of the data, native
Pixel Data must be as long as Rows x Columns x Samples per Pixel x Bits Allocated / 8 x
Number of Frames, and encapsulated Pixel Data must be a Basic Offset Table item, at least
one fragment item and a sequence delimiter. A failure is an
:class:`~aenode.receive.header.InvalidInstance` (``0xC000``) whose message starts with the
element (``(7FE0,0010) PixelData: ...``) so that the DIMSE error comment names it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.uid import UID

from aenode.receive.header import STATUS_CANNOT_UNDERSTAND, InvalidInstance

__all__ = ["check_structure", "failure_status"]

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_ROWS, _COLUMNS, _SAMPLES, _BITS, _FRAMES = (
    0x00280010,
    0x00280011,
    0x00280002,
    0x00280100,
    0x00280008,
)
_MAX_DEPTH = 32  # nested sequences deeper than this are refused (a parser bomb)


class _Bad(Exception):
    def __init__(self, tag: int | None, message: str) -> None:
        super().__init__(message)
        self.tag = tag


def _name(tag: int | None) -> str:
    if tag is None:
        return "data set"
    text = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    keyword = keyword_for_tag(tag)
    return f"{text} {keyword}" if keyword else text


@dataclass
class _Walk:
    data: memoryview
    implicit: bool
    little: bool
    encapsulated: bool
    pixel: dict[int, int] = field(default_factory=dict)
    elements: int = 0

    def __post_init__(self) -> None:
        e = "<" if self.little else ">"
        self.u16 = struct.Struct(e + "H")
        self.u32 = struct.Struct(e + "L")
        self.tag = struct.Struct(e + "HH")

    def read_tag(self, pos: int) -> int:
        group, elem = self.tag.unpack_from(self.data, pos)
        return int(group << 16 | elem)

    def header(self, pos: int, end: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, length, position of the value)."""
        if end - pos < 8:
            raise _Bad(None, f"{end - pos} stray byte(s) at offset {pos} (truncated element)")
        tag = self.read_tag(pos)
        if tag >> 16 == 0xFFFE:  # item and delimiters have no VR in any syntax
            return tag, None, int(self.u32.unpack_from(self.data, pos + 4)[0]), pos + 8
        if implicit:
            return tag, None, int(self.u32.unpack_from(self.data, pos + 4)[0]), pos + 8
        vr = bytes(self.data[pos + 4 : pos + 6])
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise _Bad(tag, f"VR bytes {vr!r} are not a value representation")
        if vr in _LONG_VRS:
            if end - pos < 12:
                raise _Bad(tag, "truncated element header")
            return tag, vr, int(self.u32.unpack_from(self.data, pos + 8)[0]), pos + 12
        return tag, vr, int(self.u16.unpack_from(self.data, pos + 6)[0]), pos + 8

    def dataset(self, pos: int, end: int, implicit: bool, depth: int, in_item: bool) -> int:
        """Walk elements from ``pos``; returns where the data set (or undefined item) ends."""
        if depth > _MAX_DEPTH:
            raise _Bad(None, f"sequences nested deeper than {_MAX_DEPTH}")
        while pos < end:
            tag, vr, length, value = self.header(pos, end, implicit)
            self.elements += 1
            if tag == _ITEM_END and in_item:
                if length != 0:
                    raise _Bad(tag, f"item delimiter with length {length}")
                return value
            if tag >> 16 == 0xFFFE:
                raise _Bad(tag, f"unexpected {_name(tag)} at offset {pos}")
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA and depth == 0:
                    pos = self.fragments(value, end)
                    continue
                # SQ (or UN holding a sequence, encoded implicit VR LE)
                if vr not in (None, b"SQ", b"UN"):
                    raise _Bad(tag, f"undefined length with VR {vr.decode()}")
                pos = self.sequence(value, end, implicit or vr == b"UN", depth, tag)
                continue
            if length > end - value:
                raise _Bad(tag, f"declares {length} bytes, {end - value} left in the data set")
            if vr == b"SQ" or (vr is None and implicit and _is_sequence(tag)):
                self.defined_sequence(value, value + length, implicit, depth, tag)
            elif depth == 0:
                if tag == _PIXEL_DATA:
                    if self.encapsulated:
                        raise _Bad(tag, "defined length in an encapsulated transfer syntax")
                    self.pixel[tag] = length
                elif tag in (_ROWS, _COLUMNS, _SAMPLES, _BITS) and length >= 2:
                    self.pixel[tag] = int(self.u16.unpack_from(self.data, value)[0])
                elif tag == _FRAMES:
                    text = bytes(self.data[value : value + length]).strip(b" \x00")
                    try:
                        self.pixel[tag] = int(text.split(b"\\")[0])
                    except ValueError:
                        raise _Bad(tag, f"not an integer string ({length} bytes)") from None
            pos = value + length
        if in_item:
            raise _Bad(None, "item without its delimiter (truncated)")
        return pos

    def sequence(self, pos: int, end: int, implicit: bool, depth: int, owner: int) -> int:
        """Items of an undefined-length sequence up to its delimiter; returns the end."""
        while True:
            if end - pos < 8:
                raise _Bad(owner, "sequence without its delimiter (truncated)")
            tag = self.read_tag(pos)
            length = int(self.u32.unpack_from(self.data, pos + 4)[0])
            pos += 8
            if tag == _SEQ_END:
                if length != 0:
                    raise _Bad(owner, f"sequence delimiter with length {length}")
                return pos
            if tag != _ITEM:
                raise _Bad(owner, f"{_name(tag)} where an item was expected")
            if length == _UNDEFINED:
                pos = self.dataset(pos, end, implicit, depth + 1, in_item=True)
            else:
                if length > end - pos:
                    raise _Bad(owner, f"item declares {length} bytes, {end - pos} left")
                self.dataset(pos, pos + length, implicit, depth + 1, in_item=False)
                pos += length

    def defined_sequence(self, pos: int, end: int, implicit: bool, depth: int, owner: int) -> None:
        while pos < end:
            if end - pos < 8:
                raise _Bad(owner, "truncated item in the sequence")
            tag = self.read_tag(pos)
            length = int(self.u32.unpack_from(self.data, pos + 4)[0])
            pos += 8
            if tag != _ITEM:
                raise _Bad(owner, f"{_name(tag)} where an item was expected")
            if length == _UNDEFINED:
                pos = self.dataset(pos, end, implicit, depth + 1, in_item=True)
            else:
                if length > end - pos:
                    raise _Bad(owner, f"item declares {length} bytes, {end - pos} left")
                self.dataset(pos, pos + length, implicit, depth + 1, in_item=False)
                pos += length

    def fragments(self, pos: int, end: int) -> int:
        """Encapsulated Pixel Data: offset table, fragments, delimiter; returns the end."""
        if not self.encapsulated:
            raise _Bad(_PIXEL_DATA, "undefined length in a native transfer syntax")
        items = 0
        while True:
            if end - pos < 8:
                raise _Bad(_PIXEL_DATA, f"fragments truncated after item {items}")
            tag = self.read_tag(pos)
            length = int(self.u32.unpack_from(self.data, pos + 4)[0])
            pos += 8
            if tag == _SEQ_END:
                if length != 0:
                    raise _Bad(_PIXEL_DATA, f"sequence delimiter with length {length}")
                if items < 2:
                    raise _Bad(_PIXEL_DATA, "no fragment after the basic offset table")
                self.pixel[_PIXEL_DATA] = -1
                return pos
            if tag != _ITEM:
                raise _Bad(_PIXEL_DATA, f"{_name(tag)} where a fragment item was expected")
            if length == _UNDEFINED or length > end - pos:
                shown = "undefined" if length == _UNDEFINED else str(length)
                raise _Bad(
                    _PIXEL_DATA, f"fragment {items} declares {shown} bytes, {end - pos} left"
                )
            items += 1
            pos += length


def _is_sequence(tag: int) -> bool:
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


def _check_pixels(walk: _Walk) -> None:
    px = walk.pixel
    declared = px.get(_PIXEL_DATA)
    if declared is None or declared < 0:  # absent, or encapsulated and well-formed
        return
    missing = [t for t in (_ROWS, _COLUMNS, _BITS) if t not in px]
    if missing:
        raise _Bad(_PIXEL_DATA, f"present without {_name(missing[0])}")
    frames = px.get(_FRAMES, 1)
    if frames < 1:
        raise _Bad(_FRAMES, f"{frames} frames")
    bits = px[_BITS]
    if bits == 0 or (bits != 1 and bits % 8):
        raise _Bad(_BITS, f"{bits} bits allocated")
    samples = px.get(_SAMPLES, 1)
    count = px[_ROWS] * px[_COLUMNS] * samples * frames
    required = (count + 7) // 8 if bits == 1 else count * bits // 8
    if declared not in (required, required + 1):
        raise _Bad(
            _PIXEL_DATA,
            f"{declared} bytes, {required} required by Rows {px[_ROWS]} x Columns "
            f"{px[_COLUMNS]} x Samples {samples} x {bits} bits x {frames} frame(s)",
        )


def check_structure(stream: bytes, transfer_syntax: str) -> int:
    """Walk an encoded data set and raise if it is not well-formed.

    Parameters
    ----------
    stream : bytes
        The data set as received (no file meta).
    transfer_syntax : str
        The presentation context's transfer syntax UID.

    Returns
    -------
    int
        The number of elements walked (nested ones included).

    Raises
    ------
    InvalidInstance
        Status ``0xC000``; the message starts with the element at fault, for example
        ``(7FE0,0010) PixelData: 1048576 bytes, 5250 required by ...``.
    """
    ts = UID(transfer_syntax)
    data = stream
    if ts.is_deflated:
        try:
            data = zlib.decompress(stream, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise InvalidInstance(f"data set: deflate stream is corrupt ({exc})") from exc
    view = memoryview(data)
    walk = _Walk(view, ts.is_implicit_VR, ts.is_little_endian, ts.is_compressed)
    try:
        walk.dataset(0, len(view), walk.implicit, 0, in_item=False)
        _check_pixels(walk)
    except _Bad as exc:
        raise InvalidInstance(f"{_name(exc.tag)}: {exc}", STATUS_CANNOT_UNDERSTAND) from None
    except struct.error as exc:  # a header read past the end (guarded above; belt and braces)
        raise InvalidInstance(f"data set: truncated ({exc})") from None
    return walk.elements


def failure_status(status: int, comment: str) -> Dataset:
    """A C-STORE failure status with an Error Comment (LO: at most 64 characters).

    Parameters
    ----------
    status : int
        The DIMSE status (``0xC000``, ``0xA900``, ...).
    comment : str
        What is wrong; the element named first so that it survives the cut to 64.

    Returns
    -------
    pydicom.Dataset
        ``Status`` and ``ErrorComment``, as a pynetdicom handler may return them.
    """
    ds = Dataset()
    ds.Status = status
    text = "".join(c if 32 <= ord(c) < 127 and c != "\\" else " " for c in comment)
    ds.ErrorComment = text[:64].rstrip()
    return ds
