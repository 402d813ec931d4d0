"""Runs queued `$export` jobs in this process and prints what it cost, as one JSON line.

`python -m benchmarks.export_worker` with the PASSERELLE_* environment of an instance:
the app comes from `service.app.create_app()` and the jobs run through
`service.export.Worker(app).work()`, exactly what an export worker does. Memory is read two ways:
the process's maximum resident set size (getrusage, which includes the imports), and
the resident set sampled every 20 ms during the work, whose growth over its value when
the work started is what the export itself holds.
"""
from __future__ import annotations

import json
import resource
import sys
import threading
import time
from pathlib import Path


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from service import export
    from service.app import create_app

    app = create_app()
    start_kb = _rss_kb()
    sampled = [start_kb]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            sampled.append(_rss_kb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    wall, cpu = time.perf_counter(), time.process_time()
    ran = export.Worker(app).work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    done.set()
    sampler.join()
    sampled.append(_rss_kb())
    print(json.dumps({"ran": ran, "seconds": wall, "cpu": cpu, "start_kb": start_kb, "peak_kb": max(sampled),
                      "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
