"""Terminology tables: what happens to synthetic patients, in SNOMED CT, LOINC, RxNorm and CVX.

Codes are real SNOMED CT, LOINC, RxNorm and CVX codes, most of them as Synthea emits
them; rates are rough population figures, enough for realistic mixes (sensitive
conditions are rare, hypertension is not).
"""
from __future__ import annotations

from dataclasses import dataclass

from service.synthetic.build import LOINC, SNOMED, Code


@dataclass(frozen=True)
class Medication:
    """An RxNorm clinical drug and how it is taken."""

    code: str
    display: str
    sig: str
    per_day: int = 1
    as_needed: bool = False


@dataclass(frozen=True)
class CarePlanSpec:
    code: Code
    activities: tuple[Code, ...]
    goals: tuple[str, ...]


@dataclass(frozen=True)
class ConditionSpec:
    """A condition, who gets it, and what care follows.

    Chronic conditions have a `prevalence` by age reached ((age, share), …) and are
    diagnosed at an "Encounter for problem"; acute ones have a yearly `incidence`
    within `ages` and resolve after `days`.
    """

    code: str
    display: str
    label: str | None = None
    sex: str | None = None
    prevalence: tuple[tuple[int, float], ...] = ()
    incidence: float = 0.0
    ages: tuple[int, int] = (0, 120)
    setting: str = "problem"
    days: tuple[int, int] = (7, 21)
    medications: tuple[Medication, ...] = ()
    treated: float = 1.0
    procedures: tuple[Code, ...] = ()
    monitoring: tuple[str, ...] = ()
    care_plan: CarePlanSpec | None = None
    fever: bool = False

    @property
    def chronic(self) -> bool:
        return bool(self.prevalence)

    @property
    def snomed(self) -> Code:
        return (SNOMED, self.code, self.display)


@dataclass(frozen=True)
class ObservationSpec:
    code: str
    display: str
    unit: str
    category: str
    decimals: int = 1

    @property
    def loinc(self) -> Code:
        return (LOINC, self.code, self.display)


@dataclass(frozen=True)
class VaccineSpec:
    """A CVX vaccine given between ages [start, end) up to `doses` times (or every `every` years)."""

    code: str
    display: str
    start: float
    end: float
    doses: int = 1
    every: float = 0.0
    chance: float = 0.9
    since: int = 0  # first calendar year it exists


@dataclass(frozen=True)
class Screening:
    code: Code
    ages: tuple[int, int]
    chance: float
    sex: str | None = None


def _snomed(code: str, display: str) -> Code:
    return (SNOMED, code, display)


DAILY = "Take 1 tablet by mouth daily"
ACETAMINOPHEN = Medication("313782", "Acetaminophen 325 MG Oral Tablet",
                           "Take 2 tablets by mouth every 6 hours as needed", 4, as_needed=True)
NAPROXEN = Medication("849574", "Naproxen sodium 220 MG Oral Tablet",
                      "Take 1 tablet by mouth every 12 hours as needed", 2, as_needed=True)
DOXYCYCLINE = Medication("1650143", "doxycycline hyclate 100 MG Oral Tablet",
                         "Take 1 tablet by mouth twice daily for 7 days", 2)

CBT = _snomed("228557008", "Cognitive and behavioral therapy (regime/therapy)")

_HYPERTENSION_PLAN = CarePlanSpec(
    _snomed("443402002", "Lifestyle education regarding hypertension (procedure)"),
    (_snomed("386463000", "Prescribed activity/exercise education (procedure)"),
     _snomed("413473000", "Counseling about alcohol consumption (procedure)")),
    ("Maintain blood pressure below 140/90 mm[Hg]", "Reduce sodium intake to no more than 2,400 mg/day"))
_DIABETES_PLAN = CarePlanSpec(
    _snomed("698360004", "Diabetes self management plan"),
    (_snomed("160670007", "Diabetic diet"), _snomed("229065009", "Exercise therapy")),
    ("Hemoglobin A1c total in Blood < 7.0", "Glucose [Mass/volume] in Blood < 108"))
_ASTHMA_PLAN = CarePlanSpec(
    _snomed("699728000", "Asthma self management"),
    (_snomed("710081004", "Smoking cessation therapy"), _snomed("708409001", "Home nebulizer therapy")),
    ("Asthma symptoms controlled without night-time waking",))
_COPD_PLAN = CarePlanSpec(
    _snomed("412776001", "Chronic obstructive pulmonary disease clinical management plan"),
    (_snomed("15081005", "Pulmonary rehabilitation (regime/therapy)"),
     _snomed("710081004", "Smoking cessation therapy")),
    ("Improve exercise tolerance",))
_MENTAL_HEALTH_PLAN = CarePlanSpec(
    _snomed("734163000", "Care plan (record artifact)"), (CBT,),
    ("Reduce symptom score by half within six months",))

#: Chronic conditions, sensitive ones (with their v3 label) included at realistic low rates.
CHRONIC: tuple[ConditionSpec, ...] = (
    ConditionSpec("38341003", "Hypertension", prevalence=((18, 0.04), (40, 0.18), (60, 0.42), (75, 0.6)),
                  medications=(Medication("314076", "lisinopril 10 MG Oral Tablet", DAILY),
                               Medication("310798", "Hydrochlorothiazide 25 MG Oral Tablet",
                                          DAILY),
                               Medication("197361", "amLODIPine 5 MG Oral Tablet", DAILY)),
                  procedures=(_snomed("29303009", "Electrocardiographic procedure (procedure)"),),
                  monitoring=("bp",), care_plan=_HYPERTENSION_PLAN),
    ConditionSpec("55822004", "Hyperlipidemia (disorder)", prevalence=((35, 0.08), (55, 0.22)),
                  medications=(Medication("314231", "simvastatin 10 MG Oral Tablet",
                                          "Take 1 tablet by mouth at bedtime"),),
                  monitoring=("lipids",)),
    ConditionSpec("195967001", "Asthma (disorder)", prevalence=((2, 0.04), (10, 0.08)),
                  medications=(Medication("895996", "120 ACTUAT fluticasone propionate 0.044 MG/ACTUAT Metered Dose "
                                          "Inhaler [Flovent]", "Inhale 2 puffs twice daily", 2),
                               Medication("745752", "NDA021457 200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose "
                                          "Inhaler [ProAir]", "Inhale 2 puffs every 4 hours as needed", 6,
                                          as_needed=True)),
                  procedures=(_snomed("127783003", "Spirometry (procedure)"),), care_plan=_ASTHMA_PLAN),
    ConditionSpec("185086009", "Chronic obstructive bronchitis (disorder)", prevalence=((45, 0.03), (65, 0.07)),
                  medications=(Medication("896209", "60 ACTUAT Fluticasone propionate 0.25 MG/ACTUAT / salmeterol "
                                          "0.05 MG/ACTUAT Dry Powder Inhaler", "Inhale 1 puff twice daily", 2),),
                  procedures=(_snomed("127783003", "Spirometry (procedure)"),), care_plan=_COPD_PLAN),
    ConditionSpec("367498001", "Seasonal allergic rhinitis (disorder)", prevalence=((5, 0.1),),
                  medications=(Medication("311372", "Loratadine 10 MG Oral Tablet", DAILY),)),
    ConditionSpec("239873007", "Osteoarthritis of knee (disorder)", prevalence=((50, 0.08), (70, 0.22)),
                  medications=(NAPROXEN, ACETAMINOPHEN)),
    ConditionSpec("64859006", "Osteoporosis (disorder)", sex="female", prevalence=((55, 0.08), (70, 0.2)),
                  medications=(Medication("904419", "Alendronic acid 10 MG Oral Tablet", DAILY),),
                  procedures=(_snomed("312681000", "Bone density scan (procedure)"),)),
    ConditionSpec("414545008", "Ischemic heart disease (disorder)", prevalence=((55, 0.04), (75, 0.1)),
                  medications=(Medication("309362", "Clopidogrel 75 MG Oral Tablet", DAILY),
                               Medication("866412", "24 HR metoprolol succinate 100 MG Extended Release Oral Tablet",
                                          DAILY)),
                  procedures=(_snomed("29303009", "Electrocardiographic procedure (procedure)"),), monitoring=("bp",)),
    ConditionSpec("370143000", "Major depressive disorder (disorder)", label="PSY", prevalence=((14, 0.06),),
                  medications=(Medication("312940", "sertraline 50 MG Oral Tablet", DAILY),),
                  procedures=(CBT,), monitoring=("phq9",), care_plan=_MENTAL_HEALTH_PLAN),
    ConditionSpec("21897009", "Generalized anxiety disorder (disorder)", label="PSY", prevalence=((14, 0.04),),
                  medications=(Medication("310385", "FLUoxetine 20 MG Oral Capsule", "Take 1 capsule by mouth daily"),),
                  procedures=(_snomed("710841007", "Assessment of anxiety (procedure)"),), monitoring=("gad7",)),
    ConditionSpec("58214004", "Schizophrenia (disorder)", label="PSY", prevalence=((18, 0.006),),
                  medications=(Medication("312831", "risperidone 2 MG Oral Tablet",
                                          "Take 1 tablet by mouth twice daily", 2),),
                  procedures=(CBT,), care_plan=_MENTAL_HEALTH_PLAN),
    ConditionSpec("86406008", "Human immunodeficiency virus infection (disorder)", label="HIV",
                  prevalence=((16, 0.008),),
                  medications=(Medication("1999563", "bictegravir 50 MG / emtricitabine 200 MG / tenofovir alafenamide "
                                          "25 MG Oral Tablet", DAILY),),
                  monitoring=("viral_load", "cd4")),
    ConditionSpec("7200002", "Alcoholism (disorder)", label="SUD", prevalence=((18, 0.025),),
                  medications=(Medication("1483744", "naltrexone hydrochloride 50 MG Oral Tablet",
                                          DAILY),),
                  procedures=(_snomed("763302001", "Assessment using Alcohol Use Disorders Identification Test - "
                                                   "Consumption (procedure)"),),
                  monitoring=("audit_c",)),
    ConditionSpec("75544000", "Opioid dependence (disorder)", label="SUD", prevalence=((18, 0.008),),
                  medications=(Medication("1010600", "buprenorphine 2 MG / naloxone 0.5 MG Sublingual Film",
                                          "Dissolve 1 film under the tongue daily"),),
                  procedures=(_snomed("713106006", "Screening for drug abuse (procedure)"),), monitoring=("dast10",)),
    ConditionSpec("254843006", "Familial cancer of breast (disorder)", label="GDIS", sex="female",
                  prevalence=((25, 0.01),),
                  procedures=(_snomed("24623002", "Screening mammography (procedure)"),)),
)

#: Acute episodes: primary care, emergency room and hospital admissions.
ACUTE: tuple[ConditionSpec, ...] = (
    ConditionSpec("444814009", "Viral sinusitis (disorder)", incidence=0.15, setting="acute", days=(10, 21),
                  medications=(Medication("562251", "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet",
                                          "Take 1 tablet by mouth three times daily for 10 days", 3),), treated=0.3),
    ConditionSpec("195662009", "Acute viral pharyngitis (disorder)", incidence=0.1, setting="acute", days=(5, 10),
                  medications=(ACETAMINOPHEN,), treated=0.5, fever=True),
    ConditionSpec("43878008", "Streptococcal sore throat (disorder)", incidence=0.05, ages=(3, 45), setting="acute",
                  days=(7, 12),
                  medications=(Medication("834061", "Penicillin V Potassium 250 MG Oral Tablet",
                                          "Take 1 tablet by mouth four times daily for 10 days", 4),),
                  procedures=(_snomed("117015009", "Throat culture (procedure)"),), fever=True),
    ConditionSpec("10509002", "Acute bronchitis (disorder)", incidence=0.06, setting="acute", days=(10, 25),
                  medications=(ACETAMINOPHEN,), treated=0.6, fever=True),
    ConditionSpec("65363002", "Otitis media (disorder)", incidence=0.25, ages=(0, 8), setting="acute", days=(5, 14),
                  medications=(Medication("308182", "Amoxicillin 250 MG Oral Capsule",
                                          "Take 1 capsule by mouth three times daily for 10 days", 3),),
                  treated=0.7, fever=True),
    ConditionSpec("307426000", "Acute infective cystitis (disorder)", sex="female", incidence=0.04, ages=(15, 120),
                  setting="acute", days=(3, 10),
                  medications=(Medication("1648755", "nitrofurantoin  macrocrystals 25 MG / nitrofurantoin  "
                                          "monohydrate 75 MG Oral Capsule", "Take 1 capsule by mouth twice daily for "
                                          "5 days", 2),)),
    ConditionSpec("105629000", "Chlamydial infection (disorder)", label="SEX", incidence=0.012, ages=(15, 35),
                  setting="acute", days=(7, 21), medications=(DOXYCYCLINE,),
                  procedures=(_snomed("310861008", "Chlamydia antigen test (procedure)"),)),
    ConditionSpec("15628003", "Gonorrhea (disorder)", label="SEX", incidence=0.005, ages=(15, 40), setting="acute",
                  days=(7, 21),
                  medications=(Medication("1665005", "ceftriaxone 500 MG Injection",
                                          "500 mg intramuscular, single dose"),),
                  procedures=(_snomed("165829005", "Gonorrhea infection titer test (procedure)"),)),
    ConditionSpec("76272004", "Syphilis (disorder)", label="SEX", incidence=0.002, ages=(18, 65), setting="acute",
                  days=(14, 60), medications=(DOXYCYCLINE,),
                  procedures=(_snomed("269828009", "Syphilis infectious titer test (procedure)"),)),
    ConditionSpec("44465007", "Sprain of ankle (disorder)", incidence=0.02, ages=(5, 80), setting="emergency",
                  days=(14, 42), medications=(NAPROXEN,),
                  procedures=(_snomed("1290459008", "Plain X-ray of ankle region (procedure)"),)),
    ConditionSpec("65966004", "Fracture of forearm (disorder)", incidence=0.008, setting="emergency", days=(42, 70),
                  medications=(Medication("310965", "Ibuprofen 200 MG Oral Tablet",
                                          "Take 2 tablets by mouth every 6 hours as needed", 4, as_needed=True),),
                  procedures=(_snomed("274474001", "Bone immobilization (procedure)"),)),
    ConditionSpec("284549007", "Laceration of hand (disorder)", incidence=0.01, ages=(3, 90), setting="emergency",
                  days=(10, 20), procedures=(_snomed("288086009", "Suture open wound (procedure)"),)),
    ConditionSpec("62106007", "Concussion with no loss of consciousness (disorder)", incidence=0.005,
                  setting="emergency", days=(7, 30),
                  procedures=(_snomed("162676008", "Brief general examination (procedure)"),)),
    ConditionSpec("233604007", "Pneumonia (disorder)", incidence=0.03, ages=(65, 120), setting="inpatient",
                  days=(14, 30),
                  medications=(Medication("1665021", "ceftriaxone 1000 MG Injection", "1 g intravenous once daily"),),
                  procedures=(_snomed("399208008", "Plain chest X-ray (procedure)"),), fever=True),
)

OBESITY = ConditionSpec("162864005", "Body mass index 30+ - obesity (finding)")
#: Type 2 diabetes and prediabetes: who has them follows `diabetes.SIGNAL`, not a prevalence table.
DIABETES = ConditionSpec("44054006", "Diabetes mellitus type 2 (disorder)",
                         medications=(Medication("860975", "24 HR Metformin hydrochloride 500 MG Extended Release "
                                                 "Oral Tablet", "Take 1 tablet by mouth daily with the evening meal"),),
                         monitoring=("hba1c", "glucose"), care_plan=_DIABETES_PLAN)
PREDIABETES = ConditionSpec("714628002", "Prediabetes (finding)", monitoring=("hba1c",))

OBSERVATIONS: dict[str, ObservationSpec] = {
    "height": ObservationSpec("8302-2", "Body Height", "cm", "vital-signs"),
    "weight": ObservationSpec("29463-7", "Body Weight", "kg", "vital-signs"),
    "bmi": ObservationSpec("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", "vital-signs"),
    "heart_rate": ObservationSpec("8867-4", "Heart rate", "/min", "vital-signs", 0),
    "respiratory_rate": ObservationSpec("9279-1", "Respiratory rate", "/min", "vital-signs", 0),
    "temperature": ObservationSpec("8310-5", "Body temperature", "Cel", "vital-signs"),
    "systolic": ObservationSpec("8480-6", "Systolic blood pressure", "mm[Hg]", "vital-signs", 0),
    "diastolic": ObservationSpec("8462-4", "Diastolic blood pressure", "mm[Hg]", "vital-signs", 0),
    "glucose": ObservationSpec("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", "laboratory"),
    "hba1c": ObservationSpec("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", "laboratory"),
    "cholesterol": ObservationSpec("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", "laboratory"),
    "triglycerides": ObservationSpec("2571-8", "Triglycerides [Mass/volume] in Serum or Plasma", "mg/dL",
                                     "laboratory"),
    "ldl": ObservationSpec("18262-6", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay", "mg/dL",
                           "laboratory"),
    "hdl": ObservationSpec("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", "laboratory"),
    "creatinine": ObservationSpec("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", "laboratory", 2),
    "urea_nitrogen": ObservationSpec("6299-2", "Urea nitrogen [Mass/volume] in Blood", "mg/dL", "laboratory"),
    "sodium": ObservationSpec("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", "laboratory"),
    "potassium": ObservationSpec("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", "laboratory"),
    "calcium": ObservationSpec("17861-6", "Calcium [Mass/volume] in Serum or Plasma", "mg/dL", "laboratory"),
    "viral_load": ObservationSpec("25836-8", "HIV 1 RNA [#/volume] (viral load) in Serum or Plasma by NAA with "
                                  "probe detection", "{copies}/mL", "laboratory", 0),
    "cd4": ObservationSpec("24467-3", "CD3+CD4+ (T4 helper) cells [#/volume] in Blood", "/uL", "laboratory", 0),
    "phq9": ObservationSpec("44261-6", "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]",
                            "{score}", "survey", 0),
    "gad7": ObservationSpec("70274-6", "Generalized anxiety disorder 7 item (GAD-7) total score [Reported.PHQ]",
                            "{score}", "survey", 0),
    "audit_c": ObservationSpec("75626-2", "Total score [AUDIT-C]", "{score}", "survey", 0),
    "dast10": ObservationSpec("82667-7", "Total score [DAST-10]", "{score}", "survey", 0),
}

BLOOD_PRESSURE = (LOINC, "85354-9", "Blood pressure panel with all children optional")
SMOKING_STATUS = (LOINC, "72166-2", "Tobacco smoking status")
SMOKING: dict[str, Code] = {
    "never": _snomed("266919005", "Never smoked tobacco (finding)"),
    "former": _snomed("8517006", "Ex-smoker (finding)"),
    "current": _snomed("449868002", "Smokes tobacco daily (finding)"),
}

#: Laboratory panels reported as DiagnosticReports: (LOINC code, display, member observations).
PANELS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "lipids": ("57698-3", "Lipid panel with direct LDL - Serum or Plasma",
               ("cholesterol", "triglycerides", "ldl", "hdl")),
    "metabolic": ("51990-0", "Basic metabolic panel - Blood",
                  ("glucose", "urea_nitrogen", "creatinine", "calcium", "sodium", "potassium")),
}

VACCINES: tuple[VaccineSpec, ...] = (
    VaccineSpec("08", "Hep B, adolescent or pediatric", 0, 1.5, doses=3),
    VaccineSpec("20", "DTaP", 0.15, 6.5, doses=5),
    VaccineSpec("10", "IPV", 0.15, 6.5, doses=4),
    VaccineSpec("49", "Hib (PRP-OMP)", 0.15, 1.5, doses=3),
    VaccineSpec("133", "Pneumococcal conjugate PCV 13", 0.15, 1.5, doses=4),
    VaccineSpec("03", "MMR", 1, 6.5, doses=2),
    VaccineSpec("21", "varicella", 1, 6.5, doses=2),
    VaccineSpec("83", "Hep A, ped/adol, 2 dose", 1, 2.5, doses=2),
    VaccineSpec("115", "Tdap", 11, 13),
    VaccineSpec("165", "HPV9", 11, 15, doses=2, chance=0.6),
    VaccineSpec("114", "meningococcal MCV4P", 11, 18, doses=2, chance=0.7),
    VaccineSpec("140", "Influenza, seasonal, injectable, preservative free", 0.5, 120, every=0.8, chance=0.55),
    VaccineSpec("113", "Td (adult) preservative free", 19, 120, every=10, chance=0.3),
    VaccineSpec("187", "zoster vaccine recombinant", 50, 120, doses=2, chance=0.4),
    VaccineSpec("33", "pneumococcal polysaccharide vaccine, 23 valent", 65, 120, chance=0.6),
    VaccineSpec("208", "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose",
                12, 120, doses=3, chance=0.5, since=2021),
)

SCREENINGS: tuple[Screening, ...] = (
    Screening(_snomed("171207006", "Depression screening (procedure)"), (12, 120), 0.3),
    Screening(_snomed("710824005", "Assessment of health and social care needs (procedure)"), (18, 120), 0.3),
    Screening(_snomed("24623002", "Screening mammography (procedure)"), (50, 75), 0.4, sex="female"),
    Screening(_snomed("73761001", "Colonoscopy (procedure)"), (50, 76), 0.08),
    Screening(_snomed("312681000", "Bone density scan (procedure)"), (65, 120), 0.15, sex="female"),
)
MEDICATION_RECONCILIATION = _snomed("430193006", "Medication reconciliation (procedure)")

#: Allergy substances: (SNOMED code, display, category).
ALLERGENS: tuple[tuple[str, str, str], ...] = (
    ("762952008", "Peanut (substance)", "food"),
    ("102263004", "Eggs (edible) (substance)", "food"),
    ("3718001", "Cow's milk (substance)", "food"),
    ("735029006", "Shellfish (substance)", "food"),
    ("227493005", "Cashew nut (substance)", "food"),
    ("373270004", "Penicillin -class of antibiotic- (substance)", "medication"),
    ("387406002", "Sulfamethoxazole (substance)", "medication"),
    ("387458008", "Aspirin (substance)", "medication"),
    ("111088007", "Latex (substance)", "environment"),
    ("256277009", "Grass pollen (substance)", "environment"),
    ("264287008", "Animal dander (substance)", "environment"),
    ("260147004", "House dust mite (substance)", "environment"),
    ("288328004", "Bee venom (substance)", "environment"),
)
REACTIONS: tuple[Code, ...] = (
    _snomed("271807003", "Eruption of skin (disorder)"),
    _snomed("247472004", "Wheal (finding)"),
    _snomed("418290006", "Itching of skin (finding)"),
    _snomed("267036007", "Dyspnea (finding)"),
    _snomed("76067001", "Sneezing (finding)"),
    _snomed("39579001", "Anaphylaxis (disorder)"),
)

#: Encounter settings: (v3 ActCode class, its display, SNOMED type code, type display, minutes (min, max)).
ENCOUNTERS: dict[str, tuple[str, str, str, str, tuple[int, int]]] = {
    "wellness": ("AMB", "ambulatory", "162673000", "General examination of patient (procedure)", (20, 45)),
    "wellchild": ("AMB", "ambulatory", "410620009", "Well child visit (procedure)", (20, 40)),
    "problem": ("AMB", "ambulatory", "185347001", "Encounter for problem (procedure)", (20, 40)),
    "followup": ("AMB", "ambulatory", "390906007", "Follow-up encounter (procedure)", (15, 30)),
    "acute": ("AMB", "ambulatory", "185345009", "Encounter for symptom (procedure)", (15, 30)),
    "emergency": ("EMER", "emergency", "50849002", "Emergency room admission (procedure)", (90, 420)),
    "inpatient": ("IMP", "inpatient encounter", "32485007", "Hospital admission (procedure)", (2 * 1440, 7 * 1440)),
}

NOTE_TYPES: dict[str, Code] = {
    "history": (LOINC, "34117-2", "History and physical note"),
    "progress": (LOINC, "11506-3", "Progress note"),
    "discharge": (LOINC, "18842-5", "Discharge summary"),
}

#: Practitioner specialties (SNOMED), the first being the most common.
SPECIALTIES: tuple[Code, ...] = (
    _snomed("419772000", "Family practice"),
    _snomed("394802001", "General medicine"),
    _snomed("394579002", "Cardiology"),
    _snomed("394583002", "Endocrinology"),
    _snomed("394587001", "Psychiatry"),
)
CARE_TEAM_ROLES: dict[str, Code] = {
    "patient": _snomed("116154003", "Patient (person)"),
    "professional": _snomed("223366009", "Healthcare professional (occupation)"),
    "organization": _snomed("224891009", "Healthcare services (qualifier value)"),
}
