"""The values of an operation's `Parameters` resource, read one way for `$aggregate` and `$train`.

Every function raises `InvalidRequest` naming the parameter (with its part, e.g.
`value.lower`) when the value is absent, repeated, of the wrong type or out of range;
nothing here reads stored data. `expression` compiles a FHIR search over one type of
patient data into the conditions `service/store/cohort.py` applies: conditions on the
resource's own index entries only (a chained parameter or `_has`, which reaches other
resources, is refused).
"""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from consent.projects import PATIENT_DATA_TYPES, ProjectRecord
from policies import dp, terminology
from service.errors import InvalidRequest
from service.store import search
from service.store.cohort import Expression
from service.store.searchparams import params_for

#: Parameters one FHIR search of a question may hold; cohort expressions one question may hold.
MAX_SEARCH_PARAMS = 20
MAX_COHORT = 20


def parameters(body: Any, operation: str, known: tuple[str, ...]) -> list[dict[str, Any]]:
    """The named parameters of an operation's Parameters resource, every one of them `known`."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidRequest(f"{operation} takes a Parameters resource")
    items = named(body.get("parameter", []), "Parameters.parameter")
    only(items, known)
    return items


def named(items: Any, where: str) -> list[dict[str, Any]]:
    """A list of named parameters: the resource's `parameter`, or one parameter's `part`."""
    if not isinstance(items, list) or not all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in items):
        raise InvalidRequest(f"{where} must be a list of named parameters", expression=where)
    return items


def only(items: list[dict[str, Any]], known: tuple[str, ...], prefix: str = "") -> None:
    unknown = sorted({p["name"] for p in items} - set(known))
    if unknown:
        name = prefix + unknown[0]
        raise InvalidRequest(f"unknown parameter {name!r}" + (f" (expected {', '.join(known)})" if known else ""),
                             expression=name)


def find(items: list[dict[str, Any]], name: str, prefix: str = "") -> dict[str, Any] | None:
    found = [p for p in items if p["name"] == name]
    if len(found) > 1:
        raise InvalidRequest(f"parameter {prefix + name!r} may appear only once", expression=prefix + name)
    return found[0] if found else None


def one_value(item: dict[str, Any], name: str) -> Any:
    values = [value for key, value in item.items() if key.startswith("value")]
    if len(values) != 1 or "part" in item:
        raise InvalidRequest(f"parameter {name!r} takes one value[x]", expression=name)
    return values[0]


def value_of(items: list[dict[str, Any]], name: str, prefix: str = "", required: bool = False) -> Any:
    item = find(items, name, prefix)
    if item is None:
        if required:
            raise InvalidRequest(f"parameter {prefix + name!r} is required", expression=prefix + name)
        return None
    return one_value(item, f"{prefix}{name}")


def parts_of(items: list[dict[str, Any]], name: str) -> list[dict[str, Any]] | None:
    item = find(items, name)
    if item is None:
        return None
    if any(key.startswith("value") for key in item):
        raise InvalidRequest(f"parameter {name!r} takes parts, not a value", expression=name)
    return named(item.get("part"), name)


def number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= dp.MAX_BOUND:
        raise InvalidRequest(f"parameter {name!r} must be a finite number of magnitude at most {dp.MAX_BOUND:g}",
                             expression=name)
    return float(value)


def string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"parameter {name!r} must be a string", expression=name)
    return value


def _check_systems(args: list[tuple[str, str]], name: str) -> None:
    for key, value in args:
        for item in value.split(","):
            if "|" in item and key.partition(":")[0] not in ("value-quantity", "component-value-quantity"):
                system = item.split("|", 1)[0]
                # An unknown system is more likely a typo than a new terminology.
                if system and not terminology.is_known(system):
                    raise InvalidRequest(f"{name}: unknown code system {system!r}", expression=name)


def compiled(text: str, resource_type: str, args: list[tuple[str, str]], name: str) -> Expression:
    _check_systems(args, name)
    if any(key.partition(":")[0] in search.RESULT_PARAMS for key, _ in args):
        raise InvalidRequest(f"{name}: result parameters (_sort, _include, _count, …) have no meaning in "
                             "a computed answer", expression=name)
    try:
        parsed = search.parse(resource_type, args, default_count=1, max_count=1)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{name}: {exc.message}", expression=name) from None
    if parsed.reaching:
        # A chain or `_has` needs the consent filter on the resources it reaches, which these
        # conditions cannot carry: refused, never silently dropped.
        raise InvalidRequest(f"{name}: chained parameters and _has are not available in a computed answer; "
                             "ask for the resources they would reach with a search of their own", expression=name)
    return Expression(text, resource_type, tuple(parsed.where))


def expression(text: Any, name: str) -> Expression:
    """Parse `Type?params`, a FHIR search over one type of patient data; errors name the parameter."""
    if not isinstance(text, str) or ("?" not in text and not text.isalpha()):
        raise InvalidRequest(f"{name} must be a FHIR search like Condition?code=system|code", expression=name)
    resource_type, _, query = text.partition("?")
    if resource_type not in PATIENT_DATA_TYPES:
        raise InvalidRequest(f"{name}: {resource_type!r} is not a type of patient data", expression=name)
    try:
        args = parse_qsl(query, keep_blank_values=True, strict_parsing=True,
                         max_num_fields=MAX_SEARCH_PARAMS) if query else []
    except ValueError:
        raise InvalidRequest(f"{name}: {query!r} is not a query string of at most {MAX_SEARCH_PARAMS} "
                             "name=value pairs joined by &", expression=name) from None
    return compiled(text, resource_type, args, name)


def epsilon_of(items: list[dict[str, Any]], project: ProjectRecord, minimum: float) -> float:
    epsilon = number(value_of(items, "epsilon", required=True), "epsilon")
    minimum = max(minimum, dp.EPSILON_FLOOR)
    if not epsilon >= minimum:
        raise InvalidRequest(f"epsilon must be at least {minimum:g} (PASSERELLE_MIN_EPSILON): a smaller epsilon "
                             "buys noise too wide to tell anything", expression="epsilon")
    if epsilon > project.epsilon_cap:
        raise InvalidRequest(f"epsilon {epsilon} is above this project's per-query cap {project.epsilon_cap}",
                             expression="epsilon")
    return epsilon


def valued_expression(text: Any, reduce: str, name: str) -> Expression:
    """`expression` whose resources carry a quantity value, unless `reduce` is count."""
    found = expression(text, name)
    if reduce != "count" and "value-quantity" not in params_for(found.resource_type):
        raise InvalidRequest(f"{name}: {found.resource_type} has no quantity value", expression=name)
    return found


def cohort_of(items: list[dict[str, Any]]) -> tuple[Expression, ...]:
    """The `cohort` parameters: at most `MAX_COHORT` FHIR searches every patient must match."""
    cohort = [p for p in items if p["name"] == "cohort"]
    if len(cohort) > MAX_COHORT:
        raise InvalidRequest(f"at most {MAX_COHORT} cohort expressions", expression="cohort")
    return tuple(expression(one_value(p, "cohort"), "cohort") for p in cohort)
