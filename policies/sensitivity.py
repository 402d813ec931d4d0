"""Sensitive data categories: one map from codes and security labels to categories.

A resource's categories are computed once at ingest into a bit mask
(`resources.sensitive_mask`), so a research query filters with
`sensitive_mask & excluded_mask = 0`. Consent provisions name categories with the
same security labels (or Passerelle's category codes), so both sides use this map.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

CATEGORIES: tuple[str, ...] = ("mental-health", "hiv", "sexual-health", "substance-use", "genetics")
BIT: dict[str, int] = {name: 1 << i for i, name in enumerate(CATEGORIES)}

#: Passerelle's own code system for naming a whole category in a Consent provision.code.
CATEGORY_SYSTEM = "https://passerelle.example/fhir/CodeSystem/sensitive-category"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"

#: HL7 v3 information-sensitivity labels (meta.security, provision.securityLabel).
LABELS: dict[str, str] = {
    "PSY": "mental-health", "PSYTHPN": "mental-health", "BH": "mental-health",
    "HIV": "hiv",
    "SEX": "sexual-health", "SDV": "sexual-health",
    "ETH": "substance-use", "ETHUD": "substance-use", "OPIOIDUD": "substance-use", "SUD": "substance-use",
    "GDIS": "genetics",
}

#: The label written on consents for each category (the first listed above).
LABEL_OF: dict[str, str] = {"mental-health": "PSY", "hiv": "HIV", "sexual-health": "SEX",
                            "substance-use": "SUD", "genetics": "GDIS"}

_SNOMED: dict[str, str] = {
    # mental health
    "370143000": "mental-health", "35489007": "mental-health", "21897009": "mental-health",
    "58214004": "mental-health", "13746004": "mental-health", "47505003": "mental-health",
    "36923009": "mental-health", "197480006": "mental-health", "74732009": "mental-health",
    # HIV
    "86406008": "hiv", "165816005": "hiv", "62479008": "hiv",
    # sexual and reproductive health
    "105629000": "sexual-health", "15628003": "sexual-health", "76272004": "sexual-health",
    "240589008": "sexual-health", "33839006": "sexual-health", "8098009": "sexual-health",
    # substance use
    "7200002": "substance-use", "75544000": "substance-use", "66590003": "substance-use",
    "191816009": "substance-use", "6525002": "substance-use", "55054005": "substance-use",
    # genetics
    "405824009": "genetics", "254843006": "genetics",
}
_LOINC: dict[str, str] = {
    "75622-1": "hiv", "7918-6": "hiv", "25836-8": "hiv",    # HIV tests
    "44249-1": "mental-health", "44261-6": "mental-health",  # PHQ-9
    "69737-5": "mental-health",                              # GAD-7
    "55757-9": "mental-health",                              # PHQ-2
}
_RXNORM: dict[str, str] = {
    "312940": "mental-health", "310385": "mental-health",  # antidepressants
    "1999563": "hiv", "1747691": "hiv",                                              # antiretrovirals
    "1010600": "substance-use", "1996193": "substance-use",                          # buprenorphine
}


def _icd10(code: str) -> str | None:
    head = code.upper().replace(".", "")
    if head[:2] == "F1" and len(head) >= 3 and head[2].isdigit():
        return "substance-use"  # F10–F19: mental and behavioural disorders due to substance use
    if head[:1] == "F":
        return "mental-health"
    if head[:3] in ("B20", "B21", "B22", "B23", "B24", "Z21"):
        return "hiv"
    if head[:1] == "A" and "50" <= head[1:3] <= "64":
        return "sexual-health"
    if head[:1] == "Q" and "90" <= head[1:3] <= "99":
        return "genetics"  # chromosomal abnormalities
    return None


def category_of(system: str | None, code: str | None) -> str | None:
    """The sensitive category a clinical code or security label belongs to, if any."""
    if not code:
        return None
    if system == ACT_CODE:
        return LABELS.get(code)
    if system == SNOMED:
        return _SNOMED.get(code)
    if system == LOINC:
        return _LOINC.get(code)
    if system == RXNORM:
        return _RXNORM.get(code)
    if system is not None and system.startswith(ICD10):
        return _icd10(code)
    if system == CATEGORY_SYSTEM and code in BIT:
        return code
    return None


_CODED_ELEMENTS = ("code", "valueCodeableConcept", "medicationCodeableConcept", "reasonCode", "vaccineCode",
                   "type", "category")


def _codings(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from (resource.get("meta") or {}).get("security") or ()
    for element in _CODED_ELEMENTS:
        value = resource.get(element)
        for concept in value if isinstance(value, list) else (value,):
            if isinstance(concept, dict):
                yield from concept.get("coding") or ()
    for component in resource.get("component") or ():
        yield from (component.get("code") or {}).get("coding") or ()


def mask_of(resource: dict[str, Any]) -> int:
    """The categories a resource falls in, from its security labels and its codes."""
    mask = 0
    for coding in _codings(resource):
        category = category_of(coding.get("system"), coding.get("code"))
        if category:
            mask |= BIT[category]
    return mask


def names(mask: int) -> list[str]:
    return [name for name in CATEGORIES if mask & BIT[name]]


def mask(categories: list[str] | tuple[str, ...] | frozenset[str]) -> int:
    result = 0
    for name in categories:
        result |= BIT[name]
    return result
