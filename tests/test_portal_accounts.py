"""Patients' portal accounts: invitations, passphrases, lockout, sign-in, `patient invite|reset`,
and the French catalogue.

An invitation is stored hashed, works once and for 7 days; a passphrase has at least 12
characters, is not a common password and is stored as scrypt; 5 failed sign-ins lock the
account for 15 minutes; one address may try 20 times per 15 minutes; every refusal reads the
same and takes about as long, whether the number is unknown, the passphrase wrong or the
account locked.
"""
from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update

from consent.web import accounts, i18n
from service import db, ratelimit
from service.store.schema import invitations, patient_accounts, rate_limits, web_sessions
from tests.portal_helpers import (
    PASSPHRASE,
    accept,
    cli,
    csrf,
    invite,
    patient_with_number,
    session_cookie,
    sign_in,
    signed_in_patient,
    token_of,
)

ROOT = Path(__file__).resolve().parent.parent
GENERIC = "Patient number or passphrase not recognised, or the account is locked for a while."
MINUTE_US = 60 * 1_000_000


@pytest.fixture
def invited(app: Flask, client: FlaskClient, custodian_headers: dict[str, str]) -> str:
    """The invitation link of patient `pat-1`, number `MRN-1`."""
    patient_with_number(client, custodian_headers, "pat-1", "MRN-1")
    return invite(app, "MRN-1")


@pytest.fixture
def account(app: Flask, client: FlaskClient, invited: str) -> FlaskClient:
    """Patient `pat-1` (number `MRN-1`) has chosen `PASSPHRASE` (in another browser): `client` is new."""
    assert accept(app.test_client(), invited).status_code == 303
    return client


def row(app: Flask, table, **where):
    with app.app_context(), db.read() as conn:
        return conn.execute(select(table).filter_by(**where)).first()


def edit(app: Flask, table, where: dict, **values) -> None:
    with app.app_context(), db.write() as conn:
        conn.execute(update(table).filter_by(**where).values(**values))


def text(response) -> str:
    return response.get_data(as_text=True)


# -- passphrases (pure) ----------------------------------------------------------------------------


def test_a_passphrase_is_stored_as_scrypt_with_its_parameters_and_salt():
    stored = accounts.hash_passphrase(PASSPHRASE)
    assert re.fullmatch(r"scrypt\$15\$8\$1\$[A-Za-z0-9+/]{22}==\$[A-Za-z0-9+/]{43}=", stored)
    assert accounts.verify_passphrase(stored, PASSPHRASE)
    assert not accounts.verify_passphrase(stored, PASSPHRASE + "!")
    assert accounts.hash_passphrase(PASSPHRASE) != stored  # a new salt each time


@pytest.mark.parametrize(("passphrase", "problem"), [
    ("short words", "too-short"),            # 11 characters
    ("QWERTY123456", "common"),              # on the list, whatever the case
    ("  1qaz2wsx3edc ", "common"),
    ("eleven chars", None),                   # 12 characters
    ("violet kettle harbour 42", None),
])
def test_a_passphrase_needs_twelve_characters_and_must_not_be_common(passphrase, problem):
    assert accounts.passphrase_problem(passphrase) == problem


def test_the_common_password_list_names_its_source_and_holds_only_long_entries():
    lines = (ROOT / "policies/data/common-passwords.txt").read_text(encoding="utf-8").splitlines()
    header = "\n".join(line for line in lines if line.startswith("#"))
    assert "Source:" in header and "Licence:" in header
    entries = [line for line in lines if not line.startswith("#")]
    assert len(entries) > 100 and all(len(entry) >= accounts.MIN_LENGTH for entry in entries)


# -- invitations -----------------------------------------------------------------------------------


def test_an_invitation_is_stored_hashed_and_valid_seven_days(app, invited):
    token = token_of(invited)
    stored = row(app, invitations, patient_id="pat-1")
    assert stored.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in json.dumps(stored._asdict())
    assert stored.expires - stored.created == 7 * 24 * 60 * MINUTE_US
    assert stored.used is None


def test_accepting_an_invitation_sets_the_passphrase_and_signs_in(app, client, invited):
    page = client.get(invited)
    assert page.status_code == 200
    assert "MRN-1" in text(page)
    response = client.post(invited.split("?")[0], data={"csrf_token": csrf(page), "passphrase": PASSPHRASE,
                                                        "confirm": PASSPHRASE})
    assert response.status_code == 303
    assert response.headers["Location"] == "/consent/"
    stored = row(app, patient_accounts, patient_id="pat-1")
    assert stored.number == "MRN-1" and accounts.verify_passphrase(stored.passphrase, PASSPHRASE)
    assert row(app, invitations, patient_id="pat-1").used is not None
    cookie = session_cookie(client)
    assert row(app, web_sessions, id_hash=hashlib.sha256(cookie.encode()).hexdigest()).patient_id == "pat-1"


def test_an_invitation_works_only_once(app, client, invited):
    assert accept(client, invited).status_code == 303
    first = row(app, patient_accounts, patient_id="pat-1").passphrase
    again = client.get(invited)
    assert again.status_code == 410
    assert "already been used or has expired" in text(again)
    replay = client.post(invited.split("?")[0], data={"csrf_token": csrf(client.get("/consent/signed-out")),
                                                      "passphrase": "another long passphrase",
                                                      "confirm": "another long passphrase"})
    assert replay.status_code == 410
    assert row(app, patient_accounts, patient_id="pat-1").passphrase == first


def test_an_expired_invitation_is_refused_and_changes_nothing(app, client, invited):
    page = client.get(invited)
    edit(app, invitations, {"patient_id": "pat-1"}, expires=db.now_us() - 1)
    response = client.post(invited.split("?")[0], data={"csrf_token": csrf(page), "passphrase": PASSPHRASE,
                                                        "confirm": PASSPHRASE})
    assert response.status_code == 410
    assert "already been used or has expired" in text(response)
    assert row(app, patient_accounts, patient_id="pat-1").passphrase is None
    assert client.get(invited).status_code == 410


def test_an_unknown_invitation_gets_the_same_page(client):
    response = client.get("/consent/invite/not-a-token")
    assert response.status_code == 410
    assert "already been used or has expired" in text(response)


@pytest.mark.parametrize(("passphrase", "confirm", "field", "message"), [
    ("too short", "too short", "passphrase", "at least 12 characters"),
    ("Qwerty123456", "Qwerty123456", "passphrase", "too common"),
    (PASSPHRASE, PASSPHRASE + "x", "confirm", "not the same"),
])
def test_a_refused_passphrase_is_explained_at_its_field_and_the_invitation_stays_usable(
        app, client, invited, passphrase, confirm, field, message):
    response = accept(client, invited, passphrase, confirm)
    assert response.status_code == 400
    page = text(response)
    assert message in page
    assert f'aria-describedby="{field}-error"' in page or f'aria-describedby="{field}-hint {field}-error"' in page
    assert f'id="{field}-error"' in page
    assert row(app, patient_accounts, patient_id="pat-1").passphrase is None
    assert row(app, invitations, patient_id="pat-1").used is None
    assert accept(client, invited).status_code == 303


def test_accepting_a_new_invitation_replaces_the_passphrase_and_ends_other_sessions(app, client, account):
    other_device = app.test_client()
    assert sign_in(other_device, "MRN-1").status_code == 303
    assert accept(client, invite(app, "pat-1"), "a brand new passphrase").status_code == 303
    assert row(app, web_sessions, patient_id="pat-1") is not None  # the new one
    with app.app_context(), db.read() as conn:
        assert len(conn.execute(select(web_sessions).filter_by(patient_id="pat-1")).all()) == 1
    assert sign_in(app.test_client(), "MRN-1").status_code == 400
    assert sign_in(app.test_client(), "MRN-1", "a brand new passphrase").status_code == 303


# -- signing in ------------------------------------------------------------------------------------


def test_a_patient_signs_in_with_number_and_passphrase(app, account):
    response = sign_in(account, " MRN-1 ")
    assert response.status_code == 303
    assert response.headers["Location"] == "/consent/"
    assert row(app, web_sessions, patient_id="pat-1") is not None


def test_signing_in_gives_a_new_session_id_and_deletes_the_old_one(app, account):
    assert sign_in(account, "MRN-1").status_code == 303
    first = session_cookie(account)
    assert sign_in(account, "MRN-1").status_code == 303
    second = session_cookie(account)
    assert second != first
    assert row(app, web_sessions, id_hash=hashlib.sha256(first.encode()).hexdigest()) is None
    assert row(app, web_sessions, id_hash=hashlib.sha256(second.encode()).hexdigest()) is not None


def _lock(app: Flask, client: FlaskClient) -> None:
    for _ in range(accounts.MAX_FAILURES):
        assert sign_in(client, "MRN-1", "not the passphrase at all").status_code == 400


def test_every_refusal_reads_the_same(app, client, account):
    unknown = sign_in(client, "MRN-404")
    wrong = sign_in(client, "MRN-1", "not the passphrase at all")
    _lock(app, client)
    locked = sign_in(client, "MRN-1")
    pages = [text(response) for response in (unknown, wrong, locked)]
    assert {response.status_code for response in (unknown, wrong, locked)} == {400}
    assert all(GENERIC in page for page in pages)
    strip = [re.sub(r'value="[^"]*"', "", page) for page in pages]  # the number typed and the token differ
    assert strip[0] == strip[1] == strip[2]


def test_five_failures_lock_the_account_for_fifteen_minutes(app, client, account):
    for _ in range(accounts.MAX_FAILURES - 1):
        assert sign_in(client, "MRN-1", "not the passphrase at all").status_code == 400
    assert row(app, patient_accounts, patient_id="pat-1").locked_until is None
    assert sign_in(client, "MRN-1", "not the passphrase at all").status_code == 400
    before = db.now_us()
    locked_until = row(app, patient_accounts, patient_id="pat-1").locked_until
    assert 14 * MINUTE_US < locked_until - before <= 15 * MINUTE_US
    assert sign_in(client, "MRN-1").status_code == 400  # the right passphrase, but locked
    assert session_cookie(client) is None
    edit(app, patient_accounts, {"patient_id": "pat-1"}, locked_until=db.now_us() - 1)  # 15 minutes later
    assert sign_in(client, "MRN-1").status_code == 303


def test_a_successful_sign_in_restarts_the_failure_count(app, client, account):
    for _ in range(accounts.MAX_FAILURES - 1):
        sign_in(client, "MRN-1", "not the passphrase at all")
    assert sign_in(client, "MRN-1").status_code == 303
    assert row(app, patient_accounts, patient_id="pat-1").failed == 0


def test_an_invited_patient_without_a_passphrase_cannot_sign_in(app, client, invited):
    response = sign_in(client, "MRN-1", "")
    assert response.status_code == 400 and GENERIC in text(response)


def _cpu_seconds(attempt: Callable[[], object], times: int = 3) -> float:
    spent = []
    for _ in range(times):
        started = time.process_time()
        attempt()
        spent.append(time.process_time() - started)
    return statistics.median(spent)


def test_a_refusal_takes_about_as_long_whatever_the_reason(app, client, account):
    accounts.hash_passphrase("warm the dummy hash up")
    sign_in(client, "MRN-404")
    unknown = _cpu_seconds(lambda: sign_in(client, "MRN-404"))
    wrong = _cpu_seconds(lambda: sign_in(client, "MRN-1", "not the passphrase at all"), times=2)
    _lock(app, client)
    locked = _cpu_seconds(lambda: sign_in(client, "MRN-1"))
    scrypt = _cpu_seconds(lambda: accounts.verify_passphrase(accounts.hash_passphrase("x" * 12), "y"))
    # Each refusal runs one scrypt verification (about half of `scrypt`, which hashes then verifies).
    for spent in (unknown, wrong, locked):
        assert spent > 0.35 * scrypt, (unknown, wrong, locked, scrypt)
    assert max(unknown, wrong, locked) < 2 * min(unknown, wrong, locked), (unknown, wrong, locked)


def test_one_address_may_try_twenty_times_per_fifteen_minutes(app, client, account, monkeypatch):
    here = {"environ_base": {"REMOTE_ADDR": "203.0.113.7"}}
    for _ in range(20):
        assert sign_in(client, "MRN-404", **here).status_code == 400
    refused = sign_in(client, "MRN-1", **here)  # even the right passphrase
    assert refused.status_code == 429
    assert "Too many attempts" in text(refused)
    assert 0 < int(refused.headers["Retry-After"]) <= 15 * 60
    assert session_cookie(client) is None
    assert row(app, patient_accounts, patient_id="pat-1").failed == 0  # refused before the account was tried
    assert sign_in(app.test_client(), "MRN-1", environ_base={"REMOTE_ADDR": "203.0.113.8"}).status_code == 303
    edit(app, rate_limits, {"bucket": "portal-sign-in:203.0.113.7"}, window_start=db.now_us() - 15 * MINUTE_US)
    assert sign_in(client, "MRN-1", **here).status_code == 303


def test_the_rate_limit_counts_in_fixed_windows(app):
    second = 1_000_000
    with app.app_context(), db.write() as conn:
        verdicts = [ratelimit.hit(conn, "test:a", 2, 60, 1000 * second + i) for i in range(3)]
        assert [v.allowed for v in verdicts] == [True, True, False]
        assert verdicts[2].retry_after == 60
        assert ratelimit.hit(conn, "test:b", 2, 60, 1000 * second).allowed  # another bucket
        reopened = ratelimit.hit(conn, "test:a", 2, 60, 1060 * second)
        assert reopened.allowed and reopened.count == 1
        assert ratelimit.prune(conn, "test:", 60, 1121 * second) == 2


# -- patient invite / reset ----------------------------------------------------------------------


def test_patient_invite_prints_a_link_and_writes_a_letter_with_a_qr_code(app, client, custodian_headers, tmp_path):
    patient_with_number(client, custodian_headers, "pat-9", "MRN-9")
    letter = tmp_path / "letter.html"
    result = cli(app, "patient", "invite", "--patient", "MRN-9", "--lang", "fr", "--letter", str(letter),
                 "--base-url", "https://portal.example.org/")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["patient"] == "pat-9"
    assert re.fullmatch(r"https://portal\.example\.org/consent/invite/[A-Za-z0-9_-]{43}\?lang=fr", printed["link"])
    html = letter.read_text(encoding="utf-8")
    assert printed["link"] in html and "<svg" in html
    assert "Votre numéro de patient : MRN-9" in html and 'lang="fr"' in html
    page = client.get(printed["link"].removeprefix("https://portal.example.org"))
    assert page.status_code == 200 and 'lang="fr"' in text(page)


def test_patient_invite_uses_the_configured_base_url(app, client, custodian_headers):
    patient_with_number(client, custodian_headers, "pat-9", "MRN-9")
    app.config["BASE_URL"] = "https://passerelle.example.org"
    result = cli(app, "patient", "invite", "--patient", "pat-9")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["link"].startswith("https://passerelle.example.org/consent/invite/")


@pytest.mark.parametrize(("args", "message"), [
    (["--patient", "nobody", "--base-url", "http://localhost"], "No patient has the id or medical record number"),
    (["--patient", "pat-9"], "PASSERELLE_BASE_URL"),
    (["--patient", "pat-0", "--base-url", "http://localhost"], "has no medical record number"),
])
def test_patient_invite_errors_are_one_readable_line(app, client, custodian_headers, args, message):
    patient_with_number(client, custodian_headers, "pat-9", "MRN-9")
    assert client.put("/fhir/Patient/pat-0", headers=custodian_headers,
                      json={"resourceType": "Patient", "id": "pat-0"}).status_code in (200, 201)
    result = cli(app, "patient", "invite", *args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_patient_reset_ends_every_session_and_voids_the_passphrase_and_older_invitations(
        app, client, custodian_headers):
    signed_in_patient(app, client, custodian_headers, "pat-1", "MRN-1")
    other_device = app.test_client()
    assert sign_in(other_device, "MRN-1").status_code == 303
    pending = invite(app, "MRN-1")
    fresh = invite(app, "MRN-1", command="reset")
    with app.app_context(), db.read() as conn:
        assert conn.execute(select(web_sessions).filter_by(patient_id="pat-1")).all() == []
    assert client.post("/consent/signout", data={"csrf_token": "x"}).status_code == 401
    assert sign_in(app.test_client(), "MRN-1").status_code == 400  # the old passphrase is void
    assert app.test_client().get(pending).status_code == 410
    assert accept(app.test_client(), fresh, "a passphrase after reset").status_code == 303
    assert sign_in(app.test_client(), "MRN-1", "a passphrase after reset").status_code == 303


# -- languages -------------------------------------------------------------------------------------


def test_the_language_follows_accept_language_and_the_switch_is_remembered(app, client, account):
    french = client.get("/consent/signin", headers={"Accept-Language": "fr-CA,fr;q=0.9,en;q=0.5"})
    assert 'lang="fr"' in text(french) and "Numéro de patient" in text(french)
    assert 'href="/consent/signin?lang=en"' in text(french)
    switched = client.get("/consent/signin?lang=en", headers={"Accept-Language": "fr"})
    assert "Patient number" in text(switched)
    assert client.get_cookie(i18n.COOKIE, path="/consent").value == "en"
    assert "Patient number" in text(client.get("/consent/signin", headers={"Accept-Language": "fr"}))
    assert 'lang="en"' in text(app.test_client().get("/consent/signin", headers={"Accept-Language": "de"}))


def test_a_switched_language_is_stored_on_the_session(app, client, account):
    assert sign_in(client, "MRN-1").status_code == 303
    client.get("/consent/signed-out?lang=fr")
    assert row(app, web_sessions, id_hash=hashlib.sha256(session_cookie(client).encode()).hexdigest()).lang == "fr"
    client.delete_cookie(i18n.COOKIE, path="/consent")
    assert "Vous êtes déconnecté" in text(client.get("/consent/signed-out", headers={"Accept-Language": "en"}))


def test_refusals_are_in_the_patients_language(client, account):
    page = text(sign_in(client, "MRN-404", headers={"Accept-Language": "fr"}))
    assert "Numéro de patient ou phrase secrète non reconnus" in page
    assert "Ce lien d’invitation ne peut plus" in text(client.get("/consent/invite/x?lang=fr"))


def test_every_message_has_a_french_translation():
    """Every msgid `pybabel extract -F consent/web/babel.cfg` finds has a non-empty, non-fuzzy translation."""
    with (ROOT / "consent" / "web" / "babel.cfg").open() as config:
        method_map, options_map = parse_mapping_cfg(config)
    keywords = {**DEFAULT_KEYWORDS, "lazy_gettext": None}
    extracted = {message if isinstance(message, str) else message[0]
                 for _file, _line, message, _comments, _context in
                 extract_from_dir(str(ROOT / "consent" / "web"), method_map, options_map, keywords=keywords)}
    with i18n.catalogue_path("fr").open("rb") as handle:
        catalog = read_po(handle, locale="fr")
    missing = sorted(msgid for msgid in extracted
                     if msgid not in catalog or catalog[msgid].fuzzy
                     or not all(catalog[msgid].string if isinstance(catalog[msgid].string, tuple)
                                else [catalog[msgid].string]))
    assert "Sign in" in extracted and "Error:" in extracted  # from Python and from a macro alike
    assert missing == [], f"add French translations to messages.po: {missing}"
