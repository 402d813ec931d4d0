"""The master key and the keys derived from it.

One 256-bit master key lives in a file readable by its owner only (0600). Every other
key is derived from it with HKDF-SHA256 for one named purpose, so no derived key can
be confused with another and none is ever stored. Keys are never logged.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KEY_BYTES = 32


class MasterKeyError(Exception):
    """The master key file is missing, unreadable, of the wrong size or too widely readable.

    `reason` is `missing` when the file does not exist, `invalid` otherwise."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


def ensure_master_key(path: str | os.PathLike[str]) -> bool:
    """Create the master key file with mode 0600 if it does not exist. Returns True if created."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        load_master_key(target)  # an existing key must still be valid
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(MASTER_KEY_BYTES))
    return True


def load_master_key(path: str | os.PathLike[str]) -> bytes:
    """Read the master key, refusing a file that group or others can read."""
    target = Path(path)
    try:
        mode = target.stat().st_mode
        data = target.read_bytes()
    except FileNotFoundError as exc:
        raise MasterKeyError(f"the master key file {target} does not exist", "missing") from exc
    except OSError as exc:
        raise MasterKeyError(f"cannot read the master key file {target}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MasterKeyError(f"the master key file {target} must not be readable by group or others (chmod 600)")
    if len(data) != MASTER_KEY_BYTES:
        raise MasterKeyError(f"the master key file {target} must hold exactly {MASTER_KEY_BYTES} bytes")
    return data


def derive_key(master: bytes, purpose: str, length: int = 32) -> bytes:
    """Derive an independent key for one purpose (e.g. 'paging-cursor', 'project:P:v1:pseudonym')."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=f"passerelle/{purpose}".encode()).derive(master)


def fingerprint(master: bytes) -> str:
    """Pure: a keyed hash naming the master key (HMAC-SHA256 of a fixed label under a key derived
    for this purpose): equal for equal keys, and neither the key nor a plain hash of it."""
    return hmac.new(derive_key(master, "master-key-fingerprint"), b"passerelle master key fingerprint v1",
                    hashlib.sha256).hexdigest()
