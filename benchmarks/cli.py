"""Section 9 — start-up of the `flask --app wsgi` command line.

Each command is started as a user starts it (`python -m flask --app wsgi …`, a new process,
the instance's environment) and timed to its exit: `--help` builds the app and lists every
command; `settings show` and `project list` also open the database and read from it (the quick
scale times `project list` only). The project's byte-code is written first (`compileall`, as the
Dockerfile does), as an installed copy has it, whatever PYTHONDONTWRITEBYTECODE says.

Target: the median under 1.5 s on the wall clock. The process's CPU time is shown beside it, and
beside both the time Python takes to import Flask and SQLAlchemy alone, the floor of any such
command on the same machine.
"""
from __future__ import annotations

import compileall
import subprocess
import sys

from benchmarks.harness import ROOT, Guard, Instance, fmt, measure, median, progress, table, verdict
from benchmarks.runner import Context

SECTION = "cli"
TARGET_SECONDS = 1.5
COMMANDS = (("--help",), ("settings", "show"), ("project", "list"))
QUICK_COMMANDS = (("project", "list"),)
FLOOR = ("-c", "import flask, sqlalchemy")


def _runs(instance: Instance, arguments: tuple[str, ...], repeats: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) of `repeats` runs of `python arguments` to its exit."""
    runs = []
    for _ in range(repeats):
        with measure() as used:
            child = subprocess.run([sys.executable, *arguments], cwd=ROOT, env=instance.env(), capture_output=True,
                                   text=True, timeout=120)
        if child.returncode != 0:
            raise RuntimeError(f"`python {' '.join(arguments)}` exited {child.returncode}: {child.stderr[-300:]}")
        runs.append((used.wall, used.children))
    return median([w for w, _ in runs]), median([c for _, c in runs])


def run(ctx: Context) -> None:
    repeats = ctx.options.scale.cli_repeats
    for package in ("service", "consent", "policies"):
        compileall.compile_dir(ROOT / package, quiet=1)
    compileall.compile_file(ROOT / "wsgi.py", quiet=1)
    instance = Instance(ctx.backend.new("cli"), ctx.workdir / "cli")
    rows = []
    try:
        progress(f"python {' '.join(FLOOR)} (the floor): {repeats} runs")
        wall, cpu = _runs(instance, FLOOR, repeats)
        rows.append([f"python {' '.join(FLOOR)} (the floor)", repeats, fmt(wall, 2), fmt(cpu, 2), ""])
        for command in QUICK_COMMANDS if ctx.options.scale.name == "quick" else COMMANDS:
            shown = " ".join(command)
            progress(f"flask --app wsgi {shown}: {repeats} runs")
            wall, cpu = _runs(instance, ("-m", "flask", "--app", "wsgi", *command), repeats)
            rows.append([f"flask --app wsgi {shown}", repeats, fmt(wall, 2), fmt(cpu, 2), f"< {TARGET_SECONDS}"])
            verdict(SECTION, f"`flask --app wsgi {shown}` start to exit, median", f"{wall:.2f} s (CPU {cpu:.2f} s)",
                    f"< {TARGET_SECONDS} s", wall < TARGET_SECONDS, Guard(wall, TARGET_SECONDS))
    finally:
        instance.close()
        if rows:
            table(f"9. CLI start-up ({ctx.options.db})", ["command", "timed runs", "wall s (median)",
                                                           "CPU s (median)", "target"], rows,
                  note="A new process each run, started to exit.")
