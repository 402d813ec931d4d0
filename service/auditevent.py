"""The audit trail read back as FHIR R4 `AuditEvent` resources, coded after IHE BALP where it fits.

One audit entry (service/audit.py: `audit` and the patients its set in `patient_sets` names) is one
AuditEvent with id = its sequence number. A RESTful interaction (read, search, create, …) is
`type` rest with its interaction as `subtype`, as the Basic Audit Log Patterns code it; a
sign-in is DICOM User Authentication; anything else (key rotation, budget raise, …) DICOM
Application Activity. Every event also carries its audit action as a `subtype` of
`ACTION_SYSTEM`, so `subtype=aggregate` finds the `$aggregate` answers. Entities: the patients
whose data the entry names (role Patient), the resource type or instance (Domain Resource), the
query (Query, base64 of its JSON, identifying values already hashed by the writer), the
recipient project (ResearchStudy) and the request id (BALP XrequestId). `detail` is read
defensively: a key it lacks leaves its element out.
"""
from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson
from sqlalchemy import Connection, select

from policies.fhirdates import DateFormatError, date_range, instant
from service.audit import entries_naming, patients_named
from service.errors import InvalidRequest, NotFound
from service.params import page_size
from service.store.schema import audit

#: The resource type served from the audit trail, never stored: no interaction writes it.
TYPE = "AuditEvent"
ACTION_SYSTEM = "https://passerelle.dev/fhir/CodeSystem/audit-action"
_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_INTERACTION = "http://hl7.org/fhir/restful-interaction"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
_BALP_ENTITY = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_ROLE_CLASS = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_CLIENT = "urn:passerelle:client"

_REST = {"system": _EVENT_TYPE, "code": "rest", "display": "Restful Operation"}
_AUTHENTICATION = {"system": _DCM, "code": "110114", "display": "User Authentication"}
_APPLICATION = {"system": _DCM, "code": "110100", "display": "Application Activity"}
#: The audit actions named after what they did, and the RESTful interaction (BALP subtype) each is.
_ACTION_INTERACTION = {"search": "search-type", "export-download": "read", "aggregate": "operation",
                       "export": "operation", "export-status": "operation", "export-cancel": "operation",
                       "consent-explain": "operation", "budget-read": "operation", "budget-raise": "operation",
                       "bundle": "transaction", "score": "operation"}
_INTERACTIONS = ("read", "vread", "update", "patch", "delete", "history", "create", "search-type", "search",
                 "transaction", "batch", "operation", "capabilities")
#: The CRUDE action code of each interaction (R4 AuditEvent.action).
_CRUDE = {"create": "C", "read": "R", "vread": "R", "history": "R", "update": "U", "patch": "U",
          "delete": "D"}
_SIGN_IN = {"sign-in": ("110122", "Login"), "login": ("110122", "Login"),
            "sign-out": ("110123", "Logout"), "logout": ("110123", "Logout")}
#: R4 outcome codes: success, minor failure, serious failure.
_OUTCOMES = ("0", "4", "8", "12")
SEARCH_PARAMS = ("date", "agent", "patient", "entity-type", "subtype", "outcome", "_count", "_cursor", "_format")


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    return {"system": system, "code": code, **({"display": display} if display else {})}


def _interaction(action: str, detail: dict[str, Any]) -> str | None:
    """The RESTful interaction an action is, or None: known names first, then a word of the name
    (`custodian-read`, `consent.update`)."""
    found = _ACTION_INTERACTION.get(action)
    if found is None:
        words = action.replace(".", "-").replace(":", "-").replace("_", "-").split("-")
        found = next((w for w in _INTERACTIONS if w in words), None)
    if found == "search":
        found = "search-type"
    if found == "read" and detail.get("version") is not None:
        found = "vread"
    return found


def _outcome(detail: dict[str, Any]) -> str:
    """0 unless the entry says otherwise: an R4 code, an HTTP status, or success/failure words."""
    value = detail.get("outcome", detail.get("status"))
    if isinstance(value, bool) or value is None:
        return "0" if value in (None, True) else "4"
    if isinstance(value, int):
        return "0" if value < 400 else "4" if value < 500 else "8"
    text = str(value).lower()
    if text in _OUTCOMES:
        return text
    if text.isdigit():
        return _outcome({"outcome": int(text)})
    return "0" if text in ("success", "ok", "succeeded") else "4"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _details(detail: dict[str, Any], names: Iterable[str]) -> list[dict[str, str]]:
    return [{"type": name, "valueString": _text(detail[name])} for name in names if detail.get(name) is not None]


def _agent_who(actor: str) -> dict[str, Any]:
    kind, _, name = actor.partition(":")
    if name and kind in ("cli", "patient", "system"):
        return {"identifier": {"system": f"urn:passerelle:{kind}", "value": name}, "display": actor}
    return {"identifier": {"system": _CLIENT, "value": actor}, "display": actor}


def render(row: Any, patients: Sequence[str]) -> dict[str, Any]:
    """One audit entry (`audit` row) and the patients it names as an AuditEvent."""
    try:
        detail = orjson.loads(row.detail)
    except orjson.JSONDecodeError:
        detail = {"text": row.detail}
    if not isinstance(detail, dict):
        detail = {"value": detail}
    action = row.action
    interaction = _interaction(action, detail)
    subtypes = [_coding(ACTION_SYSTEM, action)]
    sign = next((code for word, code in _SIGN_IN.items() if word in action), None)
    if sign is not None:
        event_type, crude = _AUTHENTICATION, "E"
        subtypes.insert(0, _coding(_DCM, *sign))
    elif interaction is not None:
        event_type, crude = _REST, _CRUDE.get(interaction, "E")
        subtypes.insert(0, _coding(_INTERACTION, interaction))
    else:
        event_type, crude = _APPLICATION, "E"
    user_type = (_coding(_ROLE_CLASS, "AGNT", "agent") if crude in ("C", "U", "D")
                 else _coding(_PARTICIPATION, "IRCP", "information recipient"))
    user: dict[str, Any] = {"type": {"coding": [user_type]}, "who": _agent_who(row.actor), "requestor": True}
    event: dict[str, Any] = {
        "resourceType": "AuditEvent", "id": str(row.seq),
        "type": event_type, "subtype": subtypes, "action": crude,
        "recorded": instant(row.ts), "outcome": _outcome(detail),
    }
    reason = detail.get("error") or detail.get("reason")
    if isinstance(reason, str) and event["outcome"] != "0":
        event["outcomeDesc"] = reason
    entities = []
    if row.project_id is not None:
        purpose = {"coding": [_coding(_ACT_REASON, "HRESCH", "health research")]}
        event["purposeOfEvent"] = [purpose]
        user["purposeOfUse"] = [purpose]
        entities.append({"what": {"reference": f"ResearchStudy/{row.project_id}"},
                         "type": _coding(_RESOURCE_TYPES, "ResearchStudy")})
    event["agent"] = [user, {"type": {"coding": [_coding(_DCM, "110152", "Destination Role ID")]},
                             "who": {"display": "Passerelle"}, "requestor": False}]
    event["source"] = {"observer": {"display": "Passerelle"},
                       "type": [_coding(_SOURCE_TYPE, "4", "Application Server")]}
    types = detail.get("types")
    for named in sorted({t for t in types if isinstance(t, str)}) if isinstance(types, list) else ():
        entities.append({"type": _coding(_RESOURCE_TYPES, named),
                         "role": _coding(_OBJECT_ROLE, "4", "Domain Resource")})
    resource_type = detail.get("type") if isinstance(detail.get("type"), str) else None
    if resource_type:
        data: dict[str, Any] = {"type": _coding(_RESOURCE_TYPES, resource_type),
                                "role": _coding(_OBJECT_ROLE, "4", "Domain Resource")}
        if isinstance(detail.get("id"), str):
            data["what"] = ({"identifier": {"system": f"urn:passerelle:pseudonym:{row.project_id}",
                                            "value": f"{resource_type}/{detail['id']}"}}
                            if row.project_id is not None else {"reference": f"{resource_type}/{detail['id']}"})
        data["detail"] = _details(detail, ("resources", "version"))
        entities.append(data)
    if detail.get("query") is not None:
        query = {"type": _coding(_ENTITY_TYPE, "2", "System Object"), "role": _coding(_OBJECT_ROLE, "24", "Query"),
                 "query": base64.b64encode(_text(detail["query"]).encode()).decode(),
                 "detail": _details(detail, ("query_hash", "epsilon", "replayed"))}
        entities.append(query)
    known = {"type", "types", "id", "version", "query", "query_hash", "epsilon", "replayed", "outcome", "status",
             "error", "reason", "request_id"}
    rest = sorted(name for name in detail if name not in known)
    if rest:
        entities.append({"type": _coding(_ENTITY_TYPE, "2", "System Object"), "detail": _details(detail, rest)})
    request_id = detail.get("request_id")
    if isinstance(request_id, str):
        entities.append({"what": {"identifier": {"value": request_id}},
                         "type": _coding(_BALP_ENTITY, "XrequestId", "X-Request-Id")})
    entities += [{"what": {"reference": f"Patient/{patient}"}, "type": _coding(_ENTITY_TYPE, "1", "Person"),
                  "role": _coding(_OBJECT_ROLE, "1", "Patient")} for patient in patients]
    if entities:
        event["entity"] = [{k: v for k, v in e.items() if v != []} for e in entities]
    return event


def read(conn: Connection, event_id: str) -> dict[str, Any]:
    """The AuditEvent with this id (the entry's sequence number); NotFound otherwise."""
    row = conn.execute(select(audit).where(audit.c.seq == int(event_id))).first() if event_id.isdigit() else None
    if row is None:
        raise NotFound(f"AuditEvent/{event_id} is not known")
    return render(row, patients_named(conn, [row.seq])[row.seq])


def _token(value: str) -> tuple[str | None, str]:
    system, bar, code = value.rpartition("|")
    return (system or None) if bar else None, code


def _has_coding(codings: Iterable[dict[str, Any]], wanted: list[tuple[str | None, str]]) -> bool:
    return any(c.get("code") == code and (system is None or c.get("system") == system)
               for c in codings for system, code in wanted)


@dataclass
class Search:
    """A parsed AuditEvent search: database conditions (date, agent, patient) and the coded
    criteria (subtype, entity-type, outcome) each event is matched against once rendered."""

    count: int
    cursor: int | None = None
    conditions: list[Any] = field(default_factory=list)
    subtype: list[list[tuple[str | None, str]]] = field(default_factory=list)
    entity_type: list[list[tuple[str | None, str]]] = field(default_factory=list)
    outcome: list[set[str]] = field(default_factory=list)
    echo: list[tuple[str, str]] = field(default_factory=list)

    def matches(self, event: dict[str, Any]) -> bool:
        types = [e["type"] for e in event.get("entity", ()) if "type" in e]
        return (all(_has_coding(event["subtype"], any_of) for any_of in self.subtype)
                and all(_has_coding(types, any_of) for any_of in self.entity_type)
                and all(event["outcome"] in any_of for any_of in self.outcome))


def _date_condition(value: str) -> Any:
    prefix = value[:2] if value[:2] in ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb") else "eq"
    try:
        low, high = date_range(value[2:] if value[:2] == prefix else value)
    except DateFormatError as exc:
        raise InvalidRequest(str(exc), expression="date") from None
    ts = audit.c.ts
    return {"eq": ts.between(low, high), "ne": ~ts.between(low, high), "gt": ts > high, "sa": ts > high,
            "ge": ts >= low, "lt": ts < low, "eb": ts < low, "le": ts <= high}[prefix]


def parse(args: Sequence[tuple[str, str]], default_count: int, max_count: int) -> Search:
    """Check and parse the parameters of an AuditEvent search (unknown ones are refused)."""
    found = Search(count=default_count)
    for name, value in args:
        if name == "_format":
            continue
        if name not in SEARCH_PARAMS:
            raise InvalidRequest(f"AuditEvent has no search parameter {name!r} here "
                                 f"(use {', '.join(SEARCH_PARAMS[:-1])})", expression=name)
        if name == "_cursor":
            if not value.isdigit():
                raise InvalidRequest("_cursor is not valid", expression=name)
            found.cursor = int(value)
            continue
        found.echo.append((name, value))
        values = [v for v in value.split(",") if v]
        if not values:
            raise InvalidRequest(f"{name} needs a value", expression=name)
        if name == "_count":
            found.count = page_size(value, max_count)
        elif name == "date":
            found.conditions.append(_date_condition(value))
        elif name == "agent":
            found.conditions.append(audit.c.actor.in_([_token(v.rpartition("/")[2])[1] for v in values]))
        elif name == "patient":
            ids = [v.rpartition("/")[2] for v in values]
            found.conditions.append(entries_naming(ids))
        elif name == "subtype":
            found.subtype.append([_token(v) for v in values])
        elif name == "entity-type":
            found.entity_type.append([_token(v) for v in values])
        else:
            if not set(values) <= set(_OUTCOMES):
                raise InvalidRequest(f"outcome is one of {', '.join(_OUTCOMES)}", expression=name)
            found.outcome.append(set(values))
    return found


def _candidates(conn: Connection, query: Search, batch: int) -> Iterator[Any]:
    """Entries matching the database conditions, newest first, from the cursor on, in batches."""
    before = query.cursor
    while True:
        statement = select(audit).where(*query.conditions).order_by(audit.c.seq.desc()).limit(batch)
        if before is not None:
            statement = statement.where(audit.c.seq < before)
        rows = conn.execute(statement).all()
        yield from rows
        if len(rows) < batch:
            return
        before = rows[-1].seq


def search(conn: Connection, query: Search, base: str) -> dict[str, Any]:
    """One page of the matching AuditEvents as a searchset Bundle, newest first, with a `next` link."""
    events: list[dict[str, Any]] = []
    batch = max(query.count, 1) * 2
    pending: list[Any] = []

    def flush() -> None:
        patients = patients_named(conn, [row.seq for row in pending])
        for row in pending:
            event = render(row, patients[row.seq])
            if query.matches(event):
                events.append(event)
        pending.clear()

    for row in _candidates(conn, query, batch):
        pending.append(row)
        if len(pending) == batch:
            flush()
        if len(events) > query.count:
            break
    flush()
    more = len(events) > query.count
    events = events[:query.count]
    def link(relation: str, cursor: int | None) -> dict[str, str]:
        params = query.echo + ([("_cursor", str(cursor))] if cursor is not None else [])
        return {"relation": relation, "url": f"{base}/AuditEvent" + (f"?{urlencode(params)}" if params else "")}

    links = [link("self", query.cursor)]
    if more and events:
        links.append(link("next", int(events[-1]["id"])))
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "link": links}
    if events:
        bundle["entry"] = [{"fullUrl": f"{base}/AuditEvent/{e['id']}", "resource": e, "search": {"mode": "match"}}
                           for e in events]
    return bundle


_PARAM_TYPES = {"date": "date", "agent": "reference", "patient": "reference", "entity-type": "token",
                "subtype": "token", "outcome": "token"}


def advertise(statement: dict[str, Any]) -> dict[str, Any]:
    """The custodian CapabilityStatement with AuditEvent as served here: read and search only."""
    entry = {"type": "AuditEvent", "interaction": [{"code": "read"}, {"code": "search-type"}],
             "versioning": "no-version", "readHistory": False, "updateCreate": False,
             "conditionalCreate": False, "conditionalUpdate": False, "conditionalDelete": "not-supported",
             "documentation": "The audit trail, read-only, newest first; coded after IHE BALP.",
             "searchParam": [{"name": name, "type": kind} for name, kind in _PARAM_TYPES.items()]}
    for rest in statement.get("rest", ()):
        rest["resource"] = [entry if r.get("type") == "AuditEvent" else r for r in rest.get("resource", ())]
    return statement
