"""Zendesk webhook signatures (https://developer.zendesk.com/documentation/webhooks/verifying/):

``X-Zendesk-Webhook-Signature: base64(HMAC-SHA256(secret, timestamp + body))``, where the timestamp is the
``X-Zendesk-Webhook-Signature-Timestamp`` header exactly as sent, and the key is the webhook's signing secret as
text (not base64-decoded). A timestamp more than five minutes away from now, either way, is refused: a captured
delivery cannot be replayed later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

SIGNATURE = "x-zendesk-webhook-signature"
TIMESTAMP = "x-zendesk-webhook-signature-timestamp"
TOLERANCE = timedelta(minutes=5)


def sign(body: bytes, timestamp: str, secret: str) -> str:
    """The signature header value Zendesk sends for ``body`` with ``timestamp``."""
    # Headers are latin-1 on the wire (and in Starlette): these are the bytes Zendesk signed.
    message = timestamp.encode("latin-1", "replace") + body
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def verify(body: bytes, headers: Mapping[str, str], secret: str, *, now: datetime) -> bool:
    """Constant-time check of the signature; False when anything is missing, malformed or out of time."""
    if not secret:
        return False
    given = _header(headers, SIGNATURE)
    timestamp = _header(headers, TIMESTAMP)
    if not given or not timestamp:
        return False
    sent_at = parse_timestamp(timestamp)
    if sent_at is None or abs(now - sent_at) > TOLERANCE:
        return False
    expected = sign(body, timestamp, secret).encode()
    return hmac.compare_digest(expected, given.strip().encode("latin-1", "replace"))


def parse_timestamp(text: str) -> datetime | None:
    """ISO-8601 (what Zendesk sends, e.g. ``2021-09-22T21:32:41Z``) or unix seconds; None if neither."""
    text = text.strip()
    try:
        if text.isascii() and text.isdigit():
            return datetime.fromtimestamp(int(text), tz=UTC) if len(text) <= 12 else None
        parsed = datetime.fromisoformat(text)
        # Inside the try: an offset can push the first or last representable day out of range.
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _header(headers: Mapping[str, str], name: str) -> str:
    return next((value for key, value in headers.items() if key.lower() == name), "")
