"""Who received what, read back from the audit trail: per patient (a GDPR Art. 15 access
request) and per project (what a research partner received).

A release to research is an audit entry with a project (service/release.py writes them):
record-level releases (a search, a read, an export file downloaded…) name the patients of
the resources that left and how many resources; an `$aggregate` or `$train` answer names the
patients it was computed over and the ε it spent (a replayed answer names no one and spends nothing). Entries
without a project (the custodian's own work, administration) are no disclosure to a
recipient. `detail` is read defensively: an entry lacking a key counts it as unknown.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, func, select

from consent import projects
from consent.patients import resolve
from policies import budget
from policies.fhirdates import instant
from service.audit import STATISTICAL, entries_naming, patients_named_by
from service.errors import NotFound
from service.store.schema import audit, export_files

#: The kinds of release: a statistical answer (an `audit.STATISTICAL` action), or records (every
#: other release with a project).
AGGREGATE = "aggregate"
RECORDS = "records"


def _detail(text: str) -> dict[str, Any]:
    try:
        found = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return found if isinstance(found, dict) else {}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def patient_of(conn: Connection, text: str) -> str:
    """The patient an id or medical record number names; an id that is no longer a live patient
    but that the audit names is taken as it is (their past disclosures still count)."""
    try:
        return resolve(conn, text)
    except NotFound:
        named = conn.scalar(select(audit.c.seq).where(entries_naming([text.strip()])).limit(1))
        if named is None:
            raise
        return text.strip()


def _export_types(conn: Connection, details: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
    """The resource type of each export file these download entries name."""
    wanted = {(d["job"], d["file"]) for d in details if isinstance(d.get("job"), str)
              and isinstance(d.get("file"), int) and not isinstance(d.get("type"), str)}
    found: dict[tuple[str, int], str] = {}
    for job in {job for job, _ in wanted}:
        for row in conn.execute(select(export_files.c.file_no, export_files.c.resource_type)
                                .where(export_files.c.job_id == job)):
            found[(job, row.file_no)] = row.resource_type
    return found


def _resource_type(detail: dict[str, Any], exports: dict[tuple[str, int], str]) -> str | None:
    if isinstance(detail.get("type"), str):
        return detail["type"]
    return exports.get((detail.get("job"), detail.get("file")))  # type: ignore[arg-type]


def disclosures(conn: Connection, patient_id: str, since: int | None = None) -> dict[str, Any]:
    """Every release of the patient's data to a project, oldest first, and a summary per project
    and kind (records: releases, resources; aggregate: answers, ε)."""
    conditions = [entries_naming([patient_id]), audit.c.project_id.is_not(None)]
    if since is not None:
        conditions.append(audit.c.ts >= since)
    rows = conn.execute(select(audit).where(*conditions).order_by(audit.c.seq)).all()
    details = [_detail(row.detail) for row in rows]
    exports = _export_types(conn, details)
    names = {p.project_id: p.name for p in projects.all_projects(conn)}
    releases = []
    for row, detail in zip(rows, details, strict=True):
        kind = AGGREGATE if row.action in STATISTICAL else RECORDS
        releases.append({
            "seq": row.seq, "at": instant(row.ts), "project": row.project_id, "project_name": names.get(row.project_id),
            "kind": kind, "action": row.action, "client": row.actor,
            "resource_type": _resource_type(detail, exports),
            "resources": int(_number(detail.get("resources"))) if kind == RECORDS else 0,
            "epsilon": _number(detail.get("epsilon")) if kind == AGGREGATE else 0.0,
            "request_id": detail.get("request_id") if isinstance(detail.get("request_id"), str) else None,
        })
    summary: dict[tuple[str, str], dict[str, Any]] = {}
    for item in releases:
        entry = summary.setdefault((item["project"], item["kind"]), {
            "project": item["project"], "project_name": item["project_name"], "kind": item["kind"],
            "releases": 0, "first": item["at"], "last": item["at"], "resources": 0, "epsilon": []})
        entry["releases"] += 1
        entry["last"] = item["at"]
        entry["resources"] += item["resources"]
        entry["epsilon"].append(item["epsilon"])
    per_project = [{**entry, "epsilon": math.fsum(entry["epsilon"])} for _, entry in sorted(summary.items())]
    return {"patient": patient_id, "since": instant(since) if since is not None else None,
            "recipients": per_project, "releases": releases}


def project_report(conn: Connection, project_id: str) -> dict[str, Any]:
    """What a project received: resources by type, distinct patients whose records left (and
    those counted in its statistical answers), and ε spent per day with the questions asked."""
    project = projects.get(conn, project_id)
    rows = conn.execute(select(audit.c.seq, audit.c.action, audit.c.detail)
                        .where(audit.c.project_id == project_id).order_by(audit.c.seq)).all()
    details = [_detail(row.detail) for row in rows]
    exports = _export_types(conn, details)
    by_type: Counter[str] = Counter()
    releases: Counter[str] = Counter()
    for row, detail in zip(rows, details, strict=True):
        if row.action in STATISTICAL:
            releases[row.action] += 1
            continue
        count = int(_number(detail.get("resources")))
        if count:
            releases[row.action] += 1
            by_type[_resource_type(detail, exports) or "unknown"] += count

    def patients(aggregate: bool) -> int:
        action = audit.c.action.in_(STATISTICAL) if aggregate else audit.c.action.not_in(STATISTICAL)
        return conn.scalar(select(func.count()).select_from(
            patients_named_by(audit.c.project_id == project_id, action).distinct().subquery())) or 0

    report: dict[str, Any] = {
        "project": project_id, "name": project.name,
        "resources_by_type": dict(sorted(by_type.items())), "resources": sum(by_type.values()),
        "releases": dict(sorted(releases.items())),
        "patients": patients(aggregate=False), "patients_in_aggregates": patients(aggregate=True),
    }
    try:
        status = budget.status(conn, project_id, history_limit=None)
    except budget.BudgetMissing:
        report["budget"] = None
        return report
    per_day: dict[str, list[float]] = defaultdict(list)
    questions = []
    for item in reversed(status["history"]):
        if item["kind"] != "query":
            continue
        per_day[datetime.fromtimestamp(item["ts"] / 1e6, UTC).date().isoformat()].append(item["epsilon"])
        questions.append({"at": instant(item["ts"]), "epsilon": item["epsilon"], "client": item["actor"],
                          "query_hash": item["query_hash"], "question": item["question"]})
    spent, over_time = [], []
    for day in sorted(per_day):
        spent.extend(per_day[day])
        over_time.append({"day": day, "epsilon": math.fsum(per_day[day]), "cumulative": math.fsum(spent)})
    report["budget"] = {"total": status["total"], "spent": status["spent"], "remaining": status["remaining"],
                        "spent_per_day": over_time, "questions": questions}
    return report
