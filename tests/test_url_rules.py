"""URL rules are parsed and their builders generated once per process (service.urlrules); every app
matches and builds URLs as werkzeug's own rules would."""
from __future__ import annotations

from pathlib import Path

from flask import Flask, url_for
from werkzeug.routing import BaseConverter, Map
from werkzeug.routing import Rule as WerkzeugRule

from service.app import create_app
from service.urlrules import Rule


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


def _parsed(rule: WerkzeugRule) -> tuple[object, ...]:
    """What the router and the builders use of a parsed rule, converters by class and regex."""
    return (rule._parts, rule._trace, sorted(rule.arguments),
            {name: (type(converter), converter.regex, converter.map is rule.map)
             for name, converter in rule._converters.items()})


def test_a_second_app_reuses_every_rule_parse_of_the_first(tmp_path: Path) -> None:
    first, second = _app(tmp_path / "first"), _app(tmp_path / "second")
    parts = {(rule.endpoint, rule.rule): rule._parts for rule in first.url_map.iter_rules()}
    reused = [all(a is b for a, b in zip(parts[(rule.endpoint, rule.rule)][1:], rule._parts[1:], strict=True))
              for rule in second.url_map.iter_rules()]  # [0] is the (empty) host's part, made anew each time
    assert reused and all(reused)


def test_every_rule_of_an_app_is_parsed_as_werkzeug_parses_it(tmp_path: Path) -> None:
    _app(tmp_path / "first")  # parses every rule once
    app = _app(tmp_path / "second")
    rules = list(app.url_map.iter_rules())
    plain = Map([WerkzeugRule(rule.rule, endpoint=rule.endpoint, methods=rule.methods, defaults=rule.defaults,
                              strict_slashes=rule.strict_slashes, merge_slashes=rule.merge_slashes)
                 for rule in rules], converters=app.url_map.converters)
    by_key = {(rule.endpoint, rule.rule): rule for rule in plain.iter_rules()}
    assert any(rule.arguments for rule in rules)
    assert [_parsed(rule) for rule in rules] == [_parsed(by_key[(rule.endpoint, rule.rule)]) for rule in rules]


class _Digits(BaseConverter):
    regex = "[0-9]+"


def test_a_map_naming_another_converter_class_gets_a_parse_of_its_own() -> None:
    ordinary = Map([Rule("/things/<name>", endpoint="thing")])
    digits = Map([Rule("/things/<name>", endpoint="thing")], converters={"default": _Digits})
    assert ordinary.bind("x").match("/things/abc") == ("thing", {"name": "abc"})
    [rule] = digits.iter_rules()
    assert type(rule._converters["name"]) is _Digits and rule._converters["name"].map is digits
    assert digits.bind("x").match("/things/123") == ("thing", {"name": "123"})
    assert digits.bind("x").test("/things/abc") is False
