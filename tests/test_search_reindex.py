"""An existing database gains the index rows a newer indexer extracts when `init-db` runs.

The rows `:text`, `:of-type` and `:identifier` read were added by a later release: a
database written before lacks them (simulated by deleting them and the recorded index
version) until `flask --app wsgi init-db` indexes the stored resources again.
"""
from __future__ import annotations

from sqlalchemy import delete, func, select

from service import db
from service.store import reindex
from service.store.indexer import VERSION
from service.store.schema import INDEX_TABLES, idx_string, idx_token, settings
from tests.fhir_helpers import create, ids, observation, patient, search


def _index_rows(app) -> int:
    with app.app_context(), db.read() as conn:
        return sum(conn.scalar(select(func.count()).select_from(table)) for table in INDEX_TABLES)


def _as_written_by_an_older_release(app) -> None:
    with app.app_context(), db.write() as conn:
        conn.execute(delete(idx_string).where(idx_string.c.param.like("%:text")))
        conn.execute(delete(idx_token).where(idx_token.c.param.like("%:%")))
        conn.execute(delete(settings).where(settings.c.name == reindex.SETTING))


def _stored(client, headers) -> dict:
    subject = create(client, headers, patient(identifier=[{
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
        "value": "4711"}]))
    resource = observation(subject["id"])
    resource["code"]["coding"][0]["display"] = "Systolic blood pressure"
    return create(client, headers, resource)


def test_init_db_indexes_stored_resources_again_when_the_index_changed(app, client, custodian_headers):
    made = _stored(client, custodian_headers)
    _as_written_by_an_older_release(app)
    assert ids(search(client, custodian_headers, "Observation?code:text=systolic")) == []
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    assert "Search index" in result.output
    assert ids(search(client, custodian_headers, "Observation?code:text=systolic")) == [made["id"]]
    with app.app_context(), db.read() as conn:
        assert reindex.stored_version(conn) == VERSION


def test_reindexing_gives_the_rows_a_write_gives(app, client, custodian_headers):
    _stored(client, custodian_headers)
    written = _index_rows(app)
    with app.app_context():
        assert reindex.reindex(db.engine(), batch=1) == 2
    assert _index_rows(app) == written


def test_init_db_leaves_a_current_index_alone(app, client, custodian_headers):
    _stored(client, custodian_headers)
    assert app.test_cli_runner().invoke(args=["init-db"]).exit_code == 0
    again = app.test_cli_runner().invoke(args=["init-db"])
    assert again.exit_code == 0, again.output
    assert "Search index" not in again.output
