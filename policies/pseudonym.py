"""Per-project keyed pseudonyms, date shifts and custodian-reversible encryption.

Everything here is derived from the master key with HKDF for one project, one key
version and one purpose (`policies.keys.derive_key`), so:

* pseudonyms of different projects, or of different key versions of one project, never
  match: there is no cross-project linkage and rotating a key unlinks old releases;
* a resource pseudonym maps back to the stored row without any lookup table, because it
  is the encryption of the row number under a keyed pseudorandom permutation;
* the keys never leave this module: they are not logged, not shown by `repr`, and never
  part of an error message.

The permutation is a balanced Feistel network (Luby–Rackoff) over a 16-byte block
whose round function is HMAC-SHA256 truncated to 64 bits. With 4 rounds it is a strong
pseudorandom permutation (indistinguishable from a random one even to an adversary who
may also ask for inversions, which is what `resolve` offers) as long as HMAC-SHA256 is
a PRF, up to the birthday bound of the 64-bit halves (about 2^32 chosen queries). A
research partner sees at most as many pseudonyms as rows released to it and cannot
choose the row numbers, far below that bound.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from policies.keys import MASTER_KEY_BYTES, derive_key

ROUNDS = 4
#: A pseudonym is 16 bytes in unpadded lowercase base32: 26 characters.
PSEUDONYM_LENGTH = 26
#: Date shifts lie in [-MAX_SHIFT_DAYS, MAX_SHIFT_DAYS] and are never 0.
MAX_SHIFT_DAYS = 182
_MAX_PK = 2**64
_MASK64 = _MAX_PK - 1
#: How many pseudonyms one key remembers (about 3 MB at most; emptied when full).
_MEMO_LIMIT = 16_384
_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
# base64.b32encode/b32decode are pure Python and cost more than the whole permutation:
# encode 10 bits per table look-up, decode with int(…, 32) after mapping to 0-9a-v.
_PAIRS = tuple(a + b for a in _ALPHABET for b in _ALPHABET)
_SHIFTS = tuple(range(120, -1, -10))
_TO_BASE32_DIGITS = str.maketrans(_ALPHABET, "0123456789abcdefghijklmnopqrstuv")
# 26 base32 characters carry 130 bits for 128: the last character's 2 low bits are padding.
# Only characters whose value is a multiple of 4 end a canonical encoding, so every row
# has exactly one pseudonym.
_CANONICAL_LAST = frozenset(_ALPHABET[::4])
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
_NONCE_BYTES = 12
_SHA256_BLOCK = 64
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class PseudonymError(ValueError):
    """A key cannot be built (bad master key, project or version), an argument is invalid,
    or an encrypted token cannot be decrypted with this key. Messages never hold key material."""


class PseudonymKey:
    """All keyed transformations of one project at one key version.

    Guarantees: `pseudonym` is deterministic for (project, version, type, pk) and
    injective; `resolve` inverts it and returns None for anything it did not produce
    (other type, other project or version, garbage: a forged 26-character string is
    accepted with probability about 2^-32); `date_offset_days` is deterministic per
    (project, version, patient); `encrypt` is randomised and authenticated.
    """

    __slots__ = ("_aead", "_dateshift", "_memo", "_rounds", "_tags", "_value", "project_id", "version")

    def __init__(self, master: bytes, project_id: str, version: int = 1) -> None:
        if not isinstance(master, bytes) or len(master) != MASTER_KEY_BYTES:
            raise PseudonymError(f"the master key must be {MASTER_KEY_BYTES} bytes")
        if not isinstance(project_id, str) or not project_id or ":" in project_id:
            raise PseudonymError("the project id must be a non-empty string without ':'")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise PseudonymError("the key version must be a positive integer")
        self.project_id = project_id
        self.version = version
        base = f"project:{project_id}:v{version}"
        pseudonym_key = derive_key(master, f"{base}:pseudonym")
        # One keyed state per round with the round number already absorbed.
        self._rounds = tuple(_Hmac(pseudonym_key, bytes([i])) for i in range(ROUNDS))
        self._dateshift = _Hmac(derive_key(master, f"{base}:dateshift"))
        self._value = _Hmac(derive_key(master, f"{base}:value"))
        self._aead = AESGCM(derive_key(master, f"{base}:encrypt"))
        self._tags: dict[str, int] = {}
        self._memo: dict[tuple[str, int], str] = {}

    def __repr__(self) -> str:
        return f"PseudonymKey(project_id={self.project_id!r}, version={self.version})"

    # -- resource pseudonyms --------------------------------------------------------------

    def pseudonym(self, resource_type: str, pk: int) -> str:
        """The project's id for stored row `pk` of `resource_type`: 26 chars of [a-z2-7]."""
        if isinstance(pk, bool) or not isinstance(pk, int) or not 0 <= pk < _MAX_PK:
            raise PseudonymError("a row number must be an integer in [0, 2**64)")
        # A pure function of the key and (type, pk): remembered, up to _MEMO_LIMIT at a time.
        known = self._memo.get((resource_type, pk))
        if known is not None:
            return known
        left, right = pk, self._tag(resource_type) << 32
        for round_prf in self._rounds:
            left, right = right, left ^ round_prf.round_function(right)
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        known = self._memo[(resource_type, pk)] = _base32((left << 64) | right)
        return known

    def resolve(self, resource_type: str, pseudonym: str) -> int | None:
        """The row number behind a pseudonym of `resource_type`, or None. Never raises."""
        if (not isinstance(pseudonym, str) or len(pseudonym) != PSEUDONYM_LENGTH
                or pseudonym.strip(_ALPHABET) or pseudonym[-1] not in _CANONICAL_LAST
                or not isinstance(resource_type, str) or not _RESOURCE_TYPE.fullmatch(resource_type)):
            return None
        block = int(pseudonym.translate(_TO_BASE32_DIGITS), 32) >> 2
        left, right = block >> 64, block & _MASK64
        for round_prf in reversed(self._rounds):
            left, right = right ^ round_prf.round_function(left), left
        return left if right == self._tag(resource_type) << 32 else None

    def _tag(self, resource_type: str) -> int:
        tag = self._tags.get(resource_type)
        if tag is None:
            if not isinstance(resource_type, str) or not _RESOURCE_TYPE.fullmatch(resource_type):
                raise PseudonymError("a resource type is a FHIR type name such as 'Patient'")
            tag = self._tags[resource_type] = int.from_bytes(hashlib.sha256(resource_type.encode()).digest()[:4],
                                                             "big")
        return tag

    # -- values ---------------------------------------------------------------------------

    def pseudonymise_value(self, value: str) -> str:
        """A keyed one-way pseudonym of a string (identifier values): 26 chars of [a-z2-7]."""
        digest = self._value.digest(b"value\x00" + _text(value).encode())
        return _base32(int.from_bytes(digest[:16], "big"))

    def pseudonymise_uuid(self, value: str) -> str:
        """A keyed one-way pseudonym of a UUID that is itself a (version 4 form) UUID."""
        if not isinstance(value, str) or not _UUID.fullmatch(value):
            raise PseudonymError("not a UUID")
        raw = bytearray(self._value.digest(b"uuid\x00" + value.lower().encode())[:16])
        raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
        text = raw.hex()
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"

    def date_offset_days(self, patient_id: str) -> int:
        """The patient's date shift for this project and key version: in [-182, 182], never 0."""
        digest = self._dateshift.digest(_text(patient_id).encode())
        draw = int.from_bytes(digest[:8], "big") % (2 * MAX_SHIFT_DAYS)  # bias below 2^-54
        return draw - MAX_SHIFT_DAYS if draw < MAX_SHIFT_DAYS else draw - MAX_SHIFT_DAYS + 1

    # -- custodian-reversible encryption ---------------------------------------------------

    @property
    def token_prefix(self) -> str:
        """What every token of this key starts with; it names the key version that can decrypt it."""
        return f"enc:v{self.version}:"

    def encrypt(self, value: str) -> str:
        """AES-256-GCM with a random 96-bit nonce, the project id as associated data.

        The token is `enc:v{key version}:` + unpadded base64url(nonce ‖ ciphertext ‖ tag).
        Equal values give different tokens, so tokens reveal nothing but length.
        """
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, _text(value).encode(), self.project_id.encode())
        return self.token_prefix + base64.urlsafe_b64encode(nonce + sealed).decode("ascii").rstrip("=")

    def decrypt(self, token: str) -> str:
        """The value behind a token of this project and key version; PseudonymError otherwise."""
        if not isinstance(token, str) or not token.startswith("enc:v"):
            raise PseudonymError("not an encrypted token")
        if not token.startswith(self.token_prefix):
            raise PseudonymError(f"this token was not made with key version {self.version}")
        body = token[len(self.token_prefix):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self.project_id.encode()).decode()
        except (ValueError, InvalidTag):  # binascii.Error is a ValueError
            # InvalidTag covers tampering and another project's key alike: do not say which.
            raise PseudonymError("the token is corrupt or was not made with this project's key") from None


class _Hmac:
    """HMAC-SHA256 (RFC 2104) under one key, optionally with a fixed prefix of every message.

    The key's inner and outer SHA-256 states are computed once, so a message costs two state
    copies and two short hashes — a third less than copying an `hmac.HMAC`, whose Python
    wrapper builds an object per copy. The output is HMAC-SHA256(key, prefix ‖ message),
    byte for byte (tests/test_pseudonym.py checks it against `hmac`).
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, prefix: bytes = b"") -> None:
        if len(key) > _SHA256_BLOCK:
            key = hashlib.sha256(key).digest()
        block = key.ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block) + prefix)
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def round_function(self, half: int) -> int:
        """The Feistel round function: the first 64 bits of the HMAC of `half`'s 8 big-endian bytes."""
        return int.from_bytes(self.digest(half.to_bytes(8, "big"))[:8], "big")


def _base32(block: int) -> str:
    """Unpadded lowercase RFC 4648 base32 of a 128-bit number (as of its 16 big-endian bytes)."""
    padded = block << 2
    return "".join([_PAIRS[(padded >> shift) & 0x3FF] for shift in _SHIFTS])


def _text(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise PseudonymError("expected a non-empty string")
    return value
