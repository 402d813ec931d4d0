"""The custodian's Groups attached to research projects (`project group add|remove|list`).

A project's Group-level `$export` may name only a Group attached to it that is not
deleted; to that project every other Group id, whether unknown or real, is the same
unknown id (service/release.py). Detaching a Group ends the project's exports of it.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Select, delete, false, insert, select

from service import db
from service.errors import Conflict, NotFound
from service.store import jobs, repository
from service.store.schema import idx_reference, project_groups, resources


def attach(conn: Connection, project_id: str, group_id: str) -> None:
    """Attach a stored, not deleted Group to an existing project (NotFound, Gone or Conflict otherwise)."""
    repository.read(conn, "Group", group_id)
    listed = conn.execute(select(project_groups.c.group_id).where(project_groups.c.project_id == project_id,
                                                                  project_groups.c.group_id == group_id)).first()
    if listed is not None:
        raise Conflict(f"Group/{group_id} is already attached to project {project_id}")
    conn.execute(insert(project_groups).values(project_id=project_id, group_id=group_id, attached=db.now_us()))


def detach(conn: Connection, project_id: str, group_id: str) -> None:
    """Detach a Group; the project's exports of it end and their files are deleted."""
    removed = conn.execute(delete(project_groups).where(project_groups.c.project_id == project_id,
                                                        project_groups.c.group_id == group_id))
    if removed.rowcount != 1:
        raise NotFound(f"Group/{group_id} is not attached to project {project_id}")
    jobs.end_group_exports(conn, project_id, group_id)


def attached(conn: Connection, project_id: str) -> list[str]:
    """The ids of the Groups attached to a project, in the order they were attached."""
    return list(conn.execute(select(project_groups.c.group_id).where(project_groups.c.project_id == project_id)
                             .order_by(project_groups.c.attached, project_groups.c.group_id)).scalars())


def available(conn: Connection, project_id: str, group_id: str) -> bool:
    """Whether the Group is attached to the project and not deleted."""
    return conn.execute(_attached_group(project_id, group_id)).first() is not None


def members(project_id: str, group_id: str) -> Select[Any]:
    """The member patient ids of the Group if it is available to the project (else none)."""
    return select(idx_reference.c.target_id).where(
        idx_reference.c.resource_pk.in_(_attached_group(project_id, group_id)), idx_reference.c.param == "member",
        idx_reference.c.target_type == "Patient")


def _attached_group(project_id: str, group_id: str) -> Select[Any]:
    return (select(resources.c.pk)
            .join(project_groups, project_groups.c.group_id == resources.c.id)
            .where(resources.c.type == "Group", resources.c.id == group_id, resources.c.deleted == false(),
                   project_groups.c.project_id == project_id))
