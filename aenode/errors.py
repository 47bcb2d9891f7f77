"""One exception root for aenode, split by cause.

:class:`AenodeError` is the root. Catch by cause (httpx's ``RequestError`` /
``HTTPStatusError`` split): :class:`InputError` (bad DICOM, configuration, model package
or volume geometry) becomes a recorded reason; :class:`PeerError` (a DICOM peer or the
network) a retry or a recorded reason; :class:`InternalError` or any other exception is a
bug, logged with its traceback and never disguised.

``InputError`` also derives from ``ValueError`` and ``InternalError`` from ``RuntimeError``,
and ``PeerError`` from ``ConnectionError``, so callers written against the built-in classes
keep working.
"""

from __future__ import annotations

__all__ = ["AenodeError", "ConfigError", "InputError", "InternalError", "PeerError"]


class AenodeError(Exception):
    """The root of every error aenode raises on purpose; the message names tag, file or key."""


class InputError(AenodeError, ValueError):
    """Bad input: a DICOM object, a configuration key, a model package, a volume's geometry."""


class ConfigError(InputError):
    """A configuration file or override that cannot be used; the message names the key path.

    Key paths are spelled one way everywhere: ``selection.rules[0].series.all[1].regex``.
    """


class PeerError(AenodeError, ConnectionError):
    """A DICOM peer or the network failed: refused, aborted, timed out, or a failure status."""


class InternalError(AenodeError, RuntimeError):
    """A broken invariant inside aenode (an illegal state transition, a store of unknown schema)."""
