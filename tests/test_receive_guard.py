"""Network hygiene (aenode/receive/guard.py) with real sockets on loopback: stalled, idle and
hostile connections must not keep a real dcmtk sender out, and 16 parallel senders fit
the default association limit of a node with two receiving processes.

Real data: ../shared/data/udacity-mr/Study1/13_HCropVolume (32 MR instances).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import dcmtk
from nodes import Receivers
from pynetdicom import AE

from aenode.config import Settings
from aenode.receive.guard import AssociationSlots, GuardedSocket
from aenode.receive.workers import TIMER_SLACK_NS, receiver_count

pytestmark = pytest.mark.network

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
ARTIM = 2.0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receivers]:
    receivers = Receivers(
        tmp_path_factory.mktemp("guard"),
        {"node": {"artim_timeout": ARTIM, "pdu_timeout": 2.0, "receivers": 2}},
    ).start()
    yield receivers
    receivers.stop()


def echoscu(port: int) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = subprocess.run(
        [dcmtk("echoscu"), "-to", "10", "-aec", "AENODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=60,
    )
    return done, time.monotonic() - start


def _connect(port: int, payload: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if payload:
        sock.sendall(payload)
    return sock


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slots_hold_for_the_node_with_a_margin() -> None:
    counts = [0, 0]
    a, b = AssociationSlots(4, counts, 0), AssociationSlots(4, counts, 1)
    assert a.ceiling == 6
    taken = [a.acquire(i) for i in range(3)] + [b.acquire(i) for i in range(10, 13)]
    assert taken == [True] * 6
    assert not b.acquire(99) and not a.acquire(98)  # full for the node, whichever process
    a.release(0)
    a.release(0)  # twice: no double release
    assert counts == [2, 3] and b.acquire(99)


def test_floods_do_not_keep_a_real_sender_out(node: Receivers) -> None:
    port = node.port
    held: list[socket.socket] = []
    try:
        held += [_connect(port) for _ in range(16)]  # idle: connect, say nothing
        # partial A-ASSOCIATE-RQ: a header declaring 200 bytes, 10 of them sent
        held += [_connect(port, b"\x01\x00" + struct.pack(">L", 200) + b"\x00" * 10)] * 1
        held += [_connect(port, b"\x01\x00" + struct.pack(">L", 200) + b"\x00" * 10)]
        four_gb = _connect(port, b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 64)
        for _ in range(20):  # bare connect-and-close
            _connect(port).close()
        done, waited = echoscu(port)
        assert done.returncode == 0, done.stderr
        assert waited < 3.0, f"echoscu took {waited:.1f} s under the flood"
        assert _closed_by_peer(four_gb, 2.0), "a 4 GB A-ASSOCIATE-RQ was not refused at once"
        # the ARTIM-like timer: idle and half-sent connections are closed by the node
        assert all(_closed_by_peer(s, ARTIM + 3.0) for s in held[-3:])
        assert _closed_by_peer(held[0], 1.0)
    finally:
        for sock in held:
            sock.close()
    log = node.log_text()
    assert "A-ASSOCIATE-RQ declares 4294967295 bytes" in log
    assert f"no complete A-ASSOCIATE-RQ within {ARTIM:g} s" in log


def test_a_pdu_declaring_4_gb_aborts_the_association(node: Receivers) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AENODE")
    assert assoc.is_established
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    assoc.dul.socket.socket.sendall(b"\x04\x00\xff\xff\xff\xff" + b"\x00" * 32)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and assoc.is_alive():
        time.sleep(0.05)
    assert assoc.is_aborted or not assoc.is_established
    assert "a PDU declares 4294967295 bytes" in node.log_text()
    done, _ = echoscu(node.port)
    assert done.returncode == 0, done.stderr


def test_a_stalled_pdu_is_timed_out(node: Receivers) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AENODE")
    assert assoc.is_established
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    start = time.monotonic()
    assoc.dul.socket.socket.sendall(b"\x04\x00" + struct.pack(">L", 1000) + b"\x00" * 10)
    while time.monotonic() < start + 10 and assoc.is_alive():
        time.sleep(0.05)
    assert not assoc.is_alive(), "a half-sent P-DATA held the association"
    assert time.monotonic() - start < 6


def test_sixteen_parallel_senders_are_all_accepted(data_dir: Path, tmp_path: Path) -> None:
    node = Receivers(tmp_path, {"node": {"receivers": 2}}).start()  # default max_associations
    crop = data_dir / "udacity-mr" / "Study1" / "13_HCropVolume"

    def send(_: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [dcmtk("storescu"), "-aec", "AENODE", "+sd", "127.0.0.1", str(node.port), str(crop)],
            capture_output=True,
            text=True,
            env=DCMTK_ENV,
            timeout=120,
        )

    try:
        with ThreadPoolExecutor(16) as pool:
            for _ in range(2):
                results = list(pool.map(send, range(16)))
                refused = [r.stderr for r in results if r.returncode != 0]
                assert refused == [], refused[0][-500:]
        assert len(node.query("SELECT 1 FROM instances")) == 32
        assert "Local Limit" not in node.log_text()
    finally:
        node.stop()


def test_guarded_socket_keeps_its_timeouts_in_the_kernel() -> None:
    """No Python-level timeout (it costs a poll() before each of pynetdicom's 4 kB reads):
    SO_RCVTIMEO ends a read that waits pdu_timeout, and the PDU framing is still followed."""
    ours, peer = socket.socketpair()
    guarded = GuardedSocket(ours, max_pdu=1000, pdu_timeout=0.3)
    try:
        assert guarded.gettimeout() is None
        seconds, micros = struct.unpack(
            "@ll", guarded.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
        )
        assert (seconds, micros) == (0, 300000)
        peer.sendall(b"\x04\x00" + struct.pack(">L", 100) + b"\x01" * 60)
        assert guarded.recv(6) == b"\x04\x00\x00\x00\x00\x64"
        assert guarded.recv(4096) == b"\x01" * 60
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            guarded.recv(40)
        assert 0.25 < time.monotonic() - start < 2.0
        with pytest.raises(ConnectionAbortedError, match="did not arrive in time"):
            guarded.recv(40)  # past the PDU's deadline
        assert peer.recv(10) == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])  # A-ABORT
    finally:
        guarded.close()
        peer.close()
    ours, peer = socket.socketpair()
    guarded = GuardedSocket(ours, max_pdu=1000, pdu_timeout=5.0)
    try:
        peer.sendall(b"\x04\x00" + struct.pack(">L", 10) + b"\x02" * 10)
        peer.sendall(b"\x04\x00" + struct.pack(">L", 5000))
        assert guarded.recv(16) == b"\x04\x00\x00\x00\x00\x0a" + b"\x02" * 10
        with pytest.raises(ConnectionAbortedError, match="a PDU declares 5000 bytes"):
            guarded.recv(6)
    finally:
        guarded.close()
        peer.close()


def test_receiving_processes_run_with_a_1_us_timer_slack(node: Receivers) -> None:
    """pynetdicom hands each C-STORE between its threads by 1 ms polling sleeps."""
    assert node.proc is not None
    children = Path(f"/proc/{node.proc.pid}/task/{node.proc.pid}/children").read_text().split()
    assert len(children) == 2
    for pid in children:
        assert Path(f"/proc/{pid}/timerslack_ns").read_text().strip() == str(TIMER_SLACK_NS)


def test_default_receivers_are_twice_the_cpus_at_most_16() -> None:
    assert receiver_count(Settings()) == min(16, 2 * (os.cpu_count() or 1))
    assert receiver_count(Settings.model_validate({"node": {"receivers": 3}})) == 3
