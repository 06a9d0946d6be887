"""The console's sessions and CSRF tokens: HMAC-SHA256 over small values, with the standard library alone.

A session cookie carries ``base64url(JSON {key name, expiry, session id}) . hex HMAC``: the key's name, never the
key, so the keyring is asked again on every request (a key revoked or removed since sign-in ends the session at
the next restart that loads the new list). A form's CSRF token is the HMAC of its session id; the sign-in form,
which comes before any session, is tied the same way to a random nonce kept in a short-lived cookie.
Tokens are compared with ``hmac.compare_digest``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

SESSION_COOKIE = "kbms_console"
LOGIN_COOKIE = "kbms_console_login"
FLASH_COOKIE = "kbms_console_flash"
LOGIN_TTL = 3600  # seconds a sign-in form stays usable


@dataclass(frozen=True, slots=True)
class Session:
    key_name: str | None  # None: authentication is off (no keys configured)
    expires: int  # unix seconds
    sid: str


class Signer:
    """Signs and checks sessions and CSRF tokens with one secret (``KBMS_CONSOLE_SECRET``)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).hexdigest()

    def new_session(self, key_name: str | None, *, now: int, ttl: int) -> tuple[Session, str]:
        """A fresh session and its cookie value."""
        session = Session(key_name, now + ttl, secrets.token_urlsafe(16))
        payload = json.dumps({"k": key_name, "e": session.expires, "s": session.sid}, separators=(",", ":"))
        encoded = base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")
        return session, f"{encoded}.{self._mac('session', encoded)}"

    def read_session(self, cookie: str | None, *, now: int) -> Session | None:
        """The session a cookie holds; None if it is missing, tampered with, malformed or expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        encoded, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac("session", encoded)):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
        except (binascii.Error, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        name, expires, sid = data.get("k"), data.get("e"), data.get("s")
        if not (name is None or isinstance(name, str)) or not isinstance(expires, int) or not isinstance(sid, str):
            return None
        if expires <= now:
            return None
        return Session(name, expires, sid)

    def csrf(self, sid: str) -> str:
        """The CSRF token of a session's forms."""
        return self._mac("csrf", sid)

    def login_csrf(self, nonce: str) -> str:
        """The CSRF token of a sign-in form, tied to the nonce of its cookie."""
        return self._mac("login", nonce)

    def sign(self, text: str) -> str:
        """``text`` with its MAC (a one-time message carried by a cookie across a redirect)."""
        encoded = base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")
        return f"{encoded}.{self._mac('flash', encoded)}"

    def unsign(self, value: str | None) -> str | None:
        if not value or value.count(".") != 1:
            return None
        encoded, mac = value.split(".")
        if not hmac.compare_digest(mac, self._mac("flash", encoded)):
            return None
        try:
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except (binascii.Error, ValueError):
            return None

    def check(self, expected: str, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))
