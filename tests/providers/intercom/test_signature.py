"""Intercom's signature check against vectors computed outside kbms (openssl), not with its own ``sign``.

``X-Hub-Signature: sha1=<hex HMAC-SHA1 of the raw body>``, keyed with the app's client secret: right secret,
wrong secret, missing or bare header, tampered body, and the header spelled as a client may spell it.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kbms.providers import REGISTRY
from kbms.providers.intercom import signature

SECRET = "kbms-vector-secret"
BODY = (
    b'{"type":"notification_event","topic":"ping","id":"notif_kbms_vector",'
    b'"data":{"item":{"type":"ping","message":"hi"}}}'
)
# printf '%s' "$BODY" | openssl dgst -sha1 -hmac kbms-vector-secret
VECTOR = "sha1=1d06814acb1410ab4c12bd25199bbf4d6bddcc10"
# printf '%s' "$BODY" | openssl dgst -sha1 -hmac other-secret
OTHER_SECRET_VECTOR = "sha1=394bab69791b5a58dc382b230c7f013d9b6e0810"
NOW = datetime(2026, 1, 1, tzinfo=UTC)  # Intercom signs no timestamp: any time will do
# printf '%s' "" | openssl dgst -sha1 -hmac kbms-vector-secret
EMPTY_BODY_VECTOR = "sha1=180078d211aa783fc7674ae5278c52da96e3cc77"


def test_the_openssl_vector_verifies() -> None:
    assert signature.verify(BODY, {"X-Hub-Signature": VECTOR}, SECRET)
    assert signature.verify(b"", {"x-hub-signature": EMPTY_BODY_VECTOR}, SECRET)


def test_the_webhook_receiver_verifies_the_openssl_vector() -> None:
    # What the API calls: the registered provider's receiver, not the module function.
    webhooks = REGISTRY["intercom"].webhooks
    assert webhooks is not None
    assert webhooks.verify(BODY, {"x-hub-signature": VECTOR}, SECRET, now=NOW)
    assert not webhooks.verify(BODY, {"x-hub-signature": OTHER_SECRET_VECTOR}, SECRET, now=NOW)


@pytest.mark.parametrize(
    ("body", "headers", "secret"),
    [
        pytest.param(BODY, {"x-hub-signature": OTHER_SECRET_VECTOR}, SECRET, id="signed-with-another-secret"),
        pytest.param(BODY, {"x-hub-signature": VECTOR}, "other-secret", id="checked-with-another-secret"),
        pytest.param(BODY, {"x-hub-signature": VECTOR}, "", id="no-secret-configured"),
        pytest.param(BODY, {}, SECRET, id="missing-header"),
        pytest.param(BODY, {"x-hub-signature": ""}, SECRET, id="empty-header"),
        pytest.param(BODY, {"x-hub-signature": VECTOR.removeprefix("sha1=")}, SECRET, id="without-sha1-prefix"),
        pytest.param(BODY, {"x-hub-signature": "sha256=" + VECTOR[5:]}, SECRET, id="another-algorithm-prefix"),
        pytest.param(BODY + b" ", {"x-hub-signature": VECTOR}, SECRET, id="tampered-body-trailing-space"),
        pytest.param(BODY.replace(b"hi", b"ho"), {"x-hub-signature": VECTOR}, SECRET, id="tampered-body"),
        pytest.param(BODY, {"x-hub-signature": VECTOR[:-1] + "1"}, SECRET, id="last-digit-changed"),
    ],
)
def test_anything_else_is_refused(body: bytes, headers: dict[str, str], secret: str) -> None:
    assert not signature.verify(body, headers, secret)


def test_the_header_is_read_case_insensitively_and_trimmed() -> None:
    # Header names are case-insensitive on the wire; hex digits may arrive in upper case.
    assert signature.verify(BODY, {"X-HUB-SIGNATURE": f" {VECTOR.upper().replace('SHA1=', 'sha1=')} "}, SECRET)
