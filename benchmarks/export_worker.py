"""Runs queued `$export` jobs in this process and prints what it cost, as one JSON line.

`python -m benchmarks.export_worker` with the PASSERELLE_* environment of an instance:
the app comes from `service.app.create_app()` and the jobs run through
`service.export.work(app)`, exactly what an export worker does. Peak memory is this
process's maximum resident set size (getrusage), read before and after the work.
"""
from __future__ import annotations

import json
import resource
import sys
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
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_before = _rss_kb()
    wall, cpu = time.perf_counter(), time.process_time()
    ran = export.work(app)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"ran": ran, "seconds": wall, "cpu": cpu, "baseline_kb": max(before, rss_before),
                      "peak_kb": peak, "rss_after_kb": _rss_kb()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
