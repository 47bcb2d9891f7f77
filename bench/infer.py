"""Inference speed on CPU: HippoCrop series, cold and warm, and 20 series queued at once;
brain-tumour per FLAIR series.

Cold is the first job after start: registry load (card, checksum, weights) plus runtime start
plus the first prediction, with the interpreter's imports reported apart. Warm is the
median of single jobs once loaded (the reference). Throughput queues 20 series at once from
20 threads; the runtime batches queued jobs of one model, and the ratio against sequential
warm jobs shows what batching buys. Run: ``python -m bench infer``.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "udacity-mr"


def main() -> None:
    """Print cold, warm and queued inference figures for the hippocampus model."""
    t0 = time.perf_counter()
    import torch

    from aenode.config import ModelsSettings, RuntimeSettings
    from aenode.infer.registry import Registry
    from aenode.infer.runtime import Runtime
    from aenode.volume import build_volume_from_files

    imports = time.perf_counter() - t0
    volumes = []
    for study in ("Study1", "Study2"):
        folder = next((DATA / study).glob("*HCropVolume"))
        volumes.append(build_volume_from_files(sorted(folder.glob("*.dcm"))))
    settings = RuntimeSettings(device="cpu", threads=2)

    t1 = time.perf_counter()
    registry = Registry.load(ModelsSettings(path=ROOT / "models", enabled=["hippocampus"]))
    t_load = time.perf_counter() - t1
    runtime = Runtime(registry, settings)
    first = runtime.predict("hippocampus", {"image": volumes[0]})
    cold = time.perf_counter() - t1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"imports: {imports:.2f} s (not counted below)")
    print(
        f"cold: {cold:.3f} s per series (registry load {t_load:.3f} s, first job {first.timings})"
    )

    warm = []
    for i in range(10):
        t = time.perf_counter()
        runtime.predict("hippocampus", {"image": volumes[i % 2]})
        warm.append(time.perf_counter() - t)
    warm_median = statistics.median(warm)
    print(f"warm: {warm_median:.3f} s per series (median of 10; min {min(warm):.3f})")

    n = 20
    done: list[int] = []

    def submit(i: int) -> None:
        pred = runtime.predict("hippocampus", {"image": volumes[i % 2]})
        done.append(pred.extra["batch"])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    runtime.close()
    rate = n / elapsed
    print(
        f"queued: {n} series in {elapsed:.2f} s = {rate:.2f} series/s "
        f"(batch sizes seen {sorted(set(done))}); sequential warm {1 / warm_median:.2f} "
        f"series/s; ratio {rate * warm_median:.2f}x"
    )
    print(f"cold/warm ratio: {cold / warm_median:.1f}x")
    flair()


def flair() -> None:
    """Brain-tumour inference per FLAIR series (22-24 slices of 512x512) on CPU, warm."""
    from aenode.config import ModelsSettings, RuntimeSettings
    from aenode.infer.registry import Registry
    from aenode.infer.runtime import Runtime
    from aenode.volume import build_volume_from_files

    volumes = []
    for study in ("Study1", "Study2"):
        folder = next((DATA / study).glob("*FLAIRreg*"))
        volumes.append(build_volume_from_files(sorted(folder.glob("*.dcm"))))
    t = time.perf_counter()
    registry = Registry.load(ModelsSettings(path=ROOT / "models", enabled=["brain-tumour"]))
    with Runtime(registry, RuntimeSettings(device="cpu", threads=2)) as runtime:
        runtime.predict("brain-tumour", {"image": volumes[0]})
        cold = time.perf_counter() - t
        times = []
        for i in range(6):
            t = time.perf_counter()
            runtime.predict("brain-tumour", {"image": volumes[i % 2]})
            times.append(time.perf_counter() - t)
    slices = [v.image.GetSize()[2] for v in volumes]
    print(
        f"brain-tumour: warm {statistics.median(times):.3f} s per FLAIR series "
        f"(median of 6, {slices} slices of 512x512; min {min(times):.3f}); "
        f"cold (load + first) {cold:.3f} s"
    )


if __name__ == "__main__":
    main()
