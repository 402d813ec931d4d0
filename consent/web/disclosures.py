"""Who received the patient's data, from the audit trail.

Every release to research is audited with the patients whose data it carried
(service/audit.py, written by service/release.py): record-level releases (a search, a read,
an export file downloaded…) name the patients of the resources that left, and each computed
`$aggregate` or `$train` answer names the patients it was computed over and the ε it spent
(a replayed answer was computed before: it names no one and spends nothing). So what is
shown is exactly what the audit says, per project.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime

import orjson
from sqlalchemy import Connection, select

from consent import projects
from consent.projects import ProjectRecord
from service.audit import STATISTICAL, entries_naming
from service.store.schema import audit


@dataclass(frozen=True)
class Received:
    """What one project received of the patient's data."""

    project: ProjectRecord
    #: The days (UTC) pseudonymised records of the patient left for the project, newest first,
    #: with how many releases carried them that day.
    record_days: tuple[tuple[date, int], ...]
    #: How many statistical answers were computed over a group that included the patient.
    answers: int
    #: The ε those answers spent in total.
    epsilon: float


def received(conn: Connection, patient_id: str) -> list[Received]:
    """Per project (by name) that received anything of this patient's data, what it received."""
    rows = conn.execute(select(audit.c.ts, audit.c.action, audit.c.project_id, audit.c.detail)
                        .where(entries_naming([patient_id])).order_by(audit.c.seq))
    days: dict[str, Counter[date]] = {}
    answers: dict[str, list[float]] = {}
    for row in rows:
        if row.project_id is None:
            continue
        if row.action in STATISTICAL:
            answers.setdefault(row.project_id, []).append(float(orjson.loads(row.detail).get("epsilon", 0.0)))
        else:
            day = datetime.fromtimestamp(row.ts / 1_000_000, UTC).date()
            days.setdefault(row.project_id, Counter())[day] += 1
    found = []
    for project in sorted(projects.all_projects(conn), key=lambda p: (p.name, p.project_id)):
        if project.project_id in days or project.project_id in answers:
            spent = answers.get(project.project_id, [])
            found.append(Received(project, tuple(sorted(days.get(project.project_id, Counter()).items(),
                                                        reverse=True)), len(spent), math.fsum(spent)))
    return found
