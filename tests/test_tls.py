"""DICOM TLS both ways against dcmtk on loopback: the receiving processes with a TLS port
(echoscu/storescu ``+tls``) and the sender into ``storescp +tls``. Certificates are made
by ``openssl`` per module (tests/tlscerts.py). Real data: udacity-mr/Study1 HippoCrop."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from conftest import dcmtk, free_port
from nodes import Receivers
from test_scu import HIPPO, wait_port
from tlscerts import Certs, make_certs

from aenode.config import DestinationSettings, DestinationTlsSettings, load_settings
from aenode.errors import ConfigError
from aenode.export.scu import send_files

pytestmark = pytest.mark.network

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("pki"))


def tls_node(certs: Certs, port: int, **extra: object) -> dict[str, object]:
    return {
        "port": port,
        "cert": str(certs.pem("server")),
        "key": str(certs.key("server")),
        "ca": str(certs.pem("ca")),
        **extra,
    }


# -- settings ------------------------------------------------------------------------------


def _load(tmp_path: Path, config: dict[str, object]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    load_settings(path, environ={})


def test_tls_settings_are_checked_at_load_naming_the_key(certs: Certs, tmp_path: Path) -> None:
    good = tls_node(certs, 11113)
    _load(tmp_path, {"node": {"tls": good}})  # loads
    mismatch = {**good, "key": str(certs.key("client"))}
    with pytest.raises(ConfigError, match=r"node\.tls\.key: .*client\.key: does not match"):
        _load(tmp_path, {"node": {"tls": mismatch}})
    with pytest.raises(ConfigError, match=r"node\.tls\.key: .*nope\.key: no such file"):
        _load(tmp_path, {"node": {"tls": {**good, "key": str(tmp_path / "nope.key")}}})
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"node\.tls\.cert: .*garbage\.pem: not a PEM"):
        _load(tmp_path, {"node": {"tls": {**good, "cert": str(garbage)}}})
    with pytest.raises(ConfigError, match=r"node\.tls\.key: .*garbage\.pem: cannot be loaded"):
        _load(tmp_path, {"node": {"tls": {**good, "key": str(garbage)}}})
    with pytest.raises(ConfigError, match=r"node\.tls\.ca: required"):
        _load(tmp_path, {"node": {"tls": {**good, "ca": None}}})
    with pytest.raises(ConfigError, match="nothing would listen"):
        _load(tmp_path, {"node": {"port": None}})
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    with pytest.raises(ConfigError, match=r"export\.destinations\[1\]\.tls\.ca: .*no such file"):
        _load(
            tmp_path,
            {"export": {"destinations": [dest, {**dest, "tls": {"ca": str(tmp_path / "x.pem")}}]}},
        )
    with pytest.raises(ConfigError, match=r"export\.destinations\[0\]\.tls: give both"):
        _load(
            tmp_path,
            {
                "export": {
                    "destinations": [
                        {**dest, "tls": {"ca": str(certs.pem("ca")), "cert": good["cert"]}}
                    ]
                }
            },
        )


# -- receiving ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_receivers(
    certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Receivers, int]]:
    tmp = tmp_path_factory.mktemp("tls-node")
    port = free_port()
    node = Receivers(tmp, {"node": {"port": None, "tls": tls_node(certs, port)}})
    node.start()
    try:
        yield node, port
    finally:
        node.stop()


def _dcmtk(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk(tool), *args], env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout
    )


def _tls(certs: Certs, who: str) -> list[str]:
    return ["+tls", str(certs.key(who)), str(certs.pem(who)), "+cf", str(certs.pem("ca"))]


def test_study_in_over_tls_records_the_client_subject(
    tls_receivers: tuple[Receivers, int], certs: Certs, data_dir: Path
) -> None:
    node, port = tls_receivers
    echo = _dcmtk("echoscu", *_tls(certs, "client"), "-aec", "AENODE", "127.0.0.1", str(port))
    assert echo.returncode == 0, echo.stderr
    files = sorted((data_dir / HIPPO).glob("*.dcm"))
    sent = _dcmtk(
        "storescu", *_tls(certs, "client"), "-aec", "AENODE", "127.0.0.1", str(port),
        *map(str, files),
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    rows = node.query("SELECT sop_instance_uid FROM instances")
    assert sorted(r[0] for r in rows) == sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
    spooled = {pydicom.dcmread(p).SOPInstanceUID: p for p in node.spooled()}
    original = pydicom.dcmread(files[0])
    assert pydicom.dcmread(spooled[original.SOPInstanceUID]).PixelData == original.PixelData
    assocs = node.query("SELECT peer_subject FROM associations")
    assert [r[0] for r in assocs] == ["CN=modality,O=aenode tests"]
    log = node.log_text()
    assert "client certificate CN=modality,O=aenode tests" in log
    assert "TLSv1." in log


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ([], "not TLS: plain DICOM on the TLS port"),
        (["rogue"], "client certificate not accepted"),
        (["anonymous"], "no client certificate (node.tls.require_client_cert is true)"),
    ],
)
def test_refusals_on_the_tls_port_are_logged_with_the_reason(
    tls_receivers: tuple[Receivers, int], certs: Certs, args: list[str], reason: str
) -> None:
    node, port = tls_receivers
    before = len(node.log_text())
    if args == ["rogue"]:
        opts = [*_tls(certs, "rogue")]
    elif args == ["anonymous"]:
        opts = ["+tla", "+cf", str(certs.pem("ca"))]  # TLS without a client certificate
    else:
        opts = []
    echo = _dcmtk("echoscu", *opts, "-to", "5", "-aec", "AENODE", "127.0.0.1", str(port))
    assert echo.returncode != 0
    deadline = time.monotonic() + 10
    while reason not in node.log_text()[before:] and time.monotonic() < deadline:
        time.sleep(0.05)
    new = node.log_text()[before:]
    assert "TLS connection from 127.0.0.1" in new and reason in new, new
    assert "refused" in new


def test_warns_when_listening_beyond_loopback_without_allowed_peers(
    certs: Certs, tmp_path: Path
) -> None:
    port = free_port()
    node = Receivers(
        tmp_path, {"node": {"host": "0.0.0.0", "port": None, "tls": tls_node(certs, port)}}
    )
    node.start()
    node.stop()
    assert "node.allowed_peers is not set" in node.log_text()
    (tmp_path / "b").mkdir()
    peers = {"host": "0.0.0.0", "allowed_peers": [{"ae_title": "MOD"}]}
    quiet = Receivers(tmp_path / "b", {"node": peers})
    quiet.start()
    quiet.stop()
    assert "allowed_peers is not set" not in quiet.log_text()


# -- sending --------------------------------------------------------------------------------


@pytest.fixture
def tls_storescp(certs: Certs, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """``storescp +tls`` (server certificate for 127.0.0.1) requiring a client certificate."""
    port = free_port()
    out = tmp_path / "in"
    out.mkdir()
    proc = subprocess.Popen(
        [dcmtk("storescp"), *_tls(certs, "server"), "-aet", "STORESCP", "-od", str(out),
         "+xa", str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _dest(port: int, certs: Certs, host: str = "127.0.0.1") -> DestinationSettings:
    tls = DestinationTlsSettings(
        ca=certs.pem("ca"), cert=certs.pem("client"), key=certs.key("client")
    )
    return DestinationSettings(ae_title="STORESCP", host=host, port=port, tls=tls)


def test_results_out_over_tls_into_storescp(
    tls_storescp: tuple[int, Path], certs: Certs, data_dir: Path
) -> None:
    port, out = tls_storescp
    files = sorted((data_dir / HIPPO).glob("*.dcm"))[:5]
    outcome = send_files(_dest(port, certs), files, calling_ae="AENODE", timeout=20)
    assert outcome.ok, outcome
    received = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in out.iterdir()}
    for f in files:
        ds = pydicom.dcmread(f)
        assert received[ds.SOPInstanceUID].PixelData == ds.PixelData
    # "localhost" is in the certificate too; a name that is not fails the check.
    assert send_files(
        _dest(port, certs, "localhost"), files[:1], calling_ae="AENODE", timeout=20
    ).ok


def test_tls_failures_are_failed_tries_never_a_plain_send(
    certs: Certs, tmp_path: Path, data_dir: Path
) -> None:
    files = sorted((data_dir / HIPPO).glob("*.dcm"))[:1]
    # A server whose certificate names another host.
    port = free_port()
    out = tmp_path / "in"
    out.mkdir()
    wrong = subprocess.Popen(
        [dcmtk("storescp"), *_tls(certs, "wrong-host"), "-aet", "STORESCP", "-od", str(out),
         str(port)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    plain_port = free_port()
    plain = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "STORESCP", "-od", str(out), str(plain_port)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port)
        wait_port(plain_port)
        mismatch = send_files(_dest(port, certs), files, calling_ae="AENODE", timeout=10)
        assert not mismatch.ok and mismatch.error is not None
        assert "server certificate not accepted" in mismatch.error
        assert "127.0.0.1" in mismatch.error and "mismatch" in mismatch.error.lower()
        cleartext = send_files(_dest(plain_port, certs), files, calling_ae="AENODE", timeout=10)
        assert not cleartext.ok and cleartext.error is not None
        assert "TLS handshake failed" in cleartext.error
        assert list(out.iterdir()) == []  # nothing went in the clear
    finally:
        for proc in (wrong, plain):
            proc.terminate()
            proc.wait(timeout=10)
