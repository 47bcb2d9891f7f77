"""Jobs per second for 20 queued HippoCrop series: the local executor against Ray with one
and two actors, in one run (``python -m bench executor``).

Each run records 20 jobs (the HippoCrop series of Study1 and Study2, alternating) in a fresh
store and lets the job runner take them with 4 job threads (enough to keep two actors with
two jobs in flight each busy): volume, inference through the executor, SEG/SC/SR written, no
export. Ray runs locally in this process (``ray.init(num_cpus=2)``, no dashboard); its
actors take one CPU each, the local executor's runtime two threads, so every run has the
machine's two cores. Start-up (model load, actors) is reported apart and not counted.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "udacity-mr"
JOBS = 20
THREADS = 4


def _series() -> list[Any]:
    from aenode.records import SeriesInfo
    from aenode.volume import build_volume_from_files

    found = []
    for study in ("Study1", "Study2"):
        folder = next((DATA / study).glob("*HCropVolume"))
        files = tuple(sorted(folder.glob("*.dcm")))
        s = build_volume_from_files(list(files)).series
        found.append(SeriesInfo(s.study_uid, s.series_uid, 0, "MR", "HippoCrop", files))
    return found


def _run(label: str, overrides: dict[str, Any]) -> float:
    """Jobs per second of one executor configuration."""
    from aenode.config import Settings
    from aenode.infer.registry import Registry
    from aenode.infer.start import open_executor
    from aenode.jobs import JobRunner, record_job
    from aenode.states import JobState
    from aenode.store import Store

    series = _series()
    with tempfile.TemporaryDirectory(prefix="aenode-bench-executor-") as tmp:
        settings = Settings.model_validate(
            {
                "storage": {"path": tmp},
                "models": {"path": str(ROOT / "models"), "enabled": ["hippocampus"]},
                "runtime": {"device": "cpu", **overrides},
            }
        )
        registry = Registry.load(settings.models)
        t0 = time.perf_counter()
        executor = open_executor(settings, registry)
        volume_files = series[0].files
        from aenode.volume import build_volume_from_files

        executor.infer("hippocampus", {"image": build_volume_from_files(list(volume_files))})
        started = time.perf_counter() - t0
        store = Store(Path(tmp) / "aenode.db")
        with store.transaction() as conn:
            for i in range(JOBS):
                s = series[i % len(series)]
                record_job(conn, f"bench-{i}", "hippocampus", s.study_uid, {"image": s}, 0.0)
        runner = JobRunner(settings, store, registry, executor)
        stop, wakeup = threading.Event(), threading.Event()
        threads = [
            threading.Thread(target=runner.run_forever, args=(stop, wakeup, 0.02))
            for _ in range(THREADS)
        ]
        t1 = time.perf_counter()
        for t in threads:
            t.start()
        while True:
            rows = store.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            counts = {r["state"]: r["n"] for r in rows}
            if counts.get(JobState.DONE, 0) + counts.get(JobState.FAILED, 0) >= JOBS:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - t1
        stop.set()
        for t in threads:
            t.join()
        failed = counts.get(JobState.FAILED, 0)
        description = executor.describe()
        executor.close()
        store.close()
    rate = JOBS / elapsed
    where = [a.get("name") for a in description.get("actors", [])] or description.get("workers")
    print(
        f"{label:28} {rate:6.2f} jobs/s  ({JOBS} jobs in {elapsed:6.2f} s, {failed} failed; "
        f"start-up {started:5.1f} s; {where})",
        flush=True,
    )
    return rate


def main() -> None:
    """Print jobs/s for local, Ray with one actor and Ray with two actors."""
    local = _run("local (2 torch threads)", {"threads": 2})
    try:
        import ray
    except ImportError:
        print("ray not installed (pip install 'aenode[ray]'): Ray runs skipped")
        return
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        ray_settings = {"max_in_flight_per_actor": 2}
        one = _run(
            "ray, 1 actor (1 CPU)",
            {"executor": "ray", "ray": {**ray_settings, "actors_per_model": 1}},
        )
        two = _run(
            "ray, 2 actors (1 CPU each)",
            {"executor": "ray", "ray": {**ray_settings, "actors_per_model": 2}},
        )
    finally:
        ray.shutdown()
    print(f"ratios against local: 1 actor {one / local:.2f}, 2 actors {two / local:.2f}")
