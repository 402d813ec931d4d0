"""Search parameters: which elements of each resource type are indexed, and how.

One declarative table drives the index writer (`indexer.py`), the query builder
(`search.py`) and the CapabilityStatement, so the three can never disagree. Paths are
FHIR element paths from the resource root; a choice element is listed once per type
it may take (`effectiveDateTime`, `effectivePeriod`); `telecom[system=phone]` keeps only
the list items whose `system` is `phone`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["token", "string", "date", "quantity", "reference"]


@dataclass(frozen=True)
class SearchParam:
    """One search parameter of one resource type."""

    name: str
    kind: Kind
    paths: tuple[str, ...]
    #: The name under which values are indexed; an alias (`patient`) shares its base's rows.
    index_name: str = ""
    #: For references: the only resource type this parameter may point to.
    target: str | None = None
    documentation: str = ""
    #: For tokens: the value a resource without the element has (the parameter's FHIRPath
    #: expression yields it then), e.g. `false` for `Patient.deceased`.
    missing_means: str | None = None
    steps: tuple[tuple[tuple[str, str | None, str | None], ...], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index_name", self.index_name or self.name)
        object.__setattr__(self, "steps", tuple(_compile(p) for p in self.paths))


def _compile(path: str) -> tuple[tuple[str, str | None, str | None], ...]:
    """`telecom[system=phone].value` → (("telecom", "system", "phone"), ("value", None, None))."""
    steps = []
    for part in path.split("."):
        if "[" in part:
            name, cond = part[:-1].split("[", 1)
            key, value = cond.split("=", 1)
            steps.append((name, key, value))
        else:
            steps.append((part, None, None))
    return tuple(steps)


def _t(name: str, *paths: str, missing_means: str | None = None) -> SearchParam:
    return SearchParam(name, "token", paths, missing_means=missing_means)


def _s(name: str, *paths: str) -> SearchParam:
    return SearchParam(name, "string", paths)


def _d(name: str, *paths: str) -> SearchParam:
    return SearchParam(name, "date", paths)


def _q(name: str, *paths: str) -> SearchParam:
    return SearchParam(name, "quantity", paths)


def _r(name: str, *paths: str, target: str | None = None) -> SearchParam:
    return SearchParam(name, "reference", paths, target=target)


def _patient_alias(base: str) -> SearchParam:
    """`patient` searches the rows of `subject` (or another base) restricted to Patient targets."""
    return SearchParam("patient", "reference", (), index_name=base, target="Patient")


_ID = _t("identifier", "identifier")
_CODE = _t("code", "code")
_CATEGORY = _t("category", "category")
_STATUS = _t("status", "status")
_SUBJECT = _r("subject", "subject")
_ENCOUNTER = _r("encounter", "encounter", target="Encounter")
_PERIOD_DATE = _d("date", "period")

_PERSON = (
    _ID,
    _s("name", "name"),
    _s("family", "name.family"),
    _s("given", "name.given"),
    _t("gender", "gender"),
    _t("active", "active"),
    _s("address", "address"),
    _s("address-city", "address.city"),
    _s("address-postalcode", "address.postalCode"),
    _s("address-country", "address.country"),
    _s("address-state", "address.state"),
    _t("telecom", "telecom"),
    _t("phone", "telecom[system=phone]"),
    _t("email", "telecom[system=email]"),
)

_BY_TYPE: dict[str, tuple[SearchParam, ...]] = {
    "Patient": (
        *_PERSON,
        _d("birthdate", "birthDate"),
        _d("death-date", "deceasedDateTime"),
        # R4: `Patient.deceased.exists() and Patient.deceased != false`, so no deceased[x] is false.
        _t("deceased", "deceasedBoolean", "deceasedDateTime", missing_means="false"),
        _r("general-practitioner", "generalPractitioner"),
        _r("organization", "managingOrganization", target="Organization"),
        _t("language", "communication.language"),
    ),
    "Practitioner": _PERSON,
    "Organization": (
        _ID, _s("name", "name", "alias"), _t("type", "type"), _t("active", "active"),
        _s("address", "address"), _s("address-city", "address.city"),
        _s("address-postalcode", "address.postalCode"), _r("partof", "partOf", target="Organization"),
    ),
    "Location": (
        _ID, _s("name", "name", "alias"), _t("type", "type"), _STATUS, _s("address", "address"),
        _s("address-city", "address.city"), _s("address-postalcode", "address.postalCode"),
        _r("organization", "managingOrganization", target="Organization"),
    ),
    "PractitionerRole": (
        _ID, _r("practitioner", "practitioner", target="Practitioner"),
        _r("organization", "organization", target="Organization"), _t("role", "code"),
        _t("specialty", "specialty"), _r("location", "location", target="Location"), _t("active", "active"),
    ),
    "Observation": (
        _ID, _CODE, _CATEGORY, _STATUS, _SUBJECT, _patient_alias("subject"), _ENCOUNTER,
        _d("date", "effectiveDateTime", "effectivePeriod", "effectiveInstant", "effectiveTiming.event"),
        _q("value-quantity", "valueQuantity"),
        _t("value-concept", "valueCodeableConcept"),
        _t("component-code", "component.code"),
        _q("component-value-quantity", "component.valueQuantity"),
        _t("combo-code", "code", "component.code"),
        _r("performer", "performer"),
        _r("based-on", "basedOn"),
    ),
    "Condition": (
        _ID, _CODE, _CATEGORY, _SUBJECT, _patient_alias("subject"), _ENCOUNTER,
        _t("clinical-status", "clinicalStatus"), _t("verification-status", "verificationStatus"),
        _t("severity", "severity"), _t("body-site", "bodySite"),
        _d("onset-date", "onsetDateTime", "onsetPeriod"),
        _d("abatement-date", "abatementDateTime", "abatementPeriod"),
        _d("recorded-date", "recordedDate"),
        _r("asserter", "asserter"),
    ),
    "Encounter": (
        _ID, _STATUS, _SUBJECT, _patient_alias("subject"), _PERIOD_DATE,
        _t("class", "class"), _t("type", "type"), _t("reason-code", "reasonCode"),
        _r("participant", "participant.individual"),
        _r("practitioner", "participant.individual", target="Practitioner"),
        _r("service-provider", "serviceProvider", target="Organization"),
        _r("location", "location.location", target="Location"),
    ),
    "Procedure": (
        _ID, _CODE, _STATUS, _CATEGORY, _SUBJECT, _patient_alias("subject"), _ENCOUNTER,
        _d("date", "performedDateTime", "performedPeriod"),
        _r("performer", "performer.actor"), _t("reason-code", "reasonCode"),
        _r("location", "location", target="Location"),
    ),
    "MedicationRequest": (
        _ID, _STATUS, _CATEGORY, _SUBJECT, _patient_alias("subject"), _ENCOUNTER,
        _t("code", "medicationCodeableConcept"), _r("medication", "medicationReference", target="Medication"),
        _t("intent", "intent"), _t("priority", "priority"), _d("authoredon", "authoredOn"),
        _d("date", "dosageInstruction.timing.event"), _r("requester", "requester"),
    ),
    "MedicationAdministration": (
        _ID, _STATUS, _SUBJECT, _patient_alias("subject"),
        _t("code", "medicationCodeableConcept"), _r("medication", "medicationReference", target="Medication"),
        _r("context", "context"), _d("effective-time", "effectiveDateTime", "effectivePeriod"),
        _r("request", "request", target="MedicationRequest"),
    ),
    "Medication": (_ID, _CODE, _STATUS, _t("form", "form")),
    "Immunization": (
        _ID, _STATUS, _r("patient", "patient", target="Patient"),
        _t("vaccine-code", "vaccineCode"), _d("date", "occurrenceDateTime"),
        _r("location", "location", target="Location"), _r("performer", "performer.actor"),
        _r("encounter", "encounter", target="Encounter"),
    ),
    "DiagnosticReport": (
        _ID, _CODE, _CATEGORY, _STATUS, _SUBJECT, _patient_alias("subject"), _ENCOUNTER,
        _d("date", "effectiveDateTime", "effectivePeriod"), _d("issued", "issued"),
        _r("result", "result", target="Observation"), _r("performer", "performer"),
    ),
    "DocumentReference": (
        _ID, _STATUS, _CATEGORY, _SUBJECT, _patient_alias("subject"),
        _t("type", "type"), _d("date", "date"), _d("period", "context.period"),
        _r("encounter", "context.encounter", target="Encounter"), _r("author", "author"),
    ),
    "AllergyIntolerance": (
        _ID, _r("patient", "patient", target="Patient"), _t("code", "code", "reaction.substance"),
        _t("clinical-status", "clinicalStatus"), _t("verification-status", "verificationStatus"),
        _t("type", "type"), _t("category", "category"), _t("criticality", "criticality"),
        _d("date", "recordedDate"), _d("onset", "reaction.onset"), _r("recorder", "recorder"),
    ),
    "CarePlan": (
        _ID, _CATEGORY, _STATUS, _SUBJECT, _patient_alias("subject"), _ENCOUNTER, _PERIOD_DATE,
        _t("intent", "intent"), _t("activity-code", "activity.detail.code"),
        _r("care-team", "careTeam", target="CareTeam"), _r("goal", "goal", target="Goal"),
        _r("condition", "addresses", target="Condition"),
    ),
    "CareTeam": (
        _ID, _CATEGORY, _STATUS, _SUBJECT, _patient_alias("subject"), _ENCOUNTER, _PERIOD_DATE,
        _r("participant", "participant.member"),
    ),
    "RiskAssessment": (
        _ID, _SUBJECT, _patient_alias("subject"), _ENCOUNTER, _t("method", "method"),
        _d("date", "occurrenceDateTime", "occurrencePeriod"), _r("condition", "condition", target="Condition"),
        _r("performer", "performer"), _t("risk", "prediction.qualitativeRisk"),
    ),
    "Goal": (
        _ID, _CATEGORY, _SUBJECT, _patient_alias("subject"),
        _t("lifecycle-status", "lifecycleStatus"), _t("achievement-status", "achievementStatus"),
        _d("start-date", "startDate"), _d("target-date", "target.dueDate"),
    ),
    "Claim": (
        _ID, _STATUS, _r("patient", "patient", target="Patient"), _t("use", "use"),
        _d("created", "created"), _r("provider", "provider"), _r("insurer", "insurer", target="Organization"),
        _t("priority", "priority"), _r("encounter", "item.encounter", target="Encounter"),
    ),
    "ExplanationOfBenefit": (
        _ID, _STATUS, _r("patient", "patient", target="Patient"), _d("created", "created"),
        _r("provider", "provider"), _r("claim", "claim", target="Claim"),
        _r("coverage", "insurance.coverage", target="Coverage"), _r("care-team", "careTeam.provider"),
        _r("encounter", "item.encounter", target="Encounter"),
    ),
    "Coverage": (
        _ID, _STATUS, _t("type", "type"), _r("beneficiary", "beneficiary", target="Patient"),
        _patient_alias("beneficiary"), _r("payor", "payor"), _r("subscriber", "subscriber"),
    ),
    "Device": (
        _ID, _STATUS, _t("type", "type"), _r("patient", "patient", target="Patient"),
        _s("udi-di", "udiCarrier.deviceIdentifier"), _s("manufacturer", "manufacturer"),
        _s("model", "modelNumber"), _r("organization", "owner", target="Organization"),
    ),
    "ImagingStudy": (
        _ID, _STATUS, _SUBJECT, _patient_alias("subject"), _ENCOUNTER, _d("started", "started"),
        _t("modality", "series.modality"), _t("bodysite", "series.bodySite"),
    ),
    "SupplyDelivery": (
        _ID, _STATUS, _r("patient", "patient", target="Patient"), _r("supplier", "supplier"),
        _t("type", "type"),
    ),
    "Provenance": (
        _r("target", "target"), _patient_alias("target"), _d("recorded", "recorded"),
        _r("agent", "agent.who"),
    ),
    "Consent": (
        _ID, _STATUS, _CATEGORY, _r("patient", "patient", target="Patient"), _d("date", "dateTime"),
        _t("scope", "scope"), _t("action", "provision.action"), _r("actor", "provision.actor.reference"),
        _t("purpose", "provision.purpose"), _t("security-label", "provision.securityLabel"),
        _d("period", "provision.period"), _r("data", "provision.data.reference"),
        _r("organization", "organization", target="Organization"), _r("consentor", "performer"),
        _r("source-reference", "sourceReference"),
    ),
    "ResearchStudy": (
        _ID, _STATUS, _CATEGORY, _PERIOD_DATE, _s("title", "title"), _t("focus", "focus"),
        _t("keyword", "keyword"), _r("sponsor", "sponsor", target="Organization"),
        _r("principalinvestigator", "principalInvestigator"), _r("partof", "partOf", target="ResearchStudy"),
        _r("site", "site", target="Location"),
    ),
    "Group": (_ID, _t("type", "type"), _t("code", "code"), _r("member", "member.entity"),
              _t("actual", "actual")),
}

#: Parameters every resource type answers; `_id` and `_lastUpdated` read the resources row itself.
COMMON: tuple[SearchParam, ...] = (
    SearchParam("_id", "token", (), documentation="Logical id of the resource"),
    SearchParam("_lastUpdated", "date", (), documentation="When the resource version was stored"),
    _t("_tag", "meta.tag"),
    _t("_security", "meta.security"),
    SearchParam("_profile", "token", ("meta.profile",)),
)

#: Where each resource type points at the patient whose compartment it belongs to.
COMPARTMENT: dict[str, tuple[str, ...]] = {
    "AllergyIntolerance": ("patient",), "CarePlan": ("subject",), "CareTeam": ("subject",),
    "Claim": ("patient",), "Condition": ("subject",), "Consent": ("patient",), "Coverage": ("beneficiary",),
    "Device": ("patient",), "DiagnosticReport": ("subject",), "DocumentReference": ("subject",),
    "Encounter": ("subject",), "ExplanationOfBenefit": ("patient",), "Goal": ("subject",),
    "ImagingStudy": ("subject",), "Immunization": ("patient",), "MedicationAdministration": ("subject",),
    "MedicationRequest": ("subject",), "MedicationStatement": ("subject",), "MedicationDispense": ("subject",),
    "Observation": ("subject",), "Procedure": ("subject",), "Provenance": ("target",),
    "SupplyDelivery": ("patient",), "ServiceRequest": ("subject",), "Media": ("subject",),
    "Specimen": ("subject",), "FamilyMemberHistory": ("patient",), "RiskAssessment": ("subject",),
    "QuestionnaireResponse": ("subject",), "Composition": ("subject",), "List": ("subject",),
    "DetectedIssue": ("patient",), "Flag": ("subject",), "NutritionOrder": ("patient",),
    "ClinicalImpression": ("subject",), "Communication": ("subject",), "BodyStructure": ("patient",),
    "EpisodeOfCare": ("patient",), "AdverseEvent": ("subject",), "ResearchSubject": ("individual",),
}


#: The search parameter holding each type's clinical date: what a consent's data period restricts.
CLINICAL_DATE: dict[str, str] = {
    "Observation": "date", "Condition": "onset-date", "Encounter": "date", "Procedure": "date",
    "MedicationRequest": "authoredon", "MedicationAdministration": "effective-time", "Immunization": "date",
    "DiagnosticReport": "date", "DocumentReference": "date", "AllergyIntolerance": "date", "CarePlan": "date",
    "CareTeam": "date", "Goal": "start-date", "Claim": "created", "ExplanationOfBenefit": "created",
    "ImagingStudy": "started", "Provenance": "recorded", "Consent": "date",
}


def text_index(param: SearchParam) -> str:
    """Where a token parameter's text is indexed (`:text`): CodeableConcept.text, Coding.display
    and Identifier.type.text, as string rows."""
    return f"{param.index_name}:text"


def of_type_index(param: SearchParam) -> str:
    """Where an identifier parameter's typed values are indexed (`:of-type`): token rows whose
    system is the type's system and whose code is `type-code|value`."""
    return f"{param.index_name}:of-type"


def identifier_index(param: SearchParam) -> str:
    """Where the identifiers of a reference parameter's references are indexed (`:identifier`):
    token rows (system, value). An alias (`patient` over `subject`) reads the rows of references
    whose type is known to be its target (`identifier_index_of`)."""
    if param.target and param.index_name != param.name:
        return identifier_index_of(param.index_name, param.target)
    return f"{param.index_name}:identifier"


def identifier_index_of(index_name: str, target_type: str) -> str:
    """The `:identifier` rows of references known to point at `target_type`."""
    return f"{index_name}:identifier:{target_type}"


def params_for(resource_type: str) -> dict[str, SearchParam]:
    """Every search parameter of a resource type, by name."""
    return _REGISTRY.get(resource_type) or {p.name: p for p in COMMON}


def indexed_params(resource_type: str) -> tuple[SearchParam, ...]:
    """The parameters whose values the indexer extracts (aliases share their base's rows)."""
    return _INDEXED.get(resource_type, _COMMON_INDEXED)


def searchable_types() -> tuple[str, ...]:
    return tuple(sorted(_BY_TYPE))


_REGISTRY: dict[str, dict[str, SearchParam]] = {
    rtype: {p.name: p for p in (*COMMON, *params)} for rtype, params in _BY_TYPE.items()
}
_COMMON_INDEXED = tuple(p for p in COMMON if p.paths)
_INDEXED: dict[str, tuple[SearchParam, ...]] = {
    rtype: tuple(p for p in params.values() if p.paths) for rtype, params in _REGISTRY.items()
}
