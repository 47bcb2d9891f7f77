"""No PHI in logs from any source: one filter on the log handler, installed by the CLI.

Third-party libraries quote header values in their messages: pydicom's warning about a
malformed element prints the raw value (``Invalid value for VR IS: 'DOE^JANE'``), its
exceptions print raw bytes. With ``logging.phi`` off, :class:`PhiFilter` rewrites every
record that reaches the handler:

- records of other libraries (``pydicom``, ``pynetdicom``, ``py.warnings`` where
  :func:`logging.captureWarnings` sends Python warnings) keep their words, tags and
  numbers, but every quoted string and bytes literal but a two-letter VR code becomes
  ``'<redacted>'`` (:func:`scrub`), tracebacks included;
- aenode's own records lose a ``patient`` context field and any value quoted right after
  a patient attribute (``PatientName 'X'``, ``(0010,0010) 'X'``); aenode never logs other
  patient data, and quoted values such as a SeriesDescription in a rule's reason stay.
"""

from __future__ import annotations

import logging
import re
import traceback

__all__ = ["PhiFilter", "install_phi_filter", "scrub", "scrub_patient_values"]

THIRD_PARTY = ("py.warnings", "pydicom", "pynetdicom", "highdicom")
"""Loggers whose records are sent through aenode's handler (and so through the filter)."""

_QUOTED = re.compile(r"""[bBrRuU]{0,2}'(?:[^'\\\n]|\\.)*'|[bBrRuU]{0,2}"(?:[^"\\\n]|\\.)*\"""")
_PATIENT = re.compile(
    r"((?:Other)?Patient\w*|Ethnic\w*|\((?:0010),[0-9A-Fa-f]{4}\))"
    r"(\W{0,40}?)"
    r"(?:" + _QUOTED.pattern + ")"
)
REDACTED = "'<redacted>'"
_VR = re.compile(r"'[A-Z]{2}'")


def scrub(text: str) -> str:
    """``text`` with every quoted string and bytes literal replaced by ``'<redacted>'``.

    Parameters
    ----------
    text : str
        A message (or traceback) from a library that may quote header values.

    Returns
    -------
    str
    """
    return _QUOTED.sub(_redact, text)


def _redact(match: re.Match[str]) -> str:
    # A quoted two-letter VR code ('CW' in "Unknown Value Representation 'CW'") is kept.
    return match.group(0) if _VR.fullmatch(match.group(0)) else REDACTED


def scrub_patient_values(text: str) -> str:
    """``text`` with values quoted right after a patient attribute redacted."""
    return _PATIENT.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


class PhiFilter(logging.Filter):
    """Rewrites records so that no PHI leaves through the handler (see the module notes).

    Parameters
    ----------
    allow_phi : bool
        ``logging.phi``: True passes records unchanged.
    """

    def __init__(self, allow_phi: bool) -> None:
        super().__init__()
        self.allow_phi = allow_phi

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record`` in place; never drops it."""
        if self.allow_phi:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken %-format in a library: keep the template only
            message = str(record.msg)
        if record.name == "aenode" or record.name.startswith("aenode."):
            if hasattr(record, "patient"):
                delattr(record, "patient")
            cleaned = scrub_patient_values(message)
        else:
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info))
                record.exc_info = None
                record.exc_text = None
            cleaned = scrub(message)
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        return True


def install_phi_filter(handler: logging.Handler, allow_phi: bool) -> None:
    """Put :class:`PhiFilter` on ``handler`` and send warnings and libraries' logs to it.

    Parameters
    ----------
    handler : logging.Handler
        The handler the CLI configured for aenode's logger.
    allow_phi : bool
        ``logging.phi``.
    """
    for old in [f for f in handler.filters if isinstance(f, PhiFilter)]:
        handler.removeFilter(old)
    handler.addFilter(PhiFilter(allow_phi))
    # Off then on: a second configuration (tests, a re-run CLI) captures warnings again
    # even if something restored warnings.showwarning in between.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    for name in THIRD_PARTY:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        if logger.level == logging.NOTSET or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
