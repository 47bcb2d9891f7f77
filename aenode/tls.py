"""DICOM TLS (PS3.15 Annex B.12, the BCP 195 profile): SSL contexts from the settings.

Python's :mod:`ssl` (OpenSSL) does the work. Both sides allow TLS 1.2 or later only and,
for TLS 1.2, the BCP 195 (RFC 7525) suites: ECDHE or DHE key exchange with AES-GCM (TLS 1.3
suites are all AEAD and always on). The listener verifies client certificates against
``node.tls.ca``; a sender verifies the server's certificate against the destination's
``tls.ca`` and checks the host name or IP address it connects to against it.

Every file is loaded when the context is made, so a missing file, a file that does not
parse or a key that does not match its certificate is a :class:`~aenode.errors.ConfigError`
naming the key path (``node.tls.key: ...``) at start-up.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from aenode.errors import ConfigError

__all__ = ["BCP195_CIPHERS", "client_context", "peer_subject", "server_context"]

BCP195_CIPHERS = "ECDHE+AESGCM:DHE+AESGCM:!aNULL:!eNULL:!SHA1"
"""OpenSSL cipher string for TLS 1.2: the RFC 7525 recommended suites (AEAD, forward secrecy)."""


def _file(path: Path, key: str) -> str:
    if not path.is_file():
        raise ConfigError(f"{key}: {path}: no such file")
    return str(path)


def _base(server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    return ctx


def _load_ca(ctx: ssl.SSLContext, ca: Path, key: str) -> None:
    try:
        ctx.load_verify_locations(cafile=_file(ca, key))
    except ssl.SSLError as exc:
        raise ConfigError(f"{key}: {ca}: not a PEM certificate ({exc.reason or exc})") from exc


def _load_pair(ctx: ssl.SSLContext, cert: Path, key: Path, prefix: str) -> None:
    cert_file = _file(cert, f"{prefix}.cert")
    key_file = _file(key, f"{prefix}.key")
    try:
        # The certificate alone first, so that a bad one is not reported as a bad key.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{prefix}.cert: {cert}: not a PEM certificate ({exc.reason or exc})"
        ) from exc
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        why = "does not match" if "MISMATCH" in str(exc).upper() else "cannot be loaded with"
        raise ConfigError(
            f"{prefix}.key: {key}: {why} {prefix}.cert ({exc.reason or exc}); "
            "an unencrypted PEM private key is expected"
        ) from exc


def server_context(
    cert: Path, key: Path, ca: Path | None, require_client_cert: bool, prefix: str = "node.tls"
) -> ssl.SSLContext:
    """The listener's context.

    Parameters
    ----------
    cert, key : pathlib.Path
        PEM certificate (chain) and its unencrypted private key.
    ca : pathlib.Path or None
        PEM certificate(s) of the CA that signs accepted client certificates.
    require_client_cert : bool
        Refuse a client that presents no certificate.
    prefix : str
        Key path for error messages.

    Returns
    -------
    ssl.SSLContext

    Raises
    ------
    ConfigError
        If a file is missing or unreadable or the key does not match; names the key path.
    """
    ctx = _base(server=True)
    _load_pair(ctx, Path(cert), Path(key), prefix)
    if ca is not None:
        _load_ca(ctx, Path(ca), f"{prefix}.ca")
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise ConfigError(f"{prefix}.ca: required when {prefix}.require_client_cert is true")
    return ctx


def client_context(
    ca: Path, cert: Path | None, key: Path | None, prefix: str = "export.destinations[0].tls"
) -> ssl.SSLContext:
    """A sender's context: the server is verified against ``ca``, with host name checking.

    Parameters
    ----------
    ca : pathlib.Path
        PEM certificate(s) trusted for the destination's server certificate.
    cert, key : pathlib.Path or None
        Our client certificate and key (both or neither).
    prefix : str
        Key path for error messages.

    Returns
    -------
    ssl.SSLContext

    Raises
    ------
    ConfigError
        As :func:`server_context`.
    """
    ctx = _base(server=False)  # CERT_REQUIRED and check_hostname
    _load_ca(ctx, Path(ca), f"{prefix}.ca")
    if (cert is None) != (key is None):
        raise ConfigError(f"{prefix}: give both cert and key, or neither")
    if cert is not None and key is not None:
        _load_pair(ctx, Path(cert), Path(key), prefix)
    return ctx


def peer_subject(sock: object) -> str | None:
    """The subject of the peer's verified certificate on a TLS socket (RFC 4514 style).

    Returns
    -------
    str or None
        For example ``CN=modality,O=Hospital``; None for a plain socket or no certificate.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert()
    if not cert:
        return None
    parts = []
    for rdn in reversed(cert.get("subject", ())):
        for name, value in rdn:
            short = _SHORT.get(name, name)
            parts.append(f"{short}={value}")
    return ",".join(parts) or None


_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}
