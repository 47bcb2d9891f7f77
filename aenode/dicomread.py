"""Defensive reads of header values: a malformed element is absent, with the reason kept.

pydicom converts an element's raw bytes on first access, and a sender's bit flip surfaces
there: an unknown VR (``CW`` for ``CS``) raises ``NotImplementedError``, a ``DS`` that is
not a number ``ValueError``, a bad character set ``LookupError`` or a warning. Rules,
volumes and results read header values through :func:`read_value` and friends instead of
``Dataset.get``: the value is None when the element is absent *or* unreadable, and
:func:`why_unreadable` says which (the text names the tag, never its value).
"""

from __future__ import annotations

from typing import Any

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.multival import MultiValue

from aenode.phi import scrub

__all__ = [
    "read_float",
    "read_int",
    "read_text",
    "read_value",
    "unreadable_elements",
    "why_unreadable",
]


def _reason(keyword: str, exc: BaseException) -> str:
    # pydicom's messages name the VR and tag, and sometimes quote the raw value: redacted.
    text = scrub(str(exc).split("\n", 1)[0])[:160]
    return f"{keyword} cannot be read ({type(exc).__name__}: {text})"


def _get(ds: Dataset, keyword: str) -> tuple[Any, str | None]:
    try:
        return ds.get(keyword), None
    except Exception as exc:  # pydicom raises many kinds (and warnings-as-errors) here
        return None, _reason(keyword, exc)


def read_value(ds: Dataset | None, keyword: str, default: Any = None) -> Any:
    """The value of ``keyword`` in ``ds``, or ``default`` when absent or unreadable.

    Parameters
    ----------
    ds : pydicom.Dataset or None
        A data set (or sequence item); None reads as empty.
    keyword : str
        The element's keyword (``Modality``).
    default : Any
        Returned when the element is absent or cannot be converted.

    Returns
    -------
    Any
        The converted value (as ``Dataset.get`` returns it) or ``default``.
    """
    if ds is None:
        return default
    value, problem = _get(ds, keyword)
    if problem is not None or value is None:
        return default
    return value


def why_unreadable(ds: Dataset | None, keyword: str) -> str | None:
    """Why an element that is present cannot be read; None if it reads (or is absent).

    Parameters
    ----------
    ds : pydicom.Dataset or None
        A data set.
    keyword : str
        The element's keyword.

    Returns
    -------
    str or None
        ``"Modality cannot be read (NotImplementedError: Unknown Value Representation
        'CW' in tag (0008,0060))"``, or None.
    """
    if ds is None:
        return None
    return _get(ds, keyword)[1]


def read_text(ds: Dataset | None, keyword: str) -> str:
    """The value as stripped text ("" when absent or unreadable; multi-values joined by ``\\``)."""
    value = read_value(ds, keyword)
    if value is None:
        return ""
    try:
        if isinstance(value, MultiValue | list | tuple):
            return "\\".join(str(v) for v in value).strip()
        return str(value).strip()
    except Exception:  # a value whose str() fails is as unreadable as its bytes
        return ""


def read_float(ds: Dataset | None, keyword: str, default: float | None = None) -> float | None:
    """The value as a finite float, or ``default`` when absent, unreadable or not a number."""
    value = read_value(ds, keyword)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return number if number == number and abs(number) != float("inf") else default


def read_int(ds: Dataset | None, keyword: str, default: int | None = None) -> int | None:
    """The value as an int, or ``default`` when absent, unreadable or not an integer."""
    number = read_float(ds, keyword)
    if number is None or number != int(number):
        return default
    return int(number)


def unreadable_elements(ds: Dataset, keywords: list[str] | None = None) -> dict[str, str]:
    """The reasons of every top-level element (or of ``keywords``) that cannot be read.

    Parameters
    ----------
    ds : pydicom.Dataset
        A data set.
    keywords : list of str or None
        The keywords to try; None tries every top-level element with a keyword.

    Returns
    -------
    dict of str to str
        Keyword -> :func:`why_unreadable` text for each unreadable element, in tag order.
    """
    if keywords is None:
        keywords = [k for k in (keyword_for_tag(tag) for tag in list(ds.keys())) if k]
    out: dict[str, str] = {}
    for keyword in keywords:
        if tag_for_keyword(keyword) is None:
            continue
        problem = why_unreadable(ds, keyword)
        if problem is not None:
            out[keyword] = problem
    return out
