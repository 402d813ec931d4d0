"""Type 2 diabetes: who develops it, when, and what their measurements show before — the data's learnable signal.

The model (ages in years, BMI in kg/m², HbA1c in %, every constant in `SIGNAL`):

1. Every person has a personal glycaemic level `a0 ~ N(5.35, 0.3)`; their latent HbA1c at age `t` is
   `h(t) = a0 + 0.008 (t − 50) + 0.02 (BMI − 27)`, BMI being their adult BMI (`Body.bmi`).
2. From age 20 on, while alive and free of diabetes, the yearly incidence rate of type 2 diabetes
   (SNOMED 44054006) is a proportional hazard, constant over each year of age `[y, y + 1)` and
   evaluated at its middle `t = y + 0.5`:
   `rate(t) = exp(−5.5 + 0.015 (t − 50) + 0.08 (BMI − 27) + 2.5 (h(t) − 5.4) + 0.4 · hypertensive(t))`,
   `hypertensive(t)` being 1 once their hypertension (SNOMED 38341003) began. The onset is the age at
   which the cumulative rate first reaches one exponential draw (exact sampling of that hazard); its day
   is the date of the "Encounter for problem" that diagnoses it and of the Condition's `onsetDateTime`.
3. What is measured follows, not leads: in the 6 years before the onset the measured HbA1c rises from
   `h(t)` to the diagnostic level `L ~ N(7.4, 0.7)` clipped to [6.5, 11] (quadratically: most of the
   rise in the last two years) and BMI rises linearly by up to 1.5; from the onset on, HbA1c stays
   around `L` and BMI at its raised level. Blood glucose follows HbA1c (26 mg/dL per HbA1c point
   above 5.35). Every reading adds the lab's visit-to-visit noise (`body.LABS`).
4. Prediabetes (SNOMED 714628002) is recorded, with probability 0.7, for people aged 30 or more
   without diabetes whose latent HbA1c at the end of their history is 5.7 or more.

So a model with index date `D` (`SIGNAL.index_date`, 2021-01-01: within hours of the start of a
living patient's five-year history window), features measured before `D` — latest BMI (LOINC
39156-5), latest HbA1c (LOINC 4548-4), age at `D`, hypertension — and label "type 2 diabetes with
onset in [D, D + 5 years)" has a clear signal among adults free of diabetes at `D`. The measurements
exist because adults' records start with their last check-up before the history window (`planning`),
and check-ups screen HbA1c (American Diabetes Association rule: adults aged 35 or more, or overweight
(BMI 25 or more), with probability 0.85).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from random import Random


@dataclass(frozen=True)
class Signal:
    """The constants of the model above: the benchmark and the tests cite them from here."""

    #: Personal glycaemic level: mean and between-person standard deviation (HbA1c %).
    a1c_mean: float = 5.35
    a1c_between: float = 0.3
    #: Latent HbA1c drift per year of age and per BMI point, around the reference age and BMI.
    a1c_per_year: float = 0.008
    a1c_per_bmi: float = 0.02
    reference_age: float = 50.0
    reference_bmi: float = 27.0
    reference_a1c: float = 5.4
    #: Log yearly incidence rate at the reference values, and its coefficients.
    intercept: float = -5.5
    per_year: float = 0.015
    per_bmi: float = 0.08
    per_a1c: float = 2.5
    hypertension: float = 0.4
    #: Youngest age at risk.
    first_age: float = 20.0
    #: The years before the onset in which measurements rise, and by how much BMI rises.
    ramp_years: float = 6.0
    bmi_rise: float = 1.5
    #: HbA1c at diagnosis: mean, standard deviation, clipped to [low, high].
    diagnosis_a1c: float = 7.4
    diagnosis_sd: float = 0.7
    diagnosis_low: float = 6.5
    diagnosis_high: float = 11.0
    #: Blood glucose (mg/dL) per HbA1c point above `a1c_mean`.
    glucose_per_a1c: float = 26.0
    #: Prediabetes: from this age, at this latent HbA1c, recorded with this probability.
    prediabetes_age: float = 30.0
    prediabetes_a1c: float = 5.7
    prediabetes_recorded: float = 0.7
    #: HbA1c screening at check-ups: adults from this age, or overweight from this BMI, with this probability.
    screening_age: float = 35.0
    screening_bmi: float = 25.0
    screening_chance: float = 0.85
    #: The question the signal answers: index date and horizon (years).
    index_date: date = date(2021, 1, 1)
    horizon_years: int = 5


SIGNAL = Signal()


class Glycaemia:
    """One person's HbA1c and BMI course: latent, then rising before a diabetes onset, if any."""

    def __init__(self, rng: Random, bmi: float):
        self.a0 = rng.gauss(SIGNAL.a1c_mean, SIGNAL.a1c_between)
        self.bmi = bmi
        #: Age at diabetes onset, and the HbA1c level it is diagnosed at.
        self.onset: float | None = None
        self.level = 0.0

    def latent(self, age: float) -> float:
        return (self.a0 + SIGNAL.a1c_per_year * (age - SIGNAL.reference_age)
                + SIGNAL.a1c_per_bmi * (self.bmi - SIGNAL.reference_bmi))

    def rate(self, age: float, hypertensive: bool) -> float:
        """The yearly incidence rate at `age` (model step 2)."""
        return math.exp(SIGNAL.intercept + SIGNAL.per_year * (age - SIGNAL.reference_age)
                        + SIGNAL.per_bmi * (self.bmi - SIGNAL.reference_bmi)
                        + SIGNAL.per_a1c * (self.latent(age) - SIGNAL.reference_a1c)
                        + (SIGNAL.hypertension if hypertensive else 0.0))

    def onset_age(self, draw: float, until: float, hypertension: float | None) -> float | None:
        """The age at which the cumulative rate reaches `draw` (an Exp(1) variate) before `until`, if it does."""
        year, total = SIGNAL.first_age, 0.0
        while year < until:
            middle = year + 0.5
            rate = self.rate(middle, hypertension is not None and hypertension <= middle)
            span = min(1.0, until - year)
            if total + rate * span >= draw:
                return year + (draw - total) / rate
            total += rate * span
            year += 1.0
        return None

    def diagnose(self, rng: Random, age: float) -> None:
        self.onset = age
        self.level = min(SIGNAL.diagnosis_high,
                         max(SIGNAL.diagnosis_low, rng.gauss(SIGNAL.diagnosis_a1c, SIGNAL.diagnosis_sd)))

    def _rise(self, age: float) -> float:
        """How far into the pre-diagnostic rise `age` is: 0 before it (or without diabetes), 1 from the onset."""
        if self.onset is None:
            return 0.0
        return min(1.0, max(0.0, 1.0 - (self.onset - age) / SIGNAL.ramp_years))

    def a1c(self, age: float) -> float:
        """The person's mean HbA1c at `age` (model step 3), before visit-to-visit noise."""
        if self.onset is not None and age >= self.onset:
            return self.level
        latent = self.latent(age)
        return latent + (self.level - latent) * self._rise(age) ** 2

    def bmi_at(self, age: float) -> float:
        return self.bmi + SIGNAL.bmi_rise * self._rise(age)

    def glucose_shift(self, age: float) -> float:
        return SIGNAL.glucose_per_a1c * (self.a1c(age) - SIGNAL.a1c_mean)

    def prediabetic(self, age: float) -> bool:
        """Whether prediabetes may be on record at `age` (before the `prediabetes_recorded` draw)."""
        return (self.onset is None and age >= SIGNAL.prediabetes_age
                and self.latent(age) >= SIGNAL.prediabetes_a1c)

    def screened(self, age: float) -> bool:
        """Whether a check-up at `age` is one where HbA1c screening is due (before the `screening_chance` draw)."""
        return age >= SIGNAL.screening_age or (age >= 18 and self.bmi >= SIGNAL.screening_bmi)
