"""URL builders are generated once per process (service.urlrules) and build the same URLs in every app."""
from __future__ import annotations

from pathlib import Path

from flask import Flask, url_for

from service.app import create_app


def _app(directory: Path) -> Flask:
    directory.mkdir()
    return create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{directory}/passerelle.db",
                       "INSTANCE_DIR": str(directory), "MASTER_KEY_FILE": str(directory / "master.key")})


def _builders(app: Flask) -> dict[tuple[str, str, tuple[str, ...]], tuple[object, object]]:
    return {(rule.endpoint, rule.rule, tuple(sorted(rule.defaults or ()))): (rule._build.__func__,
                                                                             rule._build_unknown.__func__)
            for rule in app.url_map.iter_rules()}


def test_a_second_app_reuses_every_url_builder_of_the_first(tmp_path: Path) -> None:
    first, second = _builders(_app(tmp_path / "first")), _builders(_app(tmp_path / "second"))
    assert first.keys() == second.keys()
    assert [key for key in first if first[key][0] is not second[key][0] or first[key][1] is not second[key][1]] == []


def test_urls_built_in_a_second_app_are_those_of_the_first(tmp_path: Path) -> None:
    requests = [
        ("custodian.read", {"resource_type": "Patient", "resource_id": "p-1"}),
        ("custodian.vread", {"resource_type": "Observation", "resource_id": "o 1", "version": 3}),
        ("research.export_file", {"job_id": "j1", "file_no": 7}),
        ("research.search_type", {"resource_type": "Observation", "code": "1234-5", "_count": 20}),
        ("consent_web.project", {"project_id": "p/with slash"}),
        ("operation_definitions.operation_definition_view", {"api": "research", "operation_id": "passerelle-train"}),
        ("operation_definitions.operation_definition_view", {"api": "custodian", "operation_id": "passerelle-score"}),
    ]
    built = []
    for directory in ("first", "second"):
        app = _app(tmp_path / directory)
        with app.test_request_context(base_url="https://fhir.example.org"):
            built.append([url_for(endpoint, **values) for endpoint, values in requests])
    assert built[0] == built[1] == [
        "/fhir/Patient/p-1",
        "/fhir/Observation/o%201/_history/3",
        "/research/fhir/_export/j1/file/7",
        "/research/fhir/Observation?code=1234-5&_count=20",
        "/consent/projects/p/with%20slash",
        "/research/fhir/OperationDefinition/passerelle-train",
        "/fhir/OperationDefinition/passerelle-score",
    ]
