"""Runs the chosen sections in order on each database; a failing section prints its error and the run goes on.

With `--fail-factor F` the exit status is also non-zero when a guarded figure is more than
F times worse than its target (`harness.Guard`); `--quick` is what `make bench-quick` runs.
"""
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

from benchmarks.harness import (
    SCALES,
    TABLES,
    VERDICTS,
    Backend,
    Options,
    Verdict,
    fmt,
    load_average,
    postgresql_answers,
    table,
    workdir,
)

SECTIONS = ("ingest", "search", "deid", "research", "export", "aggregate", "nodes", "training", "cli")
TITLES = {
    "ingest": "1. ingest", "search": "2. read/search", "deid": "3. de-identification",
    "research": "4. research vs custodian", "export": "5. $export", "aggregate": "6. $aggregate",
    "nodes": "7. one node vs two behind nginx", "training": "8. model training ($train vs scikit-learn)",
    "cli": "9. CLI start-up",
}
# `--quick` (make bench-quick): every guarded ratio at the quick scale, PostgreSQL when it answers;
# of section 6 only its latency part (budget reservations and DP accuracy have no ratio to guard).
QUICK = {"sqlite": ("ingest", "search", "deid", "research", "aggregate", "cli"), "postgresql": ("aggregate",)}
QUICK_ENTRY = {"aggregate": "latency"}
QUICK_FAIL_FACTOR = 3.0


@dataclass
class Context:
    options: Options
    backend: Backend
    datasets: object  # benchmarks.datasets.Datasets (imported lazily: it imports the product)
    workdir: Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--scale", choices=sorted(SCALES), default="small",
                        help="quick: the guarded ratios in about a minute; small: ~10k resources, a few minutes; "
                             "full: the real targets (1M resources)")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), action="append", default=[],
                        help="sqlite (default) or postgresql (private schemas in the `test` database, dropped at "
                             "the end); repeat to run the sections on both, one after the other")
    parser.add_argument("--quick", action="store_true",
                        help=f"what `make bench-quick` runs: --scale quick, sections {', '.join(QUICK['sqlite'])} "
                             f"on SQLite and {', '.join(QUICK['postgresql'])} on PostgreSQL when it answers, "
                             f"--fail-factor {QUICK_FAIL_FACTOR:g} unless given")
    parser.add_argument("--fail-factor", type=_positive, default=None, metavar="F",
                        help="exit non-zero when a guarded figure is more than F times worse than its target")
    parser.add_argument("--results", type=Path, default=None, metavar="FILE",
                        help="also write every table and target to FILE as Markdown (make bench: "
                             "benchmarks/RESULTS.md)")
    parser.add_argument("--only", action="append", default=[], metavar="SECTION",
                        help=f"run only these sections (repeatable or comma-separated; 1-{len(SECTIONS)} or "
                             f"{', '.join(SECTIONS)})")
    parser.add_argument("--load-procs", type=int, default=2,
                        help="parallel `flask ingest` processes when building a dataset (default 2)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild cached datasets in benchmarks/out/")
    parser.add_argument("--plans", action="store_true", help="print the query plans of the timed searches")
    parser.add_argument("--keep", action="store_true",
                        help="keep the PostgreSQL schemas the run creates (their names are printed at the end), "
                             "to study its queries afterwards; drop them by hand")
    parser.add_argument("--analyze", action="store_true",
                        help="give SQLite databases planner statistics (ANALYZE) before measuring; by default "
                             "they are removed, so the queries are measured as they run before the product's own "
                             "ANALYZE (after large loads) or long after it, when the data has grown")
    return parser.parse_args(argv)


def _positive(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {raw!r}")
    return value


def chosen(only: list[str]) -> list[str]:
    if not only:
        return list(SECTIONS)
    picked: list[str] = []
    for item in (part.strip().lower() for value in only for part in value.split(",") if part.strip()):
        name = SECTIONS[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(SECTIONS) else item
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {item!r}; choose from 1-{len(SECTIONS)} or {', '.join(SECTIONS)}")
        if name not in picked:
            picked.append(name)
    return [s for s in SECTIONS if s in picked]


def plan(args: argparse.Namespace) -> dict[str, list[str]]:
    """The sections to run on each database, in order."""
    if args.quick:
        if args.only or args.scale != "small" or args.db:
            raise SystemExit("--quick chooses the scale, the databases and the sections itself")
        databases = ["sqlite"]
        if postgresql_answers():
            databases.append("postgresql")
        else:
            print("PostgreSQL does not answer (PASSERELLE_BENCH_PG_URL, default 127.0.0.1:5432): its "
                  "$aggregate ratios are not measured", file=sys.stderr)
        return {db: list(QUICK[db]) for db in databases}
    return {db: chosen(args.only) for db in dict.fromkeys(args.db or ["sqlite"])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = "quick" if args.quick else args.scale
    fail_factor = args.fail_factor if args.fail_factor is not None or not args.quick else QUICK_FAIL_FACTOR
    runs = plan(args)
    signal.signal(signal.SIGTERM, _terminate)  # so that servers are stopped and temporary files removed
    directory = workdir()
    from benchmarks.datasets import Datasets

    described = "; ".join(f"{db}: {', '.join(sections)}" for db, sections in runs.items())
    print(f"Passerelle benchmarks — scale {scale}, {described}"
          + (", SQLite databases ANALYZEd" if args.analyze and "sqlite" in runs else ""))
    machine = Machine(platform.python_version(), platform.machine(), _cpus(), load_average(),
                      time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"python {machine.python}, {machine.arch}, {machine.cpus} CPUs, load average {machine.load}"
          f", started {machine.started}")
    durations: dict[str, tuple[float, str]] = {}
    datasets: dict[str, dict[str, dict]] = {}
    started = time.perf_counter()
    try:
        for db, sections in runs.items():
            options = Options(SCALES[scale], db, load_procs=max(1, args.load_procs), rebuild=args.rebuild,
                              plans=args.plans, analyze=args.analyze)
            backend = Backend(db, directory)
            ctx = Context(options, backend, Datasets(backend, options, directory), directory)
            try:
                for name in sections:
                    durations[f"{name} ({db})"] = _section(ctx, name, args.quick)
            finally:
                if args.keep and backend.schemas:
                    print(f"kept PostgreSQL schemas: {', '.join(backend.schemas)}")
                else:
                    backend.drop_all()
                _stamp(db)
                datasets[db] = {name: meta for name, (_, meta) in ctx.datasets.memo.items()}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    total = time.perf_counter() - started
    _summary(durations, total)
    regressions = _guard(fail_factor) if fail_factor is not None else []
    if args.results:
        from benchmarks.results import write

        write(args.results, scale, machine, datasets, durations, total, fail_factor)
        print(f"\nwrote {args.results}")
    failed = [name for name, (_, status) in durations.items() if status != "ok"]
    return 1 if failed or regressions else 0


@dataclass(frozen=True)
class Machine:
    python: str
    arch: str
    cpus: int
    load: str
    started: str


def _section(ctx: Context, name: str, quick: bool) -> tuple[float, str]:
    """Run one section (in a quick run, its QUICK_ENTRY part); (seconds, "ok" or what failed)."""
    print(f"\n{'=' * 100}\n{TITLES[name]} ({ctx.options.db})   (load average before: {load_average()})\n"
          f"{'=' * 100}", flush=True)
    start = time.perf_counter()
    status = "ok"
    try:
        module = importlib.import_module(f"benchmarks.{name}")
        getattr(module, QUICK_ENTRY.get(name, "run") if quick else "run")(ctx)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        status = f"FAILED: {type(exc).__name__}: {exc}"[:200]
        print(f"\n!! section {name} failed: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(limit=6, file=sys.stdout)
    seconds = time.perf_counter() - start
    print(f"\n[{name} ({ctx.options.db}): {seconds:.0f} s]", flush=True)
    return seconds, status


def _stamp(db: str) -> None:
    """Mark the verdicts and tables the sections just produced with their database."""
    for item in (*VERDICTS, *TABLES):
        item.db = item.db or db


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt("terminated")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def _summary(durations: dict[str, tuple[float, str]], total: float) -> None:
    print(f"\n{'=' * 100}\nSummary\n{'=' * 100}")
    table("Targets", ["database", "section", "measure", "measured", "target", "met"],
          [[v.db, v.section, v.metric, v.measured, v.target, "—" if v.ok is None else ("yes" if v.ok else "NO")]
           for v in VERDICTS])
    table("Sections", ["section", "seconds", "status"],
          [[name, fmt(seconds, 0), status] for name, (seconds, status) in durations.items()],
          note=f"total {total:.0f} s ({total / 60:.1f} min)")


def _guard(factor: float) -> list[Verdict]:
    """Print the guarded figures; return those more than `factor` times worse than their target."""
    guarded = [v for v in VERDICTS if v.guard is not None]
    failing = [v for v in guarded if v.guard.worse() > factor]
    table(f"Guard: a figure more than {factor:g}× worse than its target fails the run",
          ["database", "measure", "measured", "target", "× worse than target", "verdict"],
          [[v.db, v.metric, v.measured, v.target, fmt(v.guard.worse(), 2),
            "FAIL" if v in failing else ("ok" if v.ok else "missed, within guard")] for v in guarded],
          note=f"{len(failing)} of {len(guarded)} guarded figures fail" if failing else
               f"all {len(guarded)} guarded figures are within {factor:g}× of their targets")
    return failing
