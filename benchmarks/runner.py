"""Runs the chosen sections in order; a failing section prints its error and the run goes on."""
from __future__ import annotations

import argparse
import importlib
import platform
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import SCALES, VERDICTS, Backend, Options, fmt, load_average, table, workdir

SECTIONS = ("ingest", "search", "deid", "research", "export", "aggregate")
TITLES = {
    "ingest": "1. ingest", "search": "2. read/search", "deid": "3. de-identification",
    "research": "4. research vs custodian", "export": "5. $export", "aggregate": "6. $aggregate",
}


@dataclass
class Context:
    options: Options
    backend: Backend
    datasets: object  # benchmarks.datasets.Datasets (imported lazily: it imports the product)
    workdir: Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--scale", choices=sorted(SCALES), default="small",
                        help="small: ~10k resources, a few minutes; full: the real targets (1M resources)")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite",
                        help="postgresql uses private schemas in the `test` database, dropped at the end")
    parser.add_argument("--only", action="append", default=[], metavar="SECTION",
                        help=f"run only these sections (repeatable or comma-separated; 1-6 or {', '.join(SECTIONS)})")
    parser.add_argument("--load-procs", type=int, default=2,
                        help="parallel `flask ingest` processes when building a dataset (default 2)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild cached datasets in benchmarks/out/")
    parser.add_argument("--plans", action="store_true", help="print the query plans of the timed searches")
    parser.add_argument("--analyze", action="store_true",
                        help="give SQLite databases planner statistics (ANALYZE) before measuring; the product "
                             "never runs ANALYZE, so the default measures it as shipped")
    return parser.parse_args(argv)


def chosen(only: list[str]) -> list[str]:
    if not only:
        return list(SECTIONS)
    picked: list[str] = []
    for item in (part.strip().lower() for value in only for part in value.split(",") if part.strip()):
        name = SECTIONS[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(SECTIONS) else item
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {item!r}; choose from 1-6 or {', '.join(SECTIONS)}")
        if name not in picked:
            picked.append(name)
    return [s for s in SECTIONS if s in picked]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = chosen(args.only)
    options = Options(SCALES[args.scale], args.db, load_procs=max(1, args.load_procs), rebuild=args.rebuild,
                      plans=args.plans, analyze=args.analyze)
    signal.signal(signal.SIGTERM, _terminate)  # so that servers are stopped and temporary files removed
    directory = workdir()
    backend = Backend(args.db, directory)
    from benchmarks.datasets import Datasets

    ctx = Context(options, backend, Datasets(backend, options, directory), directory)
    print(f"Passerelle benchmarks — scale {args.scale}, database {args.db}, sections {', '.join(sections)}"
          + (", SQLite databases ANALYZEd" if args.analyze and args.db == "sqlite" else ""))
    print(f"python {platform.python_version()}, {platform.machine()}, {_cpus()} CPUs, load average {load_average()}"
          f", started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    durations: dict[str, tuple[float, str]] = {}
    started = time.perf_counter()
    try:
        for name in sections:
            print(f"\n{'=' * 100}\n{TITLES[name]}   (load average before: {load_average()})\n{'=' * 100}",
                  flush=True)
            start = time.perf_counter()
            status = "ok"
            try:
                importlib.import_module(f"benchmarks.{name}").run(ctx)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                status = f"FAILED: {type(exc).__name__}: {exc}"[:200]
                print(f"\n!! section {name} failed: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc(limit=6, file=sys.stdout)
            durations[name] = (time.perf_counter() - start, status)
            print(f"\n[{name}: {durations[name][0]:.0f} s]", flush=True)
    finally:
        backend.drop_all()
        shutil.rmtree(directory, ignore_errors=True)
    _summary(durations, time.perf_counter() - started)
    return 0 if all(status == "ok" for _, status in durations.values()) else 1


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt("terminated")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def _summary(durations: dict[str, tuple[float, str]], total: float) -> None:
    print(f"\n{'=' * 100}\nSummary\n{'=' * 100}")
    table("Targets", ["section", "measure", "measured", "target", "met"],
          [[v.section, v.metric, v.measured, v.target, "—" if v.ok is None else ("yes" if v.ok else "NO")]
           for v in VERDICTS])
    table("Sections", ["section", "seconds", "status"],
          [[name, fmt(seconds, 0), status] for name, (seconds, status) in durations.items()],
          note=f"total {total:.0f} s ({total / 60:.1f} min)")
