"""Volume build: time and peak extra memory against SimpleITK's ImageSeriesReader.

Two series: the 238 JPEG Lossless CQ500 slices (``../shared/data/cq500-ct0``, built with
``allow={"tilt", "gaps"}`` since that real series has both) and a synthetic 1000-slice
512x512 CT series (12-bit, RescaleIntercept -1024, uncompressed, written once into
``bench-out/volume-1000``).

Each build runs in its own subprocess, so that memory is measured cleanly: the child imports
what it needs, reads ``ru_maxrss`` (its peak resident set so far) as the baseline, builds the
volume, and reads ``ru_maxrss`` again. Peak extra memory = the difference; it covers numpy,
SimpleITK's C++ buffers and pydicom alike (tracemalloc would miss the C++ side). The ratio is
taken against the output volume's size in bytes. Times are wall-clock around the build only,
the median of three runs after one warm-up run (page cache warm for both).

The reference is GDCM's ordering (``GetGDCMSeriesFileNames``, which reads and sorts the
headers, as ours does) plus ``ImageSeriesReader.Execute``; the reader alone is printed too.
Targets: time at most 1.0x the reference, peak extra memory at most 1.5x the volume.
"""

from __future__ import annotations

import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ct_slice

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()
OUT = ROOT / "bench-out" / "volume-1000"
CQ500_SERIES = "1.2.276.0.7230010.3.1.3.296485376.1.1521714308.2032152"
SYNTH_SERIES = "1.2.826.0.1.3680043.8.498.1000000000000000001"
N_SLICES = 1000
REPEATS = 3


def _synthetic() -> list[Path]:
    """The 1000-slice series, written once (shuffled file names: order is not a hint)."""
    from pydicom.uid import generate_uid

    existing = sorted(OUT.glob("*.dcm"))
    if len(existing) == N_SLICES:
        return existing
    OUT.mkdir(parents=True, exist_ok=True)
    for p in existing:
        p.unlink()
    names = list(range(N_SLICES))
    random.Random(0).shuffle(names)
    yy, xx = np.mgrid[0:512, 0:512]
    disc = ((yy - 256) ** 2 + (xx - 256) ** 2 < 200**2).astype(np.uint16)
    study = generate_uid()
    for k in range(N_SLICES):
        pixels = (disc * (1000 + (k % 64)) + (xx % 7)).astype(np.uint16)
        ds = ct_slice(
            study,
            SYNTH_SERIES,
            k,
            pixels,
            z=round(-250.0 + 0.5 * k, 1),
            slice_thickness=0.5,
            bits_stored=12,
            rescale_intercept=-1024,
        )
        ds.save_as(OUT / f"s{names[k]:04d}.dcm", enforce_file_format=True)
    return sorted(OUT.glob("*.dcm"))


def _child(mode: str, folder: str, series_uid: str, list_file: str) -> None:
    """Runs in the subprocess: one build, then prints JSON figures."""
    files = [Path(line) for line in Path(list_file).read_text().splitlines() if line]
    if mode == "ours":
        from aenode.volume import build_volume_from_files

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        vol = build_volume_from_files(files, allow={"tilt", "gaps"})
        seconds = time.perf_counter() - t0
        image, read_seconds = vol.image, seconds
    else:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(folder, series_uid)
        t1 = time.perf_counter()
        reader.SetFileNames(names)
        image = reader.Execute()
        seconds = time.perf_counter() - t0
        read_seconds = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nbytes = image.GetNumberOfPixels() * image.GetSizeOfPixelComponent()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "read_seconds": read_seconds,
                "extra_bytes": (peak - base) * 1024,
                "volume_bytes": nbytes,
                "pixel_type": image.GetPixelIDTypeAsString(),
                "size": list(image.GetSize()),
            }
        )
    )


def _run(mode: str, folder: Path, series_uid: str, list_file: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.volume",
            "--child",
            mode,
            str(folder),
            series_uid,
            str(list_file),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _measure(label: str, folder: Path, series_uid: str, files: list[Path]) -> None:
    list_file = ROOT / "bench-out" / f"{label}.files"
    list_file.parent.mkdir(parents=True, exist_ok=True)
    list_file.write_text("\n".join(str(p) for p in files))
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "sitk": []}
    for mode in runs:  # warm-up: page cache for both
        _run(mode, folder, series_uid, list_file)
    for _ in range(REPEATS):
        for mode in runs:
            runs[mode].append(_run(mode, folder, series_uid, list_file))
    ours, ref = runs["ours"], runs["sitk"]
    t_ours = statistics.median(r["seconds"] for r in ours)
    t_ref = statistics.median(r["seconds"] for r in ref)
    t_read = statistics.median(r["read_seconds"] for r in ref)
    m_ours = max(r["extra_bytes"] for r in ours)
    m_ref = max(r["extra_bytes"] for r in ref)
    v_ours, v_ref = ours[0]["volume_bytes"], ref[0]["volume_bytes"]
    mb = 1024 * 1024
    print(f"{label}: {len(files)} files, volume {ours[0]['size']}")
    print(
        f"  aenode build_volume : {t_ours:6.2f} s   peak extra {m_ours / mb:7.1f} MB "
        f"= {m_ours / v_ours:4.2f}x its {ours[0]['pixel_type']} volume ({v_ours / mb:.1f} MB)"
    )
    print(
        f"  SimpleITK GDCM      : {t_ref:6.2f} s   peak extra {m_ref / mb:7.1f} MB "
        f"= {m_ref / v_ref:4.2f}x its {ref[0]['pixel_type']} volume ({v_ref / mb:.1f} MB)"
        f"   (reader alone {t_read:.2f} s)"
    )
    print(
        f"  time ratio {t_ours / t_ref:4.2f}x the reference (target <= 1.0x; "
        f"{t_ours / t_read:4.2f}x the reader alone); memory {m_ours / v_ours:4.2f}x the volume "
        f"(target <= 1.5x)"
    )


def main() -> None:
    """Print build time and peak extra memory, ours against SimpleITK, for both series."""
    cq = DATA / "cq500-ct0"
    cq_files = [p for p in sorted(cq.glob("*.dcm")) if p.name != "CT000000.dcm"]
    _measure("cq500-jpeg-lossless", cq, CQ500_SERIES, cq_files)
    synth = _synthetic()
    _measure("synthetic-1000x512x512", OUT, SYNTH_SERIES, synth)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
    else:
        main()
