"""Ingest: instances/s into ``aenode serve`` against dcmtk storescp, and completion latency.

Data: a synthetic CT series of 300 slices 512x512 int16 (158 MB, Explicit VR LE), written
once into ``bench-out/ingest-300/iia`` (with ImagesInAcquisition=300) and
``bench-out/ingest-300/no-iia`` (the same without it, other UIDs).

Reference, measured in the same run and alternating with aenode run by run (storescp, the
pynetdicom floor, aenode, aenode without fsync, again): ``storescp --fork`` writing every
instance to a tmp folder (``TCP_NODELAY=1``). aenode runs as ``aenode serve`` with its
defaults (durable writes: fdatasync of each file into a pool file made durable ahead of
use; receivers = twice the CPUs). The pynetdicom floor (:mod:`bench.floor_scp`: the same
number of processes, a handler that answers at once and writes nothing) is the most a
receiver on pynetdicom can reach here, and runs in the same rotation.
Every run starts from an empty receiver (fresh folder / fresh store) so that nothing is a
duplicate. Senders are dcmtk storescu (``TCP_NODELAY=1``): one association with all 300
files, or 4 storescu processes in parallel with a quarter each. Time = wall clock from
starting the sender(s) until all exited; the median of ``BENCH_REPEATS`` runs (default 5)
is printed with the range. Just this part: ``python -m bench ingest``.

Completion latency: from the last instance's arrival (its ``received_at`` in the store,
just before its C-STORE response) to the ``series.complete`` queue item (``created_at``),
with ImagesInAcquisition (target <= 0.2 s) and without (target <= release grace + 0.2 s).
Targets (issue 16): aenode/storescp >= 0.45 on one association and >= 0.7 with 4 senders. storescp
never fsyncs; aenode without fsync (``storage.fsync: false``) is printed too, to separate the
cost of the disk's fsync from the cost of the protocol stack.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aenode.config import Settings
from aenode.receive.workers import receiver_count
from bench.common import ct_slice, free_port, wait_port

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out" / "ingest-300"
N = 300
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
TARGETS = {1: 0.45, 4: 0.7}
DCMTK = "/usr/bin"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def _series(folder: Path, with_iia: bool) -> list[Path]:
    """Write the synthetic series once; later runs reuse it."""
    from pydicom.uid import generate_uid

    existing = sorted(folder.glob("*.dcm"))
    if len(existing) == N:
        return existing
    folder.mkdir(parents=True, exist_ok=True)
    for p in existing:
        p.unlink()
    rng = np.random.default_rng(0)
    base = rng.integers(-1024, 2000, size=(512, 512), dtype=np.int16)
    study, series = generate_uid(), generate_uid()
    for i in range(N):
        ds = ct_slice(study, series, i, np.roll(base, i, axis=0), z=float(i))
        if with_iia:
            ds.ImagesInAcquisition = N
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
    return sorted(folder.glob("*.dcm"))


def _send(port: int, files: Sequence[Path], senders: int) -> float:
    """Seconds from starting ``senders`` storescu processes until all exited."""
    chunks = [list(files[i::senders]) for i in range(senders)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [f"{DCMTK}/storescu", "-aec", "AENODE", "127.0.0.1", str(port), *map(str, chunk)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - t0


def _floor_run(files: Sequence[Path], senders: int, processes: int) -> float:
    """The pynetdicom floor (:mod:`bench.floor_scp`) with as many processes as aenode."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.floor_scp", str(port), str(processes)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        time.sleep(0.5)  # every process is listening
        return _send(port, files, senders)
    finally:
        proc.terminate()
        proc.wait(10)


def _storescp_run(files: Sequence[Path], senders: int) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory(dir=ROOT / "bench-out") as out:
        proc = subprocess.Popen(
            [f"{DCMTK}/storescp", "--fork", "-aet", "AENODE", "-od", out, str(port)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(port)
            seconds = _send(port, files, senders)
            got = sum(1 for _ in Path(out).iterdir())
            if got != len(files):
                raise RuntimeError(f"storescp wrote {got} of {len(files)} files")
        finally:
            proc.terminate()
            proc.wait(10)
    return seconds


class _Node:
    """``aenode serve`` on a fresh store."""

    def __init__(self, grace: float = 1.0, fsync: bool = True, node: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(dir=ROOT / "bench-out"))
        self.port = free_port()
        config = self.dir / "aenode.yaml"
        config.write_text(
            f"node: {{host: 127.0.0.1, port: {self.port}{node}}}\n"
            f"storage: {{path: {self.dir / 'var'}, min_free_mb: 100,"
            f" fsync: {str(fsync).lower()}}}\n"
            f"series: {{release_grace_seconds: {grace}}}\n"
            "logging: {level: WARNING}\n"
        )
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "aenode"), "--config", str(config), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        time.sleep(0.5)  # every receiving process is listening

    def query(self, sql: str) -> list[tuple[float, ...]]:
        conn = sqlite3.connect(self.dir / "var" / "aenode.db", timeout=30)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def handed_on(self, timeout: float = 30.0) -> float:
        """Seconds from the last arrival to the series.complete item."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.query("SELECT created_at FROM queue WHERE topic='series.complete'")
            if rows:
                (last,) = self.query("SELECT MAX(received_at) FROM instances")[0]
                return float(rows[0][0]) - float(last)
            time.sleep(0.02)
        raise RuntimeError("the series was not handed on")

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


def _aenode_run(files: Sequence[Path], senders: int, fsync: bool = True) -> tuple[float, float]:
    node = _Node(fsync=fsync)
    try:
        seconds = _send(node.port, files, senders)
        (count,) = node.query("SELECT COUNT(*) FROM instances")[0]
        if count != len(files):
            raise RuntimeError(f"aenode recorded {count} of {len(files)} instances")
        return seconds, node.handed_on()
    finally:
        node.close()


def _rates(seconds: list[float]) -> str:
    rates = sorted(N / s for s in seconds)
    return f"{N / statistics.median(seconds):6.1f} inst/s (range {rates[0]:.0f}-{rates[-1]:.0f})"


def main() -> None:
    """Print instances/s for storescp and aenode, their ratio, and completion latency."""
    (ROOT / "bench-out").mkdir(exist_ok=True)
    iia = _series(OUT / "iia", with_iia=True)
    no_iia = _series(OUT / "no-iia", with_iia=False)
    size = sum(p.stat().st_size for p in iia) / 1e6
    print(f"{N} CT slices 512x512 int16 ({size:.0f} MB), median of {REPEATS} alternating runs")
    print(f"cpus={os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (other work skews this)")
    _storescp_run(iia, 1)  # warm the page cache and the binaries
    processes = receiver_count(Settings())  # aenode's default
    latencies: list[float] = []
    for senders in (1, 4):
        ref: list[float] = []
        floor: list[float] = []
        ours: list[float] = []
        lax: list[float] = []
        ratios: list[float] = []
        for _ in range(REPEATS):
            # storescp, the pynetdicom floor, aenode, aenode without fsync in turn: a burst
            # of load elsewhere on the machine falls on all four alike.
            ref.append(_storescp_run(iia, senders))
            floor.append(_floor_run(iia, senders, processes))
            seconds, latency = _aenode_run(iia, senders)
            ours.append(seconds)
            latencies.append(latency)
            lax.append(_aenode_run(iia, senders, fsync=False)[0])
            ratios.append(ref[-1] / seconds)
        ref_rate, our_rate = N / statistics.median(ref), N / statistics.median(ours)
        lax_rate, floor_rate = N / statistics.median(lax), N / statistics.median(floor)
        target = TARGETS[senders]
        print(
            f"{senders} sender(s): storescp {_rates(ref)}, aenode {_rates(ours)}, "
            f"ratio {our_rate / ref_rate:.2f} (per run {min(ratios):.2f}-{max(ratios):.2f}; "
            f"target >= {target}); aenode without fsync {_rates(lax)}, "
            f"ratio {lax_rate / ref_rate:.2f}\n"
            f"  pynetdicom floor (handler answers at once, nothing written; {processes} "
            f"processes) {_rates(floor)}: ratio to storescp {floor_rate / ref_rate:.2f}, "
            f"aenode reaches {our_rate / floor_rate:.2f} of it"
        )
    print(
        f"completion latency with ImagesInAcquisition: median {statistics.median(latencies):.3f} s,"
        f" max {max(latencies):.3f} s (target <= 0.2 s)"
    )
    grace = 1.0
    without = []
    for _ in range(REPEATS):
        node = _Node(grace=grace)
        try:
            _send(node.port, no_iia, 1)
            without.append(node.handed_on())
        finally:
            node.close()
    print(
        f"completion latency without it (release grace {grace} s): median "
        f"{statistics.median(without):.3f} s, max {max(without):.3f} s "
        f"(target <= {grace + 0.2:.1f} s)"
    )


if __name__ == "__main__":
    main()
