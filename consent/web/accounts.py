"""Patients' portal accounts: invitations, passphrases, lockout, sign-in.

- Only a live patient (`sessions.live_patient`) has an account: an invitation or a sign-in of a
  patient deleted since is refused like an unknown one.
- An invitation is a random token (`secrets.token_urlsafe(32)`) of which only the SHA-256 is
  stored; it is valid `INVITATION_DAYS` days and can be used once (`used` is set in the same
  transaction that sets the passphrase).
- A passphrase is normalised to Unicode NFKC first (NIST SP 800-63B §5.1.1.2), so the same
  words typed on another device (composed or decomposed accents, full-width letters) match.
  It has at least `MIN_LENGTH` characters besides the spaces around it, at least
  `MIN_DISTINCT` different characters, and is not in the list of common passwords
  (policies/data/common-passwords.txt, compared case-insensitively). It is stored as
  `scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>` (cryptography's Scrypt, n=2**15, r=8, p=1,
  a 16-byte salt).
- `MAX_FAILURES` failed sign-ins in a row lock the account for `LOCK_SECONDS`; while locked, no
  passphrase signs in, even one checked while a concurrent attempt locked it. Every sign-in
  attempt runs exactly one scrypt verification, whether the number is unknown, the account
  locked or the passphrase wrong, and every refusal looks the same.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from sqlalchemy import Connection, delete, insert, or_, select, update

from consent.patients import patient_number
from consent.web import sessions
from consent.web.errors import InvitationInvalid
from service.store.schema import invitations, patient_accounts

MIN_LENGTH = 12
#: Fewer different characters than this ("aaaaaaaaaaaa", "abcabcabcabc") is as easy to guess as a common password.
MIN_DISTINCT = 4
INVITATION_DAYS = 7
MAX_FAILURES = 5
LOCK_SECONDS = 15 * 60
COMMON_PASSWORDS = Path(__file__).resolve().parents[2] / "policies" / "data" / "common-passwords.txt"

_LOG2_N, _R, _P, _SALT_BYTES, _KEY_BYTES = 15, 8, 1, 16, 32
_SECOND_US = 1_000_000
_DAY_US = 24 * 3600 * _SECOND_US


# -- passphrases (pure) ----------------------------------------------------------------------------


@cache
def common_passwords() -> frozenset[str]:
    """The listed common passwords, lowercased (lines starting with `#` are the file's header)."""
    lines = COMMON_PASSWORDS.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip().lower() for line in lines if line.strip() and not line.startswith("#"))


def normalised(passphrase: str) -> str:
    """The form of `passphrase` that is checked and hashed: Unicode NFKC."""
    return unicodedata.normalize("NFKC", passphrase)


def passphrase_problem(passphrase: str) -> str | None:
    """Why `passphrase` is refused — `too-short` or `common` — or None when it is acceptable."""
    passphrase = normalised(passphrase).strip()
    if len(passphrase) < MIN_LENGTH:
        return "too-short"
    if len(set(passphrase.lower())) < MIN_DISTINCT or passphrase.lower() in common_passwords():
        return "common"
    return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _scrypt(salt: bytes, log2_n: int, r: int, p: int) -> Scrypt:
    return Scrypt(salt=salt, length=_KEY_BYTES, n=2 ** log2_n, r=r, p=p)


def hash_passphrase(passphrase: str) -> str:
    """The stored form of `passphrase`: `scrypt$15$8$1$<salt b64>$<hash b64>`."""
    salt = secrets.token_bytes(_SALT_BYTES)
    derived = _scrypt(salt, _LOG2_N, _R, _P).derive(normalised(passphrase).encode())
    return f"scrypt${_LOG2_N}${_R}${_P}${_b64(salt)}${_b64(derived)}"


def verify_passphrase(stored: str, passphrase: str) -> bool:
    """Whether `passphrase` matches `stored` (a `hash_passphrase` result), in constant time."""
    scheme, log2_n, r, p, salt, expected = stored.split("$")
    if scheme != "scrypt":
        raise ValueError(f"unknown passphrase hash scheme {scheme!r}")
    derived = _scrypt(base64.b64decode(salt), int(log2_n), int(r), int(p)).derive(normalised(passphrase).encode())
    return hmac.compare_digest(derived, base64.b64decode(expected))


@cache
def _dummy_hash() -> str:
    """A hash no passphrase is known for: what an unknown number's attempt is verified against."""
    return hash_passphrase(secrets.token_urlsafe(32))


# -- invitations ----------------------------------------------------------------------------------


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Invitation:
    patient_id: str
    number: str
    lang: str
    expires_us: int


def invite(conn: Connection, patient_id: str, lang: str, now_us: int) -> tuple[str, Invitation]:
    """A new invitation for the patient (their account created, passphrase unset, if they have none);
    returns the token — to give the patient, never stored — and the invitation."""
    number = patient_number(conn, patient_id)
    account = conn.execute(select(patient_accounts.c.number).where(
        patient_accounts.c.patient_id == patient_id)).first()
    if account is None:
        conn.execute(insert(patient_accounts).values(patient_id=patient_id, number=number, failed=0, updated=now_us))
    elif account.number != number:
        conn.execute(update(patient_accounts).where(patient_accounts.c.patient_id == patient_id).values(
            number=number, updated=now_us))
    token = secrets.token_urlsafe(32)
    expires = now_us + INVITATION_DAYS * _DAY_US
    conn.execute(insert(invitations).values(token_hash=_token_hash(token), patient_id=patient_id, lang=lang,
                                            created=now_us, expires=expires))
    return token, Invitation(patient_id, number, lang, expires)


def reset(conn: Connection, patient_id: str, lang: str, now_us: int) -> tuple[str, Invitation]:
    """Start over: end every session of the patient, forget their passphrase and lockout, drop
    their unused invitations, and issue a new one (as `invite`)."""
    sessions.end_all(conn, patient_id)
    conn.execute(update(patient_accounts).where(patient_accounts.c.patient_id == patient_id).values(
        passphrase=None, failed=0, locked_until=None, updated=now_us))
    conn.execute(delete(invitations).where(invitations.c.patient_id == patient_id, invitations.c.used.is_(None)))
    return invite(conn, patient_id, lang, now_us)


def pending_invitation(conn: Connection, token: str, now_us: int) -> Invitation:
    """The unused, unexpired invitation of `token` for a live patient; refused (InvitationInvalid) otherwise."""
    row = conn.execute(select(invitations, patient_accounts.c.number)
                       .join(patient_accounts, patient_accounts.c.patient_id == invitations.c.patient_id)
                       .where(invitations.c.token_hash == _token_hash(token),
                              sessions.live_patient(invitations.c.patient_id))).first()
    if row is None or row.used is not None or row.expires <= now_us:
        raise InvitationInvalid()
    return Invitation(row.patient_id, row.number, row.lang, row.expires)


def accept(conn: Connection, token: str, hashed_passphrase: str, now_us: int) -> str:
    """Use the invitation of `token` to set the patient's passphrase (a `hash_passphrase` result),
    clearing any lockout and ending their other sessions; returns the patient id.

    The invitation is marked used in this same transaction, and only if it still is unused and
    unexpired, so two concurrent uses cannot both succeed.
    """
    invitation = pending_invitation(conn, token, now_us)
    marked = conn.execute(update(invitations).where(
        invitations.c.token_hash == _token_hash(token), invitations.c.used.is_(None),
        invitations.c.expires > now_us).values(used=now_us)).rowcount
    if marked != 1:
        raise InvitationInvalid()
    conn.execute(update(patient_accounts).where(patient_accounts.c.patient_id == invitation.patient_id).values(
        passphrase=hashed_passphrase, failed=0, locked_until=None, updated=now_us))
    sessions.end_all(conn, invitation.patient_id)
    return invitation.patient_id


# -- sign-in ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    patient_id: str
    passphrase: str | None
    locked_until: int | None


def find(conn: Connection, number: str) -> Account | None:
    """The account of the live patient whose number is `number` (spaces around it ignored), if any."""
    number = number.strip()
    if not number or len(number) > patient_accounts.c.number.type.length or "\x00" in number:
        return None  # no stored number looks like this (and PostgreSQL refuses a NUL in a query)
    row = conn.execute(select(patient_accounts).where(patient_accounts.c.number == number,
                                                      sessions.live_patient(patient_accounts.c.patient_id))).first()
    return None if row is None else Account(row.patient_id, row.passphrase, row.locked_until)


def passphrase_accepted(account: Account | None, passphrase: str, now_us: int) -> bool:
    """Whether this attempt signs in: a known, unlocked account whose passphrase matches.

    Runs one scrypt verification in every case (against a dummy hash when there is no passphrase
    to check), so the time taken does not tell an unknown number from a wrong passphrase.
    """
    stored = account.passphrase if account is not None and account.passphrase else None
    matches = verify_passphrase(stored or _dummy_hash(), passphrase)
    if account is None or stored is None or is_locked(account, now_us):
        return False
    return matches


def is_locked(account: Account, now_us: int) -> bool:
    return account.locked_until is not None and account.locked_until > now_us


def record_failure(conn: Connection, account: Account, now_us: int) -> None:
    """Count a failed attempt on an unlocked account; the `MAX_FAILURES`th in a row locks it for
    `LOCK_SECONDS` (and restarts the count). Attempts on a locked account change nothing."""
    if is_locked(account, now_us):
        return
    failed = conn.execute(update(patient_accounts).where(patient_accounts.c.patient_id == account.patient_id)
                          .values(failed=patient_accounts.c.failed + 1, updated=now_us)
                          .returning(patient_accounts.c.failed)).scalar_one()
    if failed >= MAX_FAILURES:
        conn.execute(update(patient_accounts).where(patient_accounts.c.patient_id == account.patient_id).values(
            failed=0, locked_until=now_us + LOCK_SECONDS * _SECOND_US))


def record_success(conn: Connection, account: Account, now_us: int) -> bool:
    """Restart the failure count of an account whose passphrase matched; False (nothing changed, no
    sign-in) when the account is locked now — a concurrent attempt may have locked it since
    `account` was read."""
    return conn.execute(update(patient_accounts).where(
        patient_accounts.c.patient_id == account.patient_id,
        or_(patient_accounts.c.locked_until.is_(None), patient_accounts.c.locked_until <= now_us)).values(
        failed=0, locked_until=None, updated=now_us)).rowcount == 1
