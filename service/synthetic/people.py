"""Synthetic people and their Patient resources (every HIPAA / GDPR identifier kind included)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from html import escape
from random import Random

from service.synthetic.build import (
    REFERENCE_DATE,
    YEAR,
    Code,
    Refs,
    Resource,
    at,
    between,
    concept,
    new_id,
    step,
    years_between,
)
from service.synthetic.locales import City, Locale, address, identifier, pick_locale
from service.synthetic.organisations import (
    Organization,
    Population,
    Practitioner,
    organization_reference,
    practitioner_reference,
)

MRN_SYSTEM = "https://passerelle.example/mrn"
_MARITAL = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
MARITAL: dict[str, Code] = {
    "S": (_MARITAL, "S", "Never Married"),
    "M": (_MARITAL, "M", "Married"),
    "D": (_MARITAL, "D", "Divorced"),
    "W": (_MARITAL, "W", "Widowed"),
}
#: Marital status weights (S, M, D, W) from an age on.
_MARITAL_BY_AGE = ((18, (70, 26, 4, 0)), (30, (28, 55, 14, 3)), (65, (10, 52, 12, 26)), (80, (8, 35, 7, 50)))
#: Age bands (years, upper bound excluded) and their share: a tail past 89, as de-identification must handle.
_AGE_BANDS = ((0, 18), (18, 40), (40, 65), (65, 90), (90, 106))
_AGE_WEIGHTS = (21, 27, 31, 17, 4)
#: Probability of having died (within the last ten years) by age reached.
_DEATH_RISK = ((0, 0.004), (40, 0.02), (65, 0.08), (80, 0.22), (90, 0.4))
_GENDERS = ("female", "male", "other", "unknown")
_GENDER_WEIGHTS = (505, 490, 3, 2)
#: Multiplies MRNs; coprime with 10**9, so index → MRN is a bijection for a seed.
_MRN_STRIDE = 7_368_787
_NEXT_OF_KIN = ("http://terminology.hl7.org/CodeSystem/v2-0131", "N", "Next-of-Kin")


@dataclass(frozen=True)
class Person:
    """Who a synthetic patient is; the clinical history is written from this."""

    id: str
    mrn: str
    locale: Locale
    city: City
    tz: timezone
    gender: str
    given: tuple[str, ...]
    family: str
    prefix: str | None
    birth: date
    born: datetime
    death: datetime | None
    #: Death, or the reference date: nothing happens after it.
    end: datetime
    marital: str
    phone: str
    organization: Organization
    hospital: Organization
    gp: Practitioner

    @property
    def name(self) -> str:
        """As people write it in notes: first given name and family name."""
        return f"{self.given[0]} {self.family}"

    @property
    def display(self) -> str:
        """As Synthea writes it in Reference.display: with the prefix."""
        return f"{self.prefix} {self.name}" if self.prefix else self.name

    def age(self, when: datetime) -> float:
        return years_between(self.birth, when.date())


def _birth(rng: Random) -> date:
    low, high = rng.choices(_AGE_BANDS, weights=_AGE_WEIGHTS)[0]
    return REFERENCE_DATE - timedelta(days=rng.randrange(int(low * YEAR), int(high * YEAR)) + 1)


def _death(rng: Random, birth: date, tz: timezone) -> datetime | None:
    if rng.random() >= step(_DEATH_RISK, years_between(birth, REFERENCE_DATE), 0.0):
        return None
    end = at(REFERENCE_DATE, 0, tz)
    return between(rng, max(at(birth, 0, tz) + timedelta(days=1), end - timedelta(days=int(10 * YEAR))), end)


def person(rng: Random, index: int, population: Population) -> Person:
    """Draw a person: locale, names, birth (and death), family situation, care providers."""
    pid = new_id(rng)
    locale = pick_locale(rng)
    city = locale.city(rng)
    tz = timezone(timedelta(hours=city.utc_offset))
    gender = rng.choices(_GENDERS, weights=_GENDER_WEIGHTS)[0]
    birth = _birth(rng)
    death = _death(rng, birth, tz)
    end = death or at(REFERENCE_DATE, 0, tz)
    age = years_between(birth, end.date())
    adult = age >= 18
    given = [locale.given(rng, gender)]
    if rng.random() < 0.45 and (middle := locale.given(rng, gender)) != given[0]:
        given.append(middle)
    marital = rng.choices("SMDW", weights=step(_MARITAL_BY_AGE, age, (1, 0, 0, 0)))[0] if adult else "S"
    sites = population.sites(locale, city)
    organization = rng.choice(sites)
    return Person(
        id=pid, mrn=f"{(index * _MRN_STRIDE + population.mrn_offset) % 10**9:09d}", locale=locale, city=city, tz=tz,
        gender=gender, given=tuple(given), family=rng.choice(locale.family),
        prefix=locale.prefix(gender, marital in "MW") if adult else None, birth=birth, born=at(birth, 0, tz),
        death=death, end=end, marital=marital,
        phone=locale.mobile(rng, city) if adult else locale.landline(rng, city),
        organization=organization, hospital=sites[0], gp=rng.choice(organization.generalists))


def _names(rng: Random, who: Person) -> list[dict]:
    official = {"use": "official", "family": who.family, "given": list(who.given)}
    if who.prefix:
        official["prefix"] = [who.prefix]
    names = [official]
    if who.gender == "female" and who.marital != "S" and rng.random() < 0.6:
        names.append({"use": "maiden", "family": rng.choice(who.locale.family), "given": list(who.given)})
    return names


def _telecom(rng: Random, who: Person, age: float) -> list[dict]:
    telecom = [{"system": "phone", "value": who.phone, "use": "mobile" if age >= 18 else "home"}]
    if age >= 18 and rng.random() < 0.35:
        telecom.append({"system": "phone", "value": who.locale.landline(rng, who.city), "use": "home"})
    if age >= 13 and rng.random() < 0.8:
        telecom.append({"system": "email", "value": who.locale.email(rng, who.given[0], who.family), "use": "home"})
    return telecom


def _extensions(rng: Random, who: Person, birthplace: City) -> list[dict]:
    return [
        {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
         "valueString": rng.choice(who.locale.family)},
        {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
         "valueAddress": {"city": birthplace.name, "state": birthplace.region, "country": who.locale.country}},
    ]


def _guardian(rng: Random, who: Person) -> dict:
    """A minor's next of kin: a parent with the same family name and phone."""
    return {"relationship": [concept(_NEXT_OF_KIN)],
            "name": {"use": "official", "family": who.family, "given": [who.locale.given(rng, "unknown")]},
            "telecom": [{"system": "phone", "value": who.phone, "use": "home"}]}


def patient_resource(rng: Random, who: Person, refs: Refs) -> Resource:
    """The Patient as an EHR sends it: narrative, identifiers, names, contacts, address, providers."""
    age = who.age(who.end)
    birthplace = who.city if rng.random() < 0.3 else who.locale.city(rng)
    mrn = identifier("MR", "Medical Record Number", MRN_SYSTEM, who.mrn, use="usual")
    resource: Resource = {
        "resourceType": "Patient", "id": who.id,
        "text": {"status": "generated",
                 "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{escape(who.display)} ({who.birth})</div>'},
        "extension": _extensions(rng, who, birthplace),
        "identifier": [mrn, *who.locale.identifiers(rng, who.gender, who.birth, birthplace, age >= 18)],
        "name": _names(rng, who),
        "telecom": _telecom(rng, who, age),
        "gender": who.gender,
        "birthDate": who.birth.isoformat(),
    }
    if who.death:
        resource["deceasedDateTime"] = who.death.isoformat()
    resource["address"] = [address(rng, who.locale, who.city)]
    resource["maritalStatus"] = concept(MARITAL[who.marital])
    resource["multipleBirthBoolean"] = rng.random() < 0.03
    if age < 18:
        resource["contact"] = [_guardian(rng, who)]
    resource["communication"] = [{"language": concept(who.locale.language), "preferred": True}]
    resource["generalPractitioner"] = [practitioner_reference(who.gp, refs)]
    resource["managingOrganization"] = organization_reference(who.organization, refs)
    return resource
