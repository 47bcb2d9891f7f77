"""Export throughput: our C-STORE sender against dcmtk storescu, both into dcmtk storescp.

300 synthetic CT slices (512x512 int16, Explicit VR LE) are sent over one association by
each sender into the same ``storescp`` (``TCP_NODELAY=1``, writing to a temporary folder),
alternating, three rounds; the medians in instances/s and their ratio are printed
(target: ours / storescu >= 0.8).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from aenode.config import DestinationSettings
from aenode.export.scu import send_files
from bench.common import ct_slice, free_port, wait_port

__all__ = ["main"]

SLICES = 300
ROUNDS = 3
DCMTK = "/usr/bin:/usr/local/bin:/bin"


def make_series(folder: Path, count: int = SLICES) -> list[Path]:
    """Write ``count`` synthetic 512x512 CT slices of one series; returns the paths."""
    rng = np.random.default_rng(0)
    base = (rng.normal(40, 200, (512, 512))).astype(np.int16)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = ct_slice(study, series, i, np.roll(base, i, axis=0), z=float(i))
        ds.FrameOfReferenceUID = frame
        path = folder / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _round_ours(port: int, files: list[Path]) -> float:
    dest = DestinationSettings(ae_title="STORESCP", host="127.0.0.1", port=port)
    t0 = time.perf_counter()
    outcome = send_files(dest, files, calling_ae="AENODE", timeout=60)
    elapsed = time.perf_counter() - t0
    if not outcome.ok or len(outcome.sent) != len(files):
        raise RuntimeError(f"our sender failed: {outcome.error or outcome.failed}")
    return len(files) / elapsed


def _round_storescu(port: int, files: list[Path]) -> float:
    storescu = shutil.which("storescu", path=DCMTK)
    if storescu is None:
        raise RuntimeError("dcmtk storescu not found")
    t0 = time.perf_counter()
    subprocess.run(
        [storescu, "-aet", "STORESCU", "-aec", "STORESCP", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        check=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    """Print the median instances/s of both senders and the ratio ours / storescu."""
    storescp = shutil.which("storescp", path=DCMTK)
    if storescp is None:
        raise RuntimeError("dcmtk storescp not found")
    with tempfile.TemporaryDirectory(prefix="aenode-bench-export-") as tmp:
        root = Path(tmp)
        src = root / "src"
        src.mkdir()
        files = make_series(src)
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        port = free_port()
        inbox = root / "in"
        inbox.mkdir()
        proc = subprocess.Popen(
            [storescp, "-aet", "STORESCP", "-od", str(inbox), "+xa", "-pm", str(port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        ours, ref = [], []
        try:
            wait_port(port, 10, "storescp")
            for _ in range(ROUNDS):
                for runner, out in ((_round_storescu, ref), (_round_ours, ours)):
                    out.append(runner(port, files))
                    for f in inbox.iterdir():
                        f.unlink()
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    m_ours, m_ref = statistics.median(ours), statistics.median(ref)
    print(
        f"export: {len(files)} CT slices 512x512 ({size_mb:.0f} MB), one association, "
        f"into dcmtk storescp (TCP_NODELAY=1), median of {ROUNDS}"
    )
    print(f"  dcmtk storescu (reference): {m_ref:7.1f} instances/s  {[round(v) for v in ref]}")
    print(f"  aenode send_files:          {m_ours:7.1f} instances/s  {[round(v) for v in ours]}")
    print(f"  ratio aenode / storescu:    {m_ours / m_ref:7.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
