"""Free text in the patient's language, naming the patient and their phone number.

Real notes are full of identifiers; these prove de-identification finds them in
annotations (`note[].text`) and in clinical documents (base64 attachments).
"""
from __future__ import annotations

from dataclasses import dataclass
from random import Random


@dataclass(frozen=True)
class Phrasebook:
    contact: tuple[str, ...]
    note: str
    none: str
    sex: dict[str, str]


_FRENCH = Phrasebook(
    contact=(
        "Appel à {name} au {phone} pour discuter des résultats.",
        "Message laissé à {name} au {phone} au sujet du rendez-vous de suivi.",
        "{name} est joignable au {phone} ; rappeler si les symptômes persistent.",
        "Résultats communiqués par téléphone à {name} ({phone}).",
    ),
    note=("{date}\n\n# Motif de consultation\n{reason}\n\n# Histoire de la maladie\n{name}, {age} ans, {sex}.\n"
          "Problèmes actifs : {problems}.\nTraitements en cours : {medications}.\n\n# Conduite à tenir\n{contact}\n"),
    none="aucun",
    sex={"male": "de sexe masculin", "female": "de sexe féminin"},
)
_ENGLISH = Phrasebook(
    contact=(
        "Called {name} at {phone} to discuss results.",
        "Left a voicemail for {name} at {phone} about the follow-up appointment.",
        "{name} can be reached at {phone}; advised to call back if symptoms persist.",
        "Results given to {name} by phone ({phone}).",
    ),
    note=("{date}\n\n# Chief complaint\n{reason}\n\n# History of present illness\n{name} is a {age}-year-old {sex}.\n"
          "Active problems: {problems}.\nCurrent medications: {medications}.\n\n# Plan\n{contact}\n"),
    none="none",
    sex={"male": "male", "female": "female"},
)
PHRASEBOOKS: dict[str, Phrasebook] = {"FR": _FRENCH, "US": _ENGLISH}


def contact(rng: Random, country: str, name: str, phone: str) -> str:
    """One sentence about reaching the patient by phone."""
    return rng.choice(PHRASEBOOKS[country].contact).format(name=name, phone=phone)


def clinical_note(rng: Random, country: str, *, when: str, reason: str, name: str, phone: str, age: int,
                  gender: str, problems: list[str], medications: list[str]) -> str:
    """A short history-and-physical style note."""
    book = PHRASEBOOKS[country]
    return book.note.format(
        date=when, reason=reason, name=name, age=age, sex=book.sex.get(gender, "patient"),
        problems=", ".join(problems) or book.none, medications=", ".join(medications) or book.none,
        contact=contact(rng, country, name, phone))
