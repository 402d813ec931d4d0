"""One patient's clinical history: the resources each planned visit produces.

The last five years (or the whole life of younger patients) are written down, after
most adults' last check-up before them (its body measurements, blood pressure and HbA1c
screening only): check-ups with vital signs, labs, immunisations and screenings; chronic conditions
diagnosed, treated, followed up and care-planned; acute episodes in primary care,
the emergency room or hospital. Resources about a sensitive condition carry its
v3 security label, and so do the notes that mention it.
"""
from __future__ import annotations

import base64
import math
from datetime import date, datetime, timedelta
from random import Random

from service.synthetic.body import Body
from service.synthetic.build import (
    ACT_CODE,
    CVX,
    LOINC,
    RXNORM,
    SNOMED,
    Code,
    Refs,
    Resource,
    between,
    concept,
    new_id,
    quantity,
    security,
    years_between,
)
from service.synthetic.codes import (
    ALLERGENS,
    BLOOD_PRESSURE,
    CARE_TEAM_ROLES,
    ENCOUNTERS,
    MEDICATION_RECONCILIATION,
    NOTE_TYPES,
    OBSERVATIONS,
    PANELS,
    REACTIONS,
    SCREENINGS,
    SMOKING,
    SMOKING_STATUS,
    VACCINES,
    CarePlanSpec,
    ConditionSpec,
    VaccineSpec,
)
from service.synthetic.diabetes import SIGNAL
from service.synthetic.notes import clinical_note, contact
from service.synthetic.organisations import organization_reference, practitioner_reference
from service.synthetic.people import Person, patient_resource
from service.synthetic.planning import Visit, chronic_conditions, history_start, plan

_TERMINOLOGY = "http://terminology.hl7.org/CodeSystem/"
_ACTIVE = (_TERMINOLOGY + "condition-clinical", "active", "Active")
_RESOLVED = (_TERMINOLOGY + "condition-clinical", "resolved", "Resolved")
_CONFIRMED = (_TERMINOLOGY + "condition-ver-status", "confirmed", "Confirmed")
_CONDITION_CATEGORIES: dict[str, Code] = {
    "problem-list-item": (_TERMINOLOGY + "condition-category", "problem-list-item", "Problem List Item"),
    "encounter-diagnosis": (_TERMINOLOGY + "condition-category", "encounter-diagnosis", "Encounter Diagnosis"),
}
_OBSERVATION_CATEGORIES: dict[str, Code] = {
    key: (_TERMINOLOGY + "observation-category", key, display)
    for key, display in (("vital-signs", "Vital Signs"), ("laboratory", "Laboratory"), ("survey", "Survey"),
                         ("social-history", "Social History"))
}
_ALLERGY_ACTIVE = (_TERMINOLOGY + "allergyintolerance-clinical", "active", "Active")
_ALLERGY_CONFIRMED = (_TERMINOLOGY + "allergyintolerance-verification", "confirmed", "Confirmed")
_LAB_SECTION = (_TERMINOLOGY + "v2-0074", "LAB", "Laboratory")
_PRIMARY_PERFORMER = (_TERMINOLOGY + "v3-ParticipationType", "PPRF", "primary performer")
_DISCHARGED_HOME = (_TERMINOLOGY + "discharge-disposition", "home", "Home")
_CLINICAL_NOTE = ("http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category", "clinical-note",
                  "Clinical Note")
_ASSESS_PLAN = ("http://hl7.org/fhir/us/core/CodeSystem/careplan-category", "assess-plan",
                "Assessment and Plan of Treatment")
#: Chance that a visit of each kind leaves a clinical note, and the note's type.
_NOTE_CHANCE = {"wellness": 1.0, "wellchild": 1.0, "problem": 1.0, "emergency": 1.0, "inpatient": 1.0,
                "acute": 0.5, "followup": 0.3}
_NOTE_TYPE = {"inpatient": "discharge", "acute": "progress", "followup": "progress"}
_MAX_VACCINES_PER_VISIT = 3


def _labels(*specs: ConditionSpec | None) -> tuple[str, ...]:
    """The distinct security labels of these conditions, in a stable order."""
    return tuple(dict.fromkeys(spec.label for spec in specs if spec is not None and spec.label))


def _rounded(value: float, decimals: int) -> float | int:
    return round(value) if decimals == 0 else round(value, decimals)


class Chart:
    """Writes one patient's resources, visit by visit, in time order."""

    def __init__(self, rng: Random, who: Person, refs: Refs, body: Body,
                 pending: list[tuple[ConditionSpec, datetime]]):
        self.rng, self.who, self.refs, self.body = rng, who, refs, body
        self.resources: list[Resource] = []
        #: Chronic conditions that began before the history window: recorded at the first visit.
        self.pending = pending
        self.conditions: dict[str, Resource] = {}
        self.problems: list[ConditionSpec] = []
        self.medications: list[str] = []
        self.vaccines: dict[str, list[date]] = {}
        self.allergies_taken = False
        # The visit being written.
        self.encounter: Resource = {}
        self.start = self.end = who.born
        self.site = who.organization
        self.practitioner = who.gp

    # -- small shared pieces -------------------------------------------------------------------------------------

    def new(self, resource_type: str, labels: tuple[str, ...] = ()) -> Resource:
        resource: Resource = {"resourceType": resource_type, "id": new_id(self.rng)}
        if labels:
            resource["meta"] = security(labels)
        self.resources.append(resource)
        return resource

    def ref(self, resource: Resource) -> dict[str, str]:
        return {"reference": self.refs.local(resource["resourceType"], resource["id"])}

    def subject(self) -> dict[str, str]:
        return {"reference": self.refs.local("Patient", self.who.id), "display": self.who.display}

    def context(self) -> dict[str, object]:
        """subject and encounter, which nearly every clinical resource carries."""
        return {"subject": self.subject(), "encounter": self.ref(self.encounter)}

    def period(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}

    def moment(self) -> datetime:
        """An instant inside the current encounter."""
        return between(self.rng, self.start, self.end)

    def age(self) -> float:
        return self.who.age(self.start)

    def annotation(self) -> dict[str, object]:
        """A note by the practitioner that names the patient and gives their phone number."""
        return {"authorReference": practitioner_reference(self.practitioner, self.refs), "time": self.end.isoformat(),
                "text": contact(self.rng, self.who.locale.country, self.who.name, self.who.phone)}

    def maybe_note(self, resource: Resource, chance: float) -> None:
        if self.rng.random() < chance:
            resource["note"] = [self.annotation()]

    # -- visits --------------------------------------------------------------------------------------------------

    def visit(self, visit: Visit) -> None:
        labels = _labels(visit.condition)
        self.open(visit, labels)
        if visit.earlier:
            self.measurements(self.age(), self.moment())
            self.screen(self.age())
            return
        for spec, onset in self.pending:
            self.diagnose(spec, onset, known=True)
        self.pending = []
        if not self.allergies_taken:
            self.allergies()
        if visit.condition is None:
            self.check_up()
        elif visit.kind == "problem":
            self.diagnose(visit.condition, visit.start)
        elif visit.kind == "followup":
            self.follow_up(visit.condition)
        else:
            self.episode(visit.condition)
        self.document(visit)

    def open(self, visit: Visit, labels: tuple[str, ...]) -> None:
        """The Encounter: class, type, times, who saw the patient and where."""
        act, act_display, code, display, (shortest, longest) = ENCOUNTERS[visit.kind]
        self.start = visit.start
        self.end = min(visit.start + timedelta(minutes=self.rng.randint(shortest, longest)), self.who.end)
        in_hospital = act != "AMB"
        self.site = self.who.hospital if in_hospital else self.who.organization
        self.practitioner = (self.rng.choice(self.site.practitioners) if in_hospital or self.rng.random() < 0.2
                             else self.who.gp)
        encounter = self.new("Encounter", labels)
        encounter.update({
            "status": "finished",
            "class": {"system": ACT_CODE, "code": act, "display": act_display},
            "type": [concept((SNOMED, code, display))],
            "subject": self.subject(),
            "participant": [{"type": [concept(_PRIMARY_PERFORMER)], "period": self.period(),
                             "individual": practitioner_reference(self.practitioner, self.refs)}],
            "period": self.period(),
        })
        if visit.condition is not None:
            encounter["reasonCode"] = [concept(visit.condition.snomed)]
        if act == "IMP":
            encounter["hospitalization"] = {"dischargeDisposition": concept(_DISCHARGED_HOME)}
        encounter["serviceProvider"] = organization_reference(self.site, self.refs)
        self.encounter = encounter

    def check_up(self) -> None:
        age = self.age()
        self.vitals(age)
        if age >= 18:
            self.smoking_status()
            if self.rng.random() < 0.35:
                self.panel(self.rng.choice(tuple(PANELS)), ())
            self.screen(age)
        self.immunize(age)
        for screening in SCREENINGS:
            if (screening.ages[0] <= age < screening.ages[1] and screening.sex in (None, self.who.gender)
                    and self.rng.random() < screening.chance):
                self.procedure(screening.code, ())
        if self.medications and self.rng.random() < 0.7:
            self.procedure(MEDICATION_RECONCILIATION, ())

    def diagnose(self, spec: ConditionSpec, onset: datetime, known: bool = False) -> None:
        """A chronic condition goes on the problem list, with treatment and care plan."""
        labels = _labels(spec)
        condition = self.condition(spec, onset, labels, "problem-list-item")
        self.conditions[spec.code] = condition
        self.problems.append(spec)
        if not known:
            for key in spec.monitoring:
                self.monitor(key, labels)
        if spec.medications:
            self.prescribe(spec, condition, labels, chronic=True)
        if spec.care_plan is not None:
            self.care_plan(spec, spec.care_plan, condition, labels)

    def follow_up(self, spec: ConditionSpec) -> None:
        labels = _labels(spec)
        for key in spec.monitoring:
            self.monitor(key, labels)
        if spec.procedures and self.rng.random() < 0.5:
            self.procedure(self.rng.choice(spec.procedures), labels, reason=self.conditions[spec.code])

    def episode(self, spec: ConditionSpec) -> None:
        """An acute condition: seen, diagnosed, tested or treated, resolved after some days."""
        labels = _labels(spec)
        self.vitals(self.age(), fever=spec.fever, brief=True)
        onset = max(self.who.born, self.start - timedelta(days=self.rng.randint(0, 3)))
        abated = self.start + timedelta(days=self.rng.randint(*spec.days))
        condition = self.condition(spec, onset, labels, "encounter-diagnosis",
                                   abated if abated < self.who.end else None)
        for code in spec.procedures:
            self.procedure(code, labels, reason=condition)
        if spec.medications and self.rng.random() < spec.treated:
            self.prescribe(spec, condition, labels, chronic=False)

    # -- resources -----------------------------------------------------------------------------------------------

    def condition(self, spec: ConditionSpec, onset: datetime, labels: tuple[str, ...], category: str,
                  abated: datetime | None = None) -> Resource:
        condition = self.new("Condition", labels)
        condition.update({
            "clinicalStatus": concept(_RESOLVED if abated else _ACTIVE),
            "verificationStatus": concept(_CONFIRMED),
            "category": [concept(_CONDITION_CATEGORIES[category])],
            "code": concept(spec.snomed),
            **self.context(),
            "onsetDateTime": onset.isoformat(),
        })
        if abated:
            condition["abatementDateTime"] = abated.isoformat()
        condition["recordedDate"] = self.start.isoformat()
        self.maybe_note(condition, 0.25)
        return condition

    def measured(self, code: Code, category: str, labels: tuple[str, ...], when: datetime | None = None,
                 issued: datetime | None = None) -> Resource:
        """An Observation without its value: what was measured, on whom, during which encounter, when."""
        when = when or self.moment()
        observation = self.new("Observation", labels)
        observation.update({
            "status": "final",
            "category": [concept(_OBSERVATION_CATEGORIES[category])],
            "code": concept(code),
            **self.context(),
            "effectiveDateTime": when.isoformat(),
            "issued": (issued or when).isoformat(),
        })
        return observation

    def observation(self, key: str, value: float, labels: tuple[str, ...], when: datetime | None = None,
                    issued: datetime | None = None) -> Resource:
        spec = OBSERVATIONS[key]
        observation = self.measured(spec.loinc, spec.category, labels, when, issued)
        observation["valueQuantity"] = quantity(_rounded(value, spec.decimals), spec.unit)
        if spec.category == "laboratory":
            self.maybe_note(observation, 0.08)
        return observation

    def vitals(self, age: float, fever: bool = False, brief: bool = False) -> None:
        """Vital signs, all measured at one moment; an acute visit takes only pulse and temperature."""
        when, body = self.moment(), self.body
        if not brief:
            self.measurements(age, when)
            self.observation("respiratory_rate", body.respiratory_rate(age), (), when)
        self.observation("heart_rate", body.heart_rate(age), (), when)
        self.observation("temperature", body.temperature(fever), (), when)

    def measurements(self, age: float, when: datetime) -> None:
        """Height, weight, BMI (from age 2) and blood pressure (from age 3), at one moment."""
        height = self.body.height(age)
        weight = self.body.weight(age, height)
        self.observation("height", height, (), when)
        self.observation("weight", weight, (), when)
        if age >= 2:
            self.observation("bmi", weight / (height / 100) ** 2, (), when)
        if age >= 3:
            self.blood_pressure((), when)

    def screen(self, age: float) -> None:
        """HbA1c diabetes screening, when due at this age (`diabetes.SIGNAL`)."""
        if self.body.glycaemia.screened(age) and self.rng.random() < SIGNAL.screening_chance:
            self.monitor("hba1c", ())

    def blood_pressure(self, labels: tuple[str, ...], when: datetime | None = None) -> None:
        """A blood pressure panel: systolic and diastolic as components."""
        systolic, diastolic = self.body.blood_pressure(self.age())
        panel = self.measured(BLOOD_PRESSURE, "vital-signs", labels, when)
        panel["component"] = [
            {"code": concept(OBSERVATIONS[key].loinc), "valueQuantity": quantity(round(value), "mm[Hg]")}
            for key, value in (("systolic", systolic), ("diastolic", diastolic))
        ]

    def smoking_status(self) -> None:
        status = self.measured(SMOKING_STATUS, "social-history", ())
        status["valueCodeableConcept"] = concept(SMOKING[self.body.smoking])

    def monitor(self, key: str, labels: tuple[str, ...]) -> None:
        """What a follow-up measures: blood pressure, a lab panel or a single value."""
        if key == "bp":
            self.blood_pressure(labels)
        elif key in PANELS:
            self.panel(key, labels)
        else:
            when = self.moment()
            issued = when + timedelta(minutes=self.rng.randint(0, 240))
            self.observation(key, self.body.lab(key, self.age()), labels, when, issued)

    def panel(self, key: str, labels: tuple[str, ...]) -> None:
        """Laboratory results and the DiagnosticReport that lists them."""
        code, display, members = PANELS[key]
        when = self.moment()
        issued = when + timedelta(minutes=self.rng.randint(60, 480))
        age = self.age()
        results = [self.observation(member, self.body.lab(member, age), labels, when, issued) for member in members]
        report = self.new("DiagnosticReport", labels)
        report.update({
            "status": "final",
            "category": [concept(_LAB_SECTION)],
            "code": concept((LOINC, code, display)),
            **self.context(),
            "effectiveDateTime": when.isoformat(),
            "issued": issued.isoformat(),
            "performer": [organization_reference(self.site, self.refs)],
            "result": [{**self.ref(result), "display": result["code"]["text"]} for result in results],
        })

    def prescribe(self, spec: ConditionSpec, reason: Resource, labels: tuple[str, ...], chronic: bool) -> None:
        medication = self.rng.choice(spec.medications)
        if chronic:
            status = "stopped" if self.who.death else "active"
        else:
            status = "completed" if self.start + timedelta(days=30) < self.who.end else "active"
        request = self.new("MedicationRequest", labels)
        request.update({
            "status": status,
            "intent": "order",
            "medicationCodeableConcept": concept((RXNORM, medication.code, medication.display)),
            **self.context(),
            "authoredOn": self.start.isoformat(),
            "requester": practitioner_reference(self.practitioner, self.refs),
            "reasonReference": [self.ref(reason)],
            "dosageInstruction": [{
                "sequence": 1, "text": medication.sig,
                "timing": {"repeat": {"frequency": medication.per_day, "period": 1, "periodUnit": "d"}},
                "asNeededBoolean": medication.as_needed,
            }],
        })
        self.maybe_note(request, 0.15)
        if chronic:
            self.medications.append(medication.display)

    def procedure(self, code: Code, labels: tuple[str, ...], reason: Resource | None = None) -> None:
        start = self.moment()
        end = min(start + timedelta(minutes=self.rng.randint(10, 40)), self.end)
        procedure = self.new("Procedure", labels)
        procedure.update({"status": "completed", "code": concept(code), **self.context(),
                          "performedPeriod": {"start": start.isoformat(), "end": end.isoformat()}})
        if reason is not None:
            procedure["reasonReference"] = [self.ref(reason)]
        self.maybe_note(procedure, 0.4)

    def immunize(self, age: float) -> None:
        """The vaccines due at this age (series doses, boosters, the yearly flu shot), a few per visit."""
        day, given = self.start.date(), 0
        for vaccine in VACCINES:
            if given == _MAX_VACCINES_PER_VISIT:
                break
            if not vaccine.start <= age < vaccine.end or day.year < vaccine.since:
                continue
            history = self.vaccines.setdefault(vaccine.code, [])
            if self._due(vaccine, history, day) and self.rng.random() < vaccine.chance:
                history.append(day)
                given += 1
                self.immunization(vaccine)

    @staticmethod
    def _due(vaccine: VaccineSpec, history: list[date], day: date) -> bool:
        since_last = years_between(history[-1], day) if history else math.inf
        if vaccine.every:
            return since_last >= vaccine.every
        return len(history) < vaccine.doses and since_last >= 0.12

    def immunization(self, vaccine: VaccineSpec) -> None:
        lot = f"{chr(65 + self.rng.randrange(26))}{chr(65 + self.rng.randrange(26))}{self.rng.randrange(1000, 10000)}"
        immunization = self.new("Immunization")
        immunization.update({
            "status": "completed",
            "vaccineCode": concept((CVX, vaccine.code, vaccine.display)),
            "patient": self.subject(),
            "encounter": self.ref(self.encounter),
            "occurrenceDateTime": self.moment().isoformat(),
            "primarySource": True,
            "lotNumber": lot,
            "performer": [{"actor": practitioner_reference(self.practitioner, self.refs)}],
        })

    def allergies(self) -> None:
        """Asked once, at the first visit: most people have none."""
        self.allergies_taken = True
        count = self.rng.choices((0, 1, 2), weights=(76, 18, 6))[0]
        for code, display, category in self.rng.sample(ALLERGENS, count):
            allergy = self.new("AllergyIntolerance")
            allergy.update({
                "clinicalStatus": concept(_ALLERGY_ACTIVE),
                "verificationStatus": concept(_ALLERGY_CONFIRMED),
                "type": "allergy",
                "category": [category],
                "criticality": self.rng.choices(("low", "high", "unable-to-assess"), weights=(70, 20, 10))[0],
                "code": concept((SNOMED, code, display)),
                "patient": self.subject(),
                "encounter": self.ref(self.encounter),
                "recordedDate": self.start.isoformat(),
                "recorder": practitioner_reference(self.practitioner, self.refs),
                "reaction": [{"manifestation": [concept(self.rng.choice(REACTIONS))],
                              "severity": self.rng.choices(("mild", "moderate", "severe"), weights=(60, 30, 10))[0]}],
            })

    def care_plan(self, spec: ConditionSpec, care: CarePlanSpec, reason: Resource, labels: tuple[str, ...]) -> None:
        """A CareTeam, Goals and the CarePlan tying them to the condition."""
        alive = self.who.death is None
        team = self.new("CareTeam", labels)
        team.update({
            "status": "active" if alive else "inactive",
            **self.context(),
            "period": {"start": self.start.isoformat()},
            "participant": [
                {"role": [concept(CARE_TEAM_ROLES["patient"])], "member": self.subject()},
                {"role": [concept(CARE_TEAM_ROLES["professional"])],
                 "member": practitioner_reference(self.practitioner, self.refs)},
                {"role": [concept(CARE_TEAM_ROLES["organization"])],
                 "member": organization_reference(self.site, self.refs)},
            ],
            "reasonCode": [concept(spec.snomed)],
            "managingOrganization": [organization_reference(self.site, self.refs)],
        })
        goals = []
        for text in care.goals:
            goal = self.new("Goal", labels)
            goal.update({"lifecycleStatus": "active" if alive else "completed", "description": {"text": text},
                         "subject": self.subject(), "startDate": self.start.date().isoformat(),
                         "addresses": [self.ref(reason)]})
            goals.append(goal)
        plan = self.new("CarePlan", labels)
        plan.update({
            "status": "active" if alive else "completed",
            "intent": "order",
            "category": [concept(_ASSESS_PLAN), concept(care.code)],
            **self.context(),
            "period": {"start": self.start.isoformat()},
            "careTeam": [self.ref(team)],
            "addresses": [self.ref(reason)],
            "goal": [self.ref(goal) for goal in goals],
            "activity": [{"detail": {"code": concept(activity), "status": "in-progress" if alive else "completed",
                                     "location": {"display": self.site.name}}}
                         for activity in care.activities],
        })

    def document(self, visit: Visit) -> None:
        """The visit's clinical note, as a base64 text attachment; labelled with every problem it lists."""
        if self.rng.random() >= _NOTE_CHANCE[visit.kind]:
            return
        note_type = NOTE_TYPES[_NOTE_TYPE.get(visit.kind, "history")]
        reason = visit.condition.display if visit.condition else ENCOUNTERS[visit.kind][3]
        text = clinical_note(
            self.rng, self.who.locale.country, when=self.start.date().isoformat(), reason=reason, name=self.who.name,
            phone=self.who.phone, age=int(self.age()), gender=self.who.gender,
            problems=[spec.display for spec in self.problems], medications=self.medications)
        document = self.new("DocumentReference", _labels(visit.condition, *self.problems))
        document.update({
            "status": "current",
            "type": concept(note_type),
            "category": [concept(_CLINICAL_NOTE)],
            "subject": self.subject(),
            "date": self.end.isoformat(),
            "author": [practitioner_reference(self.practitioner, self.refs)],
            "custodian": organization_reference(self.site, self.refs),
            "content": [{"attachment": {
                "contentType": "text/plain; charset=utf-8",
                "language": self.who.locale.language[1],
                "data": base64.b64encode(text.encode()).decode("ascii"),
                "title": note_type[2],
                "creation": self.end.isoformat(),
            }}],
            "context": {"encounter": [self.ref(self.encounter)], "period": self.period()},
        })


def chart(rng: Random, who: Person, refs: Refs) -> list[Resource]:
    """The Patient and everything recorded about them, in time order."""
    patient = patient_resource(rng, who, refs)
    body = Body(rng, who.gender)
    chronic = chronic_conditions(rng, who, body)
    body.settle([spec.code for spec, _ in chronic])
    start = history_start(who)
    record = Chart(rng, who, refs, body, [(spec, onset) for spec, onset in chronic if onset < start])
    for visit in plan(rng, who, chronic, start):
        record.visit(visit)
    return [patient, *record.resources]
