"""Intercom webhook signatures: ``X-Hub-Signature: sha1=<hex HMAC-SHA1 of the raw body>``, keyed with the app's
client secret. There is no timestamp to check: Intercom signs the body only."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

HEADER = "x-hub-signature"
PREFIX = "sha1="


def sign(body: bytes, secret: str) -> str:
    """The header value Intercom sends for ``body``."""
    return PREFIX + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def verify(body: bytes, headers: Mapping[str, str], secret: str) -> bool:
    """Constant-time check of the signature of the raw bytes; False when anything is missing."""
    if not secret:
        return False
    given = next((value for name, value in headers.items() if name.lower() == HEADER), "")
    if not given:
        return False
    # Bytes, not str: compare_digest raises on non-ASCII text, and a header can carry any latin-1 byte.
    return hmac.compare_digest(sign(body, secret).encode(), given.strip().lower().encode("latin-1", "replace"))
