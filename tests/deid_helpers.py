"""Shared constants of the de-identification and pseudonym tests (no logic under test lives here)."""
from __future__ import annotations

from pathlib import Path

#: The shipped default profile.
DEFAULT_PROFILE = Path(__file__).resolve().parent.parent / "policies" / "profiles" / "default.json"
#: A fixed master key for tests (production keys come from `init-db`).
MASTER = bytes(range(32))
