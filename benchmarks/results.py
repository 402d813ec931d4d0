"""Writes a run's tables and targets as Markdown (`make bench` → benchmarks/RESULTS.md).

The file says which scale it holds, on how many cores, with which datasets, and repeats
every table the run printed, so each figure stands beside its reference from the same run.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.harness import SCALES, TABLES, VERDICTS, Scale, fmt

if TYPE_CHECKING:
    from benchmarks.runner import Machine


def write(path: Path, scale: str, machine: Machine, datasets: dict[str, dict[str, dict[str, Any]]],
          durations: dict[str, tuple[float, str]], total: float, fail_factor: float | None) -> None:
    lines = [
        "# Passerelle benchmark results",
        "",
        f"Written by `python -m benchmarks` on {machine.started}. **Scale: {scale}** — {_scale_note(SCALES[scale])}",
        "",
        f"Machine: {machine.cpus} CPU cores ({machine.arch}), Python {machine.python}, load average "
        f"{machine.load} at the start. Run time {total / 60:.1f} min. Regenerate with `make bench` "
        "(see benchmarks/README.md for the options and how long each scale takes).",
        "",
        "## Datasets",
        "",
        *_markdown(["database", "dataset", "resources", "patients", "built"],
                   [[db, name, fmt(meta["resources"]), fmt(meta["patients"]),
                     "in this run" if meta.get("fresh") else f"cached ({meta['built']})"]
                    for db, found in datasets.items() for name, meta in found.items()]),
        "",
        "## Targets",
        "",
        *_markdown(["database", "section", "measure", "measured", "target", "met"]
                   + (["× worse than target"] if fail_factor is not None else []),
                   [[v.db, v.section, v.metric, v.measured, v.target,
                     "—" if v.ok is None else ("yes" if v.ok else "**NO**")]
                    + ([fmt(v.guard.worse(), 2) if v.guard else ""] if fail_factor is not None else [])
                    for v in VERDICTS]),
        "",
        "## Sections",
        "",
        *_markdown(["section", "seconds", "status"],
                   [[name, fmt(seconds, 0), status] for name, (seconds, status) in durations.items()]),
    ]
    for item in TABLES:
        if not item.db:  # the runner's own summary and guard, written above
            continue
        lines += ["", f"### {item.title}" + ("" if item.db in item.title else f" [{item.db}]"), "",
                  *_markdown(item.headers, item.rows)]
        if item.note:
            lines += ["", *(f"> {text.strip()}  " for text in item.note.strip().splitlines())]
    path.write_text("\n".join(lines) + "\n")


def _scale_note(scale: Scale) -> str:
    small, large = scale.search_sizes
    return (f"search {small:,} vs {large:,} stored resources, research and export on {scale.research_size:,}, "
            f"`$aggregate` on {scale.agg_patients:,} patients × {scale.agg_observations} Observations, "
            f"de-identification of {scale.deid_resources:,} resources, ingest of {scale.ingest_ndjson:,}."
            + ("" if scale.name == "full" else " The targets are set for `--scale full` (1M stored resources, "
               "100k patients × 10 Observations); ratios at this scale are indicative."))


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(value: str) -> str:
        return value.replace("|", "\\|").replace("\n", " ")

    return [f"| {' | '.join(cell(h) for h in headers)} |", f"| {' | '.join('---' for _ in headers)} |",
            *(f"| {' | '.join(cell(c) for c in row)} |" for row in rows)]
