"""Run the benchmarks: ``python -m bench [ingest volume infer executor export e2e]``."""

from __future__ import annotations

import importlib
import sys
import time

ALL = ("ingest", "volume", "infer", "executor", "export", "e2e")


def main(argv: list[str]) -> int:
    names = argv or list(ALL)
    failed = []
    for name in names:
        if name not in ALL:
            print(f"unknown benchmark {name!r}; choose from {', '.join(ALL)}", file=sys.stderr)
            return 2
        print(f"\n=== bench {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            print(f"(not available: {exc})")
            continue
        try:
            module.main()
        except Exception as exc:  # report and go on with the next benchmark
            print(f"bench {name} failed: {type(exc).__name__}: {exc}")
            failed.append(name)
        print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
