"""Test certificates made with the ``openssl`` command: two CAs, a server, clients.

``make_certs(folder)`` writes PEM files (RSA 2048, which dcmtk's BCP 195 profile needs):

- ``ca.pem``/``ca.key``: the trusted CA; ``other-ca.pem``: a CA nobody trusts;
- ``server.pem``/``server.key``: signed by the CA, SAN IP 127.0.0.1 and DNS localhost;
- ``client.pem``/``client.key``: signed by the CA, CN ``modality``;
- ``rogue.pem``/``rogue.key``: signed by the other CA, CN ``rogue``;
- ``wrong-host.pem``/``wrong-host.key``: signed by the CA, SAN DNS elsewhere.example only.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Certs:
    """Paths of the files :func:`make_certs` wrote."""

    folder: Path

    def pem(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"


def _openssl(*args: str, cwd: Path) -> None:
    tool = shutil.which("openssl")
    if tool is None:
        pytest.fail("the openssl command is missing; run `make install`")
    subprocess.run([tool, *args], cwd=cwd, check=True, capture_output=True)


def _ca(folder: Path, name: str, cn: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "30",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/O=aenode tests/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip


def _leaf(folder: Path, name: str, cn: str, ca: str, san: str | None, usage: str) -> None:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", f"/O=aenode tests/CN={cn}",
        cwd=folder,
    )  # fmt: skip
    ext = [f"extendedKeyUsage={usage}", "basicConstraints=CA:FALSE"]
    if san:
        ext.append(f"subjectAltName={san}")
    (folder / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "30", "-sha256", "-extfile", f"{name}.ext",
        "-out", f"{name}.pem",
        cwd=folder,
    )  # fmt: skip


def make_certs(folder: Path) -> Certs:
    """Write the test PKI into ``folder`` (created) and return its paths."""
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "ca", "aenode test CA")
    _ca(folder, "other-ca", "untrusted CA")
    _leaf(folder, "server", "aenode", "ca", "IP:127.0.0.1,DNS:localhost", "serverAuth,clientAuth")
    _leaf(folder, "client", "modality", "ca", None, "clientAuth")
    _leaf(folder, "rogue", "rogue", "other-ca", None, "clientAuth")
    _leaf(folder, "wrong-host", "elsewhere", "ca", "DNS:elsewhere.example", "serverAuth")
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return Certs(folder)
