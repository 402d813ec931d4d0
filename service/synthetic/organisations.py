"""Hospitals, clinics and their practitioners: one fixed set per seed, shared by all patients.

Patients refer to them the way Synthea does, by conditional reference on their
identifier (`Organization?identifier=…`, `Practitioner?identifier=<NPI system>|<NPI>`),
so they are loaded first, from their own transaction Bundles.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from random import Random
from typing import Any

from service.synthetic.build import NPI_SYSTEM, ORG_SYSTEM, ROLE_SYSTEM, Code, Refs, Resource, concept, new_id
from service.synthetic.codes import SPECIALTIES
from service.synthetic.locales import FRANCE, LOCALES, City, Locale, address, ascii_slug, identifier

FINESS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.2"
RPPS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.1"
_PROVIDER = ("http://terminology.hl7.org/CodeSystem/organization-type", "prov", "Healthcare Provider")
_DOCTOR = ("http://terminology.hl7.org/CodeSystem/practitioner-role", "doctor", "Doctor")
_SPECIALTY_WEIGHTS = (5, 3, 1, 1, 1)


@dataclass(frozen=True)
class Practitioner:
    id: str
    role_id: str
    npi: str
    rpps: str
    gender: str
    given: str
    family: str
    specialty: Code
    phone: str
    email: str

    @property
    def display(self) -> str:
        return f"Dr. {self.given} {self.family}"


@dataclass(frozen=True)
class Organization:
    id: str
    identifier: str
    finess: str
    name: str
    address: dict[str, Any]
    phone: str
    practitioners: tuple[Practitioner, ...]

    @property
    def generalists(self) -> tuple[Practitioner, ...]:
        return tuple(p for p in self.practitioners if p.specialty in SPECIALTIES[:2])


@dataclass(frozen=True)
class Population:
    """The organisations of a seed, each city's general hospital first."""

    organizations: tuple[Organization, ...]
    by_city: dict[tuple[str, str], tuple[Organization, ...]]
    mrn_offset: int

    def sites(self, locale: Locale, city: City) -> tuple[Organization, ...]:
        return self.by_city[(locale.country, city.name)]


def npi_check_digit(first_nine: str) -> int:
    """The Luhn check digit of an NPI, computed over the "80840" prefix and its first nine digits."""
    total = 0
    for position, char in enumerate(reversed("80840" + first_nine)):
        digit = int(char) * (2 if position % 2 == 0 else 1)
        total += digit - 9 if digit > 9 else digit
    return (10 - total % 10) % 10


def _unique(rng: Random, used: set[str], make: Any) -> str:
    value = make(rng)
    while value in used:
        value = make(rng)
    used.add(value)
    return value


def _npi(rng: Random) -> str:
    first_nine = f"1{rng.randrange(10**8):08d}"
    return f"{first_nine}{npi_check_digit(first_nine)}"


def _practitioner(rng: Random, org_slug: str, locale: Locale, city: City, specialty: Code,
                  used: set[str]) -> Practitioner:
    gender = rng.choice(("male", "female"))
    given, family = locale.given(rng, gender), rng.choice(locale.family)
    return Practitioner(
        id=new_id(rng), role_id=new_id(rng), npi=_unique(rng, used, _npi),
        rpps=f"10{rng.randrange(10**9):09d}" if locale is FRANCE else "",
        gender=gender, given=given, family=family, specialty=specialty,
        phone=locale.landline(rng, city), email=f"{ascii_slug(given)}.{ascii_slug(family)}@{org_slug}.example.org")


def _organization(rng: Random, locale: Locale, city: City, name: str, staff: int, used: set[str]) -> Organization:
    slug = ascii_slug(name)[:40]
    specialties = [SPECIALTIES[0], *rng.choices(SPECIALTIES, weights=_SPECIALTY_WEIGHTS, k=staff - 1)]
    return Organization(
        id=new_id(rng), identifier=_unique(rng, used, lambda r: f"{r.randrange(10**8, 10**9)}"),
        finess=f"{city.insee[:2]}{rng.randrange(10**7):07d}" if locale is FRANCE else "",
        name=name, address=address(rng, locale, city, unit_chance=0),
        phone=locale.landline(rng, city),
        practitioners=tuple(_practitioner(rng, slug, locale, city, s, used) for s in specialties))


@lru_cache(maxsize=16)
def population(seed: int) -> Population:
    """Every city gets a general hospital; the larger ones (and some others) a clinic too."""
    rng = Random(f"passerelle-synthetic:{seed}:organisations")
    used: set[str] = set()
    by_city: dict[tuple[str, str], tuple[Organization, ...]] = {}
    for locale in LOCALES:
        for city in locale.cities:
            sites = [_organization(rng, locale, city, locale.hospital(city), rng.randint(5, 9), used)]
            if city.weight >= 3 or rng.random() < 0.4:
                sites.append(_organization(rng, locale, city, locale.clinic(rng, city), rng.randint(2, 4), used))
            by_city[(locale.country, city.name)] = tuple(sites)
    organizations = tuple(org for sites in by_city.values() for org in sites)
    return Population(organizations, by_city, rng.randrange(10**9))


def organization_reference(org: Organization, refs: Refs) -> dict[str, str]:
    return {"reference": refs.external("Organization", org.id, ORG_SYSTEM, org.identifier), "display": org.name}


def practitioner_reference(practitioner: Practitioner, refs: Refs) -> dict[str, str]:
    return {"reference": refs.external("Practitioner", practitioner.id, NPI_SYSTEM, practitioner.npi),
            "display": practitioner.display}


def organization_resource(org: Organization) -> Resource:
    identifiers = [{"use": "official", "system": ORG_SYSTEM, "value": org.identifier}]
    if org.finess:
        identifiers.append({"use": "secondary", "system": FINESS_SYSTEM, "value": org.finess})
    return {
        "resourceType": "Organization", "id": org.id, "identifier": identifiers, "active": True,
        "type": [concept(_PROVIDER)], "name": org.name,
        "telecom": [{"system": "phone", "value": org.phone, "use": "work"}],
        "address": [copy.deepcopy(org.address)],
    }


def practitioner_resource(practitioner: Practitioner, org: Organization) -> Resource:
    identifiers = [identifier("NPI", "National provider identifier", NPI_SYSTEM, practitioner.npi)]
    if practitioner.rpps:
        identifiers.append(identifier("PRN", "Provider number", RPPS_SYSTEM, practitioner.rpps, use="secondary"))
    return {
        "resourceType": "Practitioner", "id": practitioner.id, "identifier": identifiers, "active": True,
        "name": [{"use": "official", "family": practitioner.family, "given": [practitioner.given], "prefix": ["Dr."]}],
        "telecom": [{"system": "phone", "value": practitioner.phone, "use": "work"},
                    {"system": "email", "value": practitioner.email, "use": "work"}],
        "address": [copy.deepcopy(org.address)],
        "gender": practitioner.gender,
    }


def role_identifier(practitioner: Practitioner, org: Organization) -> str:
    return f"{practitioner.npi}-{org.identifier}"


def role_resource(practitioner: Practitioner, org: Organization, refs: Refs) -> Resource:
    """The practitioner's job at the organisation (in the same Bundle as the Practitioner)."""
    return {
        "resourceType": "PractitionerRole", "id": practitioner.role_id,
        "identifier": [{"system": ROLE_SYSTEM, "value": role_identifier(practitioner, org)}], "active": True,
        "practitioner": {"reference": refs.local("Practitioner", practitioner.id), "display": practitioner.display},
        "organization": organization_reference(org, refs),
        "code": [concept(_DOCTOR)], "specialty": [concept(practitioner.specialty)],
        "telecom": [{"system": "phone", "value": practitioner.phone, "use": "work"}],
    }
