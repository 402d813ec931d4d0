"""Seeded synthetic FHIR R4B data: Synthea-like patients, the project's only test data.

Deterministic: the same (n, seed) gives byte-identical output, with no dependence on
the wall clock (histories end at `REFERENCE_DATE`) or on the global random state.
Patient k is drawn from its own generator seeded with (seed, k), so it is the same
person in a run of 10 patients and in one of 100 000, and the organisations and
practitioners depend on the seed only.

Two shapes of the same data:
- `organisation_bundles` then `patient_bundles`: transaction Bundles as Synthea writes
  them (`urn:uuid:` fullUrls, conditional references to organisations and
  practitioners, `ifNoneExist` on the shared ones), for loading through the API;
- `ndjson_resources` / `write_ndjson`: plain resources with their final ids and
  `Type/id` references, for bulk loading.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from random import Random
from typing import IO

import orjson

from service.synthetic.build import (
    IN_BUNDLE,
    NPI_SYSTEM,
    ORG_SYSTEM,
    REFERENCE_DATE,
    ROLE_SYSTEM,
    STORED,
    Refs,
    Resource,
)
from service.synthetic.clinical import chart
from service.synthetic.organisations import (
    Population,
    organization_resource,
    population,
    practitioner_resource,
    role_identifier,
    role_resource,
)
from service.synthetic.people import person

__all__ = ["REFERENCE_DATE", "ndjson_resources", "organisation_bundles", "patient_bundles", "write_ndjson"]

def _entry(resource: Resource, if_none_exist: str | None = None) -> Resource:
    request = {"method": "POST", "url": resource["resourceType"]}
    if if_none_exist:
        request["ifNoneExist"] = if_none_exist
    return {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource, "request": request}


def _transaction(entries: Iterable[Resource]) -> Resource:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def _staff(people: Population, refs: Refs) -> Iterator[tuple[Resource, str]]:
    """Practitioners and their roles, each with the condition that finds it again."""
    for org in people.organizations:
        for practitioner in org.practitioners:
            yield practitioner_resource(practitioner, org), f"identifier={NPI_SYSTEM}|{practitioner.npi}"
            yield (role_resource(practitioner, org, refs),
                   f"identifier={ROLE_SYSTEM}|{role_identifier(practitioner, org)}")


def organisation_bundles(seed: int) -> list[dict]:
    """Transaction Bundles creating the Organizations, then the Practitioners and their roles.

    Like Synthea's hospitalInformation / practitionerInformation files: every entry is a
    POST with `ifNoneExist` on its identifier, so loading them twice creates nothing new.
    """
    people = population(seed)
    organisations = _transaction(
        _entry(organization_resource(org), f"identifier={ORG_SYSTEM}|{org.identifier}")
        for org in people.organizations)
    staff = _transaction(_entry(resource, condition) for resource, condition in _staff(people, IN_BUNDLE))
    return [organisations, staff]


def _patient_rng(seed: int, index: int) -> Random:
    return Random(f"passerelle-synthetic:{seed}:patient:{index}")


def _patients(n: int, seed: int, refs: Refs) -> Iterator[list[Resource]]:
    people = population(seed)
    for index in range(n):
        rng = _patient_rng(seed, index)
        yield chart(rng, person(rng, index, people), refs)


def patient_bundles(n: int, seed: int = 0) -> Iterator[dict]:
    """One transaction Bundle per patient (load `organisation_bundles` first)."""
    for resources in _patients(n, seed, IN_BUNDLE):
        yield _transaction(_entry(resource) for resource in resources)


def ndjson_resources(n: int, seed: int = 0) -> Iterator[dict]:
    """Organisations and practitioners, then the same n patients as plain stored resources."""
    people = population(seed)
    for org in people.organizations:
        yield organization_resource(org)
    for resource, _ in _staff(people, STORED):
        yield resource
    for resources in _patients(n, seed, STORED):
        yield from resources


def write_ndjson(directory: Path, n: int, seed: int = 0) -> dict[str, int]:
    """Stream `ndjson_resources` into one `<Type>.ndjson` file per resource type; counts by type."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with ExitStack() as stack:
        files: dict[str, IO[bytes]] = {}
        for resource in ndjson_resources(n, seed):
            resource_type = resource["resourceType"]
            handle = files.get(resource_type)
            if handle is None:
                handle = files[resource_type] = stack.enter_context((directory / f"{resource_type}.ndjson").open("wb"))
                counts[resource_type] = 0
            handle.write(orjson.dumps(resource, option=orjson.OPT_APPEND_NEWLINE))
            counts[resource_type] += 1
    return counts
