"""`project create|list|show|close|raise-budget|group`: research projects and their settings."""
from __future__ import annotations

from pathlib import Path

import click
import orjson
import yaml
from flask.cli import AppGroup

from consent import projects
from consent.materialise import refresh
from policies import budget
from policies.deid import ProfileError, load_profile
from service import audit, db
from service.cli.output import emit, readable_errors
from service.store import project_groups


@click.group("project", cls=AppGroup)
def project_group() -> None:
    """Research projects (a FHIR ResearchStudy plus release settings)."""


@project_group.command("create")
@click.option("--name", required=True)
@click.option("--tier", type=click.Choice(["aggregate", "record"]), required=True,
              help="The most a patient's consent can release to this project.")
@click.option("--epsilon", type=float, required=True, help="Total differential-privacy budget ε.")
@click.option("--delta", type=float, default=0.0, show_default=True)
@click.option("--epsilon-cap", type=float, default=1.0, show_default=True,
              help="The most ε one $aggregate query may spend (at most --epsilon).")
@click.option("--suppression", type=click.IntRange(min=0), default=11, show_default=True,
              help="Noisy counts below this are suppressed.")
@click.option("--types", help="Resource types the project may receive, e.g. Observation,Condition (default: all).")
@click.option("--description", help="What the project is for, in English (the same as --purpose-en).")
@click.option("--title-en", help="Plain-language title patients read in English (default: --name).")
@click.option("--title-fr", help="The same in French (needed with --title-en).")
@click.option("--purpose-en", help="What the project is for, in plain English.")
@click.option("--purpose-fr", help="The same in French (needed with --purpose-en).")
@click.option("--sponsor-en", help="Who runs the project, as patients read it in English.")
@click.option("--sponsor-fr", help="The same in French (needed with --sponsor-en).")
@click.option("--until", "ends", help="The last day the project runs (YYYY-MM-DD): the ResearchStudy's period.end.")
@click.option("--organization", "organization_id", help="Id of the recipient Organization.")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The project's own de-identification profile (JSON or YAML); default: the shipped one.")
def create_command(name: str, tier: str, epsilon: float, delta: float, epsilon_cap: float, suppression: int,
                   types: str | None, description: str | None, title_en: str | None, title_fr: str | None,
                   purpose_en: str | None, purpose_fr: str | None, sponsor_en: str | None, sponsor_fr: str | None,
                   ends: str | None, organization_id: str | None, profile_path: Path | None) -> None:
    """Create a project; prints one JSON object with its project_id.

    The plain-language title, purpose and sponsor are what patients read in the consent
    portal, in English and French (each given in both languages, or in neither).
    """
    profile = None
    if profile_path is not None:
        try:
            load_profile(profile_path)
        except ProfileError as exc:
            raise click.ClickException(f"the profile was refused: {exc}") from None
        # Stored as content, not as a path: every node must apply the same profile.
        profile = orjson.dumps(yaml.safe_load(profile_path.read_text(encoding="utf-8"))).decode()
    with readable_errors(), db.write() as conn:
        project = projects.create(conn, name=name, tier=tier, epsilon=epsilon, delta=delta,
                                  types=projects.parse_types(types), description=description,
                                  organization_id=organization_id, profile=profile, epsilon_cap=epsilon_cap,
                                  suppression=suppression, ends=ends,
                                  plain={"en": {"title": title_en, "purpose": purpose_en, "sponsor": sponsor_en},
                                         "fr": {"title": title_fr, "purpose": purpose_fr, "sponsor": sponsor_fr}})
        refresh(conn, project_ids=[project.project_id])
        audit.record(conn, actor=audit.operator(), action="project-create", project_id=project.project_id,
                     detail={"tier": tier, "epsilon": epsilon, "delta": delta, "types": project.types})
    emit(project.as_json())


@project_group.command("list")
def list_command() -> None:
    """Print every project, one JSON object per line."""
    with db.read() as conn:
        for project in projects.all_projects(conn):
            emit(project.as_json())


@project_group.command("show")
@click.argument("project_id")
def show_command(project_id: str) -> None:
    """Print one project's settings and how many patients are at each tier."""
    with readable_errors(), db.read() as conn:
        project = projects.get(conn, project_id)
        emit({**project.as_json(), "patients_by_tier": projects.tier_counts(conn, project_id),
              "budget": budget.status(conn, project_id)})


@project_group.command("close")
@click.argument("project_id")
def close_command(project_id: str) -> None:
    """Close a project: it receives nothing more."""
    with readable_errors(), db.write() as conn:
        project = projects.close(conn, project_id)
        refresh(conn, project_ids=[project_id])
        audit.record(conn, actor=audit.operator(), action="project-close", project_id=project_id, detail={})
    emit(project.as_json())


@project_group.command("raise-budget")
@click.argument("project_id")
@click.option("--epsilon", type=float, required=True, help="The new total ε (must not be lower).")
def raise_budget_command(project_id: str, epsilon: float) -> None:
    """Raise a project's total privacy budget (audited; spent ε is never given back)."""
    with readable_errors(), db.write() as conn:
        projects.raise_budget(conn, project_id, epsilon, actor=audit.operator())
        emit(budget.status(conn, project_id, history_limit=10))


@project_group.group("group", cls=AppGroup)
def groups_group() -> None:
    """The custodian's Groups a project may export: Group-level $export serves no other Group."""


@groups_group.command("add")
@click.option("--project", "project_id", required=True)
@click.option("--group", "group_id", required=True, help="Id of a stored Group resource.")
def group_add_command(project_id: str, group_id: str) -> None:
    """Attach a Group to a project; its consenting members can then be exported as a Group."""
    with readable_errors(), db.write() as conn:
        projects.get(conn, project_id)
        project_groups.attach(conn, project_id, group_id)
        audit.record(conn, actor=audit.operator(), action="project-group-add", project_id=project_id,
                     detail={"group": group_id})
    emit({"project_id": project_id, "group_id": group_id, "attached": True})


@groups_group.command("remove")
@click.option("--project", "project_id", required=True)
@click.option("--group", "group_id", required=True)
def group_remove_command(project_id: str, group_id: str) -> None:
    """Detach a Group from a project; the project's exports of it end and their files are deleted."""
    with readable_errors(), db.write() as conn:
        projects.get(conn, project_id)
        project_groups.detach(conn, project_id, group_id)
        audit.record(conn, actor=audit.operator(), action="project-group-remove", project_id=project_id,
                     detail={"group": group_id})
    emit({"project_id": project_id, "group_id": group_id, "attached": False})


@groups_group.command("list")
@click.option("--project", "project_id", required=True)
def group_list_command(project_id: str) -> None:
    """Print the Groups attached to a project, one JSON object per line."""
    with readable_errors(), db.read() as conn:
        projects.get(conn, project_id)
        for group_id in project_groups.attached(conn, project_id):
            emit({"project_id": project_id, "group_id": group_id})
