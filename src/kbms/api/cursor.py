"""Opaque cursors. Clients pass them back verbatim; their content may change between versions.

Three kinds, each refused where another is expected: a list position (``v1:<updated_at>:<id>``, the keyset of the
newest-updated-first order), a position in a search's ranking (``s1:<offset>``), a position in the change feed
(``f1:<seq>``).
"""

from __future__ import annotations

import base64
import binascii
import re

from kbms.errors import FieldIssue, ValidationFailed
from kbms.storage.base import Cursor

PREFIX = "v1"
SEARCH_PREFIX = "s1"
FEED_PREFIX = "f1"
MAX_INT = 2**63
ID = re.compile(r"[0-9a-f-]{36}")
DIGITS = re.compile(r"[0-9]{1,19}")


def _encode(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(text: str) -> list[str]:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii").split(":")
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise _invalid() from None


def _invalid() -> ValidationFailed:
    return ValidationFailed(
        [FieldIssue("cursor", "invalid_cursor", "Not a cursor returned by this API for this request")],
        message="Request validation failed",
    )


def _number(text: str) -> int:
    # Database integers are 64-bit: a forged cursor must not become an overflow (a 500) downstream.
    if not DIGITS.fullmatch(text) or int(text) >= MAX_INT:
        raise _invalid()
    return int(text)


def encode_cursor(cursor: Cursor) -> str:
    return _encode(f"{PREFIX}:{cursor.updated_at}:{cursor.conversation_id}")


def decode_cursor(text: str) -> Cursor:
    parts = _decode(text)
    if len(parts) != 3 or parts[0] != PREFIX or not ID.fullmatch(parts[2]):
        raise _invalid()
    return Cursor(updated_at=_number(parts[1]), conversation_id=parts[2])


def encode_search_cursor(offset: int) -> str:
    return _encode(f"{SEARCH_PREFIX}:{offset}")


def decode_search_cursor(text: str) -> int:
    parts = _decode(text)
    if len(parts) != 2 or parts[0] != SEARCH_PREFIX:
        raise _invalid()
    return _number(parts[1])


def encode_feed_cursor(seq: int) -> str:
    return _encode(f"{FEED_PREFIX}:{seq}")


def decode_feed_cursor(text: str) -> int:
    parts = _decode(text)
    if len(parts) != 2 or parts[0] != FEED_PREFIX:
        raise _invalid()
    return _number(parts[1])
