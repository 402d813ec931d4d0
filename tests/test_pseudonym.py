"""Specifications of the per-project keyed pseudonyms, date shifts and encryption."""
from __future__ import annotations

import hmac
import re
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.pseudonym import MAX_SHIFT_DAYS, PSEUDONYM_LENGTH, PseudonymError, PseudonymKey, _Hmac
from tests.deid_helpers import MASTER

OTHER_MASTER = bytes(range(1, 33))
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
PKS = st.integers(min_value=0, max_value=2**64 - 1)


# -- resource pseudonyms -------------------------------------------------------------------------

def test_pseudonym_is_stable_for_the_same_key(key: PseudonymKey) -> None:
    assert key.pseudonym("Patient", 42) == PseudonymKey(MASTER, "project-a", 1).pseudonym("Patient", 42)


# What releases under the tests' master key have always given. Partners link the rows of successive
# releases of one project by these values: an implementation change must not alter one of them.
PUBLISHED = [  # (key version, resource type, row number, pseudonym)
    (1, "Patient", 0, "en6ftbjkozggjiljcvg7nvkbra"),
    (1, "Patient", 1, "zzkfpopxzp7jjvfcmdbj3sfa7i"),
    (1, "Observation", 12345, "jaxfmo5qwxzahgcs3h7ukmnn54"),
    (1, "Observation", 2**64 - 1, "bcv2aqaicgchvburgtmoasz37i"),
    (2, "Patient", 0, "dp43krwj5phkyoo3zukcbczesm"),
    (2, "Observation", 12345, "uwujmbwu3tipu2mmdd2tnokczq"),
]


@pytest.mark.parametrize(("version", "resource_type", "pk", "pseudonym"), PUBLISHED)
def test_pseudonyms_are_those_earlier_releases_published(version: int, resource_type: str, pk: int,
                                                         pseudonym: str) -> None:
    key = PseudonymKey(MASTER, "project-a", version)
    assert key.pseudonym(resource_type, pk) == pseudonym
    assert key.resolve(resource_type, pseudonym) == pk


def test_date_offsets_and_value_pseudonyms_are_those_earlier_releases_published(key: PseudonymKey) -> None:
    assert (key.date_offset_days("Patient/p1"), key.date_offset_days("pat-42")) == (46, -107)
    assert key.pseudonymise_value("MRN-1234") == "mpc6pcldsp46a74yiydwofs7fa"
    assert key.pseudonymise_uuid("9b2f3f6e-8a38-4d42-a6a4-2a6b1b0c9e11") == "0efb5890-d22e-4348-b03a-3621d63b7df6"


@given(secret=st.binary(min_size=1, max_size=200), prefix=st.binary(max_size=3), message=st.binary(max_size=150))
def test_the_keyed_hash_is_hmac_sha256_of_the_prefixed_message(secret: bytes, prefix: bytes, message: bytes) -> None:
    assert _Hmac(secret, prefix).digest(message) == hmac.digest(secret, prefix + message, "sha256")


def test_pseudonyms_differ_between_projects(key: PseudonymKey) -> None:
    assert key.pseudonym("Patient", 42) != PseudonymKey(MASTER, "project-b", 1).pseudonym("Patient", 42)


def test_pseudonyms_differ_between_key_versions(key: PseudonymKey) -> None:
    assert key.pseudonym("Patient", 42) != PseudonymKey(MASTER, "project-a", 2).pseudonym("Patient", 42)


def test_pseudonyms_differ_between_master_keys(key: PseudonymKey) -> None:
    assert key.pseudonym("Patient", 42) != PseudonymKey(OTHER_MASTER, "project-a", 1).pseudonym("Patient", 42)


def test_pseudonyms_differ_between_resource_types(key: PseudonymKey) -> None:
    assert key.pseudonym("Patient", 42) != key.pseudonym("Observation", 42)


@given(pk=PKS)
def test_resolve_round_trips_every_row_number(pk: int) -> None:
    key = PseudonymKey(MASTER, "project-a", 1)
    assert key.resolve("Observation", key.pseudonym("Observation", pk)) == pk


@given(pk=PKS)
def test_pseudonym_is_a_valid_fhir_id_of_26_lowercase_base32_characters(pk: int) -> None:
    pseudonym = PseudonymKey(MASTER, "project-a", 1).pseudonym("Patient", pk)
    assert FHIR_ID.fullmatch(pseudonym)
    assert re.fullmatch(r"[a-z2-7]{26}", pseudonym)
    assert len(pseudonym) == PSEUDONYM_LENGTH


def test_consecutive_rows_get_unrelated_pseudonyms(key: PseudonymKey) -> None:
    pseudonyms = [key.pseudonym("Patient", pk) for pk in range(1000)]
    assert len(set(pseudonyms)) == 1000
    assert len({p[:4] for p in pseudonyms}) > 900  # no shared prefix betrays the order


def test_resolve_refuses_a_pseudonym_of_another_type(key: PseudonymKey) -> None:
    assert key.resolve("Observation", key.pseudonym("Patient", 42)) is None


def test_resolve_refuses_a_pseudonym_of_another_project(key: PseudonymKey) -> None:
    assert key.resolve("Patient", PseudonymKey(MASTER, "project-b", 1).pseudonym("Patient", 42)) is None


def test_resolve_refuses_a_pseudonym_of_another_key_version(key: PseudonymKey) -> None:
    assert key.resolve("Patient", PseudonymKey(MASTER, "project-a", 2).pseudonym("Patient", 42)) is None


def test_resolve_refuses_forged_pseudonyms(key: PseudonymKey) -> None:
    genuine = key.pseudonym("Patient", 42)
    flipped = [genuine[:i] + ("a" if genuine[i] != "a" else "b") + genuine[i + 1:] for i in range(PSEUDONYM_LENGTH - 1)]
    assert all(key.resolve("Patient", forged) is None for forged in flipped)


def test_resolve_refuses_a_non_canonical_spelling(key: PseudonymKey) -> None:
    genuine = key.pseudonym("Patient", 42)
    assert key.resolve("Patient", genuine.upper()) is None
    assert key.resolve("Patient", genuine[:-1] + chr(ord(genuine[-1]) + 1)) is None  # padding bits set


@pytest.mark.parametrize("garbage", ["", "x", "a" * 25, "a" * 27, "0" * 26, "8" * 26, "+" + "a" * 25,
                                     "a" * 24 + "_a", "a" * 25 + "\n", "é" * 26, None, 42, b"a" * 26])
def test_resolve_returns_none_for_garbage(key: PseudonymKey, garbage: object) -> None:
    assert key.resolve("Patient", garbage) is None  # type: ignore[arg-type]


@given(text=st.text(max_size=40))
def test_resolve_never_raises(text: str) -> None:
    assert PseudonymKey(MASTER, "project-a", 1).resolve("Patient", text) is None


def test_resolve_returns_none_for_a_bad_resource_type(key: PseudonymKey) -> None:
    assert key.resolve("not a type", key.pseudonym("Patient", 1)) is None


@pytest.mark.parametrize("pk", [-1, 2**64, 1.0, "1", True, None])
def test_pseudonym_refuses_a_bad_row_number(key: PseudonymKey, pk: object) -> None:
    with pytest.raises(PseudonymError):
        key.pseudonym("Patient", pk)  # type: ignore[arg-type]


@pytest.mark.parametrize("resource_type", ["", "patient", "Patient/1", "Pa tient", None])
def test_pseudonym_refuses_a_bad_resource_type(key: PseudonymKey, resource_type: object) -> None:
    with pytest.raises(PseudonymError):
        key.pseudonym(resource_type, 1)  # type: ignore[arg-type]


# -- keys ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("master", "project", "version"), [
    (b"short", "p", 1), ("0" * 32, "p", 1), (MASTER, "", 1), (MASTER, "a:b", 1), (MASTER, None, 1),
    (MASTER, "p", 0), (MASTER, "p", -1), (MASTER, "p", True), (MASTER, "p", "1"),
])
def test_a_key_with_bad_material_is_refused(master: object, project: object, version: object) -> None:
    with pytest.raises(PseudonymError):
        PseudonymKey(master, project, version)  # type: ignore[arg-type]


def test_key_repr_shows_no_key_material(key: PseudonymKey) -> None:
    text = repr(key)
    assert "project-a" in text and "version=1" in text
    assert MASTER.hex() not in text and "bytes" not in text


# -- date shifts ---------------------------------------------------------------------------------

def test_date_offset_is_within_half_a_year_and_never_zero(key: PseudonymKey) -> None:
    offsets = [key.date_offset_days(f"patient-{i}") for i in range(2000)]
    assert all(-MAX_SHIFT_DAYS <= o <= MAX_SHIFT_DAYS and o != 0 for o in offsets)
    assert min(offsets) < -150 and max(offsets) > 150  # the whole range is used


def test_date_offset_is_stable(key: PseudonymKey) -> None:
    assert key.date_offset_days("p1") == PseudonymKey(MASTER, "project-a", 1).date_offset_days("p1")


def test_date_offsets_differ_between_patients(key: PseudonymKey) -> None:
    assert len({key.date_offset_days(f"patient-{i}") for i in range(100)}) > 50


def test_date_offsets_differ_between_projects_and_versions(key: PseudonymKey) -> None:
    patients = [f"patient-{i}" for i in range(50)]
    mine = [key.date_offset_days(p) for p in patients]
    assert mine != [PseudonymKey(MASTER, "project-b", 1).date_offset_days(p) for p in patients]
    assert mine != [PseudonymKey(MASTER, "project-a", 2).date_offset_days(p) for p in patients]


def test_date_offset_refuses_an_empty_patient_id(key: PseudonymKey) -> None:
    with pytest.raises(PseudonymError):
        key.date_offset_days("")


# -- value pseudonyms ----------------------------------------------------------------------------

def test_value_pseudonym_is_stable_per_project_and_unlinkable_across_projects(key: PseudonymKey) -> None:
    other = PseudonymKey(MASTER, "project-b", 1)
    assert key.pseudonymise_value("MRN-1234") == key.pseudonymise_value("MRN-1234")
    assert key.pseudonymise_value("MRN-1234") != other.pseudonymise_value("MRN-1234")
    assert key.pseudonymise_value("MRN-1234") != key.pseudonymise_value("MRN-1235")
    assert re.fullmatch(r"[a-z2-7]{26}", key.pseudonymise_value("MRN-1234"))


def test_uuid_pseudonym_is_a_stable_version_4_uuid(key: PseudonymKey) -> None:
    original = "9b2f3f6e-8a38-4d42-a6a4-2a6b1b0c9e11"
    pseudonym = key.pseudonymise_uuid(original)
    assert pseudonym == key.pseudonymise_uuid(original.upper())
    assert pseudonym != original
    assert uuid.UUID(pseudonym).version == 4
    with pytest.raises(PseudonymError):
        key.pseudonymise_uuid("not-a-uuid")


# -- encryption ----------------------------------------------------------------------------------

def test_encrypt_then_decrypt_returns_the_value(key: PseudonymKey) -> None:
    token = key.encrypt("Dupont, Jean — né à Lyon")
    assert token.startswith("enc:v1:")
    assert key.decrypt(token) == "Dupont, Jean — né à Lyon"


def test_encryption_is_randomised(key: PseudonymKey) -> None:
    assert key.encrypt("same") != key.encrypt("same")


def test_a_tampered_token_is_detected(key: PseudonymKey) -> None:
    token = key.encrypt("secret value")
    position = len(token) - 5
    tampered = token[:position] + ("A" if token[position] != "A" else "B") + token[position + 1:]
    with pytest.raises(PseudonymError):
        key.decrypt(tampered)


def test_another_projects_key_cannot_decrypt(key: PseudonymKey) -> None:
    with pytest.raises(PseudonymError, match="not made with this project's key"):
        PseudonymKey(MASTER, "project-b", 1).decrypt(key.encrypt("secret value"))


def test_another_key_version_cannot_decrypt_and_says_which_is_needed(key: PseudonymKey) -> None:
    with pytest.raises(PseudonymError, match="key version 2"):
        PseudonymKey(MASTER, "project-a", 2).decrypt(key.encrypt("secret value"))


@pytest.mark.parametrize("token", ["", "plain", "enc:v1:", "enc:v1:!!!!", "enc:v1:" + "A" * 10, None])
def test_decrypt_refuses_garbage(key: PseudonymKey, token: object) -> None:
    with pytest.raises(PseudonymError):
        key.decrypt(token)  # type: ignore[arg-type]
