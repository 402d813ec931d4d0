"""A synthetic person's physiology: measurements that are plausible, repeatable and disease-correlated.

Each quantity has a population mean, a personal offset (drawn once, so one person's
readings agree with each other) and a visit-to-visit noise; conditions shift the
means (a hypertensive's blood pressure, a diabetic's triglycerides) over the whole history, while
HbA1c, blood glucose and adult BMI follow the person's `Glycaemia` course (`diabetes`: they rise
before a type 2 diabetes onset).
"""
from __future__ import annotations

from dataclasses import dataclass
from random import Random

from service.synthetic.build import interpolate
from service.synthetic.diabetes import SIGNAL, Glycaemia


@dataclass(frozen=True)
class Model:
    mean: float
    between: float
    within: float
    low: float
    high: float
    #: Drawn in log10 space (viral loads span orders of magnitude).
    log: bool = False


LABS: dict[str, Model] = {
    "glucose": Model(88, 6, 6, 55, 450),
    "hba1c": Model(SIGNAL.a1c_mean, SIGNAL.a1c_between, 0.15, 4.0, 14.0),  # the mean: `Glycaemia`
    "cholesterol": Model(185, 25, 10, 110, 340),
    "triglycerides": Model(115, 30, 20, 40, 600),
    "hdl": Model(52, 10, 4, 20, 110),
    "ldl": Model(110, 22, 8, 40, 260),
    "creatinine": Model(0.85, 0.12, 0.06, 0.4, 3.0),
    "urea_nitrogen": Model(14, 3, 2.5, 5, 45),
    "sodium": Model(140, 1.5, 1.5, 128, 150),
    "potassium": Model(4.2, 0.25, 0.2, 3.2, 5.6),
    "calcium": Model(9.5, 0.25, 0.2, 8.2, 10.8),
    "viral_load": Model(1.7, 0.6, 0.5, 1.0, 5.5, log=True),
    "cd4": Model(620, 150, 70, 50, 1500),
    "phq9": Model(13, 3, 3, 0, 27),
    "gad7": Model(11, 3, 3, 0, 21),
    "audit_c": Model(8, 1.5, 1.5, 0, 12),
    "dast10": Model(6, 1.5, 1.2, 0, 10),
}
#: How conditions (SNOMED) move the means.
SHIFTS: dict[str, dict[str, float]] = {
    "44054006": {"triglycerides": 45},                                 # type 2 diabetes
    "55822004": {"cholesterol": 55, "ldl": 45, "triglycerides": 60},   # hyperlipidemia
    "38341003": {"systolic": 18, "diastolic": 10},                     # hypertension
    "414545008": {"systolic": 6, "cholesterol": 15, "ldl": 12},        # ischemic heart disease
}
#: Fraction of adult height reached by age, and a typical BMI by age (25 = the adult reference).
GROWTH = ((0, 0.29), (0.5, 0.39), (1, 0.44), (2, 0.51), (3, 0.56), (4, 0.6), (6, 0.68), (8, 0.75), (10, 0.81),
          (12, 0.87), (14, 0.94), (16, 0.98), (18, 1.0))
CHILD_BMI = ((0, 13.5), (0.5, 17.0), (1, 17.2), (2, 16.5), (5, 15.5), (8, 16.0), (12, 18.5), (15, 21.0), (18, 25.0))
HEART_RATE = ((0, 130), (1, 115), (3, 100), (10, 85), (18, 72))
RESPIRATORY_RATE = ((0, 40), (1, 30), (5, 22), (12, 18), (18, 15))
CHILD_SYSTOLIC = ((3, 95), (12, 105), (18, 112))
CHILD_DIASTOLIC = ((3, 58), (12, 64), (18, 70))


class Body:
    """Baselines drawn once per person; `settle` applies the conditions they have."""

    def __init__(self, rng: Random, gender: str):
        self.rng = rng
        self.male = gender == "male" or (gender not in ("male", "female") and rng.random() < 0.5)
        self.adult_height = rng.gauss(176, 7) if self.male else rng.gauss(163, 6.5)
        self.bmi = min(48.0, max(16.5, rng.gauss(26.5, 5)))
        self.smoking = rng.choices(("never", "former", "current"), weights=(60, 22, 18))[0]
        self.offsets = {"systolic": rng.gauss(0, 8), "diastolic": rng.gauss(0, 6), "heart_rate": rng.gauss(0, 6)}
        self.glycaemia = Glycaemia(rng, self.bmi)
        self.means: dict[str, float] = {}
        self.shifts: dict[str, float] = {}

    @property
    def obese(self) -> bool:
        return self.bmi >= 30

    def settle(self, conditions: list[str]) -> None:
        """Fix the personal means of the lab values, given the person's conditions (SNOMED codes)."""
        for code in conditions:
            for key, shift in SHIFTS.get(code, {}).items():
                self.shifts[key] = self.shifts.get(key, 0.0) + shift
        sex = {"creatinine": 0.18, "hdl": -8} if self.male else {}
        for key, model in LABS.items():
            if key == "hba1c":
                continue
            mean = model.mean + self.shifts.get(key, 0.0) + sex.get(key, 0.0)
            self.means[key] = self.rng.gauss(mean, model.between)

    def lab(self, key: str, age: float) -> float:
        """A reading at `age`: HbA1c around the glycaemic course, glucose shifted with it, the rest around the means."""
        model = LABS[key]
        if key == "hba1c":
            mean = self.glycaemia.a1c(age)
        elif key == "glucose":
            mean = self.means[key] + self.glycaemia.glucose_shift(age)
        else:
            mean = self.means[key]
        value = min(model.high, max(model.low, self.rng.gauss(mean, model.within)))
        return 10 ** value if model.log else value

    def height(self, age: float) -> float:
        return self.adult_height * interpolate(GROWTH, age) + self.rng.gauss(0, 0.4)

    def weight(self, age: float, height: float) -> float:
        bmi = self.glycaemia.bmi_at(age) if age >= 18 else interpolate(CHILD_BMI, age) * (self.bmi / 25) ** (age / 18)
        return bmi * (height / 100) ** 2 * (1 + self.rng.gauss(0, 0.015))

    def blood_pressure(self, age: float) -> tuple[float, float]:
        if age >= 18:
            systolic = 112 + 0.45 * (age - 18) + self.shifts.get("systolic", 0.0)
            diastolic = 70 + 0.1 * (age - 18) + self.shifts.get("diastolic", 0.0)
        else:
            systolic, diastolic = interpolate(CHILD_SYSTOLIC, age), interpolate(CHILD_DIASTOLIC, age)
        systolic += self.offsets["systolic"] + self.rng.gauss(0, 6)
        diastolic += self.offsets["diastolic"] + self.rng.gauss(0, 4)
        return systolic, min(diastolic, systolic - 25)

    def heart_rate(self, age: float) -> float:
        return interpolate(HEART_RATE, age) + self.offsets["heart_rate"] + self.rng.gauss(0, 5)

    def respiratory_rate(self, age: float) -> float:
        return interpolate(RESPIRATORY_RATE, age) + self.rng.gauss(0, 1.5)

    def temperature(self, fever: bool) -> float:
        return self.rng.gauss(38.6, 0.45) if fever else self.rng.gauss(36.8, 0.2)
