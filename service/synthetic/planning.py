"""When things happen to a patient: chronic conditions and their onsets, then a plan of visits.

Check-ups at age-appropriate intervals, an "Encounter for problem" when a chronic
condition starts, follow-ups while it lasts, and acute episodes drawn year by year
from their incidence. Everything falls inside the history window and before death,
except, for most adults, the last check-up before the window: the record starts with it.
Type 2 diabetes and prediabetes follow the model in `diabetes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import attrgetter
from random import Random

from service.synthetic.body import Body
from service.synthetic.build import YEAR, at, between, step
from service.synthetic.codes import ACUTE, CHRONIC, DIABETES, ENCOUNTERS, OBESITY, PREDIABETES, ConditionSpec
from service.synthetic.diabetes import SIGNAL
from service.synthetic.people import Person

HISTORY_YEARS = 5
#: Obesity multiplies the odds of these conditions (SNOMED).
_RISK_IF_OBESE = {"38341003": 1.5}
_HYPERTENSION = "38341003"
#: Years between check-ups, by age.
_CHECK_UP_INTERVAL = ((0, 0.3), (1, 0.6), (3, 2.0), (18, 3.0), (50, 2.5), (75, 2.0))
#: Share of adults whose record starts with their last check-up before the history window.
_EARLIER_CHECK_UP = 0.85


@dataclass(frozen=True)
class Visit:
    start: datetime
    kind: str
    condition: ConditionSpec | None = None
    #: The check-up before the history window: only its measurements are on record.
    earlier: bool = False


def _years(value: float) -> timedelta:
    return timedelta(days=value * YEAR)


def _visit_at(rng: Random, who: Person, when: datetime, kind: str) -> datetime:
    """A plausible time on `when`'s day: office hours for ambulatory care, any hour otherwise."""
    minutes = rng.randrange(8 * 60, 17 * 60 + 30) if ENCOUNTERS[kind][0] == "AMB" else rng.randrange(24 * 60)
    return min(at(when.date(), minutes, who.tz), who.end - timedelta(minutes=1))


def history_start(who: Person) -> datetime:
    return max(who.born, who.end - _years(HISTORY_YEARS))


def chronic_conditions(rng: Random, who: Person, body: Body) -> list[tuple[ConditionSpec, datetime]]:
    """Which chronic conditions the person has had by the end of their history, and since when."""
    age = who.age(who.end)
    found: list[tuple[ConditionSpec, datetime]] = []
    for spec in CHRONIC:
        if spec.sex and spec.sex != who.gender:
            continue
        share = step(spec.prevalence, age, 0.0) * (_RISK_IF_OBESE.get(spec.code, 1.0) if body.obese else 1.0)
        if share and rng.random() < share:
            found.append((spec, _onset(rng, who, spec.prevalence[0][0], age)))
    if age >= 18 and body.obese:
        found.append((OBESITY, _onset(rng, who, 18, age)))
    glycaemia = body.glycaemia
    if age > SIGNAL.first_age:
        hypertension = next((who.age(onset) for spec, onset in found if spec.code == _HYPERTENSION), None)
        onset_age = glycaemia.onset_age(rng.expovariate(1.0), age, hypertension)
        if onset_age is not None:
            onset = _visit_at(rng, who, who.born + _years(onset_age), "problem")
            glycaemia.diagnose(rng, who.age(onset))
            found.append((DIABETES, onset))
    if glycaemia.prediabetic(age) and rng.random() < SIGNAL.prediabetes_recorded:
        found.append((PREDIABETES, _onset(rng, who, SIGNAL.prediabetes_age, age)))
    return found


def _onset(rng: Random, who: Person, first_age: float, age: float) -> datetime:
    return _visit_at(rng, who, who.born + _years(rng.uniform(first_age, age)), "problem")


def plan(rng: Random, who: Person, chronic: list[tuple[ConditionSpec, datetime]], start: datetime) -> list[Visit]:
    """Every visit in [start, end of history), after the earlier check-up if there is one, in time order."""
    end = who.end
    visits = _earlier_check_up(rng, who, start) + _check_ups(rng, who, start, end)
    visits += [Visit(onset, "problem", spec) for spec, onset in chronic if onset >= start]
    visits += _follow_ups(rng, who, chronic, start, end)
    visits += _episodes(rng, who, start, end)
    visits.sort(key=attrgetter("start"))
    return visits


def _earlier_check_up(rng: Random, who: Person, start: datetime) -> list[Visit]:
    """The last check-up before `start` (at least a day before), for most people who were adults then."""
    if rng.random() >= _EARLIER_CHECK_UP:
        return []
    when = start - timedelta(days=1) - _years(rng.random() * step(_CHECK_UP_INTERVAL, who.age(start), 1.0))
    if who.age(when) < 18:
        return []
    return [Visit(_visit_at(rng, who, when, "wellness"), "wellness", earlier=True)]


def _check_ups(rng: Random, who: Person, start: datetime, end: datetime) -> list[Visit]:
    visits: list[Visit] = []
    when = start + _years(rng.random() * step(_CHECK_UP_INTERVAL, who.age(start), 1.0))
    while when < end:
        kind = "wellchild" if who.age(when) < 18 else "wellness"
        visits.append(Visit(_visit_at(rng, who, when, kind), kind))
        when += _years(step(_CHECK_UP_INTERVAL, who.age(when), 1.0) * rng.uniform(0.8, 1.2))
    if not visits:
        kind = "wellchild" if who.age(start) < 18 else "wellness"
        visits.append(Visit(_visit_at(rng, who, between(rng, start, end), kind), kind))
    return visits


def _follow_ups(rng: Random, who: Person, chronic: list[tuple[ConditionSpec, datetime]], start: datetime,
                end: datetime) -> list[Visit]:
    visits: list[Visit] = []
    for spec, onset in chronic:
        if not (spec.monitoring or spec.procedures):
            continue
        when = max(onset, start) + _years(rng.uniform(0.3, 1.2))
        while when < end:
            visits.append(Visit(_visit_at(rng, who, when, "followup"), "followup", spec))
            when += _years(rng.uniform(1.5, 3.0))
    return visits


def _episodes(rng: Random, who: Person, start: datetime, end: datetime) -> list[Visit]:
    """Acute conditions, each year with its incidence, at the ages and sex they affect."""
    visits: list[Visit] = []
    years = math.ceil((end - start).days / YEAR)
    for spec in ACUTE:
        if spec.sex and spec.sex != who.gender:
            continue
        for year in range(years):
            if rng.random() >= spec.incidence:
                continue
            when = start + _years(year + rng.random())
            if when < end and spec.ages[0] <= who.age(when) < spec.ages[1]:
                visits.append(Visit(_visit_at(rng, who, when, spec.setting), spec.setting, spec))
    return visits
